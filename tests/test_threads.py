"""Thread control: fastbn.get_num_threads/set_num_threads, the functional API's n_threads, and
threadpoolctl finding and limiting fastbn's OpenMP runtime."""

import inspect
import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastbn
from fastbn import _openmp
from fastbn import functional as F

OPENMP = _openmp.openmp_enabled()
needs_openmp = pytest.mark.skipif(not OPENMP, reason="built without OpenMP")


@pytest.fixture(autouse=True)
def restore_thread_count():
    """Every test leaves the calling thread's OpenMP setting as it found it."""
    saved = fastbn.get_num_threads()
    yield
    fastbn.set_num_threads(saved)


# -- get_num_threads / set_num_threads ---------------------------------------------------------

def test_get_num_threads_is_the_default_of_n_threads():
    n = fastbn.get_num_threads()
    assert isinstance(n, int) and n >= 1
    assert _openmp.effective_n_threads(None) == n


@needs_openmp
@pytest.mark.parametrize("n", [1, 2, 3, np.int64(2)])
def test_set_num_threads_round_trips(n):
    fastbn.set_num_threads(n)
    assert fastbn.get_num_threads() == int(n)
    assert _openmp.effective_n_threads(None) == int(n)


@pytest.mark.skipif(OPENMP, reason="a build with OpenMP")
def test_serial_build_stays_on_one_thread():
    fastbn.set_num_threads(4)
    assert fastbn.get_num_threads() == 1
    assert _openmp.effective_n_threads(None) == 1 and _openmp.effective_n_threads(8) == 1


@pytest.mark.parametrize("n,error,message", [
    (0, ValueError, "at least 1, got 0"),
    (-1, ValueError, "at least 1, got -1"),
    (2**31, ValueError, "at most"),
    (1.5, TypeError, "must be an int, got float"),
    ("2", TypeError, "must be an int, got str"),
    (None, TypeError, "must be an int, got NoneType"),
    (True, TypeError, "got bool"),
])
def test_set_num_threads_rejects(n, error, message):
    before = fastbn.get_num_threads()
    with pytest.raises(error, match=message):
        fastbn.set_num_threads(n)
    assert fastbn.get_num_threads() == before


def _in_new_thread(function):
    result = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


@needs_openmp
def test_the_setting_belongs_to_the_calling_python_thread():
    """OpenMP's nthreads-var is per thread: a new thread starts from the process default, not
    from the main thread's setting, and a worker's setting does not reach the main thread."""
    default = _in_new_thread(fastbn.get_num_threads)  # OMP_NUM_THREADS, else the CPU count
    fastbn.set_num_threads(default + 1)

    def worker():
        at_start = fastbn.get_num_threads()
        fastbn.set_num_threads(1)
        return at_start, fastbn.get_num_threads()

    at_start, after_set = _in_new_thread(worker)
    assert at_start == default, f"a new thread started at {at_start}, not at the default {default}"
    assert after_set == 1
    assert fastbn.get_num_threads() == default + 1, "a worker thread's set_num_threads reached the main thread"


# -- the functional API's n_threads ------------------------------------------------------------

def _public_functions():
    return [(name, getattr(F, name)) for name in F.__all__]


@pytest.mark.parametrize("name,function", _public_functions())
def test_functional_entry_points_take_n_threads_alike(name, function):
    """Every kernel-backed function takes n_threads=None, keyword-only, and documents it;
    merge_stats runs no kernel and takes none."""
    parameters = inspect.signature(function).parameters
    if name == "merge_stats":
        assert "n_threads" not in parameters
        return
    p = parameters.get("n_threads")
    assert p is not None, f"{name} has no n_threads"
    assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None, f"{name}: {p}"
    # A numpydoc parameter line starts at the docstring's own indentation, which Python 3.13
    # strips at compile time and earlier versions keep: compare the cleaned text.
    doc = inspect.cleandoc(function.__doc__ or "")
    documented = re.search(r"^[\w, ]*\bn_threads\b", doc, re.MULTILINE)
    assert documented, f"{name}'s docstring has no n_threads parameter"


def _call_every_function(x, dy, n_threads):
    """The outputs of every kernel-backed functional entry point on (x, dy)."""
    c = x.shape[1]
    w = np.linspace(0.5, 1.5, c).astype(x.dtype)
    b = np.linspace(-1, 1, c).astype(x.dtype)
    rm, rv = np.zeros(c, x.dtype), np.ones(c, x.dtype)
    y, mean, invstd = F.batch_norm_forward(x, rm, rv, w, b, True, n_threads=n_threads)
    count = x.size // c
    outputs = [y, mean, invstd, rm, rv,
               F.batch_norm(x, rm, rv, w, b, False, n_threads=n_threads),
               *F.batch_norm_backward(dy, x, mean, invstd, w, True, n_threads=n_threads),
               *F.batch_stats(x, n_threads=n_threads)[1:],
               F.batch_norm_elemt(x, mean, invstd, w, b, n_threads=n_threads)]
    sums = F.batch_norm_backward_reduce(dy, x, mean, n_threads=n_threads)
    outputs += [*sums, F.batch_norm_backward_elemt(dy, x, mean, invstd, w, *sums, count, n_threads=n_threads)]
    return outputs


@pytest.mark.parametrize("limit", ["set_num_threads", "threadpoolctl"])
def test_default_thread_count_changes_no_result(limit, rng):
    """n_threads=None under a limit of 1 gives the bits of an explicit n_threads=2 (shapes
    large enough for several threads, in both layouts)."""
    for shape in [(8, 4, 64, 64), (4096, 64)]:
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        expected = _call_every_function(x, dy, 2)
        if limit == "set_num_threads":
            fastbn.set_num_threads(1)
            got = _call_every_function(x, dy, None)
        else:
            threadpoolctl = pytest.importorskip("threadpoolctl")
            with threadpoolctl.threadpool_limits(1, user_api="openmp"):
                got = _call_every_function(x, dy, None)
        for i, (a, b) in enumerate(zip(got, expected)):
            np.testing.assert_array_equal(a, b, err_msg=f"output {i} of shape {shape}")


# -- threadpoolctl -----------------------------------------------------------------------------

@needs_openmp
def test_threadpoolctl_finds_fastbns_openmp_runtime():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    library = _openmp.openmp_library()
    if library is None:
        pytest.skip("the OpenMP library cannot be located on this platform")
    runtimes = [info for info in threadpoolctl.threadpool_info() if info["user_api"] == "openmp"]
    paths = {os.path.realpath(info["filepath"]) for info in runtimes}
    assert os.path.realpath(library) in paths, f"fastbn's runtime {library} is not among {paths}"


@needs_openmp
@pytest.mark.parametrize("kwargs", [{}, {"user_api": "openmp"}])
def test_threadpool_limits_limits_and_restores(kwargs):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    fastbn.set_num_threads(2)
    with threadpoolctl.threadpool_limits(1, **kwargs):
        assert fastbn.get_num_threads() == 1
        assert _openmp.effective_n_threads(None) == 1
    assert fastbn.get_num_threads() == 2


# The OS threads a process has (Linux): libgomp keeps its worker threads alive after a parallel
# region, so a count that does not grow proves that no region ran on more than one thread.
THREAD_COUNT_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    import fastbn
    from fastbn import functional as F

    def os_threads():
        return len(os.listdir("/proc/self/task"))

    def work():
        x = np.random.default_rng(0).standard_normal((8, 16, 64, 64)).astype(np.float32)
        bn = fastbn.BatchNorm2d(16)
        bn.backward(bn(x))
        bn.eval()(x)
        F.batch_norm(x, None, None, training=True)

    start = os_threads()
    steps = []
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        with threadpool_limits(1):
            work()
        steps.append(("threadpool_limits(1)", os_threads()))
    fastbn.set_num_threads(1)
    work()
    steps.append(("set_num_threads(1)", os_threads()))
    fastbn.set_num_threads(2)
    work()
    steps.append(("set_num_threads(2)", os_threads()))
    print(start, steps)
    for name, count in steps[:-1]:
        assert count == start, f"{name}: the process went from {start} to {count} threads"
    assert steps[-1][1] > start, f"set_num_threads(2): still {steps[-1][1]} threads"
""")


@needs_openmp
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_kernels_really_run_on_the_limited_thread_count():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["OPENBLAS_NUM_THREADS"] = "1"  # numpy's BLAS threads would blur the count
    result = subprocess.run([sys.executable, "-c", THREAD_COUNT_SCRIPT], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
