"""pytest-benchmark suites: fastbn and its peers on the suite's shapes (NCHW planes, 1x1 planes,
BatchNorm1d's (N, C) and (N, C, L), batch-1 and small tensors), grouped by operation and shape,
with the bandwidth floor (an OpenMP copy of the same bytes) in each group.

    python -m pytest benchmarks --benchmark-columns=median,iqr,rounds --benchmark-sort=name

The cases and implementations are fastbn.bench's (``python -m fastbn bench`` prints the same
comparison as a table with ratios).  FASTBN_BENCH_THREADS sets the thread count (default 2);
FASTBN_BENCH_QUICK=1 restricts to the quick shapes; FASTBN_BENCH_DTYPE the data's dtype
(float32, float64, float16 or bfloat16; half data against torch on the same dtype).  Nothing
here asserts a timing.
"""

import os

import numpy as np
import pytest

from fastbn import bench
from fastbn._dispatch import kernels

pytest.importorskip("pytest_benchmark")

THREADS = int(os.environ.get("FASTBN_BENCH_THREADS", "2"))
DTYPE = bench.data_dtype(os.environ.get("FASTBN_BENCH_DTYPE", "float32"))
SHAPES = bench.QUICK_SHAPES if os.environ.get("FASTBN_BENCH_QUICK") else bench.SHAPES
OPS = list(bench.OPS) + [op for op in bench.VARIANTS]
IMPLEMENTATIONS = ["fastbn"] + [p for p in bench.PEERS if bench.peer_version(p)]


def cases():
    for shape in SHAPES:
        for op in OPS:
            if op in bench.VARIANTS and shape not in bench.FEATURE_SHAPES:
                continue
            if bench.split_op(op)[0] != "eval" and np.prod(shape) // shape[1] < 2:
                continue  # one value per channel: eval only
            yield op, shape


def data(op, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32).astype(DTYPE)
    dy = rng.standard_normal(shape).astype(np.float32).astype(DTYPE)
    variant = bench.split_op(op)[1]
    return bench.variant_input(variant, x), bench.variant_input(variant, dy)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS + ["floor"])
@pytest.mark.parametrize("op,shape", list(cases()), ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_batchnorm(benchmark, impl, op, shape):
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {DTYPE.name} ({THREADS} threads)"
    x, dy = data(op, shape)
    if impl == "floor":
        # One copy of the data, the floor's yardstick: the operation's floor is this time
        # times passes / 2 (passes listed in fastbn.bench).
        src, dst = np.ascontiguousarray(x), np.empty(x.shape, x.dtype)
        benchmark.extra_info["passes"] = bench.passes(op)
        benchmark(kernels.parallel_copy, src, dst, THREADS)
        return
    fn = bench.IMPLEMENTATIONS[impl](op, x, dy, THREADS)
    if fn is None:
        pytest.skip(f"{impl} has no {op}")
    benchmark(fn)
