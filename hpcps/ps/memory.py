"""Bytes each rank of a parameter-server job will hold for the PS, computed from the config
and the layout alone (before any window exists: the start-up memory check, ``hpcps plan``).

A server shard of n elements holds its parameters (the params window), the optimizer
state (AdamW: two moments), the step's sum and the optimizer's scratch, its receive slots
(``ps.slots``: k in bsp, one per pusher otherwise; each a header and the largest encoded
push), and what its update
rule keeps (delay compensation's past versions, lookahead's private params). A worker holds
the pulled parameters and its gradients, error-feedback residuals when pushes are
compressed, and an encoded push per shard.
"""

from __future__ import annotations

from hpcps.ps.codec import ShardCodec
from hpcps.ps.options import landing_slots
from hpcps.ps.sharding import shard_ranges
from hpcps.ps.update_rules import rule_memory_bytes
from hpcps.ps.windows import slot_stride


def slot_strides(cfg, layout, n_servers: int) -> list[int]:
    """Bytes of one receive slot on each shard (header + the largest encoded push)."""
    return [slot_stride(ShardCodec(layout, lo, hi, cfg.ps.compression, cfg.ps.topk_ratio,
                                   cfg.ps.sparse_embedding).max_payload_bytes)
            for lo, hi in shard_ranges(layout.total, n_servers)]


def server_bytes(cfg, n: int, stride: int, n_workers: int, n_pushers: int, mode: str) -> dict:
    """{term: bytes} of a server shard of n elements."""
    state = 2 if cfg.train.optimizer == "adamw" else 1
    slots = landing_slots(cfg, mode, n_pushers)
    terms = {"parameters": 4 * n, "optimizer state": 4 * n * state,
             "step sum and scratch": 4 * n * 2, "receive slots": slots * stride}
    # a background checkpoint writes a private copy of params and state while training goes
    # on; a foreground one (and every final one) writes the shard's own arrays
    if cfg.checkpoint.every and cfg.checkpoint.background:
        terms["checkpoint snapshot"] = 4 * n * (1 + state)
    rule = rule_memory_bytes(cfg, n, n_workers)
    if mode == "bsp" and cfg.ps.backup_workers:
        rule += 4 * n    # the late pushes carried into the next step
    if rule:
        terms["update rule"] = rule
    return terms


def worker_bytes(cfg, total: int, strides: list[int]) -> dict:
    """{term: bytes} a worker holds for the PS besides its model (params + grads + pushes)."""
    feedback = cfg.ps.error_feedback and cfg.ps.compression != "none"
    terms = {"parameters + gradients": 8 * total, "push buffers": sum(strides)}
    if feedback:
        terms["error feedback"] = 8 * total
    if cfg.ps.local_steps:
        terms["local-steps replica"] = replica_bytes(cfg, total)
    return terms


def replica_bytes(cfg, total: int) -> int:
    """What local steps add to a worker (a node's leader with the hierarchy): the inner
    optimizer's state and scratch (AdamW: m, v, scratch; SGD: momentum, scratch), the
    round's anchor and, streaming, the fragment's delta; fp32 each."""
    inner = 3 if cfg.train.optimizer == "adamw" else 2
    streaming = 1 if cfg.ps.fragments > 1 else 0
    return 4 * total * (inner + 1 + streaming)


def shard_sizes(total: int, n_servers: int) -> list[int]:
    return [hi - lo for lo, hi in shard_ranges(total, n_servers)]
