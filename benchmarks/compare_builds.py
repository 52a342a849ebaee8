"""Before and after: the kernels of two builds of fastbn timed side by side in one process.

    python benchmarks/compare_builds.py BEFORE [--after AFTER] [--threads 1 2] [--rounds 30]
                                        [--shapes '8,256,28,28;128,2048'] [--dtypes float32,float16]

BEFORE and AFTER are checkouts of fastbn with their extensions built in place (``python
setup.py build_ext --inplace``; ``git worktree add /tmp/before COMMIT`` makes one); AFTER
defaults to this checkout.  Both builds' kernel modules of this CPU's SIMD level are loaded into
one process and called in turn, in blocks of about 10 ms, alternating which goes first: a slow
spell of a shared machine then falls on both, where separate processes, or one build after the
other, see it on one only; and both write into the same arrays (see buffers) (on a 2-vCPU cloud machine the same call took 3.4 us in one process
and 5.5 us in the next, and whole-suite runs disagreed by up to 2x).  Each row gives the
median time per call of each build and the median, and 25th to 75th percentile, of the
per-block ratios before / after (above 1: after is faster).

Only the kernels are compared (eval forward, training forward, training backward, and the
eval backward with the parameters' gradients, which fine-tuning under frozen statistics runs,
through the kernel modules' entry points, which both builds must share); the Python layer above them
is the same code in one process.  The rest of the package (its tuning switches included) is
this checkout's.  Nothing here asserts a timing.
"""

import argparse
import glob
import importlib.util
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(32, 64, 56, 56), (8, 256, 28, 28), (64, 32, 32, 32), (256, 512, 7, 7), (16, 3, 224, 224),
          (128, 2048, 1, 1), (4096, 1024), (512, 256), (64, 128), (64, 256, 32), (16, 64, 50),
          (1, 64, 56, 56), (1, 512, 7, 7), (4, 64, 8, 8), (1, 2, 3, 4)]
OPS = ("eval", "train", "backward", "eval-backward")


def load_kernels(checkout, tag, module_name):
    """The kernel module `module_name` (e.g. _kernels_avx2) built in checkout/fastbn."""
    paths = sorted(glob.glob(os.path.join(checkout, "fastbn", f"{module_name}.*.so"))
                   + glob.glob(os.path.join(checkout, "fastbn", f"{module_name}.*.pyd")))
    tagged = [p for p in paths if f"cpython-{sys.version_info.major}{sys.version_info.minor}" in p
              or f"cp{sys.version_info.major}{sys.version_info.minor}" in p]
    if not tagged:
        raise SystemExit(f"{checkout}: no {module_name} built for this Python "
                         f"(run python setup.py build_ext --inplace there)")
    spec = importlib.util.spec_from_file_location(f"{tag}.{module_name}", tagged[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def buffers(x):
    """The arrays a case writes (outputs, statistics, running buffers), made once and given to
    both builds: two outputs of their own would be two allocations whose pages may differ (a
    large one backed by huge pages, the other not), which moved memory-bound rows by up to
    1.45x in either direction, whichever build got the better pages."""
    c = x.shape[1]
    p = np.float64 if x.dtype == np.float64 else np.float32  # (a float32 module for half data)
    return dict(w=np.ones(c, p), b=np.zeros(c, p), y=np.empty_like(x), dx=np.empty_like(x),
                mean=np.empty(c), invstd=np.empty(c), running_mean=np.zeros(c, p),
                running_var=np.ones(c, p), grad_w=np.empty(c, p), grad_b=np.empty(c, p),
                eval_mean=np.zeros(c, p), eval_var=np.ones(c, p), save=np.empty(c),
                save_invstd=np.empty(c))


def calls(kernels, x, dy, threads, out):
    """{op: zero-argument callable} for one build's kernels on x (and dy), writing into the
    arrays `out` (buffers)."""
    w, b, y, dx = out["w"], out["b"], out["y"], out["dx"]
    mean, invstd = out["mean"], out["invstd"]
    running_mean, running_var = out["running_mean"], out["running_var"]
    grad_w, grad_b = out["grad_w"], out["grad_b"]

    def evaluate():
        kernels.forward_eval(x, y, w, b, out["eval_mean"], out["eval_var"], 1e-5, out["save"],
                             out["save_invstd"], threads)

    def train():
        kernels.forward_train(x, y, w, b, running_mean, running_var, 0.1, 1e-5, mean, invstd,
                              threads)

    def backward():
        kernels.backward(dy, x, dx, w, mean, invstd, grad_w, grad_b, True, threads)

    def eval_backward():
        kernels.backward(dy, x, dx, w, out["save"], out["save_invstd"], grad_w, grad_b, False,
                         threads)

    train()  # (the statistics the backward uses)
    evaluate()  # (and those the eval backward uses)
    return {"eval": evaluate, "train": train, "backward": backward, "eval-backward": eval_backward}


def compare(fns, rounds, block_seconds=0.01):
    """Per-call times of each side ({side: [seconds per call in each block]}), the sides
    called in turn in blocks of about block_seconds, alternating which goes first."""
    sides = list(fns)
    first = fns[sides[0]]
    first()
    start = time.perf_counter()
    first()
    reps = max(3, int(block_seconds / max(time.perf_counter() - start, 1e-7)))
    times = {side: [] for side in sides}
    for r in range(rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            fn = fns[side]
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times[side].append((time.perf_counter() - start) / reps)
    return times


def parse_shapes(text):
    return [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="a checkout of fastbn with its extensions built in place")
    parser.add_argument("--after", default=HERE, help="another (default: this checkout)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES)
    parser.add_argument("--dtypes", default="float32,float16")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.after)
    from fastbn._dispatch import simd_level, MODULE_OF_LEVEL
    from fastbn.bench import data_dtype  # (bfloat16 through ml_dtypes)
    module_name = MODULE_OF_LEVEL[simd_level].rsplit(".", 1)[1]
    builds = {"before": load_kernels(args.before, "fastbn_before", module_name),
              "after": load_kernels(args.after, "fastbn_after", module_name)}
    rng = np.random.default_rng(0)
    print(f"before: {args.before}\nafter:  {args.after}\nkernels: {simd_level}; {args.rounds} "
          f"alternating blocks per row; ratio = before / after (above 1: after is faster)")
    print("| shape | dtype | op | threads | before (us) | after (us) | ratio [25th-75th] |")
    print("|---|---|---|---|---|---|---|")
    for dtype in [data_dtype(name) for name in args.dtypes.split(",")]:
        for shape in args.shapes:
            if int(np.prod(shape)) // shape[1] < 2:
                continue  # (one value per channel: no training statistics)
            x = rng.standard_normal(shape).astype(np.float32).astype(dtype)
            dy = rng.standard_normal(shape).astype(np.float32).astype(dtype)
            for threads in args.threads:
                out = buffers(x)
                fns = {side: calls(k, x, dy, threads, out) for side, k in builds.items()}
                for op in OPS:
                    times = compare({side: fns[side][op] for side in fns}, args.rounds)
                    before, after = np.array(times["before"]), np.array(times["after"])
                    ratio = before / after
                    print(f"| {shape} | {dtype.name} | {op} | {threads} | {np.median(before) * 1e6:.1f} | "
                          f"{np.median(after) * 1e6:.1f} | {np.median(ratio):.2f} "
                          f"[{np.percentile(ratio, 25):.2f}-{np.percentile(ratio, 75):.2f}] |",
                          flush=True)


if __name__ == "__main__":
    main()
