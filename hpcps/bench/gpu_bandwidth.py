"""PS push + pull bandwidth of GPU buffers against raw RMA on the same buffers.

Run under ``mpirun -n 2`` (benchmarks/gpu_check.py's bandwidth stage): rank 1
serves host windows, rank 0 holds GPU buffers and times, per message size:

- ps_push: gradient ranges staged device -> pinned host on the side stream
  (``GradStager``, four buckets, last first) and handed to ``PSClient`` (Put,
  header, Flush, flag); ps_pull: ``PSClient.pull`` + the host -> device upload;
- raw_put / raw_get: the same device buffer copied through the same pinned
  memory and moved with one ``Put`` / ``Get`` + ``Flush``.

``ratio`` = PS push+pull bandwidth / raw put+get bandwidth (target >= 0.8).
``HPCPS_CHECK_DEVICE=cpu`` runs it with host arrays (a dry run of the harness).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np

from hpcps.bench.ps import PSBench, no_duties
from hpcps.config.load import load_config
from hpcps.gpu.transport import CudaOps, GradStager
from hpcps.model.layout import ParamLayout
from hpcps.ps.client import PSClient
from hpcps.ps.codec import ShardCodec
from hpcps.ps.shards import ShardSet
from hpcps.ps.windows import PSWindows
from hpcps.runtime.mpi import mpi


def mpi_bandwidth(out_path: str, sizes=(1 << 22, 1 << 26), repeats: int = 5) -> None:
    """Rank 1 serves (host windows), rank 0 moves GPU buffers: the PS path through
    DeviceSync-style staging vs raw Put/Get of the same buffers via the same pinned memory."""
    MPI = mpi()
    comm = MPI.COMM_WORLD
    bench = PSBench(comm, 1)
    roles = bench.roles
    cfg = load_config(None, ["ps.mode=asp", "ps.overlap=true", "ps.compression=none"])
    rows = []
    for size in sizes:
        n = size // 4
        layout = ParamLayout()
        layout.add("w", (n,))
        codecs = [ShardCodec(layout, 0, n, "none")]
        wins = PSWindows(comm, roles, [(0, n)], [c.max_payload_bytes for c in codecs])
        raw = MPI.Win.Allocate(size if roles.is_server else 0, 1, comm=comm)
        samples = {"ps_push": [], "ps_pull": [], "raw_put": [], "raw_get": []}
        if roles.is_worker:
            worker = _BandwidthWorker(cfg, ShardSet(roles, [(0, n)], codecs, wins), raw, n, MPI)
        for rep in range(repeats + 1):
            for variant in samples:
                if roles.is_server:
                    bench._serve(wins)
                    continue
                seconds = worker.run(variant, bench)
                bench._release_servers(wins)
                if rep:
                    samples[variant].append(size / seconds / 1e9)
        raw.Free()
        wins.free()
        if roles.is_worker:
            med = {k: statistics.median(v) for k, v in samples.items()}
            ps = 2 / (1 / med["ps_push"] + 1 / med["ps_pull"])
            rawbw = 2 / (1 / med["raw_put"] + 1 / med["raw_get"])
            rows.append({"bytes": size, **{f"{k}_gbs": v for k, v in med.items()},
                         "ps_push_pull_gbs": ps, "raw_put_get_gbs": rawbw,
                         "ratio": ps / rawbw})
    if roles.is_worker:
        with open(out_path, "w") as fh:
            json.dump({"rows": rows, "path": "staged", "repeats": repeats, "ok": bool(rows),
                       "target_ratio_0_8_met": all(r["ratio"] >= 0.8 for r in rows)}, fh,
                      indent=1)


class _HostOps:
    """CudaOps with host arrays and instant copies: HPCPS_CHECK_DEVICE=cpu dry-runs."""

    class Done:
        done = True

        def synchronize(self):
            pass

    def pinned_empty(self, n, dtype=np.float32):
        return np.zeros(n, dtype=dtype)

    def mark_compute(self):
        return self.Done()

    def copy_to_host_async(self, host, device, lo, hi, after):
        host[lo:hi] = device[lo:hi]
        return self.Done()

    def copy_to_device_async(self, device, host, lo, hi):
        device[lo:hi] = host[lo:hi]
        return self.Done()

    done = staticmethod(lambda event: True)
    wait = staticmethod(lambda event: None)

    def synchronize_compute(self):
        pass


class _BandwidthWorker:
    def __init__(self, cfg, shards: ShardSet, raw, n, MPI):
        self.MPI, self.raw, self.wins, self.n = MPI, raw, shards.wins, n
        if os.environ.get("HPCPS_CHECK_DEVICE", "gpu") == "cpu":
            xp, self.ops = np, _HostOps()
        else:
            import cupy as xp  # only on a GPU machine: the dry run above needs none
            self.ops = CudaOps()
        self.device = xp.arange(n, dtype=np.float32)
        self.params = xp.zeros(n, dtype=np.float32)
        self.host_grads = self.ops.pinned_empty(n)
        self.host_params = self.ops.pinned_empty(n)
        self.client = PSClient(cfg=cfg, shards=shards, params=self.host_params, duties=no_duties)
        self.stager = GradStager(self.ops, self.device, self.host_grads)
        self.server = shards.roles.servers[0]

    def run(self, variant: str, bench) -> float:
        MPI, n = self.MPI, self.n
        bench.roles.worker_comm.Barrier()
        if variant == "ps_push":
            bench._wait_slots_free(self.client, self.wins)
        if variant.startswith("raw"):
            self.raw.Lock(self.server, MPI.LOCK_SHARED)
        self.ops.synchronize_compute()
        t0 = time.perf_counter()
        if variant == "ps_push":   # four buckets, last first, as backward reports them
            self.stager.begin(self.client.start_push(self.host_grads, None))
            bounds = [n * i // 4 for i in range(5)]
            for i in reversed(range(4)):
                self.stager.ready(bounds[i], bounds[i + 1])
            self.stager.finish()
            self.client.wait(self.client.push(0, weight=1.0, loss=0.0, scale=1.0, items=1))
        elif variant == "ps_pull":
            self.client.wait(self.client.pull(0))
            self.ops.wait(self.ops.copy_to_device_async(self.params, self.host_params, 0, n))
        elif variant == "raw_put":
            self.ops.wait(self.ops.copy_to_host_async(self.host_grads, self.device, 0, n,
                                                      self.ops.mark_compute()))
            self.raw.Put([self.host_grads, MPI.FLOAT], self.server, (0, n, MPI.FLOAT))
            self.raw.Flush(self.server)
        else:
            self.raw.Get([self.host_params, MPI.FLOAT], self.server, (0, n, MPI.FLOAT))
            self.raw.Flush(self.server)
            self.ops.wait(self.ops.copy_to_device_async(self.params, self.host_params, 0, n))
        seconds = time.perf_counter() - t0
        if variant.startswith("raw"):
            self.raw.Unlock(self.server)
        return seconds
