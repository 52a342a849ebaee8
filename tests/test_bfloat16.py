"""bfloat16 data (ml_dtypes.bfloat16 arrays), and float16 where its own tests stop.

The promise: half data is read and written as it is and computed in float32 in every pass, so
every half result (output, grad_input) is the float32 path's result on the widened input (and
widened grad_output), rounded to nearest even, bit for bit, and the running buffers, saved
statistics and parameter gradients are the float32 path's own bits.  Checked here

* on the kernels of every SIMD level, every entry point, over a generated grid of shapes x
  layout x fusion x threads x activation x mode, for bfloat16 and for float16 (whose forwards
  tests/test_float16_kernels.py checks on the F16C levels; its backwards, statistics and
  distributed passes, and the baseline level, are checked here);
* through the modules (their state over several steps, memory formats, out=) and the
  functional building blocks;

and the dtype rules of half data once: float32 parameters and buffers, one storage type per
call.  The oracle (widening, rounding, bit comparison) is tests/halves.py.
"""

import itertools

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

import fastbn  # noqa: E402
from fastbn import functional as F  # noqa: E402

from conftest import (ALL_SHAPES, assert_state_unchanged, forced_fusion, forced_layout,  # noqa: E402
                      kernel_levels, kernels_of, make_input, non_contiguous, snapshot_state)
from halves import (BFLOAT16, FLOAT16, assert_rounded, assert_same_bits, channels_last,  # noqa: E402
                    is_channels_last, narrow, storage_dtype, widen)

EPS, MOMENTUM = 1e-5, 0.1
HALVES = ["bfloat16", "float16"]


def per_channel(rng, c, offset=0.0):
    """float32 weight, bias, running_mean (around `offset`, the data's) and running_var."""
    return (rng.uniform(0.5, 1.5, c).astype(np.float32), rng.uniform(-1, 1, c).astype(np.float32),
            (offset + rng.standard_normal(c)).astype(np.float32),
            rng.uniform(0.5, 2, c).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# The kernels of every SIMD level, every entry point
# ---------------------------------------------------------------------------------------------

def kernel_chain(kernels, x, dy, params, training, relu, threads, gate=None):
    """Every kernel entry point of one mode on data x and gradient dy, with the arguments
    fastbn.functional passes; returns {result: array}.  With relu the backwards are gated by
    `gate`, by default this run's own output (a float32 reference is given the half run's
    output widened: the half backward gates by the half output, as torch's ReLU does).

    training: forward_train, backward (batch statistics), and the distributed passes --
    moments, forward_train_with_stats, grad_sums, backward_from_sums; eval: forward_eval,
    backward (fixed statistics), normalize_given.
    """
    w, b, rm, rv = params
    c = x.shape[1]
    count = float(x.size // c)
    y, mean, invstd, rm, rv = np.empty_like(x), np.empty(c), np.empty(c), rm.copy(), rv.copy()
    if training:
        kernels.forward_train(x, y, w, b, rm, rv, MOMENTUM, EPS, mean, invstd, threads, relu)
    else:
        kernels.forward_eval(x, y, w, b, rm, rv, EPS, mean, invstd, threads, relu)
    out = dict(y=y, save_mean=mean, save_invstd=invstd, running_mean=rm, running_var=rv)
    gate = (y if gate is None else gate) if relu else None
    dx, gw, gb = np.empty_like(x), np.zeros(c, np.float32), np.zeros(c, np.float32)
    kernels.backward(dy, x, dx, w, mean, invstd, gw, gb, training, threads, gate)
    out.update(dx=dx, grad_weight=gw, grad_bias=gb)
    if training:
        m, m2, m_lo = np.zeros(c), np.zeros(c), np.zeros(c)
        kernels.moments(x, m, m2, threads, m_lo)
        y2, rm2, rv2, invstd2 = np.empty_like(x), params[2].copy(), params[3].copy(), np.empty(c)
        kernels.forward_train_with_stats(x, y2, w, b, rm2, rv2, MOMENTUM, EPS, count, m.copy(),
                                         m_lo, m2, invstd2, threads, relu)
        sum_dy, sum_dy_xc = np.zeros(c), np.zeros(c)
        kernels.grad_sums(dy, x, mean, sum_dy, sum_dy_xc, threads, gate)
        dx2 = np.empty_like(x)
        kernels.backward_from_sums(dy, x, dx2, w, mean, invstd, sum_dy, sum_dy_xc, count, threads,
                                   gate)
        out.update(moments_mean=m, moments_m2=m2, moments_mean_lo=m_lo, y_given_stats=y2,
                   running_mean_given_stats=rm2, running_var_given_stats=rv2,
                   save_invstd_given_stats=invstd2, sum_dy=sum_dy, sum_dy_xc=sum_dy_xc,
                   dx_from_sums=dx2)
    else:
        y2 = np.empty_like(x)
        kernels.normalize_given(x, y2, w, b, mean, invstd, threads, relu)
        out.update(y_normalize_given=y2)
    return out


def half_and_float32_chains(kernels, x, dy, params, training, relu, threads, layout):
    """kernel_chain on half data and on its widened copy (the float32 run gated by the half
    run's output, as the half backward is), in one layout."""
    with forced_layout(layout):
        half = kernel_chain(kernels, x, dy, params, training, relu, threads)
        ref = kernel_chain(kernels, widen(x), widen(dy), params, training, relu, threads,
                           gate=widen(half["y"]))
    return half, ref


def assert_chain_is_float32_rounded(half, ref, dtype, where, x):
    assert half.keys() == ref.keys()
    for name, want in ref.items():
        if want.ndim > 1:  # data-shaped: the float32 result rounded
            assert_rounded(half[name], want, dtype, f"{where}: {name}", data=x)
        else:  # per-channel: the float32 result itself
            assert_same_bits(half[name], want, f"{where}: {name}")


# conftest's shapes (both layouts, several and single segments, short rows, C = 1, N = 1), and
# two over 2 * GRAIN elements so that n_threads=2 really starts two threads: a planar one
# with planes longer than a segment, and a tall (N, C) matrix of many column tiles.
GRID_SHAPES = ALL_SHAPES + [(2, 3, 120, 120), (4096, 40)]
GRID = list(itertools.product(["planar", "columns"], [True, False], [1, 2], [False, True],
                              [True, False]))


@pytest.mark.parametrize("shape", GRID_SHAPES, ids=str)
@pytest.mark.parametrize("storage", HALVES)
@pytest.mark.parametrize("level", kernel_levels())
def test_every_kernel_gives_the_float32_kernels_bits_rounded(level, storage, shape, rng):
    kernels, dtype = kernels_of(level), storage_dtype(storage)
    offset = 20.0  # the mean matters: data away from 0 (bfloat16 keeps 1/8 steps there)
    x = make_input(shape, dtype, rng, offset=offset)
    dy = make_input(shape, dtype, rng)
    x32, dy32 = widen(x), widen(dy)
    params = per_channel(rng, shape[1], offset)
    for layout, fusion, threads, relu, training in GRID:
        where = (f"{level} {storage} {shape}: layout={layout} fusion={fusion} threads={threads} "
                 f"relu={relu} training={training}")
        with forced_layout(layout), forced_fusion(fusion):
            half = kernel_chain(kernels, x, dy, params, training, relu, threads)
            ref = kernel_chain(kernels, x32, dy32, params, training, relu, threads,
                               gate=widen(half["y"]))
        assert_chain_is_float32_rounded(half, ref, dtype, where, x)


@pytest.mark.parametrize("length", [1, 16, 17, 31, 32, 33, 34, 35, 37, 38, 40, 41, 47, 49, 56, 57,
                                    64, 95, 2047, 2048, 2049, 4100])
@pytest.mark.parametrize("storage", HALVES)
@pytest.mark.parametrize("level", kernel_levels())
def test_run_reductions_give_the_compiled_lanes_bits_at_every_length(level, storage, length, rng):
    """A float32 run's moments and gradient sums go through reduce.h's intrinsics where the
    build has them (runs up to FASTBN_TOTALS_MAX_RUN), a half run's through its half
    intrinsics (AVX2: swept in chunks of FASTBN_HALF_CHUNK; AVX-512: one sweep, the last one
    under masks of eight lanes each) or the compiled lane loops on staged blocks: on the same
    values, the same bits, whatever the remainder of 32 (every eight-lane group of the last
    sweep, full, empty or holding 1 to 7 values) and on either side of the run-length and
    chunk limits --
    with ReLU, a NaN and an infinity in the data and the gradient."""
    kernels, dtype = kernels_of(level), storage_dtype(storage)
    x = make_input((2, 3, length), dtype, rng, offset=20.0)
    # Channel 0 over many decades, either sign: its float64 sums round, so they depend on the
    # order of the additions -- lane for lane, and the fold's.  float16 spans eight (1e-4 to
    # 1e4; its sums of values are exact in any order, its sums of squares are not); bfloat16,
    # float32's range, 24 (1e-12 to 1e12), past what a float64 sum of values holds exactly.
    decades = 4 if storage == "float16" else 12
    magnitudes = (10.0 ** rng.uniform(-decades, decades, (2, length))
                  * rng.choice([-1.0, 1.0], (2, length)))
    x[:, 0, :] = narrow(magnitudes.astype(np.float32), dtype)
    dy = make_input((2, 3, length), dtype, rng)
    x[1, 1, length // 2] = np.nan  # (channel 1: its mean and every sum with it NaN)
    dy[0, 2, length - 1] = np.inf  # (channel 2: the last value of a run, in the remainder)
    params = per_channel(rng, 3, 20.0)
    for relu, training in itertools.product([False, True], [True, False]):
        where = f"{level} {storage}, runs of {length}: relu={relu} training={training}"
        half, ref = half_and_float32_chains(kernels, x, dy, params, training, relu,
                                            1, "planar")
        assert_chain_is_float32_rounded(half, ref, dtype, where, x)


@pytest.mark.parametrize("length", [1, 17, 32, 33, 49, 95])
@pytest.mark.parametrize("storage", HALVES)
@pytest.mark.parametrize("level", kernel_levels())
def test_eval_backward_sums_keep_an_infinite_running_mean_out_of_absent_lanes(level, storage,
                                                                              length, rng):
    """The eval backward's sums (which also write grad_input) centre on the running mean, which
    may be infinite: with dy of one sign, sum(dy * (x - inf)) is -inf, and a lane past the run
    that added its padding (0 * (0 - inf), NaN) would make it NaN.  Runs that end mid-sweep,
    with and without ReLU; the half chain is the float32 chain rounded."""
    kernels, dtype = kernels_of(level), storage_dtype(storage)
    x = make_input((2, 2, length), dtype, rng)
    dy = narrow(np.abs(widen(make_input((2, 2, length), dtype, rng))) + 0.5, dtype)
    w, b, rm, rv = per_channel(rng, 2)
    rm[0] = np.inf
    for relu in (False, True):
        where = f"{level} {storage}, runs of {length}, infinite running mean: relu={relu}"
        half, ref = half_and_float32_chains(kernels, x, dy, (w, b, rm, rv), False, relu,
                                            1, "planar")
        assert_chain_is_float32_rounded(half, ref, dtype, where, x)
        # (with ReLU too: the output is NaN there, which passes the gradient)
        assert ref["grad_weight"][0] == -np.inf, f"{where}: the data no longer tests it"


@pytest.mark.parametrize("layout, shape", [("planar", (16, 8, 8192)), ("columns", (4096, 256))])
@pytest.mark.parametrize("storage", HALVES)
@pytest.mark.parametrize("level", kernel_levels())
def test_elementwise_maps_round_the_float32_maps_on_a_million_values(level, storage, layout,
                                                                      shape, rng):
    """The elementwise maps converted in registers (the forward's affine map, the backward's
    grad_input) must do the float32 loops' operations exactly -- the same fused multiply-adds,
    not a multiply then an add.  A float32 result one ulp off changes its rounding to the half
    type only next to a tie (about one value in 10^4 for float16, fewer for bfloat16), so each
    map here covers a million values, in both layouts."""
    kernels, dtype = kernels_of(level), storage_dtype(storage)
    x = make_input(shape, dtype, rng, offset=3.0)
    dy = make_input(shape, dtype, rng)
    params = per_channel(rng, shape[1], 3.0)
    for training in (True, False):
        where = f"{level} {storage}, {layout} {shape}: training={training}"
        half, ref = half_and_float32_chains(kernels, x, dy, params, training, False,
                                            2, layout)
        assert_chain_is_float32_rounded(half, ref, dtype, where, x)


@pytest.mark.parametrize("width", [40, 45])
@pytest.mark.parametrize("level", kernel_levels())
def test_row_maps_apply_the_factor_of_a_huge_mean(level, width, rng):
    """A column whose mean lies near float32's largest value gets factor 1/2 in split_center
    (x - center could overflow), so the rows of its column tiles carry a FACTOR row, which the
    half row maps must apply as affine_row and grad_input_row do: bfloat16 (float16 cannot
    hold such values), in training (the batch mean) and eval (the running mean), with widths
    that reach the 16-, 8-wide and one-value steps."""
    kernels = kernels_of(level)
    x32 = widen(make_input((64, width), BFLOAT16, rng))
    x32[:, 3] = 1e36 * (1 + 0.01 * rng.standard_normal(64))
    x, dy = narrow(x32.astype(np.float32), BFLOAT16), make_input((64, width), BFLOAT16, rng)
    w, b, rm, rv = per_channel(rng, width)
    rm[3] = 1e36
    for relu, training in itertools.product([False, True], [True, False]):
        where = f"{level} bfloat16, huge mean, width {width}: relu={relu} training={training}"
        half, ref = half_and_float32_chains(kernels, x, dy, (w, b, rm, rv), training, relu,
                                            1, "columns")
        assert_chain_is_float32_rounded(half, ref, BFLOAT16, where, x)
        assert np.isfinite(ref["y"][:, 3]).all(), f"{where}: the data no longer tests it"


SENTINEL = 0x3F81  # (1.0078125 in bfloat16, 1.876 in float16: a value no pass writes here)


def front_of(shape, dtype, spare=64):
    """An array of `shape` that is the front of a larger buffer, and the buffer (its tail full
    of SENTINEL)."""
    size = int(np.prod(shape))
    buffer = np.full(size + spare, SENTINEL, np.uint16).view(dtype)
    return buffer[:size].reshape(shape), buffer


@pytest.mark.parametrize("storage", HALVES)
@pytest.mark.parametrize("level", kernel_levels())
def test_half_passes_write_nothing_past_their_arrays(level, storage, rng):
    """The half passes store the last values of a run under a mask or through a copy: outputs
    that are the front of a larger buffer leave its tail as it was, in every pass that writes
    (forwards, both backwards), in both layouts, on runs and rows that end mid-sweep."""
    kernels, dtype = kernels_of(level), storage_dtype(storage)
    for layout, shape in [("planar", (2, 3, 37)), ("columns", (37, 45))]:
        c = shape[1]
        x, dy = make_input(shape, dtype, rng), make_input(shape, dtype, rng)
        w, b, rm, rv = per_channel(rng, c)
        for training, relu in itertools.product([True, False], [False, True]):
            where = f"{level} {storage}, {layout} {shape}: training={training} relu={relu}"
            y, y_buffer = front_of(shape, dtype)
            dx, dx_buffer = front_of(shape, dtype)
            mean, invstd = np.empty(c), np.empty(c)
            with forced_layout(layout):
                if training:
                    kernels.forward_train(x, y, w, b, rm.copy(), rv.copy(), MOMENTUM, EPS, mean,
                                          invstd, 1, relu)
                else:
                    kernels.forward_eval(x, y, w, b, rm, rv, EPS, mean, invstd, 1, relu)
                kernels.backward(dy, x, dx, w, mean, invstd, np.zeros(c, np.float32),
                                 np.zeros(c, np.float32), training, 1, y if relu else None)
            for name, buffer in (("y", y_buffer), ("dx", dx_buffer)):
                tail = buffer[y.size:].view(np.uint16)
                assert (tail == SENTINEL).all(), f"{where}: {name} written past its end"


def non_finite_data(dtype):
    """(x, dy) of shape (6, 4, 40): inf in channel 0, NaN in 1, +-inf in 2, the dtype's
    largest finite values in 3 (for bfloat16, their float32 squares overflow); a NaN and an
    inf in dy."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 4, 40)).astype(np.float32)
    big = float(ml_dtypes.finfo(dtype).max)
    x[2, 0, 3] = np.inf
    x[0, 1, 0] = np.nan
    x[1, 2, 5], x[4, 2, 39] = np.inf, -np.inf
    x[:, 3, ::2], x[:, 3, 1::2] = big, -big
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dy[3, 0, 7], dy[5, 3, 2] = np.nan, -np.inf
    return narrow(x, dtype), narrow(dy, dtype)


@pytest.mark.parametrize("storage", HALVES)
@pytest.mark.parametrize("level", kernel_levels())
def test_non_finite_values_pass_as_in_the_float32_kernels(level, storage):
    kernels, dtype = kernels_of(level), storage_dtype(storage)
    x, dy = non_finite_data(dtype)
    params = (np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32),
              np.full(4, 1e-6, np.float32))
    for layout, relu, training in itertools.product(["planar", "columns"], [False, True], [True, False]):
        where = f"{level} {storage}, non-finite data: layout={layout} relu={relu} training={training}"
        half, ref = half_and_float32_chains(kernels, x, dy, params, training, relu,
                                            2, layout)
        assert_chain_is_float32_rounded(half, ref, dtype, where, x)
        assert np.isnan(ref["y"]).any() and not np.isfinite(ref["dx"]).all(), \
            f"{where}: the data no longer produces non-finite results"


# ---------------------------------------------------------------------------------------------
# Modules: their state over several steps, memory formats, out=
# ---------------------------------------------------------------------------------------------

MODULE_SHAPES = [(fastbn.BatchNorm1d, (16, 5), "C"), (fastbn.BatchNorm1d, (4, 5, 33), "C"),
                 (fastbn.BatchNorm1d, (4, 5, 33), "channels-last"),
                 (fastbn.BatchNorm2d, (3, 5, 7, 9), "C"),
                 (fastbn.BatchNorm2d, (3, 5, 7, 9), "channels-last"),
                 (fastbn.BatchNorm3d, (2, 5, 3, 4, 6), "C"),
                 (fastbn.BatchNorm3d, (2, 5, 3, 4, 6), "channels-last")]
MODULE_OPTIONS = {"default": {}, "relu": dict(activation="relu"),
                  "no affine, cumulative": dict(affine=False, momentum=None),
                  "no bias, untracked": dict(bias=False, track_running_stats=False)}
STATE = ("running_mean", "running_var", "num_batches_tracked", "grad_weight", "grad_bias")


def in_memory(x, memory):
    return channels_last(x) if memory == "channels-last" else x


@pytest.mark.parametrize("options", list(MODULE_OPTIONS), ids=str)
@pytest.mark.parametrize("storage", HALVES)
@pytest.mark.parametrize("module, shape, memory", MODULE_SHAPES,
                         ids=[f"{m.__name__}-{s}-{f}" for m, s, f in MODULE_SHAPES])
def test_modules_give_a_float32_modules_bits_rounded(module, shape, memory, storage, options, rng):
    dtype = storage_dtype(storage)
    half, ref = module(shape[1], **MODULE_OPTIONS[options]), module(shape[1], **MODULE_OPTIONS[options])
    for name in ("weight", "bias"):
        if getattr(half, name) is not None:
            getattr(half, name)[...] = getattr(ref, name)[...] = rng.uniform(0.5, 1.5, shape[1])
    for step, training in enumerate([True, True, False, True]):
        where = f"{module.__name__} {storage} {shape} {memory} {options}, step {step} (training={training})"
        half.train(training)
        ref.train(training)
        x = in_memory(make_input(shape, dtype, rng, offset=3.0), memory)
        dy = in_memory(make_input(shape, dtype, rng), memory)
        y, y_ref = half(x), ref(widen(x))
        assert_rounded(y, y_ref, dtype, f"{where}: output", data=x)
        # The float32 module gates its backward by its own output, the half one by the rounded
        # output (torch's ReLU): the same mask unless a positive output rounds to zero.
        assert not np.any((y_ref > 0) & (narrow(y_ref, dtype) == 0)), f"{where}: change the seed"
        dx, dx_ref = half.backward(dy), ref.backward(widen(dy))
        assert_rounded(dx, dx_ref, dtype, f"{where}: grad_input", data=x)
        for what, result in (("output", y), ("grad_input", dx)):
            assert is_channels_last(result) == (memory == "channels-last"), \
                f"{where}: {what} is not in the input's memory format (strides {result.strides})"
        for name in STATE:
            got, want = getattr(half, name), getattr(ref, name)
            assert (got is None) == (want is None), f"{where}: {name} is {got!r}, expected {want!r}"
            if want is not None:
                assert_same_bits(got, want, f"{where}: {name}")


OUT_MEMORY = ["C", "channels-last", "input itself"]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("out_memory", OUT_MEMORY)
@pytest.mark.parametrize("x_memory", ["C", "channels-last"])
@pytest.mark.parametrize("storage", HALVES)
def test_out_receives_the_rounded_float32_output(storage, x_memory, out_memory, training, rng):
    # The kernels compute in out's memory format (the input's when out is the input): the
    # float32 module is given a float32 out of the same format, so that both walk the same way.
    dtype = storage_dtype(storage)
    x0 = in_memory(make_input((3, 6, 5, 7), dtype, rng, offset=-2.0), x_memory)
    half, ref = fastbn.BatchNorm2d(6).train(training), fastbn.BatchNorm2d(6).train(training)
    half.running_mean[...] = ref.running_mean[...] = rng.uniform(-3, -1, 6)
    x, x32 = x0.copy(order="K"), widen(x0)
    if out_memory == "input itself":
        out, out32 = x, x32
    else:
        out = in_memory(np.zeros(x.shape, dtype), out_memory)
        out32 = in_memory(np.zeros(x.shape, np.float32), out_memory)
    where = f"{storage} {x_memory} input, {out_memory} out, training={training}"
    assert half(x, out=out) is out, f"{where}: the result is not out"
    assert ref(x32, out=out32) is out32
    assert_rounded(out, out32, dtype, f"{where}: out", data=x0)
    assert is_channels_last(out) == (out_memory == "channels-last" or (
        out_memory == "input itself" and x_memory == "channels-last")), f"{where}: out's strides changed"
    if out_memory != "input itself":
        assert_same_bits(x, x0, f"{where}: the input was modified")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_same_bits(getattr(half, name), getattr(ref, name), f"{where}: {name}")


# ---------------------------------------------------------------------------------------------
# The functional building blocks (distributed batch norm's), in any memory
# ---------------------------------------------------------------------------------------------

def functional_chain(x, dy, w, b, relu, gate=None):
    """The functional API on x and dy: every result by name (gate as in kernel_chain)."""
    activation = "relu" if relu else None
    count, mean, m2 = F.batch_stats(x)
    invstd = 1.0 / np.sqrt(m2 / count + EPS)
    y = F.batch_norm_elemt(x, mean, invstd, w, b, activation=activation)
    output = (y if gate is None else gate) if relu else None
    sum_dy, sum_dy_xmu = F.batch_norm_backward_reduce(dy, x, mean, output=output, activation=activation)
    dx = F.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count,
                                     output=output, activation=activation)
    rm, rv = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    y_fw, save_mean, save_invstd = F.batch_norm_forward(x, rm, rv, w, b, True, activation=activation)
    dx_bw, gw, gb = F.batch_norm_backward(dy, x, save_mean, save_invstd, w, True,
                                          output=output, activation=activation)
    return dict(mean=mean, m2=m2, elemt=y, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, backward_elemt=dx,
                forward=y_fw, running_mean=rm, running_var=rv, save_mean=save_mean,
                save_invstd=save_invstd, backward=dx_bw, grad_weight=gw, grad_bias=gb)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("memory", ["C", "channels-last", "strided"])
@pytest.mark.parametrize("storage", HALVES)
def test_functional_building_blocks_give_the_float32_bits_rounded(storage, memory, relu, rng):
    dtype = storage_dtype(storage)
    shape = (4, 6, 9, 11)
    place = {"C": lambda a: a, "channels-last": channels_last, "strided": non_contiguous}[memory]
    x = place(make_input(shape, dtype, rng, offset=5.0))
    dy = place(make_input(shape, dtype, rng))
    w, b = rng.uniform(0.5, 1.5, 6).astype(np.float32), rng.uniform(-1, 1, 6).astype(np.float32)
    half = functional_chain(x, dy, w, b, relu)
    ref = functional_chain(widen(x), widen(dy), w, b, relu, gate=widen(half["elemt"]))
    where = f"{storage} {memory} relu={relu}"
    for name, want in ref.items():
        if want.ndim > 1:
            assert_rounded(half[name], want, dtype, f"{where}: {name}", data=x)
            assert is_channels_last(half[name]) == (memory == "channels-last"), \
                f"{where}: {name} is not in the input's memory format"
        else:
            assert_same_bits(half[name], want, f"{where}: {name}")


def test_bfloat16_input_in_any_memory_gives_the_same_bits(rng):
    # Unaligned, strided and read-only bfloat16 input, and an unaligned out, are handled around
    # the kernels (copied, or written by numpy): the same bits as from a plain array.  (float16:
    # test_float16_kernels.py::test_float16_forwards_take_any_memory_and_write_any_out.)
    x = make_input((4, 3, 40), BFLOAT16, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    expected = F.batch_norm(x, rm.copy(), rv.copy(), training=True)
    unaligned = np.zeros(x.nbytes + 1, np.uint8)[1:].view(BFLOAT16).reshape(x.shape)
    unaligned[...] = x
    frozen = x.copy()
    frozen.flags.writeable = False
    for what, data in {"unaligned": unaligned, "strided": non_contiguous(x), "read-only": frozen}.items():
        assert_same_bits(F.batch_norm(data, rm.copy(), rv.copy(), training=True), expected,
                         f"{what} bfloat16 input")
    out = np.zeros(x.nbytes + 1, np.uint8)[1:].view(BFLOAT16).reshape(x.shape)
    assert F.batch_norm(x, rm.copy(), rv.copy(), training=True, out=out) is out
    assert_same_bits(out, expected, "unaligned bfloat16 out")


def test_byte_swapped_bfloat16_is_read_as_byte_swapped_float16_is(rng):
    x = make_input((4, 3, 40), BFLOAT16, rng)
    swapped = x.astype(x.dtype.newbyteorder())
    assert not swapped.dtype.isnative
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    expected = F.batch_norm(x, rm.copy(), rv.copy(), training=True)
    assert_same_bits(F.batch_norm(swapped, rm.copy(), rv.copy(), training=True), expected,
                     "byte-swapped bfloat16 input")


# ---------------------------------------------------------------------------------------------
# dtype rules for half data
# ---------------------------------------------------------------------------------------------

def _arrays():
    """The arrays the bad calls below use: bfloat16 and float16 data, per-channel arrays."""
    x = np.ones((4, 3, 5), BFLOAT16)
    return dict(x=x, x16=np.ones(x.shape, FLOAT16), rm=np.zeros(3, np.float32),
                rv=np.ones(3, np.float32), rm16=np.zeros(3, BFLOAT16), rv16=np.ones(3, BFLOAT16),
                rm64=np.zeros(3), rv64=np.ones(3), out16=np.zeros(x.shape, FLOAT16),
                out32=np.zeros(x.shape, np.float32))


# (name, call(s), error, message); s holds _arrays(), "module" (a BatchNorm1d(3) whose last
# forward had float16 input) and "module64" (a float64 BatchNorm1d(3)).
BAD_CALLS = [
    ("bfloat16 module", lambda s: fastbn.BatchNorm2d(3, dtype=BFLOAT16), TypeError,
     "dtype must be float32 or float64, got bfloat16"),
    ("float64 module, bfloat16 input", lambda s: s["module64"](s["x"]), TypeError,
     "input has dtype bfloat16 but BatchNorm1d holds float64 parameters"),
    ("bfloat16 grad_output, float16 input (module)", lambda s: s["module"].backward(s["x"]),
     TypeError, "grad_output has dtype bfloat16 but the last forward's input had dtype float16"),
    ("bfloat16 grad_output, float16 input (functional)",
     lambda s: F.batch_norm_backward(s["x"], s["x16"], np.zeros(3), np.ones(3)), TypeError,
     "grad_output has dtype bfloat16 but input has dtype float16"),
    ("float16 grad_output, bfloat16 input (backward_reduce)",
     lambda s: F.batch_norm_backward_reduce(s["x16"], s["x"], np.zeros(3)), TypeError,
     "grad_output has dtype float16 but input has dtype bfloat16"),
    ("float16 output gating bfloat16 input",
     lambda s: F.batch_norm_backward(s["x"], s["x"], np.zeros(3), np.ones(3), output=s["x16"],
                                     activation="relu"), TypeError,
     "output has dtype float16 but input has dtype bfloat16"),
    ("bfloat16 running buffers", lambda s: F.batch_norm(s["x"], s["rm16"], s["rv16"], training=True),
     TypeError, "running_mean has dtype bfloat16 but the input computes in float32"),
    ("float64 running buffers", lambda s: F.batch_norm(s["x"], s["rm64"], s["rv64"], training=True),
     TypeError, "running_mean has dtype float64 but the input computes in float32"),
    ("bfloat16 weight", lambda s: F.batch_norm(s["x"], s["rm"], s["rv"], s["rm16"], training=True),
     TypeError, "weight has dtype bfloat16 but the input computes in float32"),
    ("float16 out for bfloat16 input",
     lambda s: F.batch_norm(s["x"], s["rm"], s["rv"], training=True, out=s["out16"]), TypeError,
     "out has dtype float16 but expected bfloat16"),
    ("bfloat16 out for float32 input (module)",
     lambda s: s["module"](s["x"].astype(np.float32), out=s["x"]), TypeError,
     "out has dtype bfloat16 but expected float32"),
    ("float32 out for bfloat16 input (elemt)",
     lambda s: F.batch_norm_elemt(s["x"], np.zeros(3), np.ones(3), out=s["out32"]), TypeError,
     "out has dtype float32 but expected bfloat16"),
]


@pytest.mark.parametrize("name, call, error, message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_half_dtype_rules_refuse_and_change_nothing(name, call, error, message):
    arrays = _arrays()
    module, module64 = fastbn.BatchNorm1d(3), fastbn.BatchNorm1d(3, dtype=np.float64)
    module(arrays["x16"])
    before = snapshot_state(module, module64, *arrays.values())
    with pytest.raises(error, match=message):
        call(dict(arrays, module=module, module64=module64))
    assert_state_unchanged(before, name)
