"""Writing checkpoints: one collective ``save`` per sync point, committed by a rename.

Every rank writes its own files into ``step_N.tmp/`` (servers their shard, workers
their state, rank 0 the tokenizer); rank 0 then writes ``manifest.json`` with every
file's sha256 and renames the directory to ``step_N``: the rename is the commit.

Final saves (stop, end, or ``checkpoint.background = false``) run on the main thread
and meet through MPI (gather of the file lists, broadcast of the outcome). Background
saves copy the state to host memory, then a thread per rank writes the files and
drops ``rank_R.json`` (or ``rank_R.failed``) into the ``.tmp`` directory; rank 0's
thread waits for all of them and commits. MPI runs funneled, so the threads meet
through the filesystem only. A failed background save is raised on the main thread
at the next ``save`` or ``close``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Optional

from hpcps.checkpoint import files as F
from hpcps.checkpoint.manifest import committed, new_manifest
from hpcps.checkpoint.reader import ResumePoint, find_resume
from hpcps.data.seqcorpus import checkpoint_tokenizer_text
from hpcps.errors import UserError
from hpcps.optim import SGD, AdamW
from hpcps.optim.outer import optimizer_label, outer_state_names
from hpcps.runtime.polled import PolledComm


def _state_names(cfg, mode: str) -> tuple:
    """The optimizer arrays a shard holds: the servers' optimizer's (the outer one with
    local steps)."""
    if cfg.ps.local_steps:
        return outer_state_names(cfg, mode)
    return SGD.state_names if cfg.train.optimizer == "sgd" else AdamW.state_names


class SaveFailed(Exception):
    """A rank's part of a save failed; ``user``: the user can fix it (disk full, permissions)."""

    def __init__(self, text: str, user: bool):
        super().__init__(text)
        self.user = user

    def __reduce__(self):  # travels to rank 0 in the save's gather: pickle both fields
        return SaveFailed, (str(self), self.user)


def _describe_failure(err: BaseException, step: int) -> SaveFailed:
    if isinstance(err, OSError):
        where = f" {err.filename}" if err.filename else ""
        return SaveFailed(f"checkpoint at step {step}: cannot write{where}: "
                          f"{err.strerror or err}; the previous checkpoints are untouched", True)
    return SaveFailed(f"checkpoint at step {step} failed: {type(err).__name__}: {err}", False)


def _raise(failure: SaveFailed, agreed_rank: Optional[int] = None):
    """Raise the failure as the error type it is; ``agreed_rank``: every rank raises the same
    (rank 0 alone need report it, see ``hpcps.runtime.mpi.agree_on_errors``)."""
    err = UserError(str(failure)) if failure.user else RuntimeError(str(failure))
    if agreed_rank is not None:
        err.agreed_rank = agreed_rank
    raise err


def _off_the_mpi_thread(write, comm, step: int) -> tuple:
    """("ok", write()) or ("failed", SaveFailed). With a ``PolledComm`` the file work runs in
    a thread while this (the MPI) thread keeps heartbeats and MPI progress going: a server
    writing a large shard would otherwise hold up every atomic on its windows."""
    outcome: list = []

    def attempt() -> None:
        try:
            outcome.append(("ok", write()))
        except Exception as err:  # reported to every rank by the caller, so nobody waits
            outcome.append(("failed", _describe_failure(err, step)))
    if not isinstance(comm, PolledComm):
        attempt()
        return outcome[0]
    worker = threading.Thread(target=attempt, name=f"checkpoint-write-{step}", daemon=True)
    worker.start()
    comm.wait_for(lambda: not worker.is_alive())
    return outcome[0]


class _Job:
    """One background save on this rank."""

    def __init__(self, step: int):
        self.step = step
        self.failure: Optional[SaveFailed] = None
        self.thread: Optional[threading.Thread] = None


class Checkpointer:
    def __init__(self, cfg, roles, layout, describe: dict):
        self.cfg, self.roles, self.layout = cfg, roles, layout
        self.describe = dict(describe)
        self.dir = os.path.abspath(cfg.checkpoint_dir)
        self.rank = roles.world_rank
        self.comm = roles.comm
        self.world_size = roles.world_size
        self.state_names = _state_names(cfg, roles.mode)
        self.resume: Optional[ResumePoint] = None
        self.job: Optional[_Job] = None
        self.cleaned = False
        self._check_writable()
        if cfg.train.resume == "never" and committed(self.dir):
            newest = committed(self.dir)[-1][1]
            raise UserError(f"train.resume = never, but checkpoint.dir {self.dir} already holds "
                            f"checkpoints (newest {os.path.basename(newest)}): delete them or "
                            "choose another checkpoint.dir / out_dir; nothing was changed")
        self.tokenizer_text = self._tokenizer_text() if self.rank == 0 else None

    def _check_writable(self) -> None:
        probe = os.path.join(self.dir, f".write-probe.{socket.gethostname()}.{os.getpid()}")
        try:
            os.makedirs(self.dir, exist_ok=True)
            with open(probe, "w") as fh:
                fh.write("ok")
            os.remove(probe)
        except OSError as err:
            raise UserError(f"checkpoint.dir {self.dir} cannot be created or written: "
                            f"{err.strerror or err}") from None

    def _tokenizer_text(self) -> Optional[str]:
        if not self.cfg.data.path:
            return None
        try:
            return checkpoint_tokenizer_text(self.cfg.data.path)
        except (UserError, OSError):
            return None  # the workload reports an unreadable corpus itself

    # -- resume ----------------------------------------------------------------------------
    def find_resume(self) -> Optional[ResumePoint]:
        """The checkpoint ``train.resume`` selects (no MPI: every rank decides alike)."""
        self.resume = find_resume(self.cfg, self.describe, print_warnings=self.rank == 0)
        return self.resume

    def _is_resumed_step(self, step: int) -> bool:
        """A checkpoint we resumed from, in our own directory: it is committed already."""
        r = self.resume
        return (r is not None and r.step == step
                and os.path.realpath(os.path.dirname(r.path)) == os.path.realpath(self.dir))

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, *, shard, worker, reason: dict, comm=None) -> None:
        """Collective: every rank calls it at the same sync point. ``comm`` (default
        ``roles.comm``) carries the save's collectives, e.g. a ``PolledComm`` that keeps
        heartbeats going while it waits."""
        comm = comm if comm is not None else self.comm
        self._finish_previous()
        if self._is_resumed_step(step):
            return
        final = bool(reason.get("stop") or reason.get("end")) or not self.cfg.checkpoint.background
        tmp = os.path.join(self.dir, F.step_dir_name(step) + ".tmp")
        if self.rank == 0:
            try:
                self._prepare(tmp)
            except OSError as err:
                _raise(_describe_failure(err, step))
        if comm is not None:
            comm.Barrier()  # nobody writes into the .tmp directory before it exists
        fault = F.fault_at(step, self.rank)
        work = self._work(step, shard, worker, copy=not final)
        if final:
            self._save_now(step, tmp, work, fault, reason, comm)
        else:
            job = _Job(step)
            job.thread = threading.Thread(target=self._background, name=f"checkpoint-{step}",
                                          args=(job, tmp, work, fault, reason), daemon=True)
            self.job = job
            job.thread.start()

    def close(self) -> None:
        """Wait for the background save; raise if it failed."""
        self._finish_previous()

    def _finish_previous(self) -> None:
        job, self.job = self.job, None
        if job is None:
            return
        job.thread.join()
        if job.failure is not None:
            # rank 0's committer learns of every rank's failure and reports it: the others
            # raise it too (they must stop) but leave the one line to rank 0
            _raise(job.failure, agreed_rank=self.rank if self.comm is not None else None)

    def _prepare(self, tmp: str) -> None:
        """Rank 0: remove leftovers of interrupted saves (first time), make a fresh .tmp."""
        if not self.cleaned:
            for name in os.listdir(self.dir):
                if name.startswith("step_") and name.endswith(".tmp"):
                    F.remove_tree(os.path.join(self.dir, name))
            self.cleaned = True
        F.remove_tree(tmp)
        os.makedirs(tmp)

    def _work(self, step: int, shard, worker, copy: bool) -> dict:
        """What this rank writes; with ``copy`` a private host snapshot (training goes on)."""
        def host(array):
            return F.to_host(array, copy=copy)
        work: dict = {}
        if shard is not None:
            lo, hi, state = shard
            arrays = {"params": host(state["params"])}
            for name in self.state_names:
                arrays[name] = host(state[name])
            index = self.roles.server_index if self.roles.is_server else 0
            work["shard"] = {"index": index, "lo": int(lo), "hi": int(hi), "arrays": arrays,
                             "t": int(state["t"]), "version": int(state.get("version", step))}
        if worker is not None and self.roles.is_worker:
            # the strategy's state: arrays (residual, inner optimizer moments) and counters
            kept = {k: v for k, v in worker.items() if k not in ("step", "pending_record")}
            work["worker"] = {"index": self.roles.worker_index,
                              "pending_record": worker.get("pending_record") or "",
                              "arrays": {k: host(v) for k, v in kept.items()
                                         if hasattr(v, "shape")},
                              "counters": {k: int(v) for k, v in kept.items()
                                           if not hasattr(v, "shape")}}
        return work

    def _write_own(self, step: int, tmp: str, work: dict, fault: Optional[str]) -> dict:
        """Write this rank's files; return their entries for the manifest."""
        entry: dict = {"rank": self.rank, "files": {}, "shards": [], "workers": []}
        if "shard" in work:
            s = work["shard"]
            name = F.server_file(s["index"])
            path = os.path.join(tmp, name)
            F.write_shard(path, lo=s["lo"], hi=s["hi"], arrays=s["arrays"], t=s["t"],
                          version=s["version"], step=step, optimizer=optimizer_label(self.cfg),
                          fault=fault)
            entry["files"][name] = F.hash_and_sync(path)
            entry["shards"].append({"file": name, "lo": s["lo"], "hi": s["hi"], "t": s["t"],
                                    "version": s["version"], "index": s["index"]})
        if "worker" in work:
            w = work["worker"]
            name = F.worker_file(w["index"])
            path = os.path.join(tmp, name)
            if "shard" not in work:
                F.inject(fault, path)
            F.write_worker(path, index=w["index"], n_workers=self.roles.n_workers, step=step,
                           pending_record=w["pending_record"], arrays=w["arrays"],
                           counters=w["counters"])
            entry["files"][name] = F.hash_and_sync(path)
            entry["workers"].append({"file": name, "index": w["index"]})
        if self.rank == 0 and self.tokenizer_text is not None:
            path = os.path.join(tmp, F.TOKENIZER)
            entry["files"][F.TOKENIZER] = F.write_text_durable(path, self.tokenizer_text)
        return entry

    # -- final saves: main thread, MPI ----------------------------------------------------------
    def _save_now(self, step: int, tmp: str, work: dict, fault, reason: dict, comm) -> None:
        result = _off_the_mpi_thread(lambda: self._write_own(step, tmp, work, fault), comm, step)
        results = comm.gather(result, root=0) if comm is not None else [result]
        outcome = None
        if self.rank == 0:
            outcome = self._commit_or_report(step, tmp, results, reason)
        if comm is not None:
            outcome = comm.bcast(outcome, root=0)
        if outcome is not None:
            _raise(outcome, agreed_rank=self.rank)

    def _commit_or_report(self, step, tmp, results, reason) -> Optional[SaveFailed]:
        failures = [r[1] for r in results if r[0] == "failed"]
        if failures:
            F.remove_tree(tmp)
            return failures[0]
        return self._commit_safely(step, tmp, [r[1] for r in results], reason)

    # -- background saves: threads, filesystem ---------------------------------------------------
    def _background(self, job: _Job, tmp: str, work: dict, fault, reason: dict) -> None:
        failure = None
        try:
            entry = self._write_own(job.step, tmp, work, fault)
            F.write_json_durable(os.path.join(tmp, F.rank_done_file(self.rank)), entry)
        except Exception as err:
            failure = _describe_failure(err, job.step)
            try:  # tells rank 0's committer that this rank is done, without a file list
                F.write_text_durable(os.path.join(tmp, F.rank_failed_file(self.rank)),
                                     str(failure))
            except OSError:
                pass
        if self.rank == 0:
            try:
                failure = self._wait_and_commit(job.step, tmp, reason) or failure
            except Exception as err:  # never die silently: close() must learn of it
                failure = _describe_failure(err, job.step)
        job.failure = failure

    def _wait_and_commit(self, step: int, tmp: str, reason: dict) -> Optional[SaveFailed]:
        """Rank 0's thread: wait until every rank reported, then commit (or clean up)."""
        done = [F.rank_done_file(r) for r in range(self.world_size)]
        failed = [F.rank_failed_file(r) for r in range(self.world_size)]
        while True:
            names = set(os.listdir(tmp))
            if all(d in names or f in names for d, f in zip(done, failed)):
                break
            time.sleep(0.01)
        failures = [(r, f) for r, f in enumerate(failed) if f in names]
        if failures:
            rank, name = failures[0]
            with open(os.path.join(tmp, name), encoding="utf-8") as fh:
                text = fh.read().strip()
            F.remove_tree(tmp)  # every rank is done with it: give the space back
            return SaveFailed(text if rank == 0 else f"{text} (on rank {rank})", True)
        entries = []
        for name in done:
            with open(os.path.join(tmp, name), encoding="utf-8") as fh:
                entries.append(json.load(fh))
            os.remove(os.path.join(tmp, name))
        return self._commit_safely(step, tmp, entries, reason)

    # -- the commit (rank 0) -----------------------------------------------------------------
    def _commit_safely(self, step, tmp, entries, reason) -> Optional[SaveFailed]:
        try:
            self._commit(step, tmp, entries, reason)
        except Exception as err:
            try:
                F.remove_tree(tmp)
            except OSError:
                pass
            return _describe_failure(err, step)
        try:
            self._retire(step)
        except OSError as err:  # committed all the same: older ones stay for now
            print(f"hpcps: warning: could not delete old checkpoints in {self.dir}: "
                  f"{err.strerror}", file=sys.stderr, flush=True)
        return None

    def _commit(self, step: int, tmp: str, entries: list, reason: dict) -> None:
        files, shards, workers = {}, [], []
        for e in entries:
            files.update(e["files"])
            shards += e["shards"]
            workers += e["workers"]
        shards.sort(key=lambda s: s["lo"])
        workers.sort(key=lambda w: w["index"])
        if (not shards or [s["lo"] for s in shards[1:]] != [s["hi"] for s in shards[:-1]]
                or shards[0]["lo"] != 0 or shards[-1]["hi"] != self.layout.total):
            raise RuntimeError(f"the saved shards {[(s['lo'], s['hi']) for s in shards]} do not "
                               f"tile [0, {self.layout.total})")
        manifest = new_manifest(
            step=step, reason=reason, mode=self.roles.mode, world_size=self.world_size,
            n_servers=self.roles.n_servers, n_workers=self.roles.n_workers, layout=self.layout,
            optimizer=optimizer_label(self.cfg), state_names=self.state_names, shards=shards,
            workers=workers, files=files, describe=self.describe, config=self.cfg.as_dict())
        F.commit(tmp, os.path.join(self.dir, F.step_dir_name(step)), manifest)

    def _retire(self, step: int) -> None:
        """Keep the newest ``checkpoint.keep``; drop newer steps of an abandoned timeline."""
        kept = []
        for s, path in committed(self.dir):
            if s > step:
                F.remove_tree(path)
            else:
                kept.append(path)
        for path in kept[:-self.cfg.checkpoint.keep]:
            F.remove_tree(path)
        F.fsync_dir(self.dir)
