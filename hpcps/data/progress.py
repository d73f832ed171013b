"""A small progress reporter for long loops (prepare, eval, ...).

On a terminal it redraws one line (``done / total``, rate, ETA); when stderr is
a pipe or a log file it prints a plain line every ``interval`` seconds and a
closing line after them (a loop shorter than ``interval`` prints nothing), so
batch logs stay readable. ``quiet=True`` prints nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_amount(value: float, unit: str) -> str:
    """``1536, "B"`` -> ``"1.5 KiB"``; other units are plain counts with a unit name."""
    if unit == "B":
        for name in _BYTE_UNITS:
            if abs(value) < 1024 or name == _BYTE_UNITS[-1]:
                return f"{value:.0f} {name}" if name == "B" else f"{value:.1f} {name}"
            value /= 1024
    return f"{value:,.0f} {unit}" if unit else f"{value:,.0f}"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Report progress of ``total`` units (bytes by default) on stderr.

    Use as ``with Progress(total, "encode") as p: p.update(n)``. Leaving the
    ``with`` block through an exception prints no final line, so an error
    message stays the last (and, for a fast failure, the only) line.
    """

    def __init__(self, total: Optional[float], desc: str = "", quiet: bool = False,
                 unit: str = "B", stream: Optional[TextIO] = None,
                 interval: Optional[float] = None, tty: Optional[bool] = None):
        self.total = total if total and total > 0 else None
        self.desc = desc
        self.quiet = quiet
        self.unit = unit
        self.done = 0.0
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        # A terminal line is cheap to redraw; log lines should be rare.
        self.interval = interval if interval is not None else (0.2 if tty else 10.0)
        self.start = time.monotonic()
        self._last_draw = self.start
        self._closed = False
        self._width = 0
        self._lines = 0         # lines printed so far

    # -- public API ------------------------------------------------------------
    def update(self, n: float = 1) -> None:
        self.done += n
        if self.quiet or self._closed:
            return
        now = time.monotonic()
        if now - self._last_draw >= self.interval:
            self._last_draw = now
            self._emit(self._status(now), final=False)

    def close(self) -> None:
        """Print the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self.quiet or not (self.tty or self._lines):
            return      # a log gets a closing line only after periodic lines
        now = time.monotonic()
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = (f"{self._prefix()}{format_amount(self.done, self.unit)} in "
                f"{format_duration(elapsed)} ({format_amount(rate, self.unit)}/s)")
        self._emit(text, final=True)

    def abandon(self) -> None:
        """Stop without a final line (an error is about to be reported)."""
        if not self._closed and self.tty and self._width and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    # -- drawing -----------------------------------------------------------------
    def _prefix(self) -> str:
        return f"{self.desc}: " if self.desc else ""

    def _status(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        done = format_amount(self.done, self.unit)
        if self.total:
            frac = min(1.0, self.done / self.total)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            bar = ""
            if self.tty:
                filled = int(frac * 20)
                bar = "[" + "#" * filled + "." * (20 - filled) + "] "
            return (f"{self._prefix()}{bar}{frac * 100:5.1f}% {done} / "
                    f"{format_amount(self.total, self.unit)}, "
                    f"{format_amount(rate, self.unit)}/s, ETA {format_duration(eta)}")
        return f"{self._prefix()}{done}, {format_amount(rate, self.unit)}/s"

    def _emit(self, text: str, final: bool) -> None:
        if self.tty:
            pad = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
            self._width = 0 if final else len(text)
        else:
            self.stream.write(text + "\n")
        self._lines += 1
        self.stream.flush()
