"""Coverage-guided fuzzing of the compiled kernels' entry points, meant for the sanitizer build.

    .ci/sanitize --run python tests/fuzz/fuzz_kernels.py -max_total_time=60

Each input picks an entry point of a kernel module this CPU runs (every SIMD level built),
a geometry (N, C, spatial sizes, zeros included) and, for each argument, either what the
kernel expects -- the right dtype, shape and layout -- or one thing wrong with it: another
dtype (float16/32/64, bfloat16, int, bool, complex, byte-swapped), another length or
number of dimensions, a strided, reversed, Fortran-ordered, misaligned or read-only view,
None, a scalar.  Most arguments are right, so that the kernels' loops run on odd geometries;
the wrong ones test the contract checks of issue #18.

The contract checked: the call returns, or raises TypeError, ValueError or MemoryError (or
OverflowError for an n_threads beyond a C int).  Anything else, a crash, or -- under
.ci/sanitize, where the kernels are built with AddressSanitizer and UBSan -- any
out-of-bounds access or undefined behaviour is a finding.  The calls are serial and parallel
(n_threads 1 or 2), so OpenMP's partition is fuzzed too.
"""

import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["fastbn"]):
    from fastbn import _dispatch, functional

try:
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BFLOAT16 = None

MODULES = [_dispatch.load(level)[1] for level in _dispatch.available_levels()]

# Each entry point's arguments: x/y-like arrays ("data"), per-channel arrays of the data's
# dtype family ("param"), per-channel float64 work arrays ("f64"), optional ones ("param?",
# "data?"), the eval table ("table"), floats, counts, threads and flags.
SIGNATURES = {
    "moments": ["data", "f64", "f64", "threads", "f64?"],
    "normalize_given": ["data", "out", "param?", "param?", "f64", "f64", "threads", "flag"],
    "forward_train": ["data", "out", "param?", "param?", "param?", "param?", "float", "eps",
                      "f64", "f64", "threads", "flag"],
    "forward_train_with_stats": ["data", "out", "param?", "param?", "param?", "param?", "float",
                                 "eps", "count", "f64", "f64", "f64", "f64", "threads", "flag"],
    "forward_eval": ["data", "out", "param?", "param?", "param", "param", "eps", "f64", "f64",
                     "threads", "flag"],
    "eval_table": ["param?", "param?", "param", "param", "eps", "table", "f64", "f64"],
    "apply_table": ["data", "out", "table", "threads", "flag"],
    "grad_sums": ["data", "data", "f64", "f64", "f64", "threads", "data?"],
    "backward": ["data", "data", "out", "param?", "f64", "f64", "param?", "param?", "flag",
                 "threads", "data?"],
    "backward_from_sums": ["data", "data", "out", "param?", "f64", "f64", "f64", "f64", "count",
                           "threads", "data?"],
    "parallel_copy": ["data", "out", "threads", "flag"],
    "convert_float16": ["data", "out", "threads"],
    "convert_bfloat16": ["data", "out", "threads"],
}
# The functional API on the same arguments: its Python layer gives the fuzzer coverage to
# steer by (the compiled kernels give none), and it reaches the kernels through the pipeline.
FUNCTIONAL = {
    "batch_norm": ["data", "param?", "param?", "param?", "param?", "flag", "float", "eps"],
    "batch_norm_backward": ["data", "data", "f64", "f64", "param?", "flag"],
    "batch_norm_elemt": ["data", "f64", "f64", "param?", "param?"],
    "batch_norm_backward_reduce": ["data", "data", "f64"],
}
NAMES = sorted(SIGNATURES) + [f"functional.{name}" for name in sorted(FUNCTIONAL)]
DTYPES = [np.dtype(t) for t in ("float32", "float64", "float16", "int32", "bool", "complex64",
                                ">f4", "uint16", "float32", "float32")]
if BFLOAT16 is not None:
    DTYPES.append(BFLOAT16)
EXPECTED = (TypeError, ValueError, MemoryError, OverflowError)


class Call:
    def __init__(self, fdp):
        self.fdp = fdp
        self.dtype = self.pick([np.dtype("float32"), np.dtype("float64"), np.dtype("float16")]
                               + ([BFLOAT16] if BFLOAT16 is not None else []))
        ndim = self.int(2, 5)
        self.shape = tuple(self.int(0, 5) for _ in range(ndim))
        self.channels = self.shape[1]
        self.channels_last = self.fdp.ConsumeProbability() < 0.2

    def int(self, low, high):
        return self.fdp.ConsumeIntInRange(low, high)

    def pick(self, options):
        return options[self.fdp.ConsumeIntInRange(0, len(options) - 1)]

    def wrong(self):
        return self.fdp.ConsumeProbability() < 0.15

    def array(self, shape, dtype):
        """An array of ``shape`` and ``dtype``, in the right layout, or something wrong."""
        if self.wrong():
            kind = self.int(0, 9)
            if kind == 0:
                return None
            if kind == 1:
                return 1.5
            if kind == 2:
                dtype = self.pick(DTYPES)
            elif kind == 3:
                shape = tuple(max(0, n + self.int(-1, 1)) for n in shape) or (self.int(0, 3),)
            elif kind == 4:
                shape = shape + (self.int(0, 3),) if self.int(0, 1) else shape[:-1]
            else:
                return self.view(self.filled(shape, dtype), kind)
        return self.filled(shape, dtype)

    def filled(self, shape, dtype):
        size = int(np.prod(shape, dtype=np.int64))
        raw = self.fdp.ConsumeBytes(min(size, 64) * dtype.itemsize)
        base = np.zeros(size, dtype=dtype)
        if raw:
            chunk = np.frombuffer(raw[:len(raw) - len(raw) % dtype.itemsize], dtype=dtype)
            base[:chunk.size] = chunk
        if self.channels_last and len(shape) >= 3:  # (N, C, ...) with C varying fastest
            moved = (shape[0],) + shape[2:] + (shape[1],)
            return np.moveaxis(base.reshape(moved), -1, 1)
        return base.reshape(shape)

    def view(self, array, kind):
        if kind == 5 and array.ndim:
            return array[..., ::-1]
        if kind == 6:
            return np.asfortranarray(array)
        if kind == 7:  # misaligned: one byte into a buffer
            buffer = np.zeros(array.nbytes + 1, np.uint8)[1:]
            view = buffer.view(array.dtype).reshape(array.shape) if array.size else array
            view[...] = array
            return view
        if kind == 8:
            array = array.copy()
            array.flags.writeable = False
            return array
        repeated = np.repeat(array, 2, axis=-1) if array.ndim else array
        return repeated[..., ::2] if array.ndim else repeated

    def argument(self, kind, data_dtype):
        c = self.channels
        if kind in ("data", "out"):
            return self.array(self.shape, data_dtype)
        if kind == "data?":
            return None if self.int(0, 1) else self.array(self.shape, data_dtype)
        if kind == "param":
            return self.array((c,), np.dtype("float32") if data_dtype.itemsize == 2 else data_dtype)
        if kind == "param?":
            return None if self.int(0, 2) == 0 else self.argument("param", data_dtype)
        if kind == "f64":
            return self.array((c,), np.dtype("float64"))
        if kind == "f64?":
            return None if self.int(0, 1) else self.array((c,), np.dtype("float64"))
        if kind == "table":
            return self.array((2, c), np.dtype("float32"))
        if kind == "float":
            return self.pick([0.1, 0.0, 1.0, -1.0, float("nan"), float("inf"), 1e300])
        if kind == "eps":
            return self.pick([1e-5, 0.0, -1.0, float("nan"), float("inf"), 1e-300])
        if kind == "count":
            return self.pick([float(max(1, int(np.prod(self.shape)) // max(c, 1))), 0.0, -1.0,
                              1.0, float("nan"), 1e300])
        if kind == "threads":
            return self.pick([1, 2, 2, 0, -1, 2**40])
        if kind == "flag":
            return self.pick([False, True])
        raise AssertionError(kind)


def test_one_input(data):
    fdp = atheris.FuzzedDataProvider(data)
    module = MODULES[fdp.ConsumeIntInRange(0, len(MODULES) - 1)]
    name = NAMES[fdp.ConsumeIntInRange(0, len(NAMES) - 1)]
    call = Call(fdp)
    data_dtype = call.dtype
    if name == "convert_float16":
        data_dtype = np.dtype("float16")
    elif name == "convert_bfloat16" and BFLOAT16 is not None:
        data_dtype = BFLOAT16
    if name.startswith("functional."):
        function = getattr(functional, name.split(".")[1])
        args = [call.argument(kind, data_dtype) for kind in FUNCTIONAL[name.split(".")[1]]]
        kwargs = {"n_threads": call.argument("threads", data_dtype)}
    else:
        function = getattr(module, name)
        args = [call.argument(kind, data_dtype) for kind in SIGNATURES[name]]
        kwargs = {}
        if name.startswith("convert_") and isinstance(args[1], np.ndarray):
            args[1] = call.array(call.shape, np.dtype("float32"))
    try:
        function(*args, **kwargs)
    except EXPECTED:
        pass


def main():
    for function in (test_one_input, *vars(Call).values()):  # (the choices steer too)
        if callable(function):
            atheris.instrument_func(function)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
