"""Export a GPT checkpoint as a Hugging Face ``GPT2LMHeadModel`` directory.

Writes ``model.safetensors`` (fp32), ``config.json``, the tokenizer and a
README. The safetensors file is written here (an 8-byte little-endian header
length, a JSON header, then the raw little-endian tensors), so no extra
package is needed.

Mapping from our layout (Linear weights are (out, in); GPT-2's Conv1D stores
(in, out), so every block matrix is transposed):

    wte, wpe                  -> transformer.wte / wpe.weight
    h{i}.ln1 / ln2            -> transformer.h.{i}.ln_1 / ln_2
    h{i}.attn.qkv (rows q|k|v)-> transformer.h.{i}.attn.c_attn
    h{i}.attn.proj            -> transformer.h.{i}.attn.c_proj
    h{i}.mlp.fc / mlp.proj    -> transformer.h.{i}.mlp.c_fc / c_proj
    lnf                       -> transformer.ln_f
    lm_head.w (untied only)   -> lm_head.weight

GPT-2 always has biases: a model trained with ``bias = false`` exports zeros.
"""

from __future__ import annotations

import inspect
import json
import os
import struct
from typing import Optional

import numpy as np

from hpcps.errors import UserError
from hpcps.inference.gpt import build_gpt, checkpoint_workload, require_gpt
from hpcps.model.layers import layernorm_linear_forward

# our GPT's GELU is the tanh approximation (hpcps.model.layers.gelu_forward): GPT-2's "gelu_new"
ACTIVATION = "gelu_new"
SAFETENSORS_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64"}


def layer_norm_eps() -> float:
    """The epsilon our GPT's LayerNorms use (the default of the fused kernel it calls)."""
    return float(inspect.signature(layernorm_linear_forward).parameters["eps"].default)


# -- safetensors -------------------------------------------------------------------------------
def write_safetensors(path: str, tensors: dict, metadata: Optional[dict] = None) -> None:
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.asarray(array)     # (tobytes() below writes C order from any layout)
        dtype = array.dtype.newbyteorder("<")
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name}: dtype {array.dtype} is not supported here")
        array = array.astype(dtype, copy=False)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)     # tensor data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for array in arrays:
            fh.write(array.tobytes())


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a file written by ``write_safetensors`` (or any F32/F16/I64 one)."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        data = fh.read()
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        lo, hi = info["data_offsets"]
        tensors[name] = np.frombuffer(data[lo:hi], dtype=names[info["dtype"]]).reshape(
            info["shape"])
    return tensors, metadata


# -- the GPT-2 mapping -------------------------------------------------------------------------
def check_representable(ck) -> dict:
    """The checkpoint's GPT description, or a UserError saying why GPT-2 cannot hold it."""
    workload = checkpoint_workload(ck)
    if workload != "gpt":  # say what to use instead
        raise UserError(f"--format hf-gpt2 cannot represent checkpoint {ck.path}: it holds a "
                        f"'{workload}' model, not a GPT (use --format npz)")
    return require_gpt(ck, "--format hf-gpt2")


def gpt2_tensors(model, params: np.ndarray) -> dict:
    """Our flat buffer as GPT-2 state-dict tensors (fp32, GPT-2's names and orientation)."""
    views = model.layout.views(np.asarray(params, dtype=np.float32))
    c = model.n_embd

    def bias(name: str, size: int) -> np.ndarray:
        return views[name] if name in views else np.zeros(size, dtype=np.float32)

    out = {"transformer.wte.weight": views["wte"], "transformer.wpe.weight": views["wpe"]}
    for i in range(model.n_layer):
        ours, theirs = f"h{i}.", f"transformer.h.{i}."
        for a, b in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[theirs + b + ".weight"] = views[ours + a + ".w"]
            out[theirs + b + ".bias"] = bias(ours + a + ".b", c)
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                     ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            weight = views[ours + a + ".w"]
            out[theirs + b + ".weight"] = weight.T          # Conv1D: (in, out)
            out[theirs + b + ".bias"] = bias(ours + a + ".b", weight.shape[0])
    out["transformer.ln_f.weight"] = views["lnf.w"]
    out["transformer.ln_f.bias"] = bias("lnf.b", c)
    if not model.tie_embeddings:
        out["lm_head.weight"] = views["lm_head.w"]
    return out


def gpt2_config(model, dropout: float) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": model.vocab_size, "n_positions": model.block_size,
        "n_ctx": model.block_size, "n_embd": model.n_embd, "n_layer": model.n_layer,
        "n_head": model.n_head, "n_inner": 4 * model.n_embd,
        "activation_function": ACTIVATION, "layer_norm_epsilon": layer_norm_eps(),
        "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
        "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": bool(model.tie_embeddings),
        # our vocabularies have no special tokens: GPT-2's defaults (50256) may not exist here
        "bos_token_id": None, "eos_token_id": None,
        "torch_dtype": "float32", "use_cache": True,
    }


def export(ck, out_dir: str) -> list[str]:
    """Write the Hugging Face directory into ``out_dir`` (which exists and is empty);
    returns the file names written."""
    check_representable(ck)
    model = build_gpt(ck)
    tensors = gpt2_tensors(model, ck.params())
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors,
                      {"format": "pt", "source": f"hpcps checkpoint step {ck.step}"})
    config = gpt2_config(model, float(ck.config.model.dropout))
    files = ["model.safetensors", "config.json"]
    _write_text(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2) + "\n")
    tokenizer_text = ck.tokenizer_json()
    tokenizer_note = "no tokenizer was saved with the checkpoint"
    if tokenizer_text is not None:
        spec = json.loads(tokenizer_text)
        _write_text(os.path.join(out_dir, "hpcps_tokenizer.json"), tokenizer_text)
        files.append("hpcps_tokenizer.json")
        tokenizer_note = (f"hpcps_tokenizer.json is the {spec.get('kind')} tokenizer "
                          f"(hpcps.data.tokenizer.Tokenizer.from_json)")
        if spec.get("kind") == "bpe":
            # the byte-level BPE definition is the tokenizers library's own format
            _write_text(os.path.join(out_dir, "tokenizer.json"), json.dumps(spec["tokenizers"]))
            files.append("tokenizer.json")
            tokenizer_note += "; tokenizer.json loads with tokenizers.Tokenizer.from_file"
    readme = (f"GPT-2 ({model.n_layer} layers, {model.n_head} heads, {model.n_embd} wide, "
              f"context {model.block_size}, vocab {model.vocab_size}) exported by hpcps from "
              f"checkpoint step {ck.step}; load with "
              f"transformers.GPT2LMHeadModel.from_pretrained(this directory). {tokenizer_note}.\n")
    _write_text(os.path.join(out_dir, "README.md"), readme)
    files.append("README.md")
    return files


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
