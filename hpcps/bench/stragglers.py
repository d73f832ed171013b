"""``hpcps bench train --experiments straggler,transient``: the remedies for slow workers,
measured by the time a job takes to spend its budget of samples.

Every run trains on ``--straggler-steps x W x batch_size`` sequences (bsp: that many
steps; asp/ssp: the global sample budget, ``ps.budget = samples``) with W =
``--straggler-workers`` workers and one server:

- ``straggler``: the last worker is ``--straggler-factor`` times slower all along
  (``ps.straggler``): persistent;
- ``transient``: ``--transient-pattern`` (``ps.straggler_pattern``, default
  ``random:2``: at each step one worker drawn at random is 2x slower).

Modes (``--straggler-modes``): bsp, bsp+balance (``ps.balance = speed``), bsp+backup
(``ps.backup_workers = 1``), ssp (``ps.staleness = --staleness``), asp, and asp with
each delay compensation (asp+lr, asp+dc, asp+gap, asp+lookahead; also ssp+lookahead);
``asp-steps`` is the old asp whose every worker runs its own steps
(``ps.budget = worker_steps``); ``/early-pull`` modes pull without waiting for the
worker's own last push (``ps.read_your_writes = false``). ``bsp-unslowed`` is bsp with nobody slowed down: the
ceiling of any remedy on the machine at hand (when workers share cores, a straggler's
idle time goes to the others, so no split of the batch can beat it by much).

Per run: **time to finish** (the seconds of training in the lead's closing "done:" line,
written once every worker is done),
tokens/s over the whole job (the budget's tokens / time to finish), tokens/s while all
ran (traced pushes, the older measure), the final val loss, and for bsp-like modes the
largest relative difference of a step's loss from the bsp run of the same repeat
(speed balance changes only the summation order). Modes run interleaved in every
repeat; ratios to bsp are taken per repeat, then the median.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Optional

from hpcps.errors import UserError

MODES = {
    "bsp": ["ps.mode=bsp"],
    "bsp+balance": ["ps.mode=bsp", "ps.balance=speed"],
    "bsp+backup": ["ps.mode=bsp", "ps.backup_workers=1"],
    "ssp": ["ps.mode=ssp"],
    "asp": ["ps.mode=asp"],
    "asp+lr": ["ps.mode=asp", "ps.delay_compensation=lr"],
    "asp+dc": ["ps.mode=asp", "ps.delay_compensation=dc"],
    "asp+gap": ["ps.mode=asp", "ps.delay_compensation=gap"],
    "asp+lookahead": ["ps.mode=asp", "ps.delay_compensation=lookahead"],
    "ssp+lookahead": ["ps.mode=ssp", "ps.delay_compensation=lookahead"],
    "asp-steps": ["ps.mode=asp", "ps.budget=worker_steps"],
    "asp/early-pull": ["ps.mode=asp", "ps.read_your_writes=false"],
    "asp+lookahead/early-pull": ["ps.mode=asp", "ps.delay_compensation=lookahead",
                                 "ps.read_your_writes=false"],
    "bsp-unslowed": ["ps.mode=bsp"],   # runs without the slowdown (see the docstring)
}
UNSLOWED = "bsp-unslowed"
DEFAULT_MODES = ("bsp,bsp+balance,bsp+backup,ssp,asp,asp+lr,asp+dc,asp+gap,asp+lookahead,"
                 "bsp-unslowed")
TARGETS = {"straggler": {"bsp+balance": 1.6, "asp+lr": 1.6, "asp+dc": 1.6, "asp+gap": 1.6,
                         "asp+lookahead": 1.6},
           "transient": {"ssp": 1.3}}
VAL_TARGET = 0.05


def loss_gap(records: list[dict], reference: list[dict]) -> float:
    """Largest relative difference of a step's loss between two runs of the same steps."""
    ref = {r["step"]: r["loss"] for r in reference}
    return max((abs(r["loss"] - ref[r["step"]]) / abs(ref[r["step"]])
                for r in records if r["step"] in ref), default=math.nan)


def finish_seconds(stdout: str) -> float:
    """The training seconds of the lead's "done: N steps, S s of training" line."""
    found = re.findall(r"^done: \d+ steps, ([\d.]+) s of training", stdout, re.MULTILINE)
    if not found:
        raise UserError("a straggler run printed no 'done:' line (did it finish?)")
    return float(found[-1])


def all_running(runner, workers: int, out_dir, records) -> Optional[float]:
    """Tokens/s of all workers while all of them ran (traced pushes); None when a worker
    pushed too few batches to tell (a slow one, in a short run)."""
    try:
        return runner._throughput("asp", workers, out_dir, records, runner.args.warmup)
    except UserError:
        return None


def straggler_experiment(runner, kind: str) -> dict:
    """``kind``: straggler (persistent) or transient; see the module docstring."""
    a = runner.args
    workers, steps = a.straggler_workers, a.straggler_steps
    slow_rank = workers - 1   # the server is the highest rank; rank 0 (the lead) is fast
    slow = (f"ps.straggler={slow_rank}:{a.straggler_factor:g}" if kind == "straggler"
            else f"ps.straggler_pattern={a.transient_pattern}")
    common = [f"train.max_steps={steps}", f"ps.staleness={a.staleness}", slow]
    if a.straggler_eval_every:
        common.append(f"train.eval_every={a.straggler_eval_every}")
    modes = runner.plan["straggler_modes"]
    runs: dict = {m: [] for m in modes}
    budget_tokens = steps * runner._per_step_tokens(workers)
    for _ in range(a.repeats):
        reference = None
        for mode in modes:   # interleaved: every mode once per repeat
            output: list = []
            settings = [c for c in common if c != slow] if mode == UNSLOWED else common
            out_dir, records = runner.launch(workers + 1, ["ps.servers=1", *settings, *MODES[mode]],
                                             env_extra=runner.one_thread, traced=True,
                                             output=output)
            finish = finish_seconds(output[0])
            run = {"dir": str(out_dir), "finish_s": finish,
                   "tokens_per_s": budget_tokens / finish,
                   "tokens_per_s_all_running": all_running(runner, workers, out_dir, records),
                   "val_loss": records[-1].get("val_loss")}
            if mode == "bsp":
                reference = records
            elif mode.startswith("bsp") and reference is not None:
                run["max_step_loss_rel_diff"] = loss_gap(records, reference)
            runs[mode].append(run)
    return summarize(kind, runs, {
        "workers": workers, "ranks": workers + 1, "steps": steps, "staleness": a.staleness,
        "slowdown": slow, "oversubscribed": workers + 1 > runner.cores,
        "budget_tokens": budget_tokens})


def median_known(values) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(kind: str, runs: dict, out: dict) -> dict:
    base = runs["bsp"]
    out["modes"] = {}
    for mode, values in runs.items():
        speedups = [b["finish_s"] / r["finish_s"] for b, r in zip(base, values)]
        deltas = [r["val_loss"] - b["val_loss"] for b, r in zip(base, values)]
        row = {"finish_s": statistics.median(r["finish_s"] for r in values),
               "finish_speedup_vs_bsp": statistics.median(speedups),
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in values),
               "tokens_per_s_all_running": median_known(r["tokens_per_s_all_running"]
                                                        for r in values),
               "val_loss": statistics.median(r["val_loss"] for r in values),
               "val_delta_vs_bsp": statistics.median(deltas), "runs": values}
        gaps = [r["max_step_loss_rel_diff"] for r in values if "max_step_loss_rel_diff" in r]
        if gaps:
            row["max_step_loss_rel_diff"] = max(gaps)
        target = TARGETS.get(kind, {}).get(mode)
        if target is not None:
            row["target_speedup"] = target
            row["target_val_delta"] = VAL_TARGET
        out["modes"][mode] = row
    return out


def format_stragglers(kind: str, s: dict) -> list[str]:
    what = "persistent straggler" if kind == "straggler" else "transient stragglers"
    lines = [f"{kind}: {what} ({s['slowdown']}), {s['workers']} workers + 1 server, "
             f"{s['steps']} x {s['workers']} batches in all{' (oversubscribed)' if s['oversubscribed'] else ''}; "
             "time to finish vs bsp, tokens/s of the whole job, val loss"]
    for mode, m in s["modes"].items():
        name = f"ssp({s['staleness']})" if mode == "ssp" else mode
        extra = ""
        if "max_step_loss_rel_diff" in m:
            extra = f"  step losses vs bsp: max rel {m['max_step_loss_rel_diff']:.1e}"
        if "target_speedup" in m:
            extra += f"  (target >= {m['target_speedup']:.1f}x, val within {m['target_val_delta']})"
        lines.append(f"  {name:12s} {m['finish_s']:6.1f} s  {m['finish_speedup_vs_bsp']:.2f}x  "
                     f"{m['tokens_per_s']:>9,.0f} tok/s  val {m['val_loss']:.4f} "
                     f"({m['val_delta_vs_bsp']:+.4f}){extra}")
    return lines


def check_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode '{unknown[0]}' (choose from {', '.join(MODES)})")
    return ["bsp"] + [m for m in modes if m != "bsp"]   # bsp first: the reference

