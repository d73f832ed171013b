"""Which part of the input each rank of a parallel prepare tokenizes.

The inputs, in order, form one byte range ``[0, total)``. Rank r of N takes
``[cut(r * total // N), cut((r + 1) * total // N))`` where ``cut`` moves a position
forward to the next point where the input may be divided without changing a token:

* inside a text file: just before a ``\\n`` that follows an ASCII letter or digit
  (no tokenizer of hpcps joins tokens across it; see ``hpcps.data.encode``), if the
  tokenizer allows cuts at all;
* inside a JSON Lines file: at the start of a line;
* inside a Parquet file: at a row group (row group i nominally starts at byte
  ``size * i // n_groups``);
* anything else (gzip, JSON arrays, Arrow streams): at the end of the file.

Every rank computes every cut the same way from the files alone, so the ranges
tile the input with no overlap and no gap, and concatenating the ranks' tokens in
rank order gives the one-process token stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hpcps.data.inputs import BLOCK_BYTES, Source, read_blocks
from hpcps.data.records import parquet_file, row_group_at

_ALNUM = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


@dataclass(frozen=True)
class Unit:
    """Bytes ``[start, stop)`` of source ``index``: the piece one rank reads."""
    index: int
    start: int
    stop: int
    n_bytes_source: int

    @property
    def first(self) -> bool:            # holds the beginning of the file
        return self.start == 0

    @property
    def last(self) -> bool:             # holds the end of the file (a text document ends)
        return self.stop == self.n_bytes_source

    @property
    def whole(self) -> bool:
        return self.first and self.last


def whole_units(sources: list) -> list:
    """One unit per source: the one-process plan."""
    return [Unit(i, 0, s.n_bytes, s.n_bytes) for i, s in enumerate(sources)]


def _next_text_cut(path: str, offset: int) -> Optional[int]:
    """Offset of the first ``\n`` at or after ``offset`` that follows an ASCII letter or digit."""
    base = offset - 1                   # file offset of data[0]; data[0] is the byte before
    data = b""
    for block in read_blocks(path, BLOCK_BYTES, start=offset - 1):
        data = data[-1:] + block if data else block
        at = data.find(b"\n", 1)
        while at >= 0:
            if data[at - 1] in _ALNUM:
                return base + at
            at = data.find(b"\n", at + 1)
        base += len(data) - 1
    return None


def _next_line_start(path: str, offset: int, size: int) -> Optional[int]:
    """Offset just after the first ``\n`` at or after ``offset - 1``; None past the end."""
    base = offset - 1
    for block in read_blocks(path, BLOCK_BYTES, start=offset - 1):
        at = block.find(b"\n")
        if at >= 0:
            return base + at + 1 if base + at + 1 < size else None
        base += len(block)
    return None


def _cut_inside(source: Source, offset: int, text_cuts: bool) -> Optional[int]:
    """Where a cut asked at ``offset`` (0 < offset < size) falls; None: the file's end."""
    if source.fmt == "text" and text_cuts:
        return _next_text_cut(source.path, offset)
    if source.fmt == "jsonl":
        return _next_line_start(source.path, offset, source.n_bytes)
    if source.fmt == "parquet":
        n_groups = parquet_file(source).metadata.num_row_groups
        group = row_group_at(source.n_bytes, n_groups, offset)
        return source.n_bytes * group // n_groups if group < n_groups else None
    return None


def _cut(sources: list, starts: list, position: int, text_cuts: bool) -> int:
    for source, start in zip(sources, starts):
        if start <= position < start + source.n_bytes:
            if position == start:
                return position
            inside = _cut_inside(source, position - start, text_cuts)
            return start + (source.n_bytes if inside is None else inside)
    return position                     # the end of the input


def rank_units(sources: list, n_ranks: int, rank: int, text_cuts: bool) -> list:
    """The units of ``rank``; ``text_cuts``: the tokenizer allows cutting text files."""
    starts, total = [], 0
    for source in sources:
        starts.append(total)
        total += source.n_bytes
    lo = _cut(sources, starts, total * rank // n_ranks, text_cuts)
    hi = _cut(sources, starts, total * (rank + 1) // n_ranks, text_cuts)
    units = []
    for i, (source, start) in enumerate(zip(sources, starts)):
        end = start + source.n_bytes
        if source.n_bytes == 0:
            # an empty file goes to the rank whose range holds its position (the last
            # rank for the end of the input), so document order is kept
            if lo <= start < hi or (start == total and rank == n_ranks - 1):
                units.append(Unit(i, 0, 0, 0))
        elif start < hi and end > lo:
            units.append(Unit(i, max(lo, start) - start, min(hi, end) - start, source.n_bytes))
    return units
