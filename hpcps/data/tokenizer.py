"""Tokenizers stored inside a corpus: ``char`` (nanoGPT's shakespeare_char),
``byte`` (raw UTF-8 bytes) and ``bpe`` (byte-level BPE from the ``tokenizers``
package, imported only when needed).

``to_json()`` is the complete definition, so a corpus decodes without its source
text; ``Tokenizer.from_json`` rebuilds any kind. Token ids are stored as uint16
when the vocabulary has at most 65536 entries, else uint32.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator, Optional

import numpy as np

from hpcps.errors import UserError

KINDS = ("char", "byte", "bpe")
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


class Tokenizer:
    """Common interface. ``encode`` returns int64 ids unless ``dtype`` is given."""

    kind: str = ""
    vocab_size: int = 0

    @property
    def token_dtype(self) -> np.dtype:
        return token_dtype_for(self.vocab_size)

    def encode(self, text: str, dtype=np.int64) -> np.ndarray:
        raise NotImplementedError

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
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
            kind = spec.get("kind") if isinstance(spec, dict) else None
            raise UserError(f"unknown tokenizer kind {kind!r} (expected one of {', '.join(KINDS)})")
        if spec["kind"] == "char":
            vocab = spec.get("vocab")
            if not isinstance(vocab, str) or not vocab:
                raise UserError("char tokenizer definition has no 'vocab' string")
            return CharTokenizer(vocab)
        if spec["kind"] == "byte":
            return ByteTokenizer()
        return BPETokenizer.from_definition(spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per Unicode character; ids index the sorted vocabulary (nanoGPT)."""

    kind = "char"

    def __init__(self, vocab: str):
        chars = sorted(set(vocab))
        if len(chars) != len(vocab) or "".join(chars) != vocab:
            raise UserError("char vocabulary must be sorted unique characters")
        self.vocab = vocab
        self.vocab_size = len(vocab)
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
        return self._codepoints[arr].tobytes().decode("utf-32-le", "surrogatepass")

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "vocab": self.vocab})


class ByteTokenizer(Tokenizer):
    """Ids are the UTF-8 bytes of the text (vocab 256)."""

    kind = "byte"
    vocab_size = 256

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
        arr = _as_ids(ids)
        self._check_range(arr)
        return arr.astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        """Bytes that are not valid UTF-8 (e.g. a cut multi-byte character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"kind": "byte"})


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

    def __init__(self, backend, definition: dict):
        self._backend = backend
        self._definition = definition
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_definition(cls, spec: dict) -> "BPETokenizer":
        lib = require_tokenizers()
        inner = spec.get("tokenizers")
        if not isinstance(inner, dict):
            raise UserError("bpe tokenizer definition has no 'tokenizers' object")
        try:
            backend = lib.Tokenizer.from_str(json.dumps(inner))
        except Exception as err:  # the library raises its own exception types
            raise UserError(f"bpe tokenizer definition is invalid: {str(err).splitlines()[0]}") \
                from None
        return cls(backend, spec)

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int = DEFAULT_BPE_VOCAB) -> "BPETokenizer":
        """Train from an iterator of text pieces (streamed, never joined in memory)."""
        lib = require_tokenizers()
        from tokenizers import decoders, models, pre_tokenizers, trainers
        backend = lib.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[])
        backend.train_from_iterator(texts, trainer=trainer)
        spec = {"kind": "bpe", "tokenizers": json.loads(backend.to_str())}
        return cls(backend, spec)

    def encode(self, text: str, dtype=np.int64) -> np.ndarray:
        return np.asarray(self._backend.encode(text).ids, dtype=dtype)

    def encode_many(self, texts: list, dtype=np.int64) -> np.ndarray:
        """Encode pieces in parallel (the library's thread pool) and concatenate."""
        if not texts:
            return np.zeros(0, dtype=dtype)
        batch = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
        encodings = batch(texts, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=dtype) for e in encodings])

    def decode(self, ids) -> str:
        arr = _as_ids(ids)
        self._check_range(arr)
        return self._backend.decode(arr.tolist(), skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps(self._definition)

