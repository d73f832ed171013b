"""Which straggler remedies a job runs, checked against its roles.

The config schema checks each ``ps.*`` key on its own (choices, bounds); what
depends on the mode, the hierarchy or the worker count is checked here, once the
roles are known, so a bad combination is one line and exit 2 on every rank:

- ``ps.balance = speed`` splits a *bsp* step's global batch; asp and ssp balance by
  handing out samples (``ps.budget = samples``) instead;
- ``ps.backup_workers`` is a bsp rule and needs at least one push to wait for;
- ``ps.delay_compensation`` corrects stale pushes: asp, ssp, or bsp's late pushes
  (lookahead, which moves every pull, only asp and ssp);
- the sample budget hands batches to single workers, which a node hierarchy (whose
  workers step together) cannot take;
- local steps (``ps.local_steps``) push deltas in bsp rounds or asp, and replace the
  remedies that correct per-step gradients; their outer keys mean nothing without them;
- fewer landing slots than pushers (``ps.slots``) take turns in bsp steps; asp, ssp and
  bsp's late pushes keep one slot per pusher.
"""

from __future__ import annotations

from hpcps.config.fields import AUTO, FIELDS
from hpcps.errors import UserError
from hpcps.ps.fragments import count_blocks

ASYNC_MODES = ("asp", "ssp")
AUTO_SLOTS = 2   # ps.slots = auto in bsp (docs/memory.md: time per step vs memory)


def samples_budget(cfg, mode: str) -> bool:
    """asp/ssp: True when the job's budget is global and counted in samples (batches handed
    out to whichever worker is free); False when every worker runs its own max_steps."""
    if mode not in ASYNC_MODES:
        return False
    if cfg.ps.budget == "auto":
        return cfg.ps.hierarchy != "node"
    return cfg.ps.budget == "samples"


def check_options(cfg, roles) -> None:
    """Raise ``UserError`` for a remedy the job's mode, hierarchy or size cannot serve."""
    ps, mode = cfg.ps, roles.mode
    node = ps.hierarchy == "node"
    if ps.balance != "none":
        if mode != "bsp":
            raise UserError(f"ps.balance = {ps.balance} splits the global batch of a bsp step, "
                            f"but ps.mode = {mode}"
                            + (" (asp and ssp balance by samples: ps.budget = samples)"
                               if mode in ASYNC_MODES else ""))
        if node:
            raise UserError(f"ps.balance = {ps.balance} plans per worker; with ps.hierarchy = node "
                            "a node's workers push together: use one of them")
    if ps.backup_workers:
        if mode != "bsp":
            raise UserError(f"ps.backup_workers = {ps.backup_workers} is a bsp rule, but "
                            f"ps.mode = {mode}")
        if node:
            raise UserError("ps.backup_workers counts single workers' pushes: it cannot be used "
                            "with ps.hierarchy = node")
        if ps.backup_workers >= roles.n_workers:
            raise UserError(f"ps.backup_workers = {ps.backup_workers} must be below the number of "
                            f"workers ({roles.n_workers}): a step needs at least one push")
    if ps.delay_compensation == "lookahead" and mode not in ASYNC_MODES:
        raise UserError(f"ps.delay_compensation = lookahead extrapolates the params workers pull "
                        f"by the staleness of asp or ssp, not ps.mode = {mode}")
    if ps.delay_compensation != "none":
        if mode not in ASYNC_MODES and not (mode == "bsp" and ps.backup_workers):
            raise UserError(f"ps.delay_compensation = {ps.delay_compensation} corrects stale "
                            f"pushes: it needs ps.mode = asp or ssp (or bsp with "
                            f"ps.backup_workers), not ps.mode = {mode}")
    if ps.budget == "samples" and node and mode in ASYNC_MODES:
        raise UserError("ps.budget = samples hands batches to single workers; with "
                        "ps.hierarchy = node a node's workers step together: use "
                        "ps.budget = worker_steps")
    _check_local_steps(cfg, mode)
    landing_slots(cfg, mode, roles.n_pushers)


def takes_turns(cfg, mode: str) -> bool:
    """Whether the pushes of a step take turns in the receive slots (``hpcps.ps.ring``):
    bsp without backup workers. asp and ssp apply each slot on its own and bsp's backup
    workers leave late pushes in theirs, so those keep one slot per pusher."""
    return mode == "bsp" and not cfg.ps.backup_workers


def landing_slots(cfg, mode: str, n_pushers: int) -> int:
    """k, the receive slots of each server shard (``ps.slots``): at most one per pusher;
    fewer only where pushes take turns (``takes_turns``)."""
    turns = takes_turns(cfg, mode)
    requested = cfg.ps.slots
    if requested == AUTO:
        return min(n_pushers, AUTO_SLOTS) if turns else n_pushers
    if requested < n_pushers and not turns:
        why = (f"ps.mode = {mode} applies each push on its own" if mode != "bsp"
               else "ps.backup_workers leaves late pushes in their slots")
        raise UserError(f"ps.slots = {requested} is fewer than the {n_pushers} pushers, which "
                        f"needs bsp without backup workers ({why}): use ps.slots = auto")
    return min(requested, n_pushers)


OUTER_KEYS = ("outer_optimizer", "outer_lr", "outer_momentum", "outer_buffer",
              "dynamic_local_steps")


def _check_local_steps(cfg, mode: str) -> None:
    ps = cfg.ps
    if ps.link_gbps and mode not in ("bsp", "ssp", "asp"):
        raise UserError(f"ps.link_gbps throttles the pulls and pushes of a parameter-server "
                        f"mode (bsp, ssp, asp), not ps.mode = {mode}")
    if not ps.local_steps:
        changed = [k for k in (*OUTER_KEYS, "fragments")
                   if getattr(ps, k) != FIELDS[f"ps.{k}"].default]
        if changed:
            raise UserError(f"ps.{changed[0]} = {getattr(ps, changed[0])} applies only to local "
                            "steps: set ps.local_steps >= 1 or drop it")
        return
    H = ps.local_steps
    if mode not in ("bsp", "asp"):
        raise UserError(f"ps.local_steps = {H} needs ps.mode = bsp (synchronous rounds) or asp "
                        f"(each delta applied as it arrives), not ps.mode = {mode}")
    conflicts = [(f"ps.balance = {ps.balance}", ps.balance != "none",
                  "asp with ps.dynamic_local_steps balances rounds by speed"),
                 (f"ps.backup_workers = {ps.backup_workers}", ps.backup_workers > 0,
                  "a round waits for every worker's delta"),
                 (f"ps.delay_compensation = {ps.delay_compensation}",
                  ps.delay_compensation != "none",
                  "stale deltas are handled by the outer optimizer (asp: delayed Nesterov)"),
                 (f"device = {cfg.device}", cfg.device != "cpu",
                  "the inner optimizer runs on the host replica only so far")]
    for what, bad, why in conflicts:
        if bad:
            raise UserError(f"ps.local_steps = {H} cannot be combined with {what}: {why}")
    if ps.outer_buffer != "auto" and (mode != "asp" or ps.outer_optimizer != "nesterov"):
        raise UserError(f"ps.outer_buffer = {ps.outer_buffer} is delayed Nesterov's group in asp "
                        f"(ps.outer_optimizer = nesterov); here ps.mode = {mode} and "
                        f"ps.outer_optimizer = {ps.outer_optimizer}: drop it")
    F = ps.fragments
    if F > 1:
        why = None
        if mode != "bsp":
            why = f"streaming rounds are synchronous: use ps.mode = bsp, not {mode}"
        elif H % F:
            why = "H must be a multiple of F (a fragment syncs every H / F steps)"
        elif ps.outer_optimizer != "nesterov":
            why = ("each fragment keeps its own outer momentum: use ps.outer_optimizer = "
                   "nesterov (momentum 0 for plain SGD)")
        elif ps.compression == "topk":
            why = "a fragment push is dense, not ps.compression = topk: use none, fp16, bf16 or int4"
        if why:
            raise UserError(f"ps.fragments = {F} with ps.local_steps = {H}: {why}")


def check_fragments(cfg, layout) -> None:
    """``ps.fragments`` against the model: at most one fragment per block."""
    F = cfg.ps.fragments
    if cfg.ps.local_steps and F > 1:
        blocks = count_blocks(layout)
        if F > blocks:
            raise UserError(f"ps.fragments = {F} but the model has {blocks} blocks "
                            f"(model.n_layer or its equivalent): use at most {blocks}")
