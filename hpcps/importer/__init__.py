"""Import a pretrained model from another tool's format as an hpcps run directory.

``import_model(source, fmt, out, overwrite=False, eot=None)`` with ``fmt``:

- ``hf-gpt2``: a Hugging Face ``GPT2LMHeadModel`` directory (``config.json``,
  safetensors weights, tokenizer; see ``hf_gpt2`` and ``hf_dir``).

The run directory ``out`` holds what a trained run would: ``config.toml``, a
committed (weights-only) checkpoint under ``checkpoints/`` that ``hpcps eval /
sample / export`` read and ``train.init_from`` starts from, and the model's own
``tokenizer.json`` for ``hpcps prepare --tokenizer-file``. It appears only when
complete: written under a temporary name and renamed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from hpcps.checkpoint.weights import write_weights_checkpoint
from hpcps.data.pretrained import load_tokenizer_file
from hpcps.errors import UserError
from hpcps.importer import hf_dir, hf_gpt2
from hpcps.runtime.files import check_output_target, write_directory
from hpcps.workloads.gpt import gpt_description

FORMATS = ("hf-gpt2",)
TOKENIZER_FILE = "tokenizer.json"     # the model's tokenizer, in the run directory


@dataclass
class ImportResult:
    run_dir: str
    checkpoint: str            # the committed checkpoint inside run_dir
    model: str                 # shape in words
    n_params: int
    weights: str               # the weight files read
    tokenizer_file: str        # run_dir/tokenizer.json
    tokenizer_source: str      # the files it came from
    eot: str                   # the end-of-text token the tokenizer appends


def import_model(source: str, fmt: str, out: str, overwrite: bool = False,
                 eot: Optional[str] = None) -> ImportResult:
    if fmt not in FORMATS:
        raise UserError(f"unknown import format {fmt!r} (expected one of {', '.join(FORMATS)})")
    check_output_target(out, overwrite, want_dir=True)     # before the (long) read
    shape, params, weights = hf_gpt2.read_model(source)
    tokenizer_text, tokenizer_source = hf_dir.tokenizer_definition(source)
    out_dir = out.rstrip(os.sep) or out

    def write(tmp: str) -> ImportResult:
        tokenizer_path = os.path.join(tmp, TOKENIZER_FILE)
        with open(tokenizer_path, "w", encoding="utf-8") as fh:
            fh.write(tokenizer_text)
        tokenizer = load_tokenizer_file(tokenizer_path, eot)
        if tokenizer.vocab_size != shape.vocab_size:
            raise UserError(f"{source}: the tokenizer ({tokenizer_source}) has "
                            f"{tokenizer.vocab_size} tokens but the model's vocabulary has "
                            f"{shape.vocab_size} (vocab_size in config.json): hpcps needs "
                            f"them equal")
        cfg = shape.config(out_dir)
        layout = shape.layout()
        with open(os.path.join(tmp, "config.toml"), "w", encoding="utf-8") as fh:
            fh.write(cfg.to_toml())
        checkpoint = write_weights_checkpoint(
            os.path.join(tmp, "checkpoints"), params, layout=layout,
            describe=gpt_description(cfg.model, layout.total, shape.vocab_size, tokenizer),
            config=cfg.as_dict(), tokenizer_text=tokenizer.to_json(),
            imported={"format": fmt, "source": os.path.abspath(source), "weights": weights,
                      "tokenizer": tokenizer_source})
        return ImportResult(out_dir, os.path.join(out_dir, os.path.relpath(checkpoint, tmp)),
                            shape.describe(), layout.total, weights,
                            os.path.join(out_dir, TOKENIZER_FILE), tokenizer_source,
                            tokenizer.eot_text)
    return write_directory(out, overwrite, write)
