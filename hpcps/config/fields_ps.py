"""Config keys of the parameter server: roles, consistency, compression, failure detection."""

from typing import Optional

from hpcps.config.fields import AUTO, field, section


def _straggler_check(value: str) -> Optional[str]:
    if value == "":
        return None
    for part in value.split(","):
        rank, sep, factor = part.partition(":")
        try:
            ok = sep == ":" and int(rank) >= 0 and float(factor) >= 1.0
        except ValueError:
            ok = False
        if not ok:
            return f"expected 'RANK:FACTOR[,RANK:FACTOR...]' with FACTOR >= 1, got {value!r}"
    return None


# -- parameter server ------------------------------------------------------------------
section("ps", "Parameter server: roles, consistency, compression, failure detection.")
field("ps.mode", "str", "auto",
      "auto (single with 1 rank, else bsp), single, bsp, ssp, asp, allreduce.",
      choices=("auto", "single", "bsp", "ssp", "asp", "allreduce"))
field("ps.servers", "int_or_auto", AUTO,
      "Server shard ranks (auto: one per node, but no more servers than workers). Must leave at "
      "least one worker.", min=1)
field("ps.hierarchy", "str", "none",
      "node: the workers of a node reduce their gradients in shared memory and one leader per "
      "node pushes and pulls for them (cross-node bytes per step: nodes x P instead of workers "
      "x P); none: every worker pushes.", choices=("none", "node"))
field("ps.staleness", "int", 2, "SSP bound: a worker at clock c waits until min clock >= c - staleness.",
      min=0)
field("ps.compression", "str", "none", "Push encoding.", choices=("none", "fp16", "bf16", "topk"))
field("ps.topk_ratio", "float", 0.01, "Fraction of elements a top-k push keeps, in (0, 1].",
      min=0.0, max=1.0, min_exclusive=True)
field("ps.error_feedback", "bool", True,
      "Keep what compression dropped on the worker and add it to the next push.")
field("ps.sparse_embedding", "bool", True,
      "Push only the embedding rows a batch touched (untied or skip-gram embeddings).")
field("ps.overlap", "bool", True, "Push each bucket as soon as backward produced it.")
field("ps.heartbeat_timeout", "float", 30.0, "Seconds of silence before a rank is reported.",
      min=0.0, min_exclusive=True)
field("ps.dead_timeout", "float", 120.0,
      "Seconds of silence before bsp aborts naming the rank (asp/ssp drop the worker until it returns).",
      min=0.0, min_exclusive=True)
field("ps.straggler", "str", "", "Slow ranks down for experiments: 'RANK:FACTOR[,...]'.",
      check=_straggler_check)
