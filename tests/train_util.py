"""Short real trainings for the tests of the commands that use a checkpoint (translate,
classify, fill-mask, eval): one process, a few hundred steps, always with a timeout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mpi_util import QUIET_THREADS, run_command


def train(out_dir: Path, overrides: list, timeout: float = 150) -> Path:
    """``python -m hpcps train`` with ``overrides`` into ``out_dir``; fails the test on error."""
    import os
    env = dict(os.environ, **QUIET_THREADS)
    proc = run_command([sys.executable, "-m", "hpcps", "train", f"out_dir={out_dir}",
                        "train.resume=never", *overrides], timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir


def eval_records(run: Path) -> dict:
    """step -> the val_* metrics training wrote for that step."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        vals = {k: v for k, v in record.items() if k.startswith("val_")}
        if vals:
            out[record["step"]] = vals
    return out


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``hpcps ARGV`` in this process: (exit code, stdout, stderr)."""
    from hpcps.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, out: str, err: str) -> str:
    """The error text of a command that must fail with exit 2, one line, no output."""
    assert code == 2 and out == "" and err.count("\n") == 1, (code, out, err)
    return err


def logged_losses(cfg, out_dir: Path, timeout: float = 120) -> list:
    """Train ``cfg`` (a resolved Config) in one process into ``out_dir``; the train loss
    of every step as the run log holds it."""
    import os
    config = out_dir.parent / f"{out_dir.name}.toml"
    config.write_text(cfg.replace(out_dir=str(out_dir)).to_toml(), encoding="utf-8")
    env = dict(os.environ, **QUIET_THREADS)
    proc = run_command([sys.executable, "-m", "hpcps", "train", str(config)], timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def token_cross_entropy(logits, targets) -> float:
    """Mean negative log-likelihood (float64) of ``targets`` over the positions that are
    not -1; ``logits`` has one more axis (the vocabulary) than ``targets``."""
    import numpy as np
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    targets = np.asarray(targets)
    keep = targets != -1
    picked = np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    return float(-picked[keep].mean())
