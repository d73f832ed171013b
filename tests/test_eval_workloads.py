"""``hpcps eval`` beyond GPT, seq2seq, rnn and bert (their own test files): a skip-gram
checkpoint trained here, scored as training scored it; and the errors every workload
shares: a corpus of the wrong kind or tokenizer, options that do not apply, and the
commands that point to the right one for a checkpoint of another workload."""

from __future__ import annotations

import json

import pytest
from test_sample_eval import synthetic_text
from train_util import cli, eval_records, one_line_error, train

pytestmark = pytest.mark.timeout(180)

SKIPGRAM_RUN = ["workload=skipgram", "skipgram.dim=16", "skipgram.window=3",
                "skipgram.subsample=0", "train.batch_size=256", "train.max_steps=200",
                "train.eval_every=20", "train.eval_steps=2", "train.lr=1e-2",
                "train.weight_decay=0", "train.grad_clip=0", "train.log_every=100",
                "checkpoint.every=20", "checkpoint.keep=20"]


@pytest.fixture(scope="module")
def skipgram_run(tmp_path_factory):
    from hpcps.data.prepare import prepare
    root = tmp_path_factory.mktemp("eval_skipgram")
    (root / "text.txt").write_text(synthetic_text(300), encoding="utf-8")
    prepare([str(root / "text.txt")], str(root / "char.h5"), tokenizer="char", quiet=True)
    prepare([str(root / "text.txt")], str(root / "byte.h5"), tokenizer="byte", quiet=True)
    run = train(root / "run", [f"data.path={root / 'char.h5'}", *SKIPGRAM_RUN])
    return run, root


def test_skipgram_eval_equals_training_evaluation(skipgram_run, capsys):
    """Training scored eval_steps x batch = 512 val pairs; eval draws the same ones."""
    run, root = skipgram_run
    records = eval_records(run)
    results = {}
    for step in (20, 200):
        code, out, err = cli(capsys, "eval", run / "checkpoints" / f"step_{step:08d}", "--data",
                             root / "char.h5", "--max-items", "512", "--json")
        assert code == 0, err
        results[step] = r = json.loads(out)
        assert r["pairs"] == 512 and r["workload"] == "skipgram" and r["step"] == step
        assert r["loss"] == pytest.approx(records[step]["val_loss"], rel=1e-6)
        assert r["pair_accuracy"] == records[step]["val_pair_accuracy"]
        assert r["chance"] == pytest.approx(1 / 6)
    assert results[200]["loss"] < results[20]["loss"]
    assert results[200]["pair_accuracy"] > results[200]["chance"]


def test_skipgram_eval_whole_split_text(skipgram_run, capsys):
    from hpcps.data.corpus import Corpus
    run, root = skipgram_run
    with Corpus.open(str(root / "char.h5")) as c:
        n_val = c.split("val").n_tokens                 # subsample = 0 keeps every token
    code, out, err = cli(capsys, "eval", run, "--data", root / "char.h5")
    assert code == 0, err
    assert out.startswith("loss ") and f"| {n_val:,} pairs (val split of" in out
    assert "pair accuracy" in out and "(chance 0.1667)" in out and out.count("\n") == 1


def test_corpus_of_another_tokenizer_or_kind(skipgram_run, capsys):
    run, root = skipgram_run
    err = one_line_error(*cli(capsys, "eval", run, "--data", root / "byte.h5"))
    assert "tokenized differently from checkpoint" in err and "byte vocab 256" in err
    from test_seq2seq import write_mapping_corpus
    write_mapping_corpus(root / "map.h5", n_train=20, n_val=4)
    err = one_line_error(*cli(capsys, "eval", run, "--data", root / "map.h5"))
    assert "is a 'parallel' corpus" in err


@pytest.mark.parametrize("argv,expected", [
    (["--max-tokens", "10"], "--max-tokens does not apply to a skipgram checkpoint; use "
                             "--max-items"),
    (["--beam", "2"], "--beam applies to seq2seq checkpoints"),
    (["--max-items", "0"], "argument --max-items: must be at least 1, got 0"),
])
def test_options_that_do_not_apply(skipgram_run, capsys, argv, expected):
    run, root = skipgram_run
    assert expected in one_line_error(*cli(capsys, "eval", run, "--data", root / "char.h5",
                                           *argv))


@pytest.mark.parametrize("command,argv", [("sample", []), ("translate", ["x"]),
                                          ("classify", ["x"]), ("fill-mask", ["[MASK]"])])
def test_other_commands_point_to_the_right_one(skipgram_run, capsys, command, argv):
    run, _ = skipgram_run
    err = one_line_error(*cli(capsys, command, run, *argv))
    assert f"hpcps {command} needs a" in err
    assert "holds workload 'skipgram' (use hpcps embed / hpcps eval)" in err
