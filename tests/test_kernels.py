"""Every compiled kernel variant against the float64 reference, over generated inputs."""

import numpy as np
import pytest

from fastbn import _reference as ref
from fastbn._kernels import describe_layout

from conftest import (ALL_SHAPES, DTYPES, assert_close, data_error, forced_fusion, forced_layout,
                      kernel_levels, kernels_of, make_input)

LEVELS = kernel_levels()
# Extra shapes: several row blocks and tiles at once, a short last row with several blocks.
KERNEL_SHAPES = ALL_SHAPES + [(70, 300), (700, 5), (3, 2, 64, 64)]


def test_shapes_cover_both_layouts_and_their_cases():
    layouts = [describe_layout(s) for s in KERNEL_SHAPES]
    planar = [g for g in layouts if g["layout"] == "planar"]
    columns = [g for g in layouts if g["layout"] == "columns"]
    assert any(g["segments"] > 1 for g in planar), "no plane cut into several segments"
    assert any(g["segments"] == 1 for g in planar)
    assert any(g["group"] > 1 for g in columns), "no row holding several samples"
    assert any(g["tail"] > 0 for g in columns), "no short last row"
    assert any(g["rows"] > g["block"] for g in columns), "no column reduction in several blocks"
    assert any(g["tiles"] > 1 for g in columns), "no row cut into several tiles"


@pytest.fixture(params=["auto", "planar", "columns"])
def layout(request):
    """Run a kernel test with the layout chosen by shape, and with each layout forced."""
    with forced_layout(None if request.param == "auto" else request.param):
        yield request.param


def per_channel(rng, c, dtype, low=0.5, high=1.5):
    return rng.uniform(low, high, c).astype(dtype)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_kernels_match_reference(level, dtype, shape, offset, layout, rng):
    K = kernels_of(level)
    c = shape[1]
    x = make_input(shape, dtype, rng, offset=offset)
    dy = make_input(shape, dtype, rng)
    w, b = per_channel(rng, c, dtype), per_channel(rng, c, dtype, -1, 1)

    # statistics
    mean, m2 = np.empty(c), np.empty(c)
    K.moments(x, mean, m2, 2)
    ref_mean, ref_m2 = ref.moments(x)
    # Statistics are float64-accurate whatever the data's dtype (float64 accumulation).
    assert_close(mean, ref_mean, np.float64, "mean", scale=np.max(np.abs(x)))
    assert_close(m2, ref_m2, np.float64, "M2", scale=np.max(ref_m2))

    # training forward, with running buffers
    count = x.size // c
    if count > 1:
        rm, rv = per_channel(rng, c, dtype), per_channel(rng, c, dtype)
        rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
        y = np.empty_like(x)
        save_mean, save_invstd = np.empty(c), np.empty(c)
        K.forward_train(x, y, w, b, rm, rv, 0.1, 1e-5, save_mean, save_invstd, 2)
        y_ref, mean_ref, invstd_ref = ref.batch_norm_forward(x, rm_ref, rv_ref, w, b, True, 0.1, 1e-5)
        assert_close(y, y_ref, dtype, "training output", atol=data_error(x, invstd_ref, w))
        assert_close(save_invstd, invstd_ref, np.float64, "save_invstd", scale=np.max(invstd_ref) * 10)
        assert_close(rm, rm_ref, dtype, "running_mean")
        assert_close(rv, rv_ref, dtype, "running_var")

        # training backward
        dx, gw, gb = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
        K.backward(dy, x, dx, w, save_mean, save_invstd, gw, gb, True, 2)
        dx_ref, gw_ref, gb_ref = ref.batch_norm_backward(dy, x, mean_ref, invstd_ref, w, True)
        # dx is a difference of terms of size |w| * invstd * |dy|: that is its error scale.
        term_scale = np.max(np.abs(w) * invstd_ref) * np.max(np.abs(dy))
        assert_close(dx, dx_ref, dtype, "training grad_input", scale=term_scale,
                     atol=data_error(x, invstd_ref ** 2, w) * np.max(np.abs(dy)))
        # A sum's error scale is the sum of the absolute values of its terms.
        xhat = ref.normalize_given(x, None, None, mean_ref, invstd_ref)
        assert_close(gw, gw_ref, dtype, "grad_weight", scale=np.sum(np.abs(dy * xhat)),
                     atol=data_error(x, invstd_ref) * np.sum(np.abs(dy)))
        assert_close(gb, gb_ref, dtype, "grad_bias", scale=np.sum(np.abs(dy)))

    # eval forward and backward, with and without parameter gradients
    rm, rv = (make_input((c,), dtype, rng, offset=offset), per_channel(rng, c, dtype))
    y = np.empty_like(x)
    save_mean, save_invstd = np.empty(c), np.empty(c)
    K.forward_eval(x, y, w, b, rm, rv, 1e-5, save_mean, save_invstd, 2)
    y_ref, mean_ref, invstd_ref = ref.batch_norm_forward(x, rm, rv, w, b, False, 0.1, 1e-5)
    assert_close(y, y_ref, dtype, "eval output", atol=data_error(x, invstd_ref, w))
    for grads in (True, False):
        dx = np.empty_like(x)
        gw, gb = (np.empty(c, dtype), np.empty(c, dtype)) if grads else (None, None)
        K.backward(dy, x, dx, w, save_mean, save_invstd, gw, gb, False, 2)
        dx_ref, gw_ref, gb_ref = ref.batch_norm_backward(dy, x, mean_ref, invstd_ref, w, False)
        assert_close(dx, dx_ref, dtype, "eval grad_input")
        if grads:
            xhat = ref.normalize_given(x, None, None, mean_ref, invstd_ref)
            assert_close(gw, gw_ref, dtype, "eval grad_weight", scale=np.sum(np.abs(dy * xhat)),
                         atol=data_error(x, invstd_ref) * np.sum(np.abs(dy)))
            assert_close(gb, gb_ref, dtype, "eval grad_bias", scale=np.sum(np.abs(dy)))

    # the building blocks distributed batch norm uses
    y = np.empty_like(x)
    K.normalize_given(x, y, None, None, ref_mean, 1.0 / np.sqrt(ref_m2 / count + 1e-3), 2)
    invstd = 1.0 / np.sqrt(ref_m2 / count + 1e-3)
    assert_close(y, ref.normalize_given(x, None, None, ref_mean, invstd), dtype, "normalize_given",
                 atol=data_error(x, invstd))
    sum_dy, sum_dyx = np.empty(c), np.empty(c)
    K.grad_sums(dy, x, ref_mean, sum_dy, sum_dyx, 2)
    ref_dy, ref_dyx = ref.grad_sums(dy, x, ref_mean)
    # float64 results: only float64 accumulation error (up to ~100 ulps of the absolute sum,
    # e.g. when a channel's many column sums are added in sequence), whatever the data's dtype.
    assert_close(sum_dy, ref_dy, np.float64, "sum(dy)", scale=np.sum(np.abs(dy)) * 10)
    centered = x.astype(np.float64) - ref_mean.reshape((1, -1) + (1,) * (x.ndim - 2))
    assert_close(sum_dyx, ref_dyx, np.float64, "sum(dy*(x-mean))", scale=np.sum(np.abs(dy * centered)) * 10,
                 atol=data_error(x, 1.0) * np.sum(np.abs(dy)))


# Shapes large enough that the kernels really use several threads, in both layouts; on
# (1024, 128) one thread processes column tiles over all rows (fused) and several do not, and,
# where planar channels of up to 1 MiB are fused (Intel CPUs; forced_fusion(True) anywhere), on
# (8, 4, 64, 64) one thread processes channel by channel and several do not, so the paths must
# agree to the bit; (2, 16, 32, 32) and (1, 24, 20, 20) go channel by channel (fused) at any
# thread count, on any CPU.
THREAD_SHAPES = [(8, 16, 32, 32), (3, 2, 150000), (4096, 96), (200001, 3), (64, 80, 7, 7),
                 (8, 4, 64, 64), (256, 40, 7, 7), (1024, 128), (2, 16, 32, 32), (1, 24, 20, 20)]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=str)
def test_results_do_not_depend_on_thread_count(level, dtype, shape, layout, rng):
    K = kernels_of(level)
    c = shape[1]
    x = make_input(shape, dtype, rng, offset=3.0)
    dy = make_input(shape, dtype, rng)
    w = per_channel(rng, c, dtype)
    results = []
    for threads in (1, 2, 3, 5):
        mean, invstd = np.empty(c), np.empty(c)
        y = np.empty_like(x)
        rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
        K.forward_train(x, y, w, None, rm, rv, 0.1, 1e-5, mean, invstd, threads)
        dx, gw, gb = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
        K.backward(dy, x, dx, w, mean, invstd, gw, gb, True, threads)
        dx_eval = np.empty_like(x)
        K.backward(dy, x, dx_eval, w, mean, invstd, gw.copy(), gb.copy(), False, threads)
        results.append((mean, invstd, y, rm, rv, dx, gw, gb, dx_eval))
    for threads, other in zip((2, 3, 5), results[1:]):
        for name, a, b in zip("mean invstd y running_mean running_var dx grad_weight grad_bias dx_eval".split(),
                              results[0], other):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} differs between 1 and {threads} threads")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_fused_passes_give_the_unfused_bits(level, dtype, shape, relu, layout, rng):
    """The channel-fused (planar) and tile-fused (columns) passes run the same work items and
    merges as the separate passes, in another order: the same bits, or the fusion is wrong."""
    K = kernels_of(level)
    c = shape[1]
    x = make_input(shape, dtype, rng, offset=3.0)
    dy = make_input(shape, dtype, rng)
    w, b = per_channel(rng, c, dtype), per_channel(rng, c, dtype, -1, 1)
    for threads in (1, 2):  # which passes can fuse depends on the thread count
        results = []
        for fused in (True, False):
            with forced_fusion(fused):
                mean, invstd, y = np.empty(c), np.empty(c), np.empty_like(x)
                rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
                K.forward_train(x, y, w, b, rm, rv, 0.1, 1e-5, mean, invstd, threads, relu)
                dx, gw, gb = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
                K.backward(dy, x, dx, w, mean, invstd, gw, gb, True, threads, y if relu else None)
                results.append((mean, invstd, y, rm, rv, dx, gw, gb))
        for name, a, b in zip("mean invstd y running_mean running_var dx grad_weight grad_bias".split(),
                              *results):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: fused and unfused passes differ "
                                                        f"on {threads} thread(s)")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_tiles_skip_unit_factors_only_where_a_whole_tile_has_them(level, dtype, rng):
    """A column tile whose channels all have the factor 1 runs without it (x * 1 is x), one with
    a channel in split_center's corner (a mean too close to the dtype's largest value) with
    it: either way the bits of the separate passes, forward and backward."""
    K = kernels_of(level)
    shape = (512, 600)  # (three tiles of at most 1 MiB: one thread fuses them)
    c = shape[1]
    x = make_input(shape, dtype, rng, offset=3.0)
    if np.dtype(dtype) == np.float64:  # (a spread there would overflow its squares)
        x[:, 300] = 1e300
    else:
        x[:, 300] = (x[:, 300].astype(np.float64) * 1e36).astype(dtype)  # (the second tile's)
    dy = make_input(shape, dtype, rng)
    w, b = per_channel(rng, c, dtype), per_channel(rng, c, dtype, -1, 1)
    results = []
    for fused in (True, False):
        with forced_fusion(fused):
            mean, invstd, y = np.empty(c), np.empty(c), np.empty_like(x)
            rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
            K.forward_train(x, y, w, b, rm, rv, 0.1, 1e-5, mean, invstd, 1)
            dx, gw, gb = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
            K.backward(dy, x, dx, w, mean, invstd, gw, gb, True, 1)
            results.append((mean, invstd, y, dx, gw, gb))
    assert np.isfinite(results[0][2].astype(np.float64)[:, 300]).all()
    for name, a, b in zip("mean invstd y dx grad_weight grad_bias".split(), *results):
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: fused and unfused passes differ")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 17, 19), (37, 6), (3, 2, 9000)], ids=str)
def test_simd_levels_agree(dtype, shape, rng):
    """All built variants compute the same statistics to within rounding."""
    x = make_input(shape, dtype, rng, offset=100.0)
    c = shape[1]
    outputs = []
    for level in LEVELS:
        K = kernels_of(level)
        y, mean, invstd = np.empty_like(x), np.empty(c), np.empty(c)
        K.forward_train(x, y, None, None, None, None, 0.1, 1e-5, mean, invstd, 1)
        outputs.append((level, y, mean))
    for level, y, mean in outputs[1:]:
        assert_close(y, outputs[0][1], dtype, f"output of {level} vs {outputs[0][0]}")
        assert_close(mean, outputs[0][2], dtype, f"mean of {level} vs {outputs[0][0]}", scale=1e-1)


def test_the_fusion_limits_are_a_checked_process_wide_switch():
    from fastbn import _tuning
    default = _tuning.default_fusion_limits()
    assert default in (_tuning.INTEL_FUSION, _tuning.OTHER_FUSION)
    assert _tuning.current_fusion_limits() == default
    bad_limits = [{"channel_bytes": bad} for bad in (-1, 1.5, "1", True, None)]
    bad_limits += [{"tile_bytes": -1}, {"short_piece_bytes": 2.0}, {"serial_tile_bytes": False},
                   {"serial_tile_array_bytes": 2 ** 62}, {"channel_byte": 1024}]
    for bad in bad_limits:
        with pytest.raises(ValueError):  # checked whole: a good key beside a bad one is not set
            _tuning.set_fusion_limits({"tile_bytes": 77, **bad})
        assert _tuning.current_fusion_limits() == default
    with pytest.raises(TypeError):
        _tuning.set_fusion_limits([("channel_bytes", 1024)])
    with pytest.raises(TypeError):  # the per-CPU tables are read-only
        _tuning.OTHER_FUSION["channel_bytes"] = 1
    x = make_input((8, 4, 64, 64), np.float32, np.random.default_rng(0), offset=3.0)
    results = {level: [] for level in LEVELS}
    try:
        _tuning.set_fusion_limits({"tile_bytes": 77})  # the others keep their values
        assert _tuning.current_fusion_limits() == {**default, "tile_bytes": 77}
        # 128 KiB channels of 8 samples: unfused, then fused
        for limits in ({"channel_bytes": 0}, _tuning.INTEL_FUSION):
            _tuning.set_fusion_limits(limits)
            assert describe_layout(x.shape)["fused"] == ("channels" if limits["channel_bytes"]
                                                         else None)
            for level in LEVELS:
                y, mean, invstd = np.empty_like(x), np.empty(4), np.empty(4)
                kernels_of(level).forward_train(x, y, None, None, None, None, 0.1, 1e-5, mean,
                                                invstd, 1)
                results[level].append(y)
    finally:
        _tuning.set_fusion_limits(None)
    assert _tuning.current_fusion_limits() == default
    for level, (unfused, fused) in results.items():
        np.testing.assert_array_equal(fused, unfused, err_msg=level)


FUSION_CASES = [
    # shape, itemsize, threads, fused under INTEL_FUSION, fused under OTHER_FUSION
    ((1, 64, 56, 56), 4, 1, "channels", "channels"),      # 12.25 KiB channels, one sample
    ((1, 64, 56, 56), 2, 2, "channels", "channels"),
    ((4, 64, 8, 8), 4, 1, "channels", None),              # 1 KiB channels, 256 B pieces
    ((4, 64, 8, 8), 4, 2, "channels", None),              # (too small for a second thread)
    ((8, 256, 16, 16), 4, 1, "channels", None),           # 8 KiB channels, 1 KiB pieces
    ((8, 256, 16, 16), 4, 2, "channels", "channels"),     # two threads: pieces don't matter
    ((8, 128, 14, 14), 8, 1, "channels", None),           # float64, 1568 B pieces
    ((2, 64, 28, 28), 4, 1, "channels", "channels"),      # 3136 B pieces
    ((2, 128, 1024), 2, 1, "channels", "channels"),       # 2 KiB pieces of 2-byte values
    ((2, 128, 768), 2, 1, "channels", None),              # 1.5 KiB pieces
    ((1, 8, 128, 128), 4, 1, "channels", None),           # 64 KiB channels: over 16 KiB
    ((1, 512, 7, 7), 4, 1, None, None),                   # 196 B channels: under 1 KiB
    ((4, 64, 300), 4, 2, "channels", "channels"),         # 1200 B pieces, 300 KiB, 2 threads
    ((8, 2048, 12, 12), 4, 2, "channels", None),          # 576 B pieces in 9 MiB
    ((128, 2048, 1, 1), 4, 1, "tiles", "tiles"),          # 8 tiles of 128 KiB
    ((128, 2048), 2, 2, "tiles", "tiles"),                # 8 tiles of 64 KiB on two threads
    ((256, 1024), 4, 1, "tiles", None),                   # 4 tiles of 256 KiB on one thread
    ((256, 2048), 4, 2, "tiles", "tiles"),                # 8 of them on two threads
    ((512, 256), 4, 1, "tiles", "tiles"),                 # one tile of 512 KiB
    ((1024, 1024), 4, 1, "tiles", None),                  # 1 MiB tiles in 4 MiB
    ((1024, 1024), 2, 1, "tiles", None),                  # 512 KiB tiles in 2 MiB
    ((512, 8192), 2, 1, "tiles", "tiles"),                # 256 KiB tiles in 8 MiB
    ((256, 24576), 4, 1, "tiles", "tiles"),               # 256 KiB tiles in 24 MiB
    ((2048, 1024), 4, 2, None, None),                     # 2 MiB tiles: over every limit
    ((64, 32, 7, 7), 4, 1, None, None),                   # channel runs (S > 1): never tiles
    ((0, 64, 8, 8), 4, 1, None, None),                    # empty
]


@pytest.mark.parametrize("shape, itemsize, threads, intel, other", FUSION_CASES, ids=str)
def test_each_cpu_family_fuses_what_its_limits_say(shape, itemsize, threads, intel, other):
    """The fusion limits decide which training passes are fused (describe_layout reports
    the decision the kernels take): Intel's fuse planar channels and column tiles of up to
    1 MiB; the others (measured on an AMD EPYC Zen 4) channels of up to 16 KiB and tiles of
    up to 1 MiB, but channels of pieces under 2 KiB only on two threads in arrays under
    4 MiB, and on one thread tiles over 128 KiB among several only in arrays of 8 MiB or
    more; fusion off fuses nothing."""
    from fastbn import _tuning
    try:
        for limits, expected in ((_tuning.INTEL_FUSION, intel), (_tuning.OTHER_FUSION, other)):
            _tuning.set_fusion_limits(limits)
            assert describe_layout(shape, itemsize, threads)["fused"] == expected, limits
            _tuning.set_fusion(False)
            assert describe_layout(shape, itemsize, threads)["fused"] is None
            _tuning.set_fusion(True)
    finally:
        _tuning.set_fusion(True)
        _tuning.set_fusion_limits(None)


def test_describe_layout_checks_its_itemsize_and_threads():
    for itemsize, threads in ((3, 1), (4, 0), (16, 1)):
        with pytest.raises(ValueError, match="itemsize"):
            describe_layout((4, 8, 16), itemsize, threads)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(37, 1500), (21, 3000), (5, 700, 1)], ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_wide_rows_go_by_chunks_with_the_bits_of_whole_rows(level, dtype, shape, relu, rng):
    """Rows whose per-column coefficients outgrow L1 are normalised (and the backward's dx
    computed) a chunk of columns at a time down blocks of rows; elementwise passes, so the same
    bits as the planar layout's runs of one channel (and as any other order)."""
    K = kernels_of(level)
    c = shape[1]
    x = make_input(shape, dtype, rng, offset=3.0)
    pdt = np.float64 if dtype == np.float64 else np.float32
    w, b = per_channel(rng, c, pdt), per_channel(rng, c, pdt, -1, 1)
    rm, rv = per_channel(rng, c, pdt, -1, 1), per_channel(rng, c, pdt, 0.5, 2)
    dy = make_input(shape, dtype, rng)
    sums = rng.standard_normal(c) * 10, rng.standard_normal(c) * 10
    outputs = []
    for layout in (None, "planar"):
        with forced_layout(layout):
            y, mean, invstd = np.empty_like(x), np.empty(c), np.empty(c)
            K.forward_eval(x, y, w, b, rm, rv, 1e-5, mean, invstd, 2, relu)
            # the training backward's elementwise pass, from given sums
            dx = np.empty_like(x)
            K.backward_from_sums(dy, x, dx, w, mean, invstd, *sums, float(shape[0]), 2,
                                 y if relu else None)
            outputs.append((y, dx))
    for by_rows, planar in zip(*outputs):
        np.testing.assert_array_equal(by_rows, planar)


def aligned_views(shape, dtype, offsets):
    """Arrays of `shape` starting `offsets` values past a 4 KiB boundary, one per offset."""
    n = int(np.prod(shape))
    item = np.dtype(dtype).itemsize
    views = []
    for offset in offsets:
        raw = np.zeros(n + (8192 + offset * item) // item + 1, dtype)
        start = (-raw.ctypes.data % 4096) // item + offset
        views.append(raw[start:start + n].reshape(shape))
    return views


# Shapes whose row passes take four rows at a time: whole rows of four and a short last
# group (7 and 13 rows), rows of several samples with a shorter last row ((13, 77, 1, 1): 6
# rows of 154 columns and one of 77; (40, 5, 3): 4 rows of 9 samples and one of 4),
# per-column coefficients expanded from channels ((40, 48, 2, 3)), row lengths that leave an
# eight-column step and single columns after the widest steps (154, 1000, 300), rows chunked
# for their coefficients ((33, 2100)), and two threads ((130, 1000), (33, 2100)).
ROWS_BY_FOUR_SHAPES = [(7, 300), (13, 77, 1, 1), (40, 5, 3), (40, 48, 2, 3), (130, 1000),
                       (33, 2100), (64, 100)]


def assert_same_bits(got, want, what):
    """got and want bit for bit, but for NaN's sign and payload (which NaN operand an
    instruction passes on is the compiler's choice of operand order): NaN in the same places."""
    got_nan, want_nan = np.isnan(got), np.isnan(want)
    np.testing.assert_array_equal(got_nan, want_nan, err_msg=f"{what}: NaN in other places")
    np.testing.assert_array_equal(got[~got_nan].view(np.uint32), want[~want_nan].view(np.uint32),
                                  err_msg=f"{what}: other bits")


def test_rows_by_four_are_left_to_small_arrays_of_rows_not_a_page_long():
    from fastbn import _tuning
    for level in LEVELS:
        K = kernels_of(level)
        built = K.rows_by_four_built()
        assert K.describe_layout((64, 100))["rows_by_four"] == built
        assert K.describe_layout((64, 100), itemsize=2)["rows_by_four"] is False
        assert K.describe_layout((3, 100))["rows_by_four"] is False  # (fewer than four rows)
        for shape in [(8, 1024), (128, 2048, 1, 1), (1024, 600), (16, 64, 56, 56)]:
            # rows of 4 and 8 KiB; 2.3 MiB; the planar layout
            assert K.describe_layout(shape)["rows_by_four"] is False, shape
        assert _tuning.ROWS_BY_FOUR_MAX_BYTES == 2 << 20
        try:
            _tuning.set_rows_by_four_max_bytes(4 << 20)
            assert K.describe_layout((1024, 600))["rows_by_four"] == built
        finally:
            _tuning.set_rows_by_four_max_bytes(None)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", ROWS_BY_FOUR_SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_rows_by_four_have_the_bits_of_one_row_at_a_time(level, shape, relu, rng):
    """The columns layout's row passes go four float32 rows at a time where the build has
    fastbn_affine_rows4 and fastbn_grad_input_rows4 and _tuning allows it: the same bits as
    one row at a time (NaN's sign and payload aside), in eval, in training and in the
    training backward, each also with split_center's factors of 1/2 for centers near the
    float32 limit among factors of 1, fused or not, on 1 and 2 threads, with the output at
    distances from x modulo 4 KiB that make the
    columns go up (0, 2400 and 4000 bytes) and down (4, 16 and 64; the backward's dx, against
    x and dy 32 bytes after it, at 64 bytes down, 2400 and 4000 up)."""
    from fastbn import _tuning
    for bad in (-1, 1.5, "1", True, 2 ** 62):
        with pytest.raises(ValueError):
            _tuning.set_rows_by_four_max_bytes(bad)
    K = kernels_of(level)
    c = shape[1]
    ys = aligned_views(shape, np.float32, [0, 1, 4, 16, 600, 1000])
    x, dy = aligned_views(shape, np.float32, [0, 8])
    x[...] = make_input(shape, np.float32, rng, offset=3.0)
    dy[...] = make_input(shape, np.float32, rng)
    x.reshape(-1)[5:9] = [np.nan, -0.0, np.inf, -np.inf]  # (what ReLU must let through or zero)
    huge = x.copy()  # channels 0 and 2 centred near the float32 limit: factor 1/2 there
    huge[:, 0] = huge[:, 0] * 1e29 + 3e32
    huge[:, 2] = 2e32
    w, b = per_channel(rng, c, np.float32), per_channel(rng, c, np.float32, -1, 1)
    rm, rv = per_channel(rng, c, np.float32, -1, 1), per_channel(rng, c, np.float32, 0.5, 2)
    rm_huge = rm.copy()
    rm_huge[[0, 2]] = [3e32, 2e32]
    results = {}
    try:
        for limit in (0, None, 2 ** 61):  # one row at a time, the default, four everywhere
            _tuning.set_rows_by_four_max_bytes(limit)
            if limit is not None:
                assert K.describe_layout(shape)["rows_by_four"] == (
                    limit > 0 and K.rows_by_four_built())
            for threads in (1, 2):
                for y in ys:
                    K.forward_eval(x, y, w, b, rm, rv, 1e-5, np.empty(c), np.empty(c), threads,
                                   relu)
                    results.setdefault(("eval", threads), []).append(y.copy())
                    K.forward_eval(huge, y, w, b, rm_huge, rv, 1e-5, np.empty(c), np.empty(c),
                                   threads, relu)
                    results.setdefault(("eval, factors", threads), []).append(y.copy())
                for fused in (False, True):
                    with forced_fusion(fused):
                        for data, name in ((x, ""), (huge, ", factors")):
                            for y, dx in zip(ys[:3], ys[3:]):
                                mean, invstd = np.empty(c), np.empty(c)
                                K.forward_train(data, y, w, b, None, None, 0.1, 1e-5, mean,
                                                invstd, threads, relu)
                                results.setdefault(("train" + name, fused, threads), []).append(
                                    y.copy())
                                # the training backward's grad_input rows, dx placed against
                                # x and dy both ways
                                gw, gb = np.empty(c, np.float32), np.empty(c, np.float32)
                                K.backward(dy, data, dx, w, mean, invstd, gw, gb, True, threads,
                                           y if relu else None)
                                results.setdefault(("backward" + name, fused, threads),
                                                   []).append(np.concatenate([dx.ravel(), gw, gb]))
    finally:
        _tuning.set_rows_by_four_max_bytes(None)
    assert 0 < _tuning.ROWS_BY_FOUR_MAX_BYTES < 1 << 30
    for case, outputs in results.items():
        for got in outputs[1:]:
            assert_same_bits(got, outputs[0], f"{case}: rows by four and one row")
    # (one row at a time is the compiled loop, held to the reference by the tests above; the
    # channel centred near the limit, through its factor of 1/2, is held to it here)
    got = results[("eval, factors", 1)][0][:, 0]
    want = ((huge[:, 0].astype(np.float64) - np.float64(rm_huge[0])) / np.sqrt(np.float64(rv[0]) + 1e-5)
            * np.float64(w[0]) + np.float64(b[0]))
    if relu:
        want = np.where(want < 0, 0.0, want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.nanmax(np.abs(want)))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", [(3, 5, 37, 29), (2, 3, 1000), (4, 2, 8, 64), (4, 64, 300),
                                   (3, 7, 3200), (300, 37), (97, 1024), (64, 3, 1, 1),
                                   (40, 16, 3, 3)], ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_streamed_outputs_have_the_bits_of_ordinary_stores(level, shape, relu, rng):
    """A float32 output at least _tuning.stream_min_bytes long is written with streaming stores
    (past the caches): the same values as the compiled loop's, whatever the run's alignment,
    in eval, in training and through the functional elementwise pass, on 1 and 2 threads
    (the planar shapes (4, 64, 300) and (3, 7, 3200) are large enough for two, each taking a
    share of the runs, 128 and 10 or 11, fenced once at its end).  The last four shapes are
    walked in rows with per-column coefficients (the columns layout: rows of 37 and 1,024
    columns, 1x1 and 3x3 planes), every row from its own alignment, (97, 1024) in two
    threads' shares of row blocks.  Fusion is off: a fused training forward normalises
    channel by channel (or tile by tile) from cache and never streams."""
    from fastbn import _tuning
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(ValueError):
            _tuning.set_stream_min_bytes(bad)
    K = kernels_of(level)
    c = shape[1]
    x = make_input(shape, np.float32, rng, offset=3.0)
    # (what ReLU must let through or zero) at the start, where runs and rows begin with
    # single values; the eval input has them every 61 values too, in the vector steps (a
    # training forward would turn the channels they fall in into NaN)
    specials = np.array([np.nan, -0.0, np.inf, -np.inf], np.float32)
    x.reshape(-1)[5:9] = specials
    x_eval = x.copy()
    x_eval.reshape(-1)[40::61] = np.resize(specials, x_eval.reshape(-1)[40::61].size)
    w, b = per_channel(rng, c, np.float32), per_channel(rng, c, np.float32, -1, 1)
    huge = x_eval.copy()  # channel 0 centred near the float32 limit: its factor of 1/2 runs too
    huge[:, 0] = huge[:, 0] * 1e29 + 3e32
    rm_huge = np.zeros(c, np.float32)
    rm_huge[0] = 3e32
    y_apart = aligned_views(shape, np.float32, [1, 7])  # (outputs 4 and 28 bytes off a line)
    results = []
    try:
        for limit in (None, 0):  # the default (no streaming at this size), then every output
            _tuning.set_stream_min_bytes(limit)
            for threads in (1, 2):
                streamed = _tuning.streamed_passes()
                mean, invstd, y = np.empty(c), np.empty(c), np.empty_like(x)
                rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
                with forced_fusion(False):
                    K.forward_train(x, y, w, b, rm, rv, 0.1, 1e-5, mean, invstd, threads, relu)
                y_eval = np.empty_like(x)
                K.forward_eval(x_eval, y_eval, w, b, rm, rv, 1e-5, np.empty(c), np.empty(c), threads,
                               relu)
                for y_off in y_apart:
                    K.forward_eval(huge, y_off, w, b, rm_huge, np.ones(c, np.float32), 1e-5,
                                   np.empty(c), np.empty(c), threads, relu)
                results.append((y, y_eval, rm, rv) + tuple(v.copy() for v in y_apart))
                # every pass streamed where the build streams and the switch says so
                expected = 4 if limit == 0 and K.stream_stores() else 0
                assert _tuning.streamed_passes() - streamed == expected
    finally:
        _tuning.set_stream_min_bytes(None)
    assert _tuning.STREAM_MIN_BYTES >= 1 << 20
    for run in results[1:]:
        for name, got, want in zip(("train y", "eval y", "running_mean", "running_var",
                                    "eval y, factors, 4 B off", "eval y, factors, 28 B off"),
                                   run, results[0]):
            np.testing.assert_array_equal(got, want, err_msg=f"{name}: streamed and ordinary stores differ")
