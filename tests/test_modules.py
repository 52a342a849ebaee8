"""BatchNorm1d/2d/3d: state, modes, checkpoints, errors -- torch's semantics without torch."""

import copy
import itertools
import pickle
from collections import OrderedDict

import numpy as np
import pytest

import fastbn
from fastbn import _reference as ref

from conftest import DTYPES, assert_state_unchanged, make_input, snapshot_state

MODULES = [(fastbn.BatchNorm1d, (6, 4)), (fastbn.BatchNorm1d, (5, 4, 7)),
           (fastbn.BatchNorm2d, (3, 4, 5, 6)), (fastbn.BatchNorm3d, (2, 4, 3, 4, 5))]
MODULE_IDS = [f"{cls.__name__}{shape}" for cls, shape in MODULES]


def test_defaults_are_torchs():
    bn = fastbn.BatchNorm2d(5)
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.training) == (1e-5, 0.1, True, True, True)
    assert bn.dtype == np.float32
    np.testing.assert_array_equal(bn.weight, np.ones(5, np.float32))
    np.testing.assert_array_equal(bn.bias, np.zeros(5, np.float32))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(5, np.float32))
    np.testing.assert_array_equal(bn.running_var, np.ones(5, np.float32))
    assert bn.num_batches_tracked.shape == () and bn.num_batches_tracked.dtype == np.int64
    assert int(bn.num_batches_tracked) == 0
    assert bn.grad_weight is None and bn.grad_bias is None


@pytest.mark.parametrize("affine,bias,track", list(itertools.product([True, False], repeat=3)))
def test_optional_state_is_none_and_state_dict_keys_follow(affine, bias, track):
    bn = fastbn.BatchNorm1d(3, affine=affine, track_running_stats=track, bias=bias)
    assert (bn.weight is not None) == affine
    assert (bn.bias is not None) == (affine and bias)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(bn, name) is not None) == track
    expected = [k for k, present in [("weight", affine), ("bias", affine and bias),
                                     ("running_mean", track), ("running_var", track),
                                     ("num_batches_tracked", track)] if present]
    assert list(bn.state_dict()) == expected


@pytest.mark.parametrize("kwargs,text", [
    (dict(num_features=64), "BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)"),
    (dict(num_features=3, momentum=None, affine=False), "BatchNorm2d(3, eps=1e-05, momentum=None, affine=False, bias=False, track_running_stats=True)"),
    (dict(num_features=3, eps=0.001, bias=False, track_running_stats=False), "BatchNorm2d(3, eps=0.001, momentum=0.1, affine=True, bias=False, track_running_stats=False)"),
])
def test_repr(kwargs, text):
    assert repr(fastbn.BatchNorm2d(**kwargs)) == text


def test_integer_like_num_features_and_zero_channels():
    assert fastbn.BatchNorm1d(np.int64(4)).num_features == 4
    bn = fastbn.BatchNorm1d(0)
    assert bn(np.zeros((3, 0), np.float32)).shape == (3, 0)


def test_train_and_eval_return_self_and_check_mode():
    bn = fastbn.BatchNorm1d(2)
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.train(False) is bn and bn.training is False
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        bn.train("no")


@pytest.mark.parametrize("cls,good,bad", [
    (fastbn.BatchNorm1d, [(4, 3), (4, 3, 5)], [(3,), (4, 3, 5, 6)]),
    (fastbn.BatchNorm2d, [(4, 3, 5, 6)], [(4, 3), (4, 3, 5), (2, 4, 3, 5, 6)]),
    (fastbn.BatchNorm3d, [(2, 3, 2, 3, 4)], [(4, 3, 5, 6), (3, 3)]),
])
def test_input_dimensions(cls, good, bad, rng):
    bn = cls(3)
    for shape in good:
        assert bn(make_input(shape, np.float32, rng)).shape == shape
    want = {fastbn.BatchNorm1d: "2D or 3D", fastbn.BatchNorm2d: "4D", fastbn.BatchNorm3d: "5D"}[cls]
    for shape in bad:
        with pytest.raises(ValueError, match=rf"expected {want} input \(got {len(shape)}D input\)"):
            bn(np.zeros(shape, np.float32))


def test_eps_zero_is_rejected_in_training_but_allowed_in_eval(rng):
    bn = fastbn.BatchNorm1d(3, eps=0.0)
    x = make_input((4, 3), np.float32, rng)
    before = snapshot_state(bn)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        bn(x)
    assert_state_unchanged(before)
    assert bn.eval()(x).shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_cumulative_moving_average(dtype, rng):
    bn = fastbn.BatchNorm1d(3, momentum=None, dtype=dtype)
    batches = [make_input((5, 3, 4), dtype, rng, offset=i) for i in range(4)]
    for x in batches:
        bn(x)
    assert int(bn.num_batches_tracked) == 4
    means = [x.astype(np.float64).mean(axis=(0, 2)) for x in batches]
    variances = [x.astype(np.float64).var(axis=(0, 2), ddof=1) for x in batches]
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(bn.running_var, np.mean(variances, axis=0), rtol=rtol)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_exponential_moving_average(momentum, rng):
    bn = fastbn.BatchNorm1d(3, momentum=momentum, dtype=np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    for i in range(3):
        x = make_input((6, 3), np.float64, rng, offset=i)
        bn(x)
        rm = (1 - momentum) * rm + momentum * x.mean(axis=0)
        rv = (1 - momentum) * rv + momentum * x.var(axis=0, ddof=1)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-12)


def test_eval_uses_running_statistics_and_changes_nothing(rng):
    bn = fastbn.BatchNorm2d(3, dtype=np.float64)
    bn.running_mean[...] = [1.0, -2.0, 0.5]
    bn.running_var[...] = [4.0, 0.25, 1.0]
    bn.weight[...] = [2.0, 1.0, 0.5]
    bn.bias[...] = [0.0, 1.0, -1.0]
    before = snapshot_state(bn, state_dict_only=True)
    x = make_input((2, 3, 4, 4), np.float64, rng)
    y = bn.eval()(x)
    np.testing.assert_allclose(y, ref.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))
    assert_state_unchanged(before)


def test_eval_without_running_statistics_uses_the_batch(rng):
    bn = fastbn.BatchNorm1d(3, track_running_stats=False, dtype=np.float64).eval()
    x = make_input((7, 3), np.float64, rng, offset=4.0)
    np.testing.assert_allclose(bn(x), ref.batch_norm(x, None, None, training=True), atol=1e-12)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(x[:1])


@pytest.mark.parametrize("cls,shape", MODULES, ids=MODULE_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_reference(cls, shape, training, rng):
    bn = cls(shape[1], dtype=np.float64)
    bn.weight[...] = rng.uniform(0.5, 2, shape[1])
    bn.running_var[...] = rng.uniform(0.5, 2, shape[1])
    bn.train(training)
    x = make_input(shape, np.float64, rng)
    dy = make_input(shape, np.float64, rng)
    bn(x)
    dx = bn.backward(dy)
    if training:
        _, mean, invstd = ref.batch_norm_forward(x, None, None, training=True)
    else:
        mean, invstd = bn.running_mean, 1 / np.sqrt(bn.running_var + bn.eps)
    dx_ref, gw_ref, gb_ref = ref.batch_norm_backward(dy, x, mean, invstd, bn.weight, training)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.grad_weight, gw_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.grad_bias, gb_ref, rtol=1e-10, atol=1e-12)
    # overwritten, not accumulated
    bn.backward(dy)
    np.testing.assert_allclose(bn.grad_bias, gb_ref, rtol=1e-10, atol=1e-12)


def test_parameter_gradients_are_none_without_parameters(rng):
    x = make_input((4, 3, 5), np.float32, rng)
    bn = fastbn.BatchNorm1d(3, affine=False)
    bn(x)
    bn.backward(np.ones_like(x))
    assert bn.grad_weight is None and bn.grad_bias is None
    bn = fastbn.BatchNorm1d(3, bias=False)
    bn(x)
    bn.backward(np.ones_like(x))
    assert bn.grad_weight is not None and bn.grad_bias is None


def test_backward_uses_the_input_of_the_last_forward(rng):
    bn = fastbn.BatchNorm1d(3, dtype=np.float64)
    a, b = make_input((6, 3), np.float64, rng), make_input((6, 3), np.float64, rng, offset=3)
    dy = make_input((6, 3), np.float64, rng)
    bn(a)
    bn(b)
    dx_ref = ref.batch_norm_backward(dy, b, *ref.batch_norm_forward(b, None, None, training=True)[1:], bn.weight, True)[0]
    np.testing.assert_allclose(bn.backward(dy), dx_ref, rtol=1e-10, atol=1e-12)


def test_state_dict_shares_the_modules_arrays():
    bn = fastbn.BatchNorm1d(3)
    sd = bn.state_dict()
    assert isinstance(sd, OrderedDict)
    assert sd["weight"] is bn.weight and sd["num_batches_tracked"] is bn.num_batches_tracked
    bn(np.arange(12, dtype=np.float32).reshape(4, 3))
    assert int(sd["num_batches_tracked"]) == 1
    assert list(bn.state_dict(prefix="layer1.bn.")) == ["layer1.bn." + k for k in sd]


def full_state(c, dtype=np.float32, nbt=7):
    return {"weight": np.full(c, 2.0, dtype), "bias": np.full(c, 0.5, dtype),
            "running_mean": np.arange(c, dtype=dtype), "running_var": np.full(c, 3.0, dtype),
            "num_batches_tracked": np.array(nbt)}


def test_load_state_dict_round_trip_and_conversions():
    bn = fastbn.BatchNorm2d(3)
    weight_before = bn.weight
    result = bn.load_state_dict(full_state(3, np.float64))
    assert result == fastbn.IncompatibleKeys([], []) and result.missing_keys == []
    assert bn.weight is weight_before, "values are copied into the module's own arrays"
    assert bn.weight.dtype == np.float32
    np.testing.assert_array_equal(bn.running_mean, [0, 1, 2])
    assert int(bn.num_batches_tracked) == 7
    other = fastbn.BatchNorm2d(3)
    other.load_state_dict(bn.state_dict())
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k], v)
    # lists and a one-element counter, as torch accepts
    state = {k: np.asarray(v).tolist() for k, v in full_state(3).items()}
    state["num_batches_tracked"] = [5]
    bn.load_state_dict(state)
    assert int(bn.num_batches_tracked) == 5


def test_load_state_dict_accepts_checkpoints_without_the_counter():
    bn = fastbn.BatchNorm1d(3)
    bn.num_batches_tracked[...] = 11
    state = full_state(3)
    del state["num_batches_tracked"]
    assert bn.load_state_dict(state) == ([], [])
    assert int(bn.num_batches_tracked) == 11  # as torch: kept as it was


def test_load_state_dict_not_strict_reports_keys():
    bn = fastbn.BatchNorm2d(3)
    result = bn.load_state_dict({"weight": np.full(3, 4.0), "extra": 1}, strict=False)
    assert result.missing_keys == ["bias", "running_mean", "running_var"]
    assert result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(bn.weight, 4.0)
    with pytest.raises(ValueError, match="size mismatch"):
        bn.load_state_dict({"weight": np.ones(2)}, strict=False)
    with pytest.raises(TypeError, match="dict-like"):
        bn.load_state_dict([("weight", np.ones(3))])


def test_reset_methods_work_in_place():
    bn = fastbn.BatchNorm1d(3)
    arrays = [bn.weight, bn.running_mean]
    bn.load_state_dict(full_state(3))
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.weight, 2.0)
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    assert arrays[0] is bn.weight and arrays[1] is bn.running_mean


def test_pickle_and_deepcopy_keep_state_but_not_the_saved_input(rng):
    bn = fastbn.BatchNorm2d(3, momentum=None)
    x = make_input((2, 3, 4, 4), np.float32, rng)
    bn(x)
    for clone in (pickle.loads(pickle.dumps(bn)), copy.deepcopy(bn)):
        assert repr(clone) == repr(bn)
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(clone.state_dict()[k], v)
        np.testing.assert_array_equal(clone.eval()(x), bn.eval()(x))
    with pytest.raises(RuntimeError, match="before forward"):
        pickle.loads(pickle.dumps(fastbn.BatchNorm2d(3).train())).backward(x)


@pytest.mark.parametrize("cls,shape", MODULES, ids=MODULE_IDS)
def test_float64_module(cls, shape, rng):
    bn = cls(shape[1], dtype=np.float64)
    x = make_input(shape, np.float64, rng)
    y = bn(x)
    assert y.dtype == np.float64 and bn.running_mean.dtype == np.float64
    with pytest.raises(TypeError, match="float32"):
        bn(x.astype(np.float32))
