"""The bfloat16 <-> float32 conversion kernels (convert_bfloat16): ml_dtypes' conversion, bit
for bit, on every SIMD variant -- widening every one of the 65536 bfloat16 patterns, and
narrowing with round to nearest even through ties, subnormals, overflow and NaNs whose payload
lies only in the bits that narrowing drops (they must stay NaN, not become inf).  NaNs stay
NaN; their payloads may come back quieted.  The argument checks are convert_float16's
(tests/test_float16_conversion.py), and neither function converts the other's half type."""

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from fastbn import _dispatch  # noqa: E402

from halves import BFLOAT16, assert_same_bits  # noqa: E402

LEVELS = _dispatch.available_levels()
GRAIN = 32768  # elements per thread below which the kernels stay on one thread


@pytest.fixture(params=LEVELS)
def kernels(request):
    return _dispatch._import(request.param)


def every_bfloat16():
    return np.arange(2 ** 16, dtype=np.uint16).view(BFLOAT16)


def to_bfloat16(x):
    """ml_dtypes' narrowing (round to nearest even), without its warnings for NaN and overflow."""
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(BFLOAT16)


@pytest.mark.parametrize("n_threads", [1, 2, 5])
def test_widening_every_bfloat16_matches_ml_dtypes(kernels, n_threads):
    h = np.tile(every_bfloat16(), 3)[: 3 * 2 ** 16 - 7]  # over 2 * GRAIN, and a scalar tail
    w = np.empty(h.shape, np.float32)
    kernels.convert_bfloat16(h, w, n_threads)
    assert_same_bits(w, h.astype(np.float32), "widened bfloat16")
    # widening is exact: the float32 whose high half are the bfloat16's bits
    nan = np.isnan(w)
    np.testing.assert_array_equal(w.view(np.uint32)[~nan] >> 16, h.view(np.uint16)[~nan])
    np.testing.assert_array_equal(w.view(np.uint32)[~nan] & 0xFFFF, 0)


def narrowing_cases():
    """Random float32 bit patterns (every exponent, subnormals and NaNs included), and around
    every finite bfloat16 value: itself, the halfway points to its neighbours (ties round to
    even) and one float32 ulp either side of them; the largest finite values and what rounds
    past them to inf; NaNs with payloads only in the low 16 bits, signalling and quiet, of both
    signs; float32 subnormals below bfloat16's smallest."""
    rng = np.random.default_rng(0)
    values = every_bfloat16().astype(np.float32)
    values = np.sort(values[np.isfinite(values)])
    midpoints = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(np.float32)
    random_bits = rng.integers(0, 2 ** 32, 300_001, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F7EFFFF, 0x7F800000,  # max, ties, inf
                        0x7F800001, 0x7F80FFFF, 0x7FC00000, 0x7FC00001, 0x7FFFFFFF,   # NaNs
                        0x00000001, 0x00007FFF, 0x00008000, 0x00008001, 0x00018000,   # subnormals
                        0x007FFFFF, 0x00800000, 0x3F808000, 0x3F818000, 0x3F80FFFF],  # ties at 1
                       np.uint32).view(np.float32)
    return np.concatenate([random_bits, values, midpoints, np.nextafter(midpoints, np.float32(np.inf)),
                           np.nextafter(midpoints, np.float32(-np.inf)), special, -special])


@pytest.mark.parametrize("n_threads", [1, 2, 5])
def test_narrowing_matches_ml_dtypes_including_ties_overflow_subnormals_and_nans(kernels, n_threads):
    x = narrowing_cases()
    h = np.empty(x.shape, BFLOAT16)
    kernels.convert_bfloat16(x, h, n_threads)
    expected = to_bfloat16(x)
    assert_same_bits(h, expected, "narrowed float32",
                     note=lambda i: f"; the float32 was {int(x.view(np.uint32)[i]):#010x}")


def test_conversion_of_nothing_and_of_one(kernels):
    kernels.convert_bfloat16(np.empty(0, BFLOAT16), np.empty(0, np.float32), 2)
    one = np.empty(1, BFLOAT16)
    kernels.convert_bfloat16(np.array([1 / 3], np.float32), one, 2)
    assert one.view(np.uint16)[0] == to_bfloat16(np.array([1 / 3], np.float32)).view(np.uint16)[0]


def _bad_arguments():
    f16, f32, f64, b16 = (np.zeros(4, np.float16), np.zeros(4, np.float32), np.zeros(4),
                          np.zeros(4, BFLOAT16))
    return [
        ("float64 dst", "convert_bfloat16", b16, f64, TypeError, "expected bfloat16 -> float32"),
        ("bfloat16 both", "convert_bfloat16", b16, b16.copy(), TypeError, "expected bfloat16 -> float32"),
        ("float16 src", "convert_bfloat16", f16, f32, TypeError, "expected bfloat16 -> float32"),
        ("float16 dst", "convert_bfloat16", f32, f16, TypeError, "expected bfloat16 -> float32"),
        ("bfloat16 to float16's", "convert_float16", b16, f32, TypeError, "expected float16 -> float32"),
        ("float16's from bfloat16", "convert_float16", f32, b16, TypeError, "expected float16 -> float32"),
        ("sizes differ", "convert_bfloat16", b16, np.zeros(5, np.float32), ValueError, "of the same size"),
        ("strided src", "convert_bfloat16", np.zeros(8, BFLOAT16)[::2], f32, ValueError, "C-contiguous"),
        ("strided dst", "convert_bfloat16", f32, np.zeros(4, BFLOAT16)[::-1], ValueError, "C-contiguous"),
        ("byte-swapped float32", "convert_bfloat16", f32.astype(f32.dtype.newbyteorder()), b16,
         ValueError, "byte order"),
        ("byte-swapped bfloat16", "convert_bfloat16", b16.astype(b16.dtype.newbyteorder()), f32,
         ValueError, "byte order"),
    ]


BAD = _bad_arguments()


@pytest.mark.parametrize("name, function, src, dst, error, match", BAD, ids=[b[0] for b in BAD])
def test_conversion_rejects_what_it_cannot_convert(kernels, name, function, src, dst, error, match):
    with pytest.raises(error, match=match):
        getattr(kernels, function)(src, dst, 1)


# (Every length and start, both ways: tests/test_float16_conversion.py, for both half types.)


def test_conversion_refuses_overlapping_unaligned_and_read_only_arrays(kernels):
    buffer = np.zeros(64, np.uint8)
    with pytest.raises(ValueError, match="overlap"):
        kernels.convert_bfloat16(buffer[:16].view(np.float32), buffer[8:16].view(BFLOAT16), 1)
    unaligned = np.frombuffer(buffer[1:9].tobytes() + b"\0", BFLOAT16, 4, 1)
    assert not unaligned.flags.aligned
    with pytest.raises(ValueError, match="aligned"):
        kernels.convert_bfloat16(unaligned, np.zeros(4, np.float32), 1)
    dst = np.zeros(4, BFLOAT16)
    dst.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kernels.convert_bfloat16(np.ones(4, np.float32), dst, 1)
    assert not dst.view(np.uint16).any()
