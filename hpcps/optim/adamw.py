"""AdamW with decoupled weight decay over one contiguous slice of the flat buffer.

Matches torch.optim.AdamW (non-fused): decay ``p *= 1 - lr*wd`` on the decayed
ranges, bias-corrected moments, ``eps`` added after the bias-corrected sqrt.
The update is done in place with one scratch buffer, so a server shard holds
exactly params + m + v + scratch. On CuPy the whole update is one fused kernel
(``hpcps.gpu.kernels.adamw_update``) with a per-element decay flag instead.
"""

from __future__ import annotations

import math

import numpy as np

from hpcps.gpu import is_cupy
from hpcps.gpu.kernels import adamw_update


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

    def step(self, params, grad, lr: float, grad_scale: float = 1.0) -> None:
        """params -= AdamW(grad * grad_scale); params, grad: 1-D fp32 of length n."""
        if self._decay is not None:
            self.t += 1
            adamw_update(params, grad, self.m, self.v, self._decay, lr=lr, beta1=self.beta1,
                         beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay,
                         t=self.t, grad_scale=grad_scale)
            return
        xp, tmp, m, v = self.xp, self._tmp, self.m, self.v
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        # the clip scale is folded into the moment updates: no scaled copy of grad
        xp.multiply(grad, np.float32((1.0 - b1) * grad_scale), out=tmp)
        m *= np.float32(b1)
        m += tmp
        xp.multiply(grad, grad, out=tmp)
        tmp *= np.float32((1.0 - b2) * grad_scale * grad_scale)
        v *= np.float32(b2)
        v += tmp
        if self.weight_decay:
            keep = np.float32(1.0 - lr * self.weight_decay)
            for a, b in self.decay_ranges:
                params[a:b] *= keep
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
