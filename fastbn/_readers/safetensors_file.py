"""safetensors files, through the optional ``safetensors`` package's header parser."""

import numpy as np

from .arrays import finish
from .elements import STORED

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
    except Exception as exc:
        raise ValueError(f"{path}: not a valid safetensors file: {exc}") from None
    arrays = {}
    for name, info in entries:
        code, shape, raw = info["dtype"], tuple(info["shape"]), info["data"]
        element = _SAFETENSORS_DTYPES.get(code)
        if element is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {code}, which fastbn does not "
                             f"read (supported: {', '.join(_SAFETENSORS_DTYPES)})")
        stored = np.dtype(STORED[element]).newbyteorder("<")
        if len(raw) != stored.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: tensor {name!r} of shape {shape} and dtype {code} has "
                             f"{len(raw)} bytes of data")
        arrays[name] = finish(np.frombuffer(raw, dtype=stored).reshape(shape), element, bf16)
    return arrays


def looks_like_safetensors(head, size):
    """8-byte little-endian header length, then a JSON object that fits in the file."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= size - 8 and head[8:9] == b"{"
