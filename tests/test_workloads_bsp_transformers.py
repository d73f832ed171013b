"""BERT MLM and seq2seq through the real runtime and parameter server.

BSP with 1 server + 2 workers of batch b must reproduce one process with batch 2b
step by step (loss and clipped gradient norm within rel 1e-5: fp32 sums in another
order), with dropout on, so per-sequence masks and keys are exercised; for seq2seq
the workers also pad their slices to different lengths and push sparse encoder
embedding rows. SSP and ASP runs must complete with finite losses and the
workload's evaluation metrics. The shipped configs are the base of every run.
"""

from __future__ import annotations

import math
import sys

import pytest
from mpi_util import (
    check_ok,
    mismatches,
    mpi_env,
    read_metrics,
    require_implementation,
    run_command,
    run_mpi,
    train_args,
)
from synthetic_corpora import write_mapping_corpus

pytestmark = pytest.mark.mpi

STEPS = 5
BATCH = 2
REL = 1e-5
COMMON = [f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.eval_every=0",
          "train.eval_steps=2", "train.peak_flops=1e9", "train.log_every=1",
          "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.dropout=0.1"]
WORKLOADS = {
    "bert": ("configs/bert_mlm.toml", ["model.block_size=16"], "val_accuracy"),
    "seq2seq": ("configs/seq2seq_en_zh.toml",
                ["seq2seq.max_src_len=10", "seq2seq.max_tgt_len=10", "seq2seq.eval_pairs=6",
                 "seq2seq.beam=2"], "val_bleu"),
}


@pytest.fixture(scope="module")
def corpora(shakespeare_corpus, tmp_path_factory):
    pytest.importorskip("hpcps.data.seqcorpus")
    parallel = write_mapping_corpus(tmp_path_factory.mktemp("par") / "map.h5", 200, 16)
    return {"bert": shakespeare_corpus, "seq2seq": parallel}


def workload_args(workload: str, corpus, run_dir, batch: int, extra=()) -> list[str]:
    """Quiet ``train_args`` of ``workload``'s small model (dropout on) on ``corpus``."""
    config, overrides, _ = WORKLOADS[workload]
    return ["-q", *train_args(config, corpus, run_dir, *COMMON, *overrides,
                              f"train.batch_size={batch}", *extra)]


@pytest.fixture(scope="module")
def single_runs(corpora, tmp_path_factory):
    """One-process runs with the global batch, once per workload."""
    cache = {}

    def get(workload: str) -> list[dict]:
        if workload not in cache:
            run = tmp_path_factory.mktemp(f"single_{workload}")
            cmd = [sys.executable, "-m", "hpcps",
                   *workload_args(workload, corpora[workload], run, 2 * BATCH), "ps.mode=single"]
            check_ok(run_command(cmd, 90, mpi_env("mpich")))
            cache[workload] = read_metrics(run)
        return cache[workload]
    return get


@pytest.mark.timeout(200)
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_bsp_equals_one_process_with_the_global_batch(mpi_impl, tmp_path, corpora, single_runs,
                                                      workload):
    run = tmp_path / "run"
    check_ok(run_mpi(3, workload_args(workload, corpora[workload], run, BATCH,
                                      ["ps.mode=bsp", "ps.servers=1"]), mpi_impl, timeout=120))
    ours, ref = read_metrics(run), single_runs(workload)
    assert mismatches(ours, ref) == []
    metric = WORKLOADS[workload][2]
    assert math.isfinite(ours[-1][metric]) and math.isfinite(ref[-1][metric])
    # negative control: the comparison notices a loss off by 10x the tolerance
    nudged = [dict(r, loss=r["loss"] * (1 + 10 * REL)) for r in ref]
    assert len(mismatches(ours, nudged)) == STEPS


@pytest.mark.timeout(200)
@pytest.mark.parametrize("mode", ["ssp", "asp"])
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_async_modes_run(tmp_path, corpora, workload, mode):
    require_implementation("mpich")
    run = tmp_path / "run"
    check_ok(run_mpi(3, workload_args(workload, corpora[workload], run, BATCH,
                                      [f"ps.mode={mode}", "ps.servers=1"]),
                     "mpich", timeout=120))
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    last = records[-1]
    assert math.isfinite(last["val_loss"]) and math.isfinite(last[WORKLOADS[workload][2]])
    if workload == "bert":
        assert 0 < last["val_unigram_accuracy"] < 1
    else:
        assert last["val_copy_bleu"] == 0.0
