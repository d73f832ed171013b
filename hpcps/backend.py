"""The one array-backend seam: model and optimizer code is written against ``xp``.

``get_backend("cpu")`` returns NumPy; ``get_backend("gpu", slot)`` imports CuPy
(only then) and selects visible GPU number ``slot`` (``gpu_slot`` decides it from
MPI: which of the node's workers see the same GPUs). Nothing here imports
CuPy at module import time, so a CPU-only machine never needs it installed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from hpcps.errors import UserError


@dataclass
class Backend:
    name: str              # "numpy" or "cupy"
    xp: ModuleType
    device_id: int = -1    # GPU ordinal, -1 on CPU

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def asnumpy(self, array: Any) -> np.ndarray:
        return array.get() if self.is_gpu else np.asarray(array)

    def asarray(self, array: Any, dtype=None):
        return self.xp.asarray(array, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued GPU work: call before handing a device buffer to MPI."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()


CPU = Backend("numpy", np)


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU (imports CuPy: call only when asked)."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def visible_gpus() -> list[str]:
    """PCI addresses of the GPUs CUDA shows this process ([] without CuPy or a driver)."""
    try:
        import cupy  # optional (the gpu extra): only asked on device = gpu
        count = cupy.cuda.runtime.getDeviceCount()
        props = [cupy.cuda.runtime.getDeviceProperties(i) for i in range(count)]
    except Exception:
        return []
    return [f"{p['pciDomainID']:04x}:{p['pciBusID']:02x}:{p['pciDeviceID']:02x}" for p in props]


def gpu_slot(me: int, node_workers: list[int], seen: dict[int, list[str]]) -> int:
    """Which visible GPU worker ``me`` takes: its position among the workers of its node that
    see the same GPUs. Launchers differ: without binding every rank sees all of a node's GPUs
    (positions 0..k-1 pick distinct ones); with per-task binding each sees its own one
    (every position is 0). Decided from what the ranks report over MPI, not from the
    launcher's environment variables."""
    mine = seen[me]
    same = [r for r in node_workers if seen[r] == mine]
    return same.index(me)


def get_backend(device: str = "cpu", slot: int = 0, share_gpus: bool = False) -> Backend:
    if device == "cpu":
        return CPU
    if device != "gpu":
        raise UserError(f"unknown device {device!r}: expected cpu or gpu")
    try:
        import cupy
    except ImportError:
        raise UserError("device = gpu but CuPy is not installed (pip install 'hpcps[gpu]')") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDA driver missing or broken
        raise UserError(f"device = gpu but no usable CUDA device: {err}") from None
    if count == 0:
        raise UserError("device = gpu but no GPU is visible (check CUDA_VISIBLE_DEVICES)")
    if slot >= count and not share_gpus:
        raise UserError(f"worker {slot} of the node's workers that see these {count} GPU(s) has "
                        "no GPU of its own; use fewer workers per node or set gpu.share = true")
    device_id = slot % count
    cupy.cuda.Device(device_id).use()
    return Backend("cupy", cupy, device_id)


def array_module(array: Any) -> ModuleType:
    """numpy or cupy, whichever owns ``array`` (without importing CuPy)."""
    if isinstance(array, np.ndarray) or "cupy" not in sys.modules:
        return np
    return sys.modules["cupy"].get_array_module(array)
