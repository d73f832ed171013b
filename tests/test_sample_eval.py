"""Sampling and evaluation: the windowing and sampling helpers exactly, then ``hpcps eval``
and ``hpcps sample`` on a tiny checkpoint trained here (one process, a few steps)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest

from hpcps.cli import main
from hpcps.inference.gpt import (
    draw,
    eval_windows,
    generate,
    load_gpt,
    loss_over_tokens,
    next_token_distribution,
)
from hpcps.model.gpt import GPT

WORDS = ("the king and queen went to see a play about old rome while rain fell on "
         "every field of wheat near our small town").split()
TINY_MODEL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
              "train.batch_size=4", "train.max_steps=6", "train.eval_every=0",
              "train.eval_steps=1", "train.log_every=3", "train.peak_flops=1e12",
              "train.warmup_steps=1"]


def synthetic_text(n_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        lines.append(" ".join(words).capitalize() + rng.choice(".!?"))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(run dir, corpus path, corpus text) of a GPT trained for a few steps."""
    from hpcps.data.prepare import prepare
    root = tmp_path_factory.mktemp("sample_eval")
    text = synthetic_text(150)
    (root / "text.txt").write_text(text, encoding="utf-8")
    corpus = root / "tiny.h5"
    prepare([str(root / "text.txt")], str(corpus), tokenizer="char", quiet=True)
    run = root / "run"
    proc = subprocess.run([sys.executable, "-m", "hpcps", "train", f"data.path={corpus}",
                           f"out_dir={run}", *TINY_MODEL], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, corpus, text


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- helpers, exactly ------------------------------------------------------------------------
def test_eval_windows_cover_every_predicted_token_once():
    assert eval_windows(10, 4) == [(0, 4), (4, 4), (8, 1)]
    assert eval_windows(9, 4) == [(0, 4), (4, 4)]
    assert eval_windows(2, 4) == [(0, 1)]
    for n in range(2, 40):
        for block in (1, 3, 8):
            covered = [s + i for s, length in eval_windows(n, block) for i in range(length)]
            assert covered == list(range(n - 1)), (n, block)


@pytest.mark.timeout(60)
def test_loss_over_tokens_equals_per_window_losses():
    model = GPT(vocab_size=11, n_layer=1, n_head=2, n_embd=8, block_size=5, threads=1)
    params = model.init_params(3)
    tokens = np.random.default_rng(0).integers(0, 11, size=23)
    # reference: every window on its own, weighted by its length
    total = 0.0
    for start, length in eval_windows(23, 5):
        x = tokens[start:start + length][None]
        y = tokens[start + 1:start + length + 1][None]
        total += model.loss(params, x, y) * length
    for batch in (1, 2, 16):
        seen = []
        got, count = loss_over_tokens(model, params, lambda a, b: tokens[a:b], 23, batch,
                                      seen.append)
        assert count == 22 and sum(seen) == 22
        assert got == pytest.approx(total, rel=1e-6)
    # negative control: fewer tokens give another sum
    short, count = loss_over_tokens(model, params, lambda a, b: tokens[a:b], 20, 4)
    assert count == 19 and short != pytest.approx(total, rel=1e-6)


def test_next_token_distribution_temperature_and_top_k():
    logits = np.array([[1.0, 3.0, 2.0, 0.0]], dtype=np.float32)
    p = next_token_distribution(logits, 2.0, None)
    z = logits[0].astype(np.float64) / 2.0
    want = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(p[0], want, rtol=1e-12)
    p2 = next_token_distribution(logits, 1.0, 2)
    assert (p2[0] > 0).tolist() == [False, True, True, False]
    np.testing.assert_allclose(p2[0, [1, 2]], [math.e / (math.e + 1), 1 / (math.e + 1)])


def test_draw_is_inverse_cdf_and_skips_zero_probability_tokens():
    probs = np.array([[0.0, 0.25, 0.0, 0.75]] * 5)
    got = draw(probs, np.array([0.0, 0.2499, 0.25, 0.9, 0.999999]))
    assert got.tolist() == [1, 1, 3, 3, 3]


@pytest.mark.timeout(60)
def test_generate_greedy_seeded_and_cropped():
    model = GPT(vocab_size=7, n_layer=1, n_head=1, n_embd=8, block_size=4, threads=1)
    params = model.init_params(1)
    prompt = np.array([1, 2, 3, 4, 5, 6])               # longer than block_size: cropped
    greedy = generate(model, params, prompt, 5, temperature=0.0, seed=1)
    # reference greedy loop
    ids = list(prompt)
    for _ in range(5):
        logits = model.logits(params, np.array([ids[-4:]]))
        ids.append(int(logits[0, -1].argmax()))
    assert greedy.tolist() == [ids]
    assert generate(model, params, prompt, 5, temperature=0.0, seed=99).tolist() == [ids]
    a = generate(model, params, prompt, 30, temperature=1.0, num_samples=3, seed=5)
    b = generate(model, params, prompt, 30, temperature=1.0, num_samples=3, seed=5)
    c = generate(model, params, prompt, 30, temperature=1.0, num_samples=3, seed=6)
    assert a.shape == (3, 36) and (a[:, :6] == prompt).all()
    assert (a == b).all() and not (a == c).all()
    assert generate(model, params, prompt, 0).tolist() == [prompt.tolist()]


# -- the commands on a trained checkpoint ----------------------------------------------------
@pytest.mark.timeout(180)
def test_eval_json_matches_direct_computation(tiny_run, capsys):
    run, corpus, _ = tiny_run
    code, out, err = cli(capsys, "eval", str(run), "--data", str(corpus), "--json")
    assert code == 0, err
    result = json.loads(out)
    loaded = load_gpt(str(run))
    from hpcps.data.corpus import Corpus
    split = Corpus.open(str(corpus)).split("val")
    nll, count = loss_over_tokens(loaded.model, loaded.params, split.read, split.n_tokens, 7)
    assert result["tokens"] == count == split.n_tokens - 1
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["step"] == 6 and result["split"] == "val"
    # trained a little: better than uniform over the vocabulary, worse than perfect
    assert 0.5 < result["loss"] < math.log(loaded.model.vocab_size)

    code, out, err = cli(capsys, "eval", str(run), "--data", str(corpus), "--json",
                         "--max-tokens", "20", "--split", "train", "--batch-size", "1")
    assert code == 0, err
    assert json.loads(out)["tokens"] == 20 and json.loads(out)["split"] == "train"
    code, out, _ = cli(capsys, "eval", str(run), "--data", str(corpus), "--max-tokens", "20")
    assert code == 0 and out.startswith("loss ") and "20 tokens" in out


@pytest.mark.timeout(120)
def test_eval_rejects_a_corpus_with_another_tokenizer(tiny_run, tmp_path, capsys):
    from hpcps.data.prepare import prepare
    run, _, text = tiny_run
    assert "@" not in text and "a" in text
    # same vocabulary size, other characters: only the tokenizer hash can tell
    same_size = tmp_path / "same_size.txt"
    same_size.write_text(text.replace("a", "@"), encoding="utf-8")
    prepare([str(same_size)], str(tmp_path / "same_size.h5"), tokenizer="char", quiet=True)
    code, out, err = cli(capsys, "eval", str(run), "--data", str(tmp_path / "same_size.h5"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "tokenized differently" in err and "sha256" in err
    prepare([str(same_size)], str(tmp_path / "bytes.h5"), tokenizer="byte", quiet=True)
    code, _, err = cli(capsys, "eval", str(run), "--data", str(tmp_path / "bytes.h5"))
    assert code == 2 and "byte vocab 256" in err and "char vocab" in err


@pytest.mark.timeout(120)
def test_sample_prints_prompt_continuations(tiny_run, capsys):
    run, _, _ = tiny_run
    args = ("sample", str(run), "--prompt", "The king", "--max-new-tokens", "40", "--seed", "3")
    code, first, err = cli(capsys, *args)
    assert code == 0, err
    assert first.startswith("The king") and len(first.rstrip("\n")) >= len("The king") + 30
    assert cli(capsys, *args)[1] == first                       # same seed, same text
    assert cli(capsys, *args[:-1], "4")[1] != first             # another seed, other text
    code, out, _ = cli(capsys, *args, "--num-samples", "3")
    samples = out.split("-" * 40 + "\n")
    assert code == 0 and len(samples) == 3 and all(s.startswith("The king") for s in samples)
    greedy = [cli(capsys, *args[:-1], seed, "--temperature", "0")[1] for seed in ("1", "2")]
    assert greedy[0] == greedy[1]


def test_sample_rejects_unencodable_prompt(tiny_run, capsys):
    run, _, _ = tiny_run
    code, out, err = cli(capsys, "sample", str(run), "--prompt", "king €",
                         "--max-new-tokens", "2")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "'€' (U+20AC)" in err and "char tokenizer" in err
    code, _, err = cli(capsys, "sample", str(run), "--temperature", "-1")
    assert code == 2 and "--temperature" in err
