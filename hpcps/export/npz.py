"""Export any checkpoint as one NumPy ``.npz``: every named tensor of the parameter
layout, plus the run's config as JSON, readable with ``allow_pickle=False``.

Keys: each layout name (``wte``, ``h0.attn.qkv.w``, ...) holds that tensor (fp32,
its layout shape); ``config.json`` holds a JSON text (0-d unicode array) with the
resolved config, the model description, the step and the layout;
``tokenizer.json`` the tokenizer definition when the checkpoint has one.
"""

from __future__ import annotations

import json

import numpy as np

from hpcps.errors import UserError

CONFIG_KEY = "config.json"
TOKENIZER_KEY = "tokenizer.json"


def named_tensors(ck) -> dict:
    """The flat buffer cut into the layout recorded in the checkpoint."""
    layout = ck.manifest.get("layout")
    if not layout:
        raise UserError(f"--format npz: checkpoint {ck.path} does not record its parameter layout")
    params = ck.params()
    out = {}
    for spec in layout:
        shape = tuple(spec["shape"])
        size = int(np.prod(shape, dtype=np.int64))
        lo = int(spec["offset"])
        if lo + size > params.size or spec["name"] in (CONFIG_KEY, TOKENIZER_KEY):
            raise UserError(f"checkpoint {ck.path}: layout entry {spec['name']!r} does not fit "
                            f"its {params.size} parameters")
        out[spec["name"]] = params[lo:lo + size].reshape(shape)
    return out


def metadata(ck) -> dict:
    return {"format": "hpcps-npz", "step": ck.step, "config": ck.config.as_dict(),
            "describe": ck.manifest.get("describe", {}), "layout": ck.manifest.get("layout")}


def export(ck, out_file) -> list[str]:
    """Write the .npz to the open binary file ``out_file``; returns the keys written."""
    arrays = named_tensors(ck)
    arrays[CONFIG_KEY] = np.array(json.dumps(metadata(ck)))
    tokenizer_text = ck.tokenizer_json()
    if tokenizer_text is not None:
        arrays[TOKENIZER_KEY] = np.array(tokenizer_text)
    np.savez(out_file, **arrays)
    return list(arrays)


def load(path: str) -> tuple[dict, dict, str | None]:
    """(tensors, metadata, tokenizer JSON or None) of an exported .npz; never unpickles."""
    with np.load(path, allow_pickle=False) as data:
        tensors = {k: data[k] for k in data.files if k not in (CONFIG_KEY, TOKENIZER_KEY)}
        meta = json.loads(str(data[CONFIG_KEY]))
        tokenizer = str(data[TOKENIZER_KEY]) if TOKENIZER_KEY in data.files else None
    return tensors, meta, tokenizer
