"""Start the parameter server: shard the flat buffer, allocate the windows, run
each rank's role (server loop or worker trainer) until the end or a stop."""

from __future__ import annotations

import json

import numpy as np

from hpcps.errors import EXIT_OK, EXIT_REQUEUE
from hpcps.optim import make_optimizer
from hpcps.optim.schedule import lr_schedule
from hpcps.ps import control as C
from hpcps.ps.codec import ShardCodec
from hpcps.ps.server import Server, server_memory_bytes
from hpcps.ps.sharding import shard_ranges
from hpcps.ps.wait import Every
from hpcps.ps.windows import PSWindows
from hpcps.ps.worker_sync import PSSync, sync_collective
from hpcps.runtime import signals


def _memory_report(s, wins, ranges) -> None:
    """Every rank's resident bytes for the PS, printed by rank 0 as one table."""
    roles = s.roles
    P = s.workload.layout.total
    if roles.is_server:
        lo, hi = ranges[roles.server_index]
        nbytes = server_memory_bytes(hi - lo, roles.n_workers, wins.strides[roles.server_index],
                                     s.cfg.train.optimizer)
    else:
        feedback = s.cfg.ps.error_feedback and s.cfg.ps.compression != "none"
        nbytes = P * 4 * (2 + (2 if feedback else 0)) + sum(wins.strides)
    table = roles.comm.gather((roles.world_rank, "server" if roles.is_server else "worker", nbytes),
                              root=0)
    if roles.world_rank == 0 and not s.quiet:
        parts = [f"r{r}:{kind[0]}={b / 2**20:.1f}MiB" for r, kind, b in table]
        print(f"memory per rank (params/state/buffers): {' '.join(parts)}", flush=True)


def run_parameter_server(s, quiet: bool) -> int:
    s.quiet = quiet
    cfg, roles, layout = s.cfg, s.roles, s.workload.layout
    ranges = shard_ranges(layout.total, roles.n_servers)
    codecs = [ShardCodec(layout, lo, hi, cfg.ps.compression, cfg.ps.topk_ratio,
                         cfg.ps.sparse_embedding) for lo, hi in ranges]
    wins = PSWindows(roles.comm, roles, ranges, [c.max_payload_bytes for c in codecs])
    if roles.world_rank == roles.lead_worker and not quiet:
        from hpcps.train.run import _banner
        _banner(s, f"shards: {[hi - lo for lo, hi in ranges]} elements; push encoding "
                   f"{cfg.ps.compression}")
    _memory_report(s, wins, ranges)
    if roles.is_server:
        code = _serve(s, wins, ranges, codecs)
    else:
        code = _work(s, wins, ranges, codecs, quiet)
    roles.comm.Barrier()
    if roles.is_server:
        damaged = wins.check_guards()
        if damaged:
            raise RuntimeError(f"window guard regions overwritten on server {roles.server_index}: "
                               f"{', '.join(damaged)} (an RMA write went out of bounds)")
    wins.free()
    if s.checkpointer is not None:
        s.checkpointer.close()
    return code


def _serve(s, wins, ranges, codecs) -> int:
    cfg, roles, layout = s.cfg, s.roles, s.workload.layout
    index = roles.server_index
    lo, hi = ranges[index]
    opt = make_optimizer(cfg, hi - lo, layout.decay_ranges(lo, hi))
    if s.resume is not None:
        state = s.resume.load_shard(lo, hi)
        opt.load_state(state)
        params, version = state["params"], int(state["version"])
        if roles.mode == "bsp":  # bsp counts one update per step (an asp checkpoint counts pushes)
            version = s.resume.step
    else:
        params, version = layout.init_slice(cfg.train.seed, lo, hi), 0
    server = Server(cfg=cfg, roles=roles, wins=wins, codec=codecs[index], optimizer=opt,
                    lr_fn=lr_schedule(cfg), params_init=params, version=version)
    _forward_stop_requests(server)
    roles.comm.Barrier()  # shards hold their initial params before any worker pulls

    def shard_state():
        return lo, hi, server.snapshot()
    while True:
        server.serve_until_sync()
        reason = sync_collective(roles, wins, None, s.checkpointer, shard=shard_state,
                                 duties=server.collective_duties)
        server.sync_open = False
        if reason["stop"]:
            return EXIT_REQUEUE
        if reason["end"]:
            return EXIT_OK


class StopAwarePSSync(PSSync):
    """PSSync whose workers answer a stop request in every wait, not only in ``decide``.

    A worker that already passed boundary t (waiting in a bsp pull for step t, or parked
    at a checkpoint of step t) cannot propose t. If it only looked at STOP_REQUEST in
    ``decide``, a worker that got the signal at t-1 would wait for its proposal while it
    waits for that worker's push or parking: a deadlock. Here it proposes t + 1 from
    its waits, and ``sync_point`` returns the agreed reason so the loop follows it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.next_boundary: int | None = 0  # earliest boundary this worker can still stop at
        self.stop_tick = Every(0.001)
        duties = self.client.duties

        def duties_and_stop() -> None:
            self._answer_stop()
            duties()
        self.client.duties = duties_and_stop

    def decide(self, step: int) -> bool:
        self.next_boundary = None  # decide() proposes by itself
        stop = super().decide(step)
        self.next_boundary = step + 1
        return stop

    def _answer_stop(self) -> None:
        if not self.stop_tick.due():
            return
        if signals.stop_requested() and not self.stop_sent:
            self.wins.write(self.coord, C.STOP_REQUEST, 1)
            self.stop_sent = True
        if (self.next_boundary is not None and not self.proposal
                and self.wins.read(self.coord, C.STOP_REQUEST)):
            self.proposal = self.next_boundary + 1
            self.wins.write(self.coord, self.L.proposal + self.w, self.proposal)

    def sync_point(self, step: int, reason: dict, worker_state: dict) -> dict:
        self.wins.write(self.coord, self.L.parked + self.w, step + 1)
        self.client.wait_until(lambda: self.wins.read(self.coord, C.SYNC_EPOCH) > self.sync_epoch)
        self.sync_epoch = self.wins.read(self.coord, C.SYNC_EPOCH)
        return sync_collective(self.roles, self.wins, reason, self.checkpointer,
                               worker=worker_state, duties=self.client.duties)


def _forward_stop_requests(server) -> None:
    """A signal that reaches a server (Slurm signals every rank) raises STOP_REQUEST on the
    coordinator like a worker's would; checked in the duties every server wait runs."""
    duties = server.duties
    sent = [False]

    def duties_and_stop() -> None:
        if not sent[0] and signals.stop_requested():
            server.wins.write(server.coordinator, C.STOP_REQUEST, 1)
            sent[0] = True
        duties()
    server.duties = duties_and_stop


def _work(s, wins, ranges, codecs, quiet: bool) -> int:
    from hpcps.train.loop import Trainer
    from hpcps.gpu import measure_peak
    from hpcps.train.run import _straggle, make_lead_io, measure_peak_flops
    cfg, roles, layout = s.cfg, s.roles, s.workload.layout
    gpu = None
    if s.backend.is_gpu:   # the model on the GPU; MPI gets device buffers or pinned mirrors
        from hpcps.gpu import configure
        from hpcps.gpu.transport import PSDeviceBuffers
        from hpcps.runtime.mpi import cuda_aware_mpi
        configure(s.backend, cfg)
        gpu = PSDeviceBuffers(cfg, layout, codecs, cuda_aware_mpi())
        params, grads = gpu.mpi_params, gpu.mpi_grads
    else:
        params = np.zeros(layout.total, dtype=np.float32)
        grads = layout.new_buffer()
    sync = StopAwarePSSync(cfg=cfg, roles=roles, wins=wins, ranges=ranges, codecs=codecs,
                           layout=layout, params=params, checkpointer=s.checkpointer)
    pending = None
    if s.resume is not None:
        state = s.resume.load_worker(roles.worker_index, roles.n_workers)
        pending = json.loads(state["pending_record"]) if state.get("pending_record") else None
        residual = state.get("residual")
        if sync.client.feedback is not None and residual is not None and len(residual) == layout.total:
            for fb, (lo, hi) in zip(sync.client.feedback, ranges):
                fb.residual[:] = residual[lo:hi]

    def extra_state():
        if sync.client.feedback is None:
            return {}
        return {"residual": np.concatenate([fb.residual for fb in sync.client.feedback])}
    if gpu is not None:
        sync, params, grads = gpu.wrap(sync), gpu.params, gpu.grads
    lead = roles.world_rank == roles.lead_worker
    writer = progress = None
    if lead:
        writer, progress = make_lead_io(s, quiet)
    peak = cfg.train.peak_flops or (measure_peak(s.backend, measure_peak_flops) if lead else 0.0)
    trainer = Trainer(cfg=cfg, roles=roles, workload=s.workload, sync=sync, params=params,
                      grads=grads, lr_fn=lr_schedule(cfg),
                      start_step=s.resume.step if s.resume else 0, writer=writer,
                      progress=progress, pending_record=pending, peak_flops=peak,
                      straggle=_straggle(cfg, roles.world_rank), extra_worker_state=extra_state)
    roles.comm.Barrier()  # matches the servers' barrier after initialising their shards
    code = trainer.run()
    if writer is not None:
        writer.close()
    return code
