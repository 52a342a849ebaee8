"""fastbn against torch 2.13 itself: module sequences of training and eval steps compared on
outputs, gradients, running buffers, counters and state_dicts, over every combination of
dims x dtype x affine/bias x track_running_stats x momentum.  Skipped without torch."""

import numpy as np
import pytest

import fastbn
from fastbn import functional as F

from conftest import make_input

torch = pytest.importorskip("torch")

MODULES = [("BatchNorm1d", (6, 4)), ("BatchNorm1d", (5, 4, 7)),
           ("BatchNorm2d", (3, 4, 5, 6)), ("BatchNorm3d", (2, 4, 3, 4, 5))]
AFFINE = [(True, True), (True, False), (False, True)]  # (affine, bias)
MOMENTA = [0.1, None, 0.0, 1.0]
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
# fastbn and torch round differently (fastbn accumulates in float64): float32 agreement is to
# a few float32 ulps of the values' scale, float64 to ~1e-12.
RTOL = {np.float32: 2e-5, np.float64: 1e-11}


def close(ours, theirs, dtype, what):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    ours = np.asarray(ours)
    assert ours.shape == tuple(theirs.shape), f"{what}: shape {ours.shape} vs torch {theirs.shape}"
    scale = max(1.0, float(np.max(np.abs(theirs)))) if theirs.size else 1.0
    np.testing.assert_allclose(ours, theirs, rtol=RTOL[dtype], atol=RTOL[dtype] * scale, err_msg=what)


def make_pair(name, c, dtype, affine, bias, track, momentum):
    ours = getattr(fastbn, name)(c, momentum=momentum, affine=affine, track_running_stats=track,
                                 dtype=dtype, bias=bias)
    theirs = getattr(torch.nn, name)(c, momentum=momentum, affine=affine, track_running_stats=track,
                                     dtype=TORCH_DTYPE[dtype], bias=bias)
    if affine:  # non-trivial parameters, the same in both
        rng = np.random.default_rng(c)
        ours.weight[...] = rng.uniform(0.5, 1.5, c)
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(ours.weight))
            if bias:
                ours.bias[...] = rng.uniform(-1, 1, c)
                theirs.bias.copy_(torch.from_numpy(ours.bias))
    return ours, theirs


def step(ours, theirs, x, dy, dtype, what):
    """One forward and backward through both; compare everything observable."""
    y = ours(x)
    tx = torch.from_numpy(x.copy()).requires_grad_()
    for p in theirs.parameters():
        p.grad = None
    ty = theirs(tx)
    ty.backward(torch.from_numpy(dy))
    close(y, ty, dtype, f"{what}: output")
    assert y.dtype == x.dtype
    dx = ours.backward(dy)
    close(dx, tx.grad, dtype, f"{what}: grad_input")
    if theirs.weight is not None:
        close(ours.grad_weight, theirs.weight.grad, dtype, f"{what}: grad_weight")
    else:
        assert ours.grad_weight is None
    if theirs.bias is not None:
        close(ours.grad_bias, theirs.bias.grad, dtype, f"{what}: grad_bias")
    else:
        assert ours.grad_bias is None
    compare_state(ours, theirs, dtype, what)


def compare_state(ours, theirs, dtype, what):
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd), f"{what}: state_dict keys"
    for key, value in theirs_sd.items():
        if key == "num_batches_tracked":
            assert int(ours_sd[key]) == int(value), f"{what}: num_batches_tracked"
            assert ours_sd[key].dtype == np.int64 and ours_sd[key].shape == ()
        else:
            close(ours_sd[key], value, dtype, f"{what}: {key}")
            assert ours_sd[key].dtype == dtype


@pytest.mark.parametrize("name,shape", MODULES, ids=[f"{n}{s}" for n, s in MODULES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("affine,bias", AFFINE, ids=["affine", "weight-only", "no-affine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("momentum", MOMENTA, ids=[f"momentum={m}" for m in MOMENTA])
def test_module_sequence_matches_torch(name, shape, dtype, affine, bias, track, momentum):
    rng = np.random.default_rng(7)
    c = shape[1]
    ours, theirs = make_pair(name, c, dtype, affine, bias, track, momentum)
    assert repr(ours) == repr(theirs)
    compare_state(ours, theirs, dtype, "initial state")
    batches = [make_input(shape, dtype, rng, offset=o) for o in (0.0, 2.0, -1.0, 5.0)]
    grads = [make_input(shape, dtype, rng) for _ in batches]
    plan = [("train", 0), ("train", 1), ("eval", 2), ("train", 3), ("eval", 0)]
    for i, (mode, b) in enumerate(plan):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        step(ours, theirs, batches[b], grads[b], dtype, f"step {i} ({mode})")

    # checkpoints cross over in both directions
    fresh_ours, fresh_theirs = make_pair(name, c, dtype, affine, bias, track, momentum)
    fresh_ours.load_state_dict(theirs.state_dict())                   # torch tensors directly
    fresh_ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    fresh_theirs.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in ours.state_dict().items()})
    compare_state(fresh_ours, theirs, dtype, "loaded from torch")
    compare_state(ours, fresh_theirs, dtype, "loaded into torch")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_matches_torch(training, dtype):
    rng = np.random.default_rng(3)
    x = make_input((4, 3, 6, 5), dtype, rng)
    w, b = rng.uniform(0.5, 1.5, 3).astype(dtype), rng.uniform(-1, 1, 3).astype(dtype)
    rm, rv = rng.standard_normal(3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    y = F.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-4)
    ty = torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, torch.from_numpy(w),
                                        torch.from_numpy(b), training, 0.3, 1e-4)
    close(y, ty, dtype, "output")
    close(rm, trm, dtype, "running_mean")
    close(rv, trv, dtype, "running_var")


def test_low_level_pair_matches_torch_native_ops():
    rng = np.random.default_rng(5)
    x = make_input((3, 4, 5, 5), np.float64, rng)
    dy = make_input(x.shape, np.float64, rng)
    w = rng.uniform(0.5, 1.5, 4)
    y, mean, invstd = F.batch_norm_forward(x, None, None, w, None, True, 0.1, 1e-5)
    ty, tmean, tinvstd = torch.native_batch_norm(torch.from_numpy(x), torch.from_numpy(w), None,
                                                 None, None, True, 0.1, 1e-5)
    close(y, ty, np.float64, "output")
    close(mean, tmean, np.float64, "save_mean")
    close(invstd, tinvstd, np.float64, "save_invstd")
    grads = F.batch_norm_backward(dy, x, mean, invstd, w, True)
    tgrads = torch.ops.aten.native_batch_norm_backward(
        torch.from_numpy(dy), torch.from_numpy(x), torch.from_numpy(w), None, None, tmean, tinvstd,
        True, 1e-5, [True, True, True])
    for ours, theirs, what in zip(grads, tgrads, ("grad_input", "grad_weight", "grad_bias")):
        close(ours, theirs, np.float64, what)


BAD_INPUTS = {
    "wrong ndim": lambda: np.zeros((2, 3, 4), np.float32),
    "wrong channels": lambda: np.zeros((2, 5, 4, 4), np.float32),
    "one value per channel": lambda: np.ones((1, 3, 1, 1), np.float32),
    "float64 into float32 module": lambda: np.zeros((2, 3, 4, 4)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_rejects_what_torch_rejects_but_keeps_state(case):
    x = BAD_INPUTS[case]()
    ours, theirs = fastbn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with pytest.raises((ValueError, RuntimeError)):
        theirs(torch.from_numpy(x))
    with pytest.raises((ValueError, TypeError)):
        ours(x)
    assert int(ours.num_batches_tracked) == 0  # torch: incremented before it fails


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_empty_batch_matches_torch(shape):
    ours, theirs = fastbn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = np.zeros(shape, np.float32)
    tx = torch.from_numpy(x).requires_grad_()
    ty = theirs(tx)
    ty.sum().backward()
    y = ours(x)
    dx = ours.backward(np.ones_like(x))
    assert y.shape == tuple(ty.shape) and dx.shape == tuple(tx.grad.shape)
    compare_state(ours, theirs, np.float32, "after an empty batch")
    close(ours.grad_weight, theirs.weight.grad, np.float32, "grad_weight")
    close(ours.grad_bias, theirs.bias.grad, np.float32, "grad_bias")


def test_nan_pattern_matches_torch():
    rng = np.random.default_rng(1)
    x = make_input((4, 3, 5, 5), np.float32, rng)
    x[1, 2, 3, 4] = np.nan
    for training in (True, False):
        ours, theirs = fastbn.BatchNorm2d(3).train(training), torch.nn.BatchNorm2d(3).train(training)
        y = ours(x)
        ty = theirs(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ty))
        np.testing.assert_array_equal(np.isnan(ours.running_mean), np.isnan(theirs.running_mean.numpy()))
