"""float16 data: computed in float32 (float64 statistics), float16 out, float32 buffers."""

import numpy as np
import pytest

import fastbn
from fastbn import _reference as ref
from fastbn import functional as F

from conftest import make_input


@pytest.mark.parametrize("shape", [(16, 4), (4, 3, 7, 7), (2, 3, 30, 30)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_float16_module(shape, training, rng):
    x = make_input(shape, np.float16, rng)
    bn = (fastbn.BatchNorm1d if len(shape) == 2 else fastbn.BatchNorm2d)(shape[1]).train(training)
    y = bn(x)
    assert y.dtype == np.float16 and bn.running_mean.dtype == np.float32
    expected = ref.batch_norm(x, np.zeros(shape[1]), np.ones(shape[1]), training=training)
    # float16 output: half an ulp of float16 (2**-11 relative) around |y| <~ 4
    np.testing.assert_allclose(y, expected, rtol=2**-10, atol=2**-10 * 4)
    dx = bn.backward(np.ones_like(x))
    assert dx.dtype == np.float16 and bn.grad_weight.dtype == np.float32


def test_float16_matches_torch_mixed_precision(rng):
    torch = pytest.importorskip("torch")
    x = make_input((8, 5, 6, 6), np.float16, rng)
    theirs = torch.nn.BatchNorm2d(5)
    ours = fastbn.BatchNorm2d(5)
    ty = theirs(torch.from_numpy(x))
    y = ours(x)
    assert ty.dtype == torch.float16
    np.testing.assert_allclose(y.astype(np.float32), ty.detach().float().numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-5)


def test_float16_functional_out_and_buffers(rng):
    x = make_input((4, 3, 5), np.float16, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.empty_like(x)
    assert F.batch_norm(x, rm, rv, training=True, out=out) is out
    assert out.dtype == np.float16 and np.isfinite(out).all()
    with pytest.raises(TypeError, match="running_mean has dtype float16 but the input computes in float32"):
        F.batch_norm(x, np.zeros(3, np.float16), np.ones(3, np.float16), training=True)
    with pytest.raises(TypeError, match="input has dtype float16 but BatchNorm1d holds float64"):
        fastbn.BatchNorm1d(3, dtype=np.float64)(x)


def _layouts(x):
    """x (N, C, H, W) float16 in C order, channels-last and strided memory."""
    channels_last = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    strided = np.zeros(x.shape[:3] + (2 * x.shape[3],), x.dtype)[..., ::2]
    strided[...] = x
    return {"C": x, "channels-last": channels_last, "strided": strided}


@pytest.mark.parametrize("layout", ["C", "channels-last", "strided"])
@pytest.mark.parametrize("training", [True, False])
def test_float16_is_the_float32_computation_rounded_in_every_layout(layout, training, rng):
    # Widening is exact and the kernels see the same float32 values, so every result must be
    # the float32 result rounded to float16, bit for bit, whatever the memory format.
    x16 = make_input((4, 6, 9, 11), np.float16, rng)
    dy16 = make_input(x16.shape, np.float16, rng)
    x, dy = _layouts(x16)[layout], _layouts(dy16)[layout]
    rm, rv = rng.standard_normal(6).astype(np.float32), rng.uniform(0.5, 2, 6).astype(np.float32)
    w, b = rng.uniform(0.5, 1.5, 6).astype(np.float32), rng.uniform(-1, 1, 6).astype(np.float32)

    def run(x, dy, out=None):
        y, mean, invstd = F.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training, out=out)
        dx, gw, gb = F.batch_norm_backward(dy, x, mean, invstd, w, training)
        elemt = F.batch_norm_elemt(x, mean, invstd, w, b)
        dx_elemt = F.batch_norm_backward_elemt(dy, x, mean, invstd, w, gb.astype(np.float64),
                                               gw.astype(np.float64) / invstd, x.size // 6)
        return y, dx, gw, gb, elemt, dx_elemt

    expected = run(x16.astype(np.float32), dy16.astype(np.float32))
    out = np.empty_like(x)  # keeps the layout (strided: C order)
    for results in (run(x, dy), run(x, dy, out=out)):
        for name, got, want in zip(["y", "dx", "grad_weight", "grad_bias", "elemt", "dx_elemt"],
                                   results, expected):
            if want.ndim > 1:
                assert got.dtype == np.float16, name
                np.testing.assert_array_equal(got, want.astype(np.float16), err_msg=name)
            else:
                np.testing.assert_array_equal(got, want, err_msg=name)
    assert results[0] is out
    if layout == "channels-last":
        assert not results[0].flags.c_contiguous and not run(x, dy)[0].flags.c_contiguous
