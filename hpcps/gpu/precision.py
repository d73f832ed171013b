"""Matmuls at ``gpu.compute_dtype``: fp32, TF32 or bf16 tensor cores, fp32 in and out.

Storage stays fp32 everywhere (activations, gradients, master weights); only the
products inside cuBLAS run at lower precision: ``CUBLAS_COMPUTE_32F_FAST_TF32``
or ``CUBLAS_COMPUTE_32F_FAST_16BF`` with fp32 A, B and C. So there are no cast
kernels and no bf16 copies of the weights, and "fp32" is exactly CuPy's matmul.

``plan_gemm`` turns row-major operand shapes and strides into one cuBLAS
(column-major) strided-batched call, or None when a copy is needed. It is pure
Python so the CPU tests check it against an emulation of cuBLAS's semantics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from hpcps.errors import UserError

COMPUTE_DTYPES = ("fp32", "tf32", "bf16")
_current = {"compute": "fp32"}

# vendor dense peaks (FLOP/s) for MFU when a run does not measure its own
SPEC_PEAK_FLOPS = {
    "H200": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "H100": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
}


def set_compute_dtype(name: str) -> None:
    if name not in COMPUTE_DTYPES:
        raise UserError(f"gpu.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    if name != "fp32":
        import cupy
        major = int(cupy.cuda.Device().compute_capability) // 10
        if major < 8:
            raise UserError(f"gpu.compute_dtype = {name} needs a GPU of compute capability 8.0 or "
                            f"newer (this one is {cupy.cuda.Device().compute_capability}); use fp32")
    _current["compute"] = name


def compute_dtype() -> str:
    return _current["compute"]


# -- planning (pure Python) ------------------------------------------------------------

@dataclass(frozen=True)
class Operand:
    """One operand as cuBLAS sees it: op (0 = N, 1 = T), leading dim, batch stride (elements)."""
    op: int
    ld: int
    batch_stride: int


@dataclass(frozen=True)
class GemmPlan:
    """C (M x N, row-major) = A (M x K) @ B (K x N), batched: cuBLAS computes the
    column-major C^T = B^T A^T, so its first operand is B: gemm(b.op, a.op, N, M, K,
    B, b.ld, A, a.ld, C, ldc)."""
    m: int
    n: int
    k: int
    batch: int
    a: Operand
    b: Operand
    ldc: int
    stride_c: int


def _matrix(shape, strides) -> Optional[tuple[int, int]]:
    """(op, ld) of a row-major (rows, cols) matrix with element strides, or None."""
    rows, cols = shape
    s_r, s_c = strides
    if cols == 1:
        s_c = 1
    if rows == 1:
        s_r = max(cols, 1) if s_c == 1 else s_r
    if s_c == 1 and s_r >= max(cols, 1):
        return 0, s_r
    if s_r == 1 and s_c >= max(rows, 1):
        return 1, s_c
    return None


def _batch_stride(shape, strides, batch_shape) -> Optional[int]:
    """The one element stride walking the leading (batch) dims, 0 when broadcast, or None."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not dims:
        return 0
    if tuple(shape) != tuple(batch_shape):
        return None   # partial broadcasting: let the caller copy
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return dims[-1][1]


def plan_gemm(a_shape, a_strides, b_shape, b_strides, c_shape, c_strides) -> Optional[GemmPlan]:
    """A cuBLAS call computing c = a @ b (N-D, matching batch dims or 2-D operands), or
    None. Strides are in elements; negative strides are never planned."""
    if min(len(a_shape), len(b_shape)) < 2:
        return None
    if any(s < 0 for s in (*a_strides, *b_strides, *c_strides)):
        return None
    m, k = a_shape[-2:]
    k2, n = b_shape[-2:]
    batch_shape = tuple(c_shape[:-2])
    if k != k2 or tuple(c_shape[-2:]) != (m, n) or min(m, n, k) < 1:
        return None
    batch = int(np.prod(batch_shape, dtype=np.int64)) if batch_shape else 1
    plans = []
    for shape, strides in ((a_shape, a_strides), (b_shape, b_strides)):
        mat = _matrix(shape[-2:], strides[-2:])
        lead = tuple(shape[:-2])
        stride = 0 if len(lead) == 0 else _batch_stride(lead, strides[:-2], batch_shape)
        if mat is None or stride is None:
            return None
        plans.append(Operand(mat[0], mat[1], stride))
    c_mat = _matrix(c_shape[-2:], c_strides[-2:])
    c_stride = _batch_stride(batch_shape, c_strides[:-2], batch_shape) if batch_shape else 0
    if c_mat is None or c_mat[0] != 0 or c_stride is None or (batch > 1 and c_stride == 0):
        return None
    return GemmPlan(m, n, k, batch, plans[0], plans[1], c_mat[1], c_stride)


def emulate_gemm(plan: GemmPlan, a_flat, a_offset: int, b_flat, b_offset: int, c_flat,
                 c_offset: int) -> None:
    """What cuBLAS does with ``plan`` on flat column-major memory (NumPy, for tests):
    C_cm (N x M, ldc) = op_b(B_cm) @ op_a(A_cm) for each batch."""
    from numpy.lib.stride_tricks import as_strided
    item = c_flat.itemsize

    def col_major(flat, offset, rows, cols, ld):
        return as_strided(flat[offset:], shape=(rows, cols), strides=(item, ld * item))
    m, n, k = plan.m, plan.n, plan.k
    for i in range(plan.batch):
        # cuBLAS's first operand holds B: op N means it reads an (N x K) matrix
        first = col_major(b_flat, b_offset + i * plan.b.batch_stride,
                          *((n, k) if plan.b.op == 0 else (k, n)), plan.b.ld)
        second = col_major(a_flat, a_offset + i * plan.a.batch_stride,
                           *((k, m) if plan.a.op == 0 else (m, k)), plan.a.ld)
        op1 = first if plan.b.op == 0 else first.T
        op2 = second if plan.a.op == 0 else second.T
        out = col_major(c_flat, c_offset + i * plan.stride_c, n, m, plan.ldc)
        out[...] = op1 @ op2


# -- the CuPy call ---------------------------------------------------------------------

_ONE = np.ones(1, dtype=np.float32)
_ZERO = np.zeros(1, dtype=np.float32)


def _element_strides(a) -> tuple:
    return tuple(s // a.itemsize for s in a.strides)


def _cublas_compute(name: str) -> int:
    from cupy_backends.cuda.libs import cublas
    return {"fp32": cublas.CUBLAS_COMPUTE_32F, "tf32": cublas.CUBLAS_COMPUTE_32F_FAST_TF32,
            "bf16": cublas.CUBLAS_COMPUTE_32F_FAST_16BF}[name]


def matmul(a, b, out=None, compute: Optional[str] = None):
    """a @ b (into out) for CuPy arrays. float32 operands of 2+ dims run at the
    configured compute dtype through one cuBLAS call; anything else (float64,
    vectors, fp32 compute) is ``cupy.matmul``. compute: override (the device check)."""
    import cupy
    simple = (a.dtype == np.float32 and b.dtype == np.float32 and a.ndim >= 2 and b.ndim >= 2
              and (out is None or out.dtype == np.float32))
    if not simple or (compute is None and _current["compute"] == "fp32"):
        return cupy.matmul(a, b, out=out)
    compute = compute or _current["compute"]
    batch_shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    shape = tuple(batch_shape) + (a.shape[-2], b.shape[-1])
    if out is not None and out.shape != shape:
        raise ValueError(f"matmul: out has shape {out.shape}, expected {shape}")
    target = out if out is not None else cupy.empty(shape, dtype=np.float32)
    plan = plan_gemm(a.shape, _element_strides(a), b.shape, _element_strides(b),
                     target.shape, _element_strides(target))
    if plan is None:   # copy what cuBLAS cannot address, then it always plans
        a = cupy.ascontiguousarray(cupy.broadcast_to(a, tuple(batch_shape) + a.shape[-2:])) \
            if a.ndim > 2 else cupy.ascontiguousarray(a)
        b = cupy.ascontiguousarray(cupy.broadcast_to(b, tuple(batch_shape) + b.shape[-2:])) \
            if b.ndim > 2 else cupy.ascontiguousarray(b)
        dest = target if target.flags.c_contiguous else cupy.empty(shape, dtype=np.float32)
        plan = plan_gemm(a.shape, _element_strides(a), b.shape, _element_strides(b),
                         dest.shape, _element_strides(dest))
        _run_plan(plan, a, b, dest, compute)
        if dest is not target:
            target[...] = dest
        return target
    _run_plan(plan, a, b, target, compute)
    return target


def _run_plan(plan: GemmPlan, a, b, c, compute: str) -> None:
    from cupy.cuda import device
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas
    handle = device.get_cublas_handle()
    f32 = runtime.CUDA_R_32F
    algo = cublas.CUBLAS_GEMM_DEFAULT
    ctype = _cublas_compute(compute)
    if plan.batch == 1:
        cublas.gemmEx(handle, plan.b.op, plan.a.op, plan.n, plan.m, plan.k, _ONE.ctypes.data,
                      b.data.ptr, f32, plan.b.ld, a.data.ptr, f32, plan.a.ld, _ZERO.ctypes.data,
                      c.data.ptr, f32, plan.ldc, ctype, algo)
        return
    cublas.gemmStridedBatchedEx(handle, plan.b.op, plan.a.op, plan.n, plan.m, plan.k,
                                _ONE.ctypes.data, b.data.ptr, f32, plan.b.ld, plan.b.batch_stride,
                                a.data.ptr, f32, plan.a.ld, plan.a.batch_stride, _ZERO.ctypes.data,
                                c.data.ptr, f32, plan.ldc, plan.stride_c, plan.batch, ctype, algo)


def measure_peak_flops(compute: Optional[str] = None, n: int = 4096, seconds: float = 0.3) -> float:
    """FLOP/s of an n^3 matmul at the compute dtype on this GPU (the MFU denominator)."""
    import cupy
    a = cupy.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    out = cupy.empty_like(a)
    matmul(a, a, out, compute)
    cupy.cuda.get_current_stream().synchronize()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            matmul(a, a, out, compute)
        cupy.cuda.get_current_stream().synchronize()
        reps += 4
    return 2.0 * n ** 3 * reps / (time.perf_counter() - start)


def spec_peak_flops(device_name: str, compute: str) -> Optional[float]:
    """The vendor's dense peak for a GPU name (e.g. 'NVIDIA H200'), None when unknown."""
    for key, peaks in SPEC_PEAK_FLOPS.items():
        if key in device_name:
            return peaks[compute]
    return None
