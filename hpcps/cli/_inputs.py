"""Argument helpers shared by the commands that use a trained checkpoint (sample, eval,
translate, classify, fill-mask): integer bounds, the input-text arguments, the device."""

from __future__ import annotations


def int_at_least(low: int):
    """argparse type: an integer >= low (argparse names the option in its error)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def add_input_arguments(parser, what: str) -> None:
    """TEXT ... arguments, or --input FILE (one input per line; '-' is standard input);
    with neither, standard input is read."""
    parser.add_argument("text", nargs="*", metavar="TEXT",
                        help=f"a {what} to work on; several are worked on in turn (default: "
                             f"read lines from --input or standard input)")
    parser.add_argument("--input", metavar="FILE", default=None,
                        help=f"read one {what} per line from FILE ('-': standard input)")


def add_device_argument(parser) -> None:
    """--device cpu | gpu: where the model runs."""
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="run the model with NumPy (cpu, default) or CuPy (gpu)")
