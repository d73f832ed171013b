"""Tokenizers: exact ids, round trips, JSON definitions, dtype rule, error lines."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcps.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    token_dtype_for,
)
from hpcps.errors import UserError

pytestmark = pytest.mark.timeout(60)

# Valid UTF-8 text: every code point except the surrogates.
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


def test_char_ids_are_indices_in_the_sorted_vocabulary():
    tok = CharTokenizer("".join(sorted(set("hello world"))))
    assert tok.vocab == " dehlorw"
    assert tok.encode("hello").tolist() == [3, 2, 4, 4, 5]
    assert tok.encode("hello").dtype == np.int64
    assert tok.encode("world", dtype=np.uint16).dtype == np.uint16
    assert tok.decode([7, 5, 6, 4, 1]) == "world"
    assert tok.encode("").tolist() == []
    assert tok.decode([]) == ""


def test_char_non_ascii_and_astral_characters_round_trip():
    text = "naïve café 🙂 ∑x²\n"
    tok = CharTokenizer("".join(sorted(set(text))))
    ids = tok.encode(text)
    assert len(ids) == len(text)        # one id per character, not per byte
    assert tok.decode(ids) == text


def test_char_unknown_characters_are_named():
    tok = CharTokenizer("abc")
    with pytest.raises(UserError, match=r"'é' \(U\+00E9\)") as err:
        tok.encode("abé")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"'z'"):
        tok.encode("abz")                  # ASCII path too


def test_char_vocabulary_must_be_sorted_and_unique():
    with pytest.raises(UserError):
        CharTokenizer("ba")
    with pytest.raises(UserError):
        CharTokenizer("aab")


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(UserError, match="token id 3 is outside the char vocabulary of 3"):
        CharTokenizer("abc").decode([0, 3])
    with pytest.raises(UserError, match="token id 256"):
        ByteTokenizer().decode([256])
    with pytest.raises(UserError, match="token id -1"):
        ByteTokenizer().decode(np.array([-1]))


@settings(max_examples=60, deadline=None)
@given(texts)
def test_char_round_trip_property(text):
    tok = CharTokenizer("".join(sorted(set(text))) or "a")
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=60, deadline=None)
@given(texts)
def test_byte_round_trip_property(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_ids_and_raw_bytes():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    assert tok.encode("é").tolist() == [0xC3, 0xA9]
    assert tok.decode_bytes([0xFF, 0x00]) == b"\xff\x00"
    assert tok.decode([0xFF]) == "\ufffd"          # not UTF-8 -> replacement, no crash
    with pytest.raises(UserError, match="UTF-8 cannot encode"):
        tok.encode("\ud800")


@pytest.mark.parametrize("tok", [CharTokenizer("\n !abcé🙂"), ByteTokenizer()])
def test_json_definition_round_trip(tok):
    spec = tok.to_json()
    again = Tokenizer.from_json(spec)
    assert type(again) is type(tok)
    assert again.to_json() == spec
    assert again.vocab_size == tok.vocab_size
    text = "abc é🙂\n"
    assert again.encode(text).tolist() == tok.encode(text).tolist()


@pytest.mark.parametrize("spec, message", [
    ("not json", "not valid JSON"),
    ('{"kind": "word"}', "unknown tokenizer kind 'word'"),
    ("[1, 2]", "unknown tokenizer kind None"),
    ('{"kind": "char"}', "no 'vocab' string"),
    ('{"kind": "char", "vocab": ""}', "no 'vocab' string"),
])
def test_bad_json_definitions(spec, message):
    with pytest.raises(UserError, match=message):
        Tokenizer.from_json(spec)


def test_token_dtype_rule_at_the_boundaries():
    assert token_dtype_for(1) == np.dtype("<u2")
    assert token_dtype_for(65536) == np.dtype("<u2")
    assert token_dtype_for(65537) == np.dtype("<u4")
    assert token_dtype_for(2**32) == np.dtype("<u4")
    with pytest.raises(UserError, match="does not fit uint32"):
        token_dtype_for(2**32 + 1)
    with pytest.raises(UserError):
        token_dtype_for(0)


def test_char_vocabulary_over_65536_uses_uint32():
    vocab = "".join(chr(c) for c in range(0x10000, 0x10000 + 65537))   # astral, no surrogates
    tok = CharTokenizer(vocab)
    assert tok.token_dtype == np.dtype("<u4")
    assert tok.encode(vocab[-1]).tolist() == [65536]


SMALL_TEXT = ("The quick brown fox jumps over the lazy dog.\n" * 20
              + "Über naïve café — 🙂 emoji and tabs\tand  double  spaces.\n" * 5)


def test_bpe_round_trip_and_definition():
    pytest.importorskip("tokenizers")
    tok = BPETokenizer.train(iter([SMALL_TEXT[:500], SMALL_TEXT[500:]]), vocab_size=300)
    assert tok.kind == "bpe"
    assert 256 < tok.vocab_size <= 300
    ids = tok.encode(SMALL_TEXT)
    assert len(ids) < len(SMALL_TEXT.encode("utf-8"))   # merges happened
    assert tok.decode(ids) == SMALL_TEXT
    assert tok.encode_many([SMALL_TEXT[:100], SMALL_TEXT[100:]]).tolist() == \
        np.concatenate([tok.encode(SMALL_TEXT[:100]), tok.encode(SMALL_TEXT[100:])]).tolist()
    again = Tokenizer.from_json(tok.to_json())
    assert again.to_json() == tok.to_json()
    assert json.loads(tok.to_json())["kind"] == "bpe"
    assert again.encode(SMALL_TEXT).tolist() == ids.tolist()
    # Text the training never saw (any bytes are encodable at byte level).
    assert again.decode(again.encode("zzz 日本語 ∑")) == "zzz 日本語 ∑"


def test_bpe_missing_library_is_a_user_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError("no tokenizers here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    hint = r"needs the tokenizers package \(pip install 'hpcps\[bpe\]'\)"
    with pytest.raises(UserError, match=hint):
        BPETokenizer.train(iter(["abc"]), 300)
    with pytest.raises(UserError, match="needs the tokenizers package"):
        Tokenizer.from_json('{"kind": "bpe", "tokenizers": {}}')
