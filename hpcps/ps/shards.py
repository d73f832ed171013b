"""The shards of the flat buffer as every rank of a parameter-server job sees them.

Servers and workers build the same ``ShardSet`` from the config and the model's
layout (``open`` is collective: the windows are allocated over the world), so a
worker knows each shard's range and push encoding without asking anyone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hpcps.ps import control as C
from hpcps.ps.codec import ShardCodec
from hpcps.ps.fragments import FragmentCodec, fragment_ranges, within
from hpcps.ps.options import landing_slots, takes_turns
from hpcps.ps.ring import SlotRing
from hpcps.ps.roles import Roles
from hpcps.ps.sharding import shard_ranges
from hpcps.ps.windows import PSWindows
from hpcps.runtime.polled import PolledComm
from hpcps.runtime.wait import Every


@dataclass
class ShardSet:
    roles: Roles
    ranges: list[tuple[int, int]]   # [lo, hi) of shard s in the flat buffer
    codecs: list[ShardCodec]        # the push encoding of shard s
    wins: PSWindows
    # streaming local steps (ps.fragments > 1): each fragment's ranges in the flat buffer,
    # and per shard per fragment the encoding of a push of that fragment only
    fragments: Optional[list] = None
    fragment_codecs: Optional[list[list[FragmentCodec]]] = None
    # bsp without backup workers: the pushes of a step take turns in the slots (None: one
    # slot per pusher, each pusher's own)
    ring: Optional[SlotRing] = None

    @classmethod
    def open(cls, cfg, roles: Roles, layout) -> "ShardSet":
        """Collective over ``roles.comm``: shard the buffer and allocate the windows."""
        ranges = shard_ranges(layout.total, roles.n_servers)
        codecs = [ShardCodec(layout, lo, hi, cfg.ps.compression, cfg.ps.topk_ratio,
                             cfg.ps.sparse_embedding) for lo, hi in ranges]
        n_slots = landing_slots(cfg, roles.mode, roles.n_pushers)
        ring = SlotRing(n_slots, roles.n_pushers) if takes_turns(cfg, roles.mode) else None
        wins = PSWindows(roles.comm, roles, ranges, [c.max_payload_bytes for c in codecs],
                         n_slots)
        fragments = fragment_codecs = None
        if cfg.ps.local_steps and cfg.ps.fragments > 1:
            fragments = fragment_ranges(layout, cfg.ps.fragments)
            fragment_codecs = [[FragmentCodec(hi - lo, within(f, lo, hi), cfg.ps.compression)
                                for f in fragments] for lo, hi in ranges]
        return cls(roles, ranges, codecs, wins, fragments, fragment_codecs, ring)

    def own_fragments(self) -> Optional[list]:
        """This server's part of each fragment, shard-relative (None without fragments)."""
        if self.fragments is None:
            return None
        lo, hi = self.own_range
        return [within(f, lo, hi) for f in self.fragments]

    @property
    def own_range(self) -> tuple[int, int]:
        """The range of this server's shard."""
        return self.ranges[self.roles.server_index]

    def memory_bytes(self, cfg) -> int:
        """Resident bytes this rank holds for the parameter server (the start-up table)."""
        P = self.ranges[-1][1]
        if self.roles.is_server:
            lo, hi = self.own_range
            return server_memory_bytes(hi - lo, self.wins.n_slots,
                                       self.wins.strides[self.roles.server_index],
                                       cfg.train.optimizer)
        feedback = cfg.ps.error_feedback and cfg.ps.compression != "none"
        return P * 4 * (2 + (2 if feedback else 0)) + sum(self.wins.strides)

    def close(self) -> None:
        """Collective: every rank is done with the windows; servers check the guard bytes.

        Servers keep their heartbeat going while they wait here: after the last meeting a
        worker still pulls the final params (over a slow link with ``ps.link_gbps``: a
        124M model takes 40 s at 0.1 Gb/s) while its waits watch the servers, and must not
        take finished servers for dead ones. Every rank uses the same non-blocking barrier
        (a blocking one would not match it)."""
        beat = self._heartbeat() if self.roles.is_server else None
        PolledComm(self.roles.comm, beat).Barrier()
        if self.roles.is_server:
            damaged = self.wins.check_guards()
            if damaged:
                raise RuntimeError(f"window guard regions overwritten on server "
                                   f"{self.roles.server_index}: {', '.join(damaged)} (an RMA "
                                   "write went out of bounds)")
        self.wins.free()

    def _heartbeat(self):
        """A server's heartbeat alone (its event loop, with the full duties, is over)."""
        me, due = self.roles.world_rank, Every(0.2)

        def beat() -> None:
            if due.due():
                self.wins.add(me, C.HEARTBEAT, 1)
        return beat


def server_memory_bytes(n: int, n_slots: int, stride: int, optimizer: str) -> int:
    """Bytes a shard of n elements needs: params + optimizer state + scratch + slots + acc."""
    state = 2 if optimizer == "adamw" else 1
    return n * 4 * (1 + state + 1 + 1) + n_slots * stride
