"""AdamW with decoupled weight decay over one contiguous slice of the flat buffer.

Matches torch.optim.AdamW (non-fused): decay ``p *= 1 - lr*wd`` on the decayed
ranges, bias-corrected moments, ``eps`` added after the bias-corrected sqrt.
The update is done in place with one scratch buffer, so a server shard holds
exactly params + m + v + scratch. On CuPy the whole update is one fused kernel
(``hpcps.gpu.kernels.adamw_update``) with a per-element decay flag instead.

On NumPy the update runs in chunks of ``CHUNK`` elements (every operation is
elementwise, so the result is bit-identical), calling ``between()`` after each:
a server keeps MPI progress going through a long update that way.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from hpcps.gpu import is_cupy
from hpcps.gpu.kernels import adamw_update

CHUNK = 1 << 16   # elements per piece of a CPU update (~0.1 ms): between() runs this often


class AdamW:
    state_names = ("m", "v")

    def __init__(self, n: int, decay_ranges, *, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, xp=np):
        self.n = n
        self.decay_ranges = list(decay_ranges)
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.xp = xp
        self.m = xp.zeros(n, dtype=xp.float32)
        self.v = xp.zeros(n, dtype=xp.float32)
        self.t = 0  # updates applied so far (bias correction)
        self._decay = None
        if is_cupy(xp):   # fused kernel: a decay flag per element, no scratch
            flags = np.zeros(n, dtype=np.uint8)
            for a, b in self.decay_ranges:
                flags[a:b] = 1
            self._decay = xp.asarray(flags)
        else:
            self._tmp = xp.empty(n, dtype=xp.float32)

    def step(self, params, grad, lr: float, grad_scale: float = 1.0,
             between: Optional[Callable[[], None]] = None) -> None:
        """params -= AdamW(grad * grad_scale); params, grad: 1-D fp32 of length n.
        ``between()`` runs after every chunk of a CPU update (see the module docstring)."""
        self.t += 1
        if self._decay is not None:
            adamw_update(params, grad, self.m, self.v, self._decay, lr=lr, beta1=self.beta1,
                         beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay,
                         t=self.t, grad_scale=grad_scale)
            return
        if self.weight_decay:
            keep = np.float32(1.0 - lr * self.weight_decay)
            for a, b in self.decay_ranges:
                params[a:b] *= keep
        for lo in range(0, self.n, CHUNK):
            hi = min(self.n, lo + CHUNK)
            self._update_range(params[lo:hi], grad[lo:hi], self.m[lo:hi], self.v[lo:hi],
                               self._tmp[lo:hi], lr, grad_scale)
            if between is not None:
                between()

    def _update_range(self, params, grad, m, v, tmp, lr: float, grad_scale: float) -> None:
        xp, b1, b2 = self.xp, self.beta1, self.beta2
        # the clip scale is folded into the moment updates: no scaled copy of grad
        xp.multiply(grad, np.float32((1.0 - b1) * grad_scale), out=tmp)
        m *= np.float32(b1)
        m += tmp
        xp.multiply(grad, grad, out=tmp)
        tmp *= np.float32((1.0 - b2) * grad_scale * grad_scale)
        v *= np.float32(b2)
        v += tmp
        bc1 = 1.0 - b1 ** self.t
        bc2 = 1.0 - b2 ** self.t
        xp.sqrt(v, out=tmp)
        tmp *= np.float32(1.0 / math.sqrt(bc2))
        tmp += np.float32(self.eps)
        xp.divide(m, tmp, out=tmp)
        tmp *= np.float32(lr / bc1)
        params -= tmp

    def state(self) -> dict:
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state(self, state: dict) -> None:
        self.m[...] = self.xp.asarray(state["m"])
        self.v[...] = self.xp.asarray(state["v"])
        self.t = int(state["t"])
