"""Push encodings for one server shard ("incremental sync").

A shard ``[lo, hi)`` of the flat gradient is cut into segments: *dense* ranges
and *sparse-row* ranges (tensors whose gradient touches only the rows a batch
used, e.g. untied or skip-gram embeddings). Worker and server build the same
``ShardCodec`` from the layout, so the payload needs no self-description:

- ``none``: fp32 values; ``fp16`` (clamped to the fp16 range) and ``bf16``
  (round-to-nearest-even) halve the bytes. Sparse segments send
  ``int32 n_rows, int32 rows[n_rows]`` then the touched rows' values.
- ``topk``: the k = ceil(ratio * n) largest-magnitude elements of the whole
  shard as ``int32 idx[k], float32 val[k]`` (sparse rows are implied: untouched
  rows are zero and never selected).

Error feedback (the part compression dropped stays on the worker and is added
to the next push) is done by ``ErrorFeedback`` with ``encode`` + ``decode``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FP16_MAX = np.float32(65504.0)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    with np.errstate(over="ignore"):
        rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_fp16(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16)


VALUE_CODECS = {
    "none": (4, lambda x: np.ascontiguousarray(x, dtype=np.float32), lambda b: b, np.float32),
    "fp16": (2, to_fp16, lambda b: b.astype(np.float32), np.float16),
    "bf16": (2, to_bf16, from_bf16, np.uint16),
}


@dataclass(frozen=True)
class Segment:
    lo: int          # relative to the shard start
    hi: int
    tensor: str = ""  # set for sparse-row segments
    row_len: int = 0
    tensor_start: int = 0  # shard-relative position of the tensor's element 0 (may be < 0)


class ShardCodec:
    def __init__(self, layout, lo: int, hi: int, compression: str = "none",
                 topk_ratio: float = 0.01, sparse_rows: bool = True):
        self.lo, self.hi, self.n = lo, hi, hi - lo
        self.compression = compression
        self.k = max(1, math.ceil(topk_ratio * self.n)) if compression == "topk" else 0
        self.segments: list[Segment] = []
        for spec, a, b in layout.overlapping(lo, hi):
            sparse = sparse_rows and spec.sparse_rows and compression != "topk" and len(spec.shape) == 2
            if sparse:
                self.segments.append(Segment(a - lo, b - lo, spec.name, spec.shape[1], spec.offset - lo))
            elif self.segments and not self.segments[-1].tensor and self.segments[-1].hi == a - lo:
                last = self.segments[-1]
                self.segments[-1] = Segment(last.lo, b - lo)
            else:
                self.segments.append(Segment(a - lo, b - lo))
        self.has_sparse = any(s.tensor for s in self.segments)

    # -- sizes ---------------------------------------------------------------------
    @property
    def max_payload_bytes(self) -> int:
        if self.compression == "topk":
            return self.k * 8
        width = VALUE_CODECS[self.compression][0]
        extra = sum(4 + 4 * self._max_rows(s) for s in self.segments if s.tensor)
        return self.n * width + extra

    def _max_rows(self, seg: Segment) -> int:
        first = (seg.lo - seg.tensor_start) // seg.row_len
        last = (seg.hi - 1 - seg.tensor_start) // seg.row_len
        return last - first + 1

    @property
    def is_plain_dense(self) -> bool:
        """fp32 with no sparse segment: the payload IS the gradient slice (no encode copy)."""
        return self.compression == "none" and not self.has_sparse

    # -- sparse rows -> element positions -----------------------------------------
    def _row_elements(self, seg: Segment, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``seg`` that intersect it, and their shard-relative element positions."""
        first = (seg.lo - seg.tensor_start) // seg.row_len
        last = (seg.hi - 1 - seg.tensor_start) // seg.row_len
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[(rows >= first) & (rows <= last)]
        pos = seg.tensor_start + rows[:, None] * seg.row_len + np.arange(seg.row_len)[None, :]
        pos = pos.reshape(-1)
        pos = pos[(pos >= seg.lo) & (pos < seg.hi)]
        return rows.astype(np.int32), pos

    # -- encode / decode -----------------------------------------------------------
    def encode(self, grad: np.ndarray, out: np.ndarray, touched: dict | None = None) -> int:
        """Write the payload of shard gradient ``grad`` (fp32, length n) into the byte
        buffer ``out``; return the number of bytes used."""
        if self.compression == "topk":
            return self._encode_topk(grad, out)
        width, enc, _, dtype = VALUE_CODECS[self.compression]
        pos = 0
        for seg in self.segments:
            if seg.tensor and touched is not None and seg.tensor in touched:
                rows, elems = self._row_elements(seg, touched[seg.tensor])
                out[pos:pos + 4].view(np.int32)[0] = len(rows)
                pos += 4
                out[pos:pos + 4 * len(rows)].view(np.int32)[:] = rows
                pos += 4 * len(rows)
                values = grad[elems]
            else:
                if seg.tensor:  # no row list for this step: -1 = every row, dense
                    out[pos:pos + 4].view(np.int32)[0] = -1
                    pos += 4
                values = grad[seg.lo:seg.hi]
            nbytes = values.size * width
            out[pos:pos + nbytes].view(dtype)[:] = enc(values)
            pos += nbytes
        return pos

    def _encode_topk(self, grad: np.ndarray, out: np.ndarray) -> int:
        k = self.k
        if k >= self.n:
            idx = np.arange(self.n, dtype=np.int32)
        else:
            idx = np.argpartition(np.abs(grad), self.n - k)[self.n - k:].astype(np.int32)
            idx.sort()
        out[:4 * k].view(np.int32)[:len(idx)] = idx
        out[4 * k:8 * k].view(np.float32)[:len(idx)] = grad[idx]
        return 8 * k

    def decode_add(self, payload: np.ndarray, acc: np.ndarray, weight: float = 1.0) -> None:
        """acc += weight * decoded payload (payload: the bytes ``encode`` wrote)."""
        w = np.float32(weight)
        if self.compression == "topk":
            k = self.k
            idx = payload[:4 * k].view(np.int32)
            val = payload[4 * k:8 * k].view(np.float32)
            acc[idx] += w * val if weight != 1.0 else val  # indices are unique
            return
        width, _, dec, dtype = VALUE_CODECS[self.compression]
        pos = 0
        for seg in self.segments:
            if seg.tensor:
                n_rows = int(payload[pos:pos + 4].view(np.int32)[0])
                pos += 4
                if n_rows >= 0:
                    rows = payload[pos:pos + 4 * n_rows].view(np.int32)
                    pos += 4 * n_rows
                    _, elems = self._row_elements(seg, rows)
                    nbytes = elems.size * width
                    values = dec(payload[pos:pos + nbytes].view(dtype))
                    acc[elems] += values * w if weight != 1.0 else values
                    pos += nbytes
                    continue
            count = seg.hi - seg.lo
            nbytes = count * width
            values = dec(payload[pos:pos + nbytes].view(dtype))
            if weight != 1.0:
                acc[seg.lo:seg.hi] += values * w
            else:
                acc[seg.lo:seg.hi] += values
            pos += nbytes


class ErrorFeedback:
    """Worker-side residual for one shard: push ``C(g + r)``, keep ``r = g + r - C(g + r)``."""

    def __init__(self, codec: ShardCodec):
        self.codec = codec
        self.residual = np.zeros(codec.n, dtype=np.float32)
        self._decoded = np.zeros(codec.n, dtype=np.float32)

    def encode(self, grad: np.ndarray, out: np.ndarray, touched: dict | None = None) -> int:
        e = self.residual
        e += grad
        nbytes = self.codec.encode(e, out, touched)
        self._decoded.fill(0.0)
        self.codec.decode_add(out[:nbytes], self._decoded)
        e -= self._decoded
        return nbytes
