"""A one-process simulation of asynchronous training with a straggler, for delay
compensation: the real model, optimizer, schedule and update rules, no MPI.

W simulated workers compute batches of the global sample stream (claim k is items
[(k mod W)·b, (k mod W + 1)·b) of step k div W, as with ``ps.budget = samples``);
worker w needs ``times[w]`` time units per batch. When a worker finishes, its gradient
(computed on the params it pulled when it started) is clipped, corrected by the update
rule (``hpcps.ps.update_rules``, exactly the servers' code) and applied; the worker then
pulls the current params and claims the next batch (``ps.read_your_writes = false``: it
pulled them before its own update was applied). Staleness therefore arises as in a
real asp job (about W − 1 for a fast worker, more for the straggler), without the noise
of a shared machine. ``--mode bsp`` runs the synchronous reference on the same samples.

    python -m hpcps.bench.staleness configs/shakespeare_char.toml data.path=... \\
        model.n_layer=2 model.n_embd=64 train.batch_size=4 train.max_steps=300 \\
        --workers 4 --times 1,1,1,2 --rules none,lr,dc,gap,lookahead
"""

from __future__ import annotations

import argparse
import heapq
import json

import numpy as np

from hpcps.backend import CPU
from hpcps.config import load_config
from hpcps.config.paths import resolve_config_path
from hpcps.optim import make_optimizer
from hpcps.optim.clip import clip_coefficient
from hpcps.optim.schedule import lr_schedule
from hpcps.ps.update_rules import make_update_rule
from hpcps.workloads import build_workload


def simulate(cfg, workers: int, times: list[float], mode: str = "asp",
             jitter: float = 0.0) -> dict:
    """Train on max_steps x workers x batch_size sequences; returns losses and val.
    ``jitter``: each batch takes ``times[w] x (1 + jitter x u)``, u uniform in [-1, 1]
    (seeded): the irregular staleness of workers that share cores."""
    rng = np.random.default_rng(cfg.train.seed)
    workload = build_workload(cfg, CPU)
    layout = workload.layout
    n, b = layout.total, cfg.train.batch_size
    params = layout.init_slice(cfg.train.seed)
    grads = layout.new_buffer()
    opt = make_optimizer(cfg, n, layout.decay_ranges())
    rule = make_update_rule(cfg, n, workers, opt)
    lr_fn = lr_schedule(cfg)
    total = cfg.train.max_steps * workers
    version, stale = 0, []
    rule.started(version, params)
    # what the optimizer steps: params, or the rule's private copy (then params is what
    # workers pull, as the server's params window)
    state = rule.own if rule.private_params else params
    losses = []
    if mode == "bsp":
        mean = np.zeros(n, dtype=np.float32)
        for step in range(cfg.train.max_steps):
            x, y = workload.train_batch(step, 0, workers * b)
            losses.append(workload.loss_and_grad(params, mean, (x, y), step, 0)[0])
            _, scale = clip_coefficient(float(mean @ mean), cfg.train.grad_clip)
            opt.step(params, mean, lr_fn(step), scale)
    else:
        pulled = [params.copy() for _ in range(workers)]
        pulled_version = [0] * workers
        claims = list(range(workers))
        events = [(times[w], w) for w in range(workers)]
        heapq.heapify(events)
        next_claim = workers
        while events:
            now, w = heapq.heappop(events)
            step, slot = divmod(claims[w], workers)
            batch = workload.train_batch(step, slot * b, (slot + 1) * b)
            loss, _ = workload.loss_and_grad(pulled[w], grads, batch, step, slot * b)
            losses.append(loss)
            _, scale = clip_coefficient(float(grads @ grads), cfg.train.grad_clip)
            stale.append(version - pulled_version[w])
            factor = rule.correct(grads, pulled_version[w], version, state)
            more = next_claim < total
            if more and not cfg.ps.read_your_writes:   # the next pull misses our own update
                pulled[w][:] = params
                pulled_version[w] = version
            if state is not params:
                params[:] = state
            opt.step(state, grads, lr_fn(step) * factor, scale)
            if state is not params:
                rule.publish(params, state)
            version += 1
            rule.applied(version, state)
            if more:
                claims[w] = next_claim
                next_claim += 1
                if cfg.ps.read_your_writes:
                    pulled[w][:] = params
                    pulled_version[w] = version
                took = times[w] * (1.0 + jitter * rng.uniform(-1.0, 1.0))
                heapq.heappush(events, (now + took, w))
    sums = workload.eval_sums(state, 0, cfg.train.eval_steps * workers * b)
    out = {"mode": mode, "rule": cfg.ps.delay_compensation,
           "val_loss": workload.finalize_eval(sums)["val_loss"],
           "train_loss_last": float(np.mean(losses[-max(1, len(losses) // 10):]))}
    if stale:
        out["staleness_mean"] = float(np.mean(stale))
        out["staleness_max"] = int(np.max(stale))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--times", default="1,1,1,2", help="time per batch of each worker")
    parser.add_argument("--rules", default="none,lr,dc,gap,lookahead",
                        help="rules to run; dc@LAMBDA sets ps.dc_lambda")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="each batch takes time x (1 + jitter x u), u uniform in [-1, 1]")
    parser.add_argument("--bsp", action="store_true", help="also run the bsp reference")
    args = parser.parse_args(argv)
    times = [float(t) for t in args.times.split(",")]
    path = resolve_config_path(args.config)
    if args.bsp:
        cfg = load_config(path, args.overrides)
        print(json.dumps(simulate(cfg, args.workers, times, "bsp")), flush=True)
    for rule in args.rules.split(","):
        name, _, lam = rule.partition("@")
        extra = [f"ps.delay_compensation={name}"] + ([f"ps.dc_lambda={lam}"] if lam else [])
        cfg = load_config(path, [*args.overrides, *extra])
        result = simulate(cfg, args.workers, times, jitter=args.jitter)
        result["lambda"] = cfg.ps.dc_lambda
        result["jitter"] = args.jitter
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
