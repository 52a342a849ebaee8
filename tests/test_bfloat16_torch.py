"""bfloat16 against torch 2.13: nn.BatchNorm1d/2d/3d on bfloat16 input.

torch's CPU batch norm takes bfloat16 input with the module left in float32 (no cast of the
module needed): it computes in float32 and returns bfloat16, with float32 running buffers and
parameter gradients -- fastbn's dtype policy, so both sides run with the same arguments.  Data
crosses between numpy and torch as its bits (an int16 view), never through float32.

Both compute in float32 and round once, but sum and factor differently: outputs and input
gradients may differ by one bfloat16 ulp where the float32 results straddle a rounding
boundary, and no more -- except where the result is small because its terms cancel (a grad
input near 0), where each side keeps only the float32 error of the terms' magnitude (in the
case seen, fastbn's 4.638e-07 against torch's 6.966e-07, the exact value being 4.425e-07).
The float32 buffers and gradients agree to float32 summation error.
"""

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")
torch = pytest.importorskip("torch")

import fastbn  # noqa: E402

from conftest import make_input  # noqa: E402
from halves import BFLOAT16, channels_last, is_channels_last, ulps_apart  # noqa: E402


def to_torch(a):
    """A bfloat16 array as a torch.bfloat16 tensor with the same bits and strides."""
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)


def to_numpy(t):
    """A torch.bfloat16 tensor as a bfloat16 array with the same bits and strides."""
    return t.detach().view(torch.int16).numpy().view(BFLOAT16)


#: float32 error allowed where terms of magnitude m cancel: 16 float32 ulps of m.
CANCELLATION = 16 * 2.0 ** -24


def assert_within_one_ulp(ours, theirs, terms, what):
    """ours and theirs (bfloat16) within one bfloat16 ulp of each other, or within float32
    error of `terms`, the elementwise magnitude of the terms that sum to the result."""
    assert ours.dtype == theirs.dtype == BFLOAT16, f"{what}: dtypes {ours.dtype}, {theirs.dtype}"
    assert not np.isnan(ours.astype(np.float32)).any(), f"{what}: NaN"
    apart = ulps_apart(ours, theirs)
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    bad = (apart > 1) & (diff > CANCELLATION * terms)
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bad, apart, 0)), apart.shape)
        raise AssertionError(f"{what}: {np.count_nonzero(bad)} values more than 1 bfloat16 ulp from "
                             f"torch's (and more than float32 error of their terms), worst "
                             f"{apart[worst]} ulps at {worst}: {ours[worst]!r} vs torch "
                             f"{theirs[worst]!r}, terms of magnitude {terms[worst]:.3g}")


def assert_sums_close(ours, theirs, magnitude, what, rtol=1e-5):
    """float32 per-channel results of sums: within rtol of the sum of the terms' magnitudes
    (float32 summation error grows with it, not with the possibly cancelled result)."""
    assert ours.dtype == np.float32, f"{what}: dtype {ours.dtype}"
    err = np.abs(ours.astype(np.float64) - theirs)
    bound = rtol * np.maximum(magnitude, np.abs(theirs)) + 1e-30
    worst = int(np.argmax(err / bound))
    assert err[worst] <= bound[worst], (f"{what}: channel {worst}: {ours[worst]!r} vs torch "
                                        f"{theirs[worst]!r}, error {err[worst]:.3g} > {bound[worst]:.3g}")


CASES = [(fastbn.BatchNorm1d, torch.nn.BatchNorm1d, (64, 7), "C"),
         (fastbn.BatchNorm1d, torch.nn.BatchNorm1d, (8, 7, 50), "C"),
         (fastbn.BatchNorm2d, torch.nn.BatchNorm2d, (8, 7, 12, 12), "C"),
         (fastbn.BatchNorm2d, torch.nn.BatchNorm2d, (8, 7, 12, 12), "channels-last"),
         (fastbn.BatchNorm3d, torch.nn.BatchNorm3d, (4, 7, 5, 6, 7), "C"),
         (fastbn.BatchNorm3d, torch.nn.BatchNorm3d, (4, 7, 5, 6, 7), "channels-last")]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("ours_cls, theirs_cls, shape, memory", CASES,
                         ids=[f"{o.__name__}-{s}-{m}" for o, _, s, m in CASES])
def test_bfloat16_matches_torch(ours_cls, theirs_cls, shape, memory, training, affine, rng):
    c = shape[1]
    ours, theirs = ours_cls(c, affine=affine), theirs_cls(c, affine=affine)
    with torch.no_grad():
        if affine:
            for name in ("weight", "bias"):
                value = rng.uniform(0.5, 1.5, c).astype(np.float32)
                getattr(ours, name)[...] = value
                getattr(theirs, name).copy_(torch.from_numpy(value))
        for name, value in (("running_mean", 3 + rng.standard_normal(c)),
                            ("running_var", rng.uniform(0.5, 2, c))):
            getattr(ours, name)[...] = value
            getattr(theirs, name).copy_(torch.from_numpy(value.astype(np.float32)))
    ours.train(training)
    theirs.train(training)
    place = channels_last if memory == "channels-last" else (lambda a: a)
    for step in range(2):
        where = f"{ours_cls.__name__} {shape} {memory} training={training} affine={affine}, step {step}"
        x = place(make_input(shape, BFLOAT16, rng, offset=3.0, scale=2.0))
        dy = place(make_input(shape, BFLOAT16, rng))
        tx = to_torch(x).requires_grad_()
        assert tx.dtype == torch.bfloat16
        if theirs.weight is not None:
            theirs.weight.grad = theirs.bias.grad = None
        ty = theirs(tx)
        ty.backward(to_torch(dy))
        y, dx = ours(x), ours.backward(dy)
        assert ty.dtype == tx.grad.dtype == torch.bfloat16, "torch changed its dtype policy"
        # float64 statistics and the magnitudes of the terms of y and dx
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        axes = (0,) + tuple(range(2, len(shape)))
        per_channel = (1, c) + (1,) * (len(shape) - 2)
        if training:
            mean = x64.mean(axis=axes, keepdims=True)
            invstd = 1 / np.sqrt(x64.var(axis=axes, keepdims=True) + ours.eps)
        else:
            mean = ours.running_mean.astype(np.float64).reshape(per_channel)
            invstd = 1 / np.sqrt(ours.running_var.astype(np.float64).reshape(per_channel) + ours.eps)
        w = np.abs(ours.weight).reshape(per_channel) if affine else 1.0
        b = np.abs(ours.bias).reshape(per_channel) if affine else 0.0
        xhat = np.abs(x64 - mean) * invstd
        y_terms = (np.abs(x64) + np.abs(mean)) * invstd * w + b
        dx_terms = invstd * w * (np.abs(dy64) + training * (np.abs(dy64).mean(axis=axes, keepdims=True)
                                 + xhat * (np.abs(dy64) * xhat).mean(axis=axes, keepdims=True)))
        assert_within_one_ulp(y, to_numpy(ty), y_terms, f"{where}: output")
        assert_within_one_ulp(dx, to_numpy(tx.grad), dx_terms, f"{where}: grad_input")
        if memory == "channels-last":
            assert is_channels_last(y) and is_channels_last(dx), f"{where}: memory format"
        # the running mean's error is the batch mean's, on the scale of the data
        for name, magnitude in (("running_mean", np.mean(np.abs(x64))), ("running_var", 0.0)):
            assert_sums_close(getattr(ours, name), getattr(theirs, name).numpy(), magnitude,
                              f"{where}: {name}")
        if affine:
            assert_sums_close(ours.grad_weight, theirs.weight.grad.numpy(),
                              (np.abs(dy64) * xhat).sum(axis=axes).ravel(), f"{where}: grad_weight")
            assert_sums_close(ours.grad_bias, theirs.bias.grad.numpy(), np.abs(dy64).sum(axis=axes),
                              f"{where}: grad_bias")
