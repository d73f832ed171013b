"""What the training runtime needs from a workload (GPT, BERT, seq2seq, skip-gram, RNN).

The runtime never looks inside a model: it owns the flat parameter / gradient
buffers, asks the workload for the slice ``[lo, hi)`` of the global batch of a
step, for the mean loss and gradient of that slice, and for evaluation sums that
can be added across workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import numpy as np

from hpcps.model.layout import GradReady, ParamLayout


class Workload(ABC):
    name: str = ""
    layout: ParamLayout
    tokens_per_item: int = 1        # tokens a training item (sequence) contributes to tokens/s
    recomputes: bool = False        # whether train.recompute changes what a step keeps

    @abstractmethod
    def train_batch(self, step: int, lo: int, hi: int) -> Any:
        """Items [lo, hi) of the global batch of ``step`` (host arrays)."""

    @abstractmethod
    def loss_and_grad(self, params, grads, batch, step: int, lo: int,
                      on_grad_ready: Optional[GradReady] = None) -> tuple[float, float]:
        """Overwrite ``grads`` with d(mean loss)/d(params); return (mean loss, weight).
        ``weight`` is what the mean is over (tokens, masked tokens, pairs): the runtime
        combines workers' gradients as sum(weight_w * grad_w) / sum(weight_w).
        ``on_grad_ready(lo, hi)``, where the model can, hears of every gradient range as
        soon as backward has finished it (a workload that never calls it is pushed whole)."""

    @abstractmethod
    def eval_sums(self, params, lo: int, hi: int) -> dict[str, float]:
        """Additive statistics over eval items [lo, hi) (e.g. loss_sum, count)."""

    @abstractmethod
    def finalize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics (val_loss, val_ppl, val_accuracy, ...) from sums added over workers."""

    def touched_rows(self, batch) -> dict[str, np.ndarray]:
        """For tensors with ``sparse_rows``: the rows whose gradient may be nonzero."""
        return {}

    def flops_per_item(self) -> float:
        return 0.0

    def memory_bytes(self, batch: int, recompute: Optional[str] = None) -> dict[str, int]:
        """{term: bytes} the model's training step over ``batch`` items holds beyond the flat
        parameter and gradient buffers (the start-up memory check), with the configured
        ``train.recompute`` or the one given (ignored where ``recomputes`` is False). Empty
        for a workload without a model of its own (the synthetic one)."""
        return {}

    def data_bytes(self) -> dict[str, int]:
        """{term: bytes} of training data a worker loads into RAM."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Shape facts stored in checkpoint manifests and checked on resume."""
        return {"workload": self.name, "n_params": self.layout.total}
