"""Device buffers and MPI: the direct path or pinned host staging.

At start-up a GPU worker picks one path (``choose_path``):

- direct: MPI is CUDA-aware (MPIX query, see ``hpcps.runtime.mpi.cuda_aware_mpi``),
  so CuPy buffers go straight into the RMA / collective calls.
- staged: pinned host mirrors of params and grads; gradient ranges are copied
  device -> host on a side stream while backward computes the next range
  (``on_grad_ready(lo, hi)``), params host -> device after each pull.
  Compressed pushes always stage: the codecs encode on the host.

Whatever the path, a buffer reaches MPI only after the GPU work that produces
it has completed: a range is handed on when its CUDA event has fired, and a
pull waits for queued kernels first. ``HPCPS_GPU_TRANSPORT=staged|direct``
overrides the detection (direct: you assert the MPI library is CUDA-aware).

CUDA calls go through ``CudaOps`` so the CPU tests can replace it with a fake.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable, Optional

import numpy as np

from hpcps.errors import UserError

HOST, DIRECT, STAGED = "host", "direct", "staged"
TRANSPORT_ENV = "HPCPS_GPU_TRANSPORT"


def choose_path(cuda_aware: str, plain: bool = True) -> str:
    """direct or staged for a GPU worker. cuda_aware: 'yes' / 'no' / 'unknown';
    plain: pushes are raw fp32 (no codec, no error feedback)."""
    forced = os.environ.get(TRANSPORT_ENV, "").strip().lower()
    if forced not in ("", "auto", DIRECT, STAGED):
        raise UserError(f"{TRANSPORT_ENV}={forced!r}: expected auto, direct or staged")
    if forced == STAGED or not plain:
        return STAGED
    if forced == DIRECT or cuda_aware == "yes":
        return DIRECT
    return STAGED


def describe_path(device: str, cuda_aware: str, plain: bool = True) -> str:
    """One line for ``hpcps info`` / the banner."""
    if device != "gpu":
        return "host: NumPy buffers (device = cpu)"
    try:
        path = choose_path(cuda_aware, plain)
    except UserError as err:
        return f"invalid: {err}"
    if path == DIRECT:
        return "direct: CuPy buffers in RMA and collective calls (CUDA-aware MPI)"
    why = "compressed pushes encode on the host" if not plain else f"CUDA-aware MPI: {cuda_aware}"
    return f"staged: pinned host buffers, async copies on a side stream ({why})"


class CudaOps:
    """The CUDA operations staging needs, on CuPy: pinned buffers, events, async copies
    on one side stream. A test fake offers the same methods."""

    def __init__(self) -> None:
        import cupy
        self.cupy = cupy
        self.runtime = cupy.cuda.runtime
        self.side = cupy.cuda.Stream(non_blocking=True)

    def pinned_empty(self, n: int, dtype=np.float32) -> np.ndarray:
        dtype = np.dtype(dtype)
        mem = self.cupy.cuda.alloc_pinned_memory(max(1, n) * dtype.itemsize)
        return np.frombuffer(mem, dtype, n)   # the array keeps the pinned block alive

    def device_empty(self, n: int, dtype=np.float32):
        return self.cupy.empty(n, dtype=dtype)

    def _event(self, stream):
        event = self.cupy.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        return event

    def mark_compute(self):
        """An event after everything queued so far on the compute (current) stream."""
        return self._event(self.cupy.cuda.get_current_stream())

    def copy_to_host_async(self, host: np.ndarray, device, lo: int, hi: int, after):
        """host[lo:hi] <- device[lo:hi] on the side stream once ``after`` fired; its event."""
        self.side.wait_event(after)
        size = host.itemsize
        self.runtime.memcpyAsync(host.ctypes.data + lo * size, device.data.ptr + lo * size,
                                 (hi - lo) * size, self.runtime.memcpyDeviceToHost, self.side.ptr)
        return self._event(self.side)

    def copy_to_device_async(self, device, host: np.ndarray, lo: int, hi: int):
        """device[lo:hi] <- host[lo:hi] on the compute stream (later kernels see it); its event."""
        stream = self.cupy.cuda.get_current_stream()
        size = host.itemsize
        self.runtime.memcpyAsync(device.data.ptr + lo * size, host.ctypes.data + lo * size,
                                 (hi - lo) * size, self.runtime.memcpyHostToDevice, stream.ptr)
        return self._event(stream)

    @staticmethod
    def done(event) -> bool:
        return bool(event.done)

    @staticmethod
    def wait(event) -> None:
        event.synchronize()

    def synchronize_compute(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()


class GradStager:
    """Gradient ranges from backward, handed to ``forward(lo, hi)`` (which may call MPI)
    in the order they were reported and only once safe: copied into ``host`` (staged)
    or computed on the device (direct: ``host`` is None).

    ``ready`` never blocks: it queues the copy and hands on whatever has completed.
    ``finish`` waits for the rest, first staging any part of [0, n) nobody reported.
    """

    def __init__(self, ops, device, host: Optional[np.ndarray]) -> None:
        self.ops, self.device, self.host = ops, device, host
        self.n = len(device)
        self.pending: deque = deque()
        self.reported: list = []
        self.forward: Callable[[int, int], None] = lambda lo, hi: None

    def begin(self, forward: Callable[[int, int], None]) -> None:
        """A new backward pass whose finished ranges go to ``forward`` once safe."""
        self.forward = forward
        self.pending.clear()
        self.reported = []

    def ready(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        self.reported.append((lo, hi))
        after = self.ops.mark_compute()
        event = after if self.host is None else \
            self.ops.copy_to_host_async(self.host, self.device, lo, hi, after)
        self.pending.append((lo, hi, event))
        self._drain(block=False)

    def finish(self) -> None:
        for lo, hi in self._gaps():
            self.ready(lo, hi)
        self._drain(block=True)

    def _gaps(self) -> list:
        gaps, at = [], 0
        for lo, hi in sorted(self.reported):
            if lo > at:
                gaps.append((at, lo))
            at = max(at, hi)
        if at < self.n:
            gaps.append((at, self.n))
        return gaps

    def _drain(self, block: bool) -> None:
        while self.pending:
            lo, hi, event = self.pending[0]
            if not self.ops.done(event):
                if not block:
                    return
                self.ops.wait(event)
            self.pending.popleft()
            self.forward(lo, hi)


class DeviceSync:
    """A ``StepSync`` (hpcps.train.sync) for a worker whose model lives on the GPU, around
    a host-buffer strategy (``PSSync``).

    The model reads ``params`` and writes ``grads`` (device). The inner strategy sees
    ``mpi_params`` / ``mpi_grads``: the same device arrays on the direct path, pinned
    host mirrors when staged. Pull copies up, push stages down; the control calls are
    the inner strategy's.
    """

    def __init__(self, inner, ops, params, grads, host_params=None, host_grads=None) -> None:
        self.inner, self.ops = inner, ops
        self.params, self.grads = params, grads
        self.direct = host_params is None
        self.mpi_params = params if self.direct else host_params
        self.mpi_grads = grads if self.direct else host_grads
        self.stager = GradStager(ops, grads, None if self.direct else host_grads)
        self._uploaded = None

    def should_stop(self, step: int) -> bool:
        return self.inner.should_stop(step)

    def __getattr__(self, name):
        # the rest of the protocol (assign, claim, samples_budget, boundary) is the inner's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def meet(self, step: int, reason: dict, worker_state: dict) -> dict:
        return self.inner.meet(step, reason, worker_state)

    def traffic(self) -> dict:
        return self.inner.traffic()

    def worker_state(self) -> dict:
        return self.inner.worker_state()

    def close(self) -> None:
        self.inner.close()

    def pull(self, step: int) -> None:
        if self.direct:
            self.ops.synchronize_compute()    # no queued kernel may still read params
        elif self._uploaded is not None:
            self.ops.wait(self._uploaded)     # the last upload has read the host buffer
        self.inner.pull(step)
        if not self.direct:
            self._uploaded = self.ops.copy_to_device_async(self.params, self.mpi_params, 0,
                                                           len(self.params))

    def start_push(self, grads, touched) -> Callable[[int, int], None]:
        self.stager.begin(self.inner.start_push(self.mpi_grads, touched))
        return self.stager.ready

    def push(self, step: int, grads, weight: float, loss: float, items: int,
             compute_s: float = 0.0) -> dict:
        self.stager.finish()
        return self.inner.push(step, self.mpi_grads, weight, loss, items, compute_s)


class PSDeviceBuffers:
    """A PS worker's device params / grads and, when staged, their pinned host mirrors."""

    def __init__(self, cfg, layout, codecs, cuda_aware: str, ops=None) -> None:
        feedback = cfg.ps.error_feedback and cfg.ps.compression != "none"
        plain = all(c.is_plain_dense for c in codecs) and not feedback
        self.path = choose_path(cuda_aware, plain)
        self.ops = ops if ops is not None else CudaOps()
        n = layout.total
        self.params = self.ops.device_empty(n)
        self.params.fill(0)
        self.grads = self.ops.device_empty(n)
        self.grads.fill(0)
        self.host_params = self.host_grads = None
        if self.path == STAGED:
            self.host_params = self.ops.pinned_empty(n)
            self.host_params.fill(0)
            self.host_grads = self.ops.pinned_empty(n)
            self.host_grads.fill(0)

    @property
    def mpi_params(self):
        return self.params if self.host_params is None else self.host_params

    @property
    def mpi_grads(self):
        return self.grads if self.host_grads is None else self.host_grads

    def wrap(self, inner) -> DeviceSync:
        return DeviceSync(inner, self.ops, self.params, self.grads, self.host_params,
                          self.host_grads)


class AllreduceBuffer:
    """The allreduce payload [weight * grad, weight, weight * loss, stop] of a GPU worker:
    a device array on the direct path, else pinned host memory that gradient ranges
    are copied into while backward runs."""

    def __init__(self, n: int, cuda_aware: str, ops=None) -> None:
        self.n = n
        self.path = choose_path(cuda_aware)
        self.ops = ops if ops is not None else CudaOps()
        self.buf = (self.ops.device_empty(n + 3) if self.path == DIRECT
                    else self.ops.pinned_empty(n + 3))
        self.stager: Optional[GradStager] = None

    def begin(self, grads) -> None:
        if self.path == STAGED:
            if self.stager is None or self.stager.device is not grads:
                self.stager = GradStager(self.ops, grads, self.buf[:self.n])
            self.stager.begin(lambda lo, hi: None)  # MPI reads the buffer only after gather

    def grad_ready(self, lo: int, hi: int) -> None:
        if self.stager is not None:
            self.stager.ready(lo, hi)

    def gather(self, grads, weight: float) -> None:
        """buf[:n] = weight * grads, complete before MPI reads buf."""
        if self.path == DIRECT:
            self.buf[:self.n] = grads
            self.buf[:self.n] *= np.float32(weight)
            return
        if self.stager is None or self.stager.device is not grads:
            self.begin(grads)
        self.stager.finish()
        self.buf[:self.n] *= np.float32(weight)

    def set_tail(self, values) -> None:
        self.buf[self.n:] = np.asarray(values, dtype=np.float32) if self.path == STAGED \
            else self.ops.cupy.asarray(values, dtype=np.float32)
        if self.path == DIRECT:
            self.ops.synchronize_compute()   # the buffer is complete before MPI reads it

    def tail(self) -> np.ndarray:
        tail = self.buf[self.n:]
        return tail if self.path == STAGED else tail.get()

    def scatter(self, grads):
        """grads <- buf[:n] (the reduced sum), queued on the compute stream; the copy's
        event when staged (later kernels are ordered after it anyway)."""
        if self.path == DIRECT:
            grads[...] = self.buf[:self.n]
            return None
        return self.ops.copy_to_device_async(grads, self.buf, 0, self.n)
