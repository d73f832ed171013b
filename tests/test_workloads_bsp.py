"""Skip-gram and RNN classifier through the parameter server.

BSP with 3 ranks (1 server, 2 workers of batch b) must reproduce, step by step,
one process with batch 2b: per-step loss and (global) gradient norm and the final
val_loss within rel 1e-5. SSP and ASP must train (smoke runs), and skip-gram
pushes only the embedding rows a batch touched: far fewer bytes than dense.
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
from synthetic_corpora import make_classification_corpus

pytestmark = pytest.mark.mpi

STEPS = 6
BATCH = 16
BPE_VOCAB = 1024
SKIPGRAM_DIM = 16
COMMON = [f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.eval_every=0",
          "train.eval_steps=2", "train.peak_flops=1e9"]
CLIP = {"skipgram": 0.1, "rnn": 0.2}     # small enough that clipping engages
OVERRIDES = {
    "skipgram": ["configs/skipgram.toml", f"skipgram.dim={SKIPGRAM_DIM}", "skipgram.window=3"],
    "rnn": ["configs/rnn_langid.toml", "rnn.embed_dim=8", "rnn.hidden_size=16",
            "rnn.max_len=20"],
}


@pytest.fixture(scope="module")
def corpora(shakespeare_path, tmp_path_factory):
    """A small byte-level BPE corpus (skip-gram) and a synthetic 4-class corpus (rnn)."""
    from hpcps.data.prepare import prepare
    root = tmp_path_factory.mktemp("ps_workloads")
    text = root / "shakespeare_head.txt"
    text.write_text(shakespeare_path.read_text(encoding="utf-8")[:150_000], encoding="utf-8")
    bpe = root / "bpe.h5"
    prepare([str(text)], str(bpe), tokenizer="bpe", vocab_size=BPE_VOCAB, quiet=True)
    return {"skipgram": bpe,
            "rnn": make_classification_corpus(root / "classes.h5", n_train=400, n_val=64)}


def workload_args(workload, corpora, run_dir, batch=BATCH, extra=()) -> list[str]:
    """Quiet ``train_args`` of ``workload``'s small model on its corpus."""
    config, *overrides = OVERRIDES[workload]
    return ["-q", *train_args(config, corpora[workload], run_dir, *COMMON, *overrides,
                              f"train.grad_clip={CLIP[workload]}", f"train.batch_size={batch}",
                              *extra)]


@pytest.fixture(scope="module")
def reference(corpora, tmp_path_factory):
    """One process with a given global batch (default 2b), per workload (cached)."""
    cache = {}

    def get(workload, batch=2 * BATCH):
        if (workload, batch) not in cache:
            run = tmp_path_factory.mktemp(f"single_{workload}")
            cmd = [sys.executable, "-m", "hpcps",
                   *workload_args(workload, corpora, run, batch), "ps.mode=single"]
            check_ok(run_command(cmd, 60, mpi_env("mpich")))
            cache[workload, batch] = read_metrics(run)
        return cache[workload, batch]
    return get


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workload", ["skipgram", "rnn"])
def test_bsp_at_three_ranks_equals_one_process(workload, mpi_impl, corpora, reference, tmp_path):
    run = tmp_path / "run"
    check_ok(run_mpi(3, workload_args(workload, corpora, run,
                                      extra=["ps.mode=bsp", "ps.servers=1"]),
                     mpi_impl, timeout=90))
    ours = read_metrics(run)
    ref = reference(workload)
    assert mismatches(ours, ref) == []
    assert len({r["loss"] for r in ours}) == STEPS
    assert any(r["grad_norm"] > CLIP[workload] for r in ours), "clipping never engaged"


@pytest.mark.parametrize("workload", ["skipgram", "rnn"])
def test_the_comparison_catches_a_different_global_batch(workload, reference):
    """Negative control: one worker's half of the batch is not the global batch."""
    assert mismatches(reference(workload, BATCH), reference(workload)) != []


def _smoke(workload, mode, corpora, run, extra=()):
    require_implementation("mpich")
    check_ok(run_mpi(3, workload_args(workload, corpora, run,
                                      extra=[f"ps.mode={mode}", "ps.servers=1", *extra]),
                     "mpich", timeout=90))
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert math.isfinite(records[-1]["val_loss"])
    return records


@pytest.mark.timeout(120)
def test_skipgram_ssp_and_asp_train_and_pushes_are_sparse(corpora, tmp_path):
    # every worker its own steps: the lead pushes once per record (with a sample budget it
    # takes only its share of each step's batches, and the per-record bytes shrink with it)
    sparse = _smoke("skipgram", "ssp", corpora, tmp_path / "ssp", ["ps.budget=worker_steps"])
    dense = _smoke("skipgram", "asp", corpora, tmp_path / "asp",
                   ["ps.sparse_embedding=false", "ps.budget=worker_steps"])
    dense_bytes = 2 * BPE_VOCAB * SKIPGRAM_DIM * 4
    dense_mb = sum(r["push_mb"] for r in dense) / STEPS
    sparse_mb = sum(r["push_mb"] for r in sparse) / STEPS
    assert dense_mb >= dense_bytes / 1e6
    # 16 pairs touch at most 16 + 16 * 6 of the 2 x 1024 rows
    assert sparse_mb < 0.2 * dense_mb, (sparse_mb, dense_mb)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["ssp", "asp"])
def test_rnn_trains_in_ssp_and_asp(mode, corpora, tmp_path):
    records = _smoke("rnn", mode, corpora, tmp_path / mode)
    assert 0.0 <= records[-1]["val_accuracy"] <= 1.0
