"""A run directory's ``metrics.jsonl``: written by the trainer, read by ``metrics``/``plot``.

The trainer appends one JSON object per step to ``metrics.jsonl`` (``MetricsWriter``);
on resume from step k the file is rewritten (atomically) without the records of
steps > k, so it stays one record per step however often a job is restarted. After a resume
the same step can appear twice (the last record wins), and a writer killed
mid-line leaves a torn last line (skipped with a warning). Anything else malformed
is a ``UserError`` naming the line.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, TextIO, Union

from hpcps.errors import UserError
from hpcps.metrics.progress_line import ProgressLine
from hpcps.metrics.tensorboard import TensorBoardWriter

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"

PathLike = Union[str, Path]
Warn = Callable[[str], None]


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    def __init__(self, run_dir: str, resume_step: Optional[int]):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is None:
            mode = "w"
        else:
            self._truncate_after(resume_step)
            mode = "a"
        self.fh = open(self.path, mode, encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed writer
                if isinstance(record, dict) and record.get("step", 0) <= step:
                    kept.append(json.dumps(record) + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        clean = {k: _finite(v) for k, v in record.items()}
        self.fh.write(json.dumps(clean) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _default_warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def metrics_path(run_dir: PathLike) -> Path:
    run = Path(run_dir)
    if not run.exists():
        raise UserError(f"run directory {run} does not exist")
    if not run.is_dir():
        raise UserError(f"{run} is not a directory (expected a run directory)")
    path = run / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run} has no {METRICS_FILE} (not a run directory?)")
    return path


def _parse_line(text: str, where: str) -> dict:
    record = json.loads(text)
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise UserError(f"{where}: record needs an integer 'step', got {step!r}")
    return record


def read_metrics(run_dir: PathLike, warn: Optional[Warn] = None) -> list[dict]:
    """The run's per-step records, one per step (the last one written wins), by step.

    ``warn`` receives the message about a skipped torn last line (default: a
    ``RuntimeWarning``).
    """
    path = metrics_path(run_dir)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    by_step: dict[int, dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            record = _parse_line(line, where)
        except json.JSONDecodeError as err:
            if i == last:  # a writer killed mid-line: the rest of the file is still good
                (warn or _default_warn)(f"{where}: skipped a torn last line ({err.msg})")
                continue
            raise UserError(f"{where}: not valid JSON ({err.msg})") from None
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def read_config(run_dir: PathLike) -> dict:
    """The run's resolved ``config.toml`` as nested dicts; {} when absent or unreadable."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, ValueError):
        return {}


def run_label(run_dir: PathLike) -> str:
    """``NAME (MODE)``: the run directory's name and its parameter-server mode."""
    run = Path(run_dir).resolve()
    ps = read_config(run).get("ps")
    mode = ps.get("mode") if isinstance(ps, dict) else None
    return f"{run.name} ({mode})" if isinstance(mode, str) and mode else run.name


# -- CSV export ------------------------------------------------------------------------

def metric_columns(records: list[dict]) -> list[str]:
    """``step`` first, then every other key in the order it first appears."""
    columns = ["step"]
    seen = {"step"}
    for record in records:
        for key in record:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return columns


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict, bool)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)  # floats keep their shortest exact form; nan and inf as written


def write_metrics_csv(records: list[dict], stream: TextIO) -> list[str]:
    """Write ``records`` as CSV (lists JSON-encoded in one cell); returns the columns."""
    columns = metric_columns(records)
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow([_cell(record.get(column)) for column in columns])
    return columns


class RunLog:
    """The lead worker's outputs for each step record: a line in ``metrics.jsonl`` (and
    TensorBoard events with ``train.tensorboard``) and, every ``train.log_every`` steps,
    the progress line."""

    def __init__(self, cfg, keep_through: Optional[int], quiet: bool):
        self.writer = MetricsWriter(cfg.out_dir, keep_through)
        if cfg.train.tensorboard:     # also TensorBoard events; a resume purges the redone steps
            self.writer = TensorBoardWriter(self.writer, cfg.out_dir,
                                            None if keep_through is None else keep_through + 1)
        self.line = ProgressLine(cfg.train.max_steps, cfg.train.log_every, quiet)

    def record(self, record: dict) -> None:
        self.writer.write(record)
        self.line.step(record)

    def message(self, text: str) -> None:
        self.line.message(text)

    def close(self) -> None:
        self.writer.close()
