"""The eval coefficients a module keeps between calls (_pipeline.EvalTable): the same bits as
computing them afresh, and never stale -- whatever changes the parameters, buffers or eps."""

import copy
import pickle

import numpy as np
import pytest

import fastbn
from fastbn import functional as F
from fastbn._dispatch import kernels as K

from conftest import make_input

SHAPES = [(6, 5), (4, 5, 7), (2, 5, 3, 4), (1, 5, 1, 1), (2, 5, 2, 3, 4), (3, 5, 40, 40)]
MODULE_OF_NDIM = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d,
                  5: fastbn.BatchNorm3d}


def randomised(bn, rng):
    """bn with random parameters and running statistics (in place), in eval mode."""
    c = bn.num_features
    for name, values in (("weight", rng.uniform(0.5, 2, c)), ("bias", rng.uniform(-1, 1, c)),
                         ("running_mean", rng.uniform(-2, 2, c)),
                         ("running_var", rng.uniform(0.2, 3, c))):
        if getattr(bn, name) is not None:
            getattr(bn, name)[...] = values
    return bn.eval()


def fresh_output(bn, x):
    """What an eval forward must give now: torch's functional form, computed from scratch."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False,
                        eps=bn.eps, activation=bn.activation)


def same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.ascontiguousarray(a).view(np.uint8),
                                  np.ascontiguousarray(b).view(np.uint8))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_kept_table_gives_the_bits_of_a_fresh_computation(shape, dtype, activation, rng):
    module_dtype = np.float64 if dtype == np.float64 else np.float32
    bn = randomised(MODULE_OF_NDIM[len(shape)](shape[1], dtype=module_dtype,
                                               activation=activation), rng)
    x = make_input(shape, dtype, rng, offset=3.0)
    first = bn(x)
    assert bn._eval_table is not None
    table = bn._eval_table
    second = bn(x)  # from the kept table
    assert bn._eval_table is table
    same_bits(first, fresh_output(bn, x))
    same_bits(second, first)


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_kept_table_without_some_parameters(affine, bias, rng):
    bn = randomised(fastbn.BatchNorm2d(4, affine=affine, bias=bias), rng)
    x = make_input((3, 4, 5, 5), np.float32, rng)
    bn(x)
    same_bits(bn(x), fresh_output(bn, x))


def change_weight_in_place(bn):
    bn.weight[1] *= 2


def change_bias_through_a_view(bn):
    view = bn.bias[::2]
    view += 0.5


def change_running_mean_in_place(bn):
    bn.running_mean[-1] = 7.0


def change_running_var_by_state_dict(bn):
    state = {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}
    state["running_var"] = state["running_var"] * 3
    bn.load_state_dict(state)


def replace_the_weight_array(bn):
    bn.weight = bn.weight * 0.5


def reset_parameters(bn):
    bn.reset_parameters()


def change_eps(bn):
    bn.eps = 0.1


def one_bit_of_the_variance(bn):
    bits = bn.running_var.view(np.uint32)
    bits[0] ^= 1  # the last mantissa bit: a change no tolerance would see


def a_training_step(bn):
    bn.train()
    bn(np.full((2, bn.num_features, 3, 3), 5.0, np.float32) + np.arange(9, dtype=np.float32).reshape(3, 3))
    bn.eval()


CHANGES = [change_weight_in_place, change_bias_through_a_view, change_running_mean_in_place,
           change_running_var_by_state_dict, replace_the_weight_array, reset_parameters, change_eps,
           one_bit_of_the_variance, a_training_step]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_a_changed_parameter_buffer_or_eps_is_never_served_stale(change, rng):
    bn = randomised(fastbn.BatchNorm2d(4), rng)
    x = make_input((2, 4, 3, 3), np.float32, rng)
    before = bn(x)
    same_bits(bn(x), before)
    kept = bn._eval_table
    change(bn)
    after = bn(x)
    assert bn._eval_table is not kept
    same_bits(after, fresh_output(bn, x))
    if change is not one_bit_of_the_variance:  # (one that may round away in float32 outputs)
        assert not np.array_equal(after.view(np.uint32), before.view(np.uint32))


def test_the_sign_of_a_zero_eps_counts(rng):
    # 1 / sqrt(-0.0 + -0.0) is -inf, 1 / sqrt(-0.0 + 0.0) is +inf: eps is compared by its bits.
    bn = fastbn.BatchNorm1d(2).eval()
    bn.running_var[...] = -0.0
    bn.eps = 0.0
    x = np.array([[1.0, -1.0], [2.0, 3.0]], np.float32)
    bn(x)
    bn.eps = -0.0
    same_bits(bn(x), fresh_output(bn, x))


def test_eval_backward_uses_the_statistics_of_its_own_forward(rng):
    bn = randomised(fastbn.BatchNorm2d(3), rng)
    x = make_input((2, 3, 4, 4), np.float32, rng)
    dy = make_input((2, 3, 4, 4), np.float32, rng)
    expected = randomised(fastbn.BatchNorm2d(3), np.random.default_rng(0))
    expected.load_state_dict(bn.state_dict())
    expected._eval_table = None
    bn(x)
    bn(x)  # the kept table's statistics go to the context
    same_bits(bn.backward(dy), (expected(x), expected.backward(dy))[1])
    same_bits(bn.grad_weight, expected.grad_weight)


def test_a_table_is_never_written_after_it_is_made(rng):
    bn = randomised(fastbn.BatchNorm2d(3), rng)
    x = make_input((2, 3, 4, 4), np.float32, rng)
    bn(x)
    old = bn._eval_table
    kept = [a.copy() for a in (old.table, old.mean, old.invstd, old.snapshot)]
    bn.running_var *= 2
    bn(x)
    assert bn._eval_table is not old
    for a, b in zip(kept, (old.table, old.mean, old.invstd, old.snapshot)):
        same_bits(a, b)


def test_copies_and_pickles_start_without_a_table(rng):
    bn = randomised(fastbn.BatchNorm2d(3), rng)
    x = make_input((2, 3, 4, 4), np.float32, rng)
    y = bn(x)
    for other in (pickle.loads(pickle.dumps(bn)), copy.deepcopy(bn)):
        assert other._eval_table is None
        same_bits(other(x), y)
        other.weight[0] = 3.0
        same_bits(bn(x), y)  # the original keeps its own table and parameters


def swap_the_weight_for_a_bias(bn):
    # the same bytes in another slot: weight 1, bias 0 -> no weight, bias of ones
    bn.bias = np.ones(bn.num_features, np.float32)
    bn.weight = None


def test_which_parameters_are_present_counts_not_only_their_bytes(rng):
    bn = randomised(fastbn.BatchNorm1d(4, bias=False), rng)
    bn.weight[...] = 1
    x = make_input((6, 4), np.float32, rng)
    bn(x)
    swap_the_weight_for_a_bias(bn)
    same_bits(bn(x), fresh_output(bn, x))


@pytest.mark.parametrize("name,value,error", [
    ("running_mean", np.zeros(4, np.float16), TypeError),
    ("running_var", np.ones(4, np.float64), TypeError),
    ("weight", np.ones(5, np.float32), ValueError),
    ("bias", np.zeros((2, 2), np.float32), ValueError),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_replaced_array_of_the_wrong_kind_is_an_error_not_a_crash(name, value, error, rng):
    bn = randomised(fastbn.BatchNorm2d(4), rng)
    x = make_input((2, 4, 3, 3), np.float32, rng)
    bn(x)
    setattr(bn, name, value)
    with pytest.raises(error, match=name):
        bn(x)


def test_the_table_is_computed_from_its_own_copy(rng):
    bn = randomised(fastbn.BatchNorm2d(3), rng)
    x = make_input((2, 3, 4, 4), np.float32, rng)
    bn(x)
    table = bn._eval_table
    np.testing.assert_array_equal(table.snapshot[:4], np.stack(
        [bn.weight, bn.bias, bn.running_mean, bn.running_var]))
    assert table.snapshot[4, 0] == 0b1111
    assert not any(np.may_share_memory(table.snapshot, a)
                   for a in (bn.weight, bn.bias, bn.running_mean, bn.running_var))


def test_same_values():
    c = 4
    w, b = np.arange(c, dtype=np.float32), np.arange(c, 2 * c, dtype=np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    snapshot = np.zeros((5, c), np.float32)
    snapshot[:4] = w, b, rm, rv
    snapshot[4, 0] = 0b1111
    assert K.same_values(snapshot, (w, b, rm, rv))
    assert not K.same_values(snapshot, (w, None, rm, rv))      # absent where it was present
    assert not K.same_values(snapshot, (b, w, rm, rv))
    assert not K.same_values(snapshot, (np.arange(2 * c, dtype=np.float32)[::2], b, rm, rv))
    assert not K.same_values(snapshot, (w.astype(np.float64), b, rm, rv))
    assert not K.same_values(snapshot, (w[:3], b, rm, rv))
    changed = b.copy()
    changed.view(np.uint32)[3] ^= 1
    assert not K.same_values(snapshot, (w, changed, rm, rv))
    snapshot[1] = 0
    snapshot[4, 0] = 0b1101
    assert K.same_values(snapshot, (w, None, rm, rv))        # present where it was absent
    assert not K.same_values(snapshot, (w, np.zeros(c, np.float32), rm, rv))
    # not an array: not the snapshot's values (the table is made anew, and its checks say why)
    assert not K.same_values(snapshot, ([0.0] * c, None, rm, rv))
    with pytest.raises(ValueError):
        K.same_values(snapshot[:4], (w, b, rm, rv))
    with pytest.raises(ValueError):
        K.same_values(snapshot, (w, b, rm))
    with pytest.raises(TypeError):
        K.same_values(None, (w, b, rm, rv))


def test_table_entry_points_check_their_arrays():
    c = 3
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    table, mean, invstd = np.empty((4, c), np.float32), np.empty(c), np.empty(c)
    with pytest.raises(ValueError, match="per-channel"):
        K.eval_table(np.ones(c, np.float64), None, rm, rv, 1e-5, table, mean, invstd)
    with pytest.raises(ValueError, match="per-channel"):
        K.eval_table(None, None, rm, rv, 1e-5, table, mean[:2], invstd)
    with pytest.raises(ValueError, match="float32 or float64"):
        K.eval_table(None, None, rm.astype(np.float16), rv.astype(np.float16), 1e-5,
                     table.astype(np.float16), mean, invstd)
    with pytest.raises(ValueError, match="table"):
        K.eval_table(None, None, rm, rv, 1e-5, np.empty((4, c), np.float64), mean, invstd)
    with pytest.raises(TypeError):
        K.eval_table(None, None, None, rv, 1e-5, table, mean, invstd)
    K.eval_table(None, None, rm, rv, 1e-5, table, mean, invstd)
    x = np.ones((2, c), np.float32)
    with pytest.raises(ValueError, match="x and y"):
        K.apply_table(x, np.empty((2, c), np.float64), table, 1)
    with pytest.raises(ValueError, match="x and y"):
        K.apply_table(x, np.empty((2, c + 1), np.float32), table, 1)
    with pytest.raises(ValueError, match="table"):
        K.apply_table(np.ones((0, c), np.float32), np.ones((0, c), np.float32), table[:2], 1)
    with pytest.raises(TypeError):
        K.apply_table(x, None, table, 1)
    y = np.empty_like(x)
    K.apply_table(x, y, table, 1)
    np.testing.assert_array_equal(y, np.float32(1 / np.sqrt(np.float64(1 + 1e-5))))
