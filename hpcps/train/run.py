"""``hpcps train``: set up ranks, roles, workload, resume state; run servers and workers.

Set-up is collective and agreed: a bad config, corpus or checkpoint is reported
once by rank 0 and every rank exits 2. After set-up, an error on any single rank
aborts the whole job (MPI_Abort) with that rank's message, so nothing hangs.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import numpy as np

from hpcps import __version__
from hpcps.errors import EXIT_FAILURE, EXIT_USAGE, UserError
from hpcps.runtime import signals
from hpcps.runtime.mpi import abort, agree_on_errors, mpi


def measure_peak_flops(seconds: float = 0.3) -> float:
    """fp32 matmul FLOP/s of this process (the MFU denominator when not configured)."""
    n = 512
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2.0 * n ** 3 * reps / (time.perf_counter() - start)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _prepare_run_dir(cfg) -> None:
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        _write_text_atomic(os.path.join(cfg.out_dir, "config.toml"), cfg.to_toml())
    except OSError as err:
        raise UserError(f"cannot write the run directory {cfg.out_dir}: {err.strerror}") from None


def _straggle(cfg, rank: int) -> float:
    for part in filter(None, cfg.ps.straggler.split(",")):
        r, _, factor = part.partition(":")
        if int(r) == rank:
            return float(factor)
    return 1.0


def train_main(config_path, overrides, quiet: bool = False) -> int:
    signals.install()
    MPI = mpi()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    setup = agree_on_errors(comm, lambda: _setup(config_path, overrides, comm))
    try:
        return _run(setup, quiet)
    except UserError as err:
        if size == 1:
            raise
        abort(comm, EXIT_USAGE, str(err))
    except Exception as err:  # a bug or I/O failure on this rank: end the job, never hang
        if size == 1:
            raise
        traceback.print_exc()
        abort(comm, EXIT_FAILURE, f"rank {rank}: {type(err).__name__}: {err}")
    return EXIT_FAILURE


class Setup:
    pass


def _setup(config_path, overrides, comm) -> Setup:
    from hpcps.config import load_config
    from hpcps.ps.roles import build_roles
    cfg = load_config(config_path, overrides)
    digests = comm.allgather(cfg.digest())
    if len(set(digests)) > 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        raise UserError(f"the resolved config differs between ranks (ranks {differing} differ from "
                        "rank 0): give every rank the same config file and overrides")
    s = Setup()
    s.cfg = cfg
    s.comm = comm
    s.roles = build_roles(cfg, comm if comm.Get_size() > 1 else None)
    if s.roles.mode != "single" and s.roles.comm is None:
        s.roles.comm = comm
    _limit_threads(s.roles)
    from hpcps.backend import CPU, get_backend
    s.backend = (get_backend(cfg.device, s.roles.local_rank, cfg.gpu.share)
                 if s.roles.is_worker else CPU)
    from hpcps.workloads import build_workload
    s.workload = build_workload(cfg, s.backend)
    s.checkpointer = _make_checkpointer(cfg, s.roles, s.workload)
    s.resume = s.checkpointer.find_resume() if s.checkpointer is not None else None
    if comm.Get_rank() == 0:
        _prepare_run_dir(cfg)
    return s


def _limit_threads(roles) -> None:
    """Ranks sharing a node share its cores: each worker's BLAS (and the model's batch
    shards, which follow the BLAS thread count) gets its share; servers need one."""
    if roles.mode == "single":
        return
    from hpcps.model.blas import rank_core_share, set_blas_threads
    on_node = roles.node_of[roles.world_rank]
    workers_here = sum(1 for r in roles.workers if roles.node_of[r] == on_node)
    set_blas_threads(1 if roles.is_server else rank_core_share(workers_here))


def _make_checkpointer(cfg, roles, workload):
    try:
        from hpcps.checkpoint import Checkpointer
    except ImportError:
        return None
    return Checkpointer(cfg, roles, workload.layout, workload.describe())


def _banner(s, extra: str = "") -> None:
    from hpcps.runtime.mpi import library_info
    info = library_info()
    lines = [f"hpcps {__version__} | {info['library']} (MPI {info['mpi_version']}, thread level "
             f"{info['thread_level']}, CUDA-aware {info['cuda_aware']})",
             f"{s.roles.describe()} | workload {s.cfg.workload}, {s.workload.layout.total:,} params "
             f"| device {s.cfg.device}"]
    if s.resume is not None:
        lines.append(f"resuming from {s.resume.path} (step {s.resume.step})")
    if extra:
        lines.append(extra)
    print("\n".join(lines), flush=True)


def _run(s: Setup, quiet: bool) -> int:
    if s.roles.mode in ("single", "allreduce"):
        return _run_replicated(s, quiet)
    from hpcps.ps.launch import run_parameter_server
    return run_parameter_server(s, quiet)


def make_lead_io(s, quiet: bool):
    from hpcps.metrics.progress_line import ProgressLine
    from hpcps.metrics.runlog import MetricsWriter
    # the checkpoint of boundary t carries the record of step t, written again on resume:
    # keep only the records before it
    keep_through = s.resume.step - 1 if s.resume is not None else None
    writer = MetricsWriter(s.cfg.out_dir, keep_through)
    if s.cfg.train.tensorboard:     # also TensorBoard events; a resume purges the redone steps
        from hpcps.metrics.tensorboard import TensorBoardWriter  # its library is optional
        writer = TensorBoardWriter(writer, s.cfg.out_dir,
                                   None if keep_through is None else keep_through + 1)
    progress = ProgressLine(s.cfg.train.max_steps, s.cfg.train.log_every, quiet)
    return writer, progress


def _run_replicated(s: Setup, quiet: bool) -> int:
    from hpcps.gpu import configure, measure_peak
    from hpcps.optim.schedule import lr_schedule
    from hpcps.train.loop import Trainer
    from hpcps.train.sync import AllreduceSync, LocalSync
    cfg, roles, layout, backend = s.cfg, s.roles, s.workload.layout, s.backend
    configure(backend, cfg)
    lr_fn = lr_schedule(cfg)
    if s.resume is not None:
        shard = s.resume.load_shard(0, layout.total)
        params_host = shard["params"]
    else:
        shard = None
        params_host = layout.init_slice(cfg.train.seed)
    params = backend.asarray(params_host) if backend.is_gpu else params_host
    grads = layout.new_buffer(backend.xp)
    if roles.mode == "single":
        sync = LocalSync(cfg, layout, lr_fn, params, s.checkpointer, backend)
    else:
        sync = AllreduceSync(cfg, layout, lr_fn, params, roles, s.checkpointer, backend)
    if shard is not None:
        sync.opt.load_state(shard)
    lead = roles.world_rank == roles.lead_worker
    writer = progress = None
    pending = None
    if lead:
        writer, progress = make_lead_io(s, quiet)
        if not quiet:
            _banner(s)
    if s.resume is not None:
        text = s.resume.load_worker(roles.worker_index, roles.n_workers).get("pending_record")
        pending = json.loads(text) if text else None
    peak = cfg.train.peak_flops or (measure_peak(backend, measure_peak_flops) if lead else 0.0)
    trainer = Trainer(cfg=cfg, roles=roles, workload=s.workload, sync=sync, params=params,
                      grads=grads, lr_fn=lr_fn, start_step=s.resume.step if s.resume else 0,
                      writer=writer, progress=progress, pending_record=pending, peak_flops=peak,
                      straggle=_straggle(cfg, roles.world_rank))
    code = trainer.run()
    if writer is not None:
        writer.close()
    if s.checkpointer is not None:
        s.checkpointer.close()
    return code
