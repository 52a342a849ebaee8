"""Peak memory of half data: float16 and bfloat16 batches are read and written as they are,
never widened whole into float32, in the forwards (training and eval) and the training backward,
C-contiguous and channels-last.

Two meters, since a copy can hide from either:
* tracemalloc's peak, in this process: numpy's array data (numpy reports its allocations to
  it), so any copy the Python layer makes, a widened input or a float32 result narrowed
  afterwards;
* the resident set's high-water mark (/proc/self/status VmHWM, reset through
  /proc/self/clear_refs, after malloc_trim), in a fresh process set up so that every large
  allocation is fresh pages (tests/half_memory_worker.py): also what the kernels malloc
  themselves, which tracemalloc does not see.

The bound: beyond the result itself (the output, or grad_input), a call may use a quarter of
the input's size.  A float32 copy of the input would add twice its size, and even a second
half copy once; the kernels' own work space (per channel and per work item, and float32
blocks of a few kilobytes on the stack) comes to under 1% here.  The last test shows that
both meters do see a float32 copy.
"""

import json
import os
import subprocess
import sys

import pytest

import fastbn

import half_memory_worker as worker
from halves import ml_dtypes, storage_params
from test_memory import _sanitized

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and calls glibc's malloc_trim"),
    pytest.mark.skipif(_sanitized(), reason="under AddressSanitizer (.ci/sanitize), which replaces malloc"),
]

ALLOWANCE = 0.25  # of the input's bytes, beyond the result's
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def resident():
    """The worker's resident-set peaks, {case: [peak, result bytes, input bytes]}."""
    storages = ["float16"] + (["bfloat16"] if ml_dtypes is not None else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    env = dict(os.environ, NUMPY_MADVISE_HUGEPAGE="0", MALLOC_MMAP_THRESHOLD_=str(128 * 1024),
               PYTHONPATH=os.pathsep.join([root, HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "half_memory_worker.py"), *storages],
                          capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip(f"cannot reset the resident high-water mark here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"the memory worker failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def measured(request, meter, case, prepare):
    """[peak, result bytes, input bytes] of a case by a meter (the worker is started by the
    first test that needs it)."""
    if meter == "resident set":
        return request.getfixturevalue("resident")[case]
    return worker.measure(worker.traced_peak, *prepare())


@pytest.mark.parametrize("meter", ["tracemalloc", "resident set"])
@pytest.mark.parametrize("step", worker.STEPS)
@pytest.mark.parametrize("memory", worker.MEMORY)
@pytest.mark.parametrize("storage", storage_params("bfloat16", "float16"))
def test_half_data_is_never_widened_whole(storage, memory, step, meter, request):
    peak, result_bytes, input_bytes = measured(request, meter, f"{storage}/{memory}/{step}",
                                               lambda: worker.prepare(storage, memory, step))
    extra, allowed = peak - result_bytes, ALLOWANCE * input_bytes
    assert extra < allowed, (
        f"{storage} {memory} {step}: {meter} peak {peak / 2 ** 20:.2f} MiB, {extra / 2 ** 20:.2f} MiB "
        f"beyond the {result_bytes / 2 ** 20:.0f} MiB result; allowed {allowed / 2 ** 20:.2f} MiB "
        f"(a float32 copy of the input is {2 * input_bytes / 2 ** 20:.0f} MiB)")


@pytest.mark.parametrize("meter", ["tracemalloc", "resident set"])
def test_the_meters_see_a_float32_copy(meter, request):
    peak, result_bytes, input_bytes = measured(request, meter, "widening", worker.prepare_widening)
    assert peak - result_bytes >= 2 * input_bytes, \
        f"{meter} saw {peak / 2 ** 20:.2f} MiB for a call holding {4 * input_bytes / 2 ** 20:.0f} MiB of float32 copies"
