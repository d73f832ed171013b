"""``train.init_from``: fine-tuning starts from the imported weights with a fresh optimizer,
schedule and step 0, in every mode (bsp equal to one process), takes the model shape from the
checkpoint, and refuses a contradicting command-line key or a corpus of another tokenizer in
one line (on every rank of an MPI job)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mpi_util import (
    assert_one_line_error,
    assert_same_run,
    final_params,
    mismatches,
    read_metrics,
    run_mpi,
)
from pretrained_util import FINETUNE_TEXT, hpcps, hpcps_gpt2_dir, prepare_text
from train_util import cli

from hpcps.cli import main
from hpcps.config.load import load_config
from hpcps.inference.gpt import load_gpt
from hpcps.workloads.gpt import build

pytest.importorskip("tokenizers")
pytestmark = pytest.mark.timeout(180)

FINETUNE = ["train.lr=1e-3", "train.warmup_steps=2", "train.lr_decay_steps=100",
            "train.eval_every=0", "train.eval_steps=2", "train.log_every=100",
            "train.peak_flops=1e12", "train.resume=auto"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(run directory of an imported GPT-2, a corpus of new text in its tokenizer)."""
    root = tmp_path_factory.mktemp("init_from")
    source = hpcps_gpt2_dir(root)
    run = root / "imported"
    assert main(["import", str(source), "--format", "hf-gpt2", "-o", str(run)]) == 0
    return run, prepare_text(FINETUNE_TEXT, run / "tokenizer.json", root / "new.h5")


def finetune_args(imported, out_dir, *extra) -> list:
    run, corpus = imported
    return ["train", f"train.init_from={run}", f"data.path={corpus}", f"out_dir={out_dir}",
            *FINETUNE, *extra]


def first_batch_loss(run_dir, imported_run) -> float:
    """The imported model's loss on step 0's batch of a run (what its step 1 must log)."""
    cfg = load_config(str(run_dir / "config.toml"))
    workload = build(cfg, load_gpt(str(imported_run)).model.backend)
    x, y = workload.train_batch(0, 0, cfg.train.batch_size)
    loaded = load_gpt(str(imported_run))
    return float(loaded.model.loss(loaded.params, x, y))


def test_one_process_starts_at_the_imported_loss_and_lowers_val(imported, tmp_path, capsys):
    run, corpus = imported
    ft = tmp_path / "ft"
    proc = hpcps(*finetune_args(imported, ft, "train.batch_size=8", "train.max_steps=30"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"starting from the weights of {run}/checkpoints/step_00000000" in proc.stdout
    records = read_metrics(ft)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert records[0]["loss"] == pytest.approx(first_batch_loss(ft, run), rel=1e-5)
    vocab = load_gpt(str(run)).model.vocab_size
    assert records[0]["loss"] < math.log(vocab) - 0.5            # pretrained, not random
    saved = load_config(str(ft / "config.toml"))
    assert (saved.model.n_layer, saved.model.n_embd, saved.model.bias) == (2, 32, True)

    def val_loss(checkpoint) -> float:
        code, out, err = cli(capsys, "eval", checkpoint, "--data", corpus, "--json")
        assert code == 0, err
        return json.loads(out)["loss"]
    before, after = val_loss(run), val_loss(ft)
    assert after < before - 0.05, (before, after)
    # negative control: the same run from scratch starts at ln V
    scratch = tmp_path / "scratch"
    proc = hpcps("train", f"data.path={corpus}", f"out_dir={scratch}", *FINETUNE,
                 "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                 "model.bias=true", "train.batch_size=8", "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(scratch)[0]["loss"] == pytest.approx(math.log(vocab), abs=0.1)


def test_a_run_resumes_its_own_checkpoint_not_the_import(imported, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert hpcps(*finetune_args(imported, straight, "train.max_steps=8")).returncode == 0
    assert hpcps(*finetune_args(imported, split, "train.max_steps=4")).returncode == 0
    proc = hpcps(*finetune_args(imported, split, "train.max_steps=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {split}/checkpoints/step_00000004" in proc.stdout
    assert "starting from the weights" not in proc.stdout
    assert_same_run(split, straight)
    assert final_params(split).tobytes() == final_params(straight).tobytes()


@pytest.mark.mpi
def test_bsp_equals_one_process_from_the_import(imported, tmp_path, mpi_impl):
    one, bsp = tmp_path / "one", tmp_path / "bsp"
    assert hpcps(*finetune_args(imported, one, "train.batch_size=8",
                                "train.max_steps=12")).returncode == 0
    proc = run_mpi(3, finetune_args(imported, bsp, "train.batch_size=4", "train.max_steps=12",
                                    "ps.mode=bsp"), mpi_impl, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 server(s)" in proc.stdout and "2 worker(s)" in proc.stdout
    assert mismatches(read_metrics(bsp), read_metrics(one)) == []
    # AdamW turns the last-bit differences of a near-zero gradient into steps of up to lr:
    # the weights agree to far less than the 12 updates moved them
    moved = np.abs(final_params(one) - load_gpt(str(imported[0])).params).max()
    assert np.abs(final_params(bsp) - final_params(one)).max() < 0.02 * moved
    assert read_metrics(bsp)[0]["loss"] == pytest.approx(first_batch_loss(one, imported[0]),
                                                         rel=1e-5)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["asp", "ssp", "allreduce"])
def test_every_mode_starts_from_the_import(imported, tmp_path, mode):
    one = tmp_path / "one"
    assert hpcps(*finetune_args(imported, one, "train.batch_size=8",
                                "train.max_steps=1")).returncode == 0
    run = tmp_path / mode
    proc = run_mpi(3, finetune_args(imported, run, "train.batch_size=4", "train.max_steps=6",
                                    f"ps.mode={mode}"), "mpich", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting from the weights" in proc.stdout
    # step 1 is a loss of the imported weights (other batches in asp/ssp): near one process's
    assert read_metrics(run)[0]["loss"] == pytest.approx(read_metrics(one)[0]["loss"], abs=0.15)


# -- refusals and notes -----------------------------------------------------------------------
def test_a_contradicting_command_line_key_is_one_line(imported, tmp_path):
    proc = hpcps(*finetune_args(imported, tmp_path / "ft", "model.n_layer=4", "model.n_head=2",
                                "model.n_embd=48"))
    line = assert_one_line_error(proc, "train.init_from", "model.n_layer=2, model.n_embd=32",
                                 "the command line sets model.n_layer=4, model.n_embd=48")
    assert "n_head" not in line                                  # the same value: no clash
    assert not (tmp_path / "ft" / "config.toml").exists()


def test_a_config_files_shape_gives_way_with_a_note(imported, tmp_path):
    config = tmp_path / "scratch.toml"
    config.write_text("[model]\nn_layer = 6\nn_embd = 384\nn_head = 6\n")
    run, corpus = imported
    proc = hpcps("train", config, f"train.init_from={run}", f"data.path={corpus}",
                 f"out_dir={tmp_path / 'ft'}", *FINETUNE, "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("hpcps: note: ")
    assert "sets model.n_layer=2, model.n_head=2, model.n_embd=32" in proc.stderr
    assert load_config(str(tmp_path / "ft" / "config.toml")).model.n_embd == 32


def test_a_corpus_of_another_tokenizer_is_refused_naming_both(imported, tmp_path, make_corpus):
    run, _ = imported
    char = make_corpus(FINETUNE_TEXT)
    out = tmp_path / "ft"
    proc = hpcps(*finetune_args((run, char), out))
    assert_one_line_error(proc, f"corpus {char}", "tokenizer=char", "tokenizer=hf",
                          f"train.init_from {run}", f"--tokenizer-file {run}/tokenizer.json")
    assert not (out / "config.toml").exists()
    proc = hpcps("train", f"train.init_from={tmp_path / 'nowhere'}", f"data.path={char}",
                 f"out_dir={out}")
    assert_one_line_error(proc, "train.init_from:", "does not exist")


@pytest.mark.mpi
def test_every_rank_refuses_a_mismatched_corpus(imported, tmp_path, make_corpus):
    run, _ = imported
    char = make_corpus(FINETUNE_TEXT)
    proc = run_mpi(3, finetune_args((run, char), tmp_path / "ft", "ps.mode=bsp"), "mpich",
                   timeout=60)
    assert_one_line_error(proc, "was not tokenized like the model of train.init_from")
