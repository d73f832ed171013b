"""SIGUSR1 / SIGTERM (Slurm's time-limit warning and preemption) request a clean stop:
the handler only sets a flag; the ranks agree on a step boundary, checkpoint, and
exit with EXIT_REQUEUE."""

from __future__ import annotations

import signal

_stop = {"requested": False, "signal": None}


def _handler(signum, frame):  # noqa: ARG001 - signal API
    _stop["requested"] = True
    _stop["signal"] = signal.Signals(signum).name


def install() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def stop_requested() -> bool:
    return _stop["requested"]


def signal_name() -> str:
    return _stop["signal"] or ""


def reset() -> None:
    _stop["requested"] = False
    _stop["signal"] = None
