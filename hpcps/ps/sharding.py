"""Split the flat parameter buffer into S contiguous shards, one per server.

Shards are balanced by bytes: every element costs the same to store and to
update with AdamW (params + m + v + push slots are all per-element), so equal
element counts are equal memory and equal update time. Every element is owned
exactly once, also when S exceeds the number of tensors or P is odd.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hpcps.data.sampler import split_range


def shard_ranges(total: int, n_servers: int) -> list[tuple[int, int]]:
    if n_servers < 1:
        raise ValueError("need at least one server")
    return [split_range(total, n_servers, s) for s in range(n_servers)]


def reshard(pieces: Sequence[tuple[int, int, np.ndarray]],
            ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Rebuild arrays for new ``ranges`` from old pieces ``(lo, hi, values)`` that cover
    them exactly (elastic restart onto another server count)."""
    pieces = sorted(pieces, key=lambda p: p[0])
    out = []
    for lo, hi in ranges:
        buf = np.empty(hi - lo, dtype=pieces[0][2].dtype if pieces else np.float32)
        covered = 0
        for plo, phi, values in pieces:
            a, b = max(lo, plo), min(hi, phi)
            if a < b:
                buf[a - lo:b - lo] = values[a - plo:b - plo]
                covered += b - a
        if covered != hi - lo:
            raise ValueError(f"pieces cover {covered} of the {hi - lo} elements of [{lo}, {hi})")
        out.append(buf)
    return out
