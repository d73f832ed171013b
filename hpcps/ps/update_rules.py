"""Delay compensation: how a server treats a push computed on params tau updates old.

The server's update policy is a plug-in (``UpdateRule``, ``ps.delay_compensation``):
before the optimizer steps with a push, the rule may correct the gradient in place
and scale the learning rate; after the step it sees the new params.

- ``none``: the push as it is.
- ``lr``: learning rate / max(1, tau) (staleness-aware learning rate).
- ``dc``: DC-ASGD, g + lambda * g*g*(w - w_pulled): a first-order Taylor step from
  the params the push was computed on to the current ones, with g*g standing in for
  the Hessian's diagonal. With AdamW, lambda is divided per element by the root of
  the second moment the update is about to use (adaptive DC-ASGD), so one lambda
  fits gradients of any scale.
- ``gap``: Gap-Aware, g divided elementwise by max(1, |w - w_pulled| / C), C the
  moving average of one update's size per element: a push is damped by how many
  typical updates the params moved since it was computed.
- ``lookahead``: compensate before the gradient is computed instead of after. The
  server keeps the true params privately and lets workers pull them extrapolated
  along the last update, w + tau_hat * (w - w_previous), tau_hat the running mean
  staleness of the pushes it applies: a gradient is then computed close to the params
  it will be applied to (the idea of DANA, with the optimizer's own last step as the
  direction, so it works for AdamW and SGD alike). At every sync point (checkpoint,
  stop, end) the true params are published again, so evaluations there, checkpoints
  and resumes see them.

dc and gap need the params each push was computed on. A push names the version it
pulled; the server keeps the last K versions of its shard in a ring (``ParamsHistory``,
``ps.dc_versions``): **4·K·n bytes** for a shard of n elements, plus 4·n for gap's C.
A push staler than K − 1 updates is compared with the oldest version kept.
lookahead keeps one private copy of the params: **4·n bytes**.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import numpy as np

CHUNK = 1 << 16          # elements per piece of work: between() runs this often (MPI progress)
GAP_EMA = 0.1            # weight of the newest update in gap's mean update size
TINY = 1e-12

Between = Optional[Callable[[], None]]


class UpdateRule(Protocol):
    name: str
    # True: the server steps the rule's private copy of the params (``own``), and
    # ``publish`` writes what workers pull into the params window
    private_params: bool

    def memory_bytes(self) -> int:
        """Bytes this rule keeps per shard (beyond params, optimizer state and slots)."""

    def started(self, version: int, params: np.ndarray) -> None:
        """The params of the shard's first version (start or resume)."""

    def correct(self, grad: np.ndarray, pulled: int, version: int, params: np.ndarray,
                between: Between = None) -> float:
        """Correct ``grad`` (in place) computed on params of version ``pulled`` for the params
        of ``version``; returns the factor for the learning rate of its update."""

    def applied(self, version: int, params: np.ndarray, between: Between = None) -> None:
        """The update that made ``version`` is done (``params`` are its params)."""

    def publish(self, window: np.ndarray, params: np.ndarray, between: Between = None) -> None:
        """``private_params`` rules: ``window`` holds the params before the update that just
        made ``params``; write into it what workers should pull."""


def _chunks(n: int):
    for lo in range(0, n, CHUNK):
        yield lo, min(n, lo + CHUNK)


class NoCompensation:
    name = "none"
    private_params = False

    def memory_bytes(self) -> int:
        return 0

    def started(self, version, params) -> None:
        pass

    def correct(self, grad, pulled, version, params, between=None) -> float:
        return 1.0

    def applied(self, version, params, between=None) -> None:
        pass

    def publish(self, window, params, between=None) -> None:
        raise NotImplementedError("only a rule with private params publishes")


class StalenessLR(NoCompensation):
    """Learning rate / max(1, tau)."""
    name = "lr"

    def correct(self, grad, pulled, version, params, between=None) -> float:
        return 1.0 / max(1, version - pulled)


class ParamsHistory:
    """The last ``keep`` versions of a shard's params, in a ring indexed by version."""

    def __init__(self, n: int, keep: int):
        self.keep = keep
        self.ring = np.zeros((keep, n), dtype=np.float32)
        self.newest = -1

    def store(self, version: int, params: np.ndarray) -> None:
        self.ring[version % self.keep] = params
        self.newest = version

    def at(self, version: int) -> np.ndarray:
        """The params of ``version``, or of the oldest version kept when it is older."""
        oldest = max(0, self.newest - self.keep + 1)
        return self.ring[max(version, oldest) % self.keep]


class _Compensating(NoCompensation):
    """A rule that needs the params each push was computed on."""

    def __init__(self, n: int, keep: int):
        self.history = ParamsHistory(n, keep)
        self.delta = np.empty(min(n, CHUNK), dtype=np.float32)

    def memory_bytes(self) -> int:
        return self.history.ring.nbytes + self.delta.nbytes

    def started(self, version, params) -> None:
        self.history.store(version, params)

    def applied(self, version, params, between=None) -> None:
        self.history.store(version, params)

    def correct(self, grad, pulled, version, params, between=None) -> float:
        if pulled >= version:
            return 1.0   # computed on the current params: nothing to compensate
        old = self.history.at(pulled)
        for lo, hi in _chunks(len(grad)):
            delta = self.delta[:hi - lo]
            np.subtract(params[lo:hi], old[lo:hi], out=delta)   # w - w_pulled
            self._correct_range(grad[lo:hi], delta, lo, hi)
            if between is not None:
                between()
        return 1.0

    def _correct_range(self, grad, delta, lo: int, hi: int) -> None:
        raise NotImplementedError


class DelayCompensated(_Compensating):
    """DC-ASGD: g += lambda * g * g * (w - w_pulled), adaptive with AdamW's second moment."""
    name = "dc"

    def __init__(self, n: int, keep: int, lam: float, optimizer=None):
        super().__init__(n, keep)
        self.lam = np.float32(lam)
        self.v = getattr(optimizer, "v", None)   # AdamW's second moment (None for SGD)
        self.beta2 = np.float32(getattr(optimizer, "beta2", 0.0))
        self.work = np.empty_like(self.delta)

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self.work.nbytes

    def _correct_range(self, grad, delta, lo, hi) -> None:
        work = self.work[:hi - lo]
        np.multiply(grad, grad, out=work)
        delta *= work                       # g*g*(w - w_pulled)
        if self.v is not None:
            # lambda / sqrt(v'), v' the second moment this update will hold: bounded even
            # where v is still 0, since the push's own g*g is in it
            work *= np.float32(1.0) - self.beta2
            work += self.beta2 * self.v[lo:hi]
            np.sqrt(work, out=work)
            work += np.float32(1e-8)
            delta /= work
        delta *= self.lam
        grad += delta


class GapAware(_Compensating):
    """Gap-Aware: g /= max(1, |w - w_pulled| / C), C the mean size of one update."""
    name = "gap"

    def __init__(self, n: int, keep: int):
        super().__init__(n, keep)
        self.mean_step = np.zeros(n, dtype=np.float32)
        self.seen = 0

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self.mean_step.nbytes

    def applied(self, version, params, between=None) -> None:
        previous = self.history.at(version - 1) if self.history.newest >= 0 else None
        if previous is not None:
            share = np.float32(1.0 if self.seen == 0 else GAP_EMA)
            for lo, hi in _chunks(len(params)):
                step = self.delta[:hi - lo]
                np.subtract(params[lo:hi], previous[lo:hi], out=step)
                np.abs(step, out=step)
                step -= self.mean_step[lo:hi]
                step *= share
                self.mean_step[lo:hi] += step
                if between is not None:
                    between()
            self.seen += 1
        super().applied(version, params, between)

    def _correct_range(self, grad, delta, lo, hi) -> None:
        np.abs(delta, out=delta)
        delta /= self.mean_step[lo:hi] + np.float32(TINY)
        np.maximum(delta, np.float32(1.0), out=delta)
        grad /= delta


class LookAhead(NoCompensation):
    """Workers pull w + tau_hat * (w - w_previous); the true w is ``own``, private."""
    name = "lookahead"
    private_params = True
    SHARE = 0.05          # weight of one push in the running mean staleness

    def __init__(self, n: int):
        self.own = np.zeros(n, dtype=np.float32)
        self.tau = 0.0    # running mean staleness of the pushes applied

    def memory_bytes(self) -> int:
        return self.own.nbytes

    def started(self, version, params) -> None:
        self.own[:] = params

    def correct(self, grad, pulled, version, params, between=None) -> float:
        self.tau += self.SHARE * (max(0, version - pulled) - self.tau)
        return 1.0

    def publish(self, window, params, between=None) -> None:
        tau = np.float32(self.tau)
        for lo, hi in _chunks(len(params)):
            ahead = window[lo:hi]
            ahead -= params[lo:hi]          # previous - w
            ahead *= -tau                   # tau * (w - previous)
            ahead += params[lo:hi]
            if between is not None:
                between()


def history_versions(cfg, n_workers: int) -> int:
    """``ps.dc_versions``: past versions a server keeps (auto: 2W + 2)."""
    keep = cfg.ps.dc_versions
    return 2 * n_workers + 2 if keep == "auto" else int(keep)


def make_update_rule(cfg, n: int, n_workers: int, optimizer=None) -> UpdateRule:
    """The rule ``ps.delay_compensation`` names, for a shard of ``n`` elements."""
    kind = cfg.ps.delay_compensation
    if kind == "lr":
        return StalenessLR()
    if kind == "dc":
        return DelayCompensated(n, history_versions(cfg, n_workers), cfg.ps.dc_lambda, optimizer)
    if kind == "gap":
        return GapAware(n, history_versions(cfg, n_workers))
    if kind == "lookahead":
        return LookAhead(n)
    return NoCompensation()


def rule_memory_bytes(cfg, n: int, n_workers: int) -> int:
    """What ``make_update_rule`` keeps for a shard of ``n`` elements, without building it."""
    kind = cfg.ps.delay_compensation
    if kind == "lookahead":
        return 4 * n    # the private params
    if kind not in ("dc", "gap"):
        return 0
    scratch = min(n, CHUNK) * 4 * (2 if kind == "dc" else 1)
    extra = 4 * n if kind == "gap" else 0
    return 4 * n * history_versions(cfg, n_workers) + scratch + extra
