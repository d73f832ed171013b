"""Fragments of the flat buffer for streaming local steps (``ps.fragments = F``).

Streaming DiLoCo (arXiv 2501.18512) syncs a model in pieces: F fragments of blocks take
turns, one every H / F inner steps, so each fragment still syncs every H steps but a
push or pull moves about 1/F of the model. Fragments are *strided*: block i (the
tensors named ``<prefix><i>.…``, e.g. ``h3.attn.qkv.w``, ``enc1.mlp.fc.w``) belongs to
fragment i mod F, in the order blocks appear in the layout; embeddings and other
tensors outside blocks belong to fragment 0.

Workers and servers derive the same fragments from the layout. A fragment push carries
only the fragment's elements of a shard, packed in layout order and encoded with the
shard's value encoding (``FragmentCodec``); a fragment pull reads only its ranges.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from hpcps.ps.codec import VALUE_CODECS, Int4Blocks

BLOCK_NAME = re.compile(r"^([A-Za-z_]+?)(\d+)\.")

Ranges = list[tuple[int, int]]


def block_of(name: str) -> Optional[str]:
    """The block a tensor belongs to (``h3`` for ``h3.attn.qkv.w``), or None."""
    match = BLOCK_NAME.match(name)
    return match.group(1) + match.group(2) if match else None


def count_blocks(layout) -> int:
    return len({b for b in (block_of(s.name) for s in layout.specs) if b is not None})


def fragment_ranges(layout, fragments: int) -> list[Ranges]:
    """For each fragment, its element ranges [lo, hi) in the flat buffer (merged where
    adjacent), in layout order. Raises ValueError when there are fewer blocks than
    fragments."""
    order: dict[str, int] = {}
    for spec in layout.specs:
        block = block_of(spec.name)
        if block is not None and block not in order:
            order[block] = len(order)
    if len(order) < fragments:
        raise ValueError(f"the model has {len(order)} blocks")
    out: list[Ranges] = [[] for _ in range(fragments)]
    for spec in layout.specs:
        block = block_of(spec.name)
        f = order[block] % fragments if block is not None else 0
        if out[f] and out[f][-1][1] == spec.offset:
            out[f][-1] = (out[f][-1][0], spec.end)
        else:
            out[f].append((spec.offset, spec.end))
    return out


def within(ranges: Ranges, lo: int, hi: int) -> Ranges:
    """The parts of ``ranges`` inside [lo, hi), relative to ``lo``."""
    return [(max(a, lo) - lo, min(b, hi) - lo) for a, b in ranges if a < hi and b > lo]


class FragmentCodec:
    """The push encoding of one fragment's part of one shard of n elements: the fragment's
    elements packed in order, then fp32 / fp16 / bf16 values or int4 blocks. ``encode``
    reads and ``decode_add`` writes shard-sized vectors (elements outside the fragment
    are neither sent nor touched), so error feedback works unchanged."""

    is_plain_dense = False

    def __init__(self, n: int, ranges: Ranges, compression: str):
        self.n, self.ranges = n, ranges
        self.count = sum(b - a for a, b in ranges)
        self.int4 = Int4Blocks(self.count) if compression == "int4" else None
        self.value = None if self.int4 is not None else VALUE_CODECS[compression]
        self.packed = np.empty(self.count, dtype=np.float32)

    @property
    def max_payload_bytes(self) -> int:
        return self.int4.nbytes if self.int4 is not None else self.count * self.value[0]

    def _pack(self, grad: np.ndarray) -> None:
        pos = 0
        for a, b in self.ranges:
            self.packed[pos:pos + b - a] = grad[a:b]
            pos += b - a

    def encode(self, grad: np.ndarray, out: np.ndarray, touched: Optional[dict] = None) -> int:
        self._pack(grad)
        if self.int4 is not None:
            return self.int4.encode(self.packed, out)
        width, enc, _, dtype = self.value
        nbytes = self.count * width
        out[:nbytes].view(dtype)[:] = enc(self.packed)
        return nbytes

    def decode_add(self, payload: np.ndarray, acc: np.ndarray, weight: float = 1.0) -> None:
        if self.int4 is not None:
            self.packed.fill(0.0)
            self.int4.decode_add(payload, self.packed, weight)
        else:
            width, _, dec, dtype = self.value
            self.packed[:] = dec(payload[:self.count * width].view(dtype))
            if weight != 1.0:
                self.packed *= np.float32(weight)
        pos = 0
        for a, b in self.ranges:
            acc[a:b] += self.packed[pos:pos + b - a]
            pos += b - a
