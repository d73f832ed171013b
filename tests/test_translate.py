"""``hpcps translate`` and ``hpcps eval`` of a seq2seq checkpoint, on a translator trained
here: the toy mapping of test_seq2seq (each letter becomes a Chinese numeral, order
reversed), which 300 steps learn exactly. Exact outputs, scores recomputed from the
model's teacher-forced log-probabilities, eval reproducing what training measured,
chrF against sacrebleu, and every bad input as a one-line error with exit 2."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from test_seq2seq import HANZI, LETTERS, write_mapping_corpus
from train_util import cli, eval_records, one_line_error, train

from hpcps.inference.seq2seq import load_translator
from hpcps.metrics.text import bleu
from hpcps.model.seq2seq import length_penalty

pytestmark = pytest.mark.timeout(180)

TABLE = dict(zip(LETTERS, HANZI))
S2S_RUN = ["workload=seq2seq", "model.n_layer=1", "model.n_head=4", "model.n_embd=64",
           "model.bias=true", "seq2seq.max_src_len=10", "seq2seq.max_tgt_len=10",
           "train.batch_size=16", "seq2seq.eval_pairs=64", "seq2seq.beam=2",
           "train.max_steps=300", "train.eval_every=100", "train.eval_steps=4", "train.lr=2e-3",
           "train.warmup_steps=20", "train.weight_decay=0", "train.log_every=100",
           "checkpoint.every=100", "checkpoint.keep=3"]


def translation(src: str) -> str:
    return "".join(TABLE[c] for c in reversed(src))


@pytest.fixture(scope="module")
def s2s_run(tmp_path_factory):
    """(run dir, corpus) of the mapping translator, checkpoints at steps 100, 200, 300."""
    root = tmp_path_factory.mktemp("translate")
    corpus = write_mapping_corpus(root / "map.h5")
    run = train(root / "run", [f"data.path={corpus}", *S2S_RUN])
    return run, corpus


def test_translates_the_learnt_mapping(s2s_run, capsys):
    run, _ = s2s_run
    inputs = ["abc", "jihg", "bad", "cafe"]
    code, out, err = cli(capsys, "translate", run, *inputs, "--beam", "3")
    assert code == 0, err
    assert out.splitlines() == [translation(s) for s in inputs]
    # negative control: the first checkpoint has not learnt it yet
    code, early, _ = cli(capsys, "translate", run / "checkpoints" / "step_00000100", *inputs)
    assert code == 0 and early.splitlines() != out.splitlines()


def test_json_scores_are_the_models_log_probabilities(s2s_run, capsys):
    run, _ = s2s_run
    code, out, err = cli(capsys, "translate", run, "fhjab", "ddca", "--json", "--beam", "2")
    assert code == 0, err
    loaded = load_translator(str(run))
    model, src_vocab, tgt_vocab = loaded.model, loaded.src, loaded.tgt
    for line, text in zip(out.splitlines(), ("fhjab", "ddca")):
        record = json.loads(line)
        assert record["input"] == text and len(record["translations"]) == 1
        best = record["translations"][0]
        assert best["text"] == translation(text)
        # teacher-forced log-probability of the translation and its EOS
        ids = list(tgt_vocab.tokenizer.encode(best["text"])) + [tgt_vocab.eos]
        src = np.append(src_vocab.tokenizer.encode(text), src_vocab.eos)[None]
        logits = model.logits(loaded.params, src, np.array([src.shape[1]]),
                              np.array([[tgt_vocab.bos] + ids[:-1]]))[0].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        expected = sum(logp[i, t] for i, t in enumerate(ids))
        assert best["log_prob"] == pytest.approx(expected, abs=1e-4)
        assert best["score"] == pytest.approx(
            best["log_prob"] / length_penalty(len(ids), loaded.alpha), rel=1e-9)
        assert -1.0 < best["log_prob"] < 0.0          # learnt: close to certain


def test_n_best_lists_are_ranked(s2s_run, capsys):
    run, _ = s2s_run
    code, out, err = cli(capsys, "translate", run, "abc", "jia", "--beam", "4", "--n-best", "3")
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == ["1", "1", "1", "2", "2", "2"]
    for number, src in ((1, "abc"), (2, "jia")):
        mine = [r for r in rows if r[0] == str(number)]
        scores = [float(r[1]) for r in mine]
        assert scores == sorted(scores, reverse=True) and scores[0] > scores[1]
        assert mine[0][2] == translation(src) and len({r[2] for r in mine}) == 3


def test_input_file_and_standard_input(s2s_run, tmp_path, capsys, monkeypatch):
    run, _ = s2s_run
    lines = ["abc", "gfedcba", "jjj"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, from_file, err = cli(capsys, "translate", run, "--input", tmp_path / "in.txt")
    assert code == 0, err
    assert from_file.splitlines() == [translation(s) for s in lines]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines)))    # no final newline
    assert cli(capsys, "translate", run)[1] == from_file


def test_eval_reproduces_what_training_measured(s2s_run, capsys):
    """Training evaluated the 64 val pairs at steps 100 and 300 (teacher-forced loss on
    eval_steps x batch = 64 items, beam-2 BLEU); eval of those checkpoints must agree."""
    run, corpus = s2s_run
    records = eval_records(run)
    for step in (100, 300):
        code, out, err = cli(capsys, "eval", run / "checkpoints" / f"step_{step:08d}", "--data",
                             corpus, "--json", "--beam", "2")
        assert code == 0, err
        result = json.loads(out)
        assert result["pairs"] == 64 and result["step"] == step
        assert result["bleu"] == pytest.approx(records[step]["val_bleu"], rel=1e-9)
        assert result["copy_bleu"] == records[step]["val_copy_bleu"] == 0.0   # letters vs hanzi
        assert result["loss"] == pytest.approx(records[step]["val_loss"], rel=1e-5)
    assert records[100]["val_bleu"] < 90 < records[300]["val_bleu"]


def test_eval_chrf_and_bleu_match_sacrebleu(s2s_run, capsys):
    sacrebleu = pytest.importorskip("sacrebleu")
    from hpcps.data.seqcorpus import SequenceCorpus
    run, corpus = s2s_run
    code, out, err = cli(capsys, "eval", run / "checkpoints" / "step_00000100", "--data", corpus,
                         "--json", "--max-items", "40", "--beam", "1")
    assert code == 0, err
    result = json.loads(out)
    with SequenceCorpus.open(corpus) as c:
        val = c.split("val")
        sources, refs = val.texts("src", range(40)), val.texts("tgt", range(40))
    code, hyps, _ = cli(capsys, "translate", run / "checkpoints" / "step_00000100", *sources,
                        "--beam", "1")
    hyps = hyps.splitlines()
    assert result["pairs"] == 40
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    assert result["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score, abs=1e-9)
    assert result["bleu"] == pytest.approx(bleu(hyps, refs, tokenize="zh")["score"], abs=1e-12)
    assert 0 < result["chrf"] < 100 and result["copy_chrf"] == 0.0
    assert [e["translation"] for e in result["examples"]] == hyps[:10]


def test_chrf_matches_sacrebleu_on_hard_cases():
    sacrebleu = pytest.importorskip("sacrebleu")
    from hpcps.metrics.chrf import chrf
    cases = [
        (["打开 文件", "保存", "", "a b c"], ["打开这个文件", "保存文件", "空", "abc"]),
        (["无法连接到服务器"], ["无法连接到服务器"]),                     # identical: 100
        (["ab", "x"], ["abcdefgh", "y"]),                                  # orders one side lacks
        (["The cat sat.", "错误：%s"], ["A cat sat on it.", "错误: %s"]),
    ]
    for hyps, refs in cases:
        assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score,
                                                 abs=1e-9), (hyps, refs)
    # two references per item: the better one counts, as in sacrebleu
    hyps, first, second = ["打开文件", "关闭"], ["打开这个文件", "关"], ["打开文件", "关上"]
    two = chrf(hyps, [[a, b] for a, b in zip(first, second)])
    assert two == pytest.approx(sacrebleu.corpus_chrf(hyps, [first, second]).score, abs=1e-9)
    assert two > chrf(hyps, first)                           # negative control: one reference
    assert chrf(["无法连接到服务器"], ["无法连接到服务器"]) == pytest.approx(100.0)


@pytest.mark.parametrize("argv,expected", [
    (["abz"], "TEXT argument 1 cannot be encoded by the checkpoint's char tokenizer: "
              "characters not in the char vocabulary: 'z' (U+007A)"),
    (["abc", "  "], "TEXT argument 2 is empty"),
    (["abc", "--beam", "0"], "argument --beam: must be at least 1, got 0"),
    (["abc", "--beam", "2", "--n-best", "3"], "--n-best must be between 1 and --beam (2), got 3"),
    (["abc", "--max-len", "0"], "argument --max-len: must be at least 1, got 0"),
])
def test_bad_input_is_one_line_exit_2(s2s_run, capsys, argv, expected):
    run, _ = s2s_run
    assert expected in one_line_error(*cli(capsys, "translate", run, *argv))


def test_empty_line_in_a_file_names_the_line(s2s_run, tmp_path, capsys):
    run, _ = s2s_run
    (tmp_path / "in.txt").write_text("abc\n\nde\n", encoding="utf-8")
    err = one_line_error(*cli(capsys, "translate", run, "--input", tmp_path / "in.txt"))
    assert f"{tmp_path / 'in.txt'} line 2 is empty" in err


def test_a_checkpoint_without_tokenizers_uses_its_corpus(s2s_run, tmp_path, capsys):
    """Checkpoints of sequence corpora written before they kept their tokenizers: the
    run's corpus supplies them when it still matches the recorded hashes."""
    import shutil
    run, corpus = s2s_run
    old = tmp_path / "old"
    shutil.copytree(run / "checkpoints" / "step_00000300", old)
    (old / "tokenizer.json").unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"]["tokenizer.json"]

    def point_to(data_path):
        manifest["config"]["data.path"] = str(data_path)
        (old / "manifest.json").write_text(json.dumps(manifest))
    point_to(corpus)
    assert cli(capsys, "translate", old, "abc", "bad")[1] == f"{translation('abc')}\n" \
        f"{translation('bad')}\n"
    point_to(tmp_path / "gone.h5")
    err = one_line_error(*cli(capsys, "translate", old, "abc"))
    assert f"holds no tokenizer and its corpus {tmp_path / 'gone.h5'} is not here" in err
    from hpcps.data.seqcorpus import SplitItems, write_sequence_corpus
    from hpcps.data.tokenizer import CharTokenizer
    toks = {"src": CharTokenizer(LETTERS), "tgt": CharTokenizer("".join(sorted("一二百")))}
    items = SplitItems(tokens={"src": [toks["src"].encode("ab")], "tgt": [toks["tgt"].encode(
        "百一")]}, texts={"src": ["ab"], "tgt": ["百一"]})
    write_sequence_corpus(str(tmp_path / "other.h5"), "parallel", {"train": items, "val": items},
                          toks, {})
    point_to(tmp_path / "other.h5")
    assert "no longer matches it" in one_line_error(*cli(capsys, "translate", old, "abc"))


def test_a_run_of_another_workload_is_refused(tmp_path, capsys):
    from hpcps.data.seqcorpus import SplitItems, write_sequence_corpus
    from hpcps.data.tokenizer import CharTokenizer
    tok = CharTokenizer("abcdef")
    texts = ["abc", "fed", "bad", "cafe"] * 8
    split = SplitItems(tokens={"text": [tok.encode(t) for t in texts]}, texts={"text": texts},
                       labels=np.arange(len(texts)) % 2)
    write_sequence_corpus(str(tmp_path / "cls.h5"), "classification",
                          {"train": split, "val": split}, {"text": tok},
                          {"label_names": json.dumps(["x", "y"])})
    run = train(tmp_path / "rnn", ["workload=rnn", f"data.path={tmp_path / 'cls.h5'}",
                                   "rnn.embed_dim=4", "rnn.hidden_size=4", "train.max_steps=2",
                                   "train.batch_size=4", "train.eval_steps=1"])
    err = one_line_error(*cli(capsys, "translate", run, "abc"))
    assert ("hpcps translate needs a seq2seq (translator) checkpoint; "
            f"{run / 'checkpoints' / 'step_00000002'} holds workload 'rnn' "
            "(use hpcps classify / hpcps eval)") in err


@pytest.mark.timeout(240)
def test_gpu_translation_equals_cpu(s2s_run, capsys):
    pytest.importorskip("cupy")
    from hpcps.backend import get_backend
    try:
        get_backend("gpu")
    except Exception as err:        # no device: the GPU check belongs to machines with one
        pytest.skip(f"no usable GPU: {err}")
    run, _ = s2s_run
    inputs = ["abc", "jihg", "bad", "cafe", "ggh"]
    cpu = cli(capsys, "translate", run, *inputs, "--json", "--beam", "3")[1]
    code, gpu, err = cli(capsys, "translate", run, *inputs, "--json", "--beam", "3",
                         "--device", "gpu")
    assert code == 0, err
    for a, b in zip(cpu.splitlines(), gpu.splitlines()):
        a, b = json.loads(a), json.loads(b)
        assert a["translations"][0]["text"] == b["translations"][0]["text"]
        assert a["translations"][0]["log_prob"] == pytest.approx(
            b["translations"][0]["log_prob"], abs=1e-3)
