"""SGD with (heavy-ball) momentum and decoupled weight decay over one slice,
torch.optim.SGD semantics for momentum (buf = mu*buf + g; p -= lr*buf)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np


class MomentumState:
    """The state of a momentum optimizer: its buffer ``buf`` and step count ``t`` (shared by
    SGD and the outer Nesterov of local steps)."""
    state_names = ("momentum_buffer",)

    def state(self) -> dict:
        return {"momentum_buffer": self.buf, "t": self.t}

    def load_state(self, state: dict) -> None:
        self.buf[...] = self.xp.asarray(state["momentum_buffer"])
        self.t = int(state["t"])


class SGD(MomentumState):
    def __init__(self, n: int, decay_ranges, *, momentum=0.9, weight_decay=0.0, xp=np):
        self.n = n
        self.decay_ranges = list(decay_ranges)
        self.momentum, self.weight_decay, self.xp = momentum, weight_decay, xp
        self.buf = xp.zeros(n, dtype=xp.float32)
        self._tmp = xp.empty(n, dtype=xp.float32)
        self.t = 0

    def step(self, params, grad, lr: float, grad_scale: float = 1.0,
             between: Optional[Callable[[], None]] = None) -> None:
        """params -= lr * momentum(grad * grad_scale); ``between()`` afterwards (SGD is one
        cheap pass: no need to cut it up)."""
        self.t += 1
        if self.weight_decay:
            keep = np.float32(1.0 - lr * self.weight_decay)
            for a, b in self.decay_ranges:
                params[a:b] *= keep
        tmp = self._tmp
        self.xp.multiply(grad, np.float32(grad_scale), out=tmp)
        if self.momentum:
            self.buf *= np.float32(self.momentum)
            self.buf += tmp
            self.xp.multiply(self.buf, np.float32(lr), out=tmp)
        else:
            tmp *= np.float32(lr)
        params -= tmp
        if between is not None:
            between()
