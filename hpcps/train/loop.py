"""The worker's training loop, the same for every mode.

Step index t (0-based) turns params after t updates into params after t+1. At the
top of iteration t the worker first settles what happens at this boundary
(stop agreed? checkpoint due? the end?) and meets the other ranks if so, then
pulls params, evaluates when due and writes the record of step t (the loss of
update t, val metrics of params after t updates), and finally computes and
pushes update t. A checkpoint taken at boundary t carries the not-yet-written
record of step t, so a resumed run writes every step exactly once.

With a sample budget (asp/ssp, ``ps.budget = samples``) workers do not step
together: each claims the next batch of the global sample stream from the strategy
until the batches before the next sync point are handed out, then meets the others
there. The lead's records stay one per *global* step (W x batch_size sequences
applied), so every mode's records lie on the same samples axis: after each of its
pushes the lead writes the records of the global steps the servers have completed
since, with the mean loss of the pushes applied meanwhile; the record of the sync
point itself is the one the checkpoint carries.
"""

from __future__ import annotations

import json
import time
from typing import Optional

import numpy as np

from hpcps.errors import EXIT_OK, EXIT_REQUEUE
from hpcps.metrics.runlog import RunLog
from hpcps.runtime import signals
from hpcps.train.stragglers import Straggler
from hpcps.train.sync import StepSync, Work

RECORD_EXTRAS = ("staleness_mean", "staleness_max", "staleness_counts", "split",
                 "round_loss", "outer_norm", "round_steps", "fragment")


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
        # lead: the record of the last sync point, once written. A stop agreed right after
        # a meeting meets again at the same step (nothing trained since): that checkpoint
        # must carry the record again, as the resumed run rewrites it from there
        self.boundary_record: Optional[dict] = None
        self.peak_flops = peak_flops    # per worker: the MFU denominator (0: unknown)
        self.W = roles.n_workers
        self.b = cfg.train.batch_size
        self.global_batch = self.W * self.b
        self.straggler = Straggler(cfg, roles.world_rank,
                                   roles.worker_index if roles.is_worker else 0, self.W)
        self.own_steps = 0    # updates this worker computed in this job
        self.wall_offset = float(pending_record.get("wall_s", 0.0)) if pending_record else 0.0
        self.t0 = time.monotonic()
        self.last_step_end: Optional[float] = None
        # sample budget, lead: records written so far, and the totals they were taken at
        self.recorded = start_step
        self.applied_seen = (0, 0.0, 0.0)
        self.last_loss = float(pending_record["loss"]) if pending_record else float("nan")

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
        record = self.pending
        if record is None and self.boundary_record is not None \
                and self.boundary_record["step"] == step:
            record = self.boundary_record   # a second meeting at this sync point
        state = {"step": step, "pending_record": json.dumps(record) if record else ""}
        state.update(self.sync.worker_state())
        return state

    def evaluate(self) -> dict:
        # a fixed set of eval_steps global batches: the same sequences whatever W is
        n = self.cfg.train.eval_steps * self.global_batch
        sums = self.workload.eval_sums(self.sync.params_to_evaluate(self.params), 0, n)
        return self.workload.finalize_eval(sums)

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> int:
        try:
            if self.sync.samples_budget:
                return self._run_samples()
            return self._run_steps()
        finally:
            self.sync.close()

    def _run_steps(self) -> int:
        """Every worker at the same step: bsp, allreduce, one process, and asp/ssp with
        ``ps.budget = worker_steps``."""
        max_steps = self.cfg.train.max_steps
        step = self.start_step
        while True:
            stop = self.sync.should_stop(step)
            end = step >= max_steps
            if stop or end or self.checkpoint_due(step):
                stop, end = self._meet(step, stop, end)
            self.sync.pull(step)
            self._write_pending(step)
            if stop or end:
                return self._finish(step, stop)
            self.train_step(self.sync.assign(step))
            step += 1

    def _run_samples(self) -> int:
        """Sample budget: claim batches until the next sync point, meet there, go on."""
        boundary = self.start_step
        if self.pending is not None:   # resumed: the record of the boundary we start at
            self.sync.pull(boundary)
            self._write_pending(boundary)
        while True:
            work = self.sync.claim(self.next_sync_point(boundary))
            if work is not None:
                self.sync.pull(work.step)
                self.train_step(work)
                continue
            boundary, stop = self.sync.boundary
            end = boundary >= self.cfg.train.max_steps
            self.sync.before_meet(boundary)   # e.g. an open local-steps round: its batches count
            if self.log is not None:   # the boundary's record covers its last batches
                self._sample_records({"applied_totals": self.sync.applied_through(boundary)},
                                     through=boundary)
            stop, end = self._meet(boundary, stop, end)
            self.sync.pull(boundary)
            self._write_pending(boundary)
            if stop or end:
                return self._finish(boundary, stop)

    def _meet(self, step: int, stop: bool, end: bool) -> tuple[bool, bool]:
        """Sync point at ``step`` (checkpoint there); returns the agreed (stop, end):
        every rank follows the lead worker's reason."""
        closing = self.sync.before_meet(step)
        if closing and self.pending is not None:   # what closing moved: the last step's record
            self._add_to_record(self.pending, closing)
        reason = {"step": step, "stop": bool(stop), "end": bool(end), "checkpoint": True,
                  "signal": signals.signal_name()}
        agreed = self.sync.meet(step, reason, self.worker_state(step))
        return bool(agreed["stop"]), bool(agreed["end"])

    def _add_to_record(self, record: dict, stats: dict) -> None:
        """Fold ``stats`` (extras and bytes moved since the record was made) into it."""
        record.update({k: stats[k] for k in RECORD_EXTRAS if k in stats})
        for key, value in self.sync.traffic().items():
            record[key] = record.get(key, 0.0) + value if isinstance(value, float) else value

    def next_sync_point(self, step: int) -> int:
        """The first boundary after ``step`` where all workers meet: a checkpoint or the end."""
        max_steps = self.cfg.train.max_steps
        every = self.cfg.checkpoint.every
        nxt = (step // every + 1) * every if every else max_steps
        return max(step, min(nxt, max_steps))

    def _write_pending(self, step: int) -> None:
        """Lead: write the record of boundary ``step`` (evaluated when due) after the pull."""
        if self.log is None or self.pending is None:
            return
        if self.eval_due(step):
            self.pending.update(self.evaluate())
        self.log.record(self.pending)
        self.boundary_record, self.pending = self.pending, None

    def _finish(self, step: int, stop: bool) -> int:
        if stop:
            self._message(f"stopped at step {step} after {signals.signal_name() or 'a signal'}"
                          f" on some rank; checkpoint committed, exit {EXIT_REQUEUE} "
                          "(requeue me)")
            return EXIT_REQUEUE
        if step > self.start_step:   # every worker is done: the job's time to finish
            self._message(f"done: {step} steps, {self.wall():.2f} s of training; "
                          f"run directory {self.cfg.out_dir}")
        return EXIT_OK

    def _message(self, text: str) -> None:
        if self.log is not None:
            self.log.message(text)

    def train_step(self, work: Work) -> None:
        """Compute and push update ``work``: items [lo, hi) of the global batch of its step."""
        started = time.monotonic()
        step = work.step
        lr = self.lr_fn(step)
        batch = self.workload.train_batch(step, work.lo, work.hi)
        on_grad_ready = self.sync.start_push(self.grads, self.workload.touched_rows(batch))
        compute_start = time.monotonic()
        loss, weight = self.workload.loss_and_grad(self.params, self.grads, batch, step, work.lo,
                                                   on_grad_ready)
        # experiments: slow this step down; with a sample budget the pattern follows the
        # worker's own steps (there are no common ones)
        own = self.start_step + self.own_steps if self.sync.samples_budget else step
        factor = self.straggler.factor_at(own)
        if factor > 1.0:
            time.sleep((time.monotonic() - compute_start) * (factor - 1.0))
        compute_s = time.monotonic() - compute_start
        stats = self.sync.push(step, self.grads, weight, loss, work.hi - work.lo, compute_s)
        self.own_steps += 1
        if self.log is None:
            return
        if self.sync.samples_budget:
            self._sample_records(stats, pushed_step=step)
        else:
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
        if "items_applied" in stats:   # sequences the servers applied job-wide meanwhile
            record["items"] = int(items)
        flops = self.workload.flops_per_item()
        if flops and self.peak_flops:
            record["mfu"] = flops * items_per_s / (self.peak_flops * self.W)
        for key in RECORD_EXTRAS:
            if key in stats:
                record[key] = stats[key]
        record.update(self.sync.traffic())
        if not np.isfinite(record["loss"]):
            self._message(f"warning: loss is {record['loss']} at step {step + 1}")
        return record

    def _sample_records(self, stats: Optional[dict], pushed_step: int = 0,
                        through: Optional[int] = None) -> None:
        """Sample budget, lead: write the records of the global steps completed since the
        last ones (``stats``: of its push of a batch of ``pushed_step``), with the mean loss
        of the pushes applied meanwhile. No record past ``pushed_step`` is written early:
        the next sync point lies beyond it, and its record must be the pending one the
        checkpoint carries. ``through``: at sync point ``through``, write every record up to
        it and keep its own pending."""
        items, loss_sum, weight_sum = stats["applied_totals"] if stats else self.applied_seen
        done = self.start_step + items // self.global_batch
        upto = through if through is not None else min(done, pushed_step)
        if upto <= self.recorded:
            return
        d_weight = weight_sum - self.applied_seen[2]
        if d_weight > 0:
            self.last_loss = (loss_sum - self.applied_seen[1]) / d_weight
        self.applied_seen = (items, loss_sum, weight_sum)
        now = time.monotonic()
        since = now - (self.last_step_end if self.last_step_end is not None else self.t0)
        self.last_step_end = now
        count = upto - self.recorded
        # progress on the samples axis: global steps completed, per second
        tokens_per_s = (count * self.global_batch * self.workload.tokens_per_item / since
                        if since > 0 else 0.0)
        extras = {k: stats[k] for k in RECORD_EXTRAS if stats and k in stats}
        # traffic shared out over the records (sums stay right); staleness counted once
        traffic = {k: (v / count if isinstance(v, float) else v)
                   for k, v in self.sync.traffic().items()}
        for step in range(self.recorded + 1, upto + 1):
            record = {"step": step, "loss": self.last_loss, "lr": self.lr_fn(step - 1),
                      "grad_norm": None if not stats or stats.get("grad_norm") is None
                      else float(stats["grad_norm"]),
                      "tokens_per_s": tokens_per_s, "step_s": since / count,
                      "wall_s": self.wall(), **extras, **traffic}
            extras = {}
            if step == through:
                self.pending = record
                break
            if self.eval_due(step):
                record.update(self.evaluate())
            self.log.record(record)
        self.recorded = upto
