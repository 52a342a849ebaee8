"""Memory: no growth over many calls, and no memory touched that a call does not need.

Three meters, since a leak can hide from any one of them:
* the C heap's bytes in use (glibc's mallinfo2: the kernels' work arrays and numpy's array
  data are malloc'd), exact to the byte;
* tracemalloc, for Python objects (the modules' saved state, validation);
* the resident set size (/proc/self/statm), for anything else, page-granular.

The main test runs 10**5 forward+backward calls on a small module (about 1 s); the sweep
over every kernel entry point, both layouts and both dtypes runs fewer calls each.  The
sanitizer run (.ci/sanitize, README "Reliability") checks the kernels' memory accesses.
"""

import ctypes
import ctypes.util
import gc
import os
import sys
import tracemalloc

import numpy as np
import pytest

import fastbn
from fastbn import functional as F

from conftest import forced_layout



def _sanitized():
    """Whether AddressSanitizer's allocator stands in for malloc (.ci/sanitize): its
    quarantine holds freed memory back, so the meters below do not apply."""
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's mallinfo2"),
    pytest.mark.skipif(_sanitized(), reason="under AddressSanitizer (.ci/sanitize), which replaces malloc"),
]


def _mallinfo2():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2


MALLINFO2 = _mallinfo2()


def heap_in_use():
    """Bytes malloc has handed out and not had back (arena chunks and mmap'd blocks)."""
    if MALLINFO2 is None:
        pytest.skip("this C library has no mallinfo2 (glibc >= 2.33)")
    info = MALLINFO2()
    return info.uordblks + info.hblkhd


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def growth(step, calls, warmup=2000):
    """(C heap, Python, RSS) bytes gained over `calls` calls of step(i), after a warm-up
    that fills every cache (numpy's, the allocator's)."""
    # Each reading follows a full collection, which also empties CPython's free lists: memory
    # they hold (freed objects kept for reuse) would otherwise count as growth, by chance.
    for i in range(warmup):
        step(i)
    gc.collect()
    heap0, rss0 = heap_in_use(), rss()
    for i in range(calls):
        step(i)
    gc.collect()
    heap, resident = heap_in_use() - heap0, rss() - rss0
    tracemalloc.start()
    try:
        for i in range(warmup):
            step(i)
        gc.collect()
        traced0 = tracemalloc.get_traced_memory()[0]
        for i in range(calls // 4):  # tracemalloc slows calls down ~3x
            step(i)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - traced0
    finally:
        tracemalloc.stop()
    return heap, traced, resident


def assert_no_growth(what, calls, heap, traced, resident):
    # A leak of one byte per call would show as `calls` bytes; these allow for allocator noise.
    assert heap < 4096, f"{what}: the C heap grew by {heap} bytes over {calls} calls"
    assert traced < 4096, f"{what}: Python allocations grew by {traced} bytes over {calls // 4} calls"
    assert resident < 2 ** 20, f"{what}: the resident set grew by {resident / 2 ** 10:.0f} KiB over {calls} calls"


def test_no_growth_over_100000_forward_backward_calls():
    bn = fastbn.BatchNorm2d(2, momentum=None)
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)
    dy = np.ones_like(x)

    def step(i):
        bn.train(i % 4 != 3)  # training and eval forwards and backwards
        bn(x)
        bn.backward(dy)

    calls = 100_000
    assert_no_growth("BatchNorm2d forward+backward", calls, *growth(step, calls))
    assert int(bn.num_batches_tracked) == (calls + 2 * 2000 + calls // 4) * 3 // 4


def _entry_points(shape, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    kd = np.float32 if dtype == np.float16 else dtype
    rm, rv, w = np.zeros(c, kd), np.ones(c, kd), np.ones(c, kd)
    mean, invstd = np.zeros(c), np.ones(c)
    out = np.empty_like(x)
    count = x.size // c
    return [
        lambda: F.batch_norm(x, rm, rv, w, w, training=True),
        lambda: F.batch_norm(x, rm, rv, w, w, training=False, out=out),
        lambda: F.batch_norm_backward(dy, x, mean, invstd, w, True),
        lambda: F.batch_norm_backward(dy, x, mean, invstd, None, False),
        lambda: F.batch_stats(x),
        lambda: F.merge_stats(F.batch_stats(x), F.batch_stats(x)),
        lambda: F.batch_norm_elemt(x, mean, invstd, w, None),
        lambda: F.batch_norm_backward_reduce(dy, x, mean),
        lambda: F.batch_norm_backward_elemt(dy, x, mean, invstd, w, mean, mean, count),
        lambda: F.batch_norm(x[:, :, ::2] if x.ndim > 2 else x[::2], None, None, training=True),
    ]


@pytest.mark.parametrize("layout", ["planar", "columns"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_no_growth_in_any_kernel_entry_point(layout, dtype):
    calls = 400
    with forced_layout(layout):
        for shape in [(5, 3, 40), (70, 6)]:
            entries = _entry_points(shape, dtype)
            heap, traced, resident = growth(lambda i: [f() for f in entries], calls, warmup=100)
            assert_no_growth(f"{len(entries)} entry points on {shape} {np.dtype(dtype).name}, {layout} layout",
                             calls * len(entries), heap, traced, resident)


def test_no_growth_over_rejected_calls():
    bn = fastbn.BatchNorm2d(3)
    bad = [np.zeros((2, 4, 3, 3), np.float32), np.zeros((2, 3, 3, 3), np.int64), "x",
           np.broadcast_to(np.float32(0), (2 ** 22, 3, 2 ** 12, 2 ** 12))]

    def step(i):
        try:
            bn(bad[i % len(bad)])
        except (TypeError, ValueError, MemoryError):
            pass
        else:
            raise AssertionError("a bad input was accepted")

    calls = 20_000
    assert_no_growth("rejected forwards", calls, *growth(step, calls))


def test_an_empty_batch_touches_no_memory_per_channel():
    # N = 0: nothing to compute, whatever C.  The (C,) statistics returned are zeros from
    # calloc (pages mapped on first read), not filled: 2**26 channels cost no resident 1 GiB.
    x = np.zeros((0, 2 ** 26), np.float32)
    before = rss()
    y, mean, invstd = F.batch_norm_forward(x, None, None, training=True)
    grew = rss() - before
    assert y.shape == x.shape and mean.shape == invstd.shape == (2 ** 26,)
    assert grew < 64 * 2 ** 20, f"an empty batch of 2**26 channels made {grew / 2 ** 20:.0f} MiB resident"
    assert not mean[:: 2 ** 16].any() and not invstd[-5:].any()


def test_the_meters_notice_a_leak_of_one_small_block_a_call():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    kept = []
    heap, traced, _ = growth(lambda i: kept.append(libc.malloc(16)), 1000, warmup=10)
    assert heap >= 16 * 1000, f"the C heap meter saw {heap} bytes of 16000 leaked"
    assert traced >= 1000 // 4 * 8, f"tracemalloc saw {traced} bytes for {1000 // 4} list entries"
    for p in kept:
        libc.free(ctypes.c_void_p(p))
