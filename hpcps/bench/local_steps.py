"""``hpcps bench train --experiments local``: local steps with an outer optimizer against bsp.

Three parts, every run a real ``hpcps train`` job of ``--local-total`` global steps
(1 server + ``--local-workers`` workers, the same samples in every run):

- quality: bsp, then local steps for every H in ``--local-h`` and outer lr in
  ``--local-lr`` (outer Nesterov, momentum 0.9), plus int4 deltas (with error
  feedback) at every H in ``--local-int4-h`` with the first lr of the list, and streaming
  fragments (``--local-fragments``, fp32 and int4) at the first H and lr.
  Per run: val loss at the end (on the global params), MB pushed per worker and bytes
  per worker per token (summed from metrics.jsonl), the push reduction against bsp, and
  the time to finish. bsp and synchronous rounds are deterministic, so each runs once.
- throttled: bsp and local steps at ``--local-throttle-h`` with every pull and push
  throttled to ``--link-gbps``, interleaved ``--repeats`` times, ``--throttle-steps``
  steps: the median time to finish and its ratio.
- straggler: ``--straggler-workers`` workers, the last ``--straggler-factor`` times
  slower, ``--local-straggler-steps`` steps: bsp, synchronous rounds and asp with local
  steps at ``--local-straggler-h`` (delayed Nesterov, dynamic local steps) and the naive variant
  beside it (a Nesterov step per delta, the same H for every worker), interleaved:
  time to finish and val loss.
"""

from __future__ import annotations

import statistics

from hpcps.errors import UserError

PARTS = ("quality", "throttled", "straggler")
NAIVE_ASYNC = ["ps.outer_buffer=1", "ps.dynamic_local_steps=false"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def check_arguments(args) -> None:
    """One line for a bad --local-* argument, before any run is launched."""
    for name, parse in (("local_h", _ints), ("local_lr", _floats), ("local_int4_h", _ints),
                        ("local_fragments", _ints)):
        text = getattr(args, name)
        try:
            values = parse(text)
        except ValueError:
            values = [0]
        optional = name in ("local_int4_h", "local_fragments")
        if (not values and not optional) or min(values, default=1) <= 0:
            raise UserError(f"--{name.replace('_', '-')}: expected a comma list of positive "
                            f"numbers, got {text!r}")
    for name in ("local_workers", "local_total", "local_throttle_h", "throttle_steps",
                 "local_straggler_h", "local_straggler_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.link_gbps <= 0:
        raise UserError(f"--link-gbps must be > 0, got {args.link_gbps:g}")
    unknown = [p for p in args.local_parts.split(",") if p.strip() and p.strip() not in PARTS]
    if unknown:
        raise UserError(f"--local-parts: unknown {unknown[0]!r} (choose from {', '.join(PARTS)})")


def add_arguments(parser) -> None:
    parser.add_argument("--local-workers", type=int, default=2, help="workers of the local runs")
    parser.add_argument("--local-total", type=int, default=600,
                        help="global steps of every quality run (equal tokens)")
    parser.add_argument("--local-h", default="10,20,50,200", help="H of the quality grid")
    parser.add_argument("--local-lr", default="0.4,0.6,0.8", help="outer lrs of the grid")
    parser.add_argument("--local-int4-h", default="20,50", help="H of the int4-delta runs")
    parser.add_argument("--local-fragments", default="4",
                        help="ps.fragments of the streaming runs (first H and lr; '' for none)")
    parser.add_argument("--link-gbps", type=float, default=0.1,
                        help="ps.link_gbps of the throttled runs")
    parser.add_argument("--local-throttle-h", type=int, default=20)
    parser.add_argument("--throttle-steps", type=int, default=100)
    parser.add_argument("--local-straggler-h", type=int, default=10)
    parser.add_argument("--local-straggler-steps", type=int, default=300)
    parser.add_argument("--local-parts", default="quality,throttled,straggler",
                        help="which parts of the local experiment to run")


def _summary(runner, records, workers: int, steps: int) -> dict:
    last = records[-1]
    tokens = steps * runner._per_step_tokens(workers)
    pushed = sum(r.get("push_mb", 0.0) for r in records)   # the lead's: one worker's bytes
    return {"val_loss": last.get("val_loss"), "push_mb": pushed,
            "bytes_per_token": pushed * 1e6 * workers / tokens, "wall_s": last["wall_s"]}


def local_experiment(runner) -> dict:
    a = runner.args
    parts = [p.strip() for p in a.local_parts.split(",") if p.strip()]
    out: dict = {}
    if "quality" in parts:
        out["quality"] = _quality(runner)
    if "throttled" in parts:
        out["throttled"] = _throttled(runner)
    if "straggler" in parts:
        out["straggler"] = _straggler(runner)
    return out


def _quality(runner) -> list[dict]:
    a = runner.args
    W, total = a.local_workers, a.local_total
    base = [f"train.max_steps={total}", f"train.eval_every={total}", "checkpoint.every=0"]
    kinds = [("bsp", [])]
    for h in _ints(a.local_h):
        for lr in _floats(a.local_lr):
            kinds.append((f"H={h} lr={lr:g}", [f"ps.local_steps={h}", f"ps.outer_lr={lr}"]))
    lr0 = _floats(a.local_lr)[0]
    for h in _ints(a.local_int4_h):
        kinds.append((f"H={h} lr={lr0:g} int4", [f"ps.local_steps={h}", f"ps.outer_lr={lr0}",
                                                  "ps.compression=int4"]))
    h0 = _ints(a.local_h)[0]
    for f in _ints(a.local_fragments):
        for codec in ("none", "int4"):
            kinds.append((f"H={h0} lr={lr0:g} F={f}{' int4' if codec == 'int4' else ''}",
                          [f"ps.local_steps={h0}", f"ps.outer_lr={lr0}", f"ps.fragments={f}",
                           f"ps.compression={codec}"]))
    rows = []
    for name, extra in kinds:
        ranks, args = runner._mode_args("bsp", W, [*base, *extra])
        _, records = runner.launch(ranks, args, env_extra=runner.one_thread)
        rows.append({"run": name, **_summary(runner, records, W, total)})
    ref = rows[0]
    for row in rows:
        row["val_vs_bsp"] = row["val_loss"] - ref["val_loss"]
        row["push_reduction"] = ref["push_mb"] / row["push_mb"] if row["push_mb"] else None
    return rows


def _interleaved(runner, kinds, repeats: int, ranks_of) -> dict:
    times: dict = {name: [] for name, _ in kinds}
    vals: dict = {name: [] for name, _ in kinds}
    for _ in range(repeats):
        for name, extra in kinds:
            ranks, args = ranks_of(extra)
            _, records = runner.launch(ranks, args, env_extra=runner.one_thread)
            times[name].append(records[-1]["wall_s"])
            vals[name].append(records[-1].get("val_loss"))
    return {name: {"wall_s": times[name], "wall_s_median": statistics.median(times[name]),
                   "val_loss": vals[name]} for name, _ in kinds}


def _throttled(runner) -> dict:
    a = runner.args
    steps = a.throttle_steps
    base = [f"train.max_steps={steps}", f"train.eval_every={steps}", "checkpoint.every=0",
            f"ps.link_gbps={a.link_gbps}"]
    kinds = [("bsp", []), (f"H={a.local_throttle_h}", [f"ps.local_steps={a.local_throttle_h}"])]
    result = _interleaved(runner, kinds, a.repeats,
                          lambda extra: runner._mode_args("bsp", a.local_workers, [*base, *extra]))
    bsp, local = (result[name]["wall_s_median"] for name, _ in kinds)
    return {"link_gbps": a.link_gbps, "steps": steps, "runs": result, "speedup": bsp / local,
            "target": 3.0}


def _straggler(runner) -> dict:
    a = runner.args
    W, steps, H = a.straggler_workers, a.local_straggler_steps, a.local_straggler_h
    slow_rank = W - 1   # ranks 0..W-1 are the workers when the one server is the last rank
    base = [f"train.max_steps={steps}", f"train.eval_every={steps}", "checkpoint.every=0",
            f"ps.straggler={slow_rank}:{a.straggler_factor:g}"]
    kinds = [("bsp", ["ps.mode=bsp"]),
             (f"bsp H={H}", ["ps.mode=bsp", f"ps.local_steps={H}"]),
             (f"asp H={H}", ["ps.mode=asp", f"ps.local_steps={H}"]),
             (f"asp H={H} naive", ["ps.mode=asp", f"ps.local_steps={H}", *NAIVE_ASYNC])]

    def ranks_of(extra):
        mode = extra[0].split("=")[1]
        return runner._mode_args(mode, W, [*base, *extra[1:]])
    result = _interleaved(runner, kinds, a.repeats, ranks_of)
    bsp = result["bsp"]["wall_s_median"]
    for name in result:
        result[name]["speedup_vs_bsp"] = bsp / result[name]["wall_s_median"]
        vals = [v for v in result[name]["val_loss"] if v is not None]
        result[name]["val_median"] = statistics.median(vals) if vals else None
    return {"workers": W, "factor": a.straggler_factor, "steps": steps, "runs": result,
            "target_speedup": 1.4, "target_val": 0.05}


def format_local(result: dict) -> list[str]:
    lines = []
    if "quality" in result:
        lines.append("local steps, equal tokens (val on the global params; MB pushed per worker):")
        for r in result["quality"]:
            red = f"{r['push_reduction']:.0f}x" if r.get("push_reduction") else "-"
            lines.append(f"  {r['run']:<18} val {r['val_loss']:.4f} ({r['val_vs_bsp']:+.4f}) | "
                         f"push {r['push_mb']:.1f} MB ({red} fewer) | "
                         f"{r['bytes_per_token']:.1f} B/token | {r['wall_s']:.1f} s")
    if "throttled" in result:
        t = result["throttled"]
        cells = " | ".join(f"{k} {v['wall_s_median']:.1f} s" for k, v in t["runs"].items())
        lines.append(f"throttled links ({t['link_gbps']:g} Gb/s, {t['steps']} steps): {cells} | "
                     f"speedup {t['speedup']:.2f}x (target >= {t['target']:g})")
    if "straggler" in result:
        s = result["straggler"]
        lines.append(f"straggler ({s['workers']} workers, one {s['factor']:g}x slower, "
                     f"{s['steps']} steps):")
        for name, v in s["runs"].items():
            val = f"{v['val_median']:.4f}" if v["val_median"] is not None else "-"
            lines.append(f"  {name:<16} {v['wall_s_median']:.1f} s ({v['speedup_vs_bsp']:.2f}x "
                         f"bsp) | val {val}")
    return lines
