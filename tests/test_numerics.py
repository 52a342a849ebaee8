"""Numerics on adversarial data: large mean offsets, tiny variances, constant channels,
denormals, values near float32's largest, and non-finite values.

Errors are measured against an accurate reference: for float32 data the float64 one
(fastbn._reference); for float64 data, where float64 itself is the question, a reference
that first subtracts the (exactly representable) offset, which is exact by Sterbenz's lemma,
and then computes in long double.  Where torch 2.13 is installed, fastbn's errors are
compared with torch's NCHW path (BatchNorm2d on contiguous input), its (N, C) path
(BatchNorm1d on 2-D input) and its channels-last path; the measured errors are in the
assertion messages (and printed: ``pytest -s tests/test_numerics.py``).

"Correct" near the ends of the float32 range means: the output is finite wherever the
float64 reference, rounded to float32, is finite, and within the usual tolerance of it.
Tests that once caught kernel defects say so, and keep their reproducers.
"""

import numpy as np
import pytest

from fastbn import _reference as ref
from fastbn import functional as F

from conftest import assert_close, data_error, forced_layout

F32 = np.float32
F32_MAX = float(np.finfo(F32).max)
ULP32 = 2.0 ** -23  # float32 epsilon: the spacing of floats in [1, 2)


def output_error(y, y_ref):
    return float(np.max(np.abs(np.asarray(y, np.float64) - np.asarray(y_ref, np.float64))))


def offset_data(shape, offset, dtype=F32, seed=0, std=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * std + offset).astype(dtype)


# ---------------------------------------------------------------------------------------------
# float32: large offsets and tiny variances, every layout, against the float64 reference
# ---------------------------------------------------------------------------------------------

ADVERSARIAL = {
    # name: (shape, offset, std)
    "offset 1e2": ((64, 8, 40), 1e2, 1.0),
    "offset 1e4": ((64, 8, 40), 1e4, 1.0),
    "offset 1e6": ((64, 8, 40), 1e6, 1.0),
    "offset 1e6, (N, C)": ((4096, 8), 1e6, 1.0),
    "offset 1e6, long planes": ((2, 4, 20000), 1e6, 1.0),
    "tiny variance: 1000 +- 0.01": ((64, 8, 40), 1e3, 1e-2),
    "tiny variance: 1 +- 1e-6": ((256, 4, 16), 1.0, 1e-6),
    "tiny values: 1e-30 +- 1e-32": ((64, 8, 40), 1e-30, 1e-32),
    "huge values: 1e37 +- 1e33": ((64, 8, 40), 1e37, 1e33),
}


def adversarial_case(name, layout):
    """(x, eps, forward results, reference forward results) of an ADVERSARIAL case."""
    shape, offset, std = ADVERSARIAL[name]
    x = offset_data(shape, offset, std=std)
    # eps well below the variance where the variance is tiny, so that it is what is tested
    eps = min(1e-5, 1e-4 * float(np.var(x.astype(np.float64))))
    rm, rv = np.zeros(shape[1], F32), np.ones(shape[1], F32)
    with forced_layout(layout):
        y, mean, invstd = F.batch_norm_forward(x, rm, rv, training=True, eps=eps)
    rm_ref, rv_ref = np.zeros(shape[1]), np.ones(shape[1])
    y_ref, mean_ref, invstd_ref = ref.batch_norm_forward(x, rm_ref, rv_ref, training=True, eps=eps)
    return x, eps, (y, mean, invstd, rm, rv), (y_ref, mean_ref, invstd_ref, rm_ref, rv_ref)


LAYOUTS = pytest.mark.parametrize("layout", [None, "planar", "columns"])


@LAYOUTS
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_float32_adversarial_data_forward_matches_the_float64_reference(name, layout):
    shape, offset, std = ADVERSARIAL[name]
    x, eps, (y, mean, invstd, rm, rv), (y_ref, mean_ref, invstd_ref, rm_ref, rv_ref) = adversarial_case(name, layout)
    # The output is O(1): its rounding to float32 is 2**-24 relative, and the statistics are
    # float64-accurate, so the error must be a few float32 ulps of the output, not |mean| / std.
    y_scale = float(np.max(np.abs(y_ref)))
    err = output_error(y, y_ref)
    assert err <= 4 * ULP32 * y_scale, f"{name}: output error {err:.3g} = {err / (ULP32 * y_scale):.1f} ulps of |y|max {y_scale:.3g}"
    assert_close(mean, mean_ref, np.float64, f"{name}: mean", scale=abs(offset) + std)
    assert_close(invstd, invstd_ref, np.float64, f"{name}: invstd", scale=float(np.max(invstd_ref)) * 1e3)
    assert_close(rm, rm_ref, F32, f"{name}: running_mean")
    # (a variance beyond float32's range, 1e66 for std 1e33, is inf in a float32 buffer)
    with np.errstate(over="ignore", invalid="ignore"):
        assert_close(rv, rv_ref.astype(F32), F32, f"{name}: running_var")


@LAYOUTS
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_float32_adversarial_data_backward_matches_the_float64_reference(name, layout):
    # Once kernel defects, kept as regressions (the backward's coefficient of x - mean used to
    # be weight * invstd**3 * ..., rounded to float32):
    #   x = (rng.standard_normal((64, 8, 40)) * 1e-32 + 1e-30).astype(np.float32), eps = 1e-68:
    #       grad_input was inf where the reference's is ~4e32;
    #   x = (rng.standard_normal((64, 8, 40)) * 1e33 + 1e37).astype(np.float32), eps = 1e-5:
    #       grad_input was 3.6% off (3e5 ulps): the xhat * mean(dy * xhat) term was lost.
    x, eps, (y, mean, invstd, _, _), (_, mean_ref, invstd_ref, _, _) = adversarial_case(name, layout)
    dy = offset_data(x.shape, 0.0, seed=1)
    with forced_layout(layout), np.errstate(all="ignore"):
        dx = F.batch_norm_backward(dy, x, mean, invstd, None, True)[0]
    dx_ref = ref.batch_norm_backward(dy, x, mean_ref, invstd_ref, None, True)[0]
    dx_scale = float(np.max(np.abs(invstd_ref)) * np.max(np.abs(dy)))
    dx_err = output_error(dx, dx_ref)
    assert dx_err <= 8 * ULP32 * dx_scale, f"{name}: grad_input error {dx_err:.3g} = {dx_err / (ULP32 * dx_scale):.1f} ulps of {dx_scale:.3g}"


@pytest.mark.parametrize("offset", [0.0, 1e6, 1e10, 1e13, 1e15])
def test_float64_keeps_full_precision_at_any_offset(offset):
    # A float64 two-pass computation loses |mean| / std ulps to cancellation (so does torch);
    # fastbn's split mean keeps the output within a few ulps of the exact result.
    x = offset_data((64, 4, 100), offset, np.float64, std=3.0)
    d = (x - offset).astype(np.longdouble)  # exact: x and offset are within a factor 2
    mean = d.mean(axis=(0, 2), keepdims=True)
    exact = (d - mean) / np.sqrt(((d - mean) ** 2).mean(axis=(0, 2), keepdims=True) + np.longdouble(1e-5))
    ulp = np.finfo(np.float64).eps * float(np.max(np.abs(exact)))
    err = float(np.max(np.abs(F.batch_norm(x, None, None, training=True).astype(np.longdouble) - exact)))
    err_two_pass = float(np.max(np.abs(ref.batch_norm(x, None, None, training=True).astype(np.longdouble) - exact)))
    print(f"float64, offset {offset:g}: fastbn {err:.3g} ({err / ulp:.1f} ulp), two-pass float64 {err_two_pass:.3g}")
    assert err <= 4 * ulp, f"offset {offset:g}: error {err:.3g} = {err / ulp:.1f} ulps (two-pass float64: {err_two_pass:.3g})"


# ---------------------------------------------------------------------------------------------
# The running statistics' promised accuracy (the performance redesign's contract): float32
# buffers within 1e-6 relative of the float64 reference on data offset by 1e4, float64 ones
# within 1e-13 relative of the exact statistics on data offset up to 1e10, in every layout
# ---------------------------------------------------------------------------------------------

def exact_running(x, offset, momentum=0.1):
    """The running buffers after one training step from (0, 1) with the modules' defaults
    (momentum 0.1, the unbiased variance), from statistics computed in long double on
    x - offset (exact where x and offset are within a factor 2, Sterbenz)."""
    axes = (0,) + tuple(range(2, x.ndim))
    d = np.asarray(x, np.float64).astype(np.longdouble) - np.longdouble(offset)
    count = x.size // x.shape[1]
    mean = d.mean(axis=axes)
    var = ((d - mean.reshape((1, -1) + (1,) * (x.ndim - 2))) ** 2).sum(axis=axes) / (count - 1)
    rm = momentum * (mean + np.longdouble(offset))
    rv = (1 - momentum) + momentum * var
    return rm, rv


@pytest.mark.parametrize("layout", [None, "planar", "columns"])
@pytest.mark.parametrize("shape", [(64, 8, 40), (4096, 8), (32, 16, 1, 1), (8, 4, 7, 7)], ids=str)
@pytest.mark.parametrize("dtype, offset, rtol", [(np.float32, 1e4, 1e-6),
                                                 (np.float64, 1e6, 1e-13),
                                                 (np.float64, 1e10, 1e-13)])
def test_running_statistics_keep_the_promised_accuracy_on_offset_data(layout, shape, dtype,
                                                                      offset, rtol):
    import fastbn
    x = offset_data(shape, offset, dtype, std=3.0)
    bn = {2: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d, 3: fastbn.BatchNorm1d}[x.ndim](
        shape[1], dtype=dtype)
    with forced_layout(layout):
        bn(x)
    rm_exact, rv_exact = exact_running(x, offset)
    for name, got, want in (("running_mean", bn.running_mean, rm_exact),
                            ("running_var", bn.running_var, rv_exact)):
        assert got.dtype == dtype
        rel = np.max(np.abs((got.astype(np.longdouble) - want) / want))
        assert rel <= rtol, f"{np.dtype(dtype).name}, offset {offset:g}, {name}: {float(rel):.3g} relative > {rtol:g}"


# ---------------------------------------------------------------------------------------------
# Constant channels normalise to exactly 0 (then the bias)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [None, "planar", "columns"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 3, 300), (300, 3), (3, 3, 5, 5), (2, 3, 9000), (1, 3, 2)], ids=str)
def test_a_constant_channel_normalises_to_exactly_zero(shape, dtype, layout):
    finfo = np.finfo(dtype)
    values = [0.0, 1.0, -1234.5678, 3e7, float(finfo.tiny) / 8, -float(finfo.max), float(finfo.max)]
    x = np.empty(shape, dtype)
    for k, v in enumerate(values):
        x[:, 0] = v  # channel 0 constant at v; channel 1 constant at -v; channel 2 varies
        x[:, 1] = -v
        x[:, 2] = np.linspace(-1, 1, x[:, 2].size).reshape(x[:, 2].shape) * (k + 1)
        bias = np.array([0.25, -0.5, 0.0], dtype)
        with forced_layout(layout):
            y, mean, invstd = F.batch_norm_forward(x, None, None, np.full(3, 3.0, dtype), bias, training=True)
            dx = F.batch_norm_backward(np.ones_like(x), x, mean, invstd, None, True)[0]
        v = x[0, 0].flat[0]  # v in the data's dtype
        np.testing.assert_array_equal(y[:, 0], bias[0], err_msg=f"constant {v!r}: not exactly the bias")
        np.testing.assert_array_equal(y[:, 1], bias[1], err_msg=f"constant {-v!r}: not exactly the bias")
        assert mean[0] == v and mean[1] == -v, f"the mean of a constant {v!r} channel is {mean[0]!r}"
        np.testing.assert_array_equal(dx[:, :2], 0, err_msg=f"constant {v!r}: grad_input of a uniform dy")


# ---------------------------------------------------------------------------------------------
# Denormals and the ends of the float32 range
# ---------------------------------------------------------------------------------------------

def check_against_reference(x, what, eps=1e-5, training=True, rm=None, rv=None):
    """fastbn's output is finite wherever the float64 reference rounded to float32 is, and
    within tolerance of it; returns the output."""
    with np.errstate(all="ignore"):
        y_ref = ref.batch_norm(x, None if rm is None else rm.astype(np.float64),
                               None if rv is None else rv.astype(np.float64), training=training, eps=eps)
        representable = np.isfinite(y_ref.astype(x.dtype))
        y = F.batch_norm(x, rm, rv, training=training, eps=eps)
    bad = representable & ~np.isfinite(y)
    assert not bad.any(), (f"{what}: {int(bad.sum())} outputs are {np.unique(y[bad])} where the reference "
                           f"gives e.g. {y_ref[bad][:3]} (finite in {x.dtype})")
    axes = (0,) + tuple(range(2, x.ndim))
    assert_close(np.where(representable, y, 0), np.where(representable, y_ref, 0), x.dtype, what,
                 atol=data_error(x, 1 / np.sqrt(np.maximum(x.astype(np.float64).var(axis=axes), 0) + eps)))
    return y


@pytest.mark.parametrize("layout", [None, "planar", "columns"])
def test_denormal_data(layout):
    # Data of float32 denormals (around 1e-40, 20 significant bits at most): with the default
    # eps the output is about 1e-38, with eps = 1e-70 about 1e-5; both must be finite and match
    # the reference, with no flush to zero of the inputs.  (Normalising them to O(1) needs
    # eps < 1e-80 and an invstd beyond float32's range: test_tiny_eps_on_denormal_data...)
    x = offset_data((16, 3, 40), 0.0, std=1e-40)
    assert np.any((x != 0) & (np.abs(x) < np.finfo(F32).tiny)), "no denormals in the data"
    with forced_layout(layout):
        y = check_against_reference(x, "denormal data, eps=1e-5")
        assert np.any(y != 0), "denormal inputs were flushed to zero"
        y = check_against_reference(x, "denormal data, eps=1e-70", eps=1e-70)
        assert 1e-6 < float(np.std(y.astype(np.float64))) < 1e-4
        check_against_reference(x, "denormal data, eval", training=False,
                                rm=np.zeros(3, F32), rv=np.full(3, 1e-44, F32), eps=0.0)


@pytest.mark.parametrize("layout", [None, "planar", "columns"])
def test_values_near_float32_max_with_a_small_spread(layout):
    # Everything near 3e38 with deviations of 1e34: the statistics are float64 (no overflow
    # of squares), and x - mean is small.
    x = offset_data((16, 3, 40), 3e38, std=1e34)
    assert np.isfinite(x).all()
    with forced_layout(layout):
        check_against_reference(x, "near float32 max, small spread")
        check_against_reference(-x, "near -float32 max, small spread")


@pytest.mark.parametrize("layout", [None, "planar", "columns"])
def test_values_spanning_both_ends_of_float32_normalise_finitely(layout):
    # Once a kernel defect, kept as a regression: F.batch_norm(np.array([[3.4e38], [-3.4e38], [3.4e38], [3.4e38]], np.float32),
    #                          None, None, training=True) -> [0.577, -inf, 0.577, 0.577]
    # (the reference: [0.577, -1.732, 0.577, 0.577]; torch gives NaN or 0 here).
    x = np.tile(np.array([F32_MAX, -F32_MAX, F32_MAX, F32_MAX], F32).reshape(4, 1, 1), (1, 2, 300))
    with forced_layout(layout):
        check_against_reference(x, "values at +-float32 max")


def test_eval_with_running_mean_far_from_the_data_normalises_finitely():
    # Once a kernel defect, kept as a regression: F.batch_norm(np.array([[-3.4e38]], np.float32), np.array([1.7e38], np.float32),
    #                          np.array([3.4e38], np.float32)) -> -inf; the reference: -2.77e19.
    x = np.array([[F32_MAX], [-F32_MAX]], F32)
    check_against_reference(x, "eval, running mean at max/2", training=False,
                            rm=np.array([F32_MAX / 2], F32), rv=np.array([F32_MAX], F32))


def test_tiny_eps_on_denormal_data_does_not_overflow_the_scale():
    # Once a kernel defect, kept as a regression: x = np.random.default_rng(0).standard_normal((16, 3, 20)).astype(np.float32) * 1e-40
    #             F.batch_norm(x, None, None, training=True, eps=1e-80) -> inf/NaN; the reference is O(1).
    # (An eps below float32's own range is unusual: listed for completeness.)
    x = offset_data((16, 3, 40), 0.0, std=1e-40)
    check_against_reference(x, "denormal data, eps=1e-80", eps=1e-80)


@pytest.mark.parametrize("shape", [(64, 3), (300, 3, 7), (4, 3, 500), (64, 3, 3, 3)], ids=str)
@pytest.mark.parametrize("layout", [None, "planar", "columns"])
@pytest.mark.parametrize("where", ["first", "later"])
def test_a_channel_with_an_infinity_has_an_infinite_mean_as_in_torch(shape, layout, where):
    # Once a kernel defect, kept as a regression: x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32);
    #             x[10, 2] = np.inf; rm = np.zeros(3, np.float32)
    #             F.batch_norm(x, rm, np.ones(3, np.float32), training=True); rm[2] -> nan (torch: inf)
    # The +inf may be a chunk's first value (its shift) or any other.
    x = offset_data(shape, 0.0)
    x[(0 if where == "first" else 10 % shape[0], 2) + (0,) * (len(shape) - 2)] = np.inf
    rm, rv = np.zeros(3, F32), np.ones(3, F32)
    with forced_layout(layout):
        y, mean, _ = F.batch_norm_forward(x, rm, rv, training=True, momentum=0.5)
    assert np.isnan(y[:, 2]).all() and np.isnan(rv[2])
    assert mean[2] == np.inf and rm[2] == np.inf, f"save_mean {mean[2]}, running_mean {rm[2]}"
    assert np.isfinite(y[:, :2]).all() and np.isfinite(mean[:2]).all(), "other channels were touched"


def test_float64_data_whose_squares_overflow_is_not_finite_garbage():
    # float64 deviations beyond ~1e154 overflow their squares in any float64 method: the
    # channel's variance is then inf or NaN, never a finite wrong value that would normalise
    # to plausible numbers.  (The float64 reference does the same; a long double one would not.)
    x = np.zeros((4, 2, 3))
    x[:, 0] = np.array([1e200, -1e200, 1e200, -1e200]).reshape(4, 1)
    x[:, 1] = np.arange(12.0).reshape(4, 3)
    with np.errstate(all="ignore"):
        _, mean, invstd = F.batch_norm_forward(x, None, None, training=True)
    assert invstd[0] == 0 or np.isnan(invstd[0]), f"invstd of an overflowing channel is {invstd[0]}"
    np.testing.assert_allclose(invstd[1], 1 / np.sqrt(np.var(x[:, 1]) + 1e-5), rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# Against torch 2.13
# ---------------------------------------------------------------------------------------------

TORCH_OFFSETS = [0.0, 1e2, 1e4, 1e6]


def _torch_errors(offset):
    torch = pytest.importorskip("torch")
    x4 = offset_data((32, 16, 16, 16), offset, seed=3)
    x2 = offset_data((4096, 16), offset, seed=4)
    dy4 = offset_data(x4.shape, 0.0, seed=5)
    y_ref, mean_ref, invstd_ref = ref.batch_norm_forward(x4, None, None, training=True)
    dx_ref = ref.batch_norm_backward(dy4, x4, mean_ref, invstd_ref, None, True)[0]
    y2_ref = ref.batch_norm(x2, None, None, training=True)

    y, mean, invstd = F.batch_norm_forward(x4, None, None, training=True)
    dx = F.batch_norm_backward(dy4, x4, mean, invstd, None, True)[0]
    errors = {"fastbn NCHW": output_error(y, y_ref), "fastbn NCHW grad": output_error(dx, dx_ref),
              "fastbn (N, C)": output_error(F.batch_norm(x2, None, None, training=True), y2_ref)}
    for name, fmt in [("NCHW", torch.contiguous_format), ("channels-last", torch.channels_last)]:
        t = torch.from_numpy(x4).contiguous(memory_format=fmt).requires_grad_(True)
        out = torch.nn.functional.batch_norm(t, None, None, training=True)
        out.backward(torch.from_numpy(dy4).contiguous(memory_format=fmt))
        errors[f"torch {name}"] = output_error(out.detach().contiguous().numpy(), y_ref)
        errors[f"torch {name} grad"] = output_error(t.grad.contiguous().numpy(), dx_ref)
    errors["torch (N, C)"] = output_error(
        torch.nn.functional.batch_norm(torch.from_numpy(x2), None, None, training=True).numpy(), y2_ref)
    scale = float(max(np.max(np.abs(y_ref)), np.max(np.abs(y2_ref))))
    return errors, scale


@pytest.mark.parametrize("offset", TORCH_OFFSETS)
def test_accuracy_at_least_torch_nchw_and_far_better_than_its_other_paths(offset):
    errors, scale = _torch_errors(offset)
    table = ", ".join(f"{k} {v:.3g}" for k, v in errors.items())
    print(f"offset {offset:g}: {table}")
    floor = ULP32 * scale  # one float32 ulp of the output: the rounding any method makes
    assert errors["fastbn NCHW"] <= max(errors["torch NCHW"], floor), table
    assert errors["fastbn NCHW grad"] <= max(errors["torch NCHW grad"], 2 * floor), table
    assert errors["fastbn (N, C)"] <= 2 * floor and errors["fastbn NCHW"] <= 2 * floor, table
    if offset >= 1e2:
        # torch's (N, C) and channels-last paths lose |offset| / std ulps to cancellation
        for path in ("torch (N, C)", "torch channels-last", "torch channels-last grad"):
            ours = errors["fastbn (N, C)"] if path == "torch (N, C)" else errors["fastbn NCHW" + (" grad" if "grad" in path else "")]
            assert ours * 10 <= errors[path], f"{path} is not far worse than fastbn: {table}"
