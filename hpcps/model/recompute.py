"""Activation recomputation (``train.recompute``): what a forward keeps of each block.

A transformer's backward needs every block's activations, about 14 (B, T, C) arrays and
the (B, H, T, T) attention probabilities per block in fp32, which for GPT-2 sizes is far
more than the parameters. Three modes trade that memory for compute:

* ``none``: every block keeps its activations (fastest).
* ``attention``: the probabilities are computed a few heads at a time and not kept; the
  backward computes them again from the kept q and k (``attention.attention_forward``
  with ``keep_probs=False``). Saves B·H·T² per block for about one more score GEMM.
* ``block``: only each block's input is kept (B·T·C); the backward runs the block's
  forward again, into one set of buffers shared by all blocks, just before its backward.
  Costs one more forward of the blocks.

Recomputed values are bit-identical to the kept ones (same operations on the same
inputs, in the same order), so the gradients are too.
"""

from __future__ import annotations

from typing import Callable

from hpcps.errors import UserError
from hpcps.model.workspace import Workspace

RECOMPUTE_MODES = ("none", "attention", "block")
SHARED_PREFIX = "blk."   # workspace names of the block whose activations are live (block mode)

# run(x, prefix) -> cache: a block's forward on the residual stream x (updated in place),
# its activations under workspace names starting with prefix
BlockForward = Callable[[object, str], tuple]


def check_recompute(mode: str) -> str:
    if mode not in RECOMPUTE_MODES:
        raise UserError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {mode!r}")
    return mode


class BlockActivations:
    """One forward's blocks, as the backward will ask for them (``cache(i)``).

    for_backward=False (evaluation, sampling): nothing is kept, every block writes the
    same shared buffers, whatever the mode."""

    def __init__(self, mode: str, ws: Workspace, for_backward: bool = True,
                 tag: str = "") -> None:
        """tag: prefix of this stack's workspace names (an encoder and a decoder differ)."""
        self.mode, self.ws, self.for_backward, self.tag = mode, ws, for_backward, tag
        self.shared = tag + SHARED_PREFIX
        self._kept: list = []

    @property
    def keep_probs(self) -> bool:
        """Whether attention keeps its probabilities for the backward."""
        return self.mode == "none" and self.for_backward

    def forward(self, i: int, x, run: BlockForward) -> None:
        """Block i's forward on x; keeps its cache, or its input, or nothing."""
        if not self.for_backward:
            run(x, self.shared)
        elif self.mode == "block":
            saved = self.ws.get(f"{self.tag}h{i}.input", x.shape, x.dtype)
            self.ws.xp.copyto(saved, x)
            self._kept.append((saved, run))
            run(x, self.shared)
        else:
            self._kept.append(run(x, f"{self.tag}h{i}."))

    def cache(self, i: int) -> tuple:
        """Block i's cache for its backward: kept, or (block mode) computed again from the
        kept input into the shared buffers, which block i + 1's backward is done with."""
        if self.mode != "block":
            return self._kept[i]
        saved, run = self._kept[i]
        x = self.ws.get(self.tag + "recompute.x", saved.shape, saved.dtype)
        self.ws.xp.copyto(x, saved)
        return run(x, self.shared)
