"""Shared test data and helpers.

Inputs are generated, not hand-written (bottleneck's ``array_generator`` is the model): shapes
that exercise both kernel layouts (long planes; short planes and BatchNorm1d's (N, C), with
several samples per row and a short last row), odd sizes, C = 1, N = 1, both dtypes, data
with large offsets, and non-contiguous views.
"""

import contextlib
import importlib
import zlib

import numpy as np
import pytest

from fastbn import _dispatch

DTYPES = (np.float32, np.float64)

# Shapes by input rank; together they cover the planar layout (S >= 256, one and several
# segments per plane) and the columns layout (one or several samples per row, with and
# without a short last row), as fastbn._kernels.describe_layout reports.
SHAPES = {
    2: [(2, 1), (5, 3), (64, 7), (1000, 3), (33, 130), (3, 300)],
    3: [(2, 3, 5), (1, 4, 7), (4, 2, 300), (3, 2, 9000), (2, 1, 17000), (9, 5, 1)],
    4: [(2, 3, 4, 5), (1, 2, 3, 4), (3, 5, 20, 20), (2, 1, 16, 17), (5, 7, 1, 1), (2, 3, 7, 7)],
    5: [(2, 3, 2, 3, 4), (1, 2, 5, 8, 8), (3, 1, 2, 2, 2)],
}
ALL_SHAPES = [shape for shapes in SHAPES.values() for shape in shapes]

# Per-dtype tolerances against the float64 reference, relative to the result's scale.
TOLERANCE = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-12,
             # float16 data is computed in float32 and rounded: half an ulp, 2**-11, and a margin
             np.dtype(np.float16): 2.0 ** -10}


def kernel_levels():
    """SIMD levels this machine runs and this build has (each is tested)."""
    return _dispatch.available_levels()


def kernels_of(level):
    return importlib.import_module(_dispatch.MODULE_OF_LEVEL[level])


def make_input(shape, dtype, rng, offset=0.0, scale=1.0, kind="normal"):
    """Random data of a shape and dtype: per-channel offsets around `offset`, spread `scale`."""
    x = rng.standard_normal(shape) * scale
    if kind == "uniform":
        x = rng.uniform(-1, 1, shape) * scale
    if len(shape) > 1 and shape[1] > 0:
        per_channel = rng.uniform(-1, 1, shape[1]) * scale * 3
        x = x + per_channel.reshape((1, -1) + (1,) * (len(shape) - 2))
    return (x + offset).astype(dtype)


def non_contiguous(x):
    """The same values as x in a non-contiguous (strided) view."""
    padded = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    padded[..., ::2] = x
    view = padded[..., ::2]
    assert not view.flags.c_contiguous or x.size <= 1
    return view


def assert_close(actual, expected, dtype, what, scale=None, atol=0.0):
    """|actual - expected| <= tol[dtype] * scale + atol, scale defaulting to max(1, max|expected|)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.size == 0:
        return
    if scale is None:
        finite = expected[np.isfinite(expected)]
        scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    tol = TOLERANCE[np.dtype(dtype)] * scale + atol
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN pattern")
    err = np.max(np.abs(np.nan_to_num(actual - expected)))
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g} (dtype {np.dtype(dtype)}, scale {scale:.3g})"


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name, so failures reproduce."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


def data_error(x, invstd, weight=None):
    """The error any float64 method makes on outputs (x - mean) * invstd * weight: a few ulps of
    the data's magnitude, |x| * 2**-52, carried through the scale."""
    x = np.asarray(x, dtype=np.float64)
    scale = np.abs(np.asarray(invstd, dtype=np.float64))
    if weight is not None:
        scale = scale * np.abs(np.asarray(weight, dtype=np.float64))
    return 16 * np.finfo(np.float64).eps * (np.max(np.abs(x)) if x.size else 0.0) * (np.max(scale) if scale.size else 0.0)


# ---------------------------------------------------------------------------------------------
# State snapshots: "a rejected call changes nothing", checked the same way everywhere
# ---------------------------------------------------------------------------------------------

_MODULE_ATTRIBUTES = ("training", "eps", "momentum", "num_features", "affine", "track_running_stats")


def snapshot_state(*objects, state_dict_only=False):
    """Copies of everything a call could change in `objects` (modules and arrays).

    For a module: every array of its state_dict (parameters, buffers, num_batches_tracked),
    grad_weight and grad_bias, its mode and hyperparameters, and the saved forward (by
    identity); with ``state_dict_only``, the state_dict's arrays alone (for calls that may
    change the rest, an eval forward replacing the saved one).  For an array: a copy of it.
    Compare with :func:`assert_state_unchanged`.
    """
    records = []
    for obj in objects:
        if isinstance(obj, np.ndarray):
            records.append((obj, obj.copy()))
            continue
        if state_dict_only:
            records.append((obj, {k: np.array(v, copy=True) for k, v in obj.state_dict().items()}))
            continue
        arrays = {name: np.array(value, copy=True) for name, value in obj.state_dict().items()}
        for name in ("grad_weight", "grad_bias"):
            value = getattr(obj, name)
            arrays[name] = None if value is None else np.array(value, copy=True)
        attributes = {name: getattr(obj, name) for name in _MODULE_ATTRIBUTES}
        records.append((obj, (arrays, attributes, obj._saved)))
    return records


def _assert_same_array(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{what}: became {actual.dtype}{actual.shape}, was {expected.dtype}{expected.shape}"
    # Bit for bit, NaNs included (assert_array_equal treats NaNs in the same places as equal).
    np.testing.assert_array_equal(actual, expected, err_msg=f"{what} changed")


def assert_state_unchanged(records, where=""):
    """Every object of a :func:`snapshot_state` is as it was (arrays bit for bit)."""
    prefix = f"{where}: " if where else ""
    for obj, record in records:
        if isinstance(obj, np.ndarray):
            _assert_same_array(obj, record, f"{prefix}array argument")
            continue
        name_of = type(obj).__name__
        if isinstance(record, dict):  # state_dict_only
            now = obj.state_dict()
            assert list(now) == list(record), f"{prefix}{name_of}'s state_dict keys changed"
            for name, value in record.items():
                _assert_same_array(np.asarray(now[name]), value, f"{prefix}{name_of}.{name}")
            continue
        arrays, attributes, saved = record
        now = {name: value for name, value in obj.state_dict().items()}
        assert list(now) == [k for k in arrays if k not in ("grad_weight", "grad_bias")], \
            f"{prefix}{name_of}'s state_dict keys changed"
        for name, value in arrays.items():
            current = getattr(obj, name) if name in ("grad_weight", "grad_bias") else now[name]
            if value is None:
                assert current is None, f"{prefix}{name_of}.{name} was set"
            else:
                _assert_same_array(np.asarray(current), value, f"{prefix}{name_of}.{name}")
        for name, value in attributes.items():
            current = getattr(obj, name)
            assert current is value or current == value, \
                f"{prefix}{name_of}.{name} changed from {value!r} to {current!r}"
        assert obj._saved is saved, f"{prefix}{name_of}'s saved forward (for backward) was replaced"


def every_kernel_module():
    """The kernel modules of every SIMD level this machine runs, and the baseline one (the
    tuning switches themselves live once, in fastbn._tuning, shared by every variant)."""
    from fastbn import _kernels
    return [kernels_of(level) for level in kernel_levels()] + [_kernels]


@contextlib.contextmanager
def forced_layout(name):
    """Run the kernels of every SIMD level with one layout ('planar', 'columns'; None: by
    shape).  Process-wide while it lasts: for tests that run one at a time."""
    modules = every_kernel_module()
    for module in modules:
        module._force_layout(name)
    try:
        yield
    finally:
        for module in modules:
            module._force_layout(None)


@contextlib.contextmanager
def forced_fusion(enabled):
    """Allow (True, the default) or forbid (False) the channel- and tile-fused passes in the
    kernels of every SIMD level; True also sets the largest fusion limits any CPU has
    (INTEL_FUSION: planar channels and column tiles of up to 1 MiB at any thread count), so
    that the fused paths run whatever this CPU's defaults.  Process-wide while it lasts."""
    from fastbn import _tuning
    modules = every_kernel_module()
    for module in modules:
        module._set_fusion(enabled)
    if enabled:
        _tuning.set_fusion_limits(_tuning.INTEL_FUSION)
    try:
        yield
    finally:
        for module in modules:
            module._set_fusion(True)
        _tuning.set_fusion_limits(None)
