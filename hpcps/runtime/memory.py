"""What this process holds and what its node can still give (Linux, cgroup v1 and v2).

A job that asks for more memory than its node has is killed by the kernel's OOM killer,
mid-run and without a word from us; batch systems enforce their limit with a cgroup
(Slurm's ``--mem``), which ``MemAvailable`` does not see. So the memory a node can still
give is the smaller of ``MemAvailable`` and the room left under this process's cgroup
limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

UNLIMITED = 1 << 62


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's resident set now (0 where /proc is missing)."""
    return 1024 * (_status_kib("VmRSS") or 0)


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (``VmHWM``; 0 where /proc is missing)."""
    return 1024 * (_status_kib("VmHWM") or 0)


@dataclass(frozen=True)
class NodeMemory:
    available: int      # bytes the node can still give this job
    source: str         # where that number comes from, for the error line

    def describe(self) -> str:
        return f"{gib(self.available)} available ({self.source})"


def gib(n: float) -> str:
    """Bytes as a short human number (GiB, or MiB / TiB where that reads better)."""
    if abs(n) >= 2**40:
        return f"{n / 2**40:.1f} TiB"
    if abs(n) >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB"


def node_memory(root: str = "/") -> NodeMemory:
    """MemAvailable, or the room under this process's cgroup limit when that is smaller.
    ``root``: where /proc and /sys are found (tests point it at a fake tree)."""
    meminfo = _meminfo(os.path.join(root, "proc/meminfo"))
    available = meminfo.get("MemAvailable", meminfo.get("MemFree", UNLIMITED))
    source = "MemAvailable"
    room = _cgroup_room(root)
    if room is not None and room < available:
        available, source = room, "cgroup memory limit"
    return NodeMemory(max(0, available), source)


def _meminfo(path: str) -> dict:
    out = {}
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    return int(text)


def _cgroup_room(root: str) -> Optional[int]:
    """limit - usage of the tightest memory cgroup on this process's path (None: no limit)."""
    try:
        with open(os.path.join(root, "proc/self/cgroup"), encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    best: Optional[int] = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":                              # v2: one unified hierarchy
            base, limit_name, usage_name = "sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):           # v1: the memory controller
            base, limit_name = "sys/fs/cgroup/memory", "memory.limit_in_bytes"
            usage_name = "memory.usage_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):           # every ancestor's limit applies
            folder = os.path.join(root, base, *parts[:depth])
            limit = _read_int(os.path.join(folder, limit_name))
            if limit is None or limit >= UNLIMITED:
                continue
            usage = _read_int(os.path.join(folder, usage_name)) or 0
            usage -= _reclaimable(folder)
            room = max(0, limit - usage)
            best = room if best is None else min(best, room)
    return best


def _reclaimable(folder: str) -> int:
    """Page cache the kernel drops before it kills (counted in a cgroup's usage)."""
    stat = {}
    try:
        with open(os.path.join(folder, "memory.stat"), encoding="ascii") as fh:
            for line in fh:
                name, _, value = line.partition(" ")
                stat[name] = int(value) if value.strip().isdigit() else 0
    except OSError:
        return 0
    return stat.get("inactive_file", stat.get("total_inactive_file", 0))
