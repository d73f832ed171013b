"""A trained GPT from a checkpoint, for commands that use one (eval, sample, export).

``load_gpt(path)`` rebuilds the model from the config and description saved in
the checkpoint, checks that its layout is the one the checkpoint holds, and
returns it with the parameters and the tokenizer. ``generate`` is the sampling
loop (temperature, top-k, greedy at temperature 0); ``loss_over_tokens`` scores a
token stream in non-overlapping windows of ``block_size``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from hpcps.backend import CPU
from hpcps.data.tokenizer import Tokenizer
from hpcps.errors import UserError
from hpcps.inference.checkpoint import (
    as_checkpoint,
    check_layout,
    checkpoint_workload,
    wrong_workload,
)
from hpcps.model.gpt import GPT

__all__ = ["LoadedGPT", "build_gpt", "check_layout", "checkpoint_workload", "draw",
           "eval_windows", "generate", "load_gpt", "loss_over_tokens", "next_token_distribution",
           "require_gpt"]


@dataclass
class LoadedGPT:
    checkpoint: object        # hpcps.checkpoint.CheckpointReader
    model: object             # hpcps.model.gpt.GPT
    params: np.ndarray        # the flat fp32 buffer, on the model's backend
    tokenizer: Optional[object]

    @property
    def step(self) -> int:
        return self.checkpoint.step

    @property
    def tokenizer_sha256(self) -> str:
        describe = self.checkpoint.manifest.get("describe", {})
        if describe.get("tokenizer_sha256"):
            return describe["tokenizer_sha256"]
        if self.tokenizer is None:
            return ""
        return hashlib.sha256(self.tokenizer.to_json().encode()).hexdigest()


def require_gpt(ck, purpose: str) -> dict:
    """The checkpoint's GPT description; a UserError for any other workload."""
    if checkpoint_workload(ck) != "gpt":
        raise wrong_workload(ck, purpose, ("gpt",))
    describe = ck.manifest.get("describe", {})
    if "vocab_size" not in describe:
        raise UserError(f"checkpoint {ck.path} does not record its vocabulary size "
                        f"(manifest describe.vocab_size)")
    return describe


def build_gpt(ck, backend=None, threads: Optional[int] = None, purpose: str = "this command"):
    """The GPT that the checkpoint's config and description define (not yet loaded)."""
    describe = require_gpt(ck, purpose)
    m = ck.config.model
    model = GPT(vocab_size=int(describe["vocab_size"]), n_layer=m.n_layer, n_head=m.n_head,
                n_embd=m.n_embd, block_size=m.block_size, bias=m.bias, dropout=0.0,
                tie_embeddings=m.tie_embeddings, backend=backend or CPU, threads=threads)
    check_layout(ck, model.layout, "GPT")
    return model


def load_gpt(path, backend=None, threads: Optional[int] = None,
             purpose: str = "this command") -> LoadedGPT:
    """Open a checkpoint (or a run directory's newest; or take an open reader) and load its
    GPT; ``purpose`` names the caller in the error for a checkpoint of another workload."""
    ck = as_checkpoint(path)
    model = build_gpt(ck, backend, threads, purpose)
    params = np.ascontiguousarray(ck.params(), dtype=np.float32)
    if not np.isfinite(params).all():
        raise UserError(f"checkpoint {ck.path} holds non-finite parameters (NaN or inf)")
    text = ck.tokenizer_json()
    tokenizer = Tokenizer.from_json(text) if text is not None else None
    if tokenizer is not None and tokenizer.vocab_size != model.vocab_size:
        raise UserError(f"checkpoint {ck.path}: its tokenizer has {tokenizer.vocab_size} tokens "
                        f"but the model's vocabulary has {model.vocab_size}")
    return LoadedGPT(ck, model, model.backend.asarray(params), tokenizer)


# -- sampling ------------------------------------------------------------------------------------
def next_token_distribution(logits: np.ndarray, temperature: float,
                            top_k: Optional[int]) -> np.ndarray:
    """(B, V) logits -> (B, V) float64 probabilities after temperature and top-k."""
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def generate(model, params, prompt_ids: np.ndarray, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: Optional[int] = None, num_samples: int = 1,
             seed: int = 0) -> np.ndarray:
    """(num_samples, len(prompt) + max_new_tokens) ids: the prompt, then sampled tokens.

    The context is cropped to the last ``block_size`` tokens; temperature 0 is greedy.
    Samples share one batch, each drawing from its own row of the same seeded stream.
    """
    prompt_ids = np.asarray(prompt_ids, dtype=np.int64).ravel()
    if prompt_ids.size == 0:
        raise UserError("the prompt encodes to no tokens: give at least one character")
    if temperature < 0 or not math.isfinite(temperature):
        raise UserError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top-k must be at least 1 (or omitted for no limit), got {top_k}")
    rng = np.random.default_rng(seed)
    backend = model.backend
    out = np.empty((num_samples, prompt_ids.size + max_new_tokens), dtype=np.int64)
    out[:, :prompt_ids.size] = prompt_ids
    for pos in range(prompt_ids.size, out.shape[1]):
        context = out[:, max(0, pos - model.block_size):pos]
        logits = backend.asnumpy(model.logits(params, backend.asarray(context)))[:, -1, :]
        if temperature == 0:
            out[:, pos] = logits.argmax(axis=-1)
            continue
        probs = next_token_distribution(logits, temperature, top_k)
        out[:, pos] = draw(probs, rng.random(num_samples))
    return out


def draw(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling: row i takes the first token whose cumulative probability
    exceeds uniforms[i] (in [0, 1)); tokens of probability 0 are never taken."""
    cdf = np.cumsum(probs, axis=-1)
    u = np.asarray(uniforms, dtype=np.float64)[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), probs.shape[-1] - 1)


# -- evaluation ----------------------------------------------------------------------------------
def eval_windows(n_tokens: int, block_size: int) -> list:
    """(start, length) of non-overlapping windows that predict tokens 1..n_tokens-1:
    full windows of block_size, then one shorter window for the remainder."""
    predicted = n_tokens - 1
    windows = [(s, block_size) for s in range(0, predicted - block_size + 1, block_size)]
    rest = predicted % block_size
    if rest:
        windows.append((predicted - rest, rest))
    return windows


def loss_over_tokens(model, params, read: Callable[[int, int], np.ndarray], n_tokens: int,
                     batch_size: int, on_progress: Optional[Callable[[int], None]] = None
                     ) -> tuple[float, int]:
    """(sum of per-token NLL in nats, tokens predicted) over tokens [0, n_tokens).

    ``read(lo, hi)`` returns those tokens (an HDF5 split or an array slice).
    """
    if n_tokens < 2:
        raise UserError(f"need at least 2 tokens to evaluate, got {n_tokens}")
    backend = model.backend
    windows = eval_windows(n_tokens, model.block_size)
    total, count = 0.0, 0
    i = 0
    while i < len(windows):
        length = windows[i][1]
        group = [w for w in windows[i:i + batch_size] if w[1] == length]
        lo, hi = group[0][0], group[-1][0] + length + 1
        tokens = np.asarray(read(lo, hi), dtype=np.int64)
        starts = np.array([s - lo for s, _ in group])
        cols = np.arange(length + 1)
        rows = tokens[starts[:, None] + cols[None, :]]
        x, y = rows[:, :-1], rows[:, 1:]
        loss = model.loss(params, backend.asarray(x), backend.asarray(y))
        total += float(loss) * y.size
        count += y.size
        if on_progress is not None:
            on_progress(y.size)
        i += len(group)
    return total, count
