"""``hpcps bench model``: training-step throughput of the NumPy GPT vs PyTorch eager.

One step = forward + backward + AdamW update over the whole flat buffer, on
random tokens of the configured shape (speed does not depend on the data).
With torch installed, the same model and optimizer (torch.optim.AdamW,
fused=False, same decay groups) run in the same process with as many threads
as NumPy's BLAS, in interleaved A/B repeats; the reported ratio is the median
over repeats of ours / torch tokens per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Optional

import numpy as np

from hpcps.config.load import load_config
from hpcps.errors import UserError
from hpcps.model.blas import avx512_kernels_available, blas_kernel, blas_threads
from hpcps.model.gpt import GPT
from hpcps.optim.adamw import AdamW

DEFAULT_VOCAB = 65   # character-level tinyshakespeare
# pause between A/B segments so the other library's spinning worker threads go idle
SETTLE_S = 0.2
LAYER_FUNCTIONS = ("embedding_backward", "layernorm_forward", "layernorm_backward",
                   "layernorm_linear_forward", "layernorm_linear_backward",
                   "linear_forward", "linear_backward", "attention_forward", "attention_backward",
                   "gelu_forward", "gelu_backward", "cross_entropy_forward",
                   "cross_entropy_backward", "step")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. model.n_layer=6 train.batch_size=8")
    parser.add_argument("--config", default=None, help="TOML config (default: built-in defaults, "
                        "which are the nanoGPT CPU shape)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                        help=f"vocabulary size (default {DEFAULT_VOCAB}, character level)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each repeat")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved A/B repeats")
    parser.add_argument("--torch", dest="torch", action=argparse.BooleanOptionalAction,
                        default=None, help="also time PyTorch eager (default: when installed)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where our step spends its time, per layer function")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    result = run_model_bench(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_result(result))
    return 0


def _check_args(args) -> None:
    for name in ("steps", "repeats", "vocab_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")


def _load(args):
    return load_config(args.config, args.overrides or ())


def _batches(cfg, vocab: int, count: int = 4):
    rng = np.random.default_rng(cfg.train.seed)
    shape = (cfg.train.batch_size, cfg.model.block_size)
    return [(rng.integers(0, vocab, shape), rng.integers(0, vocab, shape)) for _ in range(count)]


def _ours(cfg, vocab: int, batches) -> tuple[Callable[[], None], object]:

    m, t = cfg.model, cfg.train
    model = GPT(vocab_size=vocab, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                block_size=m.block_size, bias=m.bias, dropout=m.dropout,
                tie_embeddings=m.tie_embeddings, recompute=t.recompute)
    params = model.init_params(t.seed)
    grads = np.empty_like(params)
    opt = AdamW(params.size, model.layout.decay_ranges(), beta1=t.beta1, beta2=t.beta2,
                eps=t.eps, weight_decay=t.weight_decay)
    state = {"i": 0}
    batch = t.batch_size

    def step() -> None:
        i = state["i"]
        state["i"] = i + 1
        idx, targets = batches[i % len(batches)]
        keys = np.arange(i * batch, (i + 1) * batch) if m.dropout > 0 else None
        model.forward_backward(params, grads, idx, targets, keys)
        opt.step(params, grads, t.lr)

    return step, model


def _torch(cfg, vocab: int, batches, ours_model) -> Callable[[], None]:
    # PyTorch is optional (the `torch` extra): imported only when this comparison runs
    import torch

    from hpcps.bench.torch_gpt import TorchGPT  # imports torch: see above

    m, t = cfg.model, cfg.train
    model = TorchGPT(vocab_size=vocab, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                     block_size=m.block_size, bias=m.bias, dropout=m.dropout,
                     tie_embeddings=m.tie_embeddings)
    model.load_flat(ours_model.layout.init_slice(t.seed))
    model.train()
    opt = torch.optim.AdamW(model.param_groups(t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                            eps=t.eps, fused=False)
    tensors = [(torch.from_numpy(i), torch.from_numpy(o)) for i, o in batches]
    state = {"i": 0}

    def step() -> None:
        idx, targets = tensors[state["i"] % len(tensors)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()

    return step


def _timed(step: Callable[[], None], warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def run_model_bench(args: argparse.Namespace) -> dict:
    _check_args(args)
    cfg = _load(args)
    vocab = args.vocab_size
    tokens = cfg.train.batch_size * cfg.model.block_size
    batches = _batches(cfg, vocab)
    ours, model = _ours(cfg, vocab, batches)
    use_torch = args.torch
    if use_torch is None or use_torch:
        try:
            import torch
        except ImportError:
            if use_torch:
                raise UserError("--torch given but PyTorch is not installed "
                                "(pip install 'hpcps[torch]')") from None
            use_torch = False
        else:
            use_torch = True
    threads = blas_threads()
    theirs: Optional[Callable[[], None]] = None
    if use_torch:
        torch.set_num_threads(threads)
        theirs = _torch(cfg, vocab, batches, model)
    ours_s, torch_s = [], []
    for r in range(args.repeats):
        order = [("ours", ours), ("torch", theirs)] if r % 2 == 0 else \
            [("torch", theirs), ("ours", ours)]
        for name, step in order:
            if step is None:
                continue
            time.sleep(SETTLE_S if theirs is not None else 0.0)
            (ours_s if name == "ours" else torch_s).append(_timed(step, args.warmup, args.steps))
    result = {
        "config": {"n_layer": cfg.model.n_layer, "n_head": cfg.model.n_head,
                   "n_embd": cfg.model.n_embd, "block_size": cfg.model.block_size,
                   "batch_size": cfg.train.batch_size, "vocab_size": vocab,
                   "bias": cfg.model.bias, "dropout": cfg.model.dropout,
                   "tie_embeddings": cfg.model.tie_embeddings},
        "params": model.layout.total, "tokens_per_step": tokens, "threads": threads,
        "blas_kernel": blas_kernel(), "ours_batch_shards": model.threads,
        "steps": args.steps, "repeats": args.repeats,
        "ours_ms": [s * 1e3 for s in ours_s],
        "ours_tokens_per_s": tokens / statistics.median(ours_s),
        "ours_mflop_per_s": model.flops_per_token() * tokens / statistics.median(ours_s) / 1e6,
    }
    if theirs is not None:
        ratios = [t / o for o, t in zip(ours_s, torch_s)]
        result.update({
            "torch_version": torch.__version__,
            "torch_ms": [s * 1e3 for s in torch_s],
            "torch_tokens_per_s": tokens / statistics.median(torch_s),
            "ratio_per_repeat": ratios,
            "ratio": statistics.median(ratios),
        })
    if args.profile:
        result["profile_ms_per_step"] = layer_profile(ours, args.steps)
    return result


def layer_profile(step: Callable[[], None], steps: int) -> dict:
    """Inclusive ms per step spent in each layer function (cProfile, which sees only the
    calling thread, i.e. its own batch shard; adds some overhead)."""
    import cProfile
    import pstats
    step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    stats = pstats.Stats(prof).stats
    out: dict = {}
    for (path, _, func), (_, _, _, cumtime, _) in stats.items():
        if func == "step" and not path.endswith("adamw.py"):
            continue
        if func in LAYER_FUNCTIONS and "hpcps" in path:
            label = "adamw.step" if func == "step" else func
            out[label] = out.get(label, 0.0) + cumtime * 1e3 / steps
        if func == "forward_backward":
            out["forward_backward (total)"] = cumtime * 1e3 / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def format_result(res: dict) -> str:
    c = res["config"]
    lines = [f"model bench: L={c['n_layer']} H={c['n_head']} C={c['n_embd']} T={c['block_size']} "
             f"B={c['batch_size']} V={c['vocab_size']} bias={c['bias']} dropout={c['dropout']} "
             f"({res['params']:,} params, {res['threads']} threads, BLAS kernel "
             f"{res['blas_kernel']}, {res['repeats']} x {res['steps']} steps)",
             f"  ours runs the batch as {res['ours_batch_shards']} shard(s) in parallel threads",
             f"  ours  : {res['ours_tokens_per_s']:10,.0f} tokens/s  "
             f"{statistics.median(res['ours_ms']):7.2f} ms/step  "
             f"{res['ours_mflop_per_s'] / 1e3:6.1f} GFLOP/s"]
    if "ratio" in res:
        lines.append(f"  torch : {res['torch_tokens_per_s']:10,.0f} tokens/s  "
                     f"{statistics.median(res['torch_ms']):7.2f} ms/step  "
                     f"(PyTorch {res['torch_version']} eager)")
        lines.append(f"  ratio ours/torch (median of {len(res['ratio_per_repeat'])} interleaved "
                     f"repeats): {res['ratio']:.3f}  ["
                     + " ".join(f"{r:.2f}" for r in res["ratio_per_repeat"]) + "]")
    if res["blas_kernel"] == "Haswell" and avx512_kernels_available():
        lines.append("  note: this AVX-512 CPU runs OpenBLAS's AVX2 kernels; "
                     "OPENBLAS_CORETYPE=SkylakeX makes the GEMMs ~1.7x faster")
    if "profile_ms_per_step" in res:
        lines.append("  profile (inclusive ms/step, cProfile; with batch shards: the calling "
                     "thread's shard):")
        for name, ms in res["profile_ms_per_step"].items():
            lines.append(f"    {name:28s} {ms:7.2f}")
    return "\n".join(lines)
