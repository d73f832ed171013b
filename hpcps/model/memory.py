"""Bytes GPT's forward + backward holds, from its shape, before anything is allocated (the
start-up memory check and ``hpcps plan``; BERT and the encoder-decoder are counted in
``hpcps.model.memory_encdec``).

The count follows the workspace of ``hpcps.model.gpt`` buffer by buffer (a test checks it
against a real step's workspace, exactly): per block the kept activations (14 (N, C)
arrays: normalized inputs, q/k/v, attention output, GELU value and derivative), the
LayerNorm-folded weight copies (7 C²) and, without recomputation, the (B, H, T, T)
attention probabilities; once per model the shared scratch (33 (N, C) arrays, the head's
included), a block of logits (``hpcps.model.lm_head``) and the head's weight gradient
(V x C) when the logits take more than one block. N = B x T tokens of a
batch shard; a model that runs its batch in S shards holds S workspaces and S - 1 extra
gradient buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpcps.model.attention import head_chunk
from hpcps.model.layers import ONE_HOT_LIMIT
from hpcps.model.lm_head import rows_per_chunk

KEPT_PER_TOKEN = 14        # (N, C) arrays a block keeps for its backward (see above)
SHARED_PER_TOKEN = 33      # (N, C) arrays of scratch shared by all blocks and the head
FOLDED_WEIGHTS = 7         # C² : q/k/v (3 C²) and fc (4 C²) weights with the LayerNorm folded in


@dataclass(frozen=True)
class TransformerShape:
    n_layer: int
    n_head: int
    n_embd: int
    seq: int                   # tokens per sequence (block_size)
    vocab: int
    bias: bool = False
    dropout: float = 0.0


def block_set_bytes(s: TransformerShape, b: int, keep_probs: bool, item: int = 4) -> int:
    """One block's kept activations for b sequences (and its probabilities when kept)."""
    n, c, t = b * s.seq, s.n_embd, s.seq
    total = KEPT_PER_TOKEN * n * c + FOLDED_WEIGHTS * c * c
    if s.bias:
        total += 7 * c
    if keep_probs:
        total += b * s.n_head * t * t * (2 if s.dropout else 1)
    return total * item


def _dropout_masks(s: TransformerShape, b: int, item: int = 4) -> int:
    """Masks a block keeps when dropout is on (outside the workspace): probabilities and
    both branches."""
    if not s.dropout:
        return 0
    return (b * s.n_head * s.seq * s.seq + 2 * b * s.seq * s.n_embd) * item


def workspace_bytes(s: TransformerShape, b: int, recompute: str, evaluation: bool = True,
                    item: int = 4) -> dict:
    """{activations, logits, scratch}: the workspace of one batch shard of b sequences after
    a training step (and an evaluation at the same batch when ``evaluation``)."""
    n, c, t, v, h = b * s.seq, s.n_embd, s.seq, s.vocab, s.n_head
    hc = head_chunk(b, h, t, t, item)
    chunks = b * hc * t * t * (3 if s.dropout else 2)
    if recompute == "block":
        kept = (s.n_layer + 1) * n * c * item + block_set_bytes(s, b, False, item)
        probs_scratch = chunks
    elif recompute == "attention":
        kept = s.n_layer * block_set_bytes(s, b, False, item)
        probs_scratch = chunks
    else:
        kept = s.n_layer * block_set_bytes(s, b, True, item)
        probs_scratch = b * h * t * t
        if evaluation:    # the forward-only pass: one more shared set, probabilities in chunks
            kept += block_set_bytes(s, b, False, item)
            probs_scratch += b * hc * t * t
    if recompute == "attention" and evaluation:
        kept += block_set_bytes(s, b, False, item)
    shared = (SHARED_PER_TOKEN + (1 if s.dropout else 0)) * n * c + FOLDED_WEIGHTS * c * c
    shared += t * t + t + n + 4 * c + v                             # mask, ones, q scale
    head_rows = rows_per_chunk(n, v, item)
    if head_rows < n:
        shared += v * c                                             # the head's weight grad
    if n * v <= ONE_HOT_LIMIT:
        shared += v * n
    return {"activations": kept, "logits": head_rows * v * item,
            "scratch": (shared + probs_scratch) * item}


def shard_bytes(s: TransformerShape, b: int, recompute: str, item: int = 4) -> dict:
    """{term: bytes} of one batch shard of b sequences at its peak: the workspace, kept
    dropout masks and the largest temporary."""
    out = workspace_bytes(s, b, recompute, True, item)
    if recompute != "block":
        out["activations"] += s.n_layer * _dropout_masks(s, b, item)
    n, c, t, v, h = b * s.seq, s.n_embd, s.seq, s.vocab, s.n_head
    transient = 3 * n * c * item                                   # the embedding backward's sort
    if s.dropout:
        transient = max(transient, 13 * b * h * t * t)             # a mask's hash words
    out["scratch"] += transient
    return out


def model_bytes(s: TransformerShape, shards: list[int], recompute: str, n_params: int,
                item: int = 4) -> dict:
    """{term: bytes} of a model whose batch runs in shards of these sizes (sequences)."""
    out = {"activations": 0, "logits": 0, "scratch": 0}
    for b in shards:
        for key, value in shard_bytes(s, b, recompute, item).items():
            out[key] += value
    out["batch-shard gradients"] = (len(shards) - 1) * n_params * item
    return out
