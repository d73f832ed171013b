"""TensorBoard event files of the per-step metrics (``train.tensorboard = true``).

``TensorBoardWriter`` wraps the run's ``MetricsWriter``: every record still goes to
``metrics.jsonl`` and each of its numeric values also becomes a TensorBoard scalar
with the record's key as the tag (``loss``, ``val_loss``, ``lr``, ``tokens_per_s``,
...) at the record's ``step``, in ``OUT_DIR/tensorboard/``. Events are written by
``tensorboardX`` (a maintained writer; hpcps does not write the event format
itself). On resume from step k the writer purges the events at steps >= k of the
earlier attempt, the same records ``metrics.jsonl`` drops.

    tensorboard --logdir OUT_DIR/tensorboard
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

from hpcps.errors import UserError

TENSORBOARD_DIR = "tensorboard"


def tensorboard_dir(run_dir: str) -> str:
    return os.path.join(run_dir, TENSORBOARD_DIR)


def scalars(record: dict) -> dict:
    """The record's finite numbers except ``step`` (lists, None, booleans, NaN are left out)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


MISSING = ("train.tensorboard = true needs the tensorboardX package "
           "(pip install 'hpcps[tensorboard]')")


def require_tensorboard() -> None:
    """A UserError now (at set-up, agreed by every rank) when the writer could not start."""
    if importlib.util.find_spec("tensorboardX") is None:
        raise UserError(MISSING)


class TensorBoardWriter:
    """``write(record)`` / ``close()`` like ``MetricsWriter``, which it wraps."""

    def __init__(self, inner, run_dir: str, purge_step: Optional[int] = None):
        try:
            # an optional dependency, needed only when train.tensorboard is on
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UserError(MISSING) from None
        self.inner = inner
        # the pid in the file name: a restart within the same second gets its own file
        self.events = SummaryWriter(logdir=tensorboard_dir(run_dir), purge_step=purge_step,
                                    flush_secs=10, filename_suffix=f".{os.getpid()}")

    def write(self, record: dict) -> None:
        self.inner.write(record)
        for tag, value in scalars(record).items():
            self.events.add_scalar(tag, value, global_step=int(record["step"]))

    def close(self) -> None:
        self.inner.close()
        self.events.close()
