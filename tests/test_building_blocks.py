"""The distributed building blocks: split a batch over simulated workers, merge their
statistics and sums, and get what a single process gets on the whole batch."""

import numpy as np
import pytest

from fastbn import _reference as ref
from fastbn import functional as F

from conftest import DTYPES, assert_close, data_error, make_input

SPLITS = [[4, 3, 5], [1, 1, 10], [0, 6, 0, 6], [12]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SPLITS, ids=str)
@pytest.mark.parametrize("tail", [(3,), (5, 7), (300,)], ids=str)
def test_split_batch_equals_whole_batch(dtype, sizes, tail, rng):
    c = 3
    x = make_input((sum(sizes), c) + tail, dtype, rng, offset=20.0)
    dy = make_input(x.shape, dtype, rng)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.uniform(-1, 1, c).astype(dtype)
    pieces = np.split(x, np.cumsum(sizes)[:-1])
    grads = np.split(dy, np.cumsum(sizes)[:-1])

    count, mean, m2 = F.merge_stats(*[F.batch_stats(p) for p in pieces])
    whole = F.batch_stats(x)
    assert count == whole[0]
    assert_close(mean, whole[1], np.float64, "merged mean", scale=np.max(np.abs(x)))
    assert_close(m2, whole[2], np.float64, "merged M2", scale=np.max(whole[2]))

    invstd = 1.0 / np.sqrt(m2 / count + 1e-5)
    y = np.concatenate([F.batch_norm_elemt(p, mean, invstd, w, b) for p in pieces])
    y_whole, save_mean, save_invstd = F.batch_norm_forward(x, None, None, w, b, training=True)
    assert_close(y, y_whole, dtype, "output", atol=data_error(x, invstd, w))

    sums = [F.batch_norm_backward_reduce(g, p, mean) for g, p in zip(grads, pieces)]
    sum_dy = np.sum([s[0] for s in sums], axis=0)
    sum_dy_xmu = np.sum([s[1] for s in sums], axis=0)
    dx = np.concatenate([F.batch_norm_backward_elemt(g, p, mean, invstd, w, sum_dy, sum_dy_xmu, count)
                         for g, p in zip(grads, pieces)])
    dx_whole, gw_whole, gb_whole = F.batch_norm_backward(dy, x, save_mean, save_invstd, w, True)
    term_scale = np.max(np.abs(w) * invstd) * np.max(np.abs(dy))
    assert_close(dx, dx_whole, dtype, "grad_input", scale=term_scale,
                 atol=data_error(x, invstd ** 2, w) * np.max(np.abs(dy)))
    assert_close(sum_dy, gb_whole, dtype, "grad_bias", scale=np.sum(np.abs(dy)))
    assert_close(sum_dy_xmu * invstd, gw_whole, dtype, "grad_weight",
                 scale=np.sum(np.abs(dy)) * np.max(np.abs(x - mean.reshape((1, -1) + (1,) * len(tail)))) * np.max(invstd))


@pytest.mark.parametrize("dtype", DTYPES)
def test_building_blocks_match_reference(dtype, rng):
    x = make_input((4, 3, 6), dtype, rng, offset=5.0)
    dy = make_input(x.shape, dtype, rng)
    mean, invstd = rng.standard_normal(3) + 5, rng.uniform(0.5, 2, 3)
    w = rng.uniform(0.5, 1.5, 3).astype(dtype)
    assert_close(F.batch_norm_elemt(x, mean, invstd, w), ref.batch_norm_elemt(x, mean, invstd, w), dtype,
                 "elemt", atol=data_error(x, invstd, w))
    for got, want in zip(F.batch_norm_backward_reduce(dy, x, mean), ref.batch_norm_backward_reduce(dy, x, mean)):
        assert_close(got, want, np.float64, "reduce", scale=np.sum(np.abs(dy)) * 10)
    sum_dy, sum_dy_xmu = rng.standard_normal(3), rng.standard_normal(3)
    got = F.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, 50)
    want = ref.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, 50)
    assert got.dtype == x.dtype
    assert_close(got, want, dtype, "backward_elemt", atol=data_error(x, invstd ** 2, w) * 10)


def test_merge_stats_is_stable_far_from_zero(rng):
    # Two halves with a huge common offset and a tiny spread, where sums of squares would
    # cancel catastrophically.  The exact answer: subtracting 1e8 from these doubles is exact.
    a = 1e8 + rng.standard_normal((1000, 2)) * 1e-3
    b = 1e8 + rng.standard_normal((1000, 2)) * 1e-3 + 1e-3
    count, mean, m2 = F.merge_stats(F.batch_stats(a), F.batch_stats(b))
    shifted = np.concatenate([a, b]) - 1e8
    exact = shifted.var(axis=0) * len(shifted)
    # A triple's mean is rounded to ulp(1e8) ~ 1.5e-8: that limits the between-batch term.
    np.testing.assert_allclose(m2, exact, rtol=2e-5)
    np.testing.assert_allclose(F.batch_stats(a)[2], (a - 1e8).var(axis=0) * len(a), rtol=1e-13)


def test_merge_stats_identity_and_errors():
    x = np.arange(12.0).reshape(6, 2)
    stats = F.batch_stats(x)
    empty = F.batch_stats(x[:0])
    for merged in (F.merge_stats(empty, stats), F.merge_stats(stats, empty), F.merge_stats(stats)):
        assert merged[0] == 6
        np.testing.assert_array_equal(merged[1], stats[1])
        np.testing.assert_array_equal(merged[2], stats[2])
    with pytest.raises(TypeError, match="at least one"):
        F.merge_stats()
    with pytest.raises(TypeError, match=r"triple 1 must be \(count, mean, m2\)"):
        F.merge_stats(stats, 5)
    with pytest.raises(ValueError, match="count must be a non-negative int"):
        F.merge_stats((-1, np.zeros(2), np.zeros(2)))
    with pytest.raises(ValueError, match="triple 1 has 3 channels but triple 0 has 2"):
        F.merge_stats(stats, (2, np.zeros(3), np.zeros(3)))


def test_backward_elemt_checks_count(rng):
    x = make_input((4, 3), np.float32, rng)
    with pytest.raises(ValueError, match="count must be a positive int"):
        F.batch_norm_backward_elemt(x, x, np.zeros(3), np.ones(3), None, np.zeros(3), np.zeros(3), 0)
