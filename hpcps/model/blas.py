"""NumPy's BLAS as the benchmarks report it: thread count and GEMM kernel family.

OpenBLAS picks its kernels once, when the library loads, from the CPU id or from
``OPENBLAS_CORETYPE``. On AVX-512 AMD CPUs (Zen 4 / Zen 5) it may run the AVX2
"Haswell" kernels; ``OPENBLAS_CORETYPE=SkylakeX`` (set before Python starts)
selects the AVX-512 ones, ~1.7x faster for this model's GEMMs. The bench prints
the kernel in use so a run says which one it measured. Nothing here imports NumPy.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Optional

AVX512_FLAGS = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"})


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset]:
    """(vendor id, feature flags) of the first CPU; empty when unreadable (not Linux)."""
    vendor, flags = "", frozenset()
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


def avx512_kernels_available() -> bool:
    """True on an AVX-512 AMD CPU, where OpenBLAS may fall back to its AVX2 kernels."""
    vendor, flags = cpu_info()
    return vendor == "AuthenticAMD" and AVX512_FLAGS <= flags


_FUNCTIONS: dict = {}


def _openblas_function(name: str, restype=ctypes.c_int):
    """An OpenBLAS entry point of the library NumPy loaded (prefixes / suffixes vary by
    build), or None; found once per process."""
    if name in _FUNCTIONS:
        return _FUNCTIONS[name]
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and "/" in ln})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("", "scipy_"):
            for suffix in ("", "64_"):
                fn = getattr(lib, f"{prefix}{name}{suffix}", None)
                if fn is not None:
                    fn.restype = restype
                    _FUNCTIONS[name] = fn
                    return fn
    return None   # not cached: NumPy may not have loaded its BLAS yet


def _openblas_call(name: str, restype=ctypes.c_int):
    fn = _openblas_function(name, restype)
    return None if fn is None else fn()


def can_set_blas_threads() -> bool:
    return (_openblas_function("openblas_set_num_threads", None) is not None and
            _openblas_function("openblas_get_num_threads") is not None)


@contextmanager
def blas_threads_limited(n: int):
    """Run the body with NumPy's BLAS on ``n`` threads (process-wide), then restore.
    Yields False, changing nothing, when the BLAS offers no control."""
    if not can_set_blas_threads():
        yield False
        return
    get, put = _openblas_function("openblas_get_num_threads"), \
        _openblas_function("openblas_set_num_threads", None)
    before = int(get())
    if before != n:
        put(n)
    try:
        yield True
    finally:
        if before != n:
            put(before)


def blas_threads() -> int:
    """Threads NumPy's BLAS uses (threadpoolctl when installed, else asks OpenBLAS)."""
    try:
        from threadpoolctl import threadpool_info
        counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
        if counts:
            return int(counts[0])
    except ImportError:
        pass
    count = _openblas_call("openblas_get_num_threads")
    if count:
        return int(count)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return os.cpu_count() or 1


def blas_kernel() -> Optional[str]:
    """OpenBLAS's kernel family ("Haswell", "SkylakeX", ...), None for another BLAS."""
    name = _openblas_call("openblas_get_corename", ctypes.c_char_p)
    return name.decode() if name else None


def set_blas_threads(n: int) -> bool:
    """Set NumPy's BLAS thread count for this process; False when it cannot be controlled."""
    import numpy  # noqa: F401 - loads the BLAS library so its symbols can be found
    fn = _openblas_function("openblas_set_num_threads", None)
    if fn is None:
        return False
    fn(ctypes.c_int(max(1, int(n))))
    return True


def rank_core_share(ranks_on_node: int) -> int:
    """Cores this rank may use when ``ranks_on_node`` ranks share the node's (or the job
    step's) CPU set: at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, ranks_on_node))
