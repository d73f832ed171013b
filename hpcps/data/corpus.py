"""The HDF5 token corpus, format v1 (see docs/corpus-format.md): writer and reader.

Writer: ``CorpusWriter`` fills ``/train/tokens`` and ``/val/tokens`` front to
back in whole chunks (so memory stays one chunk per split), keeps running
sha256/min/max, and publishes ``OUT`` with ``os.replace`` only after everything
is written, so a killed run never leaves a half-written corpus.

Reader: ``Corpus.open(path, verify=False)``; every problem is a one-line
``UserError``. ``verify=True`` reads every chunk (fletcher32), recomputes the
sha256 and token range, and checks every id against ``vocab_size``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from hpcps import __version__
from hpcps.data.tokenizer import Tokenizer, token_dtype_for
from hpcps.errors import UserError

FORMAT_NAME = "hpcps-corpus"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
CHUNK_TOKENS = 1 << 18        # 256 Ki tokens: 512 KiB (uint16) per chunk
READ_CACHE_BYTES = 16 << 20   # chunk cache per open corpus (random windows re-use chunks)
REQUIRED_ATTRS = ("format_version", "kind", "vocab_size", "tokenizer", "token_dtype")


def _document_dtype():
    import h5py
    return np.dtype([("name", h5py.string_dtype("utf-8")), ("sha256", "S64"),
                     ("n_bytes", "<i8"), ("token_start", "<i8"), ("token_end", "<i8"),
                     ("split", h5py.string_dtype("utf-8"))])


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _attr(value):
    """h5py attribute -> plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# -- writing -----------------------------------------------------------------------------


@dataclass
class Document:
    name: str
    sha256: str
    n_bytes: int
    token_start: int
    token_end: int


def root_attrs(tokenizer: Tokenizer, n_tokens: int, split_at: int,
               extra: Optional[dict] = None) -> dict:
    """The root attributes of a token corpus (one file or split over part files)."""
    attrs = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": "lm",
             "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.to_json(),
             "created_by": f"hpcps {__version__}",
             "token_dtype": token_dtype_for(tokenizer.vocab_size).name,
             "n_tokens": n_tokens, "split_token": split_at, **(extra or {})}
    if tokenizer.eot_id is not None:
        attrs["eot_token"] = tokenizer.eot_id
    return attrs


def documents_table(documents: list, split_at: int) -> np.ndarray:
    """The /documents rows; ``split`` says which split(s) each document's tokens are in."""
    def label(doc: Document) -> str:
        parts = []
        if doc.token_start < split_at:
            parts.append("train")
        if doc.token_end > split_at:
            parts.append("val")
        return "+".join(parts)
    return np.array([(d.name, d.sha256.encode("ascii"), d.n_bytes, d.token_start, d.token_end,
                      label(d)) for d in documents], dtype=_document_dtype())


class _SplitWriter:
    """One split's dataset, written sequentially in whole chunks."""

    def __init__(self, group, n_tokens: int, dtype: np.dtype):
        self.n_tokens = n_tokens
        self.chunk = min(CHUNK_TOKENS, n_tokens)
        self.dset = group.create_dataset("tokens", shape=(n_tokens,), dtype=dtype,
                                         chunks=(self.chunk,), fletcher32=True)
        self.buf = np.empty(self.chunk, dtype=dtype)
        self.fill = 0
        self.pos = 0
        self.sha = hashlib.sha256()
        self.min: Optional[int] = None
        self.max: Optional[int] = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.fill == 0 and len(ids) >= self.chunk:
                whole = len(ids) // self.chunk * self.chunk
                self._emit(ids[:whole])
                ids = ids[whole:]
                continue
            take = min(self.chunk - self.fill, len(ids))
            self.buf[self.fill:self.fill + take] = ids[:take]
            self.fill += take
            ids = ids[take:]
            if self.fill == self.chunk:
                self._emit(self.buf)
                self.fill = 0

    def _emit(self, ids: np.ndarray) -> None:
        if self.pos + len(ids) > self.n_tokens:
            raise UserError("an input changed while it was being prepared (more tokens than "
                            "counted); run prepare again")
        self.dset[self.pos:self.pos + len(ids)] = ids
        self.pos += len(ids)
        self.sha.update(np.ascontiguousarray(ids).data)
        lo, hi = int(ids.min()), int(ids.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)

    def finish(self) -> None:
        if self.fill:
            self._emit(self.buf[:self.fill])
            self.fill = 0
        if self.pos != self.n_tokens:
            raise UserError("an input changed while it was being prepared (fewer tokens than "
                            "counted); run prepare again")
        self.dset.attrs.update({"n_tokens": self.n_tokens, "min_token": self.min,
                                "max_token": self.max, "sha256": self.sha.hexdigest()})


class CorpusWriter:
    """Write a corpus of ``n_tokens`` tokens; the first ``split_at`` go to train.

    Use as a context manager: ``commit()`` publishes the file; leaving the block
    without committing (an error, Ctrl-C) deletes the temporary file.
    """

    def __init__(self, out_path: str, tokenizer: Tokenizer, n_tokens: int, split_at: int,
                 extra_attrs: Optional[dict] = None):
        import h5py
        if not 0 < split_at < n_tokens:
            raise ValueError(f"split_at {split_at} must be inside (0, {n_tokens})")
        self.out_path = out_path
        self.tmp_path = out_path + ".tmp"
        self.tokenizer = tokenizer
        self.dtype = token_dtype_for(tokenizer.vocab_size)
        self.n_tokens = n_tokens
        self.split_at = split_at
        self.pos = 0
        self.documents: list[Document] = []
        self.file = h5py.File(self.tmp_path, "w")
        self.file.attrs.update(root_attrs(tokenizer, n_tokens, split_at, extra_attrs))
        self.splits = {
            "train": _SplitWriter(self.file.create_group("train"), split_at, self.dtype),
            "val": _SplitWriter(self.file.create_group("val"), n_tokens - split_at, self.dtype)}

    def write(self, ids: np.ndarray) -> None:
        """Append ids of the global token stream (already in the storage dtype)."""
        ids = np.asarray(ids, dtype=self.dtype)
        cut = min(max(self.split_at - self.pos, 0), len(ids))
        if cut:
            self.splits["train"].write(ids[:cut])
        if cut < len(ids):
            self.splits["val"].write(ids[cut:])
        self.pos += len(ids)

    def add_document(self, name: str, sha256: str, n_bytes: int, token_start: int,
                     token_end: int) -> None:
        self.documents.append(Document(name, sha256, n_bytes, token_start, token_end))

    def commit(self) -> None:
        for split in self.splits.values():
            split.finish()
        self.file.create_dataset("documents", data=documents_table(self.documents, self.split_at))
        self.file.close()
        os.replace(self.tmp_path, self.out_path)

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or os.path.exists(self.tmp_path):
            self.abort()


# -- reading -----------------------------------------------------------------------------


class TokenSplit:
    """One split (``train`` / ``val``) of an open corpus, read lazily."""

    def __init__(self, corpus: "Corpus", name: str, dset):
        self.corpus = corpus
        self.name = name
        self.path = f"/{name}/tokens"
        self._dset = dset
        self.n_tokens = int(dset.shape[0])
        self.dtype = dset.dtype
        self.attrs = {k: _attr(v) for k, v in dset.attrs.items()}

    def __len__(self) -> int:
        return self.n_tokens

    def _checksum_error(self, where: str = "") -> UserError:
        return UserError(f"corpus {self.corpus.path} fails its checksums in {self.path}{where}")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` in the stored dtype."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"read [{start}, {stop}) outside {self.path} "
                             f"of {self.n_tokens} tokens")
        try:
            return self._dset[start:stop]
        except OSError:
            raise self._checksum_error(f" (tokens {start}..{stop})") from None

    def load(self) -> np.ndarray:
        """The whole split in memory."""
        return self.read(0, self.n_tokens)

    def verify(self) -> dict:
        """Read every chunk; check sha256, min/max and ids < vocab_size. Returns the stats."""
        vocab = self.corpus.vocab_size
        sha = hashlib.sha256()
        lo = hi = None
        # One chunk per read, so a checksum error names the damaged chunk.
        step = (self._dset.chunks or (CHUNK_TOKENS,))[0]
        for start in range(0, self.n_tokens, step):
            block = self.read(start, min(start + step, self.n_tokens))
            sha.update(np.ascontiguousarray(block).data)
            bmin, bmax = int(block.min()), int(block.max())
            if bmax >= vocab:
                pos = start + int(np.argmax(block >= vocab))
                raise UserError(f"corpus {self.corpus.path}: token id {int(block[pos - start])} "
                                f">= vocab_size {vocab} in {self.path} at position {pos}")
            lo = bmin if lo is None else min(lo, bmin)
            hi = bmax if hi is None else max(hi, bmax)
        stats = {"n_tokens": self.n_tokens, "min_token": lo, "max_token": hi,
                 "sha256": sha.hexdigest()}
        for key, actual in stats.items():
            if key in self.attrs and self.attrs[key] != actual:
                if key == "sha256":
                    raise self._checksum_error(" (sha256 of the tokens does not match)")
                raise UserError(f"corpus {self.corpus.path}: {self.path} attribute {key} is "
                                f"{self.attrs[key]} but the data has {actual}")
        return stats


class Corpus:
    """An open corpus file. ``Corpus.open(path)``; use as a context manager."""

    def __init__(self, path: str, h5file, attrs: dict, tokenizer_spec: str,
                 tokenizer_kind: str):
        self.path = path
        self._file = h5file
        self.attrs = attrs
        self.kind = str(attrs["kind"])
        self.vocab_size = int(attrs["vocab_size"])
        self.token_dtype = np.dtype(attrs["token_dtype"])
        self.format_version = int(attrs["format_version"])
        self._tokenizer_spec = tokenizer_spec
        self.tokenizer_kind = tokenizer_kind
        self._tokenizer: Optional[Tokenizer] = None

    @classmethod
    def open(cls, path: str, verify: bool = False) -> "Corpus":
        return open_corpus_file(path, cls._from_file, verify)

    @classmethod
    def _from_file(cls, path: str, h5file) -> "Corpus":
        attrs = {k: _attr(v) for k, v in h5file.attrs.items()}
        if attrs.get("format") != FORMAT_NAME:
            raise UserError(f"{path} is not an hpcps corpus")
        missing = [a for a in REQUIRED_ATTRS if a not in attrs]
        if missing:
            raise UserError(f"corpus {path} lacks root attribute(s): {', '.join(missing)}")
        if attrs["format_version"] != FORMAT_VERSION:
            raise UserError(f"corpus {path} has format_version {attrs['format_version']}; "
                            f"this hpcps reads version {FORMAT_VERSION}")
        for name in SPLITS:
            node = h5file.get(f"{name}/tokens")
            if node is None or not hasattr(node, "shape") or len(node.shape) != 1:
                raise UserError(f"corpus {path} lacks the 1-D dataset /{name}/tokens")
        vocab_size = attrs["vocab_size"]
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise UserError(f"corpus {path} has an invalid vocab_size {vocab_size!r}")
        try:
            stored = np.dtype(attrs["token_dtype"])
        except TypeError:
            raise UserError(f"corpus {path} has an unknown token_dtype "
                            f"{attrs['token_dtype']!r}") from None
        for name in SPLITS:
            if h5file[f"{name}/tokens"].dtype != stored:
                raise UserError(f"corpus {path}: /{name}/tokens is "
                                f"{h5file[f'{name}/tokens'].dtype}, not token_dtype {stored}")
            _check_part_files(path, h5file[f"{name}/tokens"])
        spec = attrs["tokenizer"]
        try:
            kind = json.loads(spec).get("kind")
        except (TypeError, ValueError, AttributeError):
            raise UserError(f"corpus {path} has an unreadable tokenizer definition") from None
        return cls(path, h5file, attrs, spec, str(kind))

    @property
    def tokenizer(self) -> Tokenizer:
        """Built on first use (a bpe tokenizer needs the tokenizers package)."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_json(self._tokenizer_spec)
            if self._tokenizer.vocab_size != self.vocab_size:
                raise UserError(f"corpus {self.path}: tokenizer has {self._tokenizer.vocab_size} "
                                f"tokens but vocab_size is {self.vocab_size}")
        return self._tokenizer

    def split(self, name: str) -> TokenSplit:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        dset = self._file.get(f"{name}/tokens")
        if dset is None:
            raise UserError(f"corpus {self.path} has no {name} split")
        split = TokenSplit(self, name, dset)
        if split.n_tokens == 0:
            raise UserError(f"corpus {self.path} has an empty {name} split")
        return split

    def documents(self) -> list[dict]:
        """The /documents table as a list of dicts (empty if absent)."""
        if "documents" not in self._file:
            return []
        rows = []
        for row in self._file["documents"][()]:
            rows.append({"name": _attr(row["name"]), "sha256": _attr(row["sha256"]),
                         "n_bytes": int(row["n_bytes"]), "token_start": int(row["token_start"]),
                         "token_end": int(row["token_end"]), "split": _attr(row["split"])})
        return rows

    def verify(self) -> dict:
        """Full check of both splits, the tokenizer and the documents table."""
        try:
            stats = {name: self.split(name).verify() for name in SPLITS}
            self.tokenizer  # noqa: B018 - parse it: a corpus must be decodable
            docs = self.documents()
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
            raise UserError(f"corpus {self.path} is damaged: {_first_line(err)}") from None
        total = stats["train"]["n_tokens"] + stats["val"]["n_tokens"]
        if docs and docs[-1]["token_end"] != total:
            raise UserError(f"corpus {self.path}: documents end at token {docs[-1]['token_end']} "
                            f"but the splits hold {total} tokens")
        return stats

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Corpus":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def _check_part_files(path: str, dset) -> None:
    """A split written by a parallel prepare is a virtual dataset over part files; HDF5
    would read a missing part as zeros, so its absence is an error here."""
    if not dset.is_virtual:
        return
    base = os.path.dirname(os.path.abspath(path))
    for name in sorted({m.file_name for m in dset.virtual_sources()}):
        if name != "." and not os.path.isfile(os.path.join(base, name)):
            raise UserError(f"corpus {path}: part file {name} of {dset.name} is missing (copy "
                            f"the corpus file together with its .parts folder)")


def open_corpus_file(path, from_file, verify: bool = False):
    """``from_file(path, h5file)`` on the opened HDF5 file, then (with ``verify``) its
    ``verify()``: every problem becomes one ``UserError`` naming the file, and the HDF5
    handle is closed on the way out of a failure."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"corpus file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"corpus path is a directory, not a file: {path}")
    h5file = _open_h5(path)
    try:
        corpus = from_file(path, h5file)
        if verify:
            corpus.verify()
        return corpus
    except UserError:
        h5file.close()
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
        h5file.close()
        raise UserError(f"corpus {path} is damaged: {_first_line(err)}") from None


def _open_h5(path: str):
    import h5py
    try:
        # No file locking: many ranks read one corpus, often on a shared file
        # system without lock support; writers publish with os.replace instead.
        return h5py.File(path, "r", locking=False, rdcc_nbytes=READ_CACHE_BYTES)
    except (OSError, ValueError) as err:
        reason = _first_line(err)
        if "truncated" in reason.lower():
            raise UserError(f"corpus {path} is truncated (incomplete copy or "
                            f"interrupted write?)") from None
        raise UserError(f"{path} is not a readable HDF5 file ({reason})") from None
