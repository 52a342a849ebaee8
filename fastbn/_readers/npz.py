"""``.npz`` archives, read with ``allow_pickle=False``."""

import numpy as np


def read_npz(path):
    # No bf16 argument: .npy has no bfloat16 type code (numpy writes an ml_dtypes.bfloat16
    # array as 2-byte void, '|V2'), so nothing in an .npz is known to be bfloat16.
    arrays = {}
    with np.load(path, allow_pickle=False) as npz:
        for name in npz.files:
            try:
                value = npz[name]
            except ValueError as exc:
                raise ValueError(f"{path}: cannot load member {name!r}: {exc} (fastbn never "
                                 f"unpickles .npz members)") from None
            if not isinstance(value, np.ndarray):
                raise ValueError(f"{path}: member {name!r} is not a .npy array")
            arrays[name] = value.astype(value.dtype.newbyteorder("="), copy=False)
    return arrays
