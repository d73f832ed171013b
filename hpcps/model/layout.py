"""All parameters of a model live in ONE flat contiguous fp32 buffer; tensors are
named views into it. Gradients use a second buffer with the same layout.

The parameter server shards exactly this buffer: a server owns ``[lo, hi)`` of it,
so everything here (init, weight-decay mask, tensor lookup) works on any
contiguous slice, not only on whole tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

INIT_CHUNK = 1 << 20   # elements of a tensor's init stream drawn at a time


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple
    offset: int
    decay: bool            # decoupled weight decay applies (2-D weights only)
    init_std: float        # > 0: normal(0, init_std); 0: constant init_value
    init_value: float = 0.0
    sparse_rows: bool = False  # gradient rows are nonzero only for rows the batch touched

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def end(self) -> int:
        return self.offset + self.size


class ParamLayout:
    """Builder + lookup: ``add()`` tensors in a fixed order, then ``views(flat)``."""

    def __init__(self) -> None:
        self.specs: list[TensorSpec] = []
        self.total = 0
        self._by_name: dict[str, TensorSpec] = {}
        self._index: dict[str, int] = {}

    def add(self, name: str, shape: tuple, *, std: float = 0.0, value: float = 0.0,
            decay: Optional[bool] = None, sparse_rows: bool = False) -> TensorSpec:
        if name in self._by_name:
            raise ValueError(f"tensor {name} added twice")
        shape = tuple(int(s) for s in shape)
        spec = TensorSpec(name, shape, self.total, len(shape) >= 2 if decay is None else decay,
                          float(std), float(value), sparse_rows)
        self.specs.append(spec)
        self._by_name[name] = spec
        self._index[name] = len(self.specs) - 1
        self.total += spec.size
        return spec

    def __getitem__(self, name: str) -> TensorSpec:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def nbytes(self) -> int:
        return self.total * 4

    def new_buffer(self, xp=np, fill: float = 0.0):
        buf = xp.empty(self.total, dtype=xp.float32)
        buf.fill(fill)
        return buf

    def views(self, flat) -> dict:
        """name -> view of ``flat`` (numpy or cupy) with the tensor's shape; no copies."""
        if flat.shape != (self.total,):
            raise ValueError(f"flat buffer has shape {flat.shape}, layout needs ({self.total},)")
        return {s.name: flat[s.offset:s.end].reshape(s.shape) for s in self.specs}

    def overlapping(self, lo: int, hi: int) -> Iterator[tuple[TensorSpec, int, int]]:
        """Tensors meeting [lo, hi) with the overlap as absolute [a, b)."""
        for s in self.specs:
            a, b = max(lo, s.offset), min(hi, s.end)
            if a < b:
                yield s, a, b

    def decay_ranges(self, lo: int = 0, hi: Optional[int] = None) -> list[tuple[int, int]]:
        """Ranges inside [lo, hi) that get weight decay, relative to lo, merged."""
        hi = self.total if hi is None else hi
        out: list[tuple[int, int]] = []
        for s, a, b in self.overlapping(lo, hi):
            if not s.decay:
                continue
            if out and out[-1][1] == a - lo:
                out[-1] = (out[-1][0], b - lo)
            else:
                out.append((a - lo, b - lo))
        return out

    def decay_mask(self, lo: int = 0, hi: Optional[int] = None) -> np.ndarray:
        hi = self.total if hi is None else hi
        mask = np.zeros(hi - lo, dtype=bool)
        for a, b in self.decay_ranges(lo, hi):
            mask[a:b] = True
        return mask

    def init_slice(self, seed: int, lo: int = 0, hi: Optional[int] = None,
                   out: Optional[np.ndarray] = None) -> np.ndarray:
        """Initial values of [lo, hi): each tensor drawn from its own (seed, index) stream,
        so any shard can initialise its slice without the rest of the model. out: the
        (hi - lo,) float32 array to fill (e.g. a server's params window).

        A tensor's stream is drawn in chunks up to the slice's end (a stream gives the
        same numbers in pieces as in one draw), so memory stays O(slice + chunk) however
        large the tensor a shard cuts into."""
        hi = self.total if hi is None else hi
        out = np.empty(hi - lo, dtype=np.float32) if out is None else out
        for s, a, b in self.overlapping(lo, hi):
            if s.init_std > 0:
                rng = np.random.default_rng([seed, self._index[s.name]])
                pos = s.offset
                while pos < b:
                    chunk = rng.standard_normal(min(INIT_CHUNK, b - pos), dtype=np.float32)
                    first, last = max(a, pos), pos + chunk.size
                    if first < last:
                        piece = out[first - lo:last - lo]
                        np.multiply(chunk[first - pos:], np.float32(s.init_std), out=piece)
                    pos = last
            else:
                out[a - lo:b - lo] = s.init_value
        return out

    def describe(self) -> list[dict]:
        """JSON-able description (for checkpoint manifests and export)."""
        return [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "decay": s.decay}
                for s in self.specs]


GradReady = Callable[[int, int], None]


def grad_ready_notifier(ranges: list, on_grad_ready: Optional[GradReady]) -> Callable[[int], None]:
    """``notify(k)`` for a backward pass whose k-th finished range is ``ranges[k]``: tells
    ``on_grad_ready(lo, hi)`` (the push overlap), or nothing when no one listens."""
    if on_grad_ready is None:
        return lambda k: None
    return lambda k: on_grad_ready(*ranges[k])
