"""``hpcps train``: set up ranks, roles, workload and resume state; run every rank's role.

Set-up is collective and agreed: a bad config, corpus or checkpoint is reported
once by rank 0 and every rank exits 2. After set-up, an error on any single rank
aborts the whole job (MPI_Abort) with that rank's message, so nothing hangs.

A server rank runs ``hpcps.ps.serve``; every worker (in every mode) runs the one
``Trainer`` over the mode's ``StepSync`` strategy.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from hpcps import __version__
from hpcps.backend import CPU, Backend, get_backend, gpu_slot, visible_gpus
from hpcps.checkpoint import CheckpointReader, Checkpointer, ResumePoint
from hpcps.config import load_config
from hpcps.errors import EXIT_FAILURE, EXIT_USAGE, UserError
from hpcps.gpu import configure
from hpcps.gpu.transport import AllreduceBuffer, PSDeviceBuffers
from hpcps.metrics.runlog import RunLog
from hpcps.metrics.tensorboard import require_tensorboard
from hpcps.model.blas import rank_core_share, set_blas_threads
from hpcps.optim import make_optimizer
from hpcps.optim.outer import make_outer_optimizer
from hpcps.optim.schedule import lr_schedule
from hpcps.ps.memory import replica_bytes
from hpcps.ps.options import check_fragments, check_options
from hpcps.ps.roles import PS_MODES, Roles, build_roles
from hpcps.ps.server import serve
from hpcps.ps.shards import ShardSet
from hpcps.ps.update_rules import rule_memory_bytes
from hpcps.runtime import signals
from hpcps.runtime.mpi import abort, agree_on_errors, cuda_aware_mpi, library_info, mpi
from hpcps.train import init_from
from hpcps.train.local_sync import LocalStepsSync
from hpcps.train.loop import Trainer
from hpcps.train.memory import check_job_memory, describe_estimates, describe_peaks, peak_report
from hpcps.train.peak import job_peak_flops
from hpcps.train.ps_sync import PSSync
from hpcps.train.sync import AllreduceSync, LocalSync
from hpcps.workloads import build_workload
from hpcps.workloads.base import Workload


@dataclass
class RunContext:
    """Everything a rank knows after the agreed set-up, before its role starts."""
    cfg: Any                          # the resolved config (hpcps.config.load.Config)
    roles: Roles
    backend: Backend                  # NumPy, or CuPy on a worker with device = gpu
    workload: Workload
    checkpointer: Optional[Checkpointer]
    resume: Optional[ResumePoint]     # the checkpoint this run continues from, if any
    quiet: bool
    initial: Optional[CheckpointReader] = None   # train.init_from's weights (a fresh run only)
    memory: Optional[list] = None     # every rank's estimate (hpcps.train.memory)

    @property
    def start_step(self) -> int:
        return self.resume.step if self.resume is not None else 0

    @property
    def is_lead(self) -> bool:
        return self.roles.world_rank == self.roles.lead_worker


def train_main(config_path, overrides, quiet: bool = False) -> int:
    signals.install()
    comm = mpi().COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    ctx = agree_on_errors(comm, lambda: setup(config_path, overrides, comm, quiet))
    ctx.memory = agree_on_errors(comm, lambda: check_job_memory(ctx.cfg, ctx.roles, ctx.workload,
                                                                ctx.roles.comm))
    try:
        return run(ctx)
    except UserError as err:
        if size == 1:
            raise
        abort(comm, EXIT_USAGE, str(err), reported_elsewhere=getattr(err, "agreed_rank", 0) != 0)
    except Exception as err:  # a bug or I/O failure on this rank: end the job, never hang
        if size == 1:
            raise
        traceback.print_exc()
        abort(comm, EXIT_FAILURE, f"rank {rank}: {type(err).__name__}: {err}")
    return EXIT_FAILURE


def setup(config_path, overrides, comm, quiet: bool) -> RunContext:
    """Collective: every rank resolves the same config, roles, workload and resume point."""
    cfg = load_config(config_path, overrides)
    initial = init_from.open_initial(cfg)
    if initial is not None:
        cfg, notes = init_from.adopt_shape(cfg, initial)
        if comm.Get_rank() == 0 and notes and not quiet:
            print("\n".join(notes), file=sys.stderr, flush=True)
    if cfg.train.tensorboard:
        require_tensorboard()
    digests = comm.allgather(cfg.digest())
    if len(set(digests)) > 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        raise UserError(f"the resolved config differs between ranks (ranks {differing} differ from "
                        "rank 0): give every rank the same config file and overrides")
    roles = build_roles(cfg, comm)
    check_options(cfg, roles)
    _limit_threads(roles)
    backend = _worker_backend(cfg, roles, comm)
    workload = build_workload(cfg, backend)
    check_fragments(cfg, workload.layout)
    checkpointer = Checkpointer(cfg, roles, workload.layout, workload.describe())
    resume = checkpointer.find_resume()
    if resume is not None:
        initial = None                      # its own checkpoint holds where the run is
    elif initial is not None:
        init_from.check_fits(initial, workload.describe(), cfg.data.path)
    if comm.Get_rank() == 0:
        _prepare_run_dir(cfg)
    return RunContext(cfg, roles, backend, workload, checkpointer, resume, quiet, initial)


def _worker_backend(cfg, roles: Roles, comm) -> Backend:
    """NumPy, or CuPy on the GPU this worker takes (collective: the ranks tell each other
    which GPUs they see, see ``hpcps.backend.gpu_slot``)."""
    wants_gpu = cfg.device == "gpu" and roles.is_worker
    seen = comm.allgather(visible_gpus() if wants_gpu else None) if comm.Get_size() > 1 else \
        [visible_gpus() if wants_gpu else None]
    if not roles.is_worker:
        return CPU
    slot = gpu_slot(roles.world_rank, roles.node_workers, dict(enumerate(seen))) if wants_gpu else 0
    return get_backend(cfg.device, slot, cfg.gpu.share)


def _limit_threads(roles: Roles) -> None:
    """Ranks on one host share its cores: each worker's BLAS (and the model's batch shards,
    which follow the BLAS thread count) gets its share; servers need one. Hosts, not MPI's
    shared-memory nodes, decide: a launch that sends all traffic through the network
    module still shares the cores of one machine."""
    if roles.mode == "single":
        return
    host = roles.hosts[roles.world_rank]
    workers_here = sum(1 for r in roles.workers if roles.hosts[r] == host)
    set_blas_threads(1 if roles.is_server else rank_core_share(workers_here))


def _prepare_run_dir(cfg) -> None:
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        tmp = os.path.join(cfg.out_dir, f"config.toml.tmp.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(cfg.to_toml())
        os.replace(tmp, os.path.join(cfg.out_dir, "config.toml"))
    except OSError as err:
        raise UserError(f"cannot write the run directory {cfg.out_dir}: {err.strerror}") from None


def banner(ctx: RunContext, extra: str = "") -> None:
    info = library_info()
    lines = [f"hpcps {__version__} | {info['library']} (MPI {info['mpi_version']}, thread level "
             f"{info['thread_level']}, CUDA-aware {info['cuda_aware']})",
             f"{ctx.roles.describe()} | workload {ctx.cfg.workload}, "
             f"{ctx.workload.layout.total:,} params | device {ctx.cfg.device}"]
    if ctx.resume is not None:
        lines.append(f"resuming from {ctx.resume.path} (step {ctx.resume.step})")
    elif ctx.initial is not None:
        lines.append(f"starting from the weights of {ctx.initial.path} (train.init_from; fresh "
                     f"optimizer and schedule at step 0)")
    if ctx.memory:
        lines.append(f"memory estimate per rank: {describe_estimates(ctx.memory)}")
    if extra:
        lines.append(extra)
    print("\n".join(lines), flush=True)


def run(ctx: RunContext) -> int:
    """This rank's role until the job ends or stops; returns the exit code."""
    if ctx.roles.mode not in PS_MODES:
        if ctx.is_lead and not ctx.quiet:
            banner(ctx)
        code = run_worker(ctx, None)
    else:
        shards = ShardSet.open(ctx.cfg, ctx.roles, ctx.workload.layout)  # collective
        if ctx.is_lead and not ctx.quiet:
            turns = " (pushes take turns)" if shards.wins.n_slots < ctx.roles.n_pushers else ""
            banner(ctx, f"shards: {[hi - lo for lo, hi in shards.ranges]} elements; push "
                        f"encoding {ctx.cfg.ps.compression}; {shards.wins.n_slots} receive "
                        f"slot(s) per shard{turns}")
        _memory_table(ctx, shards)
        code = run_server(ctx, shards) if ctx.roles.is_server else run_worker(ctx, shards)
        shards.close()  # collective
    ctx.checkpointer.close()
    _report_peaks(ctx)
    return code


def _report_peaks(ctx: RunContext) -> None:
    """Collective: rank 0 prints every rank's estimate beside its measured peak and keeps
    both in OUT_DIR/memory.json."""
    report = peak_report(ctx.memory or [], ctx.roles.comm)
    if report is None:
        return
    if not ctx.quiet:
        print(describe_peaks(report), flush=True)
    try:
        with open(os.path.join(ctx.cfg.out_dir, "memory.json"), "w", encoding="utf-8") as fh:
            json.dump({"ranks": {str(r): v for r, v in report.items()}}, fh, indent=1)
    except OSError as err:
        print(f"warning: cannot write {ctx.cfg.out_dir}/memory.json: {err.strerror}", flush=True)


def _memory_table(ctx: RunContext, shards: ShardSet) -> None:
    """Every rank's resident bytes for the PS, printed by rank 0 as one line."""
    roles = ctx.roles
    held = shards.memory_bytes(ctx.cfg)
    if roles.is_server:   # delay compensation's past versions, backup workers' carry
        lo, hi = shards.own_range
        held += rule_memory_bytes(ctx.cfg, hi - lo, roles.n_workers)
        if roles.mode == "bsp" and ctx.cfg.ps.backup_workers:
            held += 4 * (hi - lo)
    elif ctx.cfg.ps.local_steps:   # the replica's inner optimizer state and the round's anchor
        held += replica_bytes(ctx.cfg, ctx.workload.layout.total)
    table = roles.comm.gather((roles.world_rank, "server" if roles.is_server else "worker",
                               held), root=0)
    if roles.world_rank == 0 and not ctx.quiet:
        parts = [f"r{r}:{kind[0]}={b / 2**20:.1f}MiB" for r, kind, b in table]
        print(f"memory per rank (params/state/buffers): {' '.join(parts)}", flush=True)


def run_server(ctx: RunContext, shards: ShardSet) -> int:
    cfg, layout = ctx.cfg, ctx.workload.layout
    job_peak_flops(cfg, ctx.roles, ctx.backend)  # collective: the workers measure meanwhile
    lo, hi = shards.own_range
    local = cfg.ps.local_steps > 0
    if local:   # the servers step the global params with the workers' deltas
        optimizer = make_outer_optimizer(cfg, hi - lo, ctx.roles.mode, ctx.roles.n_pushers,
                                         fragments=shards.own_fragments())
    else:
        optimizer = make_optimizer(cfg, hi - lo, layout.decay_ranges(lo, hi))
    # the initial params go straight into the params window: no second shard-sized array
    params = shards.wins.local_params
    if ctx.resume is not None:
        state = ctx.resume.load_shard(lo, hi)
        optimizer.load_state(state)
        params[:] = state.pop("params")
        version = int(state["version"])
        del state
        if ctx.roles.mode == "bsp" and not local:  # one update per step (asp counts pushes,
            version = ctx.resume.step              # local steps count rounds)
    elif ctx.initial is not None:
        params[:] = initial_params(ctx, lo, hi)
        version = 0
    else:
        layout.init_slice(cfg.train.seed, lo, hi, out=params)
        version = 0

    def save(reason, comm, shard) -> None:
        ctx.checkpointer.save(reason["step"], shard=shard, worker=None, reason=reason, comm=comm)
    outer_lr = cfg.ps.outer_lr
    return serve(cfg=cfg, shards=shards, optimizer=optimizer,
                 lr_fn=(lambda version: outer_lr) if local else lr_schedule(cfg),
                 params=params, version=version, save=save, split=_saved_split(ctx),
                 max_norm=0.0 if local else None)   # deltas are not clipped: inner steps were


def initial_params(ctx: RunContext, lo: int, hi: int) -> np.ndarray:
    """Parameters [lo, hi) a fresh run starts from: train.init_from's, or the seeded
    initialisation."""
    if ctx.initial is not None:
        return ctx.initial.load_shard(lo, hi)["params"]
    return ctx.workload.layout.init_slice(ctx.cfg.train.seed, lo, hi)


def run_worker(ctx: RunContext, shards: Optional[ShardSet]) -> int:
    """A worker of any mode: the mode's strategy, the one Trainer, the lead's run log."""
    cfg, roles, backend = ctx.cfg, ctx.roles, ctx.backend
    configure(backend, cfg)
    lr_fn = lr_schedule(cfg)
    saved = ctx.resume.load_worker(roles.worker_index, roles.n_workers) if ctx.resume else {}
    sync, params, grads = _strategy(ctx, shards, lr_fn, saved)
    peak = job_peak_flops(cfg, roles, backend)
    log = None
    if ctx.is_lead:
        # the checkpoint of boundary t carries the record of step t, written again on
        # resume: keep only the records before it
        log = RunLog(cfg, ctx.start_step - 1 if ctx.resume is not None else None, ctx.quiet)
    pending = json.loads(saved["pending_record"]) if saved.get("pending_record") else None
    trainer = Trainer(cfg=cfg, roles=roles, workload=ctx.workload, sync=sync, params=params,
                      grads=grads, lr_fn=lr_fn, start_step=ctx.start_step, log=log,
                      pending_record=pending, peak_flops=peak)
    if shards is not None:
        roles.comm.Barrier()  # matches the servers' barrier after initialising their shards
    code = trainer.run()
    if log is not None:
        log.close()
    return code


def _saved_split(ctx: RunContext) -> Optional[list]:
    """The speed-balanced split the checkpoint this run resumes from was taken with (in
    the lead's pending record: the split published for the step it resumes at)."""
    if ctx.resume is None:
        return None
    saved = ctx.resume.load_worker(0, len(ctx.resume.manifest["workers"]))
    record = json.loads(saved["pending_record"]) if saved.get("pending_record") else {}
    return record.get("split")


def _strategy(ctx: RunContext, shards: Optional[ShardSet], lr_fn, saved: dict):
    """(sync, params, grads) of this worker's mode; on a GPU the model's buffers live on the
    device and the strategy is wrapped so MPI gets device buffers or pinned mirrors."""
    cfg, roles, layout, backend = ctx.cfg, ctx.roles, ctx.workload.layout, ctx.backend
    if shards is not None:
        device = PSDeviceBuffers(cfg, layout, shards.codecs, cuda_aware_mpi()) if backend.is_gpu else None
        node = PSSync.node_group(roles, layout.total)   # collective over the workers
        if device is not None:
            params, grads = device.mpi_params, device.mpi_grads
        else:   # with a node group the model reads the params its node's leader pulled
            params = node.params if node is not None else np.zeros(layout.total, np.float32)
            grads = layout.new_buffer()
        sync = PSSync(cfg=cfg, shards=shards, params=params, checkpointer=ctx.checkpointer,
                      worker_state=saved, node=node, start_step=ctx.start_step,
                      clip_pushes=not cfg.ps.local_steps)
        if cfg.ps.local_steps:
            sync = LocalStepsSync(cfg=cfg, ps=sync, params=params, layout=layout, lr_fn=lr_fn,
                                  saved=saved)
        if device is not None:
            return device.wrap(sync), device.params, device.grads
        return sync, params, grads
    # single / allreduce: a replica of params and optimizer state on every rank
    shard = ctx.resume.load_shard(0, layout.total) if ctx.resume is not None else None
    host = shard["params"] if shard is not None else initial_params(ctx, 0, layout.total)
    params = backend.asarray(host) if backend.is_gpu else host
    grads = layout.new_buffer(backend.xp)
    if roles.mode == "single":
        return LocalSync(cfg, layout, lr_fn, params, ctx.checkpointer, backend, shard), params, grads
    device = AllreduceBuffer(layout.total, cuda_aware_mpi()) if backend.is_gpu else None
    sync = AllreduceSync(cfg, layout, lr_fn, params, roles, ctx.checkpointer, backend, shard,
                         device_buffer=device)
    return sync, params, grads
