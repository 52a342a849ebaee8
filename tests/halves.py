"""Half storage (float16, bfloat16) in tests: the oracle of the promise the kernels make for it.

Half data is computed in float32 in every pass, so each half result (an output, a grad_input)
must be the float32 path's result on the widened data, rounded to nearest even, bit for bit,
and each per-channel result (running buffers, saved statistics, parameter gradients) the
float32 path's own bits.  The helpers here widen exactly, narrow as numpy/ml_dtypes do, and
compare bits with messages that show the first differing value.

bfloat16 is ml_dtypes' dtype; without ml_dtypes its cases are skipped (`storage_params`).
"""

import numpy as np
import pytest

try:
    import ml_dtypes
except ImportError:  # an optional package: its cases skip
    ml_dtypes = None

FLOAT16 = np.dtype(np.float16)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16) if ml_dtypes is not None else None

#: Significand bits (with the implicit one) of each half storage: rounding to it errs by at
#: most 2**-bits relative (half an ulp), and by SUBNORMAL_HALF_ULP absolutely among subnormals.
SIGNIFICAND_BITS = {"float16": 11, "bfloat16": 8}
SUBNORMAL_HALF_ULP = {"float16": 2.0 ** -25, "bfloat16": 2.0 ** -134}


def storage_dtype(name):
    """The numpy dtype of a storage type by name ("float16", "bfloat16", "float32", ...)."""
    if name == "bfloat16":
        if BFLOAT16 is None:
            pytest.skip("bfloat16 needs ml_dtypes")
        return BFLOAT16
    return np.dtype(name)


def storage_params(*names):
    """pytest parameters for storage types by name; bfloat16 is skipped without ml_dtypes."""
    skip = pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 needs ml_dtypes")
    return [pytest.param(name, marks=skip) if name == "bfloat16" else name for name in names]


def is_half(dtype):
    return dtype == FLOAT16 or (BFLOAT16 is not None and dtype == BFLOAT16)


def widen(a):
    """Half data as float32, exactly, in the same memory layout.  bfloat16 by its definition
    (its bits are the high half of a float32's), so the oracle does not rest on ml_dtypes'
    conversion; float16 by numpy (exact)."""
    if BFLOAT16 is not None and a.dtype == BFLOAT16:
        bits = a.view(np.uint16).astype(np.uint32)  # order 'K': keeps the memory layout
        bits <<= 16
        return bits.view(np.float32)
    return a.astype(np.float32)


def narrow(a32, dtype):
    """float32 data rounded to nearest even to a half dtype (numpy's and ml_dtypes' casts;
    overflow to inf is expected, not warned about), in the same memory layout."""
    with np.errstate(over="ignore", invalid="ignore"):
        return a32.astype(dtype)


def _unsigned(a):
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _is_nan(a):
    return np.isnan(widen(a)) if is_half(a.dtype) else np.isnan(a)


def _show(a, i):
    value = np.asarray(a[i]).reshape(1)
    shown = widen(value)[0] if is_half(a.dtype) else value[0]
    return f"{shown.item()!r} (bits {int(_unsigned(np.asarray(a))[i]):#x})"


def assert_same_bits(got, expected, what, note=None):
    """got and expected have the same dtype and shape, the same bits where expected is not
    NaN, and NaN where it is (payloads may differ: a NaN stays a NaN, as in the conversions).
    note(index), when given, adds to the message about the first difference."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape, \
        f"{what}: got {got.dtype}{got.shape}, expected {expected.dtype}{expected.shape}"
    if expected.dtype.kind in "iub":
        np.testing.assert_array_equal(got, expected, err_msg=what)
        return
    nan = _is_nan(expected)
    lost = np.argwhere(nan & ~_is_nan(got))
    if lost.size:
        i = tuple(int(k) for k in lost[0])
        raise AssertionError(f"{what}: {len(lost)} NaNs became numbers, first at {i}: {_show(got, i)}")
    differ = np.argwhere((_unsigned(got) != _unsigned(expected)) & ~nan)
    if differ.size:
        i = tuple(int(k) for k in differ[0])
        raise AssertionError(f"{what}: {len(differ)} of {expected.size} values differ, first at "
                             f"{i}: got {_show(got, i)}, expected {_show(expected, i)}"
                             + (note(i) if note is not None else ""))


def assert_rounded(got, want32, dtype, what, data=None):
    """got, of half dtype `dtype`, is the float32 result want32 rounded to nearest even, bit
    for bit (NaN where want32 is NaN); `data` (the input) is shown at the first difference."""
    got = np.asarray(got)
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {np.dtype(dtype)}"
    want32 = np.asarray(want32)
    assert want32.dtype == np.float32, f"{what}: the reference is {want32.dtype}, not float32"

    def note(i):
        shown = f"; the float32 result there is {want32[i].item()!r}"
        return shown + (f", the input {_show(np.asarray(data), i)}" if data is not None else "")

    assert_same_bits(got, narrow(want32, dtype), what, note)


def ordered_bits(a):
    """16-bit float bit patterns as integers in the order of the values they encode (-0 and +0
    both 0), so that differences count ulps across zero and binades."""
    bits = a.view(np.uint16).astype(np.int32)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


def ulps_apart(a, b):
    """Elementwise distance in ulps between two arrays of the same 16-bit float dtype."""
    return np.abs(ordered_bits(a) - ordered_bits(b))


def channels_last(x):
    """The same values as x (N, C, *spatial) in channels-last memory: a view of an
    (N, *spatial, C) C-contiguous array, as torch's channels_last and channels_last_3d."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)


def is_channels_last(a):
    return a.ndim >= 3 and not a.flags.c_contiguous and np.moveaxis(a, 1, -1).flags.c_contiguous
