"""Device check for the GPU path: one command, one JSON, a summary table.

    bash benchmarks/gpu_check.sh OUT.json [--budget SECONDS] [--stages a,b,...]

Stages, each in its own subprocess with its own time limit (a failure or a
timeout is recorded and the next stage still runs), inside one overall budget:

- correctness: fused kernels vs NumPy references, every layer and the whole GPT
  vs NumPy (float64 and fp32; target rel <= 1e-5 in fp32), AdamW, the cuBLAS
  GEMM path (fp32 / TF32 / bf16) vs cupy.matmul, a CUDA-aware MPI probe;
- bsp: mpirun -n 3 (1 server + 2 GPU workers sharing the GPU, gpu.share=true)
  vs one process with the doubled batch, and allreduce with 2 ranks, step by step;
- throughput: GPT-2 124M (12 x 768, block 1024, vocab 50304) tokens/s and MFU in
  fp32, tf32 and bf16 at the largest batch that fits (doubling until OOM or time);
- bandwidth: PS push + pull of GPU buffers (staged path) vs raw RMA moving the
  same GPU buffers through the same pinned memory (mpirun -n 2);
- pytest: tests/test_gpu_backend.py with CuPy present (the shared test bodies).

Nothing is installed or downloaded; missing packages are named in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = {"correctness": 150, "bsp": 120, "throughput": 150, "bandwidth": 75, "pytest": 120}
GPT2 = dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, block_size=1024)
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32",
        "train.max_steps=8", "train.warmup_steps=2", "train.eval_every=0", "train.eval_steps=2",
        "train.peak_flops=1e9", "train.grad_clip=1.0"]
REL = 1e-5


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- environment ------------------------------------------------------------------------

def _run(cmd, timeout: float, env=None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=str(ROOT))
    except subprocess.TimeoutExpired as err:
        return subprocess.CompletedProcess(cmd, 124, err.stdout or "", f"timed out after {timeout} s")


def find_mpirun():
    for candidate in [Path(sys.executable).parent / "mpirun",
                      *(Path(p) / "bin" / "mpirun" for p in sys.path if p)]:
        if candidate.exists():
            return str(candidate)
    return shutil.which("mpirun")


def environment() -> dict:
    import importlib.util
    env = {"python": sys.version.split()[0], "executable": sys.executable, "missing": []}
    for name in ("numpy", "cupy", "mpi4py", "h5py", "pytest"):
        spec = importlib.util.find_spec(name)
        env[name] = None
        if spec is not None:
            probe = _run([sys.executable, "-c", f"import {name}; print({name}.__version__)"], 60)
            env[name] = probe.stdout.strip() or f"import failed: {probe.stderr.strip()[-300:]}"
        if not env[name] or env[name].startswith("import failed"):
            env["missing"].append(f"{name}: {env[name] or 'not installed'}")
    probe = _run([sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version()"
                  ".splitlines()[0])"], 60)
    env["mpi_library"] = probe.stdout.strip() if probe.returncode == 0 else None
    if env["mpi4py"] and not env["mpi_library"]:
        env["missing"].append("MPI library: mpi4py imports but no libmpi loads (carry the mpich "
                              "wheel, see docs/gpu.md): " + probe.stderr.strip()[-300:])
    env["mpirun"] = find_mpirun()
    if not env["mpirun"]:
        env["missing"].append("mpirun: not found (the mpich wheel ships one; docs/gpu.md)")
    probe = _run([sys.executable, "-c", "import cupy, json; d = cupy.cuda.Device(); p = "
                  "cupy.cuda.runtime.getDeviceProperties(0); print(json.dumps({'name': "
                  "p['name'].decode(), 'cc': d.compute_capability, 'memory_gib': "
                  "d.mem_info[1] / 2**30, 'count': cupy.cuda.runtime.getDeviceCount(), "
                  "'cuda_runtime': cupy.cuda.runtime.runtimeGetVersion()}))"], 90)
    env["gpu"] = json.loads(probe.stdout) if probe.returncode == 0 else None
    if env["gpu"] is None:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        env["missing"].append(f"GPU: CuPy cannot use a device: {last[-300:]}")
    smi = _run(["nvidia-smi", "-L"], 20) if shutil.which("nvidia-smi") else None
    env["nvidia_smi"] = smi.stdout.strip() if smi is not None else None
    return env


# -- stage: correctness ----------------------------------------------------------------

def _guard(results: dict, name: str, fn) -> None:
    try:
        results[name] = fn()
    except Exception as err:
        results[name] = {"error": f"{type(err).__name__}: {err}",
                         "traceback": traceback.format_exc()[-2000:]}


def stage_correctness() -> dict:
    import cupy

    from hpcps.bench import gpu_parity as parity
    from hpcps.gpu import precision
    out: dict = {"tolerance": {"fp64": parity.FP64_REL, "fp32": parity.FP32_REL}}
    for dt, key in ((np.float64, "fp64"), (np.float32, "fp32")):
        _guard(out, f"kernels_{key}", lambda dt=dt: parity.kernel_parity(cupy, dt))
        _guard(out, f"layers_{key}", lambda dt=dt: parity.layer_parity(cupy, dt))
        _guard(out, f"model_{key}", lambda dt=dt: parity.model_parity(cupy, dt))
    _guard(out, "model_fp32_wider", lambda: parity.worst(
        parity.model_case(cupy, np.float32, n_layer=3, n_embd=96, n_head=4, vocab=301,
                          block=64, batch=4),
        parity.model_case(np, np.float32, n_layer=3, n_embd=96, n_head=4, vocab=301,
                          block=64, batch=4)))
    _guard(out, "adamw", lambda: parity.adamw_parity(cupy))
    _guard(out, "gemm", lambda: _gemm_checks(cupy, np, precision, parity))
    _guard(out, "cuda_aware_probe", _cuda_aware_probe)
    checks = []
    for key in ("kernels_fp64", "layers_fp64", "kernels_fp32", "layers_fp32"):
        values = out[key].values() if isinstance(out[key], dict) and "error" not in out[key] else [1.0]
        checks.append(max(values) <= (parity.FP64_REL if key.endswith("64") else parity.FP32_REL))
    for key, tol in (("model_fp64", parity.FP64_REL), ("model_fp32", parity.FP32_REL),
                     ("model_fp32_wider", parity.FP32_REL), ("adamw", 1e-6)):
        checks.append(isinstance(out[key], float) and out[key] <= tol)
    gemm = out["gemm"]
    checks.append(isinstance(gemm, dict) and gemm.get("ok", False))
    out["ok"] = all(checks)
    return out


def _gemm_checks(cupy, np, precision, parity) -> dict:
    rng = np.random.default_rng(0)
    qkv = cupy.asarray(rng.standard_normal((4, 256, 3, 12, 64)), np.float32)
    q = qkv[:, :, 0].transpose(0, 2, 1, 3)
    k = qkv[:, :, 1].transpose(0, 2, 1, 3)
    a = cupy.asarray(rng.standard_normal((512, 768)), np.float32)
    w = cupy.asarray(rng.standard_normal((2304, 768)), np.float32)
    cases = {"linear": (a, w.T), "linear_dw": (a.T, a), "heads": (q, k.swapaxes(-1, -2)),
             "batched": (cupy.ascontiguousarray(q), cupy.ascontiguousarray(k).swapaxes(-1, -2))}
    tol = {"fp32": 1e-5, "tf32": 1e-2, "bf16": 3e-2}
    result, ok = {}, True
    for name, (x, y) in cases.items():
        exact = cupy.matmul(x.astype(np.float64), y.astype(np.float64))
        for compute in tol:
            err = parity.rel_error(precision.matmul(x, y, compute=compute), exact)
            result[f"{name}_{compute}"] = err
            ok = ok and err <= tol[compute]
    result["ok"] = ok
    return result


CUDA_AWARE_PROBE = """
import cupy
from mpi4py import MPI
src = cupy.arange(8, dtype=cupy.float32); dst = cupy.zeros(8, dtype=cupy.float32)
cupy.cuda.get_current_stream().synchronize()
MPI.COMM_SELF.Allreduce(src, dst)
print("yes" if bool((dst == src).all()) else "wrong")
"""


def _cuda_aware_probe() -> dict:
    """Hand a device buffer to MPI in a throwaway process (a non-CUDA-aware MPI crashes)."""
    from hpcps.runtime.mpi import cuda_aware_mpi
    query = _run([sys.executable, "-c", "from hpcps.runtime.mpi import cuda_aware_mpi; "
                  "print(cuda_aware_mpi())"], 60)
    probe = _run([sys.executable, "-c", CUDA_AWARE_PROBE], 60)
    del cuda_aware_mpi
    return {"mpix_query": query.stdout.strip() or query.stderr.strip()[-200:],
            "probe": probe.stdout.strip() if probe.returncode == 0 else
            f"no (exit {probe.returncode}: {probe.stderr.strip()[-200:]})"}


# -- stage: bsp equivalence ------------------------------------------------------------

def _corpus(tmp: Path) -> str:
    from hpcps.data.prepare import prepare
    for candidate in (ROOT / "shared/data/tinyshakespeare.txt",
                      ROOT.parent / "shared/data/tinyshakespeare.txt"):
        if candidate.exists():
            source = candidate
            break
    else:   # no corpus travelled: a deterministic stand-in text
        words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta"]
        rng = np.random.default_rng(0)
        source = tmp / "text.txt"
        source.write_text(" ".join(rng.choice(words, 60000)) + "\n")
    out = tmp / "corpus.h5"
    prepare([str(source)], str(out), tokenizer="char", quiet=True)
    return str(out)


def _metrics(run_dir: Path) -> list:
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _compare(ours: list, ref: list) -> dict:
    worst = {"loss": 0.0, "grad_norm": 0.0, "val_loss": 0.0}
    if [r["step"] for r in ours] != [r["step"] for r in ref]:
        return {"ok": False, "error": "different steps"}
    for a, b in zip(ours, ref):
        for key in ("loss", "grad_norm"):
            worst[key] = max(worst[key], abs(a[key] - b[key]) / max(abs(b[key]), 1e-12))
    worst["val_loss"] = abs(ours[-1]["val_loss"] - ref[-1]["val_loss"]) / abs(ref[-1]["val_loss"])
    return {"ok": all(v <= REL for v in worst.values()), "max_rel": worst,
            "steps": len(ours), "final_loss": ours[-1]["loss"]}


def stage_bsp() -> dict:
    mpirun = find_mpirun()
    if mpirun is None:
        raise RuntimeError("mpirun not found: carry the mpich wheel (docs/gpu.md)")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    tmp = Path(tempfile.mkdtemp(prefix="hpcps-gpu-bsp-"))
    corpus = _corpus(tmp)
    device = os.environ.get("HPCPS_CHECK_DEVICE", "gpu")   # cpu: dry-run this harness
    hpcps = [sys.executable, "-m", "mpi4py", "-m", "hpcps", "-q", "train",
             "configs/shakespeare_char.toml", f"data.path={corpus}", *TINY, f"device={device}"]
    out: dict = {}

    def launch(name: str, n: int, batch: int, extra) -> list:
        run_dir = tmp / name
        cmd = ([mpirun, "-n", str(n)] if n > 1 else []) + hpcps + [
            f"train.batch_size={batch}", f"out_dir={run_dir}", *extra]
        started = time.monotonic()
        result = _run(cmd, 100, env)
        out[f"{name}_seconds"] = round(time.monotonic() - started, 1)
        if result.returncode != 0:
            raise RuntimeError(f"{name} exit {result.returncode}: {result.stderr[-1500:]}")
        return _metrics(run_dir)
    reference = launch("single", 1, 4, ["ps.mode=single"])
    out["bsp"] = _compare(launch("bsp", 3, 2, ["ps.mode=bsp", "ps.servers=1", "gpu.share=true"]),
                          reference)
    try:
        out["allreduce"] = _compare(launch("allreduce", 2, 2, ["ps.mode=allreduce",
                                                               "gpu.share=true"]), reference)
    except RuntimeError as err:
        out["allreduce"] = {"ok": False, "error": str(err)}
    out["ok"] = out["bsp"]["ok"]
    return out


# -- stage: throughput -----------------------------------------------------------------

def stage_throughput(budget_s: float = 120.0) -> dict:
    import cupy

    from hpcps.backend import Backend
    from hpcps.gpu import precision
    from hpcps.model.gpt import GPT
    from hpcps.optim.adamw import AdamW
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    out: dict = {"device": name, "model": GPT2, "results": {}}
    deadline = time.monotonic() + budget_s
    shares = {"bf16": 0.3, "tf32": 0.3, "fp32": 0.4}
    for compute in ("bf16", "tf32", "fp32"):
        until = min(deadline, time.monotonic() + shares[compute] * budget_s)
        try:
            out["results"][compute] = _throughput_one(cupy, Backend("cupy", cupy, 0), precision,
                                                       GPT, AdamW, name, compute, until)
        except Exception as err:
            out["results"][compute] = {"error": f"{type(err).__name__}: {err}"}
        cupy.get_default_memory_pool().free_all_blocks()
    bf16 = out["results"].get("bf16", {})
    out["bf16_mfu_spec"] = bf16.get("mfu_spec")
    out["target_bf16_mfu_40_met"] = bool(bf16.get("mfu_spec") and bf16["mfu_spec"] >= 0.40)
    out["ok"] = all("error" not in r and r.get("tokens_per_s") for r in out["results"].values())
    return out


def _throughput_one(cupy, backend, precision, GPT, AdamW, name, compute, until) -> dict:
    precision.set_compute_dtype(compute)
    spec = precision.spec_peak_flops(name, compute)
    measured = precision.measure_peak_flops(compute)
    rows, best = [], None
    for batch in (4, 8, 16, 32, 64, 96, 128):
        if time.monotonic() > until:
            break
        model = params = grads = opt = None
        try:
            model = GPT(**GPT2, backend=backend)
            params = model.init_params(0)
            grads = cupy.zeros_like(params)
            opt = AdamW(params.size, model.layout.decay_ranges(), weight_decay=0.1, xp=cupy)
            rng = np.random.default_rng(batch)
            idx = cupy.asarray(rng.integers(0, GPT2["vocab_size"], (batch, GPT2["block_size"])))
            tgt = cupy.asarray(rng.integers(0, GPT2["vocab_size"], (batch, GPT2["block_size"])))

            def step():
                model.forward_backward(params, grads, idx, tgt)
                opt.step(params, grads, 1e-4)
            step()   # compiles kernels, allocates the workspace
            cupy.cuda.get_current_stream().synchronize()
            t0 = time.perf_counter()
            step()
            cupy.cuda.get_current_stream().synchronize()
            one = time.perf_counter() - t0
            reps = max(1, min(5, int((until - time.monotonic()) / max(one, 1e-3) / 2)))
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            cupy.cuda.get_current_stream().synchronize()
            seconds = (time.perf_counter() - t0) / reps
        except cupy.cuda.memory.OutOfMemoryError:
            rows.append({"batch": batch, "fits": False})
            break
        except Exception as err:
            if "memory" in str(err).lower() or "ALLOC" in str(err):
                rows.append({"batch": batch, "fits": False, "error": str(err)[:200]})
                break
            raise
        finally:
            model = params = grads = opt = None   # frees the memory of this batch size
            cupy.get_default_memory_pool().free_all_blocks()
        tokens = batch * GPT2["block_size"] / seconds
        flops = _flops_per_token() * tokens
        row = {"batch": batch, "fits": True, "step_s": seconds, "tokens_per_s": tokens,
               "tflops": flops / 1e12, "mfu_spec": flops / spec if spec else None,
               "mfu_measured_peak": flops / measured}
        rows.append(row)
        if best is None or tokens > best["tokens_per_s"]:
            best = row
    precision.set_compute_dtype("fp32")
    fitted = [r["batch"] for r in rows if r["fits"]]
    return {"peak_spec_flops": spec, "peak_measured_flops": measured, "rows": rows,
            "largest_batch": max(fitted) if fitted else None,
            "best_batch": best["batch"] if best else None,
            "tokens_per_s": best["tokens_per_s"] if best else None,
            "mfu_spec": best["mfu_spec"] if best else None,
            "mfu_measured_peak": best["mfu_measured_peak"] if best else None}


def _flops_per_token() -> float:
    """nanoGPT's 6 N + 12 L C T for GPT-2 124M (N without the position table, tied head)."""
    c, L, v, t = GPT2["n_embd"], GPT2["n_layer"], GPT2["vocab_size"], GPT2["block_size"]
    n = v * c + L * (12 * c * c + 2 * c) + c
    return 6.0 * n + 12.0 * L * c * t


# -- stage: bandwidth ------------------------------------------------------------------

def stage_bandwidth() -> dict:
    mpirun = find_mpirun()
    if mpirun is None:
        raise RuntimeError("mpirun not found: carry the mpich wheel (docs/gpu.md)")
    out_file = Path(tempfile.mkdtemp(prefix="hpcps-gpu-bw-")) / "bw.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = _run([mpirun, "-n", "2", sys.executable, "-m", "mpi4py", __file__,
                   "--mpi-bandwidth", str(out_file)], 70, env)
    if result.returncode != 0 or not out_file.exists():
        raise RuntimeError(f"exit {result.returncode}: {result.stderr[-1500:]}")
    return json.loads(out_file.read_text())


# -- stage: pytest ----------------------------------------------------------------------

def stage_pytest() -> dict:
    result = _run([sys.executable, "-m", "pytest", "tests/test_gpu_backend.py", "-q", "-p",
                   "no:cacheprovider"], 110)
    tail = result.stdout.strip().splitlines()[-1:] or [""]
    return {"ok": result.returncode == 0, "summary": tail[0],
            "output_tail": (result.stdout + result.stderr)[-3000:]}


# -- driver ----------------------------------------------------------------------------

RUNNERS = {"correctness": stage_correctness, "bsp": stage_bsp, "throughput": stage_throughput,
           "bandwidth": stage_bandwidth, "pytest": stage_pytest}
NEEDS = {"correctness": ("cupy",), "bsp": ("cupy", "mpi", "h5py"), "throughput": ("cupy",),
         "bandwidth": ("cupy", "mpi"), "pytest": ("cupy", "pytest")}


def run_stage_here(name: str, out_path: str) -> int:
    """Child process: run one stage, write {"ok": ..., ...} or the error."""
    try:
        result = RUNNERS[name]()
    except Exception as err:
        result = {"ok": False, "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()[-3000:]}
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    return 0


def _blocked(name: str, env: dict) -> str:
    have = {"cupy": env.get("gpu") is not None, "mpi": bool(env.get("mpi_library") and
                                                           env.get("mpirun")),
            "h5py": bool(env.get("h5py")), "pytest": bool(env.get("pytest"))}
    missing = [need for need in NEEDS[name] if not have[need]]
    return ", ".join(missing)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="gpu_check.json", help="JSON file to write")
    parser.add_argument("--budget", type=float, default=285.0, help="seconds for all stages")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--stage-out", help=argparse.SUPPRESS)
    parser.add_argument("--mpi-bandwidth", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mpi_bandwidth:
        from hpcps.bench.gpu_bandwidth import mpi_bandwidth
        mpi_bandwidth(args.mpi_bandwidth)
        return 0
    if args.stage:
        return run_stage_here(args.stage, args.stage_out)
    started = time.monotonic()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}
    log("checking the environment")
    report["environment"] = environment()
    for missing in report["environment"]["missing"]:
        log(f"MISSING {missing}")
    for name in [s for s in args.stages.split(",") if s]:
        if name not in STAGES:
            report["stages"][name] = {"ok": False, "error": "unknown stage"}
            continue
        left = args.budget - (time.monotonic() - started)
        blocked = _blocked(name, report["environment"])
        if blocked or left < 20:
            why = f"missing: {blocked}" if blocked else "no time left in the budget"
            report["stages"][name] = {"ok": False, "skipped": why}
            log(f"{name}: skipped ({why})")
            _write(args.out, report)
            continue
        limit = min(STAGES[name], left)
        log(f"{name}: running (limit {limit:.0f} s)")
        report["stages"][name] = _run_stage(name, limit)
        log(f"{name}: {'ok' if report['stages'][name].get('ok') else 'NOT ok'} in "
            f"{report['stages'][name]['seconds']} s")
        _write(args.out, report)
    report["seconds"] = round(time.monotonic() - started, 1)
    _write(args.out, report)
    print(summary(report), flush=True)
    return 0


def _run_stage(name: str, limit: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stage.json"
        started = time.monotonic()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            proc = subprocess.run([sys.executable, __file__, "--stage", name, "--stage-out",
                                   str(path)], capture_output=True, text=True, timeout=limit,
                                  cwd=str(ROOT), env=env, start_new_session=True)
            code, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as err:
            code, stderr = 124, (err.stderr or b"").decode(errors="replace") \
                if isinstance(err.stderr, bytes) else (err.stderr or "")
        seconds = round(time.monotonic() - started, 1)
        if path.exists():
            result = json.loads(path.read_text())
        else:
            result = {"ok": False, "error": f"exit {code}" + (" (timed out)" if code == 124 else ""),
                      "stderr_tail": stderr[-3000:]}
        result["seconds"] = seconds
        return result


def _write(path: str, report: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    os.replace(tmp, path)


def summary(report: dict) -> str:
    env = report["environment"]
    gpu = env.get("gpu") or {}
    lines = [f"gpu_check | {gpu.get('name', 'no GPU')} | cupy {env.get('cupy')} | "
             f"{env.get('mpi_library') or 'no MPI'} | {report.get('seconds')} s",
             f"{'stage':<12} {'ok':<4} {'s':>6}  detail"]
    for name, st in report["stages"].items():
        lines.append(f"{name:<12} {'yes' if st.get('ok') else 'NO':<4} "
                     f"{st.get('seconds', 0):>6}  {_detail(name, st)}")
    return "\n".join(lines)


def _detail(name: str, st: dict) -> str:
    if "skipped" in st:
        return f"skipped: {st['skipped']}"
    if "error" in st:
        return st["error"][:150]
    try:
        if name == "correctness":
            worst = {k: max(v.values()) if isinstance(v, dict) else v
                     for k, v in st.items() if k.startswith(("kernels", "layers", "model"))}
            return " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}=?"
                            for k, v in worst.items()) + f" gemm_ok={st['gemm'].get('ok')}"
        if name == "bsp":
            return f"bsp {st['bsp'].get('max_rel')} allreduce ok={st['allreduce'].get('ok')}"
        if name == "throughput":
            return " ".join(f"{c}: B={r.get('best_batch')} {r.get('tokens_per_s') or 0:,.0f} tok/s "
                            f"MFU {100 * (r.get('mfu_spec') or 0):.1f}%"
                            for c, r in st["results"].items())
        if name == "bandwidth":
            return " ".join(f"{r['bytes'] >> 20}MiB ps/raw={r['ratio']:.2f}" for r in st["rows"])
        if name == "pytest":
            return st["summary"]
    except (KeyError, TypeError, ValueError) as err:
        return f"(unreadable: {err})"
    return ""


if __name__ == "__main__":
    sys.exit(main())
