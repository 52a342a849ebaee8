"""Concurrency: the kernels release the GIL, so a module is used from several Python threads at
once, each call also running OpenMP threads of its own.

What is guaranteed (README, "Reliability"):
* eval mode reads the module's state only: any number of threads may call forward (and
  backward) on one module, and get the bits a single thread gets;
* a training forward updates the running statistics and num_batches_tracked under a
  per-module lock, so concurrent training steps are atomic: N steps count N batches, and the
  running statistics are those of the same N steps taken one after another in some order;
* a module keeps one saved forward and one pair of parameter gradients, the last ones made,
  whichever thread made them: forward/backward pairs from several threads on one module must
  be serialised by the caller (or each thread given its own module).

Every kernel call releases the GIL, whatever its size (proved below by an event, not a clock).
The tensors are large enough (2**17 elements and more) that every call also starts OpenMP
threads (fastbn._kernels.GRAIN is 2**15 elements per thread).
"""

import sys
import threading
import time
import types

import numpy as np
import pytest

import fastbn
from fastbn import _pipeline as P
from fastbn import functional as F
from fastbn._openmp import get_num_threads

THREADS = 8
SHAPE = (8, 16, 32, 32)  # 2**17 float32 values: 4 OpenMP work shares of fastbn._kernels.GRAIN


def run_threads(work, n=THREADS, timeout=120.0):
    """Run work(i) on n threads released together; return their results, re-raising the
    first failure with its thread's index."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def target(i):
        try:
            barrier.wait()
            results[i] = ("ok", work(i))
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = ("error", exc)

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout} s"
    for i, (status, value) in enumerate(results):
        if status == "error":
            raise AssertionError(f"thread {i} failed: {type(value).__name__}: {value}") from value
    return [value for _, value in results]


def eval_module(cls=fastbn.BatchNorm2d, c=SHAPE[1], dtype=np.float32):
    rng = np.random.default_rng(0)
    bn = cls(c, dtype=dtype)
    bn.load_state_dict({"weight": rng.uniform(0.5, 2, c), "bias": rng.standard_normal(c),
                        "running_mean": rng.standard_normal(c) * 3,
                        "running_var": rng.uniform(0.5, 4, c)}, strict=False)
    return bn.eval()


def inputs(k, shape=SHAPE, dtype=np.float32, offset=0.0):
    rng = np.random.default_rng(100)
    return [(rng.standard_normal(shape) * (1 + i) + offset).astype(dtype) for i in range(k)]


def test_shapes_are_large_enough_to_use_openmp_in_each_thread():
    assert np.prod(SHAPE) // 2 ** 15 >= 2, "the kernels would run each call on one thread"
    if get_num_threads() < 2:
        pytest.skip("OpenMP runs one thread here (OMP_NUM_THREADS=1 or no OpenMP): the "
                    "concurrency tests still run, without threads inside the calls")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_forward_and_backward_from_many_threads_give_single_thread_bits(dtype):
    bn = eval_module(dtype=dtype)
    xs = inputs(4, dtype=dtype)
    dys = inputs(4, dtype=dtype, offset=1.0)[::-1]
    expected = []
    for x, dy in zip(xs, dys):
        y = bn(x)
        expected.append((y, bn.backward(dy)))
    before = {k: v.copy() for k, v in bn.state_dict().items()}

    def work(i):
        for step in range(12):
            k = (i + step) % len(xs)
            y = bn(xs[k])
            # eval backward is weight * invstd * dy whichever thread's forward is saved
            # (all inputs share a shape); the parameter gradients are per module, not checked.
            dx = bn.backward(dys[k])
            np.testing.assert_array_equal(y, expected[k][0], err_msg=f"thread {i}, step {step}: output")
            np.testing.assert_array_equal(dx, expected[k][1], err_msg=f"thread {i}, step {step}: grad_input")

    run_threads(work)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"eval calls changed {k}")


def test_eval_forward_from_threads_with_different_shapes_and_modules():
    # Threads mixing modules, layouts (planar and columns) and shapes share nothing they write.
    cases = [(fastbn.BatchNorm1d, (4096, 32)), (fastbn.BatchNorm1d, (64, 32, 70)),
             (fastbn.BatchNorm2d, (8, 32, 24, 24)), (fastbn.BatchNorm3d, (2, 32, 8, 16, 16))]
    modules = {cls: eval_module(cls, 32) for cls, _ in cases}
    data = [(cls, inputs(1, shape)[0]) for cls, shape in cases]
    expected = [modules[cls](x) for cls, x in data]

    def work(i):
        for step in range(10):
            k = (i * 3 + step) % len(data)
            cls, x = data[k]
            np.testing.assert_array_equal(modules[cls](x), expected[k], err_msg=f"thread {i}: {cls.__name__}{x.shape}")

    run_threads(work)


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_concurrent_training_steps_are_atomic(momentum):
    # Every thread trains on the same batch from the same state (3 batches already counted,
    # running statistics far from this batch's), so every step applies the same function of
    # (running statistics, counter): whatever order the steps take, the result must be bit for
    # bit that of the same number of serial steps.  Two steps reading the counter or the
    # buffers before either had written them would apply one update twice and lose another.
    x = inputs(1, offset=5.0)[0]
    steps = 10
    start = {"running_mean": np.full(SHAPE[1], -3.0), "running_var": np.full(SHAPE[1], 9.0),
             "num_batches_tracked": 3}
    serial = fastbn.BatchNorm2d(SHAPE[1], momentum=momentum)
    serial.load_state_dict(start, strict=False)
    for _ in range(THREADS * steps):
        y_serial = serial(x)
    shared = fastbn.BatchNorm2d(SHAPE[1], momentum=momentum)
    shared.load_state_dict(start, strict=False)

    def work(i):
        for _ in range(steps):
            y = shared(x)
            np.testing.assert_array_equal(y, y_serial, err_msg=f"thread {i}: training output")

    run_threads(work)
    assert int(shared.num_batches_tracked) == 3 + THREADS * steps
    np.testing.assert_array_equal(shared.running_mean, serial.running_mean,
                                  err_msg="running_mean differs from the serial run's")
    np.testing.assert_array_equal(shared.running_var, serial.running_var,
                                  err_msg="running_var differs from the serial run's")


def test_concurrent_training_on_different_batches_is_a_cumulative_average():
    # With momentum=None the running statistics are the average over all batches, which does
    # not depend on their order except through rounding: every batch is counted exactly once.
    batches = inputs(THREADS * 4, shape=(4, 16, 32, 32))
    shared = fastbn.BatchNorm2d(16, momentum=None, dtype=np.float64)

    def work(i):
        for x in batches[i::THREADS]:
            shared(x.astype(np.float64))

    run_threads(work)
    assert int(shared.num_batches_tracked) == len(batches)
    means = np.array([x.astype(np.float64).mean(axis=(0, 2, 3)) for x in batches])
    variances = np.array([x.astype(np.float64).var(axis=(0, 2, 3), ddof=1) for x in batches])
    np.testing.assert_allclose(shared.running_mean, means.mean(axis=0), rtol=0, atol=1e-12,
                               err_msg="running_mean is not the average of the batch means")
    np.testing.assert_allclose(shared.running_var, variances.mean(axis=0), rtol=1e-12,
                               err_msg="running_var is not the average of the batch variances")


def test_load_state_dict_and_reset_do_not_interleave_with_a_training_step():
    # A state_dict is loaded, or the statistics reset, between training steps, never in the
    # middle of one: the counter and the running statistics always agree.
    x = inputs(1, offset=2.0)[0]
    bn = fastbn.BatchNorm2d(SHAPE[1], momentum=None)
    state = {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}
    stop = threading.Event()

    def trainer():
        while not stop.is_set():
            bn(x)

    t = threading.Thread(target=trainer, daemon=True)
    t.start()
    try:
        for _ in range(50):
            bn.load_state_dict(state)
            bn.reset_running_stats()
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    # With one repeated batch and momentum=None, any count >= 1 gives running_mean == the
    # batch mean (in float32 rounding) and count 0 gives the reset values.
    count = int(bn.num_batches_tracked)
    mean = x.astype(np.float64).mean(axis=(0, 2, 3))
    if count == 0:
        np.testing.assert_array_equal(bn.running_mean, 0)
    else:
        np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-5, atol=1e-5,
                                   err_msg=f"running_mean after {count} steps")


# ---------------------------------------------------------------------------------------------
# The GIL is released during every kernel call
# ---------------------------------------------------------------------------------------------
#
# Proved by an event, not a clock: a worker thread calls fastbn in a loop while this thread
# waits for the GIL.  The switch interval is raised far beyond the test's length, so the worker
# never hands the GIL over on the interpreter's schedule: this thread can run Python only when
# the worker releases the GIL itself.  The kernel module seen by fastbn._pipeline is wrapped so
# that the worker marks, under the GIL, which kernel it is inside; finding the mark set when this
# thread runs means the GIL was released inside that kernel.  However busy the machine, the
# worker keeps calling until this thread gets a turn (or gives up after a minute), so the load
# can delay the proof but not fail it.  A call that holds the GIL never lets this thread in
# while the mark is set (the negative control below).

BIG = (16, 16, 64, 64)  # 2**20 values; any size would do, since no clock is read


class WatchedKernels:
    """The kernel module, each function wrapped to record (in ``inside``) its name while it
    runs."""

    def __init__(self, kernels):
        self._kernels = kernels
        self.inside = None
        self.entered = set()

    def __getattr__(self, name):
        function = getattr(self._kernels, name)
        if not callable(function):
            return function

        def watched(*args, **kwargs):
            self.inside = name
            self.entered.add(name)
            try:
                return function(*args, **kwargs)
            finally:
                self.inside = None
        return watched


def kernel_that_ran_python_beside_it(call, watch, give_up_after=60.0):
    """Call call() on a worker thread until this thread runs Python while the worker is inside
    a kernel; return that kernel's name, or None if the worker never released the GIL inside
    one (it stops trying after give_up_after seconds of calls)."""
    seen = []
    failure = []

    def worker():
        deadline = time.monotonic() + give_up_after
        try:
            while not seen and time.monotonic() < deadline:
                call()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    previous = sys.getswitchinterval()
    sys.setswitchinterval(10 * give_up_after + 100)
    try:
        thread = threading.Thread(target=worker, daemon=True)
        thread.start()  # returns when the worker first releases the GIL (or ends)
        while thread.is_alive():
            # This thread holds the GIL here, so the worker is at a point where it released it.
            if watch.inside is not None:
                seen.append(watch.inside)
                break
            thread.join(0.001)  # hand the GIL back; resumed at the worker's next release
        thread.join(give_up_after + 60)
    finally:
        sys.setswitchinterval(previous)
    assert not thread.is_alive(), "the worker thread is still calling"
    if failure:
        raise failure[0]
    return seen[0] if seen else None


def _calls():
    x = np.random.default_rng(1).standard_normal(BIG).astype(np.float32)
    dy = np.ones_like(x)
    c = BIG[1]
    rm, rv, w = np.zeros(c, np.float32), np.ones(c, np.float32), np.ones(c, np.float32)
    mean, invstd = np.zeros(c), np.ones(c)
    one = dict(n_threads=1)
    return {
        "batch_norm (training)": lambda: F.batch_norm(x, rm, rv, w, w, training=True, **one),
        "batch_norm (eval)": lambda: F.batch_norm(x, rm, rv, w, w, training=False, **one),
        "batch_norm_backward (training)": lambda: F.batch_norm_backward(dy, x, mean, invstd, w, True, **one),
        "batch_norm_backward (eval)": lambda: F.batch_norm_backward(dy, x, mean, invstd, w, False, **one),
        "batch_stats": lambda: F.batch_stats(x, **one),
        "batch_norm_elemt": lambda: F.batch_norm_elemt(x, mean, invstd, w, w, **one),
        "batch_norm_backward_reduce": lambda: F.batch_norm_backward_reduce(dy, x, mean, **one),
        "batch_norm_backward_elemt": lambda: F.batch_norm_backward_elemt(dy, x, mean, invstd, w, mean, mean, x.size // c, **one),
    }


CALLS = _calls()


@pytest.mark.parametrize("name", list(CALLS))
def test_a_python_thread_runs_while_a_kernel_computes(name, monkeypatch):
    watch = WatchedKernels(P._kernels)
    monkeypatch.setattr(P, "_kernels", watch)
    kernel = kernel_that_ran_python_beside_it(CALLS[name], watch)
    assert watch.entered, f"{name} called no kernel"
    assert kernel is not None, (f"{name}: no other Python thread ran while it was inside "
                                f"{sorted(watch.entered)}: the GIL is not released")


def test_the_check_notices_a_kernel_that_holds_the_gil():
    # bytes.count scans in C without releasing the GIL: the main thread never runs beside it.
    data = bytes(16 * 2 ** 20)
    watch = WatchedKernels(types.SimpleNamespace(scan=lambda: data.count(b"x")))
    assert kernel_that_ran_python_beside_it(lambda: watch.scan(), watch, give_up_after=1.0) is None
    assert watch.entered == {"scan"}


def test_the_check_sees_a_call_that_releases_the_gil():
    # time.sleep releases the GIL: the positive control of the same machinery.
    watch = WatchedKernels(types.SimpleNamespace(pause=lambda: time.sleep(0.001)))
    assert kernel_that_ran_python_beside_it(lambda: watch.pause(), watch) == "pause"
