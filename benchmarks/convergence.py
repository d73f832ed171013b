"""Convergence of hpcps's trainer against PyTorch on identical data and initialisation.

For each seed, two models start from the same flat parameters (hpcps's GPT-2 init) and see
the same batches (hpcps's global sampler) under the same schedule, AdamW and clipping:

* **hpcps**: ``python -m hpcps train CONFIG train.seed=S`` in a subprocess (the real trainer);
* **torch**: ``hpcps.bench.torch_gpt.TorchGPT`` + ``torch.optim.AdamW`` + ``clip_grad_norm_``,
  driven here step by step.

Both final models are scored by the same code on the **whole** val split (non-overlapping
windows, as ``hpcps eval``), so a difference is the training numerics, not the data or the
evaluation sample. nanoGPT's published number for this config (1.886 at step 2000) is an
estimate over 200 random val batches with its own data order; it is printed for context.

    python benchmarks/convergence.py --data data/shakespeare_char.h5 --seeds 1337,1,2 [--nanogpt-protocol]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

NANOGPT_VAL = 1.886


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/shakespeare_char.toml")
    p.add_argument("--data", required=True, help="corpus prepared with --tokenizer char")
    p.add_argument("--seeds", default="1337,1,2")
    p.add_argument("--steps", type=int, default=None, help="default: the config's max_steps")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--nanogpt-protocol", action="store_true",
                   help="also train PyTorch on nanoGPT-style random batches and report its "
                        "20-batch val estimate next to the whole-split loss")
    return p.parse_args(argv)


def overrides(args, seed: int) -> list[str]:
    out = [f"data.path={args.data}", f"train.seed={seed}"]
    if args.steps:
        out += [f"train.max_steps={args.steps}", f"train.lr_decay_steps={args.steps}"]
    return out


def val_loss(workload, params: np.ndarray, corpus_path: str) -> float:
    from hpcps.data.corpus import Corpus
    from hpcps.inference.gpt import loss_over_tokens
    with Corpus.open(corpus_path) as corpus:
        tokens = np.asarray(corpus.split("val").load())
    total, count = loss_over_tokens(workload.model, params, lambda lo, hi: tokens[lo:hi],
                                    len(tokens), batch_size=32)
    return total / count


def train_hpcps(args, seed: int, folder: str) -> np.ndarray:
    from hpcps.checkpoint import open_checkpoint
    run = os.path.join(folder, f"hpcps_{seed}")
    cmd = [sys.executable, "-m", "hpcps", "-q", "train", args.config, *overrides(args, seed),
           f"out_dir={run}", "train.eval_every=0"]
    subprocess.run(cmd, check=True)
    return np.asarray(open_checkpoint(run).params(), dtype=np.float32)


def torch_batches_like_nanogpt(tokens, block: int, batch: int):
    """nanoGPT's get_batch: offsets from torch's global RNG."""
    import torch
    ix = torch.randint(len(tokens) - block, (batch,))
    x = torch.stack([tokens[i:i + block] for i in ix])
    y = torch.stack([tokens[i + 1:i + 1 + block] for i in ix])
    return x, y


def train_torch(args, seed: int, nanogpt_protocol: bool = False):
    """PyTorch on hpcps's batches; or, with ``nanogpt_protocol``, on batches drawn the way
    nanoGPT draws them (torch.manual_seed(seed), random offsets) and also scored the way it
    scores them (mean of eval_iters = 20 random val batches). Returns (params, estimate)."""
    import torch
    from hpcps.backend import CPU
    from hpcps.bench.torch_gpt import TorchGPT
    from hpcps.config import load_config
    from hpcps.model.blas import blas_threads
    from hpcps.optim.schedule import lr_schedule
    from hpcps.workloads import build_workload
    cfg = load_config(args.config, overrides(args, seed))
    workload = build_workload(cfg, CPU)
    m, t = cfg.model, cfg.train
    torch.set_num_threads(blas_threads() or 1)
    model = TorchGPT(vocab_size=workload.vocab_size, n_layer=m.n_layer, n_head=m.n_head,
                     n_embd=m.n_embd, block_size=m.block_size, bias=m.bias)
    model.load_flat(workload.layout.init_slice(t.seed))
    opt = torch.optim.AdamW(model.param_groups(t.weight_decay), lr=t.lr,
                            betas=(t.beta1, t.beta2), eps=1e-8, fused=False)
    lr_at = lr_schedule(cfg)
    if nanogpt_protocol:
        from hpcps.data.corpus import Corpus
        torch.manual_seed(seed)
        with Corpus.open(args.data) as corpus:
            train = torch.from_numpy(corpus.split("train").load().astype(np.int64))
            val = torch.from_numpy(corpus.split("val").load().astype(np.int64))
    for step in range(t.max_steps):
        if nanogpt_protocol:
            x, y = torch_batches_like_nanogpt(train, m.block_size, t.batch_size)
        else:
            x, y = workload.train_batch(step, 0, t.batch_size)
            x = torch.from_numpy(np.ascontiguousarray(x, np.int64))
            y = torch.from_numpy(np.ascontiguousarray(y, np.int64))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
    flat = np.zeros(workload.layout.total, dtype=np.float32)
    for spec in workload.layout.specs:
        flat[spec.offset:spec.end] = model.tensors[spec.name].detach().reshape(-1).numpy()
    estimate = None
    if nanogpt_protocol:
        with torch.no_grad():
            estimate = float(np.mean([model(*torch_batches_like_nanogpt(val, m.block_size,
                                                                        t.batch_size))[1].item()
                                      for _ in range(20)]))
    return flat, estimate


def main(argv=None) -> int:
    args = parse_args(argv)
    from hpcps.backend import CPU
    from hpcps.config import load_config
    from hpcps.workloads import build_workload
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in seeds:
            workload = build_workload(load_config(args.config, overrides(args, seed)), CPU)
            started = time.monotonic()
            ours = val_loss(workload, train_hpcps(args, seed, folder), args.data)
            ours_s = time.monotonic() - started
            started = time.monotonic()
            ref = val_loss(workload, train_torch(args, seed)[0], args.data)
            ref_s = time.monotonic() - started
            row = {"seed": seed, "hpcps_val": ours, "torch_val": ref, "hpcps_s": ours_s,
                   "torch_s": ref_s}
            line = (f"seed {seed}: val loss hpcps {ours:.4f} ({ours_s:.0f} s) | torch {ref:.4f} "
                    f"({ref_s:.0f} s) | difference {ours - ref:+.4f}")
            if args.nanogpt_protocol:
                params, estimate = train_torch(args, seed, nanogpt_protocol=True)
                row["nanogpt_protocol_val"] = val_loss(workload, params, args.data)
                row["nanogpt_protocol_estimate"] = estimate
                line += (f" | nanoGPT protocol: whole val {row['nanogpt_protocol_val']:.4f}, "
                         f"20-batch estimate {estimate:.4f}")
            rows.append(row)
            print(line, flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("hpcps_val", "torch_val")}
    diffs = [r["hpcps_val"] - r["torch_val"] for r in rows]
    print(f"median val loss over {len(rows)} seeds: hpcps {med['hpcps_val']:.4f} | torch "
          f"{med['torch_val']:.4f} | median difference {statistics.median(diffs):+.4f} "
          f"(nanoGPT's published estimate for this config: {NANOGPT_VAL})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows, "median": med}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
