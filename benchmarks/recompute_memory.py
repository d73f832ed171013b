"""Peak memory and step time of a GPT worker under each ``train.recompute`` mode.

    python benchmarks/recompute_memory.py                       # GPT-2 124M shape, B=4, T=1024
    python benchmarks/recompute_memory.py --repeats 3 model.n_layer=24 model.n_embd=1024 model.n_head=16

Each measurement is a fresh process (its peak resident set, ``VmHWM``, is its own) that
holds what a worker holds, the flat parameter and gradient buffers and the model, and runs
``--steps`` forward + backward passes after one untimed step on random tokens. Modes are
interleaved over ``--repeats`` rounds; the table gives medians, and the median over rounds of
each round's ratio to ``none`` (one round disturbed by another job then cannot skew it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

MODES = ("none", "attention", "block")
GPT2_124M = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024",
             "model.bias=true", "train.batch_size=4"]


def one(mode: str, vocab: int, steps: int, shards: int, overrides: list[str]) -> dict:
    from hpcps.config import load_config
    from hpcps.model.gpt import GPT
    from hpcps.runtime.memory import peak_rss_bytes
    cfg = load_config(None, overrides + [f"train.recompute={mode}"])
    m, b = cfg.model, cfg.train.batch_size
    model = GPT(vocab_size=vocab, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                block_size=m.block_size, bias=m.bias, tie_embeddings=m.tie_embeddings,
                recompute=mode, threads=shards)
    params = model.init_params(1)
    grads = np.empty_like(params)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, vocab, (b, m.block_size))
    targets = rng.integers(0, vocab, (b, m.block_size))
    model.forward_backward(params, grads, idx, targets)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.forward_backward(params, grads, idx, targets)
        times.append(time.perf_counter() - start)
    return {"mode": mode, "step_s": statistics.median(times), "peak_rss": peak_rss_bytes(),
            "params": model.layout.total, "shards": model.threads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides after the GPT-2 124M shape")
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--shards", type=int, default=1,
                        help="batch shards in threads (1: one workspace, BLAS on every core; "
                             "a worker of a job with a core per worker holds the same)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = GPT2_124M + args.overrides
    if args.one:
        print(json.dumps(one(args.one, args.vocab_size, args.steps, args.shards, overrides)))
        return 0
    modes = args.modes.split(",")
    runs: dict = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--steps",
                                  str(args.steps), "--vocab-size", str(args.vocab_size),
                                  "--shards", str(args.shards), *args.overrides],
                                 check=True, capture_output=True, text=True)
            runs[mode].append(json.loads(out.stdout.splitlines()[-1]))
            print(json.dumps(runs[mode][-1]), flush=True)
    # ratios per round (a round runs every mode back to back), then their median
    print(f"{'mode':10s} {'peak RSS':>10s} {'vs ' + modes[0]:>8s} {'step':>8s} {'vs ' + modes[0]:>8s}")
    for mode in modes:
        rss = statistics.median(x["peak_rss"] for x in runs[mode])
        step = statistics.median(x["step_s"] for x in runs[mode])
        rss_ratio = statistics.median(a["peak_rss"] / b["peak_rss"]
                                      for a, b in zip(runs[mode], runs[modes[0]]))
        step_ratio = statistics.median(a["step_s"] / b["step_s"]
                                       for a, b in zip(runs[mode], runs[modes[0]]))
        print(f"{mode:10s} {rss / 2**30:8.2f}GiB {rss_ratio:8.2f} {step:7.2f}s {step_ratio:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
