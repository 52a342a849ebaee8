"""Bad state, generated: every kind of wrong value assigned to every parameter and buffer of
every module configuration, and passed as every per-channel array of the functional API, run
in every mode that could read or write it.

A module's arrays are attributes that users assign freely (``bn.running_mean = ...`` is
ordinary torch-style code), so every call must check what it uses.  The outcome of each case is
one of two, never a crash and never garbage:

* the value is wrong for what the call does with it: a TypeError or ValueError whose message
  names the attribute (or argument), and the module's whole state as it was;
* the value is unusual but valid (a strided or reversed view, a read-only array that is only
  read, a wrong value where the call does not use it): the result has the bits of the same
  call on an ordinary copy, and an updated buffer is updated where it lies.

``run(group)`` runs one group of cases and prints a JSON line per case; tests/test_module_state.py
runs each group in a subprocess, so that a crash fails the test (and names the case being run)
instead of the test session.  ``python tests/state_cases.py GROUP`` runs one by hand.
"""

import json
import sys
import warnings

import numpy as np

import fastbn
from fastbn import functional as F

C = 4
DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


class SoloComm:
    """The part of an MPI communicator SyncBatchNorm uses, for a single rank."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, sendbuf, recvbuf):
        recvbuf[...] = np.asarray(sendbuf).reshape(recvbuf.shape)


class ArrayLike:
    """Not an ndarray, but np.asarray takes it (as it takes a torch tensor)."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)


#: module name -> (constructor, input shape)
MODULES = {
    "BatchNorm1d": (lambda **k: fastbn.BatchNorm1d(C, **k), (6, C)),
    "BatchNorm1d(N, C, L)": (lambda **k: fastbn.BatchNorm1d(C, **k), (3, C, 5)),
    "BatchNorm2d": (lambda **k: fastbn.BatchNorm2d(C, **k), (2, C, 3, 3)),
    "BatchNorm3d": (lambda **k: fastbn.BatchNorm3d(C, **k), (2, C, 2, 3, 2)),
    "SyncBatchNorm": (lambda **k: fastbn.SyncBatchNorm(C, comm=SoloComm(), **k), (2, C, 3, 3)),
}
MODES = ("train", "eval", "backward")
PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def _frozen(a):
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def _strided(values):
    wide = np.zeros(2 * values.shape[0], values.dtype)
    wide[::2] = values
    return wide[::2]


def _reversed(values):
    return np.ascontiguousarray(values[::-1])[::-1]


def bad_per_channel(dtype, required):
    """(label, value): what a per-channel array of `dtype` (the module's) must never be."""
    other = np.float64 if dtype == np.float32 else np.float32
    good = np.linspace(0.5, 1.5, C).astype(dtype)
    yield "a list", good.tolist()
    yield "a tuple", tuple(good.tolist())
    yield "a float", 0.5
    yield "an int", 1
    yield "a str", "weights"
    yield "a dict", {"values": good}
    yield "an array-like (as a tensor)", ArrayLike(good)
    yield f"dtype {np.dtype(other)}", good.astype(other)
    yield "dtype float16", good.astype(np.float16)
    yield "dtype int64", np.arange(C)
    yield "dtype bool", np.ones(C, bool)
    yield "dtype complex", good.astype(np.complex128)
    yield "dtype object", np.array(good.tolist(), dtype=object)
    yield "byte-swapped", good.astype(np.dtype(dtype).newbyteorder())
    yield "C - 1 values", good[:-1].copy()
    yield "C + 1 values", np.append(good, 1).astype(dtype)
    yield "2 values", good[:2].copy()
    yield "no values", good[:0].copy()
    yield "shape (C, 1)", good.reshape(C, 1).copy()
    yield "shape (1, C)", good.reshape(1, C).copy()
    yield "0-d", np.array(0.5, dtype)
    yield "a masked array", np.ma.masked_array(good, mask=[False] * C)
    with warnings.catch_warnings():  # (numpy discourages np.matrix; users still have them)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        yield "a matrix", np.asmatrix(good)
    if required:
        yield "None", None


def valid_per_channel(dtype):
    """(label, value, ordinary copy): unusual arrays that must work as their copy does."""
    good = np.linspace(0.5, 1.5, C).astype(dtype)
    yield "a strided view", _strided(good), good.copy()
    yield "a reversed view", _reversed(good), good.copy()
    yield "a subclass (memmap-like)", good.copy().view(_Subclass), good.copy()


class _Subclass(np.ndarray):
    pass


def bad_counters():
    yield "a float", 2.5
    yield "a list", [3]
    yield "a str", "3"
    yield "two values", np.array([1, 2])
    yield "a float array", np.array(3.0)
    yield "read-only", _frozen(np.array(3))
    yield "a bool", True


def uses(name, mode, track_running_stats):
    """Whether a call in `mode` reads or writes the attribute (torch's BatchNorm semantics)."""
    if name == "weight":
        return True
    if name == "bias":
        return mode != "backward"
    if name in ("running_mean", "running_var"):
        return mode == "eval" or (mode == "train" and track_running_stats)
    return mode == "train" and track_running_stats  # num_batches_tracked


def writes(name, mode, track_running_stats):
    return name in ("running_mean", "running_var", "num_batches_tracked") and mode == "train" \
        and track_running_stats


# ---------------------------------------------------------------------------------------------
# Module cases
# ---------------------------------------------------------------------------------------------

def _module(kind, affine, track, dtype, seed=0):
    make, shape = MODULES[kind]
    module_dtype = np.float32 if dtype == np.float16 else dtype
    bn = make(affine=affine, track_running_stats=track, dtype=module_dtype)
    rng = np.random.default_rng(seed)
    for name in PER_CHANNEL:
        value = getattr(bn, name)
        if value is not None:
            value[...] = rng.uniform(0.5, 2.0, C)
    if track:
        bn.num_batches_tracked[...] = 3
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return bn, x, dy, module_dtype


def _call(bn, mode, x, dy):
    """Run mode; backward after a training forward made before the state was changed."""
    if mode == "backward":
        return bn.backward(dy)
    bn.train(mode == "train")
    return bn(x)


def _record(bn):
    """Everything a call may change, as it is now (arrays copied bit for bit)."""
    state = {}
    for name in PER_CHANNEL + ("num_batches_tracked", "grad_weight", "grad_bias"):
        value = getattr(bn, name)
        copy = np.array(value, copy=True) if isinstance(value, np.ndarray) else None
        state[name] = (value, copy)
    return state, bn._saved


def _unchanged(bn, before):
    state, saved = before
    for name, (value, copy) in state.items():
        now = getattr(bn, name)
        if now is not value:
            return f"{name} was replaced"
        if copy is not None and (now.dtype != copy.dtype or now.tobytes() != copy.tobytes()):
            return f"{name} was written"
    if bn._saved is not saved:
        return "the saved forward was replaced"
    return None


def module_cases(kind, dtype_name):
    """(label, function returning None or a failure) for one module class and input dtype."""
    dtype = DTYPES[dtype_name]
    for affine in (True, False):
        for track in (True, False):
            config = f"{kind} {dtype_name} affine={affine} track_running_stats={track}"
            _, _, _, module_dtype = _module(kind, affine, track, dtype)
            names = [n for n in PER_CHANNEL if affine or n not in ("weight", "bias")]
            names = [n for n in names if track or n not in ("running_mean", "running_var")]
            for name in names:
                required = name in ("running_mean", "running_var")
                for label, value in bad_per_channel(module_dtype, required):
                    for mode in MODES:
                        yield (f"{config}: {name} = {label}, {mode}",
                               _bad_case(kind, affine, track, dtype, name, value, mode))
                for label, value, copy in valid_per_channel(module_dtype):
                    for mode in MODES:
                        yield (f"{config}: {name} = {label}, {mode}",
                               _valid_case(kind, affine, track, dtype, name, value, copy, mode))
                ro = _frozen(getattr(_module(kind, affine, track, dtype)[0], name))
                for mode in MODES:
                    label = f"{config}: {name} = read-only, {mode}"
                    if writes(name, mode, track):
                        yield label, _bad_case(kind, affine, track, dtype, name, ro, mode)
                    else:
                        yield label, _valid_case(kind, affine, track, dtype, name, ro,
                                                 np.array(ro), mode)
            if track:
                for label, value in bad_counters():
                    for mode in MODES:
                        yield (f"{config}: num_batches_tracked = {label}, {mode}",
                               _bad_case(kind, affine, track, dtype, "num_batches_tracked",
                                         value, mode))


def _bad_case(kind, affine, track, dtype, name, value, mode):
    def case():
        bn, x, dy, _ = _module(kind, affine, track, dtype)
        if mode == "backward":
            bn(x)
        setattr(bn, name, value)
        before = _record(bn)
        if not uses(name, mode, track):
            # Not read: the call works and gives the bits of a module with its own state.
            reference, x_ref, dy_ref, _ = _module(kind, affine, track, dtype)
            if mode == "backward":
                reference(x_ref)
            expected = _call(reference, mode, x_ref, dy_ref)
            try:
                got = _call(bn, mode, x, dy)
            except Exception as exc:  # noqa: BLE001 - reported
                return f"raised {type(exc).__name__}: {exc} for an attribute it does not use"
            return None if got.tobytes() == expected.tobytes() else "output differs"
        try:
            _call(bn, mode, x, dy)
        except (TypeError, ValueError) as exc:
            if name not in str(exc):
                return f"{type(exc).__name__} does not name {name}: {exc}"
            return _unchanged(bn, before)
        except Exception as exc:  # noqa: BLE001 - reported
            return f"raised {type(exc).__name__}, not TypeError or ValueError: {exc}"
        return "accepted"
    return case


def _valid_case(kind, affine, track, dtype, name, value, copy, mode):
    def case():
        bn, x, dy, _ = _module(kind, affine, track, dtype)
        reference, _, _, _ = _module(kind, affine, track, dtype)
        if mode == "backward":
            bn(x)
            reference(x)
        setattr(bn, name, value)
        setattr(reference, name, copy)
        expected = _call(reference, mode, x, dy)
        got = _call(bn, mode, x, dy)
        if got.tobytes() != expected.tobytes():
            return "output differs from the call on an ordinary copy"
        for attr in PER_CHANNEL + ("num_batches_tracked",):
            a, b = getattr(bn, attr), getattr(reference, attr)
            if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
                return f"{attr} differs from the call on an ordinary copy"
        return None
    return case


# ---------------------------------------------------------------------------------------------
# Functional cases: each per-channel array argument of each entry point
# ---------------------------------------------------------------------------------------------

def _functional_calls(dtype):
    """name -> (function of the per-channel arguments, their good values, the arguments it
    writes, the arguments that take any array-like of real numbers (converted to float64))."""
    rng = np.random.default_rng(1)
    compute = np.float32 if dtype == np.float16 else dtype
    x = rng.standard_normal((3, C, 5)).astype(dtype)
    dy = rng.standard_normal((3, C, 5)).astype(dtype)
    params = {"weight": rng.uniform(0.5, 2, C).astype(compute),
              "bias": rng.uniform(-1, 1, C).astype(compute),
              "running_mean": rng.uniform(-1, 1, C).astype(compute),
              "running_var": rng.uniform(0.5, 2, C).astype(compute)}
    stats = {"mean": rng.uniform(-1, 1, C), "invstd": rng.uniform(0.5, 2, C),
             "sum_dy": rng.uniform(-1, 1, C), "sum_dy_xmu": rng.uniform(-1, 1, C)}
    count = 15
    return {
        "batch_norm (training)": (
            lambda a: F.batch_norm(x, a["running_mean"], a["running_var"], a["weight"],
                                   a["bias"], training=True),
            params, ("running_mean", "running_var"), ()),
        "batch_norm (eval)": (
            lambda a: F.batch_norm(x, a["running_mean"], a["running_var"], a["weight"],
                                   a["bias"], training=False),
            params, (), ()),
        "batch_norm_backward": (
            lambda a: F.batch_norm_backward(dy, x, a["mean"], a["invstd"], a["weight"], True)[0],
            {"weight": params["weight"], "mean": stats["mean"], "invstd": stats["invstd"]},
            (), ("mean", "invstd")),
        "batch_norm_elemt": (
            lambda a: F.batch_norm_elemt(x, a["mean"], a["invstd"], a["weight"], a["bias"]),
            {"weight": params["weight"], "bias": params["bias"], "mean": stats["mean"],
             "invstd": stats["invstd"]}, (), ("mean", "invstd")),
        "batch_norm_backward_reduce": (
            lambda a: np.concatenate(F.batch_norm_backward_reduce(dy, x, a["mean"])),
            {"mean": stats["mean"]}, (), ("mean",)),
        "batch_norm_backward_elemt": (
            lambda a: F.batch_norm_backward_elemt(dy, x, a["mean"], a["invstd"], a["weight"],
                                                  a["sum_dy"], a["sum_dy_xmu"], count),
            {"weight": params["weight"], **stats}, (), tuple(stats)),
    }


#: What the functional API's statistics arguments (mean, invstd, sums) convert to float64.
CONVERTED_STATISTICS = ("a list", "a tuple", "an array-like (as a tensor)", "dtype float32",
                        "dtype float16", "byte-swapped")


def functional_cases(dtype_name):
    dtype = DTYPES[dtype_name]
    compute = np.float32 if dtype == np.float16 else dtype
    for function, (call, good, written, array_likes) in _functional_calls(dtype).items():
        for name in good:
            kind = np.float64 if name in array_likes else compute
            required = name in array_likes or name in ("running_mean", "running_var") \
                and "eval" in function
            for label, value in bad_per_channel(kind, required):
                # statistics take float data of any width or byte order, converted to float64
                accepted = name in array_likes and label in CONVERTED_STATISTICS
                yield (f"{function} {dtype_name}: {name} = {label}",
                       _functional_case(call, good, written, name, value, accepted))
            for label, value, copy in valid_per_channel(kind):
                yield (f"{function} {dtype_name}: {name} = {label}",
                       _functional_valid(call, good, written, name, value, copy))


def _fresh(good):
    return {k: np.array(v, copy=True) for k, v in good.items()}


def _functional_case(call, good, written, name, value, accepted):
    def case():
        args = _fresh(good)
        args[name] = value
        kept = {k: np.array(args[k], copy=True) for k in written if k != name}
        try:
            call(args)
        except (TypeError, ValueError) as exc:
            if accepted:
                return f"refused a value it converts: {type(exc).__name__}: {exc}"
            if name not in str(exc):
                return f"{type(exc).__name__} does not name {name}: {exc}"
            for k, v in kept.items():
                if args[k].tobytes() != v.tobytes():
                    return f"{k} was written by a call that failed"
            return None
        except Exception as exc:  # noqa: BLE001 - reported
            return f"raised {type(exc).__name__}, not TypeError or ValueError: {exc}"
        return None if accepted else "accepted"
    return case


def _functional_valid(call, good, written, name, value, copy):
    def case():
        args, reference = _fresh(good), _fresh(good)
        args[name], reference[name] = value, copy
        expected, got = call(reference), call(args)
        if np.asarray(got).tobytes() != np.asarray(expected).tobytes():
            return "output differs from the call on an ordinary copy"
        for k in written:
            if not np.array_equal(args[k], reference[k]):
                return f"{k} differs from the call on an ordinary copy"
        return None
    return case


# ---------------------------------------------------------------------------------------------

def groups():
    """The groups of cases, one subprocess each."""
    for kind in MODULES:
        for dtype_name in DTYPES:
            yield f"module:{kind}:{dtype_name}"
    for dtype_name in DTYPES:
        yield f"functional:{dtype_name}"


def cases(group):
    kind, *rest = group.split(":")
    return module_cases(*rest) if kind == "module" else functional_cases(*rest)


def run(group):
    """Run a group's cases, each announced on stderr before it runs (a crash names it), each
    result a JSON line on stdout."""
    for label, case in cases(group):
        print(f"running: {label}", file=sys.stderr, flush=True)
        try:
            failure = case()
        except Exception as exc:  # noqa: BLE001 - a defect of the case itself, reported
            failure = f"the case itself raised {type(exc).__name__}: {exc}"
        print(json.dumps({"case": label, "failure": failure}), flush=True)


if __name__ == "__main__":
    run(sys.argv[1])
