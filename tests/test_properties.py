"""Property tests: random shapes, dtypes, memory layouts, parameters and modes against the
float64 reference (fastbn._reference).

Hypothesis draws ranks 2 to 5 with sizes from 0 (empty batches, zero channels, zero-size
planes), both kernel layouts (chosen by shape, or forced), float16/float32/float64 data
(float16 is computed in float32), C-contiguous, Fortran-ordered, sliced, negative-stride and
broadcast (0-stride) inputs, with or without weight, bias and running statistics, any
momentum in [0, 1] and eps in [1e-6, 1], in training and eval mode, and any thread count.
Each example checks forward, backward and running buffers against the reference, within the
tolerances of tests/conftest.py (assert_close, data_error); a call the reference cannot make
(training on one value per channel) must raise and change nothing.  Example counts are kept
small so the default run stays fast; ``--hypothesis-seed`` reproduces a run.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import fastbn
from fastbn import _reference as ref
from fastbn import functional as F
from fastbn._kernels import describe_layout

from conftest import (assert_close, assert_state_unchanged, data_error, forced_layout,
                      snapshot_state)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: FASTBN_HYPOTHESIS_SCALE=20 runs 20 times the examples (a longer hunt; the default stays fast).
SCALE = float(os.environ.get("FASTBN_HYPOTHESIS_SCALE", "1"))


def examples(n):
    return max(1, int(n * SCALE))
LAYOUTS = ["C", "F", "sliced", "negative", "broadcast"]


@st.composite
def shapes(draw, ndim=None):
    ndim = draw(st.integers(2, 5)) if ndim is None else ndim
    n = draw(st.integers(0, 6))
    c = draw(st.integers(0, 4))
    spatial = []
    budget = 3000  # values per (sample, channel) plane at most
    for _ in range(ndim - 2):
        size = draw(st.integers(0, min(40, budget)))
        spatial.append(size)
        budget = max(1, budget // max(size, 1))
    return (n, c) + tuple(spatial)


def make_data(shape, dtype, layout, seed, offset, constant_channel):
    """Values of `shape` in the requested memory layout (each a view of fresh memory)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) + offset
    if len(shape) > 1 and shape[1] > 0:
        x = x + rng.uniform(-3, 3, shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
        if constant_channel:
            x[:, 0] = offset + 0.5
    x = x.astype(dtype)
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "sliced":
        axis = int(rng.integers(len(shape)))
        wide = list(shape)
        wide[axis] = 2 * shape[axis] + 1
        big = np.zeros(wide, dtype)
        index = [slice(None)] * len(shape)
        index[axis] = slice(1, None, 2)
        big[tuple(index)] = x
        return big[tuple(index)]
    if layout == "negative":
        axis = int(rng.integers(len(shape)))
        return np.flip(np.flip(x, axis).copy(), axis)
    if layout == "broadcast":
        # repeat the first sample (and first position of a spatial axis) through 0 strides
        small = x[:1] if shape[0] else x
        if len(shape) > 2 and shape[2]:
            small = small[:, :, :1]
        return np.broadcast_to(small, shape)
    return x


@st.composite
def forward_cases(draw):
    shape = draw(shapes())
    dtype = np.dtype(draw(st.sampled_from([np.float16, np.float32, np.float64])))
    kernel_dtype = np.dtype(np.float32) if dtype == np.float16 else dtype
    c = shape[1]
    training = draw(st.booleans())
    running = (not training) or draw(st.booleans())
    case = dict(
        shape=shape, dtype=dtype, training=training,
        layout=draw(st.sampled_from(LAYOUTS)),
        kernel_layout=draw(st.sampled_from([None, "planar", "columns"])),
        seed=draw(st.integers(0, 2 ** 32 - 1)),
        offset=draw(st.sampled_from([0.0, 0.0, 100.0, -1e3])),
        constant_channel=draw(st.booleans()),
        momentum=draw(st.floats(0.0, 1.0)),
        eps=draw(st.floats(1e-6, 1.0)),
        n_threads=draw(st.sampled_from([1, 2, 3])),
    )
    rng = np.random.default_rng(case["seed"] + 1)
    case["weight"] = rng.uniform(-2, 2, c).astype(kernel_dtype) if draw(st.booleans()) else None
    case["bias"] = rng.uniform(-1, 1, c).astype(kernel_dtype) if draw(st.booleans()) else None
    if running:
        case["running_mean"] = (rng.standard_normal(c) + case["offset"]).astype(kernel_dtype)
        case["running_var"] = rng.uniform(0.25, 4, c).astype(kernel_dtype)
    else:
        case["running_mean"] = case["running_var"] = None
    return case


def values_per_channel(shape):
    return shape[0] * int(np.prod(shape[2:], dtype=np.int64))


@settings(max_examples=examples(400), **SETTINGS)
@given(forward_cases())
def test_functional_forward_and_backward_match_the_reference(case):
    shape, dtype, training = case["shape"], case["dtype"], case["training"]
    x = make_data(shape, dtype, case["layout"], case["seed"], case["offset"], case["constant_channel"])
    dy = make_data(shape, dtype, "C", case["seed"] + 2, 0.0, False)
    w, b, rm, rv = case["weight"], case["bias"], case["running_mean"], case["running_var"]
    kernel_layout = case["kernel_layout"] or (describe_layout(shape)["layout"] if np.prod(shape) else "empty")
    note(f"kernel layout {kernel_layout}; x strides {x.strides}")
    event(f"kernel layout {kernel_layout}, {'forced' if case['kernel_layout'] else 'by shape'}")
    event(f"{dtype.name} {case['layout']} {'training' if training else 'eval'}")
    with forced_layout(case["kernel_layout"]):
        if training and values_per_channel(shape) == 1:
            before = snapshot_state(*[a for a in (rm, rv) if a is not None])
            with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                F.batch_norm_forward(x, rm, rv, w, b, training, case["momentum"], case["eps"])
            assert_state_unchanged(before)
            return
        rm_ref = None if rm is None else rm.astype(np.float64)
        rv_ref = None if rv is None else rv.astype(np.float64)
        x_before = np.array(x, copy=True)
        y, mean, invstd = F.batch_norm_forward(x, rm, rv, w, b, training, case["momentum"], case["eps"],
                                               n_threads=case["n_threads"])
        y1 = F.batch_norm_forward(x, None if rm is None else rm_ref.astype(rm.dtype),
                                  None if rv is None else rv_ref.astype(rv.dtype), w, b, training,
                                  case["momentum"], case["eps"], n_threads=1)[0]
        dx, gw, gb = F.batch_norm_backward(dy, x, mean, invstd, w, training, n_threads=case["n_threads"])
    y_ref, mean_ref, invstd_ref = ref.batch_norm_forward(x, rm_ref, rv_ref, w, b, training,
                                                         case["momentum"], case["eps"])
    dx_ref, gw_ref, gb_ref = ref.batch_norm_backward(dy, x, mean_ref, invstd_ref, w, training)

    np.testing.assert_array_equal(x, x_before, err_msg="the input was modified")
    np.testing.assert_array_equal(y, y1, err_msg="the result depends on the thread count")
    assert y.shape == shape and y.dtype == dtype and dx.shape == shape and dx.dtype == dtype
    assert_close(y, y_ref, dtype, "output", atol=data_error(x, invstd_ref, w) + _f16(dtype, y_ref))
    if values_per_channel(shape) and shape[1]:
        assert_close(mean, mean_ref, np.float64, "save_mean", scale=max(1.0, float(np.max(np.abs(x)))))
        assert_close(invstd, invstd_ref, np.float64, "save_invstd", scale=np.max(invstd_ref))
    if rm is not None:
        kd = rm.dtype
        assert_close(rm, rm_ref, kd, "running_mean")
        assert_close(rv, rv_ref, kd, "running_var", scale=max(1.0, np.max(np.abs(rv_ref), initial=0)) * 4)
    wabs = np.ones(shape[1]) if w is None else np.abs(w.astype(np.float64))
    dy64 = dy.astype(np.float64)
    if dy.size:
        term = np.max(wabs * invstd_ref, initial=0) * np.max(np.abs(dy64))
        assert_close(dx, dx_ref, dtype, "grad_input", scale=max(term, 1e-30),
                     atol=data_error(x, invstd_ref ** 2, w) * np.max(np.abs(dy64)) + _f16(dtype, dx_ref))
        xhat = ref.normalize_given(x, None, None, mean_ref, invstd_ref)
        assert_close(gw, gw_ref, np.float64 if dtype == np.float64 else np.float32, "grad_weight",
                     scale=max(np.sum(np.abs(dy64 * xhat)), 1.0), atol=data_error(x, invstd_ref) * np.sum(np.abs(dy64)))
        assert_close(gb, gb_ref, np.float64 if dtype == np.float64 else np.float32, "grad_bias",
                     scale=max(np.sum(np.abs(dy64)), 1.0))


def _f16(dtype, expected):
    """The rounding of a float16 result: half an ulp of its largest magnitude."""
    if dtype != np.float16 or np.size(expected) == 0:
        return 0.0
    return 2.0 ** -11 * float(np.max(np.abs(expected[np.isfinite(expected)]), initial=1.0))


MODULE_OF_NDIM = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d, 5: fastbn.BatchNorm3d}


@st.composite
def module_cases(draw):
    ndim = draw(st.integers(2, 5))
    c = draw(st.integers(1, 4))
    steps = draw(st.lists(st.tuples(st.booleans(), shapes(ndim), st.integers(0, 2 ** 32 - 1)), min_size=1, max_size=4))
    steps = [(training, (shape[0], c) + shape[2:], seed) for training, shape, seed in steps]
    return dict(
        cls=MODULE_OF_NDIM[ndim], c=c, steps=steps,
        dtype=np.dtype(draw(st.sampled_from([np.float32, np.float64]))),
        momentum=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        eps=draw(st.floats(1e-6, 1.0)),
        affine=draw(st.booleans()), track=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS)),
        kernel_layout=draw(st.sampled_from([None, "planar", "columns"])),
    )


@settings(max_examples=examples(150), **SETTINGS)
@given(module_cases())
def test_module_steps_match_a_float64_simulation(case):
    """A few forward/backward steps of a module, in both modes, against the reference with
    torch's state rules: running statistics with momentum or the cumulative average, the
    counter, batch statistics without running statistics, nothing changed by a rejected call."""
    dtype = case["dtype"]
    bn = case["cls"](case["c"], eps=case["eps"], momentum=case["momentum"], affine=case["affine"],
                     track_running_stats=case["track"], dtype=dtype)
    if bn.weight is not None:
        bn.weight[...] = np.linspace(0.5, 2, case["c"])
        bn.bias[...] = np.linspace(-1, 1, case["c"])
    rm = None if bn.running_mean is None else bn.running_mean.astype(np.float64)
    rv = None if bn.running_var is None else bn.running_var.astype(np.float64)
    count = 0
    for training, shape, seed in case["steps"]:
        bn.train(training)
        x = make_data(shape, dtype, case["layout"], seed, 10.0, seed % 3 == 0)
        dy = make_data(shape, dtype, "C", seed + 1, 0.0, False)
        batch = training or rm is None
        with forced_layout(case["kernel_layout"]):
            if batch and values_per_channel(shape) == 1:
                before = snapshot_state(bn)
                with pytest.raises(ValueError, match="more than 1 value per channel"):
                    bn(x)
                assert_state_unchanged(before)
                continue
            y = bn(x)
            dx = bn.backward(dy)
        update = training and rm is not None
        if update:
            count += 1
        momentum = case["momentum"]
        if momentum is None:
            momentum = 1.0 / count if update else 0.0
        if batch:
            y_ref, mean_ref, invstd_ref = ref.batch_norm_forward(
                x, rm if update else None, rv if update else None, bn.weight, bn.bias, True, momentum, case["eps"])
        else:
            y_ref, mean_ref, invstd_ref = ref.batch_norm_forward(x, rm, rv, bn.weight, bn.bias, False, 0.0, case["eps"])
        dx_ref = ref.batch_norm_backward(dy, x, mean_ref, invstd_ref, bn.weight, batch)[0]
        assert_close(y, y_ref, dtype, f"output of step {shape}", atol=data_error(x, invstd_ref, bn.weight))
        if dy.size:
            w = np.ones(case["c"]) if bn.weight is None else np.abs(bn.weight.astype(np.float64))
            assert_close(dx, dx_ref, dtype, f"grad_input of step {shape}",
                         scale=max(np.max(w * invstd_ref, initial=0) * np.max(np.abs(dy)), 1e-30),
                         atol=data_error(x, invstd_ref ** 2, bn.weight) * np.max(np.abs(dy)))
        if rm is not None:
            # the reference updated rm, rv in float64; the module rounds to its dtype each step
            assert_close(bn.running_mean, rm, dtype, "running_mean", scale=max(1.0, np.max(np.abs(rm))) * 4)
            assert_close(bn.running_var, rv, dtype, "running_var", scale=max(1.0, np.max(np.abs(rv))) * 8)
            rm, rv = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
            assert int(bn.num_batches_tracked) == count


@settings(max_examples=examples(100), **SETTINGS)
@given(shape=shapes(), seed=st.integers(0, 2 ** 32 - 1), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       training=st.booleans(), kernel_layout=st.sampled_from([None, "planar", "columns"]))
def test_a_non_finite_value_stays_in_its_channel(shape, seed, value, training, kernel_layout):
    """NaN or inf in one channel: in training that channel's outputs and running variance are
    NaN and its running mean is not finite (NaN; torch's +-inf for an infinite value is
    tests/test_numerics.py's xfail), and no other channel's; in eval only that element is
    non-finite."""
    if not shape[1] or values_per_channel(shape) < 2:
        return
    x = make_data(shape, np.float32, "C", seed, 0.0, False)
    rng = np.random.default_rng(seed)
    where = tuple(int(rng.integers(s)) for s in shape)
    x[where] = value
    ch = where[1]
    rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    with forced_layout(kernel_layout):
        y = F.batch_norm(x, rm, rv, training=training, momentum=0.5)
    others = [c for c in range(shape[1]) if c != ch]
    assert np.isfinite(y[:, others]).all(), "another channel became non-finite"
    if training:
        assert np.isnan(y[:, ch]).all(), "the channel's outputs are not NaN"
        assert not np.isfinite(rm[ch]) and np.isnan(rv[ch]), \
            f"the channel's running statistics are {rm[ch]}, {rv[ch]}: expected non-finite, NaN"
        assert np.isfinite(rm[others]).all() and np.isfinite(rv[others]).all()
    else:
        expected = np.full(y.shape, True)
        expected[where] = False
        np.testing.assert_array_equal(np.isfinite(y), expected, err_msg="eval: only the element itself")
        assert (np.isnan(y[where]) if np.isnan(value) else y[where] == value)
