"""The fused ReLU: BatchNorm followed by torch's ReLU in the same pass, forward and backward."""

import numpy as np
import pytest

import fastbn
from fastbn import _reference as ref
from fastbn import functional as F

from conftest import DTYPES, assert_close, data_error, forced_fusion, forced_layout, make_input

SHAPES = [(6, 4), (300, 5), (4, 3, 50), (3, 2, 600), (2, 3, 5, 7), (16, 8, 16, 16), (64, 40, 3, 3)]


@pytest.fixture(params=["fused", "unfused"])
def fusion(request):
    with forced_fusion(request.param == "fused"):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", [None, "planar", "columns"])
def test_relu_matches_reference(dtype, shape, training, layout, fusion, rng):
    with forced_layout(layout):
        c = shape[1]
        x = make_input(shape, dtype, rng)
        dy = make_input(shape, dtype, rng)
        w, b = rng.uniform(0.5, 1.5, c).astype(dtype), rng.uniform(-1, 1, c).astype(dtype)
        rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
        y, mean, invstd = F.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training,
                                               activation="relu")
        y_ref, mean_ref, invstd_ref = ref.batch_norm_forward(x, rm.astype(np.float64), rv.astype(np.float64),
                                                            w, b, training, activation="relu")
        assert_close(y, y_ref, dtype, "relu output", atol=data_error(x, invstd_ref, w))
        assert (y >= 0).all() and (y == 0).any(), "ReLU should clip some values and leave none negative"
        dx, gw, gb = F.batch_norm_backward(dy, x, mean, invstd, w, training, output=y, activation="relu")
        # the mask comes from the output: the reference uses the same one
        dx_ref, gw_ref, gb_ref = ref.batch_norm_backward(dy, x, mean_ref, invstd_ref, w, training,
                                                         output=y, activation="relu")
        term = np.max(np.abs(w) * invstd_ref) * np.max(np.abs(dy))
        assert_close(dx, dx_ref, dtype, "relu grad_input", scale=term,
                     atol=data_error(x, invstd_ref ** 2, w) * np.max(np.abs(dy)))
        gated = np.where(y <= 0, 0, dy)
        xhat = ref.normalize_given(x, None, None, mean_ref, invstd_ref)
        assert_close(gw, gw_ref, dtype, "relu grad_weight", scale=np.sum(np.abs(gated * xhat)),
                     atol=data_error(x, invstd_ref) * np.sum(np.abs(dy)))
        assert_close(gb, gb_ref, dtype, "relu grad_bias", scale=np.sum(np.abs(gated)))


def test_relu_follows_torch_on_signed_zero_and_nan():
    # BatchNorm's output for these inputs is x itself (running mean 0, var 1, eps 0, and a bias
    # of -0.0 so that -0.0 stays -0.0: -0 + -0 = -0, while -0 + 0 = +0).
    x = np.array([[-1.0], [-0.0], [0.0], [2.0], [np.nan]], np.float64).reshape(5, 1)
    y = F.batch_norm(x, np.zeros(1), np.ones(1), bias=np.array([-0.0]), eps=0.0, activation="relu")
    assert [str(v) for v in y.ravel()] == ["0.0", "-0.0", "0.0", "2.0", "nan"]
    dx, _, _ = F.batch_norm_backward(np.ones_like(x), x, np.zeros(1), np.ones(1), training=False,
                                     output=y, activation="relu")
    np.testing.assert_array_equal(dx.ravel(), [0, 0, 0, 1, 1])  # torch: gradient passes where not y <= 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["planar", "columns"])
@pytest.mark.parametrize("shape", [(400, 24), (4, 6, 1000)], ids=str)
def test_relu_gate_drops_nonfinite_gradients_where_blocked(dtype, layout, shape, fusion):
    # The gate is a bit mask, not a product: an inf or NaN dy where the output is <= 0 gives
    # +0.0 (inf * 0 would give NaN), and NaN outputs pass dy.  Long channels and planes run
    # the SIMD loops of both layouts, in the sums (training) and the elementwise pass.
    rng = np.random.default_rng(5)
    c = shape[1]
    y = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    blocked = y <= 0
    dy[blocked & (rng.random(shape) < 0.3)] = np.inf
    dy[blocked & (rng.random(shape) < 0.3)] = np.nan
    axes = (0,) + tuple(range(2, len(shape)))
    mean, invstd = np.zeros(c), np.ones(c)
    with forced_layout(layout):
        dx, gw, gb = F.batch_norm_backward(dy, y, mean, invstd, training=True, output=y,
                                           activation="relu")
        gated = np.where(blocked, 0, dy).astype(np.float64)
        assert np.isfinite(dx).all() and np.isfinite(gw).all() and np.isfinite(gb).all()
        np.testing.assert_allclose(gb, gated.sum(axes), rtol=1e-5)
        np.testing.assert_allclose(gw, (gated * y).sum(axes), rtol=1e-5)

        y.reshape(-1)[::7] = np.nan
        dx, _, _ = F.batch_norm_backward(dy, y, mean, invstd, training=False, output=y,
                                         activation="relu")
    np.testing.assert_array_equal(dx, np.where(y <= 0, 0, dy))  # NaN outputs pass dy
    assert not np.signbit(dx[y <= 0]).any(), "blocked gradients must be +0.0"


@pytest.mark.parametrize("cls,shape", [(fastbn.BatchNorm1d, (8, 5)), (fastbn.BatchNorm2d, (4, 5, 6, 7)),
                                       (fastbn.BatchNorm3d, (2, 5, 3, 4, 5))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_with_relu_matches_torch(cls, shape, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    tdtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    ours = cls(shape[1], dtype=dtype, activation="relu", momentum=None)
    theirs = getattr(torch.nn, cls.__name__)(shape[1], dtype=tdtype, momentum=None)
    assert repr(ours) == repr(theirs)[:-1] + ", activation='relu')"
    tol = 2e-5 if dtype == np.float32 else 1e-11
    for step, training in enumerate([True, True, False, True]):
        ours.train(training)
        theirs.train(training)
        x = make_input(shape, dtype, rng, offset=step * 0.3)
        dy = make_input(shape, dtype, rng)
        tx = torch.from_numpy(x.copy()).requires_grad_()
        for p in theirs.parameters():
            p.grad = None
        ty = torch.relu(theirs(tx))
        ty.backward(torch.from_numpy(dy))
        y = ours(x)
        dx = ours.backward(dy)
        for what, got, want in (("output", y, ty), ("grad_input", dx, tx.grad),
                                ("grad_weight", ours.grad_weight, theirs.weight.grad),
                                ("grad_bias", ours.grad_bias, theirs.bias.grad),
                                ("running_var", ours.running_var, theirs.running_var)):
            want = want.detach().numpy()
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1, np.max(np.abs(want))),
                                       err_msg=f"step {step}: {what}")


def test_building_blocks_with_relu_equal_the_whole_batch(rng):
    x = make_input((9, 3, 40), np.float32, rng)
    dy = make_input(x.shape, np.float32, rng)
    pieces, grads = np.split(x, [4]), np.split(dy, [4])
    count, mean, m2 = F.merge_stats(*[F.batch_stats(p) for p in pieces])
    invstd = 1 / np.sqrt(m2 / count + 1e-5)
    ys = [F.batch_norm_elemt(p, mean, invstd, activation="relu") for p in pieces]
    sums = [F.batch_norm_backward_reduce(g, p, mean, output=y, activation="relu")
            for g, p, y in zip(grads, pieces, ys)]
    sum_dy, sum_dyx = np.sum([s[0] for s in sums], axis=0), np.sum([s[1] for s in sums], axis=0)
    dx = np.concatenate([F.batch_norm_backward_elemt(g, p, mean, invstd, None, sum_dy, sum_dyx, count,
                                                     output=y, activation="relu")
                         for g, p, y in zip(grads, pieces, ys)])
    y_whole, m, s = F.batch_norm_forward(x, None, None, training=True, activation="relu")
    np.testing.assert_allclose(np.concatenate(ys), y_whole, rtol=1e-6, atol=1e-6)
    dx_whole = F.batch_norm_backward(dy, x, m, s, output=y_whole, activation="relu")[0]
    np.testing.assert_allclose(dx, dx_whole, rtol=1e-5, atol=1e-5)


def test_activation_errors(rng):
    x = make_input((4, 3), np.float32, rng)
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'tanh'"):
        F.batch_norm(x, None, None, training=True, activation="tanh")
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        fastbn.BatchNorm1d(3, activation="gelu")
    y, m, s = F.batch_norm_forward(x, None, None, training=True, activation="relu")
    with pytest.raises(ValueError, match="needs output="):
        F.batch_norm_backward(x, x, m, s, activation="relu")
    with pytest.raises(ValueError, match="output is only used with activation='relu'"):
        F.batch_norm_backward(x, x, m, s, output=y)
    with pytest.raises(ValueError, match=r"output has shape \(4, 2\) but input has shape \(4, 3\)"):
        F.batch_norm_backward(x, x, m, s, output=y[:, :2], activation="relu")


def test_activation_is_not_state(rng):
    bn = fastbn.BatchNorm2d(3, activation="relu")
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert "activation='relu'" in repr(bn)
    assert "activation" not in repr(fastbn.BatchNorm2d(3))
