"""``hpcps bench train --experiments network``: the same job through shared memory and
through MPICH's network module (``MPIR_CVAR_NOLOCAL=1``: every rank its own node, all
one-sided traffic through the netmod), in interleaved repeats.

For bsp and asp with 1 server + ``--network-workers`` workers (default 2) it reports the step time of each path and
their ratio (median over repeats; target <= 1.15), and the latency of every
control-word atomic the ranks issued to another rank during training (gates, flags,
versions, clocks: ``HPCPS_ATOMIC_LATENCY``), pooled over the repeats: p50, p99 and
max per path (target p99 <= 1 ms). The servers are busy all along, updating or
waiting, so these are atomics to a busy server. asp's step time is the time of one
global batch at the traced throughput of all workers. When the ranks fit the machine's
cores, every rank is bound to a core of its own and runs one BLAS thread (as on a cluster);
otherwise they share the cores as the training command would.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from hpcps.ps.windows import LATENCY_ENV

PATHS = {"shared memory": {}, "network module": {"MPIR_CVAR_NOLOCAL": "1"}}
MODES = ("bsp", "asp")
STEP_RATIO_TARGET = 1.15
P99_TARGET_S = 1e-3


def latencies(folder: Path) -> np.ndarray:
    """Every rank's recorded atomic latencies (seconds), concatenated."""
    files = sorted(folder.glob("rank*.npy"))
    return np.concatenate([np.load(f) for f in files]) if files else np.zeros(0)


def network_experiment(runner) -> dict:
    a = runner.args
    workers = a.network_workers
    ranks, steps = workers + 1, a.warmup + a.steps
    global_batch_tokens = runner._per_step_tokens(workers)
    own_cores = ranks <= runner.cores
    threads = runner.one_thread if own_cores else {}
    binding = ("-bind-to", "core") if own_cores else ()   # MPICH's launcher (NOLOCAL is MPICH's)
    out: dict = {"workers": workers, "servers": 1, "steps": steps, "core_per_rank": own_cores,
                 "step_ratio_target": STEP_RATIO_TARGET, "p99_target_s": P99_TARGET_S}
    for mode in MODES:
        step_s: dict = {path: [] for path in PATHS}
        samples: dict = {path: [] for path in PATHS}
        for _ in range(a.repeats):   # interleaved: shm, net, shm, net, ...
            for path, env in PATHS.items():
                folder = runner.root / f"latency{runner.count + 1:03d}"
                out_dir, records = runner.launch(
                    ranks, [f"ps.mode={mode}", "ps.servers=1", f"train.max_steps={steps}"],
                    env_extra={**threads, **env, LATENCY_ENV: str(folder)},
                    traced=mode == "asp", launcher_args=binding)
                if mode == "bsp":
                    step_s[path].append(runner._median_step(records))
                else:
                    tps = runner._throughput(mode, workers, out_dir, records, a.warmup)
                    step_s[path].append(global_batch_tokens / tps)
                samples[path].append(latencies(folder))
        ratios = [n / s for s, n in zip(step_s["shared memory"], step_s["network module"])]
        row = {"ratio": ratios, "ratio_median": statistics.median(ratios)}
        for path in PATHS:
            pooled = np.concatenate(samples[path])
            row[path] = {"step_s": step_s[path], "step_s_median": statistics.median(step_s[path]),
                         "atomics": int(pooled.size),
                         "p50_s": float(np.percentile(pooled, 50)) if pooled.size else None,
                         "p99_s": float(np.percentile(pooled, 99)) if pooled.size else None,
                         "max_s": float(pooled.max()) if pooled.size else None}
        out[mode] = row
    return out


def format_network(n: dict) -> list[str]:
    cores = "a core per rank" if n["core_per_rank"] else "ranks share the cores"
    lines = [f"network: {n['servers']} server + {n['workers']} workers ({cores}), "
             f"{n['steps']} steps; network module (MPIR_CVAR_NOLOCAL=1) vs shared memory, "
             f"interleaved"]
    for mode in MODES:
        m = n[mode]
        shm, net = m["shared memory"], m["network module"]
        lines.append(
            f"  {mode}: step {1e3 * shm['step_s_median']:.1f} ms shm, "
            f"{1e3 * net['step_s_median']:.1f} ms net = {m['ratio_median']:.3f}x (target <= "
            f"{n['step_ratio_target']:.2f}; per repeat {', '.join(f'{r:.3f}' for r in m['ratio'])})")
        for name, p in (("shm", shm), ("net", net)):
            if p["atomics"]:
                lines.append(f"    atomics to other ranks ({name}): {p['atomics']:,}, p50 "
                             f"{1e6 * p['p50_s']:.0f} us, p99 {1e6 * p['p99_s']:.0f} us, max "
                             f"{1e6 * p['max_s']:.0f} us (target p99 <= "
                             f"{1e6 * n['p99_target_s']:.0f} us)")
    return lines
