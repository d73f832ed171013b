"""A Hugging Face ``GPT2LMHeadModel`` directory as an hpcps GPT checkpoint.

The inverse of ``hpcps.export.hf_gpt2`` through the same name table
(``tensor_map``): Conv1D weights (in, out) are transposed into our (out, in),
every bias is kept (GPT-2 has them: ``model.bias = true``), a tied head stays tied
(``tie_word_embeddings``; an ``lm_head.weight`` saved beside it must equal
``wte``), and ``n_positions`` becomes ``model.block_size``.

Only what our GPT computes is accepted: GELU in its tanh form (``gelu_new`` and
its aliases), LayerNorm epsilon 1e-5, attention scaled by 1/sqrt(head size),
an MLP 4x wide. Anything else (another ``model_type``, cross-attention, per-layer
attention scaling, a tensor of the wrong shape) is one line naming the key or
tensor, since the imported model would otherwise compute something else.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

from hpcps.config.load import default_config
from hpcps.errors import UserError
from hpcps.export.hf_gpt2 import layer_norm_eps, tensor_map
from hpcps.importer import hf_dir
from hpcps.model.gpt import build_layout

MODEL_TYPE = "gpt2"
# GELU in the tanh form our GPT computes, under the names transformers gives it
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# GPT-2 checkpoints of older transformers also saved the causal-mask buffers: not weights
MASK_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")


class GPT2Shape:
    """The model ``config.json`` describes, checked against what our GPT can compute."""

    def __init__(self, config: dict, path: str):
        self.path = path
        model_type = config.get("model_type")
        if model_type != MODEL_TYPE:
            raise UserError(f"{path}: model_type {model_type!r} is not supported: hpcps imports "
                            f"GPT-2 ({MODEL_TYPE!r}, GPT2LMHeadModel) checkpoints")
        self.vocab_size = self._int(config, "vocab_size")
        self.n_layer = self._int(config, "n_layer")
        self.n_head = self._int(config, "n_head")
        self.n_embd = self._int(config, "n_embd")
        self.block_size = self._int(config, "n_positions")
        if self.n_embd % self.n_head:
            raise UserError(f"{path}: n_embd {self.n_embd} is not divisible by n_head "
                            f"{self.n_head}")
        self.tie_embeddings = config.get("tie_word_embeddings", True) is not False
        self.dropout = float(config.get("resid_pdrop", 0.0) or 0.0)
        self._check_computation(config)

    def _int(self, config: dict, key: str) -> int:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{self.path}: {key} must be a positive integer, got {value!r}")
        return value

    def _check_computation(self, config: dict) -> None:
        inner = config.get("n_inner")
        if inner is not None and inner != 4 * self.n_embd:
            raise UserError(f"{self.path}: n_inner {inner} is not 4 x n_embd "
                            f"({4 * self.n_embd}), the MLP width hpcps's GPT has")
        activation = config.get("activation_function", "gelu_new")
        if activation not in TANH_GELU:
            raise UserError(f"{self.path}: activation_function {activation!r} is not supported: "
                            f"hpcps's GPT computes GELU in its tanh form ({', '.join(TANH_GELU)})")
        eps = config.get("layer_norm_epsilon", 1e-5)
        if not isinstance(eps, (int, float)) or not math.isclose(eps, layer_norm_eps(),
                                                                 rel_tol=1e-9):
            raise UserError(f"{self.path}: layer_norm_epsilon {eps!r} is not supported: "
                            f"hpcps's LayerNorm uses {layer_norm_eps():g}")
        for key, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx",
                                                           False), ("add_cross_attention", False)):
            if bool(config.get(key, wanted)) != wanted:
                raise UserError(f"{self.path}: {key} = {str(not wanted).lower()} is not "
                                f"supported (hpcps's GPT computes {key} = "
                                f"{str(wanted).lower()})")

    def config(self, out_dir: str):
        """The hpcps config of this model (defaults elsewhere), as an imported run saves it."""
        return default_config().replace(
            workload="gpt", out_dir=out_dir, model__n_layer=self.n_layer,
            model__n_head=self.n_head, model__n_embd=self.n_embd,
            model__block_size=self.block_size, model__bias=True,
            model__tie_embeddings=self.tie_embeddings, model__dropout=min(self.dropout, 0.99))

    def layout(self):
        return build_layout(vocab_size=self.vocab_size, n_layer=self.n_layer,
                            n_embd=self.n_embd, block_size=self.block_size, bias=True,
                            tie_embeddings=self.tie_embeddings)

    def describe(self) -> str:
        head = "tied" if self.tie_embeddings else "untied"
        return (f"{self.n_layer} layers, {self.n_head} heads, {self.n_embd} wide, context "
                f"{self.block_size}, vocab {self.vocab_size}, {head} head")


def gpt2_names(tensors: dict) -> dict:
    """Tensor name -> tensor with GPT-2's ``transformer.`` prefix on every body tensor
    (a ``GPT2Model`` saves them without it), causal-mask buffers dropped."""
    out = {}
    for name, tensor in tensors.items():
        if MASK_BUFFER.search(name):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        out[name] = tensor
    return out


def flat_params(shape: GPT2Shape, tensors: dict, where: str, layout) -> np.ndarray:
    """Our flat fp32 buffer filled from GPT-2's tensors, every name and shape checked."""
    tensors = gpt2_names(tensors)
    params = layout.new_buffer()
    views = layout.views(params)
    expected = tensor_map(shape.n_layer, shape.tie_embeddings)
    for ours, theirs, transposed in expected:
        if theirs not in tensors:
            raise UserError(f"{where} lacks tensor {theirs}, which a GPT-2 of {shape.describe()} "
                            f"has")
        tensor = tensors[theirs]
        target = views[ours].T if transposed else views[ours]
        if tuple(tensor.shape) != target.shape:
            raise UserError(f"{where}: tensor {theirs} has shape {tuple(tensor.shape)}; "
                            f"{shape.path} (n_embd {shape.n_embd}, n_positions "
                            f"{shape.block_size}, vocab {shape.vocab_size}) needs {target.shape}")
        if tensor.dtype.kind != "f":
            raise UserError(f"{where}: tensor {theirs} holds {tensor.dtype} values, not floats")
        target[...] = tensor
    known = {theirs for _, theirs, _ in expected}
    extra = sorted(set(tensors) - known - {"lm_head.weight"})
    if extra:
        raise UserError(f"{where} holds tensor {extra[0]} ({len(extra)} unknown in all), which a "
                        f"GPT-2 of {shape.describe()} does not have")
    if "lm_head.weight" in tensors and shape.tie_embeddings:
        head = tensors["lm_head.weight"]
        if tuple(head.shape) != views["wte"].shape or not np.array_equal(head, views["wte"]):
            raise UserError(f"{where}: lm_head.weight differs from transformer.wte.weight, but "
                            f"{shape.path} ties them (tie_word_embeddings); set it to false to "
                            f"import an untied head")
    if not np.isfinite(params).all():
        raise UserError(f"{where} holds non-finite weights (NaN or inf)")
    return params


def read_model(directory: str) -> tuple[GPT2Shape, np.ndarray, str]:
    """(shape, flat params, the weight files read) of a GPT-2 directory."""
    hf_dir.check_model_dir(directory)
    config_path = os.path.join(directory, hf_dir.CONFIG)
    shape = GPT2Shape(hf_dir.read_json(config_path, "the model's configuration"), config_path)
    tensors, source = hf_dir.read_weights(directory)
    where = os.path.join(directory, source) if source == hf_dir.SAFETENSORS else \
        f"{directory} ({source})"
    return shape, flat_params(shape, tensors, where, shape.layout()), source
