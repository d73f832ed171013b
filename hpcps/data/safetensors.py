"""safetensors files: the tensor format Hugging Face models ship in, read and written here.

A file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, byte range; plus an optional ``__metadata__`` object of strings),
then the raw little-endian tensor bytes. Nothing in it can run code, unlike the
pickle files (``pytorch_model.bin``) models also come in, which is why hpcps reads
weights from safetensors only. No extra package is needed.

Reading maps the file (``numpy.memmap``): a tensor's bytes are read when it is used,
so a 124 M-parameter model is never held twice (copy what you keep before the file is
rewritten). Every malformed header, byte range
or dtype is a ``UserError`` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Optional

import numpy as np

from hpcps.errors import UserError

WRITE_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64"}
# what a reader meets in published models; BF16 has no NumPy dtype: read as its 16 bits
READ_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
               "BF16": np.dtype("<u2"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4")}
MAX_HEADER_BYTES = 100 << 20      # a header larger than this is a damaged length field


def write_safetensors(path: str, tensors: dict, metadata: Optional[dict] = None) -> None:
    """Write ``tensors`` (name -> array; F32, F16 or I64) and string ``metadata``."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.asarray(array)     # (tobytes() below writes C order from any layout)
        dtype = array.dtype.newbyteorder("<")
        if dtype not in WRITE_DTYPES:
            raise ValueError(f"tensor {name}: dtype {array.dtype} is not supported here")
        array = array.astype(dtype, copy=False)
        header[name] = {"dtype": WRITE_DTYPES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)     # tensor data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for array in arrays:
            fh.write(array.tobytes())


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file. Tensors are read-only arrays mapped
    from the file in their stored dtype, except BF16, which is widened to float32."""
    header, data_start = _read_header(path)
    metadata = header.pop("__metadata__", {}) or {}
    data_size = os.path.getsize(path) - data_start
    mapped = (np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,))
              if data_size > 0 else np.zeros(0, dtype=np.uint8))
    tensors = {}
    for name, info in header.items():
        dtype, shape, lo, hi = _entry(path, name, info, data_size)
        raw = mapped[lo:hi].view(READ_DTYPES[dtype]).reshape(shape)
        tensors[name] = bf16_to_float32(raw) if dtype == "BF16" else raw
    return tensors, metadata


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the upper half of a float32: shifting its bits up is exact."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _read_header(path: str) -> tuple[dict, int]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UserError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise UserError(f"{path} is not a safetensors file (header length {length} "
                                f"does not fit the file's {size} bytes)")
            text = fh.read(length)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (its header is not a JSON object)")
    return header, 8 + length


def _entry(path: str, name: str, info, data_size: int) -> tuple[str, tuple, int, int]:
    """(dtype, shape, first byte, end byte) of one header entry, checked against the file."""
    where = f"{path}: tensor {name}"
    if not isinstance(info, dict):
        raise UserError(f"{where}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in READ_DTYPES:
        raise UserError(f"{where}: dtype {dtype!r} is not one of {', '.join(READ_DTYPES)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise UserError(f"{where}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)):
        raise UserError(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair")
    lo, hi = offsets
    want = math.prod(shape) * READ_DTYPES[dtype].itemsize
    if not 0 <= lo <= hi <= data_size or hi - lo != want:
        raise UserError(f"{where}: bytes [{lo}, {hi}) do not hold a {dtype} tensor of shape "
                        f"{shape} inside the file's {data_size} data bytes (truncated or damaged)")
    return dtype, tuple(shape), lo, hi
