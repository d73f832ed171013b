"""Float64 central-difference gradient checker, shared by every workload's tests, with
the other helpers of the model tests: ``assert_fails`` (the negative control of a
report), ``break_gelu_derivative`` (a subtle fault for whole-model checks) and
``NotNumpy`` (an array module that sends a model down its GPU-side code paths on CPU).

Usage::

    def forward_loss(params):            # params: name -> float64 array (perturbed in place)
        out, cache = layer_forward(x, params["w"])
        loss = float((out * R).sum())     # any scalar; R = fixed random projection
        grads = {"w": zeros_like(params["w"])}
        dx = layer_backward(R, cache, grads["w"])
        return loss, grads               # analytic gradients of the same scalar

    report = check_layer_grad(forward_loss, {"w": w, "x": x})
    assert report.ok, report

The error of a tensor is ``max|numeric - analytic| / (max|numeric| + atol)``
(max-abs error relative to the gradient's scale, so tiny entries do not make it
unstable); the check passes when every tensor's error is <= rtol. A wrong
backward (a dropped or mis-scaled term) gives errors of order 1e-2..1, far above
the ~1e-8 of float64 central differences.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

ForwardLoss = Callable[[dict], tuple]


@dataclass
class GradReport:
    errors: dict = field(default_factory=dict)     # name -> relative max-abs error
    worst: dict = field(default_factory=dict)      # name -> (flat index, numeric, analytic)
    rtol: float = 0.0

    @property
    def ok(self) -> bool:
        return all(err <= self.rtol for err in self.errors.values())

    def __str__(self) -> str:
        rows = [f"{name}: err {err:.3g} (rtol {self.rtol:g}) worst at {self.worst[name]}"
                for name, err in sorted(self.errors.items(), key=lambda kv: -kv[1])]
        return "gradient check " + ("passed" if self.ok else "FAILED") + "\n  " + "\n  ".join(rows)


def numeric_grad(loss_fn: Callable[[], float], x: np.ndarray, eps: float,
                 indices: Optional[np.ndarray] = None) -> np.ndarray:
    """Central differences of ``loss_fn()`` w.r.t. the flat ``indices`` of ``x``
    (perturbed in place and restored)."""
    flat = x.reshape(-1)
    if indices is None:
        indices = np.arange(flat.size)
    out = np.zeros(len(indices))
    for j, i in enumerate(indices):
        orig = flat[i]
        flat[i] = orig + eps
        plus = loss_fn()
        flat[i] = orig - eps
        minus = loss_fn()
        flat[i] = orig
        out[j] = (plus - minus) / (2.0 * eps)
    return out


def check_layer_grad(forward_loss: ForwardLoss, params: dict, eps: float = 1e-6,
                     rtol: float = 1e-6, atol: float = 1e-9, max_checks: Optional[int] = None,
                     seed: int = 0) -> GradReport:
    """Compare ``forward_loss``'s analytic gradients with central differences, per tensor.

    params: name -> float64 array; each is perturbed in place (and restored).
    forward_loss(params) -> (loss, grads) with grads[name] shaped like params[name].
    max_checks: check at most this many random elements per tensor (None: all).
    """
    for name, arr in params.items():
        if arr.dtype != np.float64:
            raise TypeError(f"gradient check needs float64 arrays, {name} is {arr.dtype}")
    _, analytic = forward_loss(params)
    analytic = {k: np.array(v, dtype=np.float64) for k, v in analytic.items()}
    rng = np.random.default_rng(seed)
    report = GradReport(rtol=rtol)
    for name, arr in params.items():
        n = arr.size
        idx = np.arange(n) if max_checks is None or n <= max_checks else \
            np.sort(rng.choice(n, size=max_checks, replace=False))
        num = numeric_grad(lambda: float(forward_loss(params)[0]), arr, eps, idx)
        ana = analytic[name].reshape(-1)[idx]
        diff = np.abs(num - ana)
        k = int(np.argmax(diff))
        report.errors[name] = float(diff[k] / (np.abs(num).max() + atol))
        report.worst[name] = (int(idx[k]), float(num[k]), float(ana[k]))
    return report


def assert_fails(report: GradReport) -> None:
    """Negative control: the checker must reject a wrong backward by a wide margin."""
    assert not report.ok, report
    assert max(report.errors.values()) > 1e3 * report.rtol, report


def projection(shape: tuple, seed: int = 1) -> np.ndarray:
    """A fixed random upstream gradient R: loss = sum(out * R) makes every output matter."""
    return np.random.default_rng(seed).standard_normal(shape)


def break_gelu_derivative(monkeypatch) -> None:
    """Negative control for whole-model checks: the cached GELU derivative forgets its
    cubic term (a subtle error a gradient check must still catch)."""
    from hpcps.model import layers
    real = layers._gelu_derivative

    def wrong(x, q, h, y, grad):
        q[...] = layers.GELU_K
        real(x, q, h, y, grad)
    monkeypatch.setattr(layers, "_gelu_derivative", wrong)


class NotNumpy(types.ModuleType):
    """A stand-in array module that is not ``numpy`` itself: runs the GPU-side code paths
    (no host-side input checks, always-shifted softmax, add.at scatter, where a model has
    them) on CPU arrays."""

    def __getattr__(self, name):
        return getattr(np, name)
