"""Tokenizers stored inside a corpus: ``char`` (nanoGPT's shakespeare_char),
``byte`` (raw UTF-8 bytes) and ``bpe`` (byte-level BPE from the ``tokenizers``
package, imported only when needed), and the pretrained kinds ``hf`` (any
``tokenizer.json``) and ``tiktoken`` (loaded by ``hpcps.data.pretrained``).

``to_json()`` is the complete definition, so a corpus decodes without its source
text; ``Tokenizer.from_json`` rebuilds any kind. Token ids are stored as uint16
when the vocabulary has at most 65536 entries, else uint32.

A tokenizer may define an end-of-text token (``eot_id``): prepare appends it
after every document of a corpus of records. The built-in kinds only get one when
asked (``eot=EOT_TEXT``), so a plain-text char corpus stays exactly nanoGPT's.
"""

from __future__ import annotations

import base64
import json
from typing import Iterable, Iterator, Optional

import numpy as np

from hpcps.errors import UserError

KINDS = ("char", "byte", "bpe")                 # trained on the input by prepare
PRETRAINED_KINDS = ("hf", "tiktoken")            # loaded from a file or a named encoding
EOT_TEXT = "<|endoftext|>"                       # how the built-in kinds spell end-of-text
DEFAULT_BPE_VOCAB = 4096
MIN_BPE_VOCAB = 256          # the byte-level alphabet itself
_UINT16_VOCAB = 1 << 16
_UINT32_VOCAB = 1 << 32


def token_dtype_for(vocab_size: int) -> np.dtype:
    """Little-endian storage dtype for ids in ``[0, vocab_size)``."""
    if vocab_size < 1:
        raise UserError(f"vocab size {vocab_size} must be at least 1")
    if vocab_size <= _UINT16_VOCAB:
        return np.dtype("<u2")
    if vocab_size <= _UINT32_VOCAB:
        return np.dtype("<u4")
    raise UserError(f"vocab size {vocab_size} does not fit uint32 token ids (max {_UINT32_VOCAB})")


def _describe_chars(chars: Iterable[str], limit: int = 5) -> str:
    shown = [f"{c!r} (U+{ord(c):04X})" for c in list(chars)[:limit]]
    return ", ".join(shown)


def _as_ids(ids) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        if arr.size == 0:
            return arr.astype(np.int64).ravel()
        raise UserError(f"token ids must be integers, got dtype {arr.dtype}")
    return arr.ravel()


def _decode_around_eot(arr: np.ndarray, eot_id: Optional[int], eot_text: str, decode_plain) -> str:
    """``decode_plain`` of the runs between end-of-text ids, joined by ``eot_text``
    (char and byte ids have no text of their own for that token)."""
    if eot_id is None or not arr.size:
        return decode_plain(arr)
    at = np.flatnonzero(arr == eot_id)
    if not at.size:
        return decode_plain(arr)
    runs = np.split(arr, at)
    return decode_plain(runs[0]) + "".join(eot_text + decode_plain(run[1:]) for run in runs[1:])


class Tokenizer:
    """Common interface. ``encode`` returns int64 ids unless ``dtype`` is given.

    ``cut_rule`` says how prepare may cut a long document into pieces that encode
    to the same ids as the whole: ``"any"`` (char, byte: anywhere), ``"regex"``
    (a byte-level pre-tokenizer: at the safe points of ``hpcps.data.encode``) or
    ``"none"`` (encode each document whole).
    """

    kind: str = ""
    vocab_size: int = 0
    eot_id: Optional[int] = None
    eot_text: Optional[str] = None
    cut_rule: str = "any"

    @property
    def token_dtype(self) -> np.dtype:
        return token_dtype_for(self.vocab_size)

    def encode(self, text: str, dtype=np.int64) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: list, dtype=np.int64) -> list:
        """Each text's ids (libraries with a thread pool override this)."""
        return [self.encode(text, dtype) for text in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def _check_range(self, arr: np.ndarray) -> None:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            bad = int(arr.max()) if int(arr.max()) >= self.vocab_size else int(arr.min())
            raise UserError(f"token id {bad} is outside the {self.kind} vocabulary "
                            f"of {self.vocab_size}")

    @staticmethod
    def from_json(s: str) -> "Tokenizer":
        try:
            spec = json.loads(s)
        except (TypeError, ValueError) as err:
            raise UserError(f"tokenizer definition is not valid JSON: {err}") from None
        kinds = KINDS + PRETRAINED_KINDS
        if not isinstance(spec, dict) or spec.get("kind") not in kinds:
            kind = spec.get("kind") if isinstance(spec, dict) else None
            raise UserError(f"unknown tokenizer kind {kind!r} (expected one of {', '.join(kinds)})")
        eot = spec.get("eot")
        if eot is not None and not isinstance(eot, str):
            raise UserError(f"{spec['kind']} tokenizer definition has a non-string 'eot'")
        if spec["kind"] == "char":
            vocab = spec.get("vocab")
            if not isinstance(vocab, str) or not vocab:
                raise UserError("char tokenizer definition has no 'vocab' string")
            return CharTokenizer(vocab, eot)
        if spec["kind"] == "byte":
            return ByteTokenizer(eot)
        if spec["kind"] == "bpe":
            return BPETokenizer.from_definition(spec)
        if spec["kind"] == "hf":
            return HFTokenizer.from_definition(spec)
        return TiktokenTokenizer(spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per Unicode character; ids index the sorted vocabulary (nanoGPT)."""

    kind = "char"

    def __init__(self, vocab: str, eot: Optional[str] = None):
        chars = sorted(set(vocab))
        if len(chars) != len(vocab) or "".join(chars) != vocab:
            raise UserError("char vocabulary must be sorted unique characters")
        self.vocab = vocab
        # the end-of-text token is one id after the characters, not a character itself
        self.eot_text = eot
        self.eot_id = len(vocab) if eot is not None else None
        self.vocab_size = len(vocab) + (eot is not None)
        self._codepoints = np.frombuffer(vocab.encode("utf-32-le", "surrogatepass"), "<u4")
        self._ascii_table = self._lookup_table(128)
        self._full_table: Optional[np.ndarray] = None      # built on the first non-ASCII text

    def _lookup_table(self, size: int) -> np.ndarray:
        """code point -> id, -1 where the character is not in the vocabulary."""
        table = np.full(size, -1, dtype=np.int32)
        inside = self._codepoints < size
        table[self._codepoints[inside]] = np.flatnonzero(inside)
        return table

    def encode(self, text: str, dtype=np.int64) -> np.ndarray:
        if text.isascii():      # O(1) in CPython; the common case for text corpora
            ids = self._ascii_table[np.frombuffer(text.encode("ascii"), np.uint8)]
        else:
            if self._full_table is None:
                self._full_table = self._lookup_table(0x110000)
            ids = self._full_table[np.frombuffer(text.encode("utf-32-le", "surrogatepass"), "<u4")]
        if ids.size and ids.min() < 0:
            unknown = sorted({text[i] for i in np.flatnonzero(ids < 0)[:1000]})
            raise UserError(f"characters not in the char vocabulary: {_describe_chars(unknown)}")
        return ids.astype(dtype, copy=False)

    def decode(self, ids) -> str:
        arr = _as_ids(ids)
        self._check_range(arr)
        return _decode_around_eot(arr, self.eot_id, self.eot_text, self._decode_chars)

    def _decode_chars(self, arr: np.ndarray) -> str:
        return self._codepoints[arr].tobytes().decode("utf-32-le", "surrogatepass")

    def to_json(self) -> str:
        spec = {"kind": "char", "vocab": self.vocab}
        if self.eot_text is not None:
            spec["eot"] = self.eot_text
        return json.dumps(spec)


class ByteTokenizer(Tokenizer):
    """Ids are the UTF-8 bytes of the text (vocab 256; 257 with the end-of-text id 256)."""

    kind = "byte"
    vocab_size = 256

    def __init__(self, eot: Optional[str] = None):
        self.eot_text = eot
        self.eot_id = 256 if eot is not None else None
        self.vocab_size = 256 + (eot is not None)

    def encode(self, text: str, dtype=np.int64) -> np.ndarray:
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError as err:
            bad = {text[i] for i in range(err.start, err.end)}
            raise UserError(f"characters that UTF-8 cannot encode: "
                            f"{_describe_chars(bad)}") from None
        return self.encode_bytes(raw, dtype)

    @staticmethod
    def encode_bytes(raw: bytes, dtype=np.int64) -> np.ndarray:
        return np.frombuffer(raw, np.uint8).astype(dtype)

    def decode_bytes(self, ids) -> bytes:
        """The bytes; an end-of-text id becomes the UTF-8 of its text."""
        arr = _as_ids(ids)
        self._check_range(arr)
        if self.eot_id is None or not (arr == self.eot_id).any():
            return arr.astype(np.uint8).tobytes()
        eot = self.eot_text.encode("utf-8")
        runs = np.split(arr, np.flatnonzero(arr == self.eot_id))
        return runs[0].astype(np.uint8).tobytes() + b"".join(
            eot + run[1:].astype(np.uint8).tobytes() for run in runs[1:])

    def decode(self, ids) -> str:
        """Bytes that are not valid UTF-8 (e.g. a cut multi-byte character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        spec = {"kind": "byte"}
        if self.eot_text is not None:
            spec["eot"] = self.eot_text
        return json.dumps(spec)


def require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("tokenizer 'bpe' needs the tokenizers package "
                        "(pip install 'hpcps[bpe]')") from None
    return tokenizers


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenizer and decoder) from ``tokenizers``."""

    kind = "bpe"
    cut_rule = "regex"

    def __init__(self, backend, definition: dict):
        self._backend = backend
        self._definition = definition
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.eot_text = definition.get("eot")
        if self.eot_text is not None:
            self.eot_id = backend.token_to_id(self.eot_text)
            if self.eot_id is None:
                raise UserError(f"{self.kind} tokenizer definition names the end-of-text token "
                                f"{self.eot_text!r} but its vocabulary lacks it")

    @classmethod
    def from_definition(cls, spec: dict) -> "BPETokenizer":
        return cls(cls._backend_from(spec, f"{cls.kind} tokenizer definition"), spec)

    @staticmethod
    def _backend_from(spec: dict, what: str):
        """The library's tokenizer from the ``tokenizers`` object of a definition."""
        lib = require_tokenizers()
        inner = spec.get("tokenizers")
        if not isinstance(inner, dict):
            raise UserError(f"{what} has no 'tokenizers' object")
        try:
            return lib.Tokenizer.from_str(json.dumps(inner))
        except Exception as err:  # the library raises its own exception types
            raise UserError(f"{what} is invalid: {str(err).splitlines()[0]}") from None

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int = DEFAULT_BPE_VOCAB,
              eot: Optional[str] = None) -> "BPETokenizer":
        """Train from an iterator of text pieces (streamed, never joined in memory);
        ``eot`` adds that end-of-text token as a special token."""
        lib = require_tokenizers()
        from tokenizers import decoders, models, pre_tokenizers, trainers
        backend = lib.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[eot] if eot is not None else [])
        backend.train_from_iterator(texts, trainer=trainer)
        spec = {"kind": "bpe", "tokenizers": json.loads(backend.to_str())}
        if eot is not None:
            spec["eot"] = eot
        return cls(backend, spec)

    def encode(self, text: str, dtype=np.int64) -> np.ndarray:
        return np.asarray(self._backend.encode(text, add_special_tokens=False).ids, dtype=dtype)

    def encode_batch(self, texts: list, dtype=np.int64) -> list:
        """Encoded in parallel by the library's thread pool."""
        if not texts:
            return []
        batch = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
        return [np.asarray(e.ids, dtype=dtype) for e in batch(texts, add_special_tokens=False)]

    def encode_many(self, texts: list, dtype=np.int64) -> np.ndarray:
        """Encode pieces in parallel and concatenate."""
        if not texts:
            return np.zeros(0, dtype=dtype)
        return np.concatenate(self.encode_batch(texts, dtype))

    def decode(self, ids) -> str:
        arr = _as_ids(ids)
        self._check_range(arr)
        return self._backend.decode(arr.tolist(), skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps(self._definition)


class HFTokenizer(BPETokenizer):
    """Any ``tokenizers`` model from a ``tokenizer.json``: ids are the library's
    ``encode(text, add_special_tokens=False)``."""

    kind = "hf"

    def __init__(self, backend, definition: dict):
        super().__init__(backend, definition)
        if self.eot_id is None:
            raise UserError("hf tokenizer definition names no end-of-text token ('eot')")
        # ids need not be contiguous: the vocabulary spans 0..largest id
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self.cut_rule = _hf_cut_rule(definition["tokenizers"])


def _hf_cut_rule(spec: dict) -> str:
    """``regex`` only for the GPT-2 family (no normalizer, a ByteLevel pre-tokenizer
    with its regex and no prefix space), where the safe cut points provably keep the
    ids; any other pipeline (a space or SentencePiece prefix added to every encoded
    text, normalizers) encodes documents whole."""
    pre = spec.get("pre_tokenizer") or {}
    byte_level = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                  and not pre.get("add_prefix_space", False))
    return "regex" if byte_level and not spec.get("normalizer") else "none"


def require_tiktoken():
    try:
        import tiktoken
    except ImportError:
        raise UserError("tiktoken tokenizers need the tiktoken package "
                        "(pip install 'hpcps[data]')") from None
    return tiktoken


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding rebuilt from its stored definition: ids are
    ``encode_ordinary(text)`` (a literal ``<|endoftext|>`` in a document is text);
    decoding uses the stored bytes and needs no package."""

    kind = "tiktoken"
    cut_rule = "regex"

    def __init__(self, definition: dict, encoding=None):
        self._definition = definition
        try:
            ranks = definition["ranks"]
            specials = {str(k): int(v) for k, v in definition["special_tokens"].items()}
            self._pat_str = str(definition["pat_str"])
            self.eot_text = str(definition["eot"])
            if not isinstance(ranks, list):
                raise TypeError
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError("tiktoken tokenizer definition is incomplete or damaged") from None
        if self.eot_text not in specials:
            raise UserError(f"tiktoken tokenizer definition lacks its end-of-text token "
                            f"{self.eot_text!r}")
        self.vocab_size = max([len(ranks) - 1, *specials.values()]) + 1
        self.eot_id = specials[self.eot_text]
        self._specials = specials
        # built on first use: prepare only encodes, sample mostly decodes
        self._encoding = encoding
        self._bytes: Optional[list] = None

    def _table(self) -> list:
        """id -> bytes (None for an unused id)."""
        if self._bytes is None:
            try:
                table = [None if p is None else base64.b64decode(p, validate=True)
                         for p in self._definition["ranks"]]
            except (TypeError, ValueError):
                raise UserError("tiktoken tokenizer definition has a damaged token") from None
            table += [None] * (self.vocab_size - len(table))
            for text, idx in self._specials.items():
                table[idx] = text.encode("utf-8")
            self._bytes = table
        return self._bytes

    def _tiktoken(self):
        if self._encoding is None:
            tiktoken = require_tiktoken()
            specials = set(self._specials.values())
            ranks = {piece: i for i, piece in enumerate(self._table())
                     if piece is not None and i not in specials}
            self._encoding = tiktoken.Encoding(name=self._definition.get("name", "stored"),
                                               pat_str=self._pat_str, mergeable_ranks=ranks,
                                               special_tokens=self._specials)
        return self._encoding

    def encode(self, text: str, dtype=np.int64) -> np.ndarray:
        return np.asarray(self._tiktoken().encode_ordinary(text), dtype=dtype)

    def encode_batch(self, texts: list, dtype=np.int64) -> list:
        """Encoded by tiktoken's thread pool."""
        if not texts:
            return []
        return [np.asarray(ids, dtype=dtype)
                for ids in self._tiktoken().encode_ordinary_batch(texts)]

    def decode(self, ids) -> str:
        arr = _as_ids(ids)
        self._check_range(arr)
        table = self._table()
        try:
            raw = b"".join([table[i] for i in arr.tolist()])
        except TypeError:                  # None: an id between the ranks and the specials
            bad = next(i for i in arr.tolist() if table[i] is None)
            raise UserError(f"token id {bad} is not in the tiktoken vocabulary") from None
        return raw.decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps(self._definition)
