"""The float16 forwards (F16C variants): they read and write float16 through float32 blocks in
cache, and must give exactly the float32 kernels' results on the widened data, rounded --
outputs, statistics and running buffers -- for every layout, fusion setting, thread count and
activation, and refuse what they cannot process."""

import numpy as np
import pytest

import fastbn
from fastbn import _pipeline as P
from fastbn import functional as F

from conftest import forced_fusion, forced_layout, kernel_levels, kernels_of, make_input

F16C_LEVELS = [level for level in kernel_levels() if kernels_of(level).half_simd()]
pytestmark = pytest.mark.skipif(not F16C_LEVELS, reason="no kernel variant converts float16 with instructions here (F16C, FCVT)")

# Planar (with segments longer than a staging block, and several per plane), columns with
# short and long planes, runs of planes, rows of several samples, one tall (N, C) matrix with
# column tiles taller than a staging block, and sizes that leave scalar tails everywhere.
SHAPES = [(4, 6, 9, 11), (2, 8, 30001), (3, 5, 2100), (300, 40, 2, 2), (1000, 3, 7), (64, 5),
          (4099, 300), (2, 3, 5), (3, 2, 17), (128, 33, 1, 1), (1, 2, 3, 4)]


def parameters(rng, c):
    return (rng.uniform(0.5, 1.5, c).astype(np.float32), rng.uniform(-1, 1, c).astype(np.float32),
            rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32))


def run(kernels, training, x, w, b, rm, rv, threads, relu):
    """One forward: (y, save_mean, save_invstd, running_mean, running_var)."""
    c = x.shape[1]
    y, mean, invstd, rm, rv = np.empty_like(x), np.empty(c), np.empty(c), rm.copy(), rv.copy()
    if training:
        kernels.forward_train(x, y, w, b, rm, rv, 0.1, 1e-5, mean, invstd, threads, relu)
    else:
        kernels.forward_eval(x, y, w, b, rm, rv, 1e-5, mean, invstd, threads, relu)
    return y, mean, invstd, rm, rv


@pytest.mark.parametrize("level", F16C_LEVELS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", [None, "planar", "columns"])
@pytest.mark.parametrize("training", [True, False])
def test_float16_kernels_give_the_float32_kernels_bits(level, shape, layout, training, rng):
    kernels = kernels_of(level)
    x16 = make_input(shape, np.float16, rng, offset=50.0)
    x32 = x16.astype(np.float32)
    w, b, rm, rv = parameters(rng, shape[1])
    with forced_layout(layout):
        for fusion in (True, False):
            with forced_fusion(fusion):
                for threads in (1, 2, 3):
                    for relu in (False, True):
                        got = run(kernels, training, x16, w, b, rm, rv, threads, relu)
                        want = run(kernels, training, x32, w, b, rm, rv, threads, relu)
                        where = f"fusion={fusion} threads={threads} relu={relu}"
                        assert got[0].dtype == np.float16
                        np.testing.assert_array_equal(got[0].view(np.uint16),
                                                      want[0].astype(np.float16).view(np.uint16),
                                                      err_msg=where)
                        for g, e in zip(got[1:], want[1:]):
                            np.testing.assert_array_equal(g, e, err_msg=where)


@pytest.mark.parametrize("level", F16C_LEVELS)
def test_float16_kernels_pass_non_finite_values_as_the_float32_ones(level):
    kernels = kernels_of(level)
    x16 = np.array([[1, np.inf, -2, 3], [np.nan, 0, 65504, -65504]] * 3, np.float16).reshape(3, 2, 4)
    x32 = x16.astype(np.float32)
    w, b, rm, rv = (np.ones(2, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32),
                    np.full(2, 1e-6, np.float32))
    for training in (True, False):
        got = run(kernels, training, x16, w, b, rm, rv, 2, False)
        want = run(kernels, training, x32, w, b, rm, rv, 2, False)
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(got[0], want[0].astype(np.float16))
        np.testing.assert_array_equal(got[1], want[1])


def test_float16_eval_in_place(rng):
    x16 = make_input((4, 6, 50), np.float16, rng)
    expected = F.batch_norm(x16, np.zeros(6, np.float32), np.ones(6, np.float32))
    assert F.batch_norm(x16, np.zeros(6, np.float32), np.ones(6, np.float32), out=x16) is x16
    np.testing.assert_array_equal(x16, expected)


def test_float16_forwards_take_any_memory_and_write_any_out(rng):
    # Unaligned and byte-swapped float16 input and an unaligned out are copied or written by
    # numpy around the kernels; the results are the same bits as from plain arrays.
    x = make_input((4, 3, 40), np.float16, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    expected = F.batch_norm(x, rm.copy(), rv.copy(), training=True)
    raw = np.zeros(x.nbytes + 1, np.uint8)
    unaligned = raw[1:].view(np.float16).reshape(x.shape)
    unaligned[...] = x
    swapped = x.astype(x.dtype.newbyteorder())
    for data in (unaligned, swapped):
        np.testing.assert_array_equal(F.batch_norm(data, rm.copy(), rv.copy(), training=True), expected)
    out_raw = np.zeros(x.nbytes + 1, np.uint8)
    out = out_raw[1:].view(np.float16).reshape(x.shape)
    assert F.batch_norm(x, rm.copy(), rv.copy(), training=True, out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_float16_relu_backward_masks_with_the_float16_output(rng):
    # As torch's ReLU on a float16 batch norm output: the mask is where that output is > 0.
    bn = fastbn.BatchNorm2d(3, activation="relu")
    x = make_input((4, 3, 5, 5), np.float16, rng)
    y = bn(x)
    dx = bn.backward(np.ones_like(x))
    reference = fastbn.BatchNorm2d(3)
    reference(x)
    np.testing.assert_array_equal(dx, reference.backward((y > 0).astype(np.float16)))


@pytest.mark.parametrize("level", F16C_LEVELS)
@pytest.mark.parametrize("entry", ["forward_eval", "forward_train"])
def test_float16_kernels_refuse_what_they_cannot_process(level, entry):
    kernels = kernels_of(level)
    fn = getattr(kernels, entry)
    x = np.zeros((4, 3, 8), np.float16)
    p = np.ones(3, np.float32)
    stats = (np.empty(3), np.empty(3))

    def call(x, y, per_channel=p):
        if entry == "forward_eval":
            fn(x, y, per_channel, p, p.copy(), p.copy(), 1e-5, *stats, 1)
        else:
            fn(x, y, per_channel, p, p.copy(), p.copy(), 0.1, 1e-5, *stats, 1)

    raw = np.zeros(x.nbytes + 2, np.uint8)
    read_only = np.zeros_like(x)
    read_only.flags.writeable = False
    cases = [
        # (x decides the storage type: float16 y for float32 x is the mismatch named)
        ((x.astype(np.float32), np.zeros_like(x)), "aligned, C-contiguous float32"),
        ((x, np.zeros((4, 3, 16), np.float16)[..., ::2]), "aligned, C-contiguous float16"),
        ((x.astype(x.dtype.newbyteorder()), np.zeros_like(x)), "byte order"),
        ((x, np.zeros((4, 3, 9), np.float16)), "same shape"),
        ((x, read_only), "read-only"),
        ((raw[:x.nbytes].view(np.float16).reshape(x.shape),
          raw[2:].view(np.float16).reshape(x.shape)), "overlap"),
    ]
    for (a, y), match in cases:
        with pytest.raises(ValueError, match=match):
            call(a, y)
    with pytest.raises(ValueError, match="float32 per-channel"):
        call(x, np.zeros_like(x), np.ones(3, np.float64))
    with pytest.raises(ValueError, match="float32 per-channel"):
        call(x, np.zeros_like(x), np.ones(4, np.float32))


def test_float16_data_reaches_the_kernels_as_float16(monkeypatch, rng):
    # The module path hands the kernels the float16 data itself, not widened float32 copies
    # (every variant converts: with F16C or with exact integer arithmetic).
    calls = []
    for name in ("apply_table", "forward_train"):  # (a module's eval applies its kept table)
        original = getattr(P._kernels, name)
        monkeypatch.setattr(P._kernels, name, lambda x, y, *a, _o=original, _n=name, **k: (
            calls.append((_n, x.dtype.name, y.dtype.name)), _o(x, y, *a, **k)))
    bn = fastbn.BatchNorm2d(3)
    x = make_input((2, 3, 4, 4), np.float16, rng)
    bn(x)
    bn.eval()(x)
    assert calls == [("forward_train", "float16", "float16"), ("apply_table", "float16", "float16")]
