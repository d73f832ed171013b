"""The whole command line, end to end, as a user runs it: prepare -> train (1 server + 1
worker under mpirun, and one process) -> eval -> sample -> export (npz, hf-gpt2) -> plot ->
score, every command in its own process with its exit code and output checked; then bad
input, each one exit 2 with one line on stderr and no traceback."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi_util import describe, mpi_implementations, run_command, run_mpi

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings "
         "and arrows of outrageous fortune take arms against a sea troubles").split()
TRAIN = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
         "train.batch_size=4", "train.max_steps=8", "train.eval_every=4", "train.eval_steps=2",
         "train.log_every=2", "train.peak_flops=1e12", "train.warmup_steps=1", "train.lr=1e-2",
         "train.min_lr=1e-3"]
ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
PROMPT = "To be"


def tiny_text() -> str:
    """About 6 KB of verse-like lines (a fixed seed: the same corpus every run)."""
    rng = random.Random(7)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9))).capitalize() + ","
             for _ in range(160)]
    return "\n".join(lines) + "\n"


def hpcps(*args, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    return run_command([sys.executable, "-m", "hpcps", *map(str, args)], timeout, env, cwd)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    return result.stdout


def usage_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr holding every fragment."""
    assert result.returncode == 2, describe(result)
    assert result.stdout == "" and "Traceback" not in result.stderr, describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, describe(result)
    for fragment in fragments:
        assert fragment in lines[0], describe(result)
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("roundtrip")
    (root / "poem.txt").write_text(tiny_text(), encoding="utf-8")
    return root


@pytest.mark.timeout(240)
def test_roundtrip(work):
    impls = mpi_implementations()
    if not impls:
        pytest.skip("no MPI launcher installed")
    corpus = work / "poem.h5"
    out = ok(hpcps("prepare", "poem.txt", "-o", corpus, cwd=work))
    assert out.startswith(f"wrote {corpus}:") and "char vocab" in out

    # 1 server + 1 worker in lock step; then the same job in one process
    result = run_mpi(2, ["train", f"data.path={corpus}", "out_dir=run_ps", *TRAIN], impls[0],
                     timeout=120, env=ENV, cwd=work)
    ok(result)
    assert "1 server(s)" in result.stdout and "1 worker(s)" in result.stdout
    single = ok(hpcps("train", f"data.path={corpus}", "out_dir=run_single", *TRAIN, cwd=work))
    assert "single process" in single and "step 8/8" in single
    for run in ("run_ps", "run_single"):
        assert (work / run / "checkpoints" / "step_00000008" / "manifest.json").exists()

    # eval: loss over the whole val split, finite and below a uniform guess
    report = json.loads(ok(hpcps("eval", "run_ps", "--data", corpus, "--json", cwd=work)))
    n_val, vocab = _val_tokens_and_vocab(corpus)
    assert report["tokens"] == n_val - 1 and report["step"] == 8
    assert math.isfinite(report["loss"]) and 0 < report["loss"] < math.log(vocab)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    human = ok(hpcps("eval", "run_single", "--data", corpus, "--max-tokens", "50", cwd=work))
    assert human.startswith("loss ") and "| 50 tokens" in human

    # sample: the prompt, then new text
    text = ok(hpcps("sample", "run_ps", "--prompt", PROMPT, "--max-new-tokens", "60",
                    "--temperature", "0.8", "--top-k", "10", "--seed", "1", cwd=work))
    assert text.startswith(PROMPT) and len(text) >= len(PROMPT) + 60

    # export both formats
    ok(hpcps("export", "run_ps", "--format", "npz", "-o", "model.npz", cwd=work))
    with np.load(work / "model.npz", allow_pickle=False) as data:
        assert {"wte", "wpe", "h0.attn.qkv.w", "lnf.w", "config.json"} <= set(data.files)
        assert json.loads(str(data["config.json"]))["config"]["model.n_embd"] == 16
    ok(hpcps("export", "run_ps", "--format", "hf-gpt2", "-o", "hf", cwd=work))
    assert sorted(os.listdir(work / "hf")) == ["README.md", "config.json",
                                               "hpcps_tokenizer.json", "model.safetensors"]
    config = json.loads((work / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_embd"] == 16 and config["n_layer"] == 1

    # plot both runs; score the sample against the corpus (BLEU)
    out = ok(hpcps("plot", "run_ps", "run_single", "-o", "curves.png", cwd=work))
    assert out.startswith("wrote curves.png")
    assert (work / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = text.splitlines()[:3]
    (work / "hyp.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    refs = tiny_text().splitlines()[:len(lines)]
    (work / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    out = ok(hpcps("score", "--metric", "bleu", "--hyp", "hyp.txt", "--ref", "ref.txt",
                   cwd=work))
    assert out.startswith("BLEU: ") and 0.0 <= float(out.split()[1]) <= 100.0
    assert f"items: {len(lines)}" in out


def _val_tokens_and_vocab(corpus: Path) -> tuple[int, int]:
    from hpcps.data.corpus import Corpus
    with Corpus.open(str(corpus)) as c:
        return c.split("val").n_tokens, c.vocab_size


@pytest.mark.timeout(120)
def test_bad_input_is_one_line_and_exit_2(work):
    """Each mistake: exit 2, one line naming it, no traceback (no MPI needed)."""
    corpus = work / "bad.h5"
    ok(hpcps("prepare", "poem.txt", "-o", corpus, cwd=work))
    ok(hpcps("train", f"data.path={corpus}", "out_dir=run_bad", *TRAIN[:4],
             "train.max_steps=1", "train.peak_flops=1e12", cwd=work))
    usage_error(hpcps("sampel", "run_bad", cwd=work), "invalid choice", "did you mean 'sample'")
    usage_error(hpcps("sample", "run_bad", "--temprature", "0.5", cwd=work),
                "unrecognized arguments", "--temprature")
    usage_error(hpcps("eval", "no_such_run", "--data", corpus, cwd=work),
                "no_such_run", "does not exist")
    (work / "empty_run").mkdir(exist_ok=True)
    usage_error(hpcps("sample", "empty_run", cwd=work), "empty_run", "no committed checkpoint")
    usage_error(hpcps("sample", "run_bad", "--prompt", "To be ☃", cwd=work),
                "'☃' (U+2603)", "not in the char vocabulary")
    ok(hpcps("train", "workload=synthetic", "synthetic.n_params=64", "train.max_steps=1",
             "out_dir=run_synthetic", "train.peak_flops=1e12", cwd=work))
    usage_error(hpcps("export", "run_synthetic", "--format", "hf-gpt2", "-o", "syn_hf", cwd=work),
                "'synthetic'", "not a GPT")
    assert not (work / "syn_hf").exists()


@pytest.mark.timeout(60)
def test_unknown_option_suggests_the_closest(work):
    usage_error(hpcps("sample", "run_bad", "--temprature", "0.5", cwd=work),
                "unrecognized arguments", "did you mean '--temperature'")
