"""HDF5 sequence corpora (kinds ``parallel`` and ``classification``): writer and reader.

Same root attributes as the LM corpus (``format``, ``format_version``, ``kind``;
see docs/corpus-format.md, "Sequence corpora"). Each split ``/train``, ``/val``
stores every item's tokens back to back with ``offsets`` (n + 1, int64): item i
is ``tokens[offsets[i]:offsets[i + 1]]``.

- ``parallel``: ``src_tokens``, ``src_offsets``, ``tgt_tokens``, ``tgt_offsets``,
  ``src_text``, ``tgt_text``; root ``tokenizer_src``, ``tokenizer_tgt``,
  ``src_lang``, ``tgt_lang``.
- ``classification``: ``tokens``, ``offsets``, ``labels`` (int32), ``text``;
  root ``tokenizer``, ``label_names`` (JSON list), ``vocab_size``, ``token_dtype``.

Numeric datasets carry fletcher32; the text datasets are variable-length UTF-8
strings, which HDF5 cannot filter, so each has a ``sha256`` attribute instead
(checked by ``verify``). The file is written to ``OUT.tmp`` and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import h5py
import numpy as np

from hpcps import __version__
from hpcps.data.corpus import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SPLITS,
    Corpus,
    _attr,
    open_corpus_file,
)
from hpcps.data.tokenizer import Tokenizer, token_dtype_for
from hpcps.errors import UserError

KINDS = ("parallel", "classification")
CHUNK_ITEMS = 1 << 16         # items per chunk of offsets / labels
CHUNK_TOKENS = 1 << 18        # tokens per chunk (as LM corpora)
# field -> (tokens dataset, offsets dataset, text dataset)
FIELDS = {
    "parallel": {"src": ("src_tokens", "src_offsets", "src_text"),
                 "tgt": ("tgt_tokens", "tgt_offsets", "tgt_text")},
    "classification": {"text": ("tokens", "offsets", "text")},
}


def text_sha256(texts: Sequence[str]) -> str:
    """Digest of a text column: every string's UTF-8 bytes, each followed by a NUL."""
    sha = hashlib.sha256()
    for text in texts:
        sha.update(text.encode("utf-8"))
        sha.update(b"\0")
    return sha.hexdigest()


# -- writing -----------------------------------------------------------------------------

@dataclass
class SplitItems:
    """One split's items: per field, a list of token arrays and of strings."""
    tokens: dict            # field -> list[np.ndarray]
    texts: dict             # field -> list[str]
    labels: Optional[np.ndarray] = None

    @property
    def n(self) -> int:
        return len(next(iter(self.texts.values())))


def _chunks(n: int, per_chunk: int = CHUNK_ITEMS) -> tuple:
    return (max(1, min(n, per_chunk)),)


def _write_field(group, names: tuple, token_lists: list, texts: list, dtype) -> None:
    tokens_name, offsets_name, text_name = names
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = (np.concatenate(token_lists).astype(dtype) if token_lists
            else np.zeros(0, dtype=dtype))
    group.create_dataset(tokens_name, data=flat, chunks=_chunks(len(flat), CHUNK_TOKENS),
                         fletcher32=True)
    group.create_dataset(offsets_name, data=offsets, chunks=_chunks(len(offsets)),
                         fletcher32=True)
    dset = group.create_dataset(text_name, data=np.array(texts, dtype=object),
                                dtype=h5py.string_dtype("utf-8"))
    dset.attrs["sha256"] = text_sha256(texts)


def write_sequence_corpus(out: str, kind: str, splits: dict, tokenizers: dict,
                          attrs: dict) -> None:
    """Write ``splits`` ({"train": SplitItems, "val": SplitItems}) to ``out`` atomically.

    tokenizers: field -> Tokenizer ("src"/"tgt" or "text"); attrs: extra root attributes.
    """

    if kind not in KINDS:
        raise ValueError(f"unknown sequence corpus kind {kind!r}")
    for name in SPLITS:
        if splits[name].n == 0:
            raise UserError(f"the {name} split would be empty: too few items for {out}")
    dtypes = {field: token_dtype_for(tok.vocab_size) for field, tok in tokenizers.items()}
    root = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind,
            "created_by": f"hpcps {__version__}", **attrs}
    if kind == "parallel":
        for field in ("src", "tgt"):
            root[f"tokenizer_{field}"] = tokenizers[field].to_json()
            root[f"vocab_size_{field}"] = tokenizers[field].vocab_size
            root[f"token_dtype_{field}"] = dtypes[field].name
    else:
        text = tokenizers["text"]
        root.update(tokenizer=text.to_json(), vocab_size=text.vocab_size,
                    token_dtype=dtypes["text"].name)
    tmp = out + ".tmp"
    try:
        with h5py.File(tmp, "w") as fh:
            fh.attrs.update(root)
            for name in SPLITS:
                items = splits[name]
                group = fh.create_group(name)
                group.attrs["n_items"] = items.n
                for field, names in FIELDS[kind].items():
                    _write_field(group, names, items.tokens[field], items.texts[field],
                                 dtypes[field])
                if kind == "classification":
                    group.create_dataset("labels", data=np.asarray(items.labels, np.int32),
                                         chunks=_chunks(items.n), fletcher32=True)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# -- reading -----------------------------------------------------------------------------

class SequenceSplit:
    """One split of an open sequence corpus; token arrays are loaded on first use."""

    def __init__(self, corpus: "SequenceCorpus", name: str):
        self.corpus = corpus
        self.name = name
        self._group = corpus._file[name]
        self.n = int(self._group.attrs.get("n_items", -1))
        self._loaded: dict = {}
        self._labels: Optional[np.ndarray] = None

    def _read(self, dataset: str) -> np.ndarray:
        try:
            return self._group[dataset][()]
        except OSError:
            raise UserError(f"corpus {self.corpus.path} fails its checksums in "
                            f"/{self.name}/{dataset}") from None

    def _field(self, field: str) -> tuple:
        fields = FIELDS[self.corpus.kind]
        if field not in fields:
            raise UserError(f"corpus {self.corpus.path} ({self.corpus.kind}) has no field "
                            f"{field!r} (fields: {', '.join(fields)})")
        return fields[field]

    def _tokens(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        if field not in self._loaded:
            tokens_name, offsets_name, _ = self._field(field)
            self._loaded[field] = (self._read(tokens_name), self._read(offsets_name))
        return self._loaded[field]

    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"item index outside the {self.n} items of split {self.name}")
        return idx

    def lengths(self, field: str) -> np.ndarray:
        offsets = self._tokens(field)[1]
        return np.diff(offsets)

    def get(self, field: str, indices) -> list[np.ndarray]:
        """Token arrays (stored dtype) of items ``indices`` of ``field``."""
        tokens, offsets = self._tokens(field)
        return [tokens[offsets[i]:offsets[i + 1]] for i in self._indices(indices)]

    @property
    def labels(self) -> np.ndarray:
        if self.corpus.kind != "classification":
            raise UserError(f"corpus {self.corpus.path} is a {self.corpus.kind} corpus: no labels")
        if self._labels is None:
            self._labels = self._read("labels").astype(np.int64)
        return self._labels

    def texts(self, field: str, indices) -> list[str]:
        """The raw strings of items ``indices`` of ``field``."""
        name = self._field(field)[2]
        idx = self._indices(indices)
        if idx.size == 0:
            return []
        order = np.unique(idx)                   # HDF5 point selections must increase
        values = self._group[name].asstr()[order]
        lookup = dict(zip(order.tolist(), values))
        return [lookup[i] for i in idx.tolist()]

    def verify(self) -> None:
        """Read every dataset (fletcher32), check offsets, label range and text digests."""
        kind = self.corpus.kind
        for field, (_, _, text_name) in FIELDS[kind].items():
            tokens, offsets = self._tokens(field)
            vocab = self.corpus.tokenizers[field].vocab_size
            if (len(offsets) != self.n + 1 or offsets[0] != 0 or offsets[-1] != len(tokens)
                    or np.any(np.diff(offsets) < 0)):
                raise UserError(f"corpus {self.corpus.path}: /{self.name} offsets of {field} "
                                "do not describe its tokens")
            if tokens.size and int(tokens.max()) >= vocab:
                raise UserError(f"corpus {self.corpus.path}: /{self.name} has a {field} token "
                                f"id >= vocab size {vocab}")
            texts = self._group[text_name].asstr()[()]
            if len(texts) != self.n or text_sha256(texts) != _attr(
                    self._group[text_name].attrs.get("sha256", "")):
                raise UserError(f"corpus {self.corpus.path} fails its checksums in "
                                f"/{self.name}/{text_name}")
        if kind == "classification":
            labels = self.labels
            if len(labels) != self.n or (labels.size and (
                    labels.min() < 0 or labels.max() >= len(self.corpus.label_names))):
                raise UserError(f"corpus {self.corpus.path}: /{self.name}/labels are not in "
                                f"[0, {len(self.corpus.label_names)})")


class SequenceCorpus:
    """An open ``parallel`` or ``classification`` corpus. ``SequenceCorpus.open(path)``."""

    def __init__(self, path: str, h5file, attrs: dict):
        self.path = path
        self._file = h5file
        self.attrs = attrs
        self.kind = str(attrs["kind"])
        self.tokenizers: dict[str, Tokenizer] = {}
        self.label_names: list[str] = []
        self.src_lang = str(attrs.get("src_lang", ""))
        self.tgt_lang = str(attrs.get("tgt_lang", ""))
        self._splits: dict = {}

    @classmethod
    def open(cls, path, verify: bool = False) -> "SequenceCorpus":
        return open_corpus_file(path, cls._from_file, verify)

    def verify(self) -> None:
        for name in SPLITS:
            self.split(name).verify()

    @classmethod
    def _from_file(cls, path: str, h5file) -> "SequenceCorpus":
        attrs = {k: _attr(v) for k, v in h5file.attrs.items()}
        if attrs.get("format") != FORMAT_NAME:
            raise UserError(f"{path} is not an hpcps corpus")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise UserError(f"corpus {path} has format_version {attrs.get('format_version')}; "
                            f"this hpcps reads version {FORMAT_VERSION}")
        kind = attrs.get("kind")
        if kind not in KINDS:
            raise UserError(f"corpus {path} is a {kind!r} corpus, not a sequence corpus "
                            f"({' or '.join(KINDS)}): prepare one with `hpcps prepare "
                            "--parallel` or `--langid`")
        corpus = cls(path, h5file, attrs)
        spec_attrs = {"src": "tokenizer_src", "tgt": "tokenizer_tgt"} if kind == "parallel" \
            else {"text": "tokenizer"}
        for field, attr in spec_attrs.items():
            if attr not in attrs:
                raise UserError(f"corpus {path} lacks root attribute {attr}")
            corpus.tokenizers[field] = Tokenizer.from_json(attrs[attr])
        if kind == "classification":
            try:
                names = json.loads(attrs.get("label_names", ""))
            except (TypeError, ValueError):
                names = None
            if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
                raise UserError(f"corpus {path} has no valid label_names attribute")
            corpus.label_names = names
        for name in SPLITS:
            group = h5file.get(name)
            needed = [d for names in FIELDS[kind].values() for d in names]
            needed += ["labels"] if kind == "classification" else []
            missing = [d for d in needed if group is None or d not in group]
            if missing:
                raise UserError(f"corpus {path} lacks /{name}/{missing[0]}")
            n = group.attrs.get("n_items")
            if n is None or int(n) < 1:
                raise UserError(f"corpus {path} has an empty or unsized {name} split")
        return corpus

    def split(self, name: str) -> SequenceSplit:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        if name not in self._splits:
            self._splits[name] = SequenceSplit(self, name)
        return self._splits[name]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SequenceCorpus":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def checkpoint_tokenizer_text(path: str) -> str:
    """What a checkpoint of a run on corpus ``path`` stores as its tokenizer: the
    tokenizer of a language-model corpus, the text tokenizer of a classification
    corpus, and for a parallel corpus both sides as ``{"parallel": {"src": .., "tgt": ..}}``
    (not a tokenizer itself, so nothing mistakes it for one)."""
    try:
        corpus = SequenceCorpus.open(path)
    except UserError:
        lm = Corpus.open(path)          # not a sequence corpus: a language-model corpus
        try:
            return lm.tokenizer.to_json()
        finally:
            lm.close()
    with corpus:
        if corpus.kind == "classification":
            return corpus.tokenizers["text"].to_json()
        return json.dumps({"parallel": {field: json.loads(corpus.tokenizers[field].to_json())
                                        for field in ("src", "tgt")}})
