"""fastbn.functional against the float64 reference, and its argument checking."""

import itertools

import numpy as np
import pytest

from fastbn import _reference as ref
from fastbn import functional as F

from conftest import DTYPES, SHAPES, assert_close, data_error, make_input, non_contiguous

GRID_SHAPES = [shape for shapes in SHAPES.values() for shape in shapes[:4]]


def params(rng, c, dtype, affine):
    if not affine:
        return None, None
    return rng.uniform(0.5, 1.5, c).astype(dtype), rng.uniform(-1, 1, c).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GRID_SHAPES, ids=str)
@pytest.mark.parametrize("training,momentum", [(True, 0.1), (True, 0.0), (True, 1.0), (False, 0.1)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_batch_norm_matches_reference(dtype, shape, training, momentum, affine, layout, offset, rng):
    c = shape[1]
    if training and x_count(shape) < 2:
        pytest.skip("training needs more than one value per channel")
    x = make_input(shape, dtype, rng, offset=offset)
    if layout == "strided":
        x = non_contiguous(x)
    weight, bias = params(rng, c, dtype, affine)
    rm = (rng.standard_normal(c) + offset).astype(dtype)
    rv = rng.uniform(0.5, 2, c).astype(dtype)
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    x_before = x.copy()

    y, save_mean, save_invstd = F.batch_norm_forward(x, rm, rv, weight, bias, training, momentum, 1e-5)
    y_ref, mean_ref, invstd_ref = ref.batch_norm_forward(x, rm_ref, rv_ref, weight, bias, training,
                                                        momentum, 1e-5)
    assert y.dtype == x.dtype and y.shape == x.shape and y.flags.c_contiguous
    np.testing.assert_array_equal(x, x_before, err_msg="input modified")
    assert_close(y, y_ref, dtype, "output", atol=data_error(x, invstd_ref, weight))
    assert_close(save_mean, mean_ref, np.float64, "save_mean", scale=np.max(np.abs(x)))
    assert_close(rm, rm_ref, dtype, "running_mean")
    assert_close(rv, rv_ref, dtype, "running_var")
    assert save_mean.dtype == save_invstd.dtype == np.float64

    dy = make_input(shape, dtype, rng)
    dx, gw, gb = F.batch_norm_backward(dy, x, save_mean, save_invstd, weight, training)
    dx_ref, gw_ref, gb_ref = ref.batch_norm_backward(dy, x, mean_ref, invstd_ref, weight, training)
    w = np.ones(c) if weight is None else weight
    term_scale = np.max(np.abs(w) * invstd_ref) * np.max(np.abs(dy))
    assert_close(dx, dx_ref, dtype, "grad_input", scale=term_scale,
                 atol=data_error(x, invstd_ref ** 2, weight) * np.max(np.abs(dy)))
    xhat = ref.normalize_given(x, None, None, mean_ref, invstd_ref)
    assert_close(gw, gw_ref, dtype, "grad_weight", scale=np.sum(np.abs(dy * xhat)),
                 atol=data_error(x, invstd_ref) * np.sum(np.abs(dy)))
    assert_close(gb, gb_ref, dtype, "grad_bias", scale=np.sum(np.abs(dy)))
    assert dx.dtype == gw.dtype == gb.dtype == np.dtype(dtype)


def x_count(shape):
    return shape[0] * int(np.prod(shape[2:]))


def test_batch_norm_returns_forward_output(rng):
    x = make_input((4, 3, 5), np.float32, rng)
    a = F.batch_norm(x, None, None, training=True)
    b = F.batch_norm_forward(x, None, None, training=True)[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_is_written_and_returned(dtype, rng):
    x = make_input((3, 4, 6, 5), dtype, rng)
    rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
    expected = F.batch_norm(x, rm.copy(), rv.copy(), training=True)
    out = np.empty_like(x)
    got = F.batch_norm(x, rm, rv, training=True, out=out)
    assert got is out
    np.testing.assert_array_equal(out, expected)
    # out=x normalises in place
    inplace = x.copy()
    got = F.batch_norm(inplace, np.zeros(4, dtype), np.ones(4, dtype), training=True, out=inplace)
    assert got is inplace
    np.testing.assert_array_equal(inplace, expected)
    # an out that overlaps the input without being it still gives the right answer
    buf = np.concatenate([x.ravel(), np.zeros(5, dtype)])
    src = buf[:x.size].reshape(x.shape)
    dst = buf[5:5 + x.size].reshape(x.shape)
    F.batch_norm(src, np.zeros(4, dtype), np.ones(4, dtype), training=True, out=dst)
    np.testing.assert_array_equal(dst, expected)


def test_strided_running_buffers_are_updated_in_place(rng):
    x = make_input((8, 3, 7), np.float64, rng)
    rm_store, rv_store = np.zeros(6), np.ones(6)
    rm, rv = rm_store[::2], rv_store[::2]
    F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    np.testing.assert_allclose(rm, x.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(rv, x.var(axis=(0, 2), ddof=1), rtol=1e-12)
    np.testing.assert_array_equal(rm_store[1::2], 0)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 10), (2, 3, 20, 20)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_stats_matches_reference(shape, dtype, rng):
    x = make_input(shape, dtype, rng, offset=50.0)
    count, mean, m2 = F.batch_stats(x)
    count_ref, mean_ref, m2_ref = ref.batch_stats(x)
    assert count == count_ref and isinstance(count, int)
    assert_close(mean, mean_ref, np.float64, "mean", scale=np.max(np.abs(x)))
    assert_close(m2, m2_ref, np.float64, "M2", scale=np.max(m2_ref))
    empty = F.batch_stats(x[:0])
    assert empty[0] == 0
    np.testing.assert_array_equal(empty[1], 0)
    np.testing.assert_array_equal(empty[2], 0)


@pytest.mark.parametrize("n_threads", [None, 1, 2, 7, -1])
def test_n_threads_values_give_identical_results(n_threads, rng):
    x = make_input((16, 8, 40, 40), np.float32, rng)
    baseline = F.batch_norm(x, None, None, training=True, n_threads=1)
    np.testing.assert_array_equal(F.batch_norm(x, None, None, training=True, n_threads=n_threads), baseline)


def test_array_likes_are_accepted():
    x = [[1.0, 2.0], [3.0, 5.0], [0.0, -1.0]]
    y = F.batch_norm(x, None, None, training=True)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)


def test_byte_swapped_input_is_read_correctly(rng):
    x = make_input((5, 3, 4), np.float64, rng)
    swapped = x.astype(x.dtype.newbyteorder(">" if x.dtype.isnative and np.little_endian else "<"))
    np.testing.assert_array_equal(F.batch_norm(swapped, None, None, training=True),
                                  F.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    for shape in [(0, 3, 4, 4), (2, 3, 0, 4), (0, 3)]:
        x = np.zeros(shape, np.float32)
        rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
        y, mean, invstd = F.batch_norm_forward(x, rm, rv, training=training)
        assert y.shape == shape and y.dtype == np.float32
        np.testing.assert_array_equal(rm, 0.5)  # as torch: nothing to update from
        np.testing.assert_array_equal(rv, 2.0)
        dx, gw, gb = F.batch_norm_backward(np.zeros_like(x), x, mean, invstd, None, training)
        assert dx.shape == shape
        np.testing.assert_array_equal(gw, 0)
        np.testing.assert_array_equal(gb, 0)


def test_zero_channels():
    x = np.zeros((4, 0, 3), np.float32)
    y = F.batch_norm(x, np.zeros(0, np.float32), np.ones(0, np.float32), training=True)
    assert y.shape == (4, 0, 3)


@pytest.mark.parametrize("training", [True, False])
def test_nan_stays_in_its_channel(training, rng):
    x = make_input((4, 3, 6), np.float32, rng)
    x[2, 1, 3] = np.nan
    y = F.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32), training=training)
    if training:
        assert np.isnan(y[:, 1]).all(), "the whole channel's statistics are NaN"
    else:
        assert np.isnan(y[2, 1, 3]) and np.isnan(y).sum() == 1
    assert np.isfinite(y[:, [0, 2]]).all()


def test_constant_channel_normalises_to_exact_zero():
    for shape in [(8, 2, 300), (16, 2), (3, 2, 5, 5)]:
        for dtype in DTYPES:
            x = np.full(shape, 1234.5678, dtype)
            y = F.batch_norm(x, None, None, training=True)
            np.testing.assert_array_equal(y, 0)


def test_momentum_grid_combinations_run():
    # Every (training, momentum, affine, running buffers) combination torch accepts runs.
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    for training, momentum, affine, buffers in itertools.product([True, False], [0.0, 0.1, 1.0],
                                                                 [True, False], [True, False]):
        if not training and not buffers:
            continue
        w = np.ones(2, np.float32) if affine else None
        rm, rv = (np.zeros(2, np.float32), np.ones(2, np.float32)) if buffers else (None, None)
        y = F.batch_norm(x, rm, rv, w, w, training, momentum)
        assert np.isfinite(y).all()


@pytest.mark.parametrize("shape", [(1000, 2), (100, 2, 300)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_values_near_float32_max_do_not_overflow(shape, training):
    # x - mean would overflow float32 here (|x - mean| up to 5.4e38 > 3.4e38); float64
    # statistics and the kernels' overflow guard keep every result finite and right.
    x = np.full(shape, 3e38, np.float32)
    x[:shape[0] // 10] = -3e38
    x[:, 1] *= 0.5
    count, mean, m2 = F.batch_stats(x)
    rm, rv = mean.astype(np.float32), np.minimum(m2 / (count - 1), 3e38).astype(np.float32)
    y, save_mean, save_invstd = F.batch_norm_forward(x, rm, rv, training=training)
    y_ref, mean_ref, invstd_ref = ref.batch_norm_forward(x, rm.astype(np.float64), rv.astype(np.float64),
                                                        training=training)
    assert np.isfinite(y).all(), "output overflowed"
    assert_close(y, y_ref, np.float32, "output near float32's max")
    dy = np.ones_like(x)
    dy[0] = -2
    dx = F.batch_norm_backward(dy, x, save_mean, save_invstd, None, training)[0]
    dx_ref = ref.batch_norm_backward(dy, x, mean_ref, invstd_ref, None, training)[0]
    assert np.isfinite(dx).all(), "grad_input overflowed"
    # dx ~ invstd * dy ~ 1e-38 lies at the bottom of float32's normal range (torch's is NaN,
    # its forward already overflowing); it is still computed to float32's precision.
    assert_close(dx, dx_ref, np.float32, "grad_input near float32's max", scale=np.max(np.abs(dx_ref)))
