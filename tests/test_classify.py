"""``hpcps classify`` and ``hpcps eval`` of a classifier checkpoint, on an LSTM trained
here to tell three made-up 'languages' apart (strings over three disjoint alphabets with
a few shared letters): labels and probabilities recomputed from the model, eval equal
to training's own evaluation and to an independent count, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_util import cli, eval_records, one_line_error, train

from hpcps.inference.classifier import load_classifier

pytestmark = pytest.mark.timeout(180)

ALPHABETS = {"ab": "abcdef", "gh": "ghijkl", "mn": "mnopqr"}
SHARED = "xyz"
LABELS = list(ALPHABETS)
RNN_RUN = ["workload=rnn", "rnn.embed_dim=16", "rnn.hidden_size=24", "rnn.pool=mean",
           "train.batch_size=16", "train.max_steps=150", "train.eval_every=10",
           "train.eval_steps=4", "train.lr=1e-2", "train.warmup_steps=10", "train.log_every=50",
           "checkpoint.every=10", "checkpoint.keep=20"]


def made_up_strings(n: int, seed: int) -> tuple[list, np.ndarray]:
    r = np.random.default_rng(seed)
    labels = r.integers(0, len(LABELS), n)
    texts = []
    for label in labels:
        letters = ALPHABETS[LABELS[label]] * 3 + SHARED   # a shared letter now and then
        texts.append("".join(r.choice(list(letters), int(r.integers(2, 9)))))
    return texts, labels


def write_classification_corpus(path, label_names=LABELS, n_train=600, n_val=96):
    from hpcps.data.seqcorpus import SplitItems, write_sequence_corpus
    from hpcps.data.tokenizer import CharTokenizer
    tok = CharTokenizer("".join(sorted(set("".join(ALPHABETS.values()) + SHARED))))
    splits = {}
    for name, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        texts, labels = made_up_strings(n, seed)
        splits[name] = SplitItems(tokens={"text": [tok.encode(t) for t in texts]},
                                  texts={"text": texts}, labels=labels)
    write_sequence_corpus(str(path), "classification", splits, {"text": tok},
                          {"label_names": json.dumps(label_names)})
    return path


@pytest.fixture(scope="module")
def rnn_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    corpus = write_classification_corpus(root / "cls.h5")
    return train(root / "run", [f"data.path={corpus}", *RNN_RUN]), corpus


def direct_probabilities(run, texts) -> np.ndarray:
    """Softmax of the checkpoint's logits, computed here without the command."""
    from hpcps.model.rnn import pad_left
    loaded = load_classifier(str(run))
    tokens, lengths = pad_left([loaded.tokenizer.encode(t) for t in texts], loaded.max_len)
    z = loaded.model.logits(loaded.params, tokens, lengths).astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_labels_and_probabilities(rnn_run, capsys):
    run, _ = rnn_run
    texts = ["abcfed", "ghkl", "rqpomn", "aaxb"]
    code, out, err = cli(capsys, "classify", run, *texts)
    assert code == 0, err
    probs = direct_probabilities(run, texts)
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == ["ab", "gh", "mn", "ab"]          # learnt
    for row, p in zip(rows, probs):
        assert len(row) == 2 and row[0] == LABELS[int(p.argmax())]
        assert float(row[1]) == pytest.approx(p.max(), abs=5e-5)      # printed with 4 places
        assert p.max() > 0.8


def test_top_k_and_json(rnn_run, capsys):
    run, _ = rnn_run
    code, out, err = cli(capsys, "classify", run, "ghix", "mnz", "--top-k", "5", "--json")
    assert code == 0, err
    probs = direct_probabilities(run, ["ghix", "mnz"])
    for line, text, p in zip(out.splitlines(), ("ghix", "mnz"), probs):
        record = json.loads(line)
        assert record["input"] == text
        got = record["labels"]
        assert len(got) == 3                                          # only 3 labels exist
        assert [g["label"] for g in got] == [LABELS[i] for i in np.argsort(-p, kind="stable")]
        np.testing.assert_allclose([g["probability"] for g in got], np.sort(p)[::-1],
                                   rtol=1e-9)
        assert sum(g["probability"] for g in got) == pytest.approx(1.0, abs=1e-12)
    code, out, _ = cli(capsys, "classify", run, "ghix", "--top-k", "2")
    label1, p1, label2, p2 = out.strip().split("\t")
    assert label1 == "gh" and float(p1) >= float(p2)


def test_eval_equals_training_evaluation(rnn_run, capsys):
    """Training scored the first eval_steps x batch = 64 val strings every 10 steps."""
    run, corpus = rnn_run
    records = eval_records(run)
    for step in (10, 150):
        code, out, err = cli(capsys, "eval", run / "checkpoints" / f"step_{step:08d}", "--data",
                             corpus, "--max-items", "64", "--json")
        assert code == 0, err
        r, rec = json.loads(out), records[step]
        assert r["items"] == 64 and r["workload"] == "rnn"
        for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro",
                    "majority_accuracy"):
            assert r[key] == pytest.approx(rec[f"val_{key}"], rel=1e-12), key
        assert r["loss"] == pytest.approx(rec["val_loss"], rel=1e-6)
        assert r["confusion"] == rec["val_confusion"]
    assert records[10]["val_accuracy"] < records[150]["val_accuracy"]


def test_eval_whole_split_against_an_independent_count(rnn_run, capsys):
    from hpcps.data.seqcorpus import SequenceCorpus
    run, corpus = rnn_run
    code, out, err = cli(capsys, "eval", run, "--data", corpus)
    assert code == 0, err
    lines = out.splitlines()
    with SequenceCorpus.open(corpus) as c:
        texts, gold = c.split("val").texts("text", range(96)), c.split("val").labels
    pred = direct_probabilities(run, texts).argmax(axis=1)
    accuracy = float((pred == gold).mean())
    assert lines[0].startswith(f"accuracy {accuracy:.4f} (majority baseline "
                               f"{np.bincount(gold).max() / 96:.4f})")
    assert "96 strings (val split of" in lines[0] and accuracy > 0.9
    assert lines[1].split() == ["ab", "gh", "mn", "<-", "predicted"]
    matrix = [[int(v) for v in line.split()[1:]] for line in lines[2:]]
    expected = [[int(((gold == g) & (pred == p)).sum()) for p in range(3)] for g in range(3)]
    assert matrix == expected


def test_bad_inputs(rnn_run, capsys, tmp_path):
    run, corpus = rnn_run
    err = one_line_error(*cli(capsys, "classify", run, "abc", "ab€"))
    assert "TEXT argument 2 cannot be encoded" in err and "'€' (U+20AC)" in err
    assert "is empty" in one_line_error(*cli(capsys, "classify", run, ""))
    assert "--top-k: must be at least 1, got 0" in one_line_error(
        *cli(capsys, "classify", run, "abc", "--top-k", "0"))
    relabelled = write_classification_corpus(tmp_path / "other.h5", ["ab", "gh", "xx"])
    err = one_line_error(*cli(capsys, "eval", run, "--data", relabelled))
    assert "has labels ab, gh, xx" in err and "trained on ab, gh, mn" in err
    err = one_line_error(*cli(capsys, "eval", run, "--data", corpus, "--max-tokens", "5"))
    assert "--max-tokens does not apply to a rnn checkpoint; use --max-items" in err
    err = one_line_error(*cli(capsys, "fill-mask", run, "a[MASK]c"))
    assert "needs a BERT (masked LM) checkpoint" in err and "holds workload 'rnn'" in err
    assert "(use hpcps classify / hpcps eval)" in err
