"""``hpcps prepare``: text and record files -> HDF5 token corpus, streaming.

Memory stays flat whatever the corpus size: inputs are read in 1 MiB blocks or one
record at a time (``hpcps.data.inputs``, ``hpcps.data.records``), encoded by
``hpcps.data.encode`` and appended to the corpus in whole chunks. Passes:

* ``char``: 1) check UTF-8, collect the character set and count tokens;
  2) encode and write. The vocabulary is over the whole input (nanoGPT).
* ``byte``: one pass for text files (the token count is the byte count).
* ``bpe``: 1) train; 2) encode.
* pretrained (``--tokenizer-file``, ``--tiktoken``): encode only.

When the token count is not known before encoding (bpe, pretrained, byte over
records), tokens go to a scratch file next to the output first and are then
copied into the corpus. ``hpcps.data.prepare_mpi`` runs the same passes on many MPI
ranks, each over its own part of the input.

Documents are concatenated in input order. A plain-text corpus with a built-in
tokenizer has nothing between documents (nanoGPT's layout); a corpus with record
inputs or a pretrained tokenizer ends every document with the end-of-text id.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from hpcps.data.corpus import CorpusWriter
from hpcps.data.encode import DocumentEncoder, encode_unit, scan_chars, training_texts
from hpcps.data.inputs import Source, resolve_inputs, utf8_blocks  # noqa: F401 - re-exported API
from hpcps.data.plan import whole_units
from hpcps.data.pretrained import load_tiktoken, load_tokenizer_file
from hpcps.data.progress import Progress
from hpcps.data.shards import corpus_documents, parts_dir
from hpcps.data.tokenizer import (
    DEFAULT_BPE_VOCAB,
    EOT_TEXT,
    KINDS,
    MIN_BPE_VOCAB,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    token_dtype_for,
)
from hpcps.errors import UserError
from hpcps.runtime.files import check_writable

COPY_TOKENS = 1 << 22          # scratch -> corpus copy block
DEFAULT_TEXT_FIELD = "text"


@dataclass
class PrepareResult:
    out: str
    tokenizer: str
    vocab_size: int
    token_dtype: str
    n_train: int
    n_val: int
    n_documents: int
    n_bytes: int
    seconds: float
    skipped: list
    n_ranks: int = 1

    def summary(self) -> str:
        rate = self.n_bytes / 2**20 / self.seconds if self.seconds > 0 else 0.0
        ranks = f" on {self.n_ranks} ranks" if self.n_ranks > 1 else ""
        return (f"wrote {self.out}: {self.n_train:,} train + {self.n_val:,} val tokens, "
                f"{self.tokenizer} vocab {self.vocab_size} ({self.token_dtype}), "
                f"{self.n_documents} document(s), {self.n_bytes / 2**20:.1f} MiB in "
                f"{self.seconds:.1f} s ({rate:.1f} MiB/s){ranks}")


@dataclass
class Job:
    """Everything the passes need, the same on every rank."""
    sources: list
    out: str
    kind: str                   # char, byte, bpe, hf, tiktoken
    val_fraction: float
    text_field: str
    eot: bool                   # every document ends with the end-of-text id
    quiet: bool
    bpe_vocab: int = 0
    pretrained: object = None   # the loaded hf / tiktoken tokenizer
    attrs: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(s.n_bytes for s in self.sources)

    @property
    def has_records(self) -> bool:
        return any(s.is_records for s in self.sources)


# -- checking arguments ------------------------------------------------------------------


def check_options(tokenizer: str, vocab_size: Optional[int], val_fraction: float) -> int:
    """Validate the options; return the BPE vocabulary size (0 for char/byte)."""
    if tokenizer not in KINDS:
        raise UserError(f"unknown tokenizer {tokenizer!r} (choose from {', '.join(KINDS)})")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if tokenizer != "bpe":
        if vocab_size is not None:
            fixed = "is 256" if tokenizer == "byte" else "is the set of characters in the text"
            raise UserError(f"--vocab-size only applies to --tokenizer bpe (the {tokenizer} "
                            f"vocabulary {fixed})")
        return 0
    size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
    if size < MIN_BPE_VOCAB:
        raise UserError(f"--vocab-size must be at least {MIN_BPE_VOCAB} for byte-level bpe, "
                        f"got {size}")
    token_dtype_for(size)          # too large for uint32 -> UserError
    return size


def check_output(out: str, overwrite: bool) -> None:
    if os.path.isdir(out):
        raise UserError(f"output {out} is a directory")
    if os.path.exists(out) and not overwrite:
        raise UserError(f"output {out} exists (use --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"output directory {parent} does not exist")
    check_writable(out)


def load_pretrained(tokenizer: Optional[str], vocab_size: Optional[int],
                    tokenizer_file: Optional[str], tiktoken: Optional[str],
                    eot_token: Optional[str]):
    """The pretrained tokenizer the options name, or None."""
    chosen = [name for name, value in (("--tokenizer", tokenizer),
                                       ("--tokenizer-file", tokenizer_file),
                                       ("--tiktoken", tiktoken)) if value is not None]
    if len(chosen) > 1:
        raise UserError(f"give one of --tokenizer, --tokenizer-file, --tiktoken (got "
                        f"{' and '.join(chosen)})")
    if eot_token is not None and tokenizer_file is None:
        raise UserError("--eot-token only applies to --tokenizer-file (the built-in tokenizers "
                        f"use {EOT_TEXT}, tiktoken its own)")
    if tokenizer_file is None and tiktoken is None:
        return None
    if vocab_size is not None:
        raise UserError("--vocab-size does not apply to a pretrained tokenizer (its vocabulary "
                        "is fixed)")
    if tokenizer_file is not None:
        return load_tokenizer_file(tokenizer_file, eot_token)
    return load_tiktoken(tiktoken)


def split_point(n_tokens: int, val_fraction: float) -> int:
    """nanoGPT's split: train = the first int(n * (1 - F)) tokens."""
    at = int(n_tokens * (1.0 - val_fraction))
    if at <= 0 or at >= n_tokens:
        empty = "train" if at <= 0 else "val"
        raise UserError(f"the corpus has only {n_tokens} token(s): with --val-fraction "
                        f"{val_fraction} the {empty} split would be empty")
    return at


def make_job(inputs: Sequence[str], out: str, tokenizer: Optional[str], vocab_size: Optional[int],
             val_fraction: float, overwrite: bool, quiet: bool, default_corpus: bool,
             text_field: Optional[str], tokenizer_file: Optional[str], tiktoken: Optional[str],
             eot_token: Optional[str]) -> tuple[Job, list]:
    """Every check on the arguments, the output path and the tokenizer, then the inputs;
    returns the job and the skipped binary files."""
    pretrained = load_pretrained(tokenizer, vocab_size, tokenizer_file, tiktoken, eot_token)
    kind = pretrained.kind if pretrained is not None else (tokenizer or "char")
    bpe_vocab = 0
    if pretrained is None:
        bpe_vocab = check_options(kind, vocab_size, val_fraction)
    elif not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    check_output(out, overwrite)
    sources, skipped = resolve_inputs(inputs, default_corpus)
    has_records = any(s.is_records for s in sources)
    if text_field is not None and not has_records:
        raise UserError("--text-field only applies to JSON, Parquet and datasets inputs (the "
                        "inputs are all text files)")
    job = Job(sources=sources, out=out, kind=kind, val_fraction=val_fraction,
              text_field=text_field or DEFAULT_TEXT_FIELD, eot=has_records or pretrained is not None,
              quiet=quiet, bpe_vocab=bpe_vocab, pretrained=pretrained)
    job.attrs = {"val_fraction": float(val_fraction), "source_bytes": job.total,
                 "n_documents": len(sources)}
    if has_records:
        job.attrs["text_field"] = job.text_field
    return job, skipped


# -- the passes (shared with the parallel prepare) ---------------------------------------


def char_vocab(seen: np.ndarray) -> str:
    return "".join(map(chr, np.flatnonzero(seen).tolist()))


def train_bpe(job: Job, units: list, label: str):
    with Progress(job.total, label, job.quiet) as progress:
        return BPETokenizer.train(training_texts(job.sources, units, job.text_field, progress),
                                  job.bpe_vocab, EOT_TEXT if job.eot else None)


def encode_units(job: Job, units: list, tok, emit, progress) -> tuple[dict, dict]:
    """Encode ``units`` in order into ``emit``; returns (tokens per source, sha256 per
    source for the sources whose first byte is in ``units``)."""
    encoder = DocumentEncoder(tok, token_dtype_for(tok.vocab_size), job.eot)
    counts: dict = {}
    hashes: dict = {}
    for unit in units:
        n, digest = encode_unit(job.sources[unit.index], unit, encoder, job.text_field, emit,
                                progress)
        counts[unit.index] = counts.get(unit.index, 0) + n
        if digest is not None:
            hashes[unit.index] = digest
    return counts, hashes


def remove_stale_parts(out: str) -> None:
    """A one-file corpus replaced a parallel one: its parts folder is no longer used."""
    if os.path.isdir(parts_dir(out)):
        shutil.rmtree(parts_dir(out))


# -- one process -------------------------------------------------------------------------


def _write_known(job: Job, tok, n_tokens: int, units: list, label: str):
    """Encode straight into the corpus (the token count is known)."""
    with CorpusWriter(job.out, tok, n_tokens, split_point(n_tokens, job.val_fraction),
                      job.attrs) as writer, Progress(job.total, label, job.quiet) as progress:
        counts, hashes = encode_units(job, units, tok, writer.write, progress)
        writer.documents += corpus_documents(job.sources, counts, hashes)
        writer.commit()
    return writer


def _write_via_scratch(job: Job, tok, units: list, label: str):
    """Encode into a scratch file (the token count is only known afterwards), then copy."""
    dtype = token_dtype_for(tok.vocab_size)
    scratch = job.out + ".tokens.tmp"
    try:
        with open(scratch, "wb") as fh, Progress(job.total, label, job.quiet) as progress:
            counts, hashes = encode_units(job, units, tok, lambda ids: ids.tofile(fh), progress)
        n_tokens = sum(counts.values())
        with CorpusWriter(job.out, tok, n_tokens, split_point(n_tokens, job.val_fraction),
                          job.attrs) as writer, open(scratch, "rb") as fh:
            for _ in range(0, n_tokens, COPY_TOKENS):
                writer.write(np.fromfile(fh, dtype=dtype, count=COPY_TOKENS))
            writer.documents += corpus_documents(job.sources, counts, hashes)
            writer.commit()
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)
    return writer


def _run_one_process(job: Job):
    units = whole_units(job.sources)
    if job.kind == "char":
        with Progress(job.total, "prepare 1/2 scan", job.quiet) as progress:
            seen, counts = scan_chars(job.sources, units, job.text_field, progress, job.eot)
        tok = CharTokenizer(char_vocab(seen), EOT_TEXT if job.eot else None)
        return tok, _write_known(job, tok, sum(counts), units, "prepare 2/2 encode")
    if job.kind == "byte":
        tok = ByteTokenizer(EOT_TEXT if job.eot else None)
        if not job.has_records:
            return tok, _write_known(job, tok, job.total, units, "prepare encode")
        return tok, _write_via_scratch(job, tok, units, "prepare encode")
    if job.kind == "bpe":
        tok = train_bpe(job, units, "prepare 1/3 train bpe")
        return tok, _write_via_scratch(job, tok, units, "prepare 2/3 encode")
    return job.pretrained, _write_via_scratch(job, job.pretrained, units, "prepare encode")


def prepare(inputs: Sequence[str], out: str, tokenizer: Optional[str] = None,
            vocab_size: Optional[int] = None, val_fraction: float = 0.1,
            overwrite: bool = False, quiet: bool = False, default_corpus: bool = False,
            text_field: Optional[str] = None, tokenizer_file: Optional[str] = None,
            tiktoken: Optional[str] = None, eot_token: Optional[str] = None) -> PrepareResult:
    """Build the corpus ``out`` from ``inputs`` in this process (``tokenizer`` defaults
    to char; ``hpcps.data.prepare_mpi.prepare_parallel`` is the same on many ranks).
    Every check on the arguments and the output path runs before any input is read."""
    started = time.monotonic()
    job, skipped = make_job(inputs, out, tokenizer, vocab_size, val_fraction, overwrite, quiet,
                            default_corpus, text_field, tokenizer_file, tiktoken, eot_token)
    report_skipped(skipped, quiet)
    tok, writer = _run_one_process(job)
    remove_stale_parts(out)
    return PrepareResult(out=out, tokenizer=tok.kind, vocab_size=tok.vocab_size,
                         token_dtype=writer.dtype.name, n_train=writer.split_at,
                         n_val=writer.n_tokens - writer.split_at, n_documents=len(job.sources),
                         n_bytes=job.total, seconds=time.monotonic() - started, skipped=skipped)


def report_skipped(skipped: list, quiet: bool) -> None:
    if skipped and not quiet:
        print(f"prepare: skipped {len(skipped)} binary file(s), e.g. {skipped[0]}",
              file=sys.stderr)
