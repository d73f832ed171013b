"""The servers' optimizer when workers take local steps (``ps.local_steps``): it steps the
global params with *pseudo-gradients*, delta = params a worker pulled - params after its
H inner steps (DiLoCo, arXiv 2311.08105).

- ``Nesterov``: SGD with Nesterov momentum, ``torch.optim.SGD(nesterov=True)`` semantics
  (buf = mu*buf + g; p -= lr*(g + mu*buf)), for synchronous rounds (bsp), where the
  servers apply the sample-weighted mean of every worker's delta once per round.
- ``DelayedNesterov``: for asp, where each delta is applied as it arrives. Applying
  Nesterov per delta amplifies the momentum W-fold (Async Local-SGD, arXiv 2401.09135).
  Instead each delta moves the params at lr/N right away (they stay fresh) and is
  summed; the N-th delta also moves the momentum once with the mean of the N and adds
  its momentum term. The N deltas together then move the params by exactly one
  Nesterov step on their mean: lr*(mean + mu*buf').
- ``sgd`` (heavy-ball or plain) reuses ``hpcps.optim.sgd.SGD``: lr 1 and momentum 0 is
  parameter averaging.

Same interface as AdamW and SGD (``step(params, grad, lr, grad_scale, between)``,
``state``/``load_state``), so a server runs any of them without knowing which. On NumPy
the work runs in chunks of ``CHUNK`` elements with ``between()`` after each (a server
keeps MPI progress going through a long update).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from hpcps.optim.adamw import CHUNK
from hpcps.optim.sgd import SGD, MomentumState

Between = Optional[Callable[[], None]]


def _chunks(ranges):
    for a, b in ranges:
        for lo in range(a, b, CHUNK):
            yield lo, min(b, lo + CHUNK)


class Nesterov(MomentumState):
    """SGD with Nesterov momentum on pseudo-gradients (no weight decay: the inner
    optimizer decays). ``fragments`` (streaming local steps): per fragment its ranges of
    this slice; step t (from 0) then touches fragment t mod F only, params and momentum
    elsewhere stay as they are."""
    def __init__(self, n: int, momentum: float, xp=np, fragments=None):
        self.n, self.momentum, self.xp = n, momentum, xp
        self.fragments = fragments
        self.buf = xp.zeros(n, dtype=xp.float32)
        self._tmp = xp.empty(min(n, CHUNK), dtype=xp.float32)
        self.t = 0

    def _ranges(self):
        if self.fragments is None:
            return [(0, self.n)]
        return self.fragments[self.t % len(self.fragments)]

    def step(self, params, grad, lr: float, grad_scale: float = 1.0, between: Between = None) -> None:
        ranges = self._ranges()
        self.t += 1
        mu, g_scale = np.float32(self.momentum), np.float32(grad_scale)
        for lo, hi in _chunks(ranges):
            buf, tmp = self.buf[lo:hi], self._tmp[:hi - lo]
            self.xp.multiply(grad[lo:hi], g_scale, out=tmp)
            buf *= mu
            buf += tmp                     # buf = mu*buf + g
            tmp += mu * buf                # g + mu*buf
            tmp *= np.float32(lr)
            params[lo:hi] -= tmp
            if between is not None:
                between()


class DelayedNesterov(Nesterov):
    """asp: each delta at lr/N now; momentum once per N deltas (module docstring). ``t``
    counts the deltas applied, so the position in the current group of N is t mod N."""
    state_names = ("momentum_buffer", "delay_sum")

    def __init__(self, n: int, momentum: float, group: int, xp=np):
        super().__init__(n, momentum, xp)
        self.group = group
        self.delay_sum = xp.zeros(n, dtype=xp.float32)   # the deltas of the open group

    def step(self, params, grad, lr: float, grad_scale: float = 1.0, between: Between = None) -> None:
        self.t += 1
        closes = self.t % self.group == 0
        share = np.float32(1.0 / self.group)
        mu, g_scale, step = np.float32(self.momentum), np.float32(grad_scale), np.float32(lr)
        for lo, hi in _chunks([(0, self.n)]):
            tmp, acc = self._tmp[:hi - lo], self.delay_sum[lo:hi]
            self.xp.multiply(grad[lo:hi], g_scale, out=tmp)
            acc += tmp
            tmp *= share                                   # this delta's part: g/N
            if closes:
                buf = self.buf[lo:hi]
                buf *= mu
                buf += acc * share                         # buf = mu*buf + mean of the N
                tmp += mu * buf
                acc[...] = 0.0
            tmp *= step
            params[lo:hi] -= tmp
            if between is not None:
                between()

    def state(self) -> dict:
        return {"momentum_buffer": self.buf, "delay_sum": self.delay_sum, "t": self.t}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        # a checkpoint of synchronous rounds has no open group: it starts empty
        if "delay_sum" in state:
            self.delay_sum[...] = self.xp.asarray(state["delay_sum"])
        else:
            self.delay_sum[...] = 0.0
            self.t = 0


def outer_group_size(cfg, n_pushers: int) -> int:
    """``ps.outer_buffer``: delayed Nesterov's N (auto: the number of pushers)."""
    return n_pushers if cfg.ps.outer_buffer == "auto" else int(cfg.ps.outer_buffer)


def make_outer_optimizer(cfg, n: int, mode: str, n_pushers: int, xp=np, fragments=None):
    """The servers' optimizer for a shard of ``n`` elements with ``ps.local_steps``
    (``fragments``: this shard's part of each fragment, for streaming rounds)."""
    mu = cfg.ps.outer_momentum
    if cfg.ps.outer_optimizer == "sgd":
        return SGD(n, [], momentum=mu, weight_decay=0.0, xp=xp)
    if mode == "asp":
        return DelayedNesterov(n, mu, outer_group_size(cfg, n_pushers), xp=xp)
    return Nesterov(n, mu, xp=xp, fragments=fragments)


def outer_state_names(cfg, mode: str) -> tuple:
    """The arrays a checkpoint shard holds besides the params, for the outer optimizer."""
    if cfg.ps.outer_optimizer == "sgd":
        return SGD.state_names
    return DelayedNesterov.state_names if mode == "asp" else Nesterov.state_names


def optimizer_label(cfg) -> str:
    """What a checkpoint records as its optimizer: the inner one, plus the outer one with
    local steps (a checkpoint resumes only into a run that keeps the same state)."""
    inner = cfg.train.optimizer
    return f"{inner}+outer-{cfg.ps.outer_optimizer}" if cfg.ps.local_steps else inner
