"""The calls tests/test_half_memory.py measures, and its resident-set meter's worker.

Run as a script (by the test, in a fresh process), it measures each call's resident-set peak
and prints them as JSON: {case: [peak bytes, result bytes, input bytes]}, case being
"storage/memory/step", or "widening" for the meter's own check.  The test starts it with
NUMPY_MADVISE_HUGEPAGE=0 (no transparent huge pages, whose 2 MiB faults may reach past an
array) and MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB (every large allocation its own mmap, fresh
pages when touched): so any large copy, numpy's or the kernels' own malloc, is counted whole.
In a process that has run other tests, freed memory that stays resident can hide one.
"""

import ctypes
import ctypes.util
import gc
import json
import sys
import tracemalloc

import numpy as np

import fastbn
from fastbn import functional as F

from halves import channels_last, storage_dtype

SHAPE = (32, 32, 64, 64)  # 4 Mi values: 8 MiB of half data, 16 MiB as float32
STEPS = ("train forward", "eval forward", "train backward")
MEMORY = ("C", "channels-last")


def traced_peak(call):
    """(call's result, peak bytes of Python and numpy allocations during it)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = call()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def resident_peak(call):
    """(call's result, how far the resident set's high-water mark rose above the resident set
    during it).  OSError where the mark cannot be reset."""
    gc.collect()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # freed memory back to the system, so that reusing it shows
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status("VmRSS")
    result = call()
    return result, _status("VmHWM") - before


def prepare(storage, memory, step):
    """(the call to measure, its input): data, a module warmed up (first-call allocations
    are not the call's), and for the backward its forward."""
    dtype = storage_dtype(storage)
    rng = np.random.default_rng(0)
    place = channels_last if memory == "channels-last" else (lambda a: a)
    x = place(rng.standard_normal(SHAPE, np.float32).astype(dtype))
    dy = place(rng.standard_normal(SHAPE, np.float32).astype(dtype))
    bn = fastbn.BatchNorm2d(SHAPE[1])
    bn(x)
    bn.backward(dy)
    if step == "train forward":
        return (lambda: bn.train()(x)), x
    if step == "eval forward":
        return (lambda: bn.eval()(x)), x
    bn.train()(x)
    return (lambda: bn.backward(dy)), x


def prepare_widening():
    """A forward that does widen its float16 input: float32 copies of 4x the input's bytes."""
    x = np.random.default_rng(0).standard_normal(SHAPE, np.float32).astype(np.float16)
    rm, rv = np.zeros(SHAPE[1], np.float32), np.ones(SHAPE[1], np.float32)
    return (lambda: F.batch_norm(x.astype(np.float32), rm, rv).astype(np.float16)), x


def measure(meter, call, x):
    result, peak = meter(call)
    return [int(peak), int(result.nbytes), int(x.nbytes)]


if __name__ == "__main__":
    results = {"widening": measure(resident_peak, *prepare_widening())}
    for storage in sys.argv[1:]:
        for memory in MEMORY:
            for step in STEPS:
                results[f"{storage}/{memory}/{step}"] = measure(resident_peak, *prepare(storage, memory, step))
    print(json.dumps(results))
