"""Output files: checked before any work, so a bad path is a one-line error in seconds."""

from __future__ import annotations

import os
import shutil
import tempfile

from hpcps.errors import UserError


def check_writable(path: str, what: str = "output") -> None:
    """A ``UserError`` naming ``path`` unless a file can be created beside it (its folder
    exists and takes new files); the probe file is removed again. Writers still go through
    a temporary name and a rename, so a failure later leaves no partial ``path``."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {what} {path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hpcps-probe-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write {what} {path}: {err.strerror or err}") from None


def check_output_target(out: str, overwrite: bool, want_dir: bool) -> None:
    """A ``UserError`` unless ``out`` may be written: its folder exists, and it is absent,
    an empty directory (``want_dir``), or ``overwrite`` is given."""
    if not os.path.exists(out):
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise UserError(f"output {out}: directory {parent} does not exist")
        return
    if want_dir and not os.path.isdir(out):
        raise UserError(f"output {out} exists and is not a directory")
    if not want_dir and os.path.isdir(out):
        raise UserError(f"output {out} is a directory; give a file name")
    if not overwrite and not (want_dir and not os.listdir(out)):
        raise UserError(f"output {out} already exists (use --overwrite to replace it)")


def write_directory(out: str, overwrite: bool, write):
    """``write(tmp)`` fills a fresh temporary directory beside ``out``, which then replaces
    ``out`` by a rename: a failure half-way leaves no partial output. Returns what
    ``write`` returned."""
    check_output_target(out, overwrite, want_dir=True)
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        files = write(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files
