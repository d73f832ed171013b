"""Reading checkpoints: the resume point a run starts from, and a small reader for
other commands (sample, export, tests).

Shards are read by element range, so a checkpoint written by S servers loads into
any other number of servers (or one process): ``load_shard(lo, hi)`` stitches
[lo, hi) together from whichever saved shards overlap it.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np

from hpcps.checkpoint.files import TOKENIZER, read_shard_slice, read_worker
from hpcps.checkpoint.manifest import (
    Damaged,
    check_fits,
    committed,
    newest_verified,
    open_verified,
)
from hpcps.checkpoint.weights import is_weights_only
from hpcps.config import load_config
from hpcps.config.load import Config, validate
from hpcps.errors import UserError
from hpcps.optim.outer import optimizer_label


class ResumePoint:
    """A verified committed checkpoint: ``path``, ``step``, ``manifest``."""

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.step = int(manifest["step"])

    def __repr__(self) -> str:
        return f"ResumePoint({self.path!r}, step={self.step})"

    @property
    def n_params(self) -> int:
        return int(self.manifest["n_params"])

    def load_shard(self, lo: int, hi: int) -> dict:
        """params and optimizer state for elements [lo, hi), plus "t" and "version"."""
        if not 0 <= lo <= hi <= self.n_params:
            raise ValueError(f"range [{lo}, {hi}) is outside [0, {self.n_params})")
        names = ["params", *self.manifest["state_names"]]
        out = {name: np.empty(hi - lo, dtype=np.float32) for name in names}
        shards = sorted(self.manifest["shards"], key=lambda s: s["lo"])
        # every shard of a drained sync point has the same counters: take the first overlapping
        first = next((s for s in shards if s["lo"] < hi and s["hi"] > lo), shards[0])
        for shard in shards:
            a, b = max(lo, shard["lo"]), min(hi, shard["hi"])
            if a >= b:
                continue
            part = read_shard_slice(os.path.join(self.path, shard["file"]), names,
                                    a - shard["lo"], b - shard["lo"])
            for name in names:
                out[name][a - lo:b - lo] = part[name]
        out["t"], out["version"] = int(first["t"]), int(first["version"])
        return out

    def load_worker(self, worker_index: int, n_workers: int) -> dict:
        """The worker's step, pending metrics record and (same W only) what its strategy
        kept: error-feedback residual, a local-steps replica's inner optimizer state."""
        saved = self.manifest["workers"]
        if n_workers == len(saved):
            return read_worker(os.path.join(self.path, saved[worker_index]["file"]))
        # another worker count: the lead (index 0) keeps the pending record; residuals and
        # inner optimizer states belong to the old workers' slices and replicas: dropped
        full = read_worker(os.path.join(self.path, saved[0]["file"]))
        state = {"step": full["step"], "pending_record": full["pending_record"]}
        dropped = sorted(set(full) - set(state))
        if worker_index != 0:
            state["pending_record"] = ""
        elif dropped:
            print(f"hpcps: note: checkpoint {self.path} has {len(saved)} workers' own state "
                  f"({', '.join(dropped)}); this run has {n_workers} workers, so theirs start "
                  "fresh (local steps: from the global params with new inner optimizer state)",
                  file=sys.stderr, flush=True)
        return state


def find_resume(cfg, describe: dict, *, print_warnings: bool) -> Optional[ResumePoint]:
    """What ``train.resume`` selects; filesystem only, the same on every rank."""
    choice = cfg.train.resume
    if choice == "never":
        return None

    def warn(text: str) -> None:
        if print_warnings:
            print(text, file=sys.stderr, flush=True)
    if choice == "auto":
        found = newest_verified(cfg.checkpoint_dir, warn)
        if found is None:
            return None
        path, manifest = found
    else:
        path, manifest = _explicit(choice)
    if is_weights_only(manifest):
        raise UserError(f"checkpoint {path} holds weights only (no optimizer state to resume, "
                        f"e.g. from `hpcps import`): start from it with train.init_from="
                        f"{path} and a run directory of its own (out_dir)")
    check_fits(path, manifest, describe, optimizer_label(cfg))
    return ResumePoint(path, manifest)


def _explicit(path: str) -> tuple[str, dict]:
    if not os.path.exists(path):
        raise UserError(f"train.resume: checkpoint {path} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"train.resume: {path} is not a checkpoint directory")
    if not os.path.exists(os.path.join(path, "manifest.json")) and committed(path):
        newest = committed(path)[-1][1]
        raise UserError(f"train.resume: {path} is a checkpoint directory, not one checkpoint: "
                        f"give one of its step_* directories (newest {newest}) or use "
                        f"train.resume=auto with checkpoint.dir={path}")
    try:
        return path, open_verified(path)
    except Damaged as err:
        raise UserError(f"train.resume: cannot use checkpoint {path}: {err}") from None


# -- a reader for other commands ---------------------------------------------------------------
class CheckpointReader(ResumePoint):
    """``open_checkpoint(path)``: manifest, step, saved config, params, tokenizer."""

    @property
    def config(self):
        try:
            return Config(validate(dict(self.manifest.get("config", {}))), source=self.path)
        except UserError as err:
            raise UserError(f"checkpoint {self.path}: its saved config does not load: {err}") \
                from None

    def params(self) -> np.ndarray:
        return self.load_shard(0, self.n_params)["params"]

    def tokenizer_json(self) -> Optional[str]:
        """The corpus tokenizer saved with the checkpoint (None when the run had no corpus)."""
        file = os.path.join(self.path, TOKENIZER)
        if TOKENIZER not in self.manifest["files"]:
            return None
        with open(file, encoding="utf-8") as fh:
            return fh.read()


def _checkpoint_dir_of_run(run_dir: str) -> str:
    config = os.path.join(run_dir, "config.toml")
    if os.path.isfile(config):
        try:
            cfg = load_config(config)
            if cfg["checkpoint.dir"]:
                return cfg.checkpoint_dir
        except UserError:
            pass
    return os.path.join(run_dir, "checkpoints")


def open_checkpoint(path: str) -> CheckpointReader:
    """A checkpoint directory, a checkpoint.dir (its newest), or a run directory (its newest)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint or run directory {path} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a checkpoint or run directory")
    if os.path.exists(os.path.join(path, "manifest.json")):
        try:
            return CheckpointReader(path, open_verified(path))
        except Damaged as err:
            raise UserError(f"cannot use checkpoint {path}: {err}") from None
    for ckpt_dir in (path, _checkpoint_dir_of_run(path)):
        if committed(ckpt_dir):
            found = newest_verified(ckpt_dir, lambda text: print(text, file=sys.stderr))
            if found is None:
                raise UserError(f"no checkpoint in {ckpt_dir} verifies (all damaged)")
            return CheckpointReader(*found)
    raise UserError(f"{path} holds no committed checkpoint (no manifest.json and no step_* "
                    f"directories in it or in {_checkpoint_dir_of_run(path)})")
