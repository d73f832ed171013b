"""The memory estimate: exact against a real step's workspace, node memory from /proc and
the cgroup files (v1 and v2, on a fake tree), the one-line refusal with settings that would
fit, a 77 B-parameter job refused within seconds on every rank, ``hpcps plan``, and the
estimate beside the measured peak at three GPT sizes."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import numpy as np
import pytest
from mpi_util import QUIET_THREADS, run_command, run_mpi, train_args
from test_ps_errors import RANK_EXIT, check_agreed_exit
from train_util import cli, one_line_error

from hpcps.bench.plan import ModelOnly, job_shape
from hpcps.config import load_config
from hpcps.errors import UserError
from hpcps.model.gpt import GPT
from hpcps.model.memory import TransformerShape, workspace_bytes
from hpcps.runtime.memory import NodeMemory, node_memory
from hpcps.train.memory import check_nodes, estimate_job

pytestmark = pytest.mark.timeout(120)


# -- the model's share ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["none", "attention", "block"])
@pytest.mark.parametrize("bias,dropout,vocab,evaluate", [(False, 0.0, 17, False),
                                                         (True, 0.2, 3001, True),
                                                         (True, 0.0, 50000, True)])
def test_workspace_estimate_is_exact(mode, bias, dropout, vocab, evaluate):
    model = GPT(vocab_size=vocab, n_layer=2, n_head=4, n_embd=24, block_size=40, bias=bias,
                dropout=dropout, threads=1, recompute=mode)
    params = model.init_params(0)
    grads = np.empty_like(params)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, vocab, (3, 40)), rng.integers(0, vocab, (3, 40))
    model.forward_backward(params, grads, idx, targets, [1, 2, 3] if dropout else None)
    if evaluate:
        model.loss(params, idx, targets)
    (ws,) = model._workspaces.values()
    shape = TransformerShape(2, 4, 24, 40, vocab, bias, dropout)
    assert sum(workspace_bytes(shape, 3, mode, evaluate).values()) == ws.nbytes
    # negative control: one layer more is 14 (N, C) + 7 C² floats (+ probabilities) more
    deeper = TransformerShape(3, 4, 24, 40, vocab, bias, dropout)
    assert sum(workspace_bytes(deeper, 3, mode, evaluate).values()) > ws.nbytes


def test_recompute_shrinks_the_estimate_of_gpt2_small():
    """GPT-2 124M at B = 4, T = 1024: the modes' activations in the published ratio
    (block keeps 1 of ~14 (N, C) arrays per layer and no probabilities)."""
    model = GPT(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024,
                bias=True, threads=1)
    none, att, block = (model.memory_bytes(4, m) for m in ("none", "attention", "block"))
    # logits a block of 333 rows at a time (64 MiB), not 4096 x 50257
    assert none["logits"] == att["logits"] == block["logits"] == 333 * 50257 * 4
    assert none["activations"] > att["activations"] > 5 * block["activations"]
    # none: 13 blocks (12 + one for evaluation) of 14 (N, C) + 7 C² floats + 12 layers' probs
    n, c = 4096, 768
    assert none["activations"] == 4 * (13 * (14 * n * c + 7 * c * c + 7 * c)
                                       + 12 * 4 * 12 * 1024 * 1024)


# -- what a node can give ------------------------------------------------------------------

def _fake_tree(root, cgroup_lines, files):
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text("MemTotal: 24000000 kB\nMemFree: 1000 kB\n"
                                           "MemAvailable: 20000000 kB\n")
    (root / "proc" / "self" / "cgroup").write_text("\n".join(cgroup_lines) + "\n")
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)


def test_node_memory_without_a_limit_is_memavailable(tmp_path):
    _fake_tree(tmp_path, ["0::/job"], {"sys/fs/cgroup/job/memory.max": "max\n"})
    assert node_memory(str(tmp_path)) == NodeMemory(20000000 * 1024, "MemAvailable")


def test_node_memory_cgroup_v2_limit_of_an_ancestor(tmp_path):
    _fake_tree(tmp_path, ["0::/slurm/job_7/step_0"], {
        "sys/fs/cgroup/slurm/job_7/memory.max": str(8 << 30),
        "sys/fs/cgroup/slurm/job_7/memory.current": str(3 << 30),
        "sys/fs/cgroup/slurm/job_7/memory.stat": f"anon 1\ninactive_file {1 << 30}\n",
        "sys/fs/cgroup/slurm/job_7/step_0/memory.max": "max"})
    assert node_memory(str(tmp_path)) == NodeMemory(6 << 30, "cgroup memory limit")


def test_node_memory_cgroup_v1(tmp_path):
    _fake_tree(tmp_path, ["4:memory:/batch", "3:cpu:/"], {
        "sys/fs/cgroup/memory/batch/memory.limit_in_bytes": str(2 << 30),
        "sys/fs/cgroup/memory/batch/memory.usage_in_bytes": str(1 << 30)})
    assert node_memory(str(tmp_path)) == NodeMemory(1 << 30, "cgroup memory limit")


# -- the check -----------------------------------------------------------------------------

def _gpt_job(*overrides, ranks=3):
    cfg = load_config(None, ["model.n_layer=12", "model.n_head=12", "model.n_embd=768",
                             "model.block_size=1024", "model.bias=true", "train.batch_size=8",
                             *overrides])
    m = cfg.model
    model = GPT(vocab_size=50257, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                block_size=m.block_size, bias=m.bias, threads=1, recompute=cfg.train.recompute)
    return cfg, job_shape(cfg, ranks, 1), ModelOnly(model)


def test_check_names_the_largest_term_and_what_would_fit():
    cfg, job, workload = _gpt_job()
    estimates = estimate_job(cfg, job, workload, {})
    workers = [e for e in estimates if e.kind == "worker"]
    assert [e.largest()[0] for e in workers] == ["activations", "activations"]
    need = sum(e.to_allocate for e in estimates)
    check_nodes(cfg, job, workload, estimates, {0: NodeMemory(need, "test")})   # fits exactly
    with pytest.raises(UserError) as err:
        check_nodes(cfg, job, workload, estimates, {0: NodeMemory(need // 2, "test")})
    text = str(err.value)
    assert "\n" not in text
    assert re.search(r"largest term: worker rank \d's activations \(\d+\.\d GiB\)", text), text
    assert "would fit: train.recompute=block" in text and "train.batch_size=" in text


def test_check_names_one_slot_when_a_slot_less_would_fit():
    cfg, job, workload = _gpt_job("ps.mode=bsp", "train.recompute=block", "train.batch_size=1")
    estimates = estimate_job(cfg, job, workload, {})
    server = next(e for e in estimates if e.kind == "server")
    slot = server.terms["receive slots"] // 2
    need = sum(e.to_allocate for e in estimates)
    with pytest.raises(UserError) as err:
        check_nodes(cfg, job, workload, estimates, {0: NodeMemory(need - slot // 2, "test")})
    assert "would fit: ps.slots=1" in str(err.value), str(err.value)
    # negative control: half a slot more than one slot saves is not offered as fitting
    with pytest.raises(UserError) as err:
        check_nodes(cfg, job, workload, estimates,
                    {0: NodeMemory(need - slot - slot // 2, "test")})
    assert "ps.slots=1" not in str(err.value)


def test_check_says_when_no_setting_fits():
    cfg, job, workload = _gpt_job()
    estimates = estimate_job(cfg, job, workload, {})
    with pytest.raises(UserError, match="no setting fits: one worker alone needs"):
        check_nodes(cfg, job, workload, estimates, {0: NodeMemory(1 << 28, "test")})


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_a_77b_model_exits_2_within_seconds_with_one_line(mpi_impl, tmp_path, shakespeare_corpus):
    """96 layers of width 8192 (77.7 B parameters) with 1 server + 2 workers on this machine:
    every rank exits 2 before allocating anything, rank 0 prints one line."""
    start = time.monotonic()
    proc = run_mpi(3, train_args("configs/gpt2_124m.toml", shakespeare_corpus, tmp_path / "run",
                                 "device=cpu", "model.n_layer=96", "model.n_embd=8192",
                                 "model.n_head=64"), mpi_impl, timeout=40,
                   program=["-c", RANK_EXIT])
    elapsed = time.monotonic() - start
    check_agreed_exit(proc, 3, "not enough memory: the 3 rank(s) on node 0")
    assert "largest term: worker rank 0's activations" in proc.stderr
    assert "no setting fits: one worker alone needs" in proc.stderr
    assert elapsed < 10, elapsed


# -- hpcps plan ------------------------------------------------------------------------------

def test_plan_gpt2_124m_on_64_nodes(capsys):
    code, out, err = cli(capsys, "plan", "configs/gpt2_124m.toml", "--ranks", "320",
                         "--nodes", "64")
    assert code == 0, err
    assert "ssp: 320 ranks on 64 node(s), 64 server(s), 256 worker(s)" in out
    # the totals add this process's own resident set (here: pytest's), the terms do not
    assert re.search(r"server x64: \d\.\d GiB \(receive slots 1.9 GiB, checkpoint snapshot 22 MiB", out)
    assert re.search(r"worker x256: \d\.\d GiB \(parameters \+ gradients 949 MiB, push buffers "
                     r"475 MiB\)", out)
    # docs/scaling.md: 436 ms with 73 ms of compute (here 6 P tokens at 40 % of 312 TFLOP/s)
    assert "bsp step (docs/scaling.md model): 437 ms (compute 74 ms, busiest link 319 ms" in out
    assert "advice: ps.servers=64 ps.hierarchy=node ps.compression=bf16: 248 ms" in out


def test_plan_overrides_after_options_and_bad_layouts(capsys):
    code, out, err = cli(capsys, "plan", "configs/gpt2_124m.toml", "--ranks", "320",
                         "--nodes", "64", "ps.hierarchy=node", "ps.compression=bf16")
    assert code == 0, err
    assert "node hierarchy" in out and "bsp step (docs/scaling.md model): 248 ms" in out
    assert "advice: ps.servers" not in out
    text = one_line_error(*cli(capsys, "plan", "configs/gpt2_124m.toml", "--ranks", "3",
                               "--nodes", "4"))
    assert "at least one rank per node" in text


# -- the estimate beside the measured peak ----------------------------------------------------

@pytest.mark.timeout(300)
def test_estimate_within_15_percent_of_the_measured_peak(tmp_path, shakespeare_corpus):
    """Three GPT sizes (0.4, 0.9 and 1.5 GiB peaks) trained for two steps in one process;
    memory.json holds the banner's estimate and the measured peak (VmHWM)."""
    sizes = [(4, 256, 256, 8), (6, 384, 256, 8), (8, 512, 512, 4)]
    ranks = []
    for layers, width, block, batch in sizes:
        run = tmp_path / f"gpt{width}"
        proc = run_command([sys.executable, "-m", "hpcps", "-q", *train_args(
            "configs/shakespeare_char.toml", shakespeare_corpus, run, f"model.n_layer={layers}",
            f"model.n_embd={width}", f"model.n_head={width // 64}", f"model.block_size={block}",
            f"train.batch_size={batch}", "train.max_steps=2", "train.eval_every=0",
            "train.eval_steps=1", "train.peak_flops=1e9")],
            timeout=200, env={**os.environ, **QUIET_THREADS})
        assert proc.returncode == 0, proc.stderr
        ranks.append(json.loads((run / "memory.json").read_text())["ranks"]["0"])
    ratios = [r["estimate_bytes"] / r["peak_bytes"] for r in ranks]
    assert all(0.85 <= r <= 1.15 for r in ratios), ratios
    # negative control: the sizes are far enough apart that a wrong size's estimate misses
    assert ranks[0]["estimate_bytes"] / ranks[1]["peak_bytes"] < 0.85
    assert ranks[1]["estimate_bytes"] / ranks[2]["peak_bytes"] < 0.85
