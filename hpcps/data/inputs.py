"""Finding ``prepare``'s inputs and reading text files in blocks.

An INPUT word is a file, a directory (recursive, sorted), a glob or ``default``.
A file's format comes from its name: ``.jsonl`` / ``.ndjson`` (JSON Lines),
``.jsonl.gz`` / ``.ndjson.gz``, ``.json`` (an array of objects, or JSON Lines),
``.parquet``, ``.arrow`` (an Arrow stream, as ``datasets`` writes); anything else
is text. A folder written by ``datasets.Dataset.save_to_disk`` (``state.json`` +
``dataset_info.json``) stands for its Arrow files. Text files are read in
``BLOCK_BYTES`` blocks, decoded incrementally so UTF-8 errors name the byte offset.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from hpcps.data.default_corpus import DEFAULT_INPUT, NAME_PREFIX, default_corpus_files
from hpcps.errors import UserError

BLOCK_BYTES = 1 << 20          # read size; bounds the memory of every pass
SNIFF_BYTES = 8192             # a NUL byte in the first 8 KiB marks a binary file
_GLOB_CHARS = "*?["
# name ending -> format; longest endings first so ".jsonl.gz" is not taken for text
_SUFFIXES = ((".jsonl.gz", "jsonl.gz"), (".ndjson.gz", "jsonl.gz"), (".jsonl", "jsonl"),
             (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet"),
             (".arrow", "arrow"))
RECORD_FORMATS = ("jsonl", "jsonl.gz", "json", "parquet", "arrow")
DATASET_STATE = "state.json"
DATASET_INFO = "dataset_info.json"
DATASET_DICT = "dataset_dict.json"


@dataclass(frozen=True)
class Source:
    path: str          # where to read it
    name: str          # what the /documents table and error messages call it
    n_bytes: int
    fmt: str = "text"  # "text" or one of RECORD_FORMATS

    @property
    def is_records(self) -> bool:
        return self.fmt != "text"


def format_of(path: str) -> str:
    lower = path.lower()
    for suffix, fmt in _SUFFIXES:
        if lower.endswith(suffix):
            return fmt
    return "text"


def _looks_binary(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return b"\0" in fh.read(SNIFF_BYTES)
    except OSError as err:
        raise UserError(f"cannot read input {path}: {err.strerror}") from None


def _source(path: str, name: Optional[str] = None, fmt: Optional[str] = None) -> Source:
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise UserError(f"cannot read input {path}: {err.strerror}") from None
    return Source(path=path, name=name or path, n_bytes=size, fmt=fmt or format_of(path))


def is_dataset_folder(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, DATASET_STATE))
            and os.path.isfile(os.path.join(path, DATASET_INFO)))


def dataset_sources(folder: str) -> list:
    """The Arrow files of a ``save_to_disk`` folder, in the order its state lists them."""
    state_path = os.path.join(folder, DATASET_STATE)
    try:
        with open(state_path, encoding="utf-8") as fh:
            state = json.load(fh)
        names = [entry["filename"] for entry in state["_data_files"]]
    except OSError as err:
        raise UserError(f"cannot read {state_path}: {err.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{state_path} is not a datasets state file (no _data_files list)") \
            from None
    sources = []
    for name in names:
        path = os.path.join(folder, str(name))
        if not os.path.isfile(path):
            raise UserError(f"datasets folder {folder} lists {name} but it is missing")
        sources.append(_source(path, fmt="arrow"))
    return sources


def _directory_sources(root: str, skipped: list) -> list:
    """Files under ``root``, recursive, sorted by path components; hidden entries and
    binary text files skipped; a datasets folder inside stands for its Arrow files."""
    found: list = []
    for dirpath, dirnames, filenames in os.walk(root):
        if is_dataset_folder(dirpath):
            found.append((dirpath, dataset_sources(dirpath)))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith(".") or not os.path.isfile(path):
                continue
            if format_of(path) == "text" and _looks_binary(path):
                skipped.append(path)
                continue
            found.append((path, [_source(path)]))
    # Sorted by path components: a.txt, b/1.txt, b/2.txt, z.md (not walk order).
    found.sort(key=lambda item: os.path.relpath(item[0], root).split(os.sep))
    return [src for _, group in found for src in group]


def _directory(path: str, skipped: list) -> list:
    if os.path.isfile(os.path.join(path, DATASET_DICT)):
        raise UserError(f"{path} is a datasets DatasetDict folder: give one of its splits "
                        f"(e.g. {os.path.join(path, 'train')})")
    if is_dataset_folder(path):
        return dataset_sources(path)
    return _directory_sources(path, skipped)


def resolve_inputs(inputs: Sequence[str], default_corpus: bool = False) -> tuple[list, list]:
    """INPUT words -> (sources in order, skipped binary files)."""
    sources: list = []
    skipped: list = []
    words = list(inputs) + ([DEFAULT_INPUT] if default_corpus else [])
    if not words:
        raise UserError("no INPUT given (files, directories, globs, or 'default')")
    for word in words:
        if word == DEFAULT_INPUT:
            sources += [_source(str(p), NAME_PREFIX + p.name) for p in default_corpus_files()]
        elif os.path.isdir(word):
            sources += _directory(word, skipped)
        elif os.path.isfile(word):
            sources.append(_source(word))
        elif any(c in word for c in _GLOB_CHARS):
            matches = sorted(glob.glob(word, recursive=True))
            if not matches:
                raise UserError(f"no files match {word!r}")
            for match in matches:
                if os.path.isdir(match):
                    sources += _directory(match, skipped)
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


# -- reading -------------------------------------------------------------------------------


def read_blocks(path: str, block_bytes: Optional[int] = None, start: int = 0,
                stop: Optional[int] = None) -> Iterator[bytes]:
    """Bytes ``[start, stop)`` of the file in blocks."""
    block_bytes = block_bytes or BLOCK_BYTES
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            left = None if stop is None else stop - start
            while left is None or left > 0:
                block = fh.read(block_bytes if left is None else min(block_bytes, left))
                if not block:
                    return
                if left is not None:
                    left -= len(block)
                yield block
    except OSError as err:
        raise UserError(f"cannot read input {path}: {err.strerror}") from None


def hash_file(path: str) -> str:
    """Hex sha256 of a whole file, read in blocks."""
    sha = hashlib.sha256()
    for block in read_blocks(path):
        sha.update(block)
    return sha.hexdigest()


def line_at(path: str, offset: int) -> int:
    """1-based number of the line holding byte ``offset``; only called to word an
    error, so a rank that starts mid-file need not count lines while it reads."""
    return 1 + sum(block.count(b"\n") for block in read_blocks(path, stop=offset))


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


def decode_blocks(name: str, blocks, offset: int = 0) -> Iterator[tuple[bytes, str]]:
    """(raw block, text of the complete characters so far) of byte blocks that start at
    file offset ``offset``; UserError names the file and byte offset of the first
    invalid byte."""
    pending = b""
    for raw in blocks:
        data = pending + raw if pending else raw
        cut = _complete_utf8(data)
        text = _decode(name, data[:cut], offset)
        pending = data[cut:]
        offset += cut
        yield raw, text
    if pending:
        _decode(name, pending, offset, final=True)


def utf8_blocks(source: Source, block_bytes: Optional[int] = None) -> Iterator[tuple[bytes, str]]:
    """``decode_blocks`` of a whole file."""
    return decode_blocks(source.name, read_blocks(source.path, block_bytes))


def _decode(name: str, data: bytes, offset: int, final: bool = False) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        at = offset + err.start
        what = f"byte 0x{data[err.start]:02x} at byte offset {at}"
        if final and err.end == len(data):
            what = f"incomplete character at byte offset {at} (end of file)"
        raise UserError(f"input {name} is not valid UTF-8: {what} "
                        f"(use --tokenizer byte for binary or non-UTF-8 input)") from None
