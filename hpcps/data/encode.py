"""Turning units of input (``hpcps.data.plan``) into token ids, streaming.

A text file is one document, read in blocks; a record file holds one document per
record. ``DocumentEncoder`` encodes both with bounded memory:

* records are encoded whole (the library's own ids), a batch at a time, through
  the library's thread pool where it has one;
* a text file is encoded in pieces cut at safe points when the tokenizer allows it
  (``Tokenizer.cut_rule``): just before a space that follows a non-space character,
  or just before a newline that follows a letter or digit. The byte-level
  pre-tokenizers (GPT-2's regex, tiktoken's cl100k / o200k patterns) never join
  tokens across such a point and only look ahead, so the ids equal encoding the
  document whole. (A newline after punctuation is no such point: cl100k keeps
  ``".\\n"`` as one token.) A line of over ``PIECE_CHARS`` characters without any
  such point gets a forced cut, which still decodes exactly.

With ``eot`` every document ends with the tokenizer's end-of-text id.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Optional

import numpy as np

from hpcps.data.inputs import Source, decode_blocks, hash_file, read_blocks
from hpcps.data.plan import Unit
from hpcps.data.records import iter_records

PIECE_CHARS = 1 << 14          # text per BPE training item / encoder batch entry
RECORD_BATCH_CHARS = 1 << 20   # record text gathered before one batched encode


def _safe_cut(text: str, lo: int, hi: int) -> int:
    """The last safe cut in ``text[lo:hi]`` (see the module docstring): a newline after
    a letter or digit first, else a space after a non-space character. Returns ``lo``
    if there is none."""
    idx = text.rfind("\n", lo + 1, hi)
    while idx > lo and not text[idx - 1].isalnum():
        idx = text.rfind("\n", lo + 1, idx)
    if idx > lo:
        return idx
    idx = text.rfind(" ", lo + 1, hi)
    while idx > lo and text[idx - 1].isspace():
        idx = text.rfind(" ", lo + 1, idx)
    return idx if idx > lo else lo


def text_pieces(text: str) -> tuple[list, str]:
    """Split into pieces of at most PIECE_CHARS at safe cuts; returns (pieces, carry)
    where carry is the tail after the last safe cut."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = _safe_cut(text, start, start + PIECE_CHARS)
        if cut == start:                # one very long line: cut anyway (still decodes exactly)
            cut = start + PIECE_CHARS
        pieces.append(text[start:cut])
        start = cut
    cut = _safe_cut(text, start, len(text))
    if cut > start:
        pieces.append(text[start:cut])
    return pieces, text[cut:]


class DocumentEncoder:
    """Ids of documents as their text streams in (see the module docstring)."""

    def __init__(self, tokenizer, dtype, eot: bool):
        self.tok = tokenizer
        self.dtype = np.dtype(dtype)
        self.eot = np.array([tokenizer.eot_id] if eot else [], dtype=self.dtype)
        self.carry = ""                 # text not yet encoded (after the last safe cut)
        self.held: list = []            # cut_rule "none": the document so far

    def _concat(self, arrays: list) -> np.ndarray:
        return np.concatenate(arrays) if arrays else np.zeros(0, self.dtype)

    def text(self, text: str) -> np.ndarray:
        """Ids of the next part of a text document (some may wait for the next part)."""
        rule = self.tok.cut_rule
        if rule == "any":
            return self.tok.encode(text, self.dtype)
        if rule == "none":
            self.held.append(text)
            return np.zeros(0, self.dtype)
        pieces, self.carry = text_pieces(self.carry + text)
        return self._concat(self.tok.encode_batch(pieces, self.dtype))

    def raw(self, data: bytes) -> np.ndarray:
        """Byte tokenizer: the ids of raw bytes (any bytes, not only UTF-8)."""
        return np.frombuffer(data, np.uint8).astype(self.dtype)

    def end_part(self, document_ends: bool) -> np.ndarray:
        """Ids still held at the end of a unit, plus the end-of-text id if the document ends
        there. A unit ends inside a document only at a safe cut (``hpcps.data.plan``)."""
        rest = self.carry or "".join(self.held)
        self.carry, self.held = "", []
        ids = self.tok.encode(rest, self.dtype) if rest else np.zeros(0, self.dtype)
        return np.concatenate([ids, self.eot]) if document_ends else ids

    def documents(self, texts: list) -> np.ndarray:
        """Ids of whole documents, each followed by the end-of-text id."""
        parts = []
        for ids in self.tok.encode_batch(texts, self.dtype):
            parts += [ids, self.eot]
        return self._concat(parts)


def unit_stream(source: Source, unit: Unit, field: str, raw: bool = False,
                sha=None) -> Iterator[tuple[int, object, bool]]:
    """(input bytes, text or raw bytes, is a whole document) over one unit: blocks of
    a text file (``raw``: undecoded, for the byte tokenizer), or one item per record.
    ``sha`` (text and JSON Lines only) is updated with the raw bytes as read."""
    if source.fmt == "text":
        blocks = read_blocks(source.path, start=unit.start, stop=unit.stop)
        if sha is not None:
            blocks = _hashed(blocks, sha)
        if raw:
            for block in blocks:
                yield len(block), block, False
        else:
            for block, text in decode_blocks(source.name, blocks, unit.start):
                yield len(block), text, False
        return
    for text, n_bytes in iter_records(source, field, unit.start, unit.stop):
        yield n_bytes, text, True


def _hashed(blocks, sha):
    for block in blocks:
        sha.update(block)
        yield block


def fused_hash(source: Source, unit: Unit):
    """A sha256 to feed while reading when this unit reads the whole file as raw
    blocks; None when the file is hashed separately (``source_hash``)."""
    return hashlib.sha256() if unit.whole and source.fmt == "text" else None


def source_hash(source: Source, unit: Unit, fused) -> Optional[str]:
    """The file's sha256 if this unit holds its start (the one place that hashes it)."""
    if fused is not None:
        return fused.hexdigest()
    return hash_file(source.path) if unit.first else None


def encode_unit(source: Source, unit: Unit, encoder: DocumentEncoder, field: str,
                emit: Callable[[np.ndarray], None], progress) -> tuple[int, Optional[str]]:
    """Encode one unit into ``emit``; returns (tokens emitted, the file's sha256 or None)."""
    sha = fused_hash(source, unit)
    raw = encoder.tok.kind == "byte" and source.fmt == "text"
    n = 0
    batch: list = []
    batch_chars = 0
    for n_bytes, item, whole in unit_stream(source, unit, field, raw, sha):
        if whole:
            batch.append(item)
            batch_chars += len(item)
            if batch_chars >= RECORD_BATCH_CHARS:
                ids = encoder.documents(batch)
                emit(ids)
                n += len(ids)
                batch, batch_chars = [], 0
        else:
            ids = encoder.raw(item) if raw else encoder.text(item)
            emit(ids)
            n += len(ids)
        progress.update(n_bytes)
    if batch:
        ids = encoder.documents(batch)
        emit(ids)
        n += len(ids)
    if source.fmt == "text":
        ids = encoder.end_part(document_ends=unit.last)
        emit(ids)
        n += len(ids)
    return n, source_hash(source, unit, sha)


def scan_chars(sources: list, units: list, field: str, progress, eot: bool) -> tuple[np.ndarray, list]:
    """Char pass 1 over ``units``: which code points occur (a bool table) and each unit's
    token count (characters, plus one end-of-text id per document with ``eot``)."""
    seen = np.zeros(0x110000, dtype=bool)
    counts = []
    for unit in units:
        source = sources[unit.index]
        n = 0
        for n_bytes, text, whole in unit_stream(source, unit, field):
            if text.isascii():
                seen[np.frombuffer(text.encode("ascii"), np.uint8)] = True
            else:
                seen[np.frombuffer(text.encode("utf-32-le", "surrogatepass"), "<u4")] = True
            n += len(text) + (eot and whole)
            progress.update(n_bytes)
        if eot and source.fmt == "text" and unit.last:
            n += 1
        counts.append(n)
    return seen, counts


def training_texts(sources: list, units: list, field: str, progress) -> Iterator[str]:
    """BPE training input: pieces at safe cuts (the library's buffer holds a number of
    items whatever their size, so small items keep its memory small)."""
    for unit in units:
        source = sources[unit.index]
        carry = ""
        for n_bytes, text, whole in unit_stream(source, unit, field):
            pieces, rest = text_pieces(carry + text)
            yield from pieces
            if whole:
                if rest:
                    yield rest
                carry = ""
            else:
                carry = rest
            progress.update(n_bytes)
        if carry:
            yield carry
