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
- ``int4``: the whole shard in blocks of 64 elements, ``float32 scale[blocks]``
  then two 4-bit codes per byte (see ``Int4Blocks``): 7.1x fewer bytes than
  fp32. Like top-k it ignores row lists: its block grid is fixed by the shard,
  so every push has the same size, and untouched rows cost half a byte each.

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


INT4_BLOCK = 64        # elements sharing one fp32 scale
INT4_LEVELS = 7        # codes -7..7 (symmetric: -8 is never used, so 0 stays exact)
INT4_CHUNK = 1 << 16   # elements per vectorized pass: bounds the temporaries on 100M shards
DECODE_CHUNK = 1 << 18  # elements decoded and added at a time (1 MiB of fp32)

# encodings over the whole shard: no sparse-row segments, one fixed layout per shard
WHOLE_SHARD = ("topk", "int4")


class Int4Blocks:
    """4-bit block quantization of n fp32 values (``ps.compression=int4``).

    Each block of 64 elements gets ``scale = absmax / 7`` and codes
    ``q = rint(x / scale)`` in -7..7 (round to nearest, ties to even), so a value
    is off by at most scale / 2. An all-zero block has scale 0 and decodes to 0.
    The payload is ``float32 scale[ceil(n / 64)]``, then ``ceil(n / 2)`` bytes
    with element 2i in the low and 2i + 1 in the high nibble (two's complement);
    an odd n leaves the last high nibble 0. A non-finite value makes its block's
    scale non-finite, so the whole block decodes non-finite: a NaN or inf reaches
    the params as it would in fp32 instead of as a silently wrong finite number.

    Blocks follow the shard, not the tensors: a block may hold the end of one
    tensor and the start of the next, and the smaller of the two is then coded
    coarsely (error feedback, on by default, carries what it lost to later pushes).
    Work goes in passes of ``INT4_CHUNK`` elements (a multiple of the block), so
    the temporaries stay a few hundred KB whatever the shard size."""

    def __init__(self, n: int):
        self.n = n
        self.blocks = -(-n // INT4_BLOCK)
        self.scale_bytes = 4 * self.blocks
        self.nbytes = self.scale_bytes + (n + 1) // 2

    def _chunks(self):
        """(start, stop) of each pass; every start is a block start (and even)."""
        return ((a, min(self.n, a + INT4_CHUNK)) for a in range(0, self.n, INT4_CHUNK))

    @staticmethod
    def _as_blocks(x: np.ndarray) -> np.ndarray:
        """``x`` as rows of one block each, zero-padded only where the last block is short."""
        if x.size % INT4_BLOCK:
            padded = np.zeros(-(-x.size // INT4_BLOCK) * INT4_BLOCK, dtype=np.float32)
            padded[:x.size] = x
            x = padded
        return x.reshape(-1, INT4_BLOCK)

    def encode(self, x: np.ndarray, out: np.ndarray) -> int:
        """Write the payload of fp32 ``x`` (length n) into the bytes ``out``; return its size."""
        scales = out[:self.scale_bytes].view(np.float32)
        codes = out[self.scale_bytes:self.nbytes]
        for a, b in self._chunks():
            rows = self._as_blocks(x[a:b])
            scale = np.abs(rows).max(axis=1) / np.float32(INT4_LEVELS)
            scales[a // INT4_BLOCK:a // INT4_BLOCK + len(scale)] = scale
            # a zero block divides by 1 (its values are all 0); NaN/inf only make garbage
            # codes in a block whose scale already decodes it non-finite
            divisor = np.where(scale > 0, scale, np.float32(1.0))[:, None]
            with np.errstate(invalid="ignore", divide="ignore"):
                q = np.rint(rows / divisor)
                np.clip(q, -INT4_LEVELS, INT4_LEVELS, out=q)
                q = q.astype(np.int8).reshape(-1)
            packed = (q[0::2] & np.int8(0x0F)) | (q[1::2] << np.int8(4))
            codes[a // 2:(b + 1) // 2] = packed.view(np.uint8)[:(b - a + 1) // 2]
        return self.nbytes

    def decode_add(self, payload: np.ndarray, acc: np.ndarray, weight: float) -> None:
        """acc += weight * decoded values, in fp32 (weight folded into the block scales)."""
        scales = payload[:self.scale_bytes].view(np.float32)
        codes = payload[self.scale_bytes:self.nbytes]
        for a, b in self._chunks():
            first_block = a // INT4_BLOCK
            scale = scales[first_block:first_block + -(-(b - a) // INT4_BLOCK)]
            if weight != 1.0:
                scale = scale * np.float32(weight)
            packed = np.zeros(len(scale) * INT4_BLOCK // 2, dtype=np.uint8)
            packed[:(b - a + 1) // 2] = codes[a // 2:(b + 1) // 2]
            signed = packed.view(np.int8)
            q = np.empty((len(packed), 2), dtype=np.int8)
            np.left_shift(signed, 4, out=q[:, 0])
            q[:, 0] >>= 4          # arithmetic shift: sign-extends the low nibble
            np.right_shift(signed, 4, out=q[:, 1])
            with np.errstate(invalid="ignore"):   # 0 x inf in a non-finite block: NaN, meant
                values = q.reshape(-1, INT4_BLOCK) * scale[:, None]   # fp32
            acc[a:b] += values.reshape(-1)[:b - a]


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
        self.int4 = Int4Blocks(self.n) if compression == "int4" else None
        self.segments: list[Segment] = []
        for spec, a, b in layout.overlapping(lo, hi):
            sparse = (sparse_rows and spec.sparse_rows and compression not in WHOLE_SHARD
                      and len(spec.shape) == 2)
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
        if self.int4 is not None:
            return self.int4.nbytes
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
        if self.int4 is not None:
            return self.int4.encode(grad, out)
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
        if self.int4 is not None:
            self.int4.decode_add(payload, acc, weight)
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
            # a chunk at a time: a weighted or decoded whole segment (a whole shard, say)
            # would be a temporary as large as the server's receive slot
            for a in range(0, count, DECODE_CHUNK):
                b = min(count, a + DECODE_CHUNK)
                values = dec(payload[pos + a * width:pos + b * width].view(dtype))
                if weight != 1.0:
                    acc[seg.lo + a:seg.lo + b] += values * w
                else:
                    acc[seg.lo + a:seg.lo + b] += values
            pos += count * width


class ErrorFeedback:
    """Worker-side residual for one shard: push ``C(g + r)``, keep ``r = g + r - C(g + r)``."""

    def __init__(self, codec: ShardCodec):
        self.codec = codec
        self.residual = np.zeros(codec.n, dtype=np.float32)
        self._decoded = np.zeros(codec.n, dtype=np.float32)

    def encode(self, grad: np.ndarray, out: np.ndarray, touched: dict | None = None,
               codec=None) -> int:
        """``codec``: this push's encoding of the shard when it is not the shard's own (a
        fragment push: elements outside the fragment keep their residual)."""
        codec = self.codec if codec is None else codec
        e = self.residual
        e += grad
        nbytes = codec.encode(e, out, touched)
        self._decoded.fill(0.0)
        codec.decode_add(out[:nbytes], self._decoded)
        e -= self._decoded
        return nbytes
