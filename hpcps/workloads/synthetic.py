"""A model-free workload whose gradients are exact small integers.

Worker slice [lo, hi) of step t pushes g[i] = (lo + 1) * (1 + i % 5): with SGD
(lr 1, no momentum, no decay, no clipping) the final parameters are an exact
integer sum, so any lost, duplicated or torn update shows up as a wrong number.
``compute_ms`` stands in for forward/backward time in PS benchmarks.
"""

from __future__ import annotations

import time

import numpy as np

from hpcps.model.layout import ParamLayout
from hpcps.workloads.base import Workload


class SyntheticWorkload(Workload):
    name = "synthetic"

    def __init__(self, cfg, backend):
        self.cfg = cfg
        self.backend = backend
        n = cfg.synthetic.n_params
        self.layout = ParamLayout()
        rows = max(1, n // 64)
        if rows * 64 < n:  # a 2-D block plus a 1-D tail: both decay kinds appear
            self.layout.add("w", (rows, 64), value=0.0)
            self.layout.add("tail", (n - rows * 64,), value=0.0)
        else:
            self.layout.add("w", (rows, 64), value=0.0)
        self._pattern = None

    @property
    def pattern(self) -> np.ndarray:
        """Built on first use: only workers need it (a server holding a whole-model array
        would need memory that grows with the model, not with its shard)."""
        if self._pattern is None:
            self._pattern = (1 + np.arange(self.layout.total) % 5).astype(np.float32)
        return self._pattern

    def train_batch(self, step, lo, hi):
        return (lo, hi)

    def loss_and_grad(self, params, grads, batch, step, lo, on_grad_ready=None):
        if self.cfg.synthetic.compute_ms:
            time.sleep(self.cfg.synthetic.compute_ms / 1000.0)
        np.multiply(self.pattern, np.float32(lo + 1), out=grads)
        return 0.0, float(batch[1] - batch[0])

    def eval_sums(self, params, lo, hi):
        return {"param_sum": float(np.asarray(params, dtype=np.float64).sum()), "count": 1.0}

    def finalize_eval(self, sums):
        return {"val_param_sum": sums["param_sum"] / max(sums["count"], 1.0)}


def build(cfg, backend, corpus=None):
    return SyntheticWorkload(cfg, backend)
