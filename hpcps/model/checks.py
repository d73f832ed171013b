"""Argument checks shared by the models (one-line ``UserError`` on bad input)."""

from __future__ import annotations

import numpy as np

from hpcps.errors import UserError


def check_flat_buffer(buf, total: int, what: str) -> None:
    """``buf`` must be the model's flat float buffer of ``total`` elements."""
    if buf.shape != (total,) or buf.dtype.kind != "f":
        raise UserError(f"{what} must be a flat float buffer of {total} elements "
                        f"(the model's layout), got shape {buf.shape} {buf.dtype}")


def check_dropout_keys(keys, batch: int, dropout: float, unit: str = "sequence"):
    """Per-item dropout keys as an integer array, or None when dropout is off."""
    if keys is None or dropout == 0.0:
        return None
    keys = np.asarray(keys)
    if keys.shape != (batch,) or keys.dtype.kind not in "iu":
        raise UserError(f"dropout_keys must be {batch} integers (one per {unit}), "
                        f"got shape {keys.shape}")
    return keys
