"""``hpcps fill-mask`` and ``hpcps eval`` of a BERT checkpoint trained here on a small
made-up text (char tokens): fillers and probabilities recomputed from the model, the
masking of eval counted exactly, training that lowers the loss (against an earlier
checkpoint), and bad inputs. The docs show fill-mask on a properly trained model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_sample_eval import synthetic_text
from train_util import cli, one_line_error, train

from hpcps.inference.mlm import load_masked_lm
from hpcps.workloads.bert import masked_count

pytestmark = pytest.mark.timeout(180)

BERT_RUN = ["workload=bert", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
            "model.block_size=32", "train.batch_size=16", "train.max_steps=300",
            "train.eval_every=0", "train.eval_steps=2", "train.lr=3e-3", "train.warmup_steps=20",
            "train.log_every=100", "checkpoint.every=20", "checkpoint.keep=20"]


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    from hpcps.data.prepare import prepare
    root = tmp_path_factory.mktemp("fill_mask")
    (root / "text.txt").write_text(synthetic_text(400), encoding="utf-8")
    prepare([str(root / "text.txt")], str(root / "text.h5"), tokenizer="char", quiet=True)
    return train(root / "run", [f"data.path={root / 'text.h5'}", *BERT_RUN]), root / "text.h5"


def direct_fillers(run, text: str) -> list:
    """Per [MASK]: (token, probability) of every real token, most probable first."""
    loaded = load_masked_lm(str(run))
    pieces = text.split("[MASK]")
    ids, targets = [], []
    for i, piece in enumerate(pieces):
        if i:
            ids.append(loaded.mask_id)
            targets.append(0)
        ids += loaded.tokenizer.encode(piece).tolist()
        targets += [-1] * len(loaded.tokenizer.encode(piece))
    z = loaded.model.logits(loaded.params, np.array([ids]), np.array([targets]))
    z = np.exp(z.astype(np.float64) - z.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    out = []
    for row in p:
        order = [j for j in np.argsort(-row, kind="stable") if j != loaded.mask_id]
        out.append([(loaded.tokenizer.decode([j]), row[j]) for j in order])
    return out


def test_fillers_are_the_models_probabilities(bert_run, capsys):
    run, _ = bert_run
    text = "The king and qu[MASK]en saw a pl[MASK]y"
    code, out, err = cli(capsys, "fill-mask", run, text, "--json", "--top-k", "4")
    assert code == 0, err
    record = json.loads(out)
    expected = direct_fillers(run, text)
    assert record["input"] == text and len(record["masks"]) == 2
    for got, want in zip(record["masks"], expected):
        assert [g["token"] for g in got] == [w[0] for w in want[:4]]
        np.testing.assert_allclose([g["probability"] for g in got], [w[1] for w in want[:4]],
                                   rtol=1e-9)
    # the filled text takes each mask's first filler; the two masks see other contexts
    best = [m[0]["token"] for m in record["masks"]]
    assert record["filled"] == f"The king and qu{best[0]}en saw a pl{best[1]}y"
    assert record["masks"][0][0]["probability"] != record["masks"][1][0]["probability"]
    code, out, _ = cli(capsys, "fill-mask", run, "[MASK] [MASK]", "--json")     # only masks
    assert code == 0 and len(json.loads(out)["masks"]) == 2
    code, out, _ = cli(capsys, "fill-mask", run, text, "--top-k", "2")
    lines = out.splitlines()
    assert lines[0] == record["filled"] and len(lines) == 3
    assert lines[1].startswith(f'  [MASK] 1: {json.dumps(best[0])} ')
    assert lines[2].startswith(f'  [MASK] 2: {json.dumps(best[1])} ')


def test_eval_counts_and_beats_the_unigram_baseline(bert_run, capsys):
    from hpcps.data.corpus import Corpus
    run, corpus = bert_run
    with Corpus.open(str(corpus)) as c:
        n_tokens = c.split("val").n_tokens
        train_ids = c.split("train").load()
    results = {}
    for step in (20, 300):
        code, out, err = cli(capsys, "eval", run / "checkpoints" / f"step_{step:08d}", "--data",
                             corpus, "--json")
        assert code == 0, err
        results[step] = json.loads(out)
    r = results[300]
    full, rest = divmod(n_tokens, 32)
    assert r["tokens"] == n_tokens and r["windows"] == full + (rest >= 2)
    assert r["masked_tokens"] == full * masked_count(32, 0.15) + (
        masked_count(rest, 0.15) if rest >= 2 else 0)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
    space = int(load_masked_lm(str(run)).tokenizer.encode(" ")[0])
    assert int(np.argmax(np.bincount(train_ids))) == space   # the unigram baseline's answer
    assert results[20]["unigram_accuracy"] == r["unigram_accuracy"] > 0.05
    # training helps (a few hundred steps of a tiny model: on the loss, not yet on accuracy)
    assert r["loss"] < results[20]["loss"] - 0.2 and 0 < r["accuracy"] < 1
    code, out, _ = cli(capsys, "eval", run, "--data", corpus, "--max-tokens", "100", "--json")
    assert json.loads(out)["tokens"] == 100 and json.loads(out)["windows"] == 4


def test_bad_inputs(bert_run, capsys, tmp_path):
    run, _ = bert_run
    err = one_line_error(*cli(capsys, "fill-mask", run, "the king"))
    assert "TEXT argument 1 has no [MASK] to fill" in err
    err = one_line_error(*cli(capsys, "fill-mask", run, "the [MASK]ing €"))
    assert "cannot be encoded by the checkpoint's char tokenizer" in err and "'€'" in err
    err = one_line_error(*cli(capsys, "fill-mask", run, "a" * 40 + "[MASK]"))
    assert "is 41 tokens; the model reads at most 32 (its block_size)" in err
    assert "--top-k" in one_line_error(*cli(capsys, "fill-mask", run, "[MASK]", "--top-k", "0"))
    (tmp_path / "in.txt").write_text("the [MASK]ing\n\n", encoding="utf-8")
    err = one_line_error(*cli(capsys, "fill-mask", run, "--input", tmp_path / "in.txt"))
    assert "line 2 is empty" in err
    err = one_line_error(*cli(capsys, "translate", run, "the king"))
    assert "holds workload 'bert' (use hpcps fill-mask / hpcps eval)" in err
