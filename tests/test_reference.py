"""The float64 reference itself: its statistics against numpy's, its gradients against
finite differences.  Everything else is tested against it, so it is tested on its own terms."""

import numpy as np
import pytest

from fastbn import _reference as ref

from conftest import make_input

GRAD_SHAPES = [(3, 2), (4, 3, 5), (2, 2, 3, 3), (2, 1, 2, 2, 3), (5, 1)]


def loss(x, dy, weight, bias, training, running_mean, running_var, eps=1e-3):
    """sum(batch_norm(x) * dy): its gradient with respect to the output is dy."""
    y = ref.batch_norm(x, None if training else running_mean, None if training else running_var,
                       weight, bias, training, 0.1, eps)
    return float(np.sum(y * dy))


def numeric_grad(f, a, h=1e-6):
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_backward_matches_finite_differences(shape, training, affine, rng):
    c = shape[1]
    x = make_input(shape, np.float64, rng)
    dy = rng.standard_normal(shape)
    weight = rng.uniform(0.5, 2, c) if affine else None
    bias = rng.uniform(-1, 1, c) if affine else None
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    eps = 1e-3

    if training:
        _, mean, invstd = ref.batch_norm_forward(x, None, None, weight, bias, True, 0.1, eps)
    else:
        mean, invstd = rm, 1 / np.sqrt(rv + eps)
    dx, dw, db = ref.batch_norm_backward(dy, x, mean, invstd, weight, training)

    def f():
        return loss(x, dy, weight, bias, training, rm, rv, eps)

    np.testing.assert_allclose(dx, numeric_grad(f, x), rtol=1e-5, atol=1e-6, err_msg="grad_input")
    if affine:
        np.testing.assert_allclose(dw, numeric_grad(f, weight), rtol=1e-5, atol=1e-6, err_msg="grad_weight")
        np.testing.assert_allclose(db, numeric_grad(f, bias), rtol=1e-5, atol=1e-6, err_msg="grad_bias")


@pytest.mark.parametrize("shape", [(7, 3), (4, 2, 9), (3, 4, 5, 6)], ids=str)
def test_statistics_match_numpy(shape, rng):
    x = make_input(shape, np.float64, rng, offset=5.0)
    axes = (0,) + tuple(range(2, x.ndim))
    count, mean, m2 = ref.batch_stats(x)
    assert count == x.size // shape[1]
    np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-14)
    np.testing.assert_allclose(m2 / count, x.var(axis=axes), rtol=1e-12)
    y = ref.batch_norm(x, None, None, training=True, eps=0.0 + 1e-12)
    np.testing.assert_allclose(y.mean(axis=axes), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=axes), 1, rtol=1e-9)


def test_merge_stats_equals_statistics_of_the_union(rng):
    a = make_input((5, 3, 4), np.float64, rng, offset=2.0)
    b = make_input((9, 3, 4), np.float64, rng, offset=-1.0)
    merged = ref.merge_stats(ref.batch_stats(a), ref.batch_stats(b))
    whole = ref.batch_stats(np.concatenate([a, b]))
    assert merged[0] == whole[0]
    np.testing.assert_allclose(merged[1], whole[1], rtol=1e-13)
    np.testing.assert_allclose(merged[2], whole[2], rtol=1e-12)
    empty = ref.batch_stats(a[:0])
    assert empty[0] == 0
    for got, want in zip(ref.merge_stats(empty, ref.batch_stats(a)), ref.batch_stats(a)):
        np.testing.assert_allclose(got, want)


def test_running_statistics_use_unbiased_variance(rng):
    x = make_input((6, 2, 3), np.float64, rng)
    rm, rv = np.zeros(2), np.ones(2)
    ref.batch_norm(x, rm, rv, training=True, momentum=1.0)
    np.testing.assert_allclose(rm, x.mean(axis=(0, 2)))
    np.testing.assert_allclose(rv, x.var(axis=(0, 2), ddof=1))
