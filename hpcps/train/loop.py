"""The worker's training loop, the same for every mode.

Step index t (0-based) turns params after t updates into params after t+1. At the
top of iteration t the worker first settles what happens at this boundary
(stop agreed? checkpoint due? the end?) and meets the other ranks if so, then
pulls params, evaluates when due and writes the record of step t (the loss of
update t, val metrics of params after t updates), and finally computes and
pushes update t. A checkpoint taken at boundary t carries the not-yet-written
record of step t, so a resumed run writes every step exactly once.
"""

from __future__ import annotations

import json
import time
from typing import Optional

import numpy as np

from hpcps.errors import EXIT_OK, EXIT_REQUEUE
from hpcps.metrics.runlog import RunLog
from hpcps.runtime import signals
from hpcps.train.sync import StepSync


def straggle_factor(spec: str, rank: int) -> float:
    """``ps.straggler`` ('RANK:FACTOR,...'): how many times slower this rank computes."""
    for part in filter(None, spec.split(",")):
        r, _, factor = part.partition(":")
        if int(r) == rank:
            return float(factor)
    return 1.0


class Trainer:
    """One worker: the loop above over a ``StepSync`` strategy. Only the lead worker
    (``log`` given) evaluates into and writes the step records."""

    def __init__(self, *, cfg, roles, workload, sync: StepSync, params, grads, lr_fn,
                 start_step: int, log: Optional[RunLog] = None,
                 pending_record: Optional[dict] = None, peak_flops: float = 0.0):
        self.cfg, self.roles, self.workload, self.sync = cfg, roles, workload, sync
        self.params, self.grads, self.lr_fn = params, grads, lr_fn
        self.start_step = start_step
        self.log = log
        self.pending = pending_record
        self.peak_flops = peak_flops    # per worker: the MFU denominator (0: unknown)
        self.straggle = straggle_factor(cfg.ps.straggler, roles.world_rank)
        self.W = roles.n_workers
        self.b = cfg.train.batch_size
        self.global_batch = self.W * self.b
        self.lo = roles.worker_index * self.b if roles.is_worker else 0
        self.hi = self.lo + self.b
        self.wall_offset = float(pending_record.get("wall_s", 0.0)) if pending_record else 0.0
        self.t0 = time.monotonic()
        self.last_step_end: Optional[float] = None

    # -- helpers -----------------------------------------------------------------------
    def wall(self) -> float:
        return self.wall_offset + time.monotonic() - self.t0

    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every) and step % every == 0 and step != self.start_step and step > 0

    def eval_due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return step == self.cfg.train.max_steps or (bool(every) and step % every == 0 and step > 0)

    def worker_state(self, step: int) -> dict:
        state = {"step": step, "pending_record": json.dumps(self.pending) if self.pending else ""}
        state.update(self.sync.worker_state())
        return state

    def evaluate(self) -> dict:
        # a fixed set of eval_steps global batches: the same sequences whatever W is
        n = self.cfg.train.eval_steps * self.global_batch
        sums = self.workload.eval_sums(self.params, 0, n)
        return self.workload.finalize_eval(sums)

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> int:
        max_steps = self.cfg.train.max_steps
        step = self.start_step
        try:
            while True:
                stop = self.sync.should_stop(step)
                end = step >= max_steps
                if stop or end or self.checkpoint_due(step):
                    reason = {"step": step, "stop": bool(stop), "end": bool(end),
                              "checkpoint": True, "signal": signals.signal_name()}
                    # every rank follows the lead worker's reason
                    agreed = self.sync.meet(step, reason, self.worker_state(step))
                    stop, end = bool(agreed["stop"]), bool(agreed["end"])
                self.sync.pull(step)
                if self.log is not None and self.pending is not None:
                    if self.eval_due(step):
                        self.pending.update(self.evaluate())
                    self.log.record(self.pending)
                    self.pending = None
                if stop:
                    self._message(f"stopped at step {step} after {signals.signal_name() or 'a signal'}"
                                  f" on some rank; checkpoint committed, exit {EXIT_REQUEUE} "
                                  "(requeue me)")
                    return EXIT_REQUEUE
                if end:
                    if step > self.start_step:
                        self._message(f"done: {step} steps, {self.wall():.0f} s of training; "
                                      f"run directory {self.cfg.out_dir}")
                    return EXIT_OK
                self.train_step(step)
                step += 1
        finally:
            self.sync.close()

    def _message(self, text: str) -> None:
        if self.log is not None:
            self.log.message(text)

    def train_step(self, step: int) -> None:
        started = time.monotonic()
        lr = self.lr_fn(step)
        batch = self.workload.train_batch(step, self.lo, self.hi)
        on_grad_ready = self.sync.start_push(self.grads, self.workload.touched_rows(batch))
        compute_start = time.monotonic()
        loss, weight = self.workload.loss_and_grad(self.params, self.grads, batch, step, self.lo,
                                                   on_grad_ready)
        if self.straggle > 1.0:  # experiments: this rank computes `straggle` times slower
            time.sleep((time.monotonic() - compute_start) * (self.straggle - 1.0))
        stats = self.sync.push(step, self.grads, weight, loss, self.hi - self.lo)
        if self.log is not None:
            self.pending = self._record(step, lr, stats, started)

    def _record(self, step: int, lr: float, stats: dict, started: float) -> dict:
        """The record of update ``step`` (written at the next boundary, see the docstring)."""
        now = time.monotonic()
        # between consecutive step ends: includes waiting, pulls and evaluation
        step_s = now - (self.last_step_end if self.last_step_end is not None else started)
        self.last_step_end = now
        # items all workers processed meanwhile: in asp and ssp the others need not have done
        # one step each while the lead did one (the PS strategy counts the items applied)
        items = stats.get("items_applied", self.global_batch)
        items_per_s = items / step_s if step_s > 0 else 0.0
        record = {"step": step + 1, "loss": float(stats["loss"]), "lr": lr,
                  "grad_norm": None if stats.get("grad_norm") is None else float(stats["grad_norm"]),
                  "tokens_per_s": items_per_s * self.workload.tokens_per_item,
                  "step_s": step_s, "wall_s": self.wall()}
        flops = self.workload.flops_per_item()
        if flops and self.peak_flops:
            record["mfu"] = flops * items_per_s / (self.peak_flops * self.W)
        for key in ("staleness_mean", "staleness_max", "staleness_counts"):
            if key in stats:
                record[key] = stats[key]
        record.update(self.sync.traffic())
        if not np.isfinite(record["loss"]):
            self._message(f"warning: loss is {record['loss']} at step {step + 1}")
        return record
