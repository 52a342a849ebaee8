"""Element types: how each torch dtype's elements are stored, and bfloat16's two returns."""

import re

import numpy as np

from .errors import shown


# How a torch dtype's elements are stored (before the archive's byte order is applied).
# bfloat16 has no numpy dtype: its 16 bits are the high half of a float32, and it is returned
# widened to float32 (exactly), or with bfloat16="keep" as ml_dtypes.bfloat16 over the same
# bits.  bool is stored as one byte, any non-zero byte reading True.
STORED = {
    "float64": "f8", "float32": "f4", "float16": "f2", "bfloat16": "u2",
    "int64": "i8", "int32": "i4", "int16": "i2", "int8": "i1", "uint8": "u1", "bool": "u1",
    "uint16": "u2", "uint32": "u4", "uint64": "u8",
    "complex64": "c8", "complex128": "c16",
}

# torch's legacy typed-storage classes, as torch.save still names them, by element type.
# The quantized ones are known but not supported (the element is None).
STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",  # bytes; _rebuild_tensor_v3 gives the tensor's dtype
    "QUInt8Storage": None, "QInt8Storage": None, "QInt32Storage": None,
    "QUInt4x2Storage": None, "QUInt2x4Storage": None,
}

# Names of torch dtype objects (torch.float32, torch.float8_e4m3fn, torch.quint8...).  They are
# only ever turned into a name marker, never resolved, so a loose pattern is safe here.
DTYPE_NAME = re.compile(r"(bool|bfloat16|complex\d+|float\d+(_\w+)?|q?u?int\d+(x\d+)?|bits\d+(x\d+)?)")


def element_size(element):
    return np.dtype(STORED[element]).itemsize


BFLOAT16_CHOICES = ("float32", "keep")


def bfloat16_dtype(bfloat16):
    """The dtype bfloat16 tensors are returned as for ``bfloat16=``: None (widen them to
    float32) or ``ml_dtypes.bfloat16`` (keep them).  Called before the file is opened, so that
    a bad value or a missing ml_dtypes fails first; ``import fastbn`` never imports ml_dtypes.
    """
    if not (isinstance(bfloat16, str) and bfloat16 in BFLOAT16_CHOICES):
        raise ValueError(f"bfloat16 must be one of {', '.join(map(repr, BFLOAT16_CHOICES))}, "
                         f"got {shown(bfloat16, 60)}")
    if bfloat16 == "float32":
        return None
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("bfloat16='keep' needs the optional 'ml_dtypes' package (numpy's "
                          "bfloat16 dtype): pip install 'fastbn[bf16]' (or pip install "
                          "ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)
