"""``hpcps`` command line: one module per subcommand in this package.

Each subcommand module defines ``NAME``, ``HELP``, ``EXAMPLE``,
``add_arguments(parser)`` and ``run(args) -> int``. ``hpcps --help`` imports every
subcommand module, so importing one must do nothing heavy: MPI is initialised only
by ``hpcps.runtime.mpi.mpi()``, and optional packages (CuPy, PyTorch, matplotlib,
tokenizers) are imported inside the functions that use them. Bad input anywhere
raises ``UserError``: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import pkgutil
import sys
from typing import Optional, Sequence

from hpcps import __version__
from hpcps.errors import EXIT_USAGE, UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad usage as a single line (with a suggestion) and exits 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        message = _suggest(message, self)
        raise UserError(f"{self.prog}: {message}")


def _suggest(message: str, parser: argparse.ArgumentParser) -> str:
    if "invalid choice" in message and "choose from" in message:
        bad = message.split("'")[1] if "'" in message else ""
        choices = [c.strip(" ')") .strip("'") for c in message.split("choose from", 1)[1].split(",")]
        hint = difflib.get_close_matches(bad, choices, n=1)
        head = message.split("(choose", 1)[0].strip()
        return f"{head} (did you mean '{hint[0]}'?)" if hint else message
    if message.startswith("unrecognized arguments"):
        options = [o for a in parser._actions for o in a.option_strings]
        words = message.split(":", 1)[1].split()
        for word in words:
            if word.startswith("-"):
                hint = difflib.get_close_matches(word.split("=")[0], options, n=1)
                if hint:
                    return f"{message} (did you mean '{hint[0]}'?)"
    return message


def command_modules() -> list:
    """The subcommand modules of this package, by name."""
    mods = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"hpcps.cli.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    return mods


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="hpcps", description="HPC parameter server for training language "
                           "models on MPI one-sided windows.")
    parser.add_argument("--version", action="version", version=f"hpcps {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors and results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    parser.subcommands = {}
    for mod in command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP,
                           epilog=f"example:\n  {mod.EXAMPLE}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-q", "--quiet", action="store_true",
                       help="print only errors and results")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
        parser.subcommands[mod.NAME] = p
    return parser


def report_user_error(err: UserError) -> None:
    text = " ".join(str(err).split("\n")).strip()
    if not text.startswith("hpcps"):
        text = f"hpcps: error: {text}"
    print(text, file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --quiet is accepted anywhere, also between key=value overrides
    quiet = any(a in ("-q", "--quiet") for a in argv)
    argv = [a for a in argv if a not in ("-q", "--quiet")]
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown and isinstance(getattr(args, "overrides", None), list):
            # key=value overrides after options (argparse binds them to nothing there)
            args.overrides += [a for a in unknown if "=" in a and not a.startswith("-")]
            unknown = [a for a in unknown if a not in args.overrides]
        if unknown:  # reported by the subcommand's parser, which knows its options
            parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        args.quiet = quiet
        code = int(args._run(args) or 0)
    except UserError as err:
        if getattr(err, "agreed_rank", 0) == 0:  # an error all ranks agreed on is printed once
            report_user_error(err)
        code = getattr(err, "exit_code", EXIT_USAGE)
    except OSError as err:
        if err.filename is None:  # not about a file the user named: a real failure
            raise
        # a file problem no check foresaw (a full disk, a path that vanished): one line
        print(f"hpcps: error: {err.filename}: {err.strerror or err}", file=sys.stderr,
              flush=True)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("hpcps: interrupted", file=sys.stderr)
        return 130
    _finalize_mpi()
    return code


def _finalize_mpi() -> None:
    """Every rank returns here together (errors are agreed, the rest aborts), so finalize
    now: otherwise `python -m mpi4py` turns a non-zero exit into MPI_Abort and its noise."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
