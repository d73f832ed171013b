"""Output files: checked before any work, so a bad path is a one-line error in seconds."""

from __future__ import annotations

import os
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
