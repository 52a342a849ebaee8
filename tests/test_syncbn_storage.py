"""SyncBatchNorm over every storage type and memory format.

* On one rank it is BatchNorm2d, bit for bit -- forward, running buffers, backward, parameter
  gradients -- for float32, float64, float16 and bfloat16 data, C-contiguous and channels-last.
* On two and three ranks (threads of this process, tests/test_syncbn.py's communicator) each
  rank's output and grad_input keep its input's dtype and memory format; half data gives the
  float32 SyncBatchNorm's results on the widened data, rounded (float32 state bit for bit);
  and everything matches one BatchNorm2d on the concatenated batch within the tolerance the
  float32 multi-rank checks use (tests/syncbn_cases.py), plus the half output's rounding.
"""

import numpy as np
import pytest

import fastbn
from fastbn import functional as F

from conftest import TOLERANCE, assert_close, data_error, make_input
from halves import (SIGNIFICAND_BITS, SUBNORMAL_HALF_ULP, assert_rounded, assert_same_bits,
                    channels_last, is_channels_last, is_half, storage_dtype, storage_params, widen)
from test_syncbn import ThreadGroup, run_ranks

C = 3
STATE = ("running_mean", "running_var", "num_batches_tracked", "grad_weight", "grad_bias")


def module_dtype(dtype):
    """The module's dtype for data of a storage type: float32 for half data."""
    return np.float64 if dtype == np.float64 else np.float32


def place(x, memory):
    return channels_last(x) if memory == "channels-last" else x


def set_parameters(modules, rng):
    weight, bias = rng.uniform(0.5, 1.5, C), rng.uniform(-1, 1, C)
    for m in modules:
        m.weight[...], m.bias[...] = weight, bias


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("memory", ["C", "channels-last"])
@pytest.mark.parametrize("storage", storage_params("float32", "float64", "float16", "bfloat16"))
def test_one_rank_is_batchnorm2d_bit_for_bit(storage, memory, activation, rng):
    dtype = storage_dtype(storage)
    options = dict(dtype=module_dtype(dtype), activation=activation)
    sync = fastbn.SyncBatchNorm(C, comm=ThreadGroup(1).comm(0), **options)
    ref = fastbn.BatchNorm2d(C, **options)
    set_parameters([sync, ref], rng)
    for step, training in enumerate([True, True, False, True]):
        where = f"{storage} {memory} activation={activation}, step {step} (training={training})"
        sync.train(training)
        ref.train(training)
        x = place(make_input((4, C, 6, 7), dtype, rng, offset=2.0), memory)
        dy = place(make_input(x.shape, dtype, rng), memory)
        results = {"output": (sync(x), ref(x)), "grad_input": (sync.backward(dy), ref.backward(dy))}
        for what, (got, want) in results.items():
            assert_same_bits(got, want, f"{where}: {what}")
            assert is_channels_last(got) == (memory == "channels-last"), \
                f"{where}: {what} is not in the input's memory format (strides {got.strides})"
        for name in STATE:
            assert_same_bits(getattr(sync, name), getattr(ref, name), f"{where}: {name}")


def assert_close_rounded(got, want32, dtype, what, scale, atol):
    """got, of half dtype, is a float32 value within float32's tolerance of want32 (as
    conftest.assert_close: TOLERANCE[float32] * scale + atol), rounded to nearest even: so
    within that, plus half an ulp of the rounded value."""
    tol = TOLERANCE[np.dtype(np.float32)] * scale + atol
    unit = 2.0 ** -SIGNIFICAND_BITS[dtype.name]
    want = want32.astype(np.float64)
    bound = tol + unit * (np.abs(want) + tol) + SUBNORMAL_HALF_ULP[dtype.name]
    err = np.abs(widen(got).astype(np.float64) - want)
    if err.size and not np.all(err <= bound):
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{what}: {np.count_nonzero(err > bound)} values beyond float32's "
                             f"tolerance plus rounding, worst at {i}: {widen(got)[i]!r} vs "
                             f"{want32[i]!r}, error {err[i]:.3g} > {bound[i]:.3g}")


SPLITS = [[3, 5], [1, 1], [2, 3, 4], [4, 0, 1]]
TAILS = {"2d": (4, 5), "3d": (2, 3, 4)}


@pytest.mark.parametrize("tail", list(TAILS))
@pytest.mark.parametrize("memory", ["C", "channels-last"])
@pytest.mark.parametrize("storage", storage_params("float32", "float16", "bfloat16"))
@pytest.mark.parametrize("sizes", SPLITS, ids=str)
def test_ranks_keep_storage_and_memory_format_and_match_one_batchnorm(sizes, storage, memory, tail, rng):
    dtype = storage_dtype(storage)
    half = is_half(dtype)
    shape = (sum(sizes), C) + TAILS[tail]
    bounds = np.cumsum([0] + sizes)
    slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    steps = [(make_input(shape, dtype, rng, offset=5.0), make_input(shape, dtype, rng)) for _ in range(2)]
    weight, bias = rng.uniform(0.5, 1.5, C), rng.uniform(-1, 1, C)

    def work(comm):
        """Each step: this rank's results of the module on its slice, and of a float32 module
        on the widened slice (half data only), in the same order on every rank."""
        mine = slices[comm.Get_rank()]
        modules = [fastbn.SyncBatchNorm(C, comm=comm)] + ([fastbn.SyncBatchNorm(C, comm=comm)] if half else [])
        for m in modules:
            m.weight[...], m.bias[...] = weight, bias
        results = []
        for x, dy in steps:
            x, dy = place(np.ascontiguousarray(x[mine]), memory), place(np.ascontiguousarray(dy[mine]), memory)
            step = []
            for m, (xm, dym) in zip(modules, [(x, dy), (widen(x), widen(dy))]):
                y = m(xm)
                dx = m.backward(dym)
                step.append(dict(output=y, grad_input=dx, **{n: np.copy(getattr(m, n)) for n in STATE}))
            results.append(step)
        return results

    per_rank = run_ranks(len(sizes), work)
    ref = fastbn.BatchNorm2d(C) if len(shape) == 4 else fastbn.BatchNorm3d(C)
    ref.weight[...], ref.bias[...] = weight, bias
    for step, (x, dy) in enumerate(steps):
        x32, dy32 = widen(x), widen(dy)
        y_ref, dx_ref = ref(x32), ref.backward(dy32)
        count, mean, m2 = F.batch_stats(x32)
        invstd = 1.0 / np.sqrt(m2 / count + ref.eps)
        dy_max = float(np.max(np.abs(dy32)))
        tolerances = {"output": (None, data_error(x32, invstd, weight)),
                      "grad_input": (float(np.max(np.abs(weight) * invstd)) * dy_max,
                                     data_error(x32, invstd ** 2, weight) * dy_max)}
        axes = (0,) + tuple(range(2, len(shape)))
        xmu = np.abs(x32 - mean.reshape((1, -1) + (1,) * len(TAILS[tail])))
        scales = {"grad_weight": np.sum(np.abs(dy32)) * np.max(xmu) * np.max(invstd),
                  "grad_bias": np.sum(np.abs(dy32)), "running_mean": None, "running_var": None}
        for rank, mine in enumerate(slices):
            where = f"{storage} {memory} {tail}, ranks {sizes}, step {step}, rank {rank}"
            got = per_rank[rank][step][0]
            for what, (scale, atol) in tolerances.items():
                result, want = got[what], {"output": y_ref, "grad_input": dx_ref}[what][mine]
                assert result.dtype == dtype, f"{where}: {what} has dtype {result.dtype}"
                if sizes[rank]:  # (an empty array is C-contiguous and channels-last at once)
                    assert is_channels_last(result) == (memory == "channels-last"), \
                        f"{where}: {what} is not in the input's memory format (strides {result.strides})"
                if scale is None:
                    finite = want[np.isfinite(want)]
                    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
                if half:
                    assert_close_rounded(result, want, dtype, f"{where}: {what}", scale, atol)
                else:
                    assert_close(result, want, np.float32, f"{where}: {what}", scale=scale, atol=atol)
            for name, scale in scales.items():
                assert_close(got[name], getattr(ref, name), np.float32, f"{where}: {name}",
                             scale=None if scale is None else max(1.0, float(scale)))
            assert int(got["num_batches_tracked"]) == step + 1
            if half:  # the promise: the float32 module's results on the widened data, rounded
                wide = per_rank[rank][step][1]
                for what in ("output", "grad_input"):
                    assert_rounded(got[what], wide[what], dtype, f"{where}: {what} vs float32's")
                for name in STATE:
                    assert_same_bits(got[name], wide[name], f"{where}: {name} vs float32's")


def test_a_forward_over_its_own_input_has_no_backward_on_any_rank(rng):
    # out=input in training: every rank normalises in place (one Allgather, as always), and
    # backward then says, as BatchNorm2d does, that there is no input left -- no collective.
    x = [make_input((2 + r, C, 4, 4), np.float32, rng) for r in range(2)]

    def work(comm):
        bn = fastbn.SyncBatchNorm(C, comm=comm)
        mine = x[comm.Get_rank()].copy()
        assert bn(mine, out=mine) is mine
        with pytest.raises(RuntimeError, match="wrote its output over its input"):
            bn.backward(np.ones_like(mine))

    run_ranks(2, work)
