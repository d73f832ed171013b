"""The built-in offline corpus: the top-level ``*.py`` modules of the Python
standard library that ships with the running interpreter.

Every Python installation has them, so ``hpcps prepare default`` works with no
download. Selection (deterministic for a given Python version):

* directory ``sysconfig.get_paths()["stdlib"]``, top level only, so no
  site-packages, no test suites and no binary test data;
* files named ``*.py`` (not hidden), sorted by file name;
* files that contain a NUL byte or are not valid UTF-8 are left out, so every
  tokenizer accepts the corpus.

It is about 4-5 MB for CPython 3.10-3.13. The corpus records every file's
name and sha256 in its ``/documents`` table, so which files went in is always
visible with ``hpcps inspect``.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from hpcps.errors import UserError

DEFAULT_INPUT = "default"     # the INPUT word that selects this corpus
NAME_PREFIX = "stdlib/"       # document names: stdlib/<module>.py


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_clean_text(path: Path) -> bool:
    data = path.read_bytes()
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def default_corpus_files() -> list[Path]:
    """The selected stdlib files, sorted by name."""
    root = default_corpus_root()
    if not root.is_dir():
        raise UserError(f"the Python standard library directory {root} is missing; "
                        f"the default corpus needs it")
    files = sorted((p for p in root.glob("*.py") if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: p.name)
    files = [p for p in files if _is_clean_text(p)]
    if not files:
        raise UserError(f"no *.py files in the standard library directory {root}")
    return files
