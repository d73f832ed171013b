"""``train.tensorboard = true``: the per-step metrics as TensorBoard events, read back with
TensorBoard's own reader, equal ``metrics.jsonl``; a resume hides the redone steps."""

import builtins
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcps.errors import UserError
from hpcps.metrics.runlog import MetricsWriter
from hpcps.metrics.tensorboard import TensorBoardWriter, scalars, tensorboard_dir

pytestmark = pytest.mark.timeout(180)

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
        "train.batch_size=4", "train.max_steps=6", "train.eval_every=3", "train.eval_steps=1",
        "train.log_every=3", "train.peak_flops=1e12", "train.warmup_steps=1",
        "checkpoint.every=3", "checkpoint.background=false", "train.tensorboard=true"]


def events(run_dir, tag):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tensorboard_dir(str(run_dir)))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def written_steps(run_dir, tag) -> list:
    """Every step a scalar ``tag`` was written at, in every event file, as written (TensorBoard's
    own file loader, without the accumulator's purging)."""
    from tensorboard.backend.event_processing.event_file_loader import (
        LegacyEventFileLoader,
    )
    steps = []
    for path in sorted(Path(tensorboard_dir(str(run_dir))).iterdir()):
        for event in LegacyEventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


def jsonl(run_dir, key):
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    return [(r["step"], np.float32(r[key])) for r in records if r.get(key) is not None]


def train(corpus, run_dir, *extra):
    proc = subprocess.run([sys.executable, "-m", "hpcps", "train", f"data.path={corpus}",
                           f"out_dir={run_dir}", *TINY, *extra], capture_output=True, text=True,
                          timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_scalars_keep_finite_numbers_only():
    record = {"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": None, "ok": True,
              "staleness_counts": [1, 2], "val_loss": float("nan"), "tokens": 7}
    assert scalars(record) == {"loss": 2.5, "lr": 1e-3, "tokens": 7.0}


def test_events_equal_the_metrics_and_a_resume_purges_the_redone_steps(make_corpus, tmp_path):
    pytest.importorskip("tensorboardX")
    corpus = make_corpus("the king and the queen went to town.\n" * 60)
    run = tmp_path / "run"
    train(corpus, run)
    assert events(run, "loss") == jsonl(run, "loss")
    assert [s for s, _ in events(run, "loss")] == [1, 2, 3, 4, 5, 6]
    assert events(run, "val_loss") == jsonl(run, "val_loss")
    assert [s for s, _ in events(run, "val_loss")] == [3, 6]
    # resume from the step-3 checkpoint: steps 4..6 are trained again and shown once
    out = train(corpus, run, f"train.resume={run / 'checkpoints' / 'step_00000003'}")
    assert "(step 3)" in out and len(list((run / "tensorboard").iterdir())) == 2
    assert [s for s, _ in events(run, "loss")] == [1, 2, 3, 4, 5, 6]
    assert events(run, "loss") == jsonl(run, "loss")
    # control: the files hold steps 3..6 twice (the resumed run writes the record of its
    # first boundary again); only the purge marker the resumed writer left shows them once
    assert written_steps(run, "loss") == [1, 2, 3, 3, 4, 4, 5, 5, 6, 6]


def test_missing_writer_library_is_a_user_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboardx(name, *args, **kwargs):
        if name == "tensorboardX" or name.startswith("tensorboardX."):
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboardx)
    with pytest.raises(UserError, match=r"needs the tensorboardX package \(pip install "
                                        r"'hpcps\[tensorboard\]'\)"):
        TensorBoardWriter(MetricsWriter(str(tmp_path), None), str(tmp_path))
