"""GPU support for the CuPy backend.

- ``kernels``: fused CuPy kernels (GELU, LayerNorm, softmax, cross-entropy,
  AdamW) next to NumPy reference implementations of the same math.
- ``precision``: matmuls at ``gpu.compute_dtype`` (fp32, TF32 or bf16 tensor
  cores through cuBLAS, fp32 storage throughout).
- ``transport``: device buffers and MPI: the direct path (CUDA-aware MPI) or
  pinned host staging with asynchronous copies on a side stream.

Importing this package (or any module in it) never imports CuPy: CuPy is
imported inside the functions that run on a GPU.
"""

from __future__ import annotations

from hpcps.gpu import precision
from hpcps.gpu.precision import measure_peak_flops


def is_cupy(xp) -> bool:
    """True when the array module ``xp`` is CuPy itself (not NumPy or a stand-in)."""
    return getattr(xp, "__name__", "") == "cupy"


def is_device_array(array) -> bool:
    """True for a CuPy array (checked by type, without importing CuPy)."""
    return type(array).__module__.split(".")[0] == "cupy"


def to_host(value):
    """A CuPy array copied to a NumPy array; anything else unchanged."""
    return value.get() if is_device_array(value) else value


def configure(backend, cfg) -> None:
    """Apply the ``[gpu]`` settings to this process (call once a GPU backend exists)."""
    if not getattr(backend, "is_gpu", False):
        return
    precision.set_compute_dtype(cfg.gpu.compute_dtype)


def measure_peak(backend, cpu_measure) -> float:
    """The MFU denominator: a matmul at gpu.compute_dtype on a GPU, else ``cpu_measure()``."""
    if getattr(backend, "is_gpu", False):
        return measure_peak_flops()
    return cpu_measure()
