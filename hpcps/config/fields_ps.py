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
field("ps.slots", "int_or_auto", AUTO,
      "Receive slots per server shard. bsp: the pushes of a step take turns in k slots in a "
      "fixed order and the server folds each into the step's sum as it lands, so a server holds "
      "(12 + 4 k) bytes per shard element however many workers push, and the result is the same "
      "for every k; auto: 2 (docs/memory.md: time per step vs memory). asp, ssp and bsp with "
      "ps.backup_workers keep one slot per pusher (auto). Never more than one per pusher.",
      min=1)
field("ps.staleness", "int", 2, "SSP bound: a worker at clock c waits until min clock >= c - staleness.",
      min=0)
field("ps.compression", "str", "none",
      "Push encoding: fp32 (none), fp16, bf16, top-k, or int4 (4-bit values with one fp32 scale "
      "per block of 64 elements: 7.1x fewer bytes than fp32; meant for local steps' deltas, "
      "with error feedback).",
      choices=("none", "fp16", "bf16", "topk", "int4"))
field("ps.topk_ratio", "float", 0.01, "Fraction of elements a top-k push keeps, in (0, 1].",
      min=0.0, max=1.0, min_exclusive=True)
field("ps.error_feedback", "bool", True,
      "Keep what compression dropped on the worker and add it to the next push.")
field("ps.sparse_embedding", "bool", True,
      "Push only the embedding rows a batch touched (untied or skip-gram embeddings).")
field("ps.overlap", "bool", True, "Push each bucket as soon as backward produced it.")
field("ps.read_your_writes", "bool", True,
      "asp/ssp: a worker's pull waits until the servers applied its previous push, so its next "
      "gradient is computed on params that include its own last update (costs up to one server "
      "update per push; without it val was 0.19 worse with lookahead on the nanoGPT config). "
      "false: pull at once.")
field("ps.heartbeat_timeout", "float", 30.0, "Seconds of silence before a rank is reported.",
      min=0.0, min_exclusive=True)
field("ps.dead_timeout", "float", 120.0,
      "Seconds of silence before bsp aborts naming the rank (asp/ssp drop the worker until it returns).",
      min=0.0, min_exclusive=True)
field("ps.straggler", "str", "", "Slow ranks down for experiments: 'RANK:FACTOR[,...]'.",
      check=_straggler_check)


def _pattern_check(value: str) -> Optional[str]:
    if value == "":
        return None
    kind, _, rest = value.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if kind == "random" and len(parts) == 1:
            ok = float(parts[0]) >= 1.0
        elif kind == "burst" and len(parts) == 2:
            ok = int(parts[0]) >= 1 and float(parts[1]) >= 1.0
        else:
            ok = False
    except ValueError:
        ok = False
    if not ok:
        return f"expected 'random:FACTOR' or 'burst:STEPS:FACTOR' with FACTOR >= 1, got {value!r}"
    return None


field("ps.straggler_pattern", "str", "",
      "Transient slowdowns for experiments: 'random:FACTOR' (at each of its steps a worker is "
      "FACTOR times slower when a seeded draw over the workers picks it: one slow worker per bsp "
      "step) or 'burst:STEPS:FACTOR' (the same draw once per block of STEPS steps). Multiplies "
      "with ps.straggler.", check=_pattern_check)
field("ps.balance", "str", "none",
      "bsp only. speed: split each step's global batch (train.batch_size x workers sequences) among "
      "the workers by their measured speed; the coordinator re-plans every ps.balance_every steps "
      "and keeps a split only if the measured step time says it is faster; the result still "
      "equals one process with the global batch. none: equal slices.",
      choices=("none", "speed"))
field("ps.balance_every", "int", 20,
      "Steps between two re-plans of the speed-balanced split once the search has settled "
      "(a trial of a new split measures 8 steps; a split's time is the median of its last 64 "
      "step times).", min=1)
field("ps.budget", "str", "auto",
      "asp/ssp: samples: the job trains on train.max_steps x workers x train.batch_size "
      "sequences in all, handed out batch by batch to whichever worker is free (fast workers take "
      "more; the learning-rate schedule follows the samples consumed); worker_steps: every worker "
      "runs train.max_steps steps of its own. auto: samples, but worker_steps with "
      "ps.hierarchy = node (a node's workers step together).",
      choices=("auto", "samples", "worker_steps"))
field("ps.delay_compensation", "str", "none",
      "asp/ssp (and bsp's late pushes with ps.backup_workers): how a server corrects a gradient "
      "computed on params tau updates old. dc: g + dc_lambda * g*g*(w - w_pulled) (DC-ASGD); "
      "gap: g divided elementwise by max(1, |w - w_pulled| / mean update size) (Gap-Aware); "
      "lr: learning rate / max(1, tau); lookahead: workers pull the params extrapolated "
      "along the last update by the mean staleness, w + tau * (w - w_previous), so gradients "
      "are computed near where they are applied (asp/ssp only); none.",
      choices=("none", "dc", "gap", "lr", "lookahead"))
field("ps.dc_lambda", "float", 2.0,
      "DC-ASGD's lambda, scaled per element by 1 / sqrt(v) of AdamW (adaptive DC-ASGD).",
      min=0.0)
field("ps.dc_versions", "int_or_auto", AUTO,
      "dc and gap: past parameter versions each server keeps to know what a push was computed on "
      "(auto: 2 x workers + 2); a push staler than that is compared with the oldest kept. Costs "
      "4 bytes x shard elements per version.", min=1)
field("ps.backup_workers", "int", 0,
      "bsp: apply step t once all but this many pushes of step t arrived; a late push is applied "
      "with the next step (staleness 1, no data dropped), and no worker may fall further behind.",
      min=0)

# -- local steps with an outer optimizer (DiLoCo family) ----------------------------------
field("ps.local_steps", "int", 0,
      "H: 0 keeps the server-side optimizer (a push per step). H >= 1: every worker (or node, "
      "with ps.hierarchy = node) steps its own replica with the train.* optimizer, schedule and "
      "clipping, and every H inner steps pushes the pseudo-gradient delta = params pulled - "
      "params now; the servers apply ps.outer_optimizer to the sample-weighted mean (bsp: "
      "synchronous rounds) or to each delta as it arrives (asp). A checkpoint, stop or the "
      "end also closes a round (keep checkpoint.every a multiple of H for rounds of H).",
      min=0)
field("ps.outer_optimizer", "str", "nesterov",
      "Local steps: the servers' optimizer on the pseudo-gradients. nesterov: SGD with "
      "Nesterov momentum (DiLoCo; asp: delayed Nesterov, see ps.outer_buffer); sgd: SGD with "
      "heavy-ball momentum ps.outer_momentum (0: plain; lr 1 and momentum 0 is parameter "
      "averaging).", choices=("nesterov", "sgd"))
field("ps.outer_lr", "float", 0.7,
      "Local steps: the outer learning rate (constant). DiLoCo used 0.7 with 8 workers and "
      "H = 500; see docs/benchmarks.md for this project's measurements.",
      min=0.0, min_exclusive=True)
field("ps.outer_momentum", "float", 0.9,
      "Local steps: the outer momentum. In asp the deltas are computed on params up to a group "
      "old and 0.9 costs val: 0.7 with ps.outer_lr 0.5 measured best (docs/benchmarks.md).",
      min=0.0, max=1.0,
      check=lambda v: None if v < 1.0 else "must be below 1")
field("ps.outer_buffer", "int_or_auto", AUTO,
      "Local steps in asp, nesterov: delayed Nesterov's N. Each delta is applied on arrival "
      "at outer_lr / N; the momentum moves once per N deltas with their mean, so N deltas "
      "together make exactly one Nesterov step on their mean (auto: the number of pushers).",
      min=1)
field("ps.dynamic_local_steps", "bool", True,
      "Local steps in asp: a worker's H is scaled by its measured speed, H_w = H x (fastest "
      "worker's step time / its own), so every worker's round takes about as long and slow "
      "workers' deltas are not staler (dynamic local updates). false: H for everyone.")
field("ps.link_gbps", "float", 0.0,
      "Experiments: emulate a slow link between each worker and the servers: every pull and "
      "push takes at least its bytes x 8 / (link_gbps x 1e9) seconds (0: off).", min=0.0)
field("ps.fragments", "int", 1,
      "Local steps in bsp (streaming): the model's blocks are dealt into F strided fragments "
      "(block i in fragment i mod F; embeddings and other tensors outside blocks in fragment "
      "0). Every H / F steps one fragment syncs, in turn, so each still syncs every H steps "
      "while a push or pull moves about 1/F of the model (peak bandwidth / F). H must be a "
      "multiple of F, F at most the number of blocks.", min=1)
