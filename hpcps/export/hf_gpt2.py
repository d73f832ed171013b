"""Export a GPT checkpoint as a Hugging Face ``GPT2LMHeadModel`` directory.

Writes ``model.safetensors`` (fp32, by ``hpcps.data.safetensors``: no extra
package needed), ``config.json``, the tokenizer and a README. ``hpcps import``
reads such directories back through the same name table (``tensor_map``).

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

import numpy as np

from hpcps.data.safetensors import write_safetensors
from hpcps.errors import UserError
from hpcps.inference.gpt import build_gpt, checkpoint_workload, require_gpt
from hpcps.model.layers import layernorm_linear_forward

# our GPT's GELU is the tanh approximation (hpcps.model.layers.gelu_forward): GPT-2's "gelu_new"
ACTIVATION = "gelu_new"


def layer_norm_eps() -> float:
    """The epsilon our GPT's LayerNorms use (the default of the fused kernel it calls)."""
    return float(inspect.signature(layernorm_linear_forward).parameters["eps"].default)


# -- the GPT-2 mapping -------------------------------------------------------------------------
def check_representable(ck) -> dict:
    """The checkpoint's GPT description, or a UserError saying why GPT-2 cannot hold it."""
    workload = checkpoint_workload(ck)
    if workload != "gpt":  # say what to use instead
        raise UserError(f"--format hf-gpt2 cannot represent checkpoint {ck.path}: it holds a "
                        f"'{workload}' model, not a GPT (use --format npz)")
    return require_gpt(ck, "--format hf-gpt2")


def tensor_map(n_layer: int, tied: bool) -> list[tuple[str, str, bool]]:
    """(our name, GPT-2's name, transposed?) of every tensor of a GPT-2 state dict, in its
    order: the one table both directions (export and ``hpcps import``) read."""
    names = [("wte", "transformer.wte.weight", False), ("wpe", "transformer.wpe.weight", False)]
    for i in range(n_layer):
        ours, theirs = f"h{i}.", f"transformer.h.{i}."
        for a, b, conv1d in (("ln1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                             ("attn.proj", "attn.c_proj", True), ("ln2", "ln_2", False),
                             ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)):
            names.append((ours + a + ".w", theirs + b + ".weight", conv1d))   # Conv1D: (in, out)
            names.append((ours + a + ".b", theirs + b + ".bias", False))
    names += [("lnf.w", "transformer.ln_f.weight", False),
              ("lnf.b", "transformer.ln_f.bias", False)]
    if not tied:
        names.append(("lm_head.w", "lm_head.weight", False))
    return names


def gpt2_tensors(model, params: np.ndarray) -> dict:
    """Our flat buffer as GPT-2 state-dict tensors (fp32, GPT-2's names and orientation);
    a model without biases gets zeros (GPT-2 always has them)."""
    views = model.layout.views(np.asarray(params, dtype=np.float32))
    out = {}
    for ours, theirs, transposed in tensor_map(model.n_layer, model.tie_embeddings):
        if ours in views:
            out[theirs] = views[ours].T if transposed else views[ours]
        else:   # a bias: as long as its layer's output
            out[theirs] = np.zeros(views[ours[:-1] + "w"].shape[0], dtype=np.float32)
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
