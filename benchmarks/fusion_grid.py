"""Fused passes against separate ones: planar channels and column tiles over their sizes.

    python benchmarks/fusion_grid.py [--threads 1] [--total-kib 3072] [--rounds 9]
                                     [--dtypes float32,float16]

Which passes are fused (statistics, then normalisation while the piece is in cache) is set by
per-CPU limits in fastbn/_tuning.pyx (INTEL_FUSION, OTHER_FUSION).  This grid is the
measurement behind them, in tensors of about --total-kib per array:

* planar channels of 1 to 32 KiB per array, one contiguous run (N = 1) or cut into 8 or 32
  samples' pieces, in the planar layout (forced: pieces of 64-320 values would otherwise go
  down columns, where tile fusion applies);
* column tiles of (N, C) matrices (columns layout, TILE columns each), over N, so tiles of
  TILE * N values per array.

For each it times the training forward and the training backward with fusion allowed (every
limit lifted) and with it off, alternating which goes first, in one process on the same
arrays, and prints unfused / fused (above 1: fusion pays); a case the kernels would not fuse
even so (fewer than four tiles or channels a thread) says so instead.  The switches it sets are restored
afterwards.  Both give the same bits; only the time differs.  Nothing here asserts a timing.
"""

import argparse
import itertools
import time

import numpy as np

import fastbn
from fastbn import _tuning
from fastbn._kernels import describe_layout
from fastbn.bench import data_dtype

KIB = (1, 2, 4, 8, 16, 32)
SEGMENTS = (1, 8, 32)
MIN_RUN = 64  # values per segment below which a case is skipped (a columns-layout shape)
TILE_ROWS = (16, 32, 64, 128, 256, 512, 1024)
TILE = 256  # columns per tile (_engine/geometry.pxi's TILE)
LIFTED = {"channel_bytes": 1 << 40, "short_piece_bytes": 0, "short_pieces_array_bytes": 0,
          "tile_bytes": 1 << 40, "serial_tile_bytes": 1 << 40, "serial_tile_array_bytes": 0}


def per_call(bn, x, gy, fused, op, calls):
    _tuning.set_fusion(fused)
    start = time.perf_counter()
    for _ in range(calls):
        if op == "forward":
            bn(x)
        else:
            bn.backward(gy)
    return (time.perf_counter() - start) / calls


def unfused_over_fused(rng, dtype, shape, rounds):
    """'forward R  backward R': unfused / fused median time of the training forward and
    backward of a BatchNorm1d on random data of this shape, alternating which goes first --
    or why not, where the kernels would not fuse it even so (too few tiles or channels for
    the threads)."""
    threads = fastbn.get_num_threads()
    if describe_layout(shape, dtype.itemsize, threads)["fused"] is None:
        return f"{str(shape):18s} not fused on {threads} thread(s): nothing to compare"
    x = rng.standard_normal(shape).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    bn = fastbn.BatchNorm1d(shape[1])
    bn(x)
    calls = max(1, int(2e-3 / max(per_call(bn, x, gy, False, "forward", 1), 1e-6)))
    ratios = []
    for op in ("forward", "backward"):
        times = {True: [], False: []}
        for r in range(rounds):
            for fused in ((True, False) if r % 2 else (False, True)):
                times[fused].append(per_call(bn, x, gy, fused, op, calls))
        ratios.append(np.median(times[False]) / np.median(times[True]))
    return f"{str(shape):18s} forward {ratios[0]:.2f}  backward {ratios[1]:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--total-kib", type=int, default=3072, help="bytes per array, in KiB")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtypes", default="float32,float16")
    args = parser.parse_args(argv)
    dtypes = [data_dtype(name) for name in args.dtypes.split(",")]
    threads_before = fastbn.get_num_threads()
    fusion_before = _tuning.fusion_is_enabled()
    limits_before = _tuning.current_fusion_limits()
    fastbn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads {args.threads}, about {args.total_kib} KiB per array; unfused / fused time "
          f"(above 1: fusion pays), median of {args.rounds} alternating rounds")
    try:
        _tuning.set_fusion_limits(LIFTED)
        _tuning.force_layout("planar")
        for dtype, kib, segments in itertools.product(dtypes, KIB, SEGMENTS):
            length = kib * 1024 // (segments * dtype.itemsize)
            if length < MIN_RUN:
                continue
            shape = (segments, max(4, args.total_kib // kib), length)
            print(f"{dtype.name:8s} channel {kib:3d} KiB in {segments:2d} segments "
                  f"{unfused_over_fused(rng, dtype, shape, args.rounds)}", flush=True)
        _tuning.force_layout(None)
        for dtype, rows in itertools.product(dtypes, TILE_ROWS):
            channels = max(4 * TILE, args.total_kib * 1024 // (rows * dtype.itemsize))
            shape = (rows, channels - channels % TILE)
            print(f"{dtype.name:8s} tile {rows * TILE * dtype.itemsize // 1024:5d} KiB of "
                  f"{rows:4d} rows {unfused_over_fused(rng, dtype, shape, args.rounds)}",
                  flush=True)
    finally:
        _tuning.force_layout(None)
        _tuning.set_fusion(fusion_before)
        _tuning.set_fusion_limits(limits_before)
        fastbn.set_num_threads(threads_before)


if __name__ == "__main__":
    main()
