"""``hpcps prepare``: text files -> HDF5 token corpus, streaming.

Memory stays flat whatever the corpus size: files are read in 1 MiB blocks,
each block is tokenized with vectorized NumPy (or the tokenizers library) and
appended to the corpus in whole chunks. Passes per tokenizer:

* ``char``: 1) check UTF-8, collect the character set and count tokens;
  2) encode and write. The vocabulary is over the whole input (nanoGPT).
* ``byte``: one pass (the token count is the byte count).
* ``bpe``:  1) check UTF-8 and train; 2) encode into a scratch file next to the
  output (the token count is only known afterwards); 3) copy into the corpus.

Documents are concatenated in input order with nothing inserted between them.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from hpcps.data.default_corpus import DEFAULT_INPUT, NAME_PREFIX, default_corpus_files
from hpcps.data.progress import Progress
from hpcps.data.tokenizer import (DEFAULT_BPE_VOCAB, KINDS, MIN_BPE_VOCAB, BPETokenizer,
                                  ByteTokenizer, CharTokenizer, token_dtype_for)
from hpcps.errors import UserError

BLOCK_BYTES = 1 << 20          # read size; bounds the memory of every pass
SNIFF_BYTES = 8192             # a NUL byte in the first 8 KiB marks a binary file
BPE_PIECE_CHARS = 1 << 14      # text per BPE training item / encoder batch entry
COPY_TOKENS = 1 << 22          # scratch -> corpus copy block
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Source:
    path: str        # where to read it
    name: str        # what the /documents table calls it
    n_bytes: int


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

    def summary(self) -> str:
        rate = self.n_bytes / 2**20 / self.seconds if self.seconds > 0 else 0.0
        return (f"wrote {self.out}: {self.n_train:,} train + {self.n_val:,} val tokens, "
                f"{self.tokenizer} vocab {self.vocab_size} ({self.token_dtype}), "
                f"{self.n_documents} document(s), {self.n_bytes / 2**20:.1f} MiB in "
                f"{self.seconds:.1f} s ({rate:.1f} MiB/s)")


# -- checking arguments and finding inputs ---------------------------------------------


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


def _looks_binary(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return b"\0" in fh.read(SNIFF_BYTES)
    except OSError as err:
        raise UserError(f"cannot read input {path}: {err.strerror}") from None


def _directory_files(root: str, skipped: list) -> list[str]:
    """Text files under ``root``, recursive, sorted; hidden entries and binaries skipped."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith(".") or not os.path.isfile(path):
                continue
            if _looks_binary(path):
                skipped.append(path)
                continue
            found.append(path)
    # Sorted by path components: a.txt, b/1.txt, b/2.txt, z.md (not walk order).
    return sorted(found, key=lambda p: os.path.relpath(p, root).split(os.sep))


def _source(path: str, name: Optional[str] = None) -> Source:
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise UserError(f"cannot read input {path}: {err.strerror}") from None
    return Source(path=path, name=name or path, n_bytes=size)


def resolve_inputs(inputs: Sequence[str], default_corpus: bool = False) -> tuple[list, list]:
    """INPUT words -> (sources in order, skipped binary files)."""
    sources: list[Source] = []
    skipped: list[str] = []
    words = list(inputs) + ([DEFAULT_INPUT] if default_corpus else [])
    if not words:
        raise UserError("no INPUT given (files, directories, globs, or 'default')")
    for word in words:
        if word == DEFAULT_INPUT:
            sources += [_source(str(p), NAME_PREFIX + p.name) for p in default_corpus_files()]
        elif os.path.isdir(word):
            sources += [_source(p) for p in _directory_files(word, skipped)]
        elif os.path.isfile(word):
            sources.append(_source(word))
        elif any(c in word for c in _GLOB_CHARS):
            matches = sorted(glob.glob(word, recursive=True))
            if not matches:
                raise UserError(f"no files match {word!r}")
            for match in matches:
                if os.path.isdir(match):
                    sources += [_source(p) for p in _directory_files(match, skipped)]
                elif os.path.isfile(match):
                    sources.append(_source(match))
        elif os.path.exists(word):
            raise UserError(f"input {word} is not a regular file or directory")
        else:
            raise UserError(f"input path not found: {word}")
    if not sources:
        raise UserError(f"no input files found in: {' '.join(words)}")
    if sum(s.n_bytes for s in sources) == 0:
        raise UserError(f"no input text: all {len(sources)} input file(s) are empty")
    return sources, skipped


def split_point(n_tokens: int, val_fraction: float) -> int:
    """nanoGPT's split: train = the first int(n * (1 - F)) tokens."""
    at = int(n_tokens * (1.0 - val_fraction))
    if at <= 0 or at >= n_tokens:
        empty = "train" if at <= 0 else "val"
        raise UserError(f"the corpus has only {n_tokens} token(s): with --val-fraction "
                        f"{val_fraction} the {empty} split would be empty")
    return at


# -- reading -------------------------------------------------------------------------------


def read_blocks(path: str, block_bytes: Optional[int] = None) -> Iterator[bytes]:
    block_bytes = block_bytes or BLOCK_BYTES
    try:
        with open(path, "rb") as fh:
            while True:
                block = fh.read(block_bytes)
                if not block:
                    return
                yield block
    except OSError as err:
        raise UserError(f"cannot read input {path}: {err.strerror}") from None


def _complete_utf8(data: bytes) -> int:
    """Length of ``data`` without a trailing, possibly incomplete UTF-8 sequence."""
    i = len(data) - 1
    while i >= 0 and i >= len(data) - 4 and data[i] & 0xC0 == 0x80:
        i -= 1
    if i < 0 or data[i] & 0xC0 == 0x80:
        return len(data)                # not a tail problem: let decode report it
    lead = data[i]
    need = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return len(data) if len(data) - i >= need else i


def utf8_blocks(source: Source, block_bytes: Optional[int] = None) -> Iterator[tuple[bytes, str]]:
    """(raw block, text of the complete characters so far); UserError names the
    file and byte offset of the first invalid byte."""
    pending = b""
    offset = 0                       # file offset of pending[0]
    for raw in read_blocks(source.path, block_bytes):
        data = pending + raw if pending else raw
        cut = _complete_utf8(data)
        text = _decode(source, data[:cut], offset)
        pending = data[cut:]
        offset += cut
        yield raw, text
    if pending:
        _decode(source, pending, offset, final=True)


def _decode(source: Source, data: bytes, offset: int, final: bool = False) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        at = offset + err.start
        what = f"byte 0x{data[err.start]:02x} at byte offset {at}"
        if final and err.end == len(data):
            what = f"incomplete character at byte offset {at} (end of file)"
        raise UserError(f"input {source.name} is not valid UTF-8: {what} "
                        f"(use --tokenizer byte for binary or non-UTF-8 input)") from None


# -- the tokenizer pipelines -------------------------------------------------------------


def _char_scan(sources: list, total: int, quiet: bool) -> tuple[str, list]:
    """Pass 1 for char: the sorted character set and each document's length."""
    seen = np.zeros(0x110000, dtype=bool)
    counts = []
    with Progress(total, "prepare 1/2 scan", quiet) as progress:
        for src in sources:
            n = 0
            for raw, text in utf8_blocks(src):
                if text.isascii():
                    seen[np.frombuffer(text.encode("ascii"), np.uint8)] = True
                else:
                    seen[np.frombuffer(text.encode("utf-32-le"), "<u4")] = True
                n += len(text)
                progress.update(len(raw))
            counts.append(n)
    vocab = "".join(map(chr, np.flatnonzero(seen).tolist()))
    return vocab, counts


def _write_documents(writer, sources: list, counts: list, hashes: list) -> None:
    start = 0
    for src, n, digest in zip(sources, counts, hashes):
        writer.add_document(src.name, digest, src.n_bytes, start, start + n)
        start += n


def _prepare_char(sources, out, val_fraction, total, quiet, attrs):
    from hpcps.data.corpus import CorpusWriter
    vocab, counts = _char_scan(sources, total, quiet)
    tok = CharTokenizer(vocab)
    dtype = token_dtype_for(tok.vocab_size)
    n = sum(counts)
    hashes = []
    with CorpusWriter(out, tok, n, split_point(n, val_fraction), attrs) as writer, \
            Progress(total, "prepare 2/2 encode", quiet) as progress:
        for src in sources:
            sha = hashlib.sha256()
            for raw, text in utf8_blocks(src):
                sha.update(raw)
                writer.write(tok.encode(text, dtype))
                progress.update(len(raw))
            hashes.append(sha.hexdigest())
        _write_documents(writer, sources, counts, hashes)
        writer.commit()
    return tok, writer


def _prepare_byte(sources, out, val_fraction, total, quiet, attrs):
    from hpcps.data.corpus import CorpusWriter
    tok = ByteTokenizer()
    dtype = token_dtype_for(tok.vocab_size)
    counts, hashes = [], []
    with CorpusWriter(out, tok, total, split_point(total, val_fraction), attrs) as writer, \
            Progress(total, "prepare encode", quiet) as progress:
        for src in sources:
            sha = hashlib.sha256()
            n = 0
            for raw in read_blocks(src.path):
                sha.update(raw)
                writer.write(ByteTokenizer.encode_bytes(raw, dtype))
                n += len(raw)
                progress.update(len(raw))
            if n != src.n_bytes:
                raise UserError(f"input {src.name} changed size while it was being prepared")
            counts.append(n)
            hashes.append(sha.hexdigest())
        _write_documents(writer, sources, counts, hashes)
        writer.commit()
    return tok, writer


def _safe_cut(text: str, lo: int, hi: int) -> int:
    """A cut in ``text[lo:hi]`` where byte-level BPE pre-tokenizes both sides
    exactly as the whole text: just before a newline (else a space) that follows
    a non-space character. Pre-tokens never end in whitespace after a word, and
    the regex only looks ahead, so such a cut changes no token. Returns ``lo``
    if there is none."""
    for sep in ("\n", " "):
        idx = text.rfind(sep, lo + 1, hi)
        while idx > lo and text[idx - 1].isspace():
            idx = text.rfind(sep, lo + 1, idx)
        if idx > lo:
            return idx
    return lo


def _bpe_pieces(text: str) -> tuple[list, str]:
    """Split into pieces of at most BPE_PIECE_CHARS at safe cuts; returns
    (pieces, carry) where carry is the tail after the last safe cut."""
    pieces, start = [], 0
    while len(text) - start > BPE_PIECE_CHARS:
        cut = _safe_cut(text, start, start + BPE_PIECE_CHARS)
        if cut == start:                # one very long line: cut anyway (still decodes exactly)
            cut = start + BPE_PIECE_CHARS
        pieces.append(text[start:cut])
        start = cut
    cut = _safe_cut(text, start, len(text))
    if cut > start:
        pieces.append(text[start:cut])
    return pieces, text[cut:]


def _bpe_blocks(src: Source) -> Iterator[tuple[bytes, list]]:
    """(raw block, text pieces) of one document. Small pieces keep the library's
    training buffer small (it holds a number of pieces, whatever their size)."""
    carry = ""
    for raw, text in utf8_blocks(src):
        pieces, carry = _bpe_pieces(carry + text)
        yield raw, pieces
    if carry:
        yield b"", [carry]


def _prepare_bpe(sources, out, val_fraction, total, quiet, attrs, vocab_size):
    from hpcps.data.corpus import CorpusWriter

    def training_texts() -> Iterator[str]:
        for src in sources:
            for raw, pieces in _bpe_blocks(src):
                yield from pieces
                progress.update(len(raw))

    with Progress(total, "prepare 1/3 train bpe", quiet) as progress:
        tok = BPETokenizer.train(training_texts(), vocab_size)
    dtype = token_dtype_for(tok.vocab_size)
    scratch = out + ".tokens.tmp"
    counts, hashes = [], []
    try:
        with open(scratch, "wb") as fh, Progress(total, "prepare 2/3 encode", quiet) as progress:
            for src in sources:
                sha, n = hashlib.sha256(), 0
                for raw, pieces in _bpe_blocks(src):
                    sha.update(raw)
                    ids = tok.encode_many(pieces, dtype)
                    ids.tofile(fh)
                    n += len(ids)
                    progress.update(len(raw))
                counts.append(n)
                hashes.append(sha.hexdigest())
        n_tokens = sum(counts)
        with CorpusWriter(out, tok, n_tokens, split_point(n_tokens, val_fraction), attrs) \
                as writer, open(scratch, "rb") as fh:
            for _ in range(0, n_tokens, COPY_TOKENS):
                writer.write(np.fromfile(fh, dtype=dtype, count=COPY_TOKENS))
            _write_documents(writer, sources, counts, hashes)
            writer.commit()
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)
    return tok, writer


def prepare(inputs: Sequence[str], out: str, tokenizer: str = "char",
            vocab_size: Optional[int] = None, val_fraction: float = 0.1,
            overwrite: bool = False, quiet: bool = False,
            default_corpus: bool = False) -> PrepareResult:
    """Build the corpus ``out`` from ``inputs``. Every check on the arguments and
    the output path runs before any input is read."""
    started = time.monotonic()
    bpe_vocab = check_options(tokenizer, vocab_size, val_fraction)
    check_output(out, overwrite)
    sources, skipped = resolve_inputs(inputs, default_corpus)
    if skipped and not quiet:
        print(f"prepare: skipped {len(skipped)} binary file(s), e.g. {skipped[0]}",
              file=sys.stderr)
    total = sum(s.n_bytes for s in sources)
    attrs = {"val_fraction": float(val_fraction), "source_bytes": total,
             "n_documents": len(sources)}
    if tokenizer == "char":
        tok, writer = _prepare_char(sources, out, val_fraction, total, quiet, attrs)
    elif tokenizer == "byte":
        tok, writer = _prepare_byte(sources, out, val_fraction, total, quiet, attrs)
    else:
        tok, writer = _prepare_bpe(sources, out, val_fraction, total, quiet, attrs, bpe_vocab)
    return PrepareResult(out=out, tokenizer=tok.kind, vocab_size=tok.vocab_size,
                         token_dtype=writer.dtype.name, n_train=writer.split_at,
                         n_val=writer.n_tokens - writer.split_at, n_documents=len(sources),
                         n_bytes=total, seconds=time.monotonic() - started, skipped=skipped)

