"""safetensors files, through the optional ``safetensors`` package's header parser."""

import math

import numpy as np

from .arrays import finish
from .elements import STORED
from .errors import CheckpointError, addressable, excerpt, shown, shown_dims

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "C64": "complex64",
}


def read_safetensors(path, bf16=None):
    try:
        import safetensors
    except ImportError:
        raise ImportError(f"reading {path} needs the optional 'safetensors' package: "
                          f"pip install 'fastbn[io]' (or pip install safetensors)") from None
    with open(path, "rb") as f:
        data = f.read()
    try:
        # The package's parser checks the header: offsets in order, inside the file, and
        # matching each tensor's shape and dtype.  The bytes are decoded here, so that
        # bfloat16 (which safetensors.numpy cannot return) is handled as in torch files.
        entries = safetensors.deserialize(data)
    except Exception as exc:  # (SafetensorError, and whatever else the parser raises)
        raise CheckpointError(f"{path}: not a valid safetensors file: {excerpt(exc)}") from None
    arrays = {}
    for name, info in entries:
        code, shape, raw = info["dtype"], tuple(info["shape"]), info["data"]
        element = _SAFETENSORS_DTYPES.get(code)
        if element is None:
            raise CheckpointError(f"{path}: tensor {shown(name, 80)} has dtype {shown(code, 20)}, "
                                  f"which fastbn does not read (supported: "
                                  f"{', '.join(_SAFETENSORS_DTYPES)})")
        if len(shape) > 64:
            raise CheckpointError(f"{path}: tensor {shown(name, 80)} has {len(shape)} "
                                  f"dimensions; numpy allows 64")
        stored = np.dtype(STORED[element]).newbyteorder("<")
        if not addressable(shape, stored.itemsize):
            raise CheckpointError(f"{path}: tensor {shown(name, 80)} of shape {shown_dims(shape)} "
                                  f"is too large to address")
        if len(raw) != stored.itemsize * math.prod(shape):
            raise CheckpointError(f"{path}: tensor {shown(name, 80)} of shape {shown_dims(shape)} and dtype "
                                  f"{code} has {len(raw)} bytes of data")
        arrays[name] = finish(np.frombuffer(raw, dtype=stored).reshape(shape), element, bf16)
    return arrays


def looks_like_safetensors(head, size):
    """8-byte little-endian header length, then a JSON object that fits in the file."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= size - 8 and head[8:9] == b"{"
