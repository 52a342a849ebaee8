"""Invariants checked once, well: inputs are never modified, read-only inputs work."""

import numpy as np
import pytest

import fastbn
from fastbn import _pipeline as P
from fastbn import functional as F

from conftest import make_input, non_contiguous


def frozen(a):
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 300), (2, 4, 5, 6)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_module_never_modifies_its_inputs_and_accepts_read_only_ones(shape, training, rng):
    x = make_input(shape, np.float32, rng)
    dy = make_input(shape, np.float32, rng)
    cls = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d}[len(shape)]
    bn = cls(4).train(training)
    expected_y = cls(4).train(training)(x.copy())
    y = bn(frozen(x))
    dx = bn.backward(frozen(dy))
    np.testing.assert_array_equal(y, expected_y)
    assert y.flags.writeable and dx.flags.writeable
    x_before, dy_before = x.copy(), dy.copy()
    bn(x)
    bn.backward(dy)
    np.testing.assert_array_equal(x, x_before, err_msg="forward or backward modified the input")
    np.testing.assert_array_equal(dy, dy_before, err_msg="backward modified grad_output")


def test_functional_accepts_read_only_everything_in_eval(rng):
    x = make_input((3, 2, 4), np.float64, rng)
    args = [frozen(np.zeros(2)), frozen(np.ones(2)), frozen(np.ones(2)), frozen(np.zeros(2))]
    y = F.batch_norm(frozen(x), *args, training=False)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5))
    y, mean, invstd = F.batch_norm_forward(frozen(x), None, None, args[2], args[3], training=True)
    F.batch_norm_backward(frozen(np.ones_like(x)), frozen(x), frozen(mean), frozen(invstd), args[2])


def test_non_contiguous_input_gives_the_same_result(rng):
    x = make_input((3, 4, 5, 6), np.float32, rng)
    strided = non_contiguous(x)
    bn_a, bn_b = fastbn.BatchNorm2d(4), fastbn.BatchNorm2d(4)
    np.testing.assert_array_equal(bn_a(strided), bn_b(x))
    dy = make_input(x.shape, np.float32, rng)
    np.testing.assert_array_equal(bn_a.backward(non_contiguous(dy)), bn_b.backward(dy))
    np.testing.assert_array_equal(bn_a.running_var, bn_b.running_var)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("view", ["fortran", "transposed", "flipped"])
def test_any_memory_order_gives_the_contiguous_result(dtype, view, rng):
    # Regression: float16 input in Fortran order was widened in Fortran order and read by the
    # kernels as if C-ordered, a silently wrong result.
    x = make_input((6, 3, 5), dtype, rng)
    if view == "fortran":
        other = np.asfortranarray(x)
    elif view == "transposed":
        other = np.ascontiguousarray(x.transpose(2, 1, 0)).transpose(2, 1, 0)
    else:
        other = np.flip(np.flip(x, 0).copy(), 0)
    assert not other.flags.c_contiguous
    for training in (True, False):
        expected = F.batch_norm(x, np.zeros(3, P.compute_dtype(x.dtype)), np.ones(3, P.compute_dtype(x.dtype)), training=training)
        got = F.batch_norm(other, np.zeros(3, P.compute_dtype(x.dtype)), np.ones(3, P.compute_dtype(x.dtype)), training=training)
        np.testing.assert_array_equal(got, expected, err_msg=f"{view} {np.dtype(dtype).name} input, training={training}")
    bn, twin = fastbn.BatchNorm1d(3), fastbn.BatchNorm1d(3)
    if dtype == np.float64:
        bn, twin = fastbn.BatchNorm1d(3, dtype=np.float64), fastbn.BatchNorm1d(3, dtype=np.float64)
    np.testing.assert_array_equal(bn(other), twin(x))
    np.testing.assert_array_equal(bn.backward(other), twin.backward(x))
