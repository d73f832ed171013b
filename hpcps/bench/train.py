"""``hpcps bench train``: training throughput of the synchronisation modes, measured by
launching real ``hpcps train`` jobs (run it without mpirun; it starts mpirun itself).

Experiments (``--experiments``, default all):

- ``overhead``: BSP with 1 server + 1 worker vs one process, same config, step time
  side by side in interleaved repeats (target <= 1.10x). ``hpcps train`` gives the
  server one BLAS thread and the worker the node's cores (it only streams through
  memory; idle BLAS threads busy-waiting on a shared core would slow the worker).
- ``scaling``: tokens/s of bsp, ssp, asp and allreduce at W = 2, 4, 7 workers.
- ``straggler``: W workers, the last one ``--straggler-factor`` times slower; ``transient``:
  one random worker slower at each step (``--transient-pattern``). Time to finish the same
  budget of samples, tokens/s and val loss of bsp, speed-balanced bsp, backup workers,
  ssp(``--staleness``), asp and asp with delay compensation (``hpcps.bench.stragglers``).
- ``checkpoint``: BSP 1 server + 1 worker with ``checkpoint.every = --checkpoint-every`` vs
  without periodic checkpoints, interleaved: the *mean* step time (checkpoint steps included)
  of each, and the overhead (target <= 5 %).
- ``network``: the same bsp and asp jobs through shared memory and through MPICH's network
  module, interleaved: step-time ratio and the latency of atomics (``hpcps.bench.network``).
- ``local``: local steps with an outer optimizer against bsp: val at equal tokens, bytes
  pushed, time to finish over throttled links and with a straggler
  (``hpcps.bench.local_steps``).

Throughput of a PS run is counted from every worker's pushes (the runs are traced
with HPCPS_PS_TRACE): the tokens all workers pushed while all of them were still
running, divided by that time. One-process and allreduce runs use the lead's step
times. With more ranks than cores the ranks share cores; the summary says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from hpcps.bench import local_steps
from hpcps.bench.network import format_network, network_experiment
from hpcps.bench.stragglers import DEFAULT_MODES, check_modes, format_stragglers, straggler_experiment
from hpcps.config import load_config
from hpcps.config.paths import resolve_config_path
from hpcps.errors import UserError

EXPERIMENTS = ("overhead", "scaling", "straggler", "transient", "checkpoint", "network", "local")
MODES = ("bsp", "ssp", "asp", "allreduce")
# several ranks per core: one BLAS thread each, or their threads fight over the cores
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. data.path=data/shk.h5")
    parser.add_argument("--config", default="shakespeare_char",
                        help="TOML config or a name in configs/ (default shakespeare_char, "
                             "nanoGPT's CPU shape)")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS[:5]),
                        help=f"comma list of {', '.join(EXPERIMENTS)} (default all but network, "
                             "which needs MPICH, and local, which takes long)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed at the start")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per run kind")
    parser.add_argument("--workers", default="2,4,7", help="worker counts for scaling")
    parser.add_argument("--modes", default=",".join(MODES), help="modes for scaling")
    parser.add_argument("--network-workers", type=int, default=2,
                        help="workers of the network runs (with 1 server); when the ranks fit "
                             "the cores, every rank gets a core (one BLAS thread each)")
    parser.add_argument("--straggler-workers", type=int, default=4)
    parser.add_argument("--straggler-factor", type=float, default=2.0)
    parser.add_argument("--staleness", type=int, default=3, help="ssp bound in the straggler runs")
    parser.add_argument("--straggler-steps", type=int, default=300,
                        help="global steps of samples in the straggler runs (val loss is "
                             "compared)")
    parser.add_argument("--straggler-modes", default=DEFAULT_MODES,
                        help="modes of the straggler and transient runs (see "
                             "hpcps.bench.stragglers)")
    parser.add_argument("--transient-pattern", default="random:2",
                        help="ps.straggler_pattern of the transient runs")
    parser.add_argument("--straggler-eval-every", type=int, default=0,
                        help="evaluate every N steps in the straggler runs (for plots)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="checkpoint interval in the checkpoint runs")
    parser.add_argument("--mpirun", default="mpirun",
                        help="launcher prefix, e.g. 'mpirun --oversubscribe --allow-run-as-root'")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--keep", default=None, help="keep run directories under this folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    local_steps.add_arguments(parser)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"--{what}: expected positive integers, got {text!r}")
    return values


def check_args(args) -> dict:
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    for e in experiments:
        if e not in EXPERIMENTS:
            raise UserError(f"--experiments: unknown '{e}' (choose from {', '.join(EXPERIMENTS)})")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise UserError(f"--modes: unknown '{m}' (choose from {', '.join(MODES)})")
    for name in ("steps", "repeats", "straggler_workers", "straggler_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.staleness < 0:
        raise UserError("--warmup and --staleness must be >= 0")
    if args.straggler_factor < 1.0:
        raise UserError(f"--straggler-factor must be >= 1, got {args.straggler_factor:g}")
    if "local" in experiments:
        local_steps.check_arguments(args)
    try:
        straggler_modes = check_modes(args.straggler_modes)
    except ValueError as err:
        raise UserError(f"--straggler-modes: {err}") from None
    config = resolve_config_path(args.config)
    cfg = load_config(config, args.overrides)  # bad keys are reported before any launch
    load_config(config, [*args.overrides, f"ps.straggler_pattern={args.transient_pattern}"])
    if cfg.workload != "synthetic" and not cfg.data.path:
        raise UserError("no corpus: give data.path=... (prepare one with `hpcps prepare`)")
    if cfg.data.path and not os.path.exists(cfg.data.path):
        raise UserError(f"data.path not found: {cfg.data.path}")
    return {"experiments": experiments, "modes": modes, "config": config, "cfg": cfg,
            "workers": _int_list(args.workers, "workers"), "straggler_modes": straggler_modes}


def run(args: argparse.Namespace) -> int:
    plan = check_args(args)
    runner = Runner(args, plan)
    with tempfile.TemporaryDirectory(prefix="hpcps-bench-") as tmp:
        runner.root = Path(args.keep or tmp)
        result = {"config": plan["config"], "overrides": list(args.overrides),
                  "launcher": args.mpirun, "cores": os.cpu_count(), "steps": args.steps,
                  "repeats": args.repeats}
        for name in plan["experiments"]:
            result[name] = getattr(runner, name)()
    print(json.dumps(result, indent=2) if args.json else format_summary(result), flush=True)
    return 0


# -- reading a finished run ------------------------------------------------------------------
def read_records(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def median_step_s(records: list[dict], warmup: int) -> float:
    """Median time per step of the lead worker, without warm-up and evaluation steps."""
    times = [r["step_s"] for r in records if r["step"] > warmup and "val_loss" not in r]
    if not times:
        raise UserError("a run had no timed steps: raise --steps")
    return statistics.median(times)


def mean_step_s(records: list[dict], warmup: int) -> float:
    """Mean time per step after warm-up: a step that paid for a checkpoint counts in full."""
    times = [r["step_s"] for r in records if r["step"] > warmup and "val_loss" not in r]
    if not times:
        raise UserError("a run had no timed steps: raise --steps")
    return statistics.fmean(times)


def traced_tokens_per_s(trace_dir: Path, warmup: int, tokens_per_push: int) -> float:
    """Tokens pushed by all workers while all were running, per second: from the end of
    the slowest worker's warm-up to the moment the first worker pushed its last step.
    (In very short runs a fast worker may finish before another one warmed up; then the
    workers' own push rates after warm-up are added instead.)"""
    pushes = []
    for path in sorted(trace_dir.glob("worker*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            pushes.append(sorted(json.loads(x)["t"] for x in fh if '"push"' in x))
    if not pushes or min(len(p) for p in pushes) <= warmup + 1:
        raise UserError(f"too few traced pushes in {trace_dir}: raise --steps")
    start = max(p[warmup] for p in pushes)
    end = min(p[-1] for p in pushes)
    counts = [sum(1 for t in p if start < t <= end) for p in pushes]
    if end > start and min(counts) >= 2:
        return sum(counts) * tokens_per_push / (end - start)
    rates = [(len(p) - 1 - warmup) / max(p[-1] - p[warmup], 1e-9) for p in pushes]
    return sum(rates) * tokens_per_push


class Runner:
    def __init__(self, args, plan):
        self.args, self.plan = args, plan
        self.cfg = plan["cfg"]
        self.root = Path(".")
        self.count = 0
        self.cores = os.cpu_count() or 1
        self.one_thread = ONE_THREAD
        self.tokens_per_item = (self.cfg.model.block_size if self.cfg.workload != "synthetic"
                                else 1)

    # -- launching -------------------------------------------------------------------------
    def _train_args(self, out_dir: Path, extra, quiet: bool = True) -> list[str]:
        base = [*(["-q"] if quiet else []), "train", self.plan["config"], *self.args.overrides,
                "train.eval_every=0", "train.peak_flops=1e9", f"out_dir={out_dir}"]
        return base + list(extra)

    def launch(self, ranks: int, extra, *, env_extra: dict | None = None,
               traced: bool = False, output: Optional[list] = None,
               launcher_args: tuple = ()) -> tuple[Path, list[dict]]:
        """One ``hpcps train`` job; returns its run directory and metrics records.
        ``output``: a list to append the job's stdout to (then it is not quiet);
        ``launcher_args``: options for mpirun (e.g. binding)."""
        self.count += 1
        out_dir = self.root / f"run{self.count:03d}"
        env = {**os.environ, **(env_extra or {})}
        if traced:
            env["HPCPS_PS_TRACE"] = str(out_dir / "trace")
        argv = self._train_args(out_dir, extra, quiet=output is None)
        py = [sys.executable, "-m", "mpi4py", "-m", "hpcps"]
        if ranks == 1:
            cmd = [sys.executable, "-m", "hpcps", *argv]
        else:
            cmd = [*shlex.split(self.args.mpirun), *launcher_args, "-n", str(ranks), *py, *argv]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=self.args.timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"a benchmark run timed out after {self.args.timeout:g} s: "
                            f"{' '.join(cmd)}") from None
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise UserError(f"a benchmark run failed (exit {done.returncode}): {tail}")
        if output is not None:
            output.append(done.stdout)
        return out_dir, read_records(out_dir)

    def _per_step_tokens(self, workers: int) -> int:
        return workers * self.cfg.train.batch_size * self.tokens_per_item

    def _median_step(self, records) -> float:
        return median_step_s(records, self.args.warmup)

    def network(self) -> dict:
        return network_experiment(self)

    def local(self) -> dict:
        return local_steps.local_experiment(self)

    # -- experiments -----------------------------------------------------------------------
    def overhead(self) -> dict:
        a = self.args
        steps = [f"train.max_steps={a.warmup + a.steps}"]
        single, bsp, ratios = [], [], []
        for _ in range(a.repeats):
            _, rec_single = self.launch(1, [*steps, "ps.mode=single"])
            _, rec_bsp = self.launch(2, [*steps, "ps.mode=bsp", "ps.servers=1"])
            single.append(median_step_s(rec_single, a.warmup))
            bsp.append(median_step_s(rec_bsp, a.warmup))
            ratios.append(bsp[-1] / single[-1])
        return {"single_step_s": single, "bsp_1s1w_step_s": bsp, "ratio": ratios,
                "ratio_median": statistics.median(ratios), "target": 1.10,
                "tokens_per_step": self._per_step_tokens(1)}

    def checkpoint(self) -> dict:
        """Periodic checkpoints on vs off; the runs span several checkpoint intervals."""
        a = self.args
        total = a.warmup + max(a.steps, 3 * a.checkpoint_every)
        base = [f"train.max_steps={total}", "ps.mode=bsp", "ps.servers=1"]
        on, off, overheads = [], [], []
        for _ in range(a.repeats):
            _, rec_on = self.launch(2, [*base, f"checkpoint.every={a.checkpoint_every}"])
            _, rec_off = self.launch(2, [*base, "checkpoint.every=0"])
            on.append(mean_step_s(rec_on, a.warmup))
            off.append(mean_step_s(rec_off, a.warmup))
            overheads.append(on[-1] / off[-1] - 1.0)
        return {"every": a.checkpoint_every, "steps": total, "with_step_s": on,
                "without_step_s": off, "overhead": overheads,
                "overhead_median": statistics.median(overheads), "target": 0.05}

    def _mode_args(self, mode: str, workers: int, extra=()) -> tuple[int, list[str]]:
        if mode == "allreduce":
            return workers, ["ps.mode=allreduce", *extra]
        return workers + 1, [f"ps.mode={mode}", "ps.servers=1", *extra]

    def _throughput(self, mode: str, workers: int, out_dir: Path, records, warmup: int) -> float:
        if mode == "allreduce":
            return self._per_step_tokens(workers) / median_step_s(records, warmup)
        per_push = self.cfg.train.batch_size * self.tokens_per_item
        return traced_tokens_per_s(out_dir / "trace", warmup, per_push)

    def scaling(self) -> list[dict]:
        a = self.args
        rows = []
        for workers in self.plan["workers"]:
            samples = {m: [] for m in self.plan["modes"]}
            for _ in range(a.repeats):
                for mode in self.plan["modes"]:
                    ranks, extra = self._mode_args(mode, workers, [
                        f"train.max_steps={a.warmup + a.steps}", f"ps.staleness={a.staleness}"])
                    out_dir, records = self.launch(ranks, extra, env_extra=ONE_THREAD,
                                                   traced=mode != "allreduce")
                    samples[mode].append(self._throughput(mode, workers, out_dir, records,
                                                          a.warmup))
            for mode, values in samples.items():
                ranks = self._mode_args(mode, workers)[0]
                rows.append({"workers": workers, "mode": mode, "ranks": ranks,
                             "oversubscribed": ranks > self.cores,
                             "tokens_per_s": statistics.median(values), "samples": values})
        return rows

    def straggler(self) -> dict:
        return straggler_experiment(self, "straggler")

    def transient(self) -> dict:
        return straggler_experiment(self, "transient")


def format_summary(result: dict) -> str:
    lines = [f"hpcps bench train | {result['config']} {' '.join(result['overrides'])} | "
             f"{result['cores']} cores | launcher: {result['launcher']}"]
    if "overhead" in result:
        o = result["overhead"]
        lines.append(f"overhead: bsp 1 server + 1 worker / one process step time = "
                     f"{o['ratio_median']:.3f}x (target <= {o['target']:.2f}; per repeat "
                     f"{', '.join(f'{r:.3f}' for r in o['ratio'])}; single "
                     f"{1e3 * statistics.median(o['single_step_s']):.1f} ms, bsp "
                     f"{1e3 * statistics.median(o['bsp_1s1w_step_s']):.1f} ms)")
    if "scaling" in result:
        lines.append("scaling (tokens/s, all workers; * = more ranks than cores):")
        by_w: dict = {}
        for row in result["scaling"]:
            by_w.setdefault(row["workers"], []).append(row)
        for workers, rows in by_w.items():
            cells = [f"{r['mode']} {r['tokens_per_s']:,.0f}{'*' if r['oversubscribed'] else ''}"
                     for r in rows]
            lines.append(f"  W={workers}: " + " | ".join(cells))
    for kind in ("straggler", "transient"):
        if kind in result:
            lines += format_stragglers(kind, result[kind])
    if "network" in result:
        lines += format_network(result["network"])
    if "local" in result:
        lines += local_steps.format_local(result["local"])
    if "checkpoint" in result:
        c = result["checkpoint"]
        lines.append(f"checkpoint: every {c['every']} steps, bsp 1 server + 1 worker, {c['steps']} "
                     f"steps: overhead {100 * c['overhead_median']:+.1f}% of the mean step time "
                     f"(target <= {100 * c['target']:.0f}%; per repeat "
                     f"{', '.join(f'{100 * o:+.1f}%' for o in c['overhead'])}; with "
                     f"{1e3 * statistics.median(c['with_step_s']):.2f} ms, without "
                     f"{1e3 * statistics.median(c['without_step_s']):.2f} ms)")
    return "\n".join(lines)
