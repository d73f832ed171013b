"""Export a checkpoint to other tools' formats.

``export_checkpoint(path, fmt, out, overwrite=False)`` with ``fmt``:

- ``hf-gpt2``: a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` loads
  (GPT checkpoints only; see ``hf_gpt2``);
- ``npz``: one ``.npz`` of every named tensor plus the config as JSON (any workload;
  see ``npz``).

Output appears only when complete: it is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hpcps.checkpoint import open_checkpoint
from hpcps.errors import UserError
from hpcps.export import hf_gpt2, npz
from hpcps.runtime.files import check_output_target, write_directory

FORMATS = ("hf-gpt2", "npz")


@dataclass
class ExportResult:
    path: str          # the directory (hf-gpt2) or file (npz) written
    files: list        # file names (hf-gpt2) or npz keys (npz)
    step: int
    checkpoint: str


def export_checkpoint(path: str, fmt: str, out: str, overwrite: bool = False) -> ExportResult:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r} (expected one of {', '.join(FORMATS)})")
    ck = open_checkpoint(path)
    if fmt == "hf-gpt2":
        hf_gpt2.check_representable(ck)      # before anything is created
        files = write_directory(out, overwrite, lambda tmp: hf_gpt2.export(ck, tmp))
        return ExportResult(out, files, ck.step, ck.path)
    if not out.endswith(".npz"):
        out += ".npz"
    keys = _write_file(out, overwrite, lambda fh: npz.export(ck, fh))
    return ExportResult(out, keys, ck.step, ck.path)


def _write_file(out: str, overwrite: bool, write) -> list:
    check_output_target(out, overwrite, want_dir=False)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            result = write(fh)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return result
