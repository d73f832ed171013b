"""The files inside one checkpoint: names, HDF5 shard/worker files, checksums, fsync.

Nothing here knows about MPI or threads; every function works on one rank's files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
from typing import Optional

import h5py
import numpy as np

FORMAT_NAME = "hpcps-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
COMMITTED_RE = re.compile(r"^step_(\d+)$")
FAULT_ENV = "HPCPS_CHECKPOINT_FAULT"
WRITE_SLICE = 1 << 18   # elements per HDF5 write call (1 MiB of fp32)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def server_file(index: int) -> str:
    return f"server_{index:04d}.h5"


def worker_file(index: int) -> str:
    return f"worker_{index:04d}.h5"


def rank_done_file(rank: int) -> str:
    return f"rank_{rank}.json"


def rank_failed_file(rank: int) -> str:
    return f"rank_{rank}.failed"


# -- durability ------------------------------------------------------------------------
def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_and_sync(path: str) -> dict:
    """sha256 and size of a closed file, read back once; fsync it on the way."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            chunk = os.read(fd, 8 << 20)
            if not chunk:
                break
            digest.update(chunk)
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return {"sha256": digest.hexdigest(), "size": size}


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_durable(path: str, obj, indent: Optional[int] = None) -> dict:
    """Write JSON to ``path`` via a temporary name + rename; fsynced. Returns sha256/size."""
    tmp = f"{path}.part"
    data = (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode()
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def write_text_durable(path: str, text: str) -> dict:
    data = text.encode()
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def commit(tmp: str, final: str, manifest: dict) -> None:
    """Write the manifest into the finished ``tmp`` directory and rename it to ``final``:
    the rename is the commit, so a crash before it leaves only a ``.tmp`` directory."""
    write_json_durable(os.path.join(tmp, MANIFEST), manifest, indent=1)
    fsync_dir(tmp)
    remove_tree(final)  # a stale same-step checkpoint of an abandoned attempt
    os.rename(tmp, final)
    fsync_dir(os.path.dirname(final))


def remove_tree(path: str) -> None:
    """Delete a directory; rename it to a ``.tmp`` name first so a crash half-way never
    leaves a committed-looking directory with files missing."""
    if not os.path.exists(path):
        return
    doomed = path
    if not path.endswith(".tmp"):
        doomed = f"{path}.deleting.{os.getpid()}.tmp"
        os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# -- test hook: faults at a given step on a given world rank -----------------------------
def fault_at(step: int, rank: int) -> Optional[str]:
    """``HPCPS_CHECKPOINT_FAULT="KIND:step=N:rank=R[,R...]"`` (KIND: enospc | kill | sigusr1) ->
    KIND when this save matches. Used by the tests to simulate a full disk, a crash
    mid-write, and a stop signal that arrives during a checkpoint."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    kind, *parts = spec.split(":")
    fields = dict(p.split("=", 1) for p in parts if "=" in p)
    ranks = [int(r) for r in fields.get("rank", "0").split(",")]   # R or R1,R2,...
    if int(fields.get("step", step)) != step or rank not in ranks:
        return None
    return kind


def inject(kind: Optional[str], path: str) -> None:
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sigusr1":
        os.kill(os.getpid(), signal.SIGUSR1)


# -- HDF5 ------------------------------------------------------------------------------
def write_shard(path: str, *, lo: int, hi: int, arrays: dict, t: int, version: int, step: int,
                optimizer: str, fault: Optional[str] = None) -> None:
    """params[lo:hi) and optimizer state as fp32 datasets; counters as attributes."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["kind"] = "server_shard"
        f.attrs.update({"lo": lo, "hi": hi, "t": int(t), "version": int(version),
                        "step": int(step), "optimizer": optimizer})
        for i, (name, arr) in enumerate(sorted(arrays.items())):
            if arr.shape != (hi - lo,):
                raise ValueError(f"shard array {name} has shape {arr.shape}, expected {(hi - lo,)}")
            dset = f.create_dataset(name, shape=arr.shape, dtype=np.float32)
            # in slices: h5py holds the GIL during a write, and training runs meanwhile
            for a in range(0, len(arr), WRITE_SLICE):
                dset[a:a + WRITE_SLICE] = arr[a:a + WRITE_SLICE]
            if i == 0:
                f.flush()
                inject(fault, path)  # a crash or a full disk half-way through the file


def read_shard_meta(path: str) -> dict:
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read_shard_slice(path: str, names, a: int, b: int) -> dict:
    """Elements [a, b) (relative to the file's lo) of each dataset in ``names``."""
    with h5py.File(path, "r") as f:
        return {name: f[name][a:b] for name in names}


WORKER_ATTRS = ("worker_index", "n_workers", "step", "pending_record", "format", "kind")


def write_worker(path: str, *, index: int, n_workers: int, step: int, pending_record: str,
                 arrays: Optional[dict] = None, counters: Optional[dict] = None) -> None:
    """A worker's state: its pending record, then what its strategy keeps (``arrays``:
    fp32 datasets such as the error-feedback residual or a local-steps replica's inner
    optimizer state; ``counters``: integers such as the local-steps round)."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["kind"] = "worker"
        f.attrs.update({"worker_index": index, "n_workers": n_workers, "step": int(step),
                        "pending_record": pending_record or ""})
        for name, value in (counters or {}).items():
            f.attrs[name] = int(value)
        for name, value in (arrays or {}).items():
            f.create_dataset(name, data=value, dtype=np.float32)


def read_worker(path: str) -> dict:
    with h5py.File(path, "r") as f:
        text = f.attrs.get("pending_record", "")
        out = {"step": int(f.attrs["step"]),
               "pending_record": text.decode() if isinstance(text, bytes) else str(text)}
        for name, value in f.attrs.items():
            if name not in WORKER_ATTRS:
                out[name] = int(value)
        for name in f:
            out[name] = f[name][...]
    return out


def to_host(value, copy: bool = True) -> np.ndarray:
    """The array on the host (CuPy arrays are fetched); ``copy``: a private copy even of a
    NumPy array, so a background writer never sees training change it."""
    if hasattr(value, "get") and not isinstance(value, np.ndarray):
        return np.asarray(value.get(), dtype=np.float32)
    return np.array(value, dtype=np.float32, copy=copy)
