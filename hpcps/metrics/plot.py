"""Training-curve figure for one or more run directories (``hpcps plot``).

Four panels share one color per run: loss vs step, loss vs wall time, throughput
vs step, and the histogram of push staleness. matplotlib is imported only here,
with the non-interactive Agg canvas, so the rest of hpcps never needs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hpcps.errors import UserError
from hpcps.metrics.runlog import PathLike, Warn, read_metrics, run_label
from hpcps.runtime.files import check_writable

MATPLOTLIB_HINT = "plot needs matplotlib (pip install 'hpcps[plot]')"


@dataclass
class RunCurves:
    """The columns of one run that the figure draws (points where a key is missing are left out)."""

    label: str
    loss: tuple[list, list]            # (steps, values)
    val_loss: tuple[list, list]
    loss_wall: tuple[list, list]       # (wall seconds, values)
    val_loss_wall: tuple[list, list]
    tokens_per_s: tuple[list, list]
    staleness: list[int]               # pushes per staleness value; [] when none


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _column(records: list[dict], key: str, x_key: str = "step") -> tuple[list, list]:
    xs, ys = [], []
    for record in records:
        x, y = record.get(x_key), record.get(key)
        if _is_number(x) and _is_number(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _monotonic_wall(records: list[dict]) -> list[dict]:
    """Records with ``wall_s`` made non-decreasing: a resumed run that restarted its
    clock continues from where the previous segment ended."""
    out, offset, previous = [], 0.0, None
    for record in records:
        wall = record.get("wall_s")
        if _is_number(wall):
            if previous is not None and wall + offset < previous:
                offset = previous - wall
            previous = wall + offset
            record = {**record, "wall_s": previous}
        out.append(record)
    return out


def _staleness_histogram(records: list[dict]) -> list[int]:
    totals: list[int] = []
    for record in records:
        counts = record.get("staleness_counts")
        if not isinstance(counts, list):
            continue
        if len(counts) > len(totals):
            totals.extend([0] * (len(counts) - len(totals)))
        for i, count in enumerate(counts):
            if _is_number(count):
                totals[i] += int(count)
    return totals if sum(totals) > 0 else []


def load_curves(run_dir: PathLike, label: Optional[str] = None,
                warn: Optional[Warn] = None) -> RunCurves:
    records = read_metrics(run_dir, warn=warn)
    if not records:
        raise UserError(f"{Path(run_dir) / 'metrics.jsonl'} has no records")
    timed = _monotonic_wall(records)
    return RunCurves(
        label=label if label is not None else run_label(run_dir),
        loss=_column(records, "loss"),
        val_loss=_column(records, "val_loss"),
        loss_wall=_column(timed, "loss", "wall_s"),
        val_loss_wall=_column(timed, "val_loss", "wall_s"),
        tokens_per_s=_column(records, "tokens_per_s"),
        staleness=_staleness_histogram(records),
    )


def _time_unit(max_seconds: float) -> tuple[float, str]:
    if max_seconds >= 2 * 3600:
        return 3600.0, "hours"
    if max_seconds >= 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _check_output(out: PathLike, canvas_types: dict) -> Path:
    path = Path(out)
    if not path.parent.is_dir():
        raise UserError(f"output directory {path.parent} does not exist")
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in canvas_types:
        raise UserError(f"cannot write '{path.name}': use one of "
                        f"{', '.join('.' + t for t in sorted(canvas_types))}")
    check_writable(str(path))
    return path


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes,
            color="0.45", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


def _smooth(values: list, window: int) -> list:
    """Trailing moving average, so a noisy train loss still shows its trend."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _loss_top(runs, train_key: str, val_key: str) -> Optional[float]:
    """An upper y limit that skips the first few percent of training when the initial
    loss (ln(vocab) for a language model) would squash the rest of the curve."""
    tails, everything = [], []
    for run in runs:
        ys = getattr(run, train_key)[1]
        tails += ys[len(ys) // 20:]
        everything += ys + getattr(run, val_key)[1]
    tails += [y for run in runs for y in getattr(run, val_key)[1]]
    if not tails:
        return None
    low, top, peak = min(everything), max(tails), max(everything)
    return top + 0.08 * (top - low) if peak > top + 0.5 * (top - low) else None


def _draw_loss(ax, runs, colors, train_key, val_key, scale=1.0) -> int:
    drawn = 0
    for run, color in zip(runs, colors):
        xs, ys = getattr(run, train_key)
        if xs:
            xs = [x / scale for x in xs]
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            if len(ys) >= 50:
                ax.plot(xs, _smooth(ys, max(len(ys) // 50, 2)), color=color, linewidth=1.4)
            drawn += 1
        xs, ys = getattr(run, val_key)
        if xs:
            ax.plot([x / scale for x in xs], ys, color=color, linestyle="none", marker="o",
                    markersize=6, markeredgecolor="black", markeredgewidth=0.6, zorder=3)
            drawn += 1
    if not drawn:
        _empty_note(ax, "no loss recorded")
        return 0
    top = _loss_top(runs, train_key, val_key)
    if top is not None:
        ax.set_ylim(top=top)
        ax.text(0.99, 0.98, "first steps clipped", ha="right", va="top",
                transform=ax.transAxes, color="0.45", fontsize=8)
    return drawn


def _draw_throughput(ax, runs, colors) -> int:
    drawn = 0
    for run, color in zip(runs, colors):
        xs, ys = run.tokens_per_s
        if xs:
            ax.plot(xs, ys, color=color, linewidth=1.2)
            drawn += 1
    if drawn:
        ax.set_ylim(bottom=0)
    else:
        _empty_note(ax, "no tokens/s recorded")
    return drawn


def _draw_staleness(ax, runs, colors) -> int:
    with_data = [(run, color) for run, color in zip(runs, colors) if run.staleness]
    if not with_data:
        _empty_note(ax, "no staleness recorded")
        return 0
    width = 0.8 / len(with_data)
    longest = max(len(run.staleness) for run, _ in with_data)
    highest = 0.0
    for k, (run, color) in enumerate(with_data):
        total = sum(run.staleness)
        shares = [c / total for c in run.staleness]
        highest = max(highest, *shares)
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(shares))]
        ax.bar(xs, shares, width=width, color=color, label=f"{run.label}: {total:,} pushes")
    ax.set_xticks(range(longest))
    ax.set_ylim(0, min(1.0, highest * 1.15))
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    return len(with_data)


def plot_runs(run_dirs: Sequence[PathLike], out: PathLike,
              labels: Optional[Sequence[str]] = None, warn: Optional[Warn] = None) -> int:
    """Draw the training curves of ``run_dirs`` into ``out`` (.png, .pdf, .svg...).

    Returns the number of data series drawn: one per run and quantity that has data
    (train loss and val loss in each of the two loss panels, tokens/s, staleness).
    """
    if not run_dirs:
        raise UserError("plot needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise UserError(f"got {len(labels)} labels for {len(run_dirs)} run directories")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise UserError(MATPLOTLIB_HINT) from None
    path = _check_output(out, FigureCanvasAgg.get_supported_filetypes())
    runs = [load_curves(d, labels[i] if labels else None, warn) for i, d in enumerate(run_dirs)]

    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
               "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    colors = [palette[i % len(palette)] for i in range(len(runs))]
    fig = Figure(figsize=(12, 8.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    (ax_step, ax_wall), (ax_tput, ax_stale) = fig.subplots(2, 2)

    drawn = _draw_loss(ax_step, runs, colors, "loss", "val_loss")
    ax_step.set(title="Loss vs step (lines: train, dots: val)", xlabel="step", ylabel="loss")

    max_wall = max((max(r.loss_wall[0] + r.val_loss_wall[0], default=0) for r in runs), default=0)
    scale, unit = _time_unit(max_wall)
    drawn += _draw_loss(ax_wall, runs, colors, "loss_wall", "val_loss_wall", scale)
    ax_wall.set(title="Loss vs wall time", xlabel=f"wall time ({unit})", ylabel="loss")

    drawn += _draw_throughput(ax_tput, runs, colors)
    ax_tput.set(title="Throughput", xlabel="step", ylabel="tokens / s")
    ax_tput.yaxis.set_major_formatter(_thousands_formatter())

    drawn += _draw_staleness(ax_stale, runs, colors)
    ax_stale.set(title="Push staleness (all steps)", xlabel="staleness (server versions behind)",
                 ylabel="fraction of pushes")

    for ax in (ax_step, ax_wall, ax_tput, ax_stale):
        ax.grid(True, color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    handles = [Line2D([], [], color=c, linewidth=2.5) for c in colors]
    fig.legend(handles, [r.label for r in runs], loc="outside upper center",
               ncol=min(len(runs), 4), frameon=False, fontsize=11)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")   # never half an image
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return drawn


def _thousands_formatter():
    from matplotlib.ticker import FuncFormatter

    def fmt(value, _pos):
        return f"{value / 1000:g}k" if abs(value) >= 1000 else f"{value:g}"
    return FuncFormatter(fmt)
