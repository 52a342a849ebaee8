"""Bad input, everywhere: every public entry point rejects a bad argument with a ValueError,
TypeError or MemoryError whose message names the problem, and changes nothing.

The cases are generated.  One generator per family of entry points (module constructors,
forward, backward, train, load_state_dict and from_state_dict; each function of
fastbn.functional; the checkpoint readers; SyncBatchNorm over a one-rank communicator) yields
``Case(id, make, error, match)``: ``make()`` builds fresh state and returns ``(call, watched)``,
a call that must raise and the modules and arrays it must leave as they were.  One harness
(:func:`test_bad_input_is_rejected_and_changes_nothing`) snapshots everything watched -- every
parameter, buffer, counter, gradient, hyperparameter and the saved forward of a module; every
array argument, ``out`` included (pre-filled with a sentinel) -- makes the call, checks the
exception's type and message, and checks every snapshot bit for bit.

What torch 2.13 does with the same calls, where it differs: it segfaults on a raw eval-mode
batch norm without running statistics and on empty running statistics, increments
``num_batches_tracked`` before validating its input, and loads a state_dict partially.
"""

import os
import re
from collections import namedtuple

import numpy as np
import pytest

import fastbn
from fastbn import functional as F

import state_cases
from conftest import assert_state_unchanged, snapshot_state

Case = namedtuple("Case", "id make error match")

#: Elements of a "huge" input: 2**46 float32 values are 256 TiB, more than the 128 TiB a
#: 64-bit process can map, so allocating a copy or an output of it fails whatever the
#: system's overcommit policy (nothing that large is ever touched: the views are broadcasts
#: of a single element).
HUGE_LOG2 = 46
MEMORY = r"Unable to allocate \d.* (TiB|PiB)|could not allocate"

MODULES = {fastbn.BatchNorm1d: (2, 3), fastbn.BatchNorm2d: (4,), fastbn.BatchNorm3d: (5,)}
DIMS_WORDING = {fastbn.BatchNorm1d: "2D or 3D", fastbn.BatchNorm2d: "4D", fastbn.BatchNorm3d: "5D"}
C = 3  # channels of every case's module or data


def valid_shape(ndim, c=C):
    """A small input shape of `ndim` dimensions with c channels: (4, c, 5, 2, 3)[:ndim]."""
    return ((4, c) + (5, 2, 3, 2))[:ndim] if ndim >= 2 else (4, 5, 2)[:ndim]


def huge_view(ndim, c, dtype):
    """A read-only broadcast of one zero to an (N, c, *) shape of c * 2**46 elements."""
    spatial = ndim - 2
    if spatial == 0:
        shape = (2 ** HUGE_LOG2, c)
    else:
        rest = 2 ** (HUGE_LOG2 - 22)
        sizes = [2 ** (24 // spatial)] * spatial
        sizes[0] = rest // int(np.prod(sizes[1:], dtype=np.int64))
        shape = (2 ** 22, c) + tuple(sizes)
    view = np.broadcast_to(np.zeros((), dtype), shape)
    assert view.size >= c * 2 ** HUGE_LOG2
    return view


def data(shape, dtype, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return x + np.arange(shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2)).astype(dtype)


def masked(a):
    return np.ma.masked_array(a, mask=np.zeros(a.shape, bool))


# Case.make builders: each returns a function making fresh state and (call, watched).

def plain(call, *watched):
    """A call with no state of its own; `watched`: arrays it must leave alone."""
    return lambda: (call, list(watched))


def on_module(make_module, call):
    """call(module) on a fresh make_module(), which must be left alone."""
    def make():
        module = make_module()
        return (lambda: call(module)), [module]
    return make


def with_args(fn, defaults, change):
    """fn(**args), args being defaults() updated with `change`; every array argument must be
    left alone (out included), except the huge views, which nothing can write anyway."""
    def make():
        args = defaults()
        args.update(change)
        watched = [v for v in args.values() if isinstance(v, np.ndarray) and v.size < 2 ** 20]
        return (lambda: fn(**args)), watched
    return make


# ---------------------------------------------------------------------------------------------
# Bad values shared by every array argument
# ---------------------------------------------------------------------------------------------

BAD_DTYPES = [np.int8, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object,
              "U3", "S3", "datetime64[s]", "timedelta64[s]", np.longdouble]


def not_float_arrays(role, shape):
    """(description, value, error, match): values that are no array of floats, for an argument
    converted with np.asarray (inputs, gradients, statistics)."""
    yield "None", None, TypeError, rf"{role} must be an array of floats, got NoneType"
    yield "a str", "abc", TypeError, rf"{role} must be an array of floats, got str"
    yield "bytes", b"abc", TypeError, rf"{role} must be an array of floats, got bytes"
    yield "a ragged list", [[1.0], [1.0, 2.0]], TypeError, rf"{role} must be an array of floats, could not convert list"
    yield "a dict", {"a": 1.0}, TypeError, rf"{role} must have a floating-point dtype .* got object"
    yield "an object", object(), TypeError, rf"{role} must have a floating-point dtype .* got object"
    yield "a list of str", np.full(shape, "a").tolist(), TypeError, rf"{role} must have a floating-point dtype .* got <U1"
    for dt in BAD_DTYPES:
        name = np.dtype(dt).name if np.dtype(dt).kind != "U" else "<U3"
        if np.dtype(dt).kind == "S":
            name = "|S3"
        value = np.zeros(shape, dt)
        yield f"{name} dtype", value, TypeError, rf"{role} must have a floating-point dtype \(float16, bfloat16, float32 or float64\), got {re.escape(str(np.dtype(dt)))}"
    yield "a masked array", masked(np.zeros(shape, np.float32)), TypeError, rf"{role} is a masked array"


def per_channel_problems(name, c, dtype, writable=False):
    """(description, value, error, match) for a per-channel parameter or buffer argument of the
    functional API (a 1-D array of c values of the computing dtype, or None)."""
    other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
    yield "one value too many", np.ones(c + 1, dtype), ValueError, rf"{name} should contain {c} elements \(one per channel\), got shape \({c + 1},\)"
    yield "empty (torch segfaults)", np.ones(0, dtype), ValueError, rf"{name} should contain {c} elements .*got shape \(0,\)"
    yield "2-D", np.ones((c, 1), dtype), ValueError, rf"{name} should contain {c} elements .*got shape \({c}, 1\)"
    yield "0-d", np.ones((), dtype), ValueError, rf"{name} should contain {c} elements .*got shape \(\)"
    yield f"{np.dtype(other).name} (mixed dtypes)", np.ones(c, other), TypeError, rf"{name} has dtype {np.dtype(other)} but the input computes in {np.dtype(dtype)}"
    yield "int64", np.ones(c, np.int64), TypeError, rf"{name} has dtype int64 but the input computes in"
    yield "complex", np.ones(c, np.complex64), TypeError, rf"{name} has dtype complex64"
    yield "a list", [1.0] * c, TypeError, rf"{name} must be a numpy array or None, got list"
    yield "a str", "abc", TypeError, rf"{name} must be a numpy array or None, got str"
    yield "a masked array", masked(np.ones(c, dtype)), TypeError, rf"{name} is a masked array"
    if writable:
        frozen = np.ones(c, dtype)
        frozen.flags.writeable = False
        yield "read-only (updated in training)", frozen, ValueError, rf"{name} is read-only, but it is updated in place"


def statistic_problems(name, c):
    """(description, value, error, match) for a float64 per-channel statistic (save_mean,
    invstd, sum_dy, ...), which any float dtype converts to."""
    yield "one value too many", np.ones(c + 1), ValueError, rf"{name} should contain {c} elements \(one per channel\), got shape \({c + 1},\)"
    yield "2-D", np.ones((1, c)), ValueError, rf"{name} should contain {c} elements .*got shape \(1, {c}\)"
    yield "None", None, TypeError, rf"{name} must be an array of floats, got NoneType"
    yield "a str", "abc", TypeError, rf"{name} must be an array of floats, got str"
    yield "int64", np.ones(c, np.int64), TypeError, rf"{name} must have a floating-point dtype .* got int64"
    yield "complex", np.ones(c, np.complex128), TypeError, rf"{name} must have a floating-point dtype .* got complex128"


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

def constructor_cases():
    bad = [
        ("num_features=-1", dict(num_features=-1), ValueError, "num_features must be non-negative, got -1"),
        ("num_features=2.5", dict(num_features=2.5), TypeError, "num_features must be an int, got float 2.5"),
        ("num_features=3.0 (a float)", dict(num_features=np.float64(3.0)), TypeError, "num_features must be an int, got float64"),
        ("num_features='3'", dict(num_features="3"), TypeError, "num_features must be an int, got str"),
        ("num_features=True", dict(num_features=True), TypeError, "num_features must be an int, got bool"),
        ("num_features=None", dict(num_features=None), TypeError, "num_features must be an int, got NoneType"),
        ("num_features=2**46 (no memory)", dict(num_features=2 ** HUGE_LOG2), MemoryError, MEMORY),
        ("eps=-1e-5", dict(eps=-1e-5), ValueError, "batch_norm eps must be non-negative, but got -1e-05"),
        ("eps=nan", dict(eps=float("nan")), ValueError, "eps must be finite"),
        ("eps=inf", dict(eps=float("inf")), ValueError, "eps must be finite"),
        ("eps=10**400", dict(eps=10 ** 400), ValueError, "eps must be finite, but got 1000.*overflows a float"),
        ("eps='small'", dict(eps="small"), TypeError, "eps must be a real number, got str"),
        ("eps=None", dict(eps=None), TypeError, "eps must be a real number, got NoneType"),
        ("eps=1j", dict(eps=1j), TypeError, "eps must be a real number, got complex"),
        ("eps=[1e-5]", dict(eps=[1e-5]), TypeError, "eps must be a real number, got list"),
        ("momentum=inf", dict(momentum=float("inf")), ValueError, "momentum must be finite"),
        ("momentum=nan", dict(momentum=float("nan")), ValueError, "momentum must be finite"),
        ("momentum=-10**400", dict(momentum=-10 ** 400), ValueError, "momentum must be finite"),
        ("momentum='0.1'", dict(momentum="0.1"), TypeError, "momentum must be a real number or None, got str"),
        ("affine='yes'", dict(affine="yes"), TypeError, "affine must be a bool, got str 'yes'"),
        ("affine=None", dict(affine=None), TypeError, "affine must be a bool, got NoneType"),
        ("track_running_stats=2", dict(track_running_stats=2), TypeError, "track_running_stats must be a bool, got int 2"),
        ("bias=None", dict(bias=None), TypeError, "bias must be a bool, got NoneType"),
        ("dtype=int32", dict(dtype=np.int32), TypeError, "dtype must be float32 or float64, got int32"),
        ("dtype=float16", dict(dtype=np.float16), TypeError, "dtype must be float32 or float64, got float16"),
        ("dtype=complex64", dict(dtype=np.complex64), TypeError, "dtype must be float32 or float64, got complex64"),
        ("dtype=object", dict(dtype=object), TypeError, "dtype must be float32 or float64, got object"),
        ("dtype='banana'", dict(dtype="banana"), TypeError, "dtype must be float32 or float64, got 'banana'"),
    ]
    for cls in MODULES:
        for desc, kwargs, error, match in bad:
            kwargs = {"num_features": C, **kwargs}
            yield Case(f"{cls.__name__}({desc})", plain(lambda cls=cls, kwargs=kwargs: cls(**kwargs)),
                       error, match)


def trained_module(cls, dtype, training, **kwargs):
    """A module with some history: weights, running statistics and gradients that are not the
    defaults, a counter of 2, and a saved forward; in the given mode."""
    kwargs.setdefault("momentum", None)  # the counter then also drives the running statistics
    bn = cls(C, dtype=dtype, **kwargs)
    shape = valid_shape(MODULES[cls][-1])
    rng = np.random.default_rng(1)
    if bn.weight is not None:
        bn.weight[...] = rng.uniform(0.5, 2, C)
    if bn.bias is not None:
        bn.bias[...] = rng.uniform(-1, 1, C)
    for seed in (2, 3):
        y = bn(data(shape, dtype, seed))
        bn.backward(np.ones_like(y))
    return bn.train(training)


def module_setups():
    """(label, cls, dtype, make_module): modules of each class, dtype and mode."""
    for cls in MODULES:
        for dtype in (np.float32, np.float64):
            for training in (True, False):
                label = f"{cls.__name__}[{np.dtype(dtype).name},{'train' if training else 'eval'}]"
                yield label, cls, dtype, (lambda cls=cls, dtype=dtype, training=training:
                                          trained_module(cls, dtype, training))


def forward_input_problems(cls, dtype):
    """(description, value, error, match): bad inputs to a module of class cls and dtype."""
    ndims = MODULES[cls]
    shape = valid_shape(ndims[-1])
    for d in range(0, 7):
        if d not in ndims:
            yield f"{d}-D input", np.zeros(valid_shape(d), dtype), ValueError, rf"expected {DIMS_WORDING[cls]} input \(got {d}D input\)"
    for c in (C - 1, C + 1, 0):
        bad_shape = valid_shape(ndims[-1], c)
        yield f"{c} channels", np.zeros(bad_shape, dtype), ValueError, \
            rf"expected input with {C} channels \(num_features\) in dimension 1, got input of shape \({', '.join(map(str, bad_shape))}\)"
    other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
    yield f"{np.dtype(other).name} input (mixed dtypes)", np.zeros(shape, other), TypeError, \
        rf"input has dtype {np.dtype(other)} but {cls.__name__} holds {np.dtype(dtype)} parameters"
    if np.dtype(dtype) == np.float64:
        yield "float16 input", np.zeros(shape, np.float16), TypeError, \
            rf"input has dtype float16 but {cls.__name__} holds float64 parameters"
    for desc, value, error, match in not_float_arrays("input", shape):
        yield desc, value, error, match
    yield "a huge input (2**46 values per channel)", huge_view(ndims[-1], C, dtype), MemoryError, MEMORY


def module_forward_cases():
    for label, cls, dtype, make in module_setups():
        for desc, value, error, match in forward_input_problems(cls, dtype):
            yield Case(f"{label}.forward: {desc}", on_module(make, lambda bn, value=value: bn(value)),
                       error, match)
        training = "train" in label
        one = (1, C) + (1,) * (MODULES[cls][-1] - 2)
        if training:
            yield Case(f"{label}.forward: one value per channel",
                       on_module(make, lambda bn, one=one, dtype=dtype: bn(np.ones(one, dtype))), ValueError,
                       rf"Expected more than 1 value per channel when training, got input size \({', '.join(map(str, one))}\)")
        # Hyperparameters are attributes a user may set; they are checked at every call.
        shape = valid_shape(MODULES[cls][-1])
        for attr, value, error, match in [
                ("eps", -1.0, ValueError, "batch_norm eps must be .*, but got -1.0"),
                ("eps", float("nan"), ValueError, "eps must be finite"),
                ("eps", "1e-5", TypeError, "eps must be a real number, got str"),
                ("eps", 0.0, ValueError, "batch_norm eps must be positive during training, but got 0.0"),
                ("momentum", float("nan"), ValueError, "momentum must be finite"),
                ("momentum", "0.1", TypeError, "momentum must be a real number or None, got str")]:
            if attr == "eps" and value == 0.0 and not training:
                continue  # eval allows eps = 0
            if attr == "momentum" and not training:
                continue  # eval does not use it
            def make_module(make=make, attr=attr, value=value):
                bn = make()
                setattr(bn, attr, value)
                return bn
            yield Case(f"{label}.forward: {attr}={value!r} set after construction",
                       on_module(make_module, lambda bn, shape=shape, dtype=dtype: bn(data(shape, dtype))), error, match)


def eps_zero_without_running_stats_cases():
    # eval mode without running statistics normalises with batch statistics, so needs eps > 0
    # too (torch: "batch_norm eps must be positive during training").
    for cls in MODULES:
        shape = valid_shape(MODULES[cls][-1])

        yield Case(f"{cls.__name__}(eps=0, track_running_stats=False).eval().forward",
                   on_module(lambda cls=cls: cls(C, eps=0.0, track_running_stats=False).eval(),
                             lambda bn, shape=shape: bn(data(shape, np.float32))),
                   ValueError, "batch_norm eps must be positive during training, but got 0.0")


def module_backward_cases():
    for label, cls, dtype, make in module_setups():
        shape = valid_shape(MODULES[cls][-1])
        other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
        wrong = shape[:-1] + (shape[-1] + 1,)
        problems = [
            ("grad_output of another shape", np.zeros(wrong, dtype), ValueError,
             rf"grad_output has shape \({', '.join(map(str, wrong))}\) but the last forward's input has shape"),
            ("grad_output transposed", np.zeros(shape[::-1], dtype), ValueError, "grad_output has shape .* but the last forward's input"),
            (f"{np.dtype(other).name} grad_output", np.zeros(shape, other), TypeError,
             rf"grad_output has dtype {np.dtype(other)} but the last forward's input had dtype {np.dtype(dtype)}"),
        ] + list(not_float_arrays("grad_output", shape))

        def make_module(make=make, cls=cls, dtype=dtype, shape=shape):
            bn = make()
            bn(data(shape, dtype, 4))  # the saved forward has `shape`
            return bn
        for desc, value, error, match in problems:
            yield Case(f"{label}.backward: {desc}", on_module(make_module, lambda bn, value=value: bn.backward(value)),
                       error, match)
        if "train" in label:
            continue
        yield Case(f"{cls.__name__}[{np.dtype(dtype).name}].backward before any forward",
                   on_module(lambda cls=cls, dtype=dtype: cls(C, dtype=dtype),
                             lambda bn, shape=shape, dtype=dtype: bn.backward(np.zeros(shape, dtype))),
                   RuntimeError, r"backward\(\) called before forward\(\)")


def train_mode_cases():
    for cls in MODULES:
        for mode in ("yes", 1, None, np.float64(1.0)):
            yield Case(f"{cls.__name__}.train({mode!r})",
                       on_module(lambda cls=cls: trained_module(cls, np.float32, True), lambda bn, mode=mode: bn.train(mode)),
                       ValueError, "training mode is expected to be boolean")


def full_state(c, dtype=np.float32, nbt=7):
    return {"weight": np.full(c, 2.0, dtype), "bias": np.full(c, 0.5, dtype),
            "running_mean": np.arange(c, dtype=dtype), "running_var": np.full(c, 3.0, dtype),
            "num_batches_tracked": np.array(nbt)}


def state_dict_problems(c):
    """(description, change to a valid state_dict, match) for load_state_dict, all ValueErrors
    (torch: RuntimeError) listing every problem."""
    for key in ("weight", "bias", "running_mean", "running_var"):
        for shape in [(c + 1,), (c, 1), (), (0,)]:
            yield f"{key} of shape {shape}", {key: np.ones(shape)}, \
                rf"size mismatch for {key}: copying a param with shape \({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''}\) from checkpoint, the shape in current model is \({c},\)"
        yield f"{key} of strings", {key: np.array(["a"] * c)}, rf'"{key}" has dtype <U1; expected real numbers'
        yield f"{key} complex", {key: np.ones(c, np.complex64)}, rf'"{key}" has dtype complex64; expected real numbers'
        yield f"{key} None", {key: None}, rf'"{key}" has dtype object; expected real numbers'
        yield f"{key} ragged", {key: [[1.0], [1.0, 2.0]]}, rf'could not convert "{key}" \(list\) to an array'
        yield f"{key} beyond float32", {key: np.full(c, 1e300)}, rf'"{key}" holds values outside the range of float32'
    nbt = "num_batches_tracked"
    for value, match in [(np.array(2.5), "must hold whole numbers"), (np.array(np.nan), "must hold whole numbers"),
                         (np.array(np.inf), "must hold whole numbers"), (np.array(-1), r"must be a count between 0 and 2\*\*63 - 1"),
                         (np.array(2 ** 64 - 1, np.uint64), "must be a count between 0"),
                         (np.array(1e30), "must be a count between 0"), (np.array(2.0 ** 63), "must be a count between 0"),
                         (np.zeros(2, np.int64), r"size mismatch for num_batches_tracked: .*shape \(2,\)"),
                         (np.array("7"), "has dtype <U1; expected real numbers")]:
        yield f"{nbt}={value!r}", {nbt: value}, rf'"?{nbt}"? {match}' if not match.startswith("size") else match
    yield "a missing key", {"running_var": "DELETE"}, r'Missing key\(s\) in state_dict: "running_var"'
    yield "an unexpected key", {"running_std": np.ones(c)}, r'Unexpected key\(s\) in state_dict: "running_std"'
    yield "several problems at once", {"weight": np.ones(c + 1), "bias": np.array(["a"] * c), "extra": 1}, \
        r'(?s)Unexpected key\(s\) in state_dict: "extra".*size mismatch for weight.*"bias" has dtype <U1'


def load_state_dict_cases():
    for cls in MODULES:
        module = lambda cls=cls: trained_module(cls, np.float32, True)  # noqa: E731
        for desc, change, match in state_dict_problems(C):
            state = {k: v for k, v in {**full_state(C), **change}.items() if not (isinstance(v, str) and v == "DELETE")}
            yield Case(f"{cls.__name__}.load_state_dict: {desc}",
                       on_module(module, lambda bn, state=state: bn.load_state_dict(state)), ValueError, match)
        for desc, value in [("a list of pairs", [("weight", np.ones(C))]), ("None", None), ("an array", np.ones(C))]:
            yield Case(f"{cls.__name__}.load_state_dict({desc})",
                       on_module(module, lambda bn, value=value: bn.load_state_dict(value)),
                       TypeError, "Expected state_dict to be dict-like")
        # strict=False still refuses values it cannot load, and then loads nothing
        yield Case(f"{cls.__name__}.load_state_dict(strict=False): a bad value beside a good one",
                   on_module(module, lambda bn: bn.load_state_dict({"bias": np.zeros(C), "weight": np.ones(2)}, strict=False)),
                   ValueError, "size mismatch for weight")


def from_state_dict_cases():
    good = {f"layer.bn.{k}": v for k, v in full_state(C).items()}
    cases = [
        ("a list", [("weight", np.ones(3))], {}, TypeError, "Expected state_dict to be dict-like, got list"),
        ("prefix=3", good, dict(prefix=3), TypeError, "prefix must be a str, got int"),
        ("an unknown prefix", good, dict(prefix="layer.bm"), ValueError, r'no entries under prefix "layer.bm\." .*"layer\.bn\."'),
        ("a 2-D weight", {"conv.weight": np.ones((3, 3))}, dict(prefix="conv"), ValueError, "has shape \\(3, 3\\), but a BatchNorm's weight is 1-D"),
        ("no per-channel entry", {"bn.num_batches_tracked": np.array(1)}, dict(prefix="bn"), ValueError, "nothing under prefix \"bn.\" gives num_features"),
        ("weight and running_mean disagree", {**good, "layer.bn.running_mean": np.zeros(C + 1)}, dict(prefix="layer.bn"), ValueError, "size mismatch for running_mean"),
        ("a string weight", {"bn.weight": np.array(["a", "b"])}, dict(prefix="bn"), ValueError, '"weight" has dtype <U1; expected real numbers'),
        ("eps=-1", good, dict(prefix="layer.bn", eps=-1.0), ValueError, "eps must be non-negative"),
        ("dtype=int", good, dict(prefix="layer.bn", dtype=np.int64), TypeError, "dtype must be float32 or float64"),
    ]
    for cls in MODULES:
        for desc, sd, kwargs, error, match in cases:
            arrays = [v for v in (sd.values() if isinstance(sd, dict) else []) if isinstance(v, np.ndarray)]
            yield Case(f"{cls.__name__}.from_state_dict: {desc}",
                       plain(lambda cls=cls, sd=sd, kwargs=kwargs: cls.from_state_dict(sd, **kwargs), *arrays),
                       error, match)


# ---------------------------------------------------------------------------------------------
# fastbn.functional
# ---------------------------------------------------------------------------------------------

SHAPE = (4, C, 5)


def forward_args(dtype=np.float32, training=True):
    rng = np.random.default_rng(5)
    return dict(input=data(SHAPE, dtype), running_mean=rng.standard_normal(C).astype(dtype),
                running_var=rng.uniform(0.5, 2, C).astype(dtype),
                weight=rng.uniform(0.5, 2, C).astype(dtype), bias=rng.standard_normal(C).astype(dtype),
                training=training, momentum=0.1, eps=1e-5, out=np.full(SHAPE, 7.25, dtype))


def scalar_problems(training):
    """(description, overrides, error, match): bad scalar arguments of batch_norm_forward."""
    if training:
        yield "eps=0 in training", dict(eps=0.0), ValueError, "batch_norm eps must be positive during training, but got 0.0"
        yield "eps=-1e-300 in training", dict(eps=-1e-300), ValueError, "batch_norm eps must be positive during training"
        yield "momentum=None", dict(momentum=None), TypeError, "momentum must be a float, got None"
        yield "momentum=nan", dict(momentum=float("nan")), ValueError, "momentum must be finite"
        yield "momentum=inf", dict(momentum=float("inf")), ValueError, "momentum must be finite"
        yield "momentum=10**400", dict(momentum=10 ** 400), ValueError, "momentum must be finite"
        yield "momentum='0.1'", dict(momentum="0.1"), TypeError, "momentum must be a real number"
    else:
        yield "eps=-1 in eval", dict(eps=-1.0), ValueError, "batch_norm eps must be non-negative, but got -1.0"
    yield "eps=nan", dict(eps=float("nan")), ValueError, "eps must be finite"
    yield "eps=-inf", dict(eps=-float("inf")), ValueError, "eps must be finite"
    yield "eps=10**400", dict(eps=10 ** 400), ValueError, "eps must be finite"
    yield "eps='1e-5'", dict(eps="1e-5"), TypeError, "eps must be a real number, got str"
    yield "eps=None", dict(eps=None), TypeError, "eps must be a real number, got NoneType"
    yield "training='False'", dict(training="False"), TypeError, "training must be a bool, got str 'False'"
    yield "training=None", dict(training=None), TypeError, "training must be a bool, got NoneType"
    yield "training=2", dict(training=2), TypeError, "training must be a bool, got int 2"
    for n, error in [(0, ValueError), (1.5, TypeError), ("2", TypeError), (2 ** 31, ValueError), (-2 ** 40, ValueError)]:
        yield f"n_threads={n!r}", dict(n_threads=n), error, "n_threads"


def out_problems(dtype):
    other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
    frozen = np.zeros(SHAPE, dtype)
    frozen.flags.writeable = False
    wrong = SHAPE[:-1] + (SHAPE[-1] + 1,)
    yield "out of another shape", np.zeros(wrong, dtype), ValueError, rf"out has shape \({', '.join(map(str, wrong))}\) but expected \({', '.join(map(str, SHAPE))}\)"
    yield "out of another dtype", np.zeros(SHAPE, other), TypeError, rf"out has dtype {np.dtype(other)} but expected {np.dtype(dtype)}"
    yield "a strided out", np.zeros(SHAPE[:-1] + (2 * SHAPE[-1],), dtype)[..., ::2], ValueError, "out must be C-contiguous"
    yield "a read-only out", frozen, ValueError, "out is read-only"
    yield "a list as out", [0.0], TypeError, "out must be a numpy array, got list"


def functional_forward_cases():
    for fn in (F.batch_norm_forward, F.batch_norm):
        for dtype in (np.float32, np.float64):
            for training in (True, False):
                label = f"{fn.__name__}[{np.dtype(dtype).name},{'train' if training else 'eval'}]"
                overrides = []
                for d in (0, 1):
                    overrides.append((f"{d}-D input", dict(input=np.zeros(valid_shape(d), dtype)), ValueError,
                                      rf"expected input with at least 2 dimensions \(N, C, \*\) \(got {d}D input\)"))
                overrides += [(f"input {desc}", dict(input=value), error, match)
                              for desc, value, error, match in not_float_arrays("input", SHAPE)]
                overrides.append(("a huge input", dict(input=huge_view(3, C, dtype), out=None), MemoryError, MEMORY))
                for name in ("running_mean", "running_var", "weight", "bias"):
                    writable = training and name.startswith("running")
                    overrides += [(f"{name} {desc}", {name: value}, error, match)
                                  for desc, value, error, match in per_channel_problems(name, C, dtype, writable)]
                overrides += [(f"input with {C + 1} channels", dict(input=data(valid_shape(3, C + 1), dtype), out=None),
                               ValueError, rf"should contain {C + 1} elements \(one per channel\), got shape \({C},\)")]
                overrides += [("only running_mean", dict(running_var=None), ValueError, "running_mean and running_var must either both be None or neither be None"),
                              ("only running_var", dict(running_mean=None), ValueError, "must either both be None or neither")]
                if training:
                    one = (1, C, 1)
                    overrides.append(("one value per channel", dict(input=np.ones(one, dtype), out=None), ValueError,
                                      r"Expected more than 1 value per channel when training, got input size \(1, 3, 1\)"))
                else:
                    overrides.append(("no running statistics (torch segfaults)", dict(running_mean=None, running_var=None), ValueError,
                                      "running_mean and running_var are required when training=False"))
                overrides += list(scalar_problems(training))
                overrides += [(desc, dict(out=value), error, match) for desc, value, error, match in out_problems(dtype)]
                defaults = lambda dtype=dtype, training=training: forward_args(dtype, training)  # noqa: E731
                for desc, change, error, match in overrides:
                    yield Case(f"{label}: {desc}", with_args(fn, defaults, change), error, match)


def functional_backward_cases():
    for dtype in (np.float32, np.float64):
        label = f"batch_norm_backward[{np.dtype(dtype).name}]"
        other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
        wrong = SHAPE[:-1] + (SHAPE[-1] + 1,)
        overrides = [
            ("grad_output of another shape", dict(grad_output=np.zeros(wrong, dtype)), ValueError,
             rf"grad_output has shape \({', '.join(map(str, wrong))}\) but input has shape \({', '.join(map(str, SHAPE))}\); they must match"),
            (f"{np.dtype(other).name} grad_output", dict(grad_output=np.zeros(SHAPE, other)), TypeError,
             rf"grad_output has dtype {np.dtype(other)} but input has dtype {np.dtype(dtype)}; they must match"),
            ("1-D input and grad_output", dict(input=np.zeros(3, dtype), grad_output=np.zeros(3, dtype)), ValueError, r"got 1D input\)"),
            ("huge input and grad_output", dict(input=huge_view(3, C, dtype), grad_output=huge_view(3, C, dtype)), MemoryError, MEMORY),
            ("training='yes'", dict(training="yes"), TypeError, "training must be a bool, got str"),
            ("n_threads=0", dict(n_threads=0), ValueError, "n_threads == 0 is invalid"),
        ]
        overrides += [(f"grad_output {d}", dict(grad_output=v), e, m) for d, v, e, m in not_float_arrays("grad_output", SHAPE)]
        overrides += [(f"input {d}", dict(input=v), e, m) for d, v, e, m in not_float_arrays("input", SHAPE)]
        for name in ("save_mean", "save_invstd"):
            overrides += [(f"{name} {d}", {name: v}, e, m) for d, v, e, m in statistic_problems(name, C)]
        overrides += [(f"weight {d}", dict(weight=v), e, m) for d, v, e, m in per_channel_problems("weight", C, dtype)]
        def defaults(dtype=dtype):
            return dict(grad_output=data(SHAPE, dtype, 6), input=data(SHAPE, dtype, 7), save_mean=np.zeros(C),
                        save_invstd=np.ones(C), weight=np.ones(C, dtype), training=True)
        for desc, change, error, match in overrides:
            yield Case(f"{label}: {desc}", with_args(F.batch_norm_backward, defaults, change), error, match)


def building_block_cases():
    dtype = np.float32
    x = lambda: data(SHAPE, dtype, 8)  # noqa: E731
    # batch_stats
    for desc, value, error, match in list(not_float_arrays("input", SHAPE)) + [
            ("a 1-D input", np.zeros(4, dtype), ValueError, r"at least 2 dimensions \(N, C, \*\) \(got 1D input\)"),
            ("a huge input", huge_view(4, C, dtype), MemoryError, MEMORY)]:
        yield Case(f"batch_stats: {desc}", plain(lambda value=value: F.batch_stats(value)), error, match)
    # merge_stats
    ok = (4, np.zeros(C), np.ones(C))
    for desc, triples, error, match in [
            ("no triples", (), TypeError, r"merge_stats\(\) needs at least one"),
            ("a bare int", (5,), TypeError, "triple 0 must be \\(count, mean, m2\\), got int"),
            ("a pair", ((4, np.zeros(C)),), TypeError, "triple 0 must be \\(count, mean, m2\\), got tuple"),
            ("count -1", (ok, (-1, np.zeros(C), np.ones(C))), ValueError, "triple 1: count must be a non-negative int, got -1"),
            ("count 2.5", ((2.5, np.zeros(C), np.ones(C)),), TypeError, "triple 0: count must be an int, got float 2.5"),
            ("count True", ((True, np.zeros(C), np.ones(C)),), TypeError, "triple 0: count must be an int, got bool True"),
            ("count None", ((None, np.zeros(C), np.ones(C)),), TypeError, "triple 0: count must be an int, got NoneType None"),
            ("mean of strings", ((4, ["a"] * C, np.ones(C)),), TypeError, "triple 0: mean must be an array of real numbers, got dtype <U1"),
            ("complex m2", ((4, np.zeros(C), np.ones(C, complex)),), TypeError, "triple 0: m2 must be an array of real numbers, got dtype complex128"),
            ("ragged mean", ((4, [[0.0], [1.0, 2.0]], np.ones(C)),), TypeError, "triple 0: mean must be an array of real numbers, could not convert list"),
            ("negative m2", ((4, np.zeros(C), -np.ones(C)),), ValueError, "triple 0: m2 .* must be non-negative"),
            ("2-D mean", ((4, np.zeros((1, C)), np.ones((1, C))),), ValueError, "mean and m2 must be 1-D arrays"),
            ("m2 of another length", ((4, np.zeros(C), np.ones(C + 1)),), ValueError, "mean and m2 must be 1-D arrays of the same length"),
            ("channels disagree", (ok, (4, np.zeros(C + 1), np.ones(C + 1))), ValueError, f"triple 1 has {C + 1} channels but triple 0 has {C}")]:
        watched = [a for t in triples if isinstance(t, tuple) for a in t if isinstance(a, np.ndarray)]
        yield Case(f"merge_stats: {desc}", plain(lambda triples=triples: F.merge_stats(*triples), *watched), error, match)
    # batch_norm_elemt
    overrides = [(f"input {d}", dict(input=v), e, m) for d, v, e, m in not_float_arrays("input", SHAPE)]
    overrides += [("a huge input", dict(input=huge_view(3, C, dtype), out=None), MemoryError, MEMORY)]
    for name in ("mean", "invstd"):
        overrides += [(f"{name} {d}", {name: v}, e, m) for d, v, e, m in statistic_problems(name, C)]
    for name in ("weight", "bias"):
        overrides += [(f"{name} {d}", {name: v}, e, m) for d, v, e, m in per_channel_problems(name, C, dtype)]
    overrides += [(d, dict(out=v), e, m) for d, v, e, m in out_problems(dtype)]
    overrides += [("n_threads=-2**31", dict(n_threads=-2 ** 31), ValueError, "n_threads=-2147483648 is out of range")]
    def defaults():
        return dict(input=x(), mean=np.zeros(C), invstd=np.ones(C), weight=np.ones(C, dtype),
                    bias=np.zeros(C, dtype), out=np.full(SHAPE, 7.25, dtype))
    for desc, change, error, match in overrides:
        yield Case(f"batch_norm_elemt: {desc}", with_args(F.batch_norm_elemt, defaults, change), error, match)
    # batch_norm_backward_reduce
    overrides = [(f"grad_output {d}", dict(grad_output=v), e, m) for d, v, e, m in not_float_arrays("grad_output", SHAPE)]
    overrides += [("grad_output of another shape", dict(grad_output=np.zeros((4, C, 6), dtype)), ValueError, "grad_output has shape \\(4, 3, 6\\) but input has shape \\(4, 3, 5\\)")]
    overrides += [("huge", dict(grad_output=huge_view(3, C, dtype), input=huge_view(3, C, dtype)), MemoryError, MEMORY)]
    overrides += [(f"mean {d}", dict(mean=v), e, m) for d, v, e, m in statistic_problems("mean", C)]
    for desc, change, error, match in overrides:
        yield Case(f"batch_norm_backward_reduce: {desc}",
                   with_args(F.batch_norm_backward_reduce, lambda: dict(grad_output=x(), input=x(), mean=np.zeros(C)), change),
                   error, match)
    # batch_norm_backward_elemt
    overrides = [(f"input {d}", dict(input=v), e, m) for d, v, e, m in not_float_arrays("input", SHAPE)]
    for name in ("mean", "invstd", "sum_dy", "sum_dy_xmu"):
        overrides += [(f"{name} {d}", {name: v}, e, m) for d, v, e, m in statistic_problems(name, C)]
    overrides += [(f"weight {d}", dict(weight=v), e, m) for d, v, e, m in per_channel_problems("weight", C, dtype)]
    overrides += [(f"count={n!r}", dict(count=n), ValueError, rf"count must be a positive int \(values per channel over all workers\), got {n}")
                  for n in (0, -4)]
    overrides += [(f"count={n!r}", dict(count=n), TypeError, rf"count must be an int \(values per channel over all workers\), got {type(n).__name__}")
                  for n in (2.5, True, "20", None)]
    def defaults_elemt():
        return dict(grad_output=x(), input=x(), mean=np.zeros(C), invstd=np.ones(C), weight=np.ones(C, dtype),
                    sum_dy=np.zeros(C), sum_dy_xmu=np.zeros(C), count=20)
    for desc, change, error, match in overrides:
        yield Case(f"batch_norm_backward_elemt: {desc}", with_args(F.batch_norm_backward_elemt, defaults_elemt, change),
                   error, match)


# ---------------------------------------------------------------------------------------------
# Checkpoint readers (the file formats' own corruptions are tests/test_checkpoint.py's)
# ---------------------------------------------------------------------------------------------

def checkpoint_cases():
    here = os.path.dirname(os.path.abspath(__file__))
    fixture = os.path.join(here, "data", "resnet_like.pt")
    for fn in (fastbn.load_checkpoint, fastbn.read_checkpoint):
        name = fn.__name__
        yield Case(f"{name}(None)", plain(lambda fn=fn: fn(None)), TypeError, "expected str, bytes or os.PathLike object, not NoneType")
        yield Case(f"{name}(3.5)", plain(lambda fn=fn: fn(3.5)), TypeError, "not float")
        yield Case(f"{name}(a directory)", plain(lambda fn=fn: fn(here)), IsADirectoryError, "Is a directory")
        yield Case(f"{name}(a missing file)", plain(lambda fn=fn: fn(os.path.join(here, "no-such.pt"))), FileNotFoundError, "no-such.pt")
    yield Case("load_checkpoint(key=5)", plain(lambda: fastbn.load_checkpoint(fixture, key=5)), TypeError,
               "key must be a string or a sequence of strings, got int")
    yield Case("load_checkpoint(key='nope')", plain(lambda: fastbn.load_checkpoint(fixture, key="nope")), ValueError,
               "has no key 'nope'; its keys:")


# ---------------------------------------------------------------------------------------------
# SyncBatchNorm, over an in-process communicator of one rank
# ---------------------------------------------------------------------------------------------

# (a communicator of one rank: tests/test_syncbn.py has groups of threads; one rank is all a
# table of bad inputs needs)
SoloComm = state_cases.SoloComm


def sync_module(dtype, training):
    bn = fastbn.SyncBatchNorm(C, momentum=None, dtype=dtype, comm=SoloComm())
    for seed in (2, 3):
        bn.backward(np.ones_like(bn(data((4, C, 5), dtype, seed))))
    return bn.train(training)


def sync_cases():
    for comm in (object(), "MPI.COMM_WORLD"):
        yield Case(f"SyncBatchNorm(comm={type(comm).__name__})", plain(lambda comm=comm: fastbn.SyncBatchNorm(C, comm=comm)),
                   TypeError, "comm must be an MPI communicator .* without Allgather, Get_rank, Get_size")
    for dtype in (np.float32, np.float64):
        for training in (True, False):
            label = f"SyncBatchNorm[{np.dtype(dtype).name},{'train' if training else 'eval'}]"
            # Training errors come back from the collective naming the rank; eval is local.
            rank = "rank 0: " if training else ""
            other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
            problems = [("a 1-D input", np.zeros(4, dtype), ValueError,
                         r"expected at least 2D input \(got 1D input\)" if training else r"expected .*input \(got 1D input\)"),
                        ("4 channels", np.zeros((4, C + 1, 5), dtype), ValueError, r"expected input with 3 channels"),
                        (f"{np.dtype(other).name} input", np.zeros((4, C, 5), other), TypeError, f"input has dtype {np.dtype(other)} but SyncBatchNorm holds"),
                        ("a huge input", huge_view(3, C, dtype), MemoryError, MEMORY)]
            problems += list(not_float_arrays("input", (4, C, 5)))
            if training:
                problems.append(("one value per channel", np.ones((1, C), dtype), ValueError,
                                 "Expected more than 1 value per channel when training, got 1 value per channel over all 1 ranks"))
            for desc, value, error, match in problems:
                anchored = match if match.startswith("Expected more") else rank + match
                yield Case(f"{label}.forward: {desc}",
                           on_module(lambda dtype=dtype, training=training: sync_module(dtype, training), lambda bn, value=value: bn(value)),
                           error, anchored)
            bwd = [("grad_output of another shape", np.zeros((4, C, 6), dtype), ValueError, "grad_output has shape \\(4, 3, 6\\) but the last forward's input has shape \\(4, 3, 5\\)"),
                   (f"{np.dtype(other).name} grad_output", np.zeros((4, C, 5), other), TypeError, "grad_output has dtype")]
            bwd += list(not_float_arrays("grad_output", (4, C, 5)))
            def after_a_forward(dtype=dtype, training=training):
                bn = sync_module(dtype, training)
                bn(data((4, C, 5), dtype, 9))
                return bn
            for desc, value, error, match in bwd:
                yield Case(f"{label}.backward: {desc}", on_module(after_a_forward, lambda bn, value=value: bn.backward(value)),
                           error, rank + match)


# ---------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------

def all_cases():
    for family in (constructor_cases, module_forward_cases, eps_zero_without_running_stats_cases,
                   module_backward_cases, train_mode_cases, load_state_dict_cases,
                   from_state_dict_cases, functional_forward_cases, functional_backward_cases,
                   building_block_cases, checkpoint_cases, sync_cases):
        yield from family()


CASES = list(all_cases())


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate case ids: {duplicates[:5]}"


def test_every_public_entry_point_has_cases():
    # "BatchNorm2d[float32,train].forward: ..." counts for BatchNorm2d.forward
    covered = {re.sub(r"\[[^]]*\]", "", case.id.split(":")[0]).split("(")[0] for case in CASES}
    covered |= {case.id.split("(")[0] for case in CASES}
    entry_points = [f"{cls.__name__}{what}" for cls in MODULES
                    for what in ("", ".forward", ".backward", ".train", ".load_state_dict", ".from_state_dict")]
    entry_points += list(F.__all__) + ["load_checkpoint", "read_checkpoint", "SyncBatchNorm",
                                       "SyncBatchNorm.forward", "SyncBatchNorm.backward"]
    missing = [e for e in entry_points if e not in covered]
    assert not missing, f"entry points without bad-input cases: {missing} (covered: {sorted(covered)})"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_rejected_and_changes_nothing(case):
    call, watched = case.make()
    before = snapshot_state(*watched)
    with pytest.raises(case.error, match=case.match):
        call()
    assert_state_unchanged(before, case.id)


def test_a_rejected_call_leaves_the_module_usable():
    # After every kind of rejection the module goes on as if the call had not happened: the
    # next steps give what an untouched twin gives, bit for bit.
    bn, twin = (trained_module(fastbn.BatchNorm2d, np.float32, True) for _ in range(2))
    x = data((4, C, 5, 2), np.float32, 11)
    for bad in (np.zeros((4, C + 1, 5, 2), np.float32), huge_view(4, C, np.float32), "x", np.ones((1, C, 1, 1), np.float32)):
        with pytest.raises((ValueError, TypeError, MemoryError)):
            bn(bad)
    for module in (bn, twin):
        module.backward(np.ones_like(module(x)))
    for (name, a), (_, b) in zip(bn.state_dict().items(), twin.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=f"{name} differs from the twin's")
    np.testing.assert_array_equal(bn.grad_weight, twin.grad_weight)


@pytest.mark.parametrize("change", [
    "num_batches_tracked", "running_mean", "running_var NaN", "weight", "grad_bias", "grad_weight None",
    "saved forward", "training", "momentum", "out"])
def test_the_harness_notices_every_kind_of_change(change):
    # The harness above is only as good as its snapshot: each of these changes must fail it.
    bn = trained_module(fastbn.BatchNorm2d, np.float32, True)
    out = np.full(SHAPE, 7.25, np.float32)
    before = snapshot_state(bn, out)
    if change == "num_batches_tracked":
        bn.num_batches_tracked += 1
    elif change == "running_mean":
        bn.running_mean[1] = np.nextafter(bn.running_mean[1], np.float32(np.inf))
    elif change == "running_var NaN":
        bn.running_var[0] = np.nan
    elif change == "weight":
        bn.weight[2] = -bn.weight[2]
    elif change == "grad_bias":
        bn.grad_bias[0] += 1
    elif change == "grad_weight None":
        bn.grad_weight = None
    elif change == "saved forward":
        bn(data((4, C, 5, 2), np.float32))
        bn.num_batches_tracked -= 1
        bn.running_mean[...], bn.running_var[...] = before[0][1][0]["running_mean"], before[0][1][0]["running_var"]
    elif change == "training":
        bn.eval()
    elif change == "momentum":
        bn.momentum = 0.5
    elif change == "out":
        out[0, 0, 0] = 0.0
    with pytest.raises(AssertionError):
        assert_state_unchanged(before, change)


def test_boundaries_of_the_checks_are_accepted():
    # The other side of the table's edges: these are valid and must load or run.
    bn = fastbn.BatchNorm1d(C)
    for count in (0, 2 ** 63 - 1, np.uint64(5), np.array([9]), 4.0):
        bn.load_state_dict({"num_batches_tracked": count}, strict=False)
        assert int(bn.num_batches_tracked) == int(np.asarray(count).reshape(())), count
    f32max = float(np.finfo(np.float32).max)
    bn.load_state_dict({"weight": np.array([f32max, -f32max, np.inf])}, strict=False)  # inf is inf already
    np.testing.assert_array_equal(bn.weight, np.array([f32max, -f32max, np.inf], np.float32))
    fastbn.BatchNorm1d(C, dtype=np.float64).load_state_dict({"bias": np.full(C, 1e300)}, strict=False)
    x = data((4, C), np.float32)
    F.batch_norm(x, None, None, training=np.bool_(True), n_threads=2 ** 31 - 1)
    F.batch_norm(x, None, None, training=1, eps=np.float32(1e-3), momentum=np.float64(0.5))
    F.merge_stats((np.int64(4), np.zeros(C, np.float32), np.zeros(C, np.int64)), (0, [0.0] * C, [0.0] * C))
    F.batch_norm_backward_elemt(x, x, np.zeros(C), np.ones(C), None, np.zeros(C), np.zeros(C), np.uint8(4))
    assert fastbn.BatchNorm2d(np.int64(C)).num_features == C


def test_a_list_of_the_wrong_dtype_is_told_how_to_convert():
    # A Python list becomes a float64 array; the hint must work for a list (which has no
    # .astype) as for an array.
    import fastbn
    with pytest.raises(TypeError, match=r"convert it: np.asarray\(input, dtype=np.float32\)"):
        fastbn.BatchNorm1d(2)([[1.0, 2.0], [3.0, 4.0]])
