"""The progress line the lead worker prints every ``train.log_every`` steps."""

from __future__ import annotations

import math
import sys
import time
from typing import Optional


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def three_digits(value: float) -> str:
    """value with three significant digits and a k / M / G suffix: 0.500, 162, 1.62k, 16.2k,
    162k, 1.62M (a slow model's 162 tokens/s must not read "0.2k")."""
    units = ((1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G"))
    for i, (scale, suffix) in enumerate(units):
        scaled = value / scale
        if scaled == 0:
            return "0"
        exponent = math.floor(math.log10(abs(scaled)))
        rounded = round(scaled, 2 - exponent)
        if abs(rounded) >= 1000 and i < len(units) - 1:
            continue     # 999.6 reads 1.00k
        exponent = math.floor(math.log10(abs(rounded)))
        return f"{rounded:.{max(0, 2 - exponent)}f}{suffix}"
    raise AssertionError("unreachable: the last unit always returns")


class ProgressLine:
    """Rank 0's progress line every ``log_every`` steps (stdout, plain text for batch logs)."""

    def __init__(self, max_steps: int, log_every: int, quiet: bool, stream=None):
        self.max_steps, self.log_every, self.quiet = max_steps, log_every, quiet
        self.stream = stream or sys.stdout
        self.started = time.monotonic()
        self.first_step: Optional[int] = None
        # throughput over the steps since the last line, not the last step alone (one step
        # that held a checkpoint or an evaluation would otherwise swing the figure)
        self.window = {"s": 0.0, "tokens": 0.0, "mfu_s": 0.0}

    def step(self, record: dict) -> None:
        step = record["step"]
        if self.first_step is None:
            self.first_step = step - 1
            self.started = time.monotonic() - record.get("step_s", 0.0)
        step_s = record.get("step_s", 0.0)
        self.window["s"] += step_s
        self.window["tokens"] += record["tokens_per_s"] * step_s
        self.window["mfu_s"] += (record.get("mfu") or 0.0) * step_s
        if self.quiet or not (step % self.log_every == 0 or step == self.max_steps
                              or "val_loss" in record):
            return
        parts = [f"step {step}/{self.max_steps}", f"loss {record['loss']:.4f}"]
        if "val_loss" in record:
            parts.append(f"val {record['val_loss']:.4f}")
        parts.append(f"lr {record['lr']:.2e}")
        if record.get("grad_norm") is not None:
            parts.append(f"gnorm {record['grad_norm']:.3f}")
        window_s = self.window["s"]
        tokens_per_s = self.window["tokens"] / window_s if window_s > 0 else record["tokens_per_s"]
        parts.append(f"{three_digits(tokens_per_s)} tok/s")
        if record.get("mfu") is not None:
            mfu = self.window["mfu_s"] / window_s if window_s > 0 else record["mfu"]
            parts.append(f"mfu {100 * mfu:.1f}%")
        self.window = {"s": 0.0, "tokens": 0.0, "mfu_s": 0.0}
        if "staleness_mean" in record:
            parts.append(f"stale {record['staleness_mean']:.2f}/{record['staleness_max']}")
        if "push_mb" in record:
            per = "/node" if record.get("traffic_scope") == "node" else ""
            parts.append(f"push {record['push_mb']:.2f}MB{per} pull {record['pull_mb']:.2f}MB{per}")
        done = step - self.first_step
        elapsed = time.monotonic() - self.started
        if done > 0:
            parts.append(f"eta {_fmt_duration(elapsed / done * (self.max_steps - step))}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)
