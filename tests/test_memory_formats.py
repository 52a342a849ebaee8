"""Channels-last input and output, and out= (in place), numpy-style."""

import numpy as np
import pytest

import fastbn
from fastbn import _reference as ref
from fastbn import _pipeline as P
from fastbn import functional as F

from conftest import DTYPES, assert_close, data_error, make_input


def channels_last(x):
    """The same values as x (N, C, *spatial) in channels-last memory: a view of an
    (N, *spatial, C) C-contiguous array, as torch's channels_last and channels_last_3d."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)


SHAPES = [(4, 5, 6, 7), (2, 16, 8, 8), (32, 3, 5, 5), (2, 4, 3, 4, 5), (3, 6, 200), (1, 2, 3, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_channels_last_matches_reference_and_stays_channels_last(shape, dtype, training, relu, rng):
    x = channels_last(make_input(shape, dtype, rng, offset=100.0))
    assert P.is_channels_last(x)
    c = shape[1]
    w, b = rng.uniform(0.5, 1.5, c).astype(dtype), rng.uniform(-1, 1, c).astype(dtype)
    rm, rv = (rng.standard_normal(c) + 100).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    activation = "relu" if relu else None
    y, mean, invstd = F.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training, activation=activation)
    y_ref, mean_ref, invstd_ref = ref.batch_norm_forward(x, rm.astype(np.float64), rv.astype(np.float64),
                                                        w, b, training, activation=activation)
    assert P.is_channels_last(y), "the output keeps the input's memory format"
    assert_close(y, y_ref, dtype, "channels-last output", atol=data_error(x, invstd_ref, w))
    dy = channels_last(make_input(shape, dtype, rng))
    dx, gw, gb = F.batch_norm_backward(dy, x, mean, invstd, w, training,
                                       output=y if relu else None, activation=activation)
    dx_ref, gw_ref, gb_ref = ref.batch_norm_backward(dy, x, mean_ref, invstd_ref, w, training,
                                                     output=y if relu else None, activation=activation)
    assert P.is_channels_last(dx)
    term = np.max(np.abs(w) * invstd_ref) * np.max(np.abs(dy))
    assert_close(dx, dx_ref, dtype, "channels-last grad_input", scale=term,
                 atol=data_error(x, invstd_ref ** 2, w) * np.max(np.abs(dy)))
    assert_close(gb, gb_ref, dtype, "channels-last grad_bias", scale=np.sum(np.abs(dy)))


def test_channels_last_is_read_in_place(rng, monkeypatch):
    x = channels_last(make_input((4, 8, 6, 6), np.float32, rng))
    seen = []
    real = P._kernels.forward_train

    def spy(xk, *args):
        seen.append(xk)
        return real(xk, *args)
    monkeypatch.setattr(P._kernels, "forward_train", spy)
    F.batch_norm(x, None, None, training=True)
    assert np.shares_memory(seen[0], x), "channels-last input was copied"
    assert seen[0].shape == (4 * 6 * 6, 8)


def test_module_mixes_memory_formats(rng):
    bn_a, bn_b = fastbn.BatchNorm2d(5), fastbn.BatchNorm2d(5)
    x = make_input((3, 5, 4, 6), np.float32, rng)
    dy = make_input(x.shape, np.float32, rng)
    y_a, y_b = bn_a(x), bn_b(channels_last(x))
    np.testing.assert_allclose(y_b, y_a, rtol=1e-6, atol=1e-6)
    # grad_output in the other memory format than the input is read correctly
    np.testing.assert_allclose(bn_b.backward(dy), bn_a.backward(dy), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn_b.running_var, bn_a.running_var, rtol=1e-6)


def test_channels_last_statistics_stay_accurate_where_torch_does_not(rng):
    torch = pytest.importorskip("torch")
    x = (1e4 + rng.standard_normal((16, 8, 16, 16))).astype(np.float32)
    exact = ref.batch_norm(x, None, None, training=True)
    ours = F.batch_norm(channels_last(x), None, None, training=True)
    tx = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    theirs = torch.nn.functional.batch_norm(tx, None, None, training=True).numpy()
    err_ours, err_torch = np.max(np.abs(ours - exact)), np.max(np.abs(theirs - exact))
    assert err_ours < 1e-5, f"fastbn channels-last error {err_ours:.2e}"
    assert err_ours * 100 < err_torch, f"fastbn {err_ours:.2e} vs torch channels-last {err_torch:.2e}"


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_functional_out_and_in_place(memory_format, training, rng):
    x = make_input((3, 4, 5, 6), np.float32, rng)
    if memory_format == "channels_last":
        x = channels_last(x)
    expected = F.batch_norm(x, np.zeros(4, np.float32), np.ones(4, np.float32), training=training)
    out = np.empty_like(x)  # empty_like keeps the memory format
    got = F.batch_norm(x, np.zeros(4, np.float32), np.ones(4, np.float32), training=training, out=out)
    assert got is out
    np.testing.assert_array_equal(out, expected)
    inplace = x.copy(order="K")
    got = F.batch_norm(inplace, np.zeros(4, np.float32), np.ones(4, np.float32), training=training,
                       out=inplace)
    assert got is inplace
    np.testing.assert_array_equal(inplace, expected)


def test_out_in_another_memory_format_than_the_input(rng):
    x = make_input((3, 4, 5, 6), np.float64, rng)
    expected = F.batch_norm(x, None, None, training=True)
    out = channels_last(np.zeros_like(x))
    F.batch_norm(x, None, None, training=True, out=out)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_module_out_in_place_for_inference(rng):
    bn = fastbn.BatchNorm2d(4).eval()
    bn.running_mean[...] = [1, 2, 3, 4]
    x = make_input((2, 4, 3, 3), np.float32, rng)
    expected = bn(x)
    buf = x.copy()
    assert bn(buf, out=buf) is buf
    np.testing.assert_array_equal(buf, expected)
    with pytest.raises(RuntimeError, match="wrote its output over its input"):
        bn.backward(np.ones_like(x))
    other = np.empty_like(x)
    assert bn(x, out=other) is other
    bn.backward(np.ones_like(x))  # a separate out leaves the input for backward
    with pytest.raises(ValueError, match=r"out has shape \(2, 4, 3, 2\) but expected \(2, 4, 3, 3\)"):
        bn(x, out=np.empty((2, 4, 3, 2), np.float32))
    with pytest.raises(ValueError, match="C-contiguous or channels-last"):
        bn(x, out=np.empty((2, 4, 3, 6), np.float32)[..., ::2])
