"""manifest.json: reading, checking and verifying committed checkpoints.

Everything here looks at the filesystem only (no MPI), so every rank that runs it
on the same directory reaches the same answer.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from hpcps import __version__
from hpcps.checkpoint.files import (
    COMMITTED_RE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    sha256_of,
)
from hpcps.errors import UserError

REQUIRED_KEYS = ("format", "format_version", "step", "files", "shards", "workers", "describe",
                 "n_params", "optimizer", "state_names")


def new_manifest(*, step: int, reason: dict, mode: str, world_size: int, n_servers: int,
                 n_workers: int, layout, optimizer: str, state_names, shards: list,
                 workers: list, files: dict, describe: dict, config: dict, **extra) -> dict:
    """The manifest of a checkpoint about to be committed (docs/checkpoint-format.md);
    ``extra`` keys are added as they are (e.g. ``imported`` by ``hpcps import``)."""
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "hpcps_version": __version__, "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "unix_time": time.time(),
        "reason": reason, "mode": mode, "world_size": world_size,
        "n_servers": n_servers, "n_workers": n_workers,
        "n_params": layout.total, "optimizer": optimizer,
        "state_names": list(state_names), "shards": shards, "workers": workers,
        "files": files, "describe": describe, "layout": layout.describe(),
        "config": config, **extra,
    }


class Damaged(Exception):
    """A committed checkpoint that does not verify; ``str()`` names the file and the problem."""


def committed(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every committed checkpoint directory, oldest first."""
    try:
        names = os.listdir(ckpt_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        match = COMMITTED_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_manifest(path: str) -> dict:
    """The parsed manifest of checkpoint directory ``path``; Damaged when missing or malformed."""
    file = os.path.join(path, MANIFEST)
    try:
        with open(file, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise Damaged(f"{file}: manifest missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Damaged(f"{file}: manifest is not valid JSON ({err})") from None
    except OSError as err:
        raise Damaged(f"{file}: cannot read the manifest ({err.strerror})") from None
    if not isinstance(manifest, dict):
        raise Damaged(f"{file}: manifest is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise Damaged(f"{file}: manifest lacks {', '.join(missing)}")
    if manifest["format"] != FORMAT_NAME:
        raise Damaged(f"{file}: format is {manifest['format']!r}, not {FORMAT_NAME!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise Damaged(f"{file}: format version {manifest['format_version']!r}; this hpcps reads "
                      f"version {FORMAT_VERSION}")
    _check_tiling(file, manifest)
    return manifest


def _check_tiling(file: str, manifest: dict) -> None:
    """The shards must cover [0, n_params) exactly once, and every file must be listed."""
    try:
        shards = sorted((int(s["lo"]), int(s["hi"]), s["file"]) for s in manifest["shards"])
        workers = [w["file"] for w in manifest["workers"]]
        expect = 0
        for lo, hi, _ in shards:
            if lo != expect or hi < lo:
                raise Damaged(f"{file}: shard ranges do not tile [0, {manifest['n_params']})")
            expect = hi
        if expect != int(manifest["n_params"]):
            raise Damaged(f"{file}: shard ranges end at {expect}, not {manifest['n_params']}")
        for name in [f for _, _, f in shards] + workers:
            if name not in manifest["files"]:
                raise Damaged(f"{file}: {name} is not in the file list")
    except (KeyError, TypeError, ValueError) as err:
        raise Damaged(f"{file}: malformed shard or worker list ({err})") from None


def verify(path: str, manifest: dict) -> None:
    """Every listed file exists with its size and sha256; Damaged naming the first that does not."""
    for name, entry in sorted(manifest["files"].items()):
        file = os.path.join(path, name)
        try:
            size = os.path.getsize(file)
        except OSError:
            raise Damaged(f"{file}: missing") from None
        if size != entry.get("size"):
            raise Damaged(f"{file}: size {size} bytes, manifest says {entry.get('size')}")
    for name, entry in sorted(manifest["files"].items()):
        file = os.path.join(path, name)
        if sha256_of(file) != entry.get("sha256"):
            raise Damaged(f"{file}: sha256 does not match the manifest (corrupt)")


def open_verified(path: str) -> dict:
    manifest = load_manifest(path)
    verify(path, manifest)
    return manifest


def newest_verified(ckpt_dir: str, warn) -> Optional[tuple[str, dict]]:
    """The newest committed checkpoint that verifies; ``warn(text)`` for each one skipped."""
    for step, path in reversed(committed(ckpt_dir)):
        try:
            return path, open_verified(path)
        except Damaged as err:
            warn(f"hpcps: warning: skipping checkpoint {path}: {err}")
    return None


# -- does a checkpoint fit this run? ---------------------------------------------------------
def short_value(key: str, value) -> str:
    """``key=value`` for a one-line error; a sha256 cut to its first 12 digits."""
    if key.endswith("sha256") and isinstance(value, str):
        return f"{key}={value[:12]}"
    return f"{key}={value}"


def mismatches(saved: dict, current: dict) -> list[str]:
    """Keys of the model description whose values differ (n_params last: it follows the rest)."""
    keys = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    keys.sort(key=lambda k: k == "n_params")
    return keys


def check_fits(path: str, manifest: dict, describe: dict, optimizer: str) -> None:
    saved = dict(manifest["describe"])
    saved["optimizer"] = manifest["optimizer"]
    current = dict(describe)
    current["optimizer"] = optimizer
    keys = mismatches(saved, current)
    if keys:
        was = ", ".join(short_value(k, saved.get(k)) for k in keys)
        now = ", ".join(short_value(k, current.get(k)) for k in keys)
        raise UserError(f"checkpoint {path} was written for {was}; this run has {now}")
