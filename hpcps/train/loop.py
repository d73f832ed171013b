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
from hpcps.runtime import signals


class Trainer:
    def __init__(self, *, cfg, roles, workload, sync, params, grads, lr_fn, start_step: int,
                 writer=None, progress=None, pending_record: Optional[dict] = None,
                 peak_flops: float = 0.0, straggle: float = 1.0, extra_worker_state=None):
        self.cfg, self.roles, self.workload, self.sync = cfg, roles, workload, sync
        self.params, self.grads, self.lr_fn = params, grads, lr_fn
        self.start_step = start_step
        self.writer, self.progress = writer, progress
        self.pending = pending_record
        self.peak_flops = peak_flops
        self.straggle = straggle
        self.extra_worker_state = extra_worker_state or (lambda: {})
        self.W = roles.n_workers
        self.b = cfg.train.batch_size
        self.global_batch = self.W * self.b
        self.lo = roles.worker_index * self.b if roles.is_worker else 0
        self.hi = self.lo + self.b
        self.is_lead = roles.world_rank == roles.lead_worker
        self.wall_offset = float(pending_record.get("wall_s", 0.0)) if pending_record else 0.0
        self.t0 = time.monotonic()
        self.last_step_end = None
        workload.set_grad_ready_callback(sync.grad_ready)

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
        state.update(self.extra_worker_state())
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
        while True:
            stop = self.sync.decide(step)
            end = step >= max_steps
            if stop or end or self.checkpoint_due(step):
                reason = {"step": step, "stop": bool(stop), "end": bool(end),
                          "checkpoint": True, "signal": signals.signal_name()}
                agreed = self.sync.sync_point(step, reason, self.worker_state(step))
                if agreed:  # the lead worker's reason, which every rank follows (PS modes)
                    stop, end = bool(agreed["stop"]), bool(agreed["end"])
            self.sync.pull(step)
            if self.is_lead and self.pending is not None:
                if self.eval_due(step):
                    self.pending.update(self.evaluate())
                self.writer.write(self.pending)
                self.progress.step(self.pending)
                self.pending = None
            if stop:
                if self.is_lead:
                    self.progress.message(f"stopped at step {step} after {signals.signal_name() or 'a signal'}"
                                          f" on some rank; checkpoint committed, exit {EXIT_REQUEUE} "
                                          "(requeue me)")
                return EXIT_REQUEUE
            if end:
                if self.is_lead and step > self.start_step:
                    self.progress.message(f"done: {step} steps, {self.wall():.0f} s of training; "
                                          f"run directory {self.cfg.out_dir}")
                return EXIT_OK
            self.train_step(step)
            step += 1

    def train_step(self, step: int) -> None:
        started = time.monotonic()
        lr = self.lr_fn(step)
        batch = self.workload.train_batch(step, self.lo, self.hi)
        self.sync.begin_backward(self.grads, self.workload.touched_rows(batch))
        compute_start = time.monotonic()
        loss, weight = self.workload.loss_and_grad(self.params, self.grads, batch, step, self.lo)
        if self.straggle > 1.0:  # experiments: this rank computes `straggle` times slower
            time.sleep((time.monotonic() - compute_start) * (self.straggle - 1.0))
        stats = self.sync.push(step, self.grads, weight, loss)
        if not self.is_lead:
            return
        now = time.monotonic()
        # tokens/s between consecutive step ends: includes waiting, pulls and evaluation
        step_s = now - (self.last_step_end if self.last_step_end is not None else started)
        self.last_step_end = now
        tokens = self.global_batch * self.workload.tokens_per_item
        record = {"step": step + 1, "loss": float(stats["loss"]), "lr": lr,
                  "grad_norm": None if stats.get("grad_norm") is None else float(stats["grad_norm"]),
                  "tokens_per_s": tokens / step_s if step_s > 0 else 0.0,
                  "step_s": step_s, "wall_s": self.wall()}
        flops = self.workload.flops_per_item()
        if flops and self.peak_flops:
            record["mfu"] = flops * self.global_batch / step_s / (self.peak_flops * self.W)
        for key in ("staleness_mean", "staleness_max", "staleness_counts"):
            if key in stats:
                record[key] = stats[key]
        record.update(self.sync.traffic())
        if not np.isfinite(record["loss"]):
            self.progress.message(f"warning: loss is {record['loss']} at step {step + 1}")
        self.pending = record
