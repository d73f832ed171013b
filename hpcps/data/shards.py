"""A token corpus split over part files: what a parallel prepare writes.

Each rank appends its tokens to ``OUT.parts/part-RRRRR.h5`` (one growing dataset
``/tokens``, chunked like a corpus split, fletcher32). Rank 0 then writes ``OUT``
with the same root attributes and ``/documents`` as a one-process corpus, and
``/train/tokens`` and ``/val/tokens`` as HDF5 virtual datasets that map the part
files, in rank order, onto the one token stream. Readers see ordinary 1-D datasets
(``Corpus.open`` checks that every part file is there). Part paths are stored
relative to ``OUT``, so the pair ``OUT`` + ``OUT.parts/`` can be moved together.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Optional

import numpy as np

from hpcps.data.corpus import (
    CHUNK_TOKENS,
    SPLITS,
    Document,
    documents_table,
    root_attrs,
)
from hpcps.data.tokenizer import Tokenizer, token_dtype_for

PARTS_SUFFIX = ".parts"
TMP_SUFFIX = ".tmp"


def parts_dir(out: str) -> str:
    return out + PARTS_SUFFIX


def part_name(rank: int) -> str:
    return f"part-{rank:05d}.h5"


class PartWriter:
    """One rank's tokens, appended in whole chunks to a dataset that grows; keeps the
    running sha256 and range of what it wrote (rank 0's part starts the stream, so
    its digest is the start of the train split's)."""

    def __init__(self, path: str, dtype):
        import h5py
        self.path = path
        self.dtype = np.dtype(dtype)
        self.file = h5py.File(path, "w")
        self.dset = self.file.create_dataset("tokens", shape=(0,), maxshape=(None,),
                                             dtype=self.dtype, chunks=(CHUNK_TOKENS,),
                                             fletcher32=True)
        self.buf = np.empty(CHUNK_TOKENS, dtype=self.dtype)
        self.fill = 0
        self.n_tokens = 0
        self.sha = hashlib.sha256()
        self.min: Optional[int] = None
        self.max: Optional[int] = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            take = min(CHUNK_TOKENS - self.fill, len(ids))
            self.buf[self.fill:self.fill + take] = ids[:take]
            self.fill += take
            ids = ids[take:]
            if self.fill == CHUNK_TOKENS:
                self._flush()

    def _flush(self) -> None:
        if self.fill:
            block = self.buf[:self.fill]
            self.dset.resize((self.n_tokens + self.fill,))
            self.dset[self.n_tokens:] = block
            self.n_tokens += self.fill
            self.fill = 0
            self.sha.update(block.data)
            lo, hi = int(block.min()), int(block.max())
            self.min = lo if self.min is None else min(self.min, lo)
            self.max = hi if self.max is None else max(self.max, hi)

    def close(self) -> int:
        self._flush()
        self.dset.attrs["n_tokens"] = self.n_tokens
        self.file.close()
        return self.n_tokens

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            if os.path.exists(self.path):
                os.remove(self.path)


def _ranges(counts: list) -> list:
    """Global [start, stop) of each part's tokens."""
    out, at = [], 0
    for n in counts:
        out.append((at, at + n))
        at += n
    return out


def split_stats(part_paths: list, counts: list, split_at: int,
                first: Optional[PartWriter] = None) -> dict:
    """n_tokens, min/max and sha256 of each split, read from the parts in order (the
    sha256 of a split cannot be put together from per-part digests). ``first``: the
    writer of the first part, when it is wholly train: its digest and range are used
    instead of reading that part again."""
    import h5py
    total = sum(counts)
    bounds = {"train": (0, split_at), "val": (split_at, total)}
    sha = {name: hashlib.sha256() for name in SPLITS}
    lo: dict = {name: None for name in SPLITS}
    hi: dict = {name: None for name in SPLITS}
    skip = 0
    if first is not None and counts and first.n_tokens == counts[0] <= split_at:
        sha["train"], lo["train"], hi["train"] = first.sha.copy(), first.min, first.max
        skip = 1
    for path, (start, stop) in list(zip(part_paths, _ranges(counts)))[skip:]:
        if start == stop:
            continue
        with h5py.File(path, "r") as fh:
            dset = fh["tokens"]
            for a in range(start, stop, CHUNK_TOKENS):
                block = dset[a - start:min(a + CHUNK_TOKENS, stop) - start]
                for name, (s0, s1) in bounds.items():
                    part = block[max(s0 - a, 0):max(min(s1 - a, len(block)), 0)]
                    if len(part):
                        sha[name].update(np.ascontiguousarray(part).data)
                        bmin, bmax = int(part.min()), int(part.max())
                        lo[name] = bmin if lo[name] is None else min(lo[name], bmin)
                        hi[name] = bmax if hi[name] is None else max(hi[name], bmax)
    return {name: {"n_tokens": bounds[name][1] - bounds[name][0], "min_token": lo[name],
                   "max_token": hi[name], "sha256": sha[name].hexdigest()} for name in SPLITS}


def write_virtual_corpus(path: str, part_relpaths: list, counts: list, tokenizer: Tokenizer,
                         split_at: int, extra_attrs: dict, documents: list,
                         stats: dict) -> None:
    """Write the corpus file ``path`` whose splits map the part files (paths relative
    to ``path``'s folder)."""
    import h5py
    dtype = token_dtype_for(tokenizer.vocab_size)
    total = sum(counts)
    bounds = {"train": (0, split_at), "val": (split_at, total)}
    with h5py.File(path, "w") as fh:
        fh.attrs.update(root_attrs(tokenizer, total, split_at, extra_attrs))
        for name, (s0, s1) in bounds.items():
            layout = h5py.VirtualLayout(shape=(s1 - s0,), dtype=dtype)
            for rel, n, (start, stop) in zip(part_relpaths, counts, _ranges(counts)):
                a, b = max(start, s0), min(stop, s1)
                if a < b:
                    source = h5py.VirtualSource(rel, "tokens", shape=(n,), dtype=dtype)
                    layout[a - s0:b - s0] = source[a - start:b - start]
            dset = fh.require_group(name).create_virtual_dataset("tokens", layout, fillvalue=0)
            dset.attrs.update(stats[name])
        fh.create_dataset("documents", data=documents_table(documents, split_at))


def publish(out: str, tmp_file: str, tmp_parts: Optional[str]) -> None:
    """Put a finished corpus in place: its parts folder (if any) first, then the file,
    each by rename; a stale parts folder of an older corpus at ``out`` is removed."""
    final_parts = parts_dir(out)
    if os.path.isdir(final_parts):
        shutil.rmtree(final_parts)
    if tmp_parts is not None:
        os.replace(tmp_parts, final_parts)
    os.replace(tmp_file, out)


def corpus_documents(sources: list, counts_by_source: dict, hashes: dict) -> list:
    """/documents rows from per-source token counts and file digests, in source order."""
    rows, start = [], 0
    for i, source in enumerate(sources):
        n = counts_by_source.get(i, 0)
        rows.append(Document(source.name, hashes[i], source.n_bytes, start, start + n))
        start += n
    return rows
