"""Fused planar channels against separate passes, over channel sizes and segment counts.

    python benchmarks/fusion_grid.py [--threads 1] [--total-kib 3072] [--rounds 9]
                                     [--dtypes float32,float16]

The largest planar channel that is processed whole (statistics, then normalisation while it is
in cache) is a per-CPU default in fastbn/_tuning.pyx.  This grid is the measurement behind such
a default: for channels of 1 to 32 KiB per array, contiguous (N = 1) or cut into 8 or 32
segments (one per sample), in tensors of about --total-kib, in the planar layout (forced:
segments of 64-320 values would otherwise go down columns, where tile fusion applies), it times
the training forward and the training backward with fusion allowed (every size: the limit is
lifted) and with it off, alternating which goes first, in one process on the same arrays, and
prints unfused / fused (above 1: fusion pays).  The switches it sets are restored afterwards.  Both give the same bits; only the time differs.  Nothing here asserts
a timing.
"""

import argparse
import itertools
import time

import numpy as np

import fastbn
from fastbn import _tuning

KIB = (1, 2, 4, 8, 16, 32)
SEGMENTS = (1, 8, 32)
MIN_RUN = 64  # values per segment below which a case is skipped (a columns-layout shape)


def per_call(bn, x, gy, fused, op, calls):
    _tuning.set_fusion(fused)
    start = time.perf_counter()
    for _ in range(calls):
        if op == "forward":
            bn(x)
        else:
            bn.backward(gy)
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--total-kib", type=int, default=3072, help="bytes per array, in KiB")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtypes", default="float32,float16")
    args = parser.parse_args(argv)
    threads_before = fastbn.get_num_threads()
    fusion_before = _tuning.fusion_is_enabled()
    limit_before = _tuning.current_fused_channel_bytes()
    fastbn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads {args.threads}, about {args.total_kib} KiB per array; unfused / fused time "
          f"(above 1: fusion pays), median of {args.rounds} alternating rounds")
    try:
        _tuning.force_layout("planar")
        _tuning.set_fused_channel_bytes(1 << 40)
        for name, kib, segments in itertools.product(args.dtypes.split(","), KIB, SEGMENTS):
            dtype = np.dtype(name)
            length = kib * 1024 // (segments * dtype.itemsize)
            if length < MIN_RUN:
                continue
            channels = max(4, args.total_kib // kib)
            shape = (segments, channels, length)
            x = rng.standard_normal(shape).astype(dtype)
            gy = rng.standard_normal(shape).astype(dtype)
            bn = fastbn.BatchNorm1d(channels)
            bn(x)
            calls = max(1, int(2e-3 / max(per_call(bn, x, gy, False, "forward", 1), 1e-6)))
            ratios = []
            for op in ("forward", "backward"):
                times = {True: [], False: []}
                for r in range(args.rounds):
                    for fused in ((True, False) if r % 2 else (False, True)):
                        times[fused].append(per_call(bn, x, gy, fused, op, calls))
                ratios.append(np.median(times[False]) / np.median(times[True]))
            print(f"{name:8s} channel {kib:3d} KiB in {segments:2d} segments {str(shape):18s} "
                  f"forward {ratios[0]:.2f}  backward {ratios[1]:.2f}", flush=True)
    finally:
        _tuning.force_layout(None)
        _tuning.set_fusion(fusion_before)
        _tuning.set_fused_channel_bytes(limit_before)
        fastbn.set_num_threads(threads_before)


if __name__ == "__main__":
    main()
