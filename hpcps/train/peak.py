"""The MFU denominator: the matmul FLOP/s a worker really has while the job runs.

Measured once at start-up by every worker *at the same time*, after a barrier that
sleeps instead of spinning: ranks that share a host share its cores, and a rank
spinning in a blocking collective (MPICH busy-polls) while another measures would
make the peak look 2-3x smaller than what training later gets, and MFU exceed
100 %. Each worker keeps the best of several short windows (a window can lose its
core to the OS); the job's peak is the sum over workers.
"""

from __future__ import annotations

import time

import numpy as np

from hpcps.gpu import measure_peak
from hpcps.runtime.polled import PolledComm

MATMUL_N = 768            # big enough for BLAS to reach its peak, small enough for short windows
WINDOWS = 6               # best of this many windows
WINDOW_S = 0.06


def cpu_matmul_flops(n: int = MATMUL_N, windows: int = WINDOWS, window_s: float = WINDOW_S) -> float:
    """fp32 matmul FLOP/s of this process with its current BLAS threads (best window)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    out = np.empty_like(a)
    np.matmul(a, b, out=out)  # warm up: thread pool, page faults
    best = 0.0
    for _ in range(windows):
        reps, start = 0, time.perf_counter()
        while True:
            np.matmul(a, b, out=out)
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= window_s:
                break
        best = max(best, 2.0 * n ** 3 * reps / elapsed)
    return best


def job_peak_flops(cfg, roles, backend) -> float:
    """Mean per-worker peak FLOP/s (``train.peak_flops`` when set, else measured by every
    worker together). Collective over the world in multi-rank jobs."""
    if cfg.train.peak_flops:
        return float(cfg.train.peak_flops)
    if roles.comm is None:
        return measure_peak(backend, cpu_matmul_flops)
    polled = PolledComm(roles.comm)
    polled.Barrier()  # nobody is still starting up (or spinning) while the workers measure
    mine = measure_peak(backend, cpu_matmul_flops) if roles.is_worker else 0.0
    peaks = polled.gather(mine, root=roles.lead_worker)
    total = polled.bcast(sum(peaks) if peaks is not None else None, root=roles.lead_worker)
    return total / roles.n_workers
