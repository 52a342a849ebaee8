"""The float16 <-> float32 conversion kernels: numpy's conversion, bit for bit, on every variant
-- with F16C where the variant has it (half_simd()), with exact integer arithmetic where it does
not (the baseline build) -- NaNs stay NaN; their payloads may come back quieted.  The test of
every length and start covers bfloat16's conversion too (against ml_dtypes, when installed)."""

import numpy as np
import pytest

from fastbn import _dispatch

LEVELS = _dispatch.available_levels()


@pytest.fixture(params=LEVELS)
def kernels(request):
    return _dispatch._import(request.param)


def assert_same_values(got, expected):
    """Equal bits where expected is not NaN, and NaN where it is."""
    nan = np.isnan(expected)
    assert np.isnan(got[nan]).all()
    unsigned = {2: np.uint16, 4: np.uint32}[expected.itemsize]
    mismatch = np.flatnonzero(got.view(unsigned)[~nan] != expected.view(unsigned)[~nan])
    assert mismatch.size == 0, (f"{mismatch.size} values differ, first {expected[~nan][mismatch[0]]!r} -> "
                                f"{got[~nan][mismatch[0]]!r}")


def every_float16():
    return np.arange(2 ** 16, dtype=np.uint16).view(np.float16)


@pytest.mark.parametrize("n_threads", [1, 2, 5])
def test_widening_every_float16_matches_numpy(kernels, n_threads):
    h = np.tile(every_float16(), 3)[: 3 * 2 ** 16 - 7]  # a length that leaves a scalar tail
    w = np.empty(h.shape, np.float32)
    kernels.convert_float16(h, w, n_threads)
    assert_same_values(w, h.astype(np.float32))


def narrowing_cases():
    """Random float32 bit patterns, and around every float16 value: itself, the halfway points
    to its neighbours (ties round to even) and one float32 ulp either side of them."""
    rng = np.random.default_rng(0)
    halves = every_float16().astype(np.float32)
    halves = np.sort(halves[np.isfinite(halves)])
    midpoints = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)
    random_bits = rng.integers(0, 2 ** 32, 300_001, dtype=np.uint64).astype(np.uint32).view(np.float32)
    big = np.array([65504, 65519.99, 65520, 1e6, np.finfo(np.float32).max, np.inf], np.float32)
    return np.concatenate([random_bits, halves, midpoints, np.nextafter(midpoints, np.float32(np.inf)),
                           np.nextafter(midpoints, np.float32(-np.inf)), big, -big,
                           np.array([np.nan, 1e-8, 2.0 ** -25, 2.0 ** -24, 3 * 2.0 ** -26], np.float32)])


@pytest.mark.parametrize("n_threads", [1, 2, 5])
def test_narrowing_matches_numpy_including_ties_overflow_and_subnormals(kernels, n_threads):
    x = narrowing_cases()
    h = np.empty(x.shape, np.float16)
    kernels.convert_float16(x, h, n_threads)
    with np.errstate(over="ignore", invalid="ignore"):
        assert_same_values(h, x.astype(np.float16))


def test_conversion_of_nothing_and_of_one(kernels):
    kernels.convert_float16(np.empty(0, np.float16), np.empty(0, np.float32), 2)
    one = np.empty(1, np.float16)
    kernels.convert_float16(np.array([1 / 3], np.float32), one, 2)
    assert one[0] == np.float16(1 / 3)


@pytest.mark.parametrize("src,dst,error,match", [
    (np.zeros(4, np.float32), np.zeros(4, np.float64), TypeError, "expected float16 -> float32"),
    (np.zeros(4, np.float16), np.zeros(4, np.float16), TypeError, "expected float16 -> float32"),
    (np.zeros(4, np.float16), np.zeros(5, np.float32), ValueError, "of the same size"),
    (np.zeros(8, np.float16)[::2], np.zeros(4, np.float32), ValueError, "C-contiguous"),
    (np.zeros(4, np.float32), np.zeros(4, np.float16)[::-1], ValueError, "C-contiguous"),
], ids=["float64 dst", "float16 both", "sizes differ", "strided src", "strided dst"])
def test_conversion_rejects_what_it_cannot_convert(kernels, src, dst, error, match):
    with pytest.raises(error, match=match):
        kernels.convert_float16(src, dst, 1)


GRAIN = 32768  # elements per thread below which the kernels stay on one thread


def half_dtype(name):
    """The numpy dtype of a half storage (bfloat16 from ml_dtypes: skipped without it)."""
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(np.float16)


@pytest.mark.parametrize("n", [*range(40), 2 * GRAIN - 1, 2 * GRAIN, 2 * GRAIN + 17])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_every_length_and_start_converts_both_ways_and_leaves_the_source(kernels, half, n, offset):
    # Lengths around the 8- and 16-wide vector bodies and their scalar tails, the threading
    # threshold, and an array that starts one element past its buffer (so not vector-aligned);
    # for float16 (numpy's conversion the reference) and bfloat16 (ml_dtypes').
    dtype = half_dtype(half)
    convert = getattr(kernels, f"convert_{half}")
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n + offset).astype(np.float32)[offset:]
    before = x.copy()
    h = np.full(n + offset, 7, dtype)[offset:]
    convert(x, h, 2)
    np.testing.assert_array_equal(x, before)
    assert_same_values(h, x.astype(dtype))
    w = np.full(n + offset, np.float32(7))[offset:]
    h_before = h.copy()
    convert(h, w, 2)
    assert_same_values(h, h_before)
    assert_same_values(w, h.astype(np.float32))


def test_conversion_refuses_overlapping_byte_swapped_and_unaligned_arrays(kernels):
    buffer = np.zeros(64, np.uint8)
    with pytest.raises(ValueError, match="overlap"):
        kernels.convert_float16(buffer[:16].view(np.float32), buffer[8:16].view(np.float16), 1)
    swapped = np.zeros(4, np.float32).astype(np.dtype(np.float32).newbyteorder())
    with pytest.raises(ValueError, match="byte order"):
        kernels.convert_float16(swapped, np.zeros(4, np.float16), 1)
    unaligned = np.frombuffer(buffer[1:9].tobytes() + b"\0", np.float16, 4, 1)
    if unaligned.flags.aligned:
        pytest.skip("numpy calls this float16 view aligned")
    with pytest.raises(ValueError, match="aligned"):
        kernels.convert_float16(unaligned, np.zeros(4, np.float32), 1)


def test_conversion_will_not_write_a_read_only_array(kernels):
    dst = np.zeros(4, np.float16)
    dst.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kernels.convert_float16(np.ones(4, np.float32), dst, 1)
    assert not dst.any()
