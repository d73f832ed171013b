"""Parallel ``hpcps prepare``: ``mpirun -n N python -m mpi4py -m hpcps prepare ...``.

Every rank checks the arguments and finds the inputs (the same on every rank), then
takes its own byte range of the input (``hpcps.data.plan``) and runs the one-process
passes on it:

* char: every rank scans its range; the character sets are OR-ed together;
* bpe: rank 0 trains on the whole input exactly as one process would, the others
  wait; the definition is broadcast;
* byte and pretrained tokenizers need no first pass;
* encode: every rank writes its tokens to its part file (``hpcps.data.shards``),
  rank 0 then writes the corpus file whose splits map the parts.

Ranks in rank order cover the input in order, so the token stream, the split
point and ``/documents`` equal the one-process corpus. Errors are agreed at the end
of every phase (one line from rank 0, exit 2 on every rank) and leave nothing
behind. Waiting ranks sleep instead of spinning in a blocking collective, and rank
0 draws one progress line for the whole job from the byte counts the other ranks
send it.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Optional, TypeVar

import numpy as np

from hpcps.data.encode import scan_chars
from hpcps.data.plan import rank_units, whole_units
from hpcps.data.prepare import (
    PrepareResult,
    char_vocab,
    encode_units,
    make_job,
    report_skipped,
    split_point,
    train_bpe,
)
from hpcps.data.progress import Progress
from hpcps.data.shards import (
    TMP_SUFFIX,
    PartWriter,
    corpus_documents,
    part_name,
    parts_dir,
    publish,
    split_stats,
    write_virtual_corpus,
)
from hpcps.data.tokenizer import (
    EOT_TEXT,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    token_dtype_for,
)
from hpcps.runtime.mpi import agree_on_errors, mpi

T = TypeVar("T")
POLL_SECONDS = 0.05           # how often a waiting rank looks whether the others are done
PUSH_SECONDS = 0.2            # how often a rank reports the bytes it has done
PROGRESS_TAG = 7411           # message tag of those reports


class SharedProgress:
    """One progress line for the whole job: every other rank sends rank 0 the bytes it
    has done (small non-blocking messages, so a rank never waits for rank 0, which is
    busy tokenizing too); rank 0 adds them up and draws ``Progress``. ``close`` is
    collective."""

    def __init__(self, comm, total: int, desc: str, quiet: bool):
        self.MPI = mpi()
        self.comm = comm
        self.rank = comm.Get_rank()
        self.progress = Progress(total, desc, quiet) if self.rank == 0 else None
        self.pending = 0
        self.last_push = time.monotonic()
        self.sends: list = []           # (request, buffer) not yet known to be sent
        self.finished = 0               # rank 0: ranks whose last message has arrived

    def update(self, n: float) -> None:
        self.pending += int(n)
        if time.monotonic() - self.last_push >= PUSH_SECONDS:
            self._push()
            self.poll()

    def _push(self, last: bool = False) -> None:
        self.last_push = time.monotonic()
        if self.rank == 0:
            self.progress.update(self.pending)
        elif self.pending or last:
            message = np.array([self.pending, int(last)], np.int64)
            self.sends.append((self.comm.Isend(message, dest=0, tag=PROGRESS_TAG), message))
            self.sends = [(req, buf) for req, buf in self.sends if not req.Test()]
        self.pending = 0

    def poll(self) -> None:
        """Rank 0: add the bytes that arrived and redraw the line."""
        if self.rank != 0:
            return
        status = self.MPI.Status()
        message = np.zeros(2, np.int64)
        while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=PROGRESS_TAG, status=status):
            self.comm.Recv(message, source=status.Get_source(), tag=PROGRESS_TAG)
            self.progress.update(int(message[0]))
            self.finished += int(message[1])

    def close(self, ok: bool) -> None:
        self._push(last=True)
        if self.rank != 0:
            self.MPI.Request.Waitall([req for req, _ in self.sends])
            return
        while self.finished < self.comm.Get_size() - 1:   # every rank's last message
            self.poll()
            time.sleep(POLL_SECONDS)
        if ok:
            self.progress.close()
        else:
            self.progress.abandon()


def _sleeping_barrier(comm, poll: Optional[Callable[[], None]] = None) -> None:
    """A barrier that sleeps while it waits (a blocking MPICH collective busy-polls
    and would take the core from a rank that still works)."""
    request = comm.Ibarrier()
    while not request.Test():
        if poll is not None:
            poll()
        time.sleep(POLL_SECONDS)


def _phase(comm, work: Callable[[], T], shared: Optional[SharedProgress] = None) -> T:
    """``work`` on every rank, then agreement on errors; ranks that finish early wait
    asleep (rank 0 keeps drawing the shared progress line)."""
    def run():
        try:
            return work()
        finally:
            _sleeping_barrier(comm, shared.poll if shared is not None else None)
    return agree_on_errors(comm, run)


def _shared_phase(comm, job, desc: str, work: Callable[[SharedProgress], T]) -> T:
    shared = SharedProgress(comm, job.total, desc, job.quiet)
    ok = False
    try:
        result = _phase(comm, lambda: work(shared), shared)
        ok = True
        return result
    finally:
        shared.close(ok)


def _tokenizer(comm, job, units: list) -> Tokenizer:
    """The first pass: the same tokenizer on every rank."""
    eot = EOT_TEXT if job.eot else None
    if job.kind == "char":
        seen, _ = _shared_phase(comm, job, "prepare 1/2 scan",
                                lambda shared: scan_chars(job.sources, units, job.text_field,
                                                          shared, job.eot))
        flags = seen.astype(np.uint8)
        comm.Allreduce(mpi().IN_PLACE, flags, op=mpi().MAX)
        return CharTokenizer(char_vocab(flags.astype(bool)), eot)
    if job.kind == "byte":
        return ByteTokenizer(eot)
    if job.kind == "bpe":
        # rank 0 trains on everything, in one-process order: the same merges
        spec = _phase(comm, lambda: train_bpe(job, whole_units(job.sources),
                                              "prepare 1/3 train bpe").to_json()
                      if comm.Get_rank() == 0 else None)
        return Tokenizer.from_json(comm.bcast(spec, root=0))
    return job.pretrained


def _encode(comm, job, units: list, tok: Tokenizer, tmp_parts: str, label: str):
    """Every rank encodes its units into its part file; returns (tokens, per-source counts,
    per-source digests) of this rank."""
    rank = comm.Get_rank()
    path = os.path.join(tmp_parts, part_name(rank))

    def work(shared):
        writer = PartWriter(path, token_dtype_for(tok.vocab_size))
        try:
            counts, hashes = encode_units(job, units, tok, writer.write, shared)
            n = writer.close()
        except BaseException:
            writer.abort()
            raise
        if n == 0:
            os.remove(path)             # nothing to map
        return (n, counts, hashes), writer
    return _shared_phase(comm, job, label, work)


def _assemble(job, tok: Tokenizer, gathered: list, tmp_parts: str,
              own: PartWriter) -> tuple[int, int]:
    """Rank 0: write the corpus file over the parts and put both in place; returns
    (train tokens, val tokens)."""
    counts = [n for n, _, _ in gathered]
    n_tokens = sum(counts)
    split_at = split_point(n_tokens, job.val_fraction)
    by_source: dict = {}
    hashes: dict = {}
    for _, rank_counts, rank_hashes in gathered:
        for i, n in rank_counts.items():
            by_source[i] = by_source.get(i, 0) + n
        hashes.update(rank_hashes)
    used = [(rank, n) for rank, n in enumerate(counts) if n]
    stats = split_stats([os.path.join(tmp_parts, part_name(r)) for r, _ in used],
                        [n for _, n in used], split_at, own if used and used[0][0] == 0 else None)
    rel = os.path.basename(parts_dir(job.out))
    tmp_file = job.out + TMP_SUFFIX
    attrs = {**job.attrs, "n_parts": len(used)}
    write_virtual_corpus(tmp_file, [f"{rel}/{part_name(r)}" for r, _ in used],
                         [n for _, n in used], tok, split_at, attrs,
                         corpus_documents(job.sources, by_source, hashes), stats)
    publish(job.out, tmp_file, tmp_parts)
    return split_at, n_tokens - split_at


def prepare_parallel(comm, inputs, out, tokenizer=None, vocab_size=None, val_fraction=0.1,
                     overwrite=False, quiet=False, default_corpus=False, text_field=None,
                     tokenizer_file=None, tiktoken=None, eot_token=None) -> PrepareResult:
    """``prepare`` on every rank of ``comm`` together (see the module docstring); every
    rank returns the result."""
    started = time.monotonic()
    rank, size = comm.Get_rank(), comm.Get_size()
    job, skipped = _phase(comm, lambda: make_job(
        inputs, out, tokenizer, vocab_size, val_fraction, overwrite, quiet, default_corpus,
        text_field, tokenizer_file, tiktoken, eot_token))
    job.quiet = quiet or rank != 0
    if rank == 0:
        report_skipped(skipped, quiet)
    text_cuts = job.pretrained is None or job.pretrained.cut_rule != "none"
    units = _phase(comm, lambda: rank_units(job.sources, size, rank, text_cuts))
    tok = _tokenizer(comm, job, units)
    tmp_parts = parts_dir(out) + TMP_SUFFIX
    published = False
    try:
        if rank == 0:
            shutil.rmtree(tmp_parts, ignore_errors=True)   # left by a killed run
            os.makedirs(tmp_parts)
        comm.Barrier()
        label = "prepare 2/2 encode" if job.kind == "char" else (
            "prepare 2/3 encode" if job.kind == "bpe" else "prepare encode")
        mine, writer = _encode(comm, job, units, tok, tmp_parts, label)
        gathered = comm.gather(mine, root=0)
        split = _phase(comm, lambda: _assemble(job, tok, gathered, tmp_parts, writer)
                       if rank == 0 else None)
        published = True
    finally:
        if rank == 0 and not published:
            shutil.rmtree(tmp_parts, ignore_errors=True)
            if os.path.exists(out + TMP_SUFFIX):
                os.remove(out + TMP_SUFFIX)
    n_train, n_val = comm.bcast(split, root=0)
    return PrepareResult(out=out, tokenizer=tok.kind, vocab_size=tok.vocab_size,
                         token_dtype=token_dtype_for(tok.vocab_size).name, n_train=n_train,
                         n_val=n_val, n_documents=len(job.sources), n_bytes=job.total,
                         seconds=time.monotonic() - started, skipped=skipped, n_ranks=size)
