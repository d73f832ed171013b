"""Named scratch buffers reused from one training step to the next.

Layers ask ``ws.get(name, shape, dtype)`` for their outputs and temporaries.
A reusing workspace hands back the same array every step (no allocation, warm
caches); ``Workspace(xp, reuse=False)`` allocates fresh arrays, which is what
one-off calls and tests use. Names must be unique per live tensor: a buffer
that a forward cache still needs must not be handed out again before backward.
By convention names starting with ``tmp.`` are scratch whose contents are dead
before the next request for the same name (e.g. a layer's temporaries), so all
layers of a model share one such buffer and it stays warm in cache.
"""

from __future__ import annotations

from typing import Callable, Optional


class Workspace:
    def __init__(self, xp, reuse: bool = True) -> None:
        self.xp = xp
        self.reuse = reuse
        self._buffers: dict = {}

    def get(self, name: str, shape: tuple, dtype):
        if not self.reuse:
            return self.xp.empty(shape, dtype=dtype)
        buf = self._buffers.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = self.xp.empty(shape, dtype=dtype)
            self._buffers[name] = buf
        return buf

    def constant(self, name: str, shape: tuple, dtype, init: Callable):
        """A buffer filled once by ``init(buf)`` and then reused as is (masks, ones vectors)."""
        buf = self._buffers.get(name) if self.reuse else None
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = self.get(name, shape, dtype)
            init(buf)
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())


def scratch(ws: Optional[Workspace], xp) -> Workspace:
    """The caller's workspace, or a throwaway one that allocates fresh arrays."""
    return ws if ws is not None else Workspace(xp, reuse=False)
