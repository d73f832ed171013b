"""A weights-only checkpoint, written by one process without MPI (``hpcps import``).

It has the layout of any checkpoint (docs/checkpoint-format.md): one shard file
``[0, P)`` with ``params``, the tokenizer, and a manifest with sha256, committed
by the same directory rename. What sets it apart: step 0, optimizer ``none``, no
optimizer state and no worker files, and an ``imported`` entry naming where the
weights came from. Every reader (eval, sample, export, ``train.init_from``) uses
it; resuming from it is refused (``find_resume``): there is no training state to
continue, so a run starts from it with ``train.init_from`` instead.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from hpcps.checkpoint import files as F
from hpcps.checkpoint.manifest import new_manifest

NO_OPTIMIZER = "none"


def write_weights_checkpoint(ckpt_dir: str, params: np.ndarray, *, layout, describe: dict,
                             config: dict, tokenizer_text: Optional[str],
                             imported: dict) -> str:
    """Commit ``ckpt_dir/step_00000000`` holding ``params``; returns its path."""
    os.makedirs(ckpt_dir, exist_ok=True)
    final = os.path.join(ckpt_dir, F.step_dir_name(0))
    tmp = final + ".tmp"
    F.remove_tree(tmp)
    os.makedirs(tmp)
    try:
        shard = F.server_file(0)
        F.write_shard(os.path.join(tmp, shard), lo=0, hi=layout.total,
                      arrays={"params": np.asarray(params, dtype=np.float32)}, t=0, version=0,
                      step=0, optimizer=NO_OPTIMIZER)
        files = {shard: F.hash_and_sync(os.path.join(tmp, shard))}
        if tokenizer_text is not None:
            files[F.TOKENIZER] = F.write_text_durable(os.path.join(tmp, F.TOKENIZER),
                                                      tokenizer_text)
        manifest = new_manifest(
            step=0, reason={"step": 0, "stop": False, "end": False, "checkpoint": True,
                            "signal": None},
            mode="import", world_size=1, n_servers=1, n_workers=0, layout=layout,
            optimizer=NO_OPTIMIZER, state_names=(),
            shards=[{"file": shard, "index": 0, "lo": 0, "hi": layout.total, "t": 0,
                     "version": 0}],
            workers=[], files=files, describe=describe, config=config, imported=imported)
        F.commit(tmp, final, manifest)
    except BaseException:
        F.remove_tree(tmp)
        raise
    return final


def is_weights_only(manifest: dict) -> bool:
    """A checkpoint without optimizer state (``hpcps import``): not one to resume."""
    return manifest.get("optimizer") == NO_OPTIMIZER
