"""Folding eval-mode batch norm into convolution and linear weights."""

import numpy as np
import pytest

import fastbn

from conftest import make_input


def conv2d(x, w, b):
    """A plain (stride 1, no padding) 2-D convolution, enough to check a fold."""
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    out = np.zeros((n, cout, h - kh + 1, wd - kw + 1))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", x[:, :, i:i + out.shape[2], j:j + out.shape[3]], w[:, :, i, j])
    return out + b.reshape(1, -1, 1, 1)


def trained_bn(rng, c, dtype=np.float64):
    bn = fastbn.BatchNorm2d(c, dtype=dtype)
    bn.weight[...] = rng.uniform(0.5, 1.5, c)
    bn.bias[...] = rng.uniform(-1, 1, c)
    bn.running_mean[...] = rng.standard_normal(c)
    bn.running_var[...] = rng.uniform(0.5, 2, c)
    return bn.eval()


@pytest.mark.parametrize("conv_bias", [True, False])
def test_fused_conv_equals_conv_then_bn(conv_bias, rng):
    bn = trained_bn(rng, 4)
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4) if conv_bias else None
    x = rng.standard_normal((2, 3, 8, 8))
    expected = bn(conv2d(x, w, np.zeros(4) if b is None else b))
    fw, fb = fastbn.fuse_conv_bn_weights(w, b, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    np.testing.assert_allclose(conv2d(x, fw, fb), expected, rtol=1e-12, atol=1e-12)


def test_scale_shift_is_the_eval_map(rng):
    bn = trained_bn(rng, 5)
    x = make_input((3, 5, 4, 4), np.float64, rng)
    scale, shift = bn.scale_shift()
    np.testing.assert_allclose(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1), bn(x),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="no running statistics"):
        fastbn.BatchNorm2d(5, track_running_stats=False).scale_shift()


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fusions_match_torch(transpose, dtype, rng):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
    c = 6
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    bw, bb = rng.uniform(0.5, 1.5, c).astype(dtype), rng.uniform(-1, 1, c).astype(dtype)
    conv_w = rng.standard_normal((3, c, 3, 3) if transpose else (c, 3, 3, 3)).astype(dtype)
    conv_b = rng.standard_normal(c).astype(dtype)
    t = torch.from_numpy
    tol = 1e-6 if dtype == np.float32 else 1e-13
    for ours, theirs in zip(
            fastbn.fuse_conv_bn_weights(conv_w, conv_b, rm, rv, 1e-5, bw, bb, transpose),
            fuse_conv_bn_weights(t(conv_w), t(conv_b), t(rm), t(rv), 1e-5, t(bw), t(bb), transpose)):
        assert ours.dtype == dtype
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=tol, atol=tol)
    lin_w = rng.standard_normal((c, 5)).astype(dtype)
    for ours, theirs in zip(
            fastbn.fuse_linear_bn_weights(lin_w, None, rm, rv, 1e-5, bw, bb),
            fuse_linear_bn_weights(t(lin_w), None, t(rm), t(rv), 1e-5, t(bw), t(bb))):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=tol, atol=tol)


def test_fusion_errors(rng):
    rm, rv = np.zeros(4), np.ones(4)
    with pytest.raises(ValueError, match="conv_w has 3 output channels"):
        fastbn.fuse_conv_bn_weights(np.ones((3, 2, 3, 3)), None, rm, rv, 1e-5, None, None)
    with pytest.raises(ValueError, match="needs out_features = 5 channels or 1, got 4"):
        fastbn.fuse_linear_bn_weights(np.ones((5, 2)), None, rm, rv, 1e-5, None, None)
    with pytest.raises(ValueError, match="bn_rv should contain 4 elements"):
        fastbn.fuse_conv_bn_weights(np.ones((4, 2, 3, 3)), None, rm, np.ones(3), 1e-5, None, None)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        fastbn.fuse_conv_bn_weights(np.ones((4, 2, 3, 3)), None, rm, rv, -1.0, None, None)
    w, b = fastbn.fuse_linear_bn_weights(np.ones((5, 2), np.float32), None, np.zeros(1), np.ones(1), 0.0, None, None)
    assert w.dtype == b.dtype == np.float32 and b.shape == (5,)
