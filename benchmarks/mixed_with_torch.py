"""What fastbn and torch cost each other when one process alternates their calls.

    python benchmarks/mixed_with_torch.py [--threads 1 2] [--budget 0.5]

Each library is timed alone (median of repeated calls), then with the calls alternating
fastbn, torch, fastbn, ... -- each call still timed on its own.  The ratio "mixed / alone" is
what the other library's presence costs a call.  Both use OpenMP, each with its own runtime
(torch's wheel bundles its own libgomp): after a parallel region a runtime's worker threads
keep spinning for a while before they sleep, and on a machine with few cores those spinning
threads take the cores the other library's threads need.  fastbn runs small calls on the
calling thread alone (its work threshold), so that it starts no threads to spin; the numbers
show what is left.  The README ("Using fastbn next to torch") says what to do about it.

Needs torch.  Nothing here asserts a timing.
"""

import argparse
import time

import numpy as np

import fastbn

SHAPES = [(1, 2048, 1, 1), (4, 64, 8, 8), (1, 512, 7, 7), (512, 256), (8, 256, 28, 28)]


def calls(shape, op, threads):
    import torch
    fastbn.set_num_threads(threads)
    torch.set_num_threads(threads)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    module = {2: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d}[x.ndim](shape[1])
    peer = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[x.ndim](shape[1])
    module.train(op == "train")
    peer.train(op == "train")
    tx = torch.from_numpy(x)

    def ours():
        module(x)

    def theirs():
        with torch.no_grad():
            peer(tx)
    return ours, theirs


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(shape, op, threads, budget):
    ours, theirs = calls(shape, op, threads)
    for fn in (ours, theirs):
        fn()
    once = max(timed(ours) + timed(theirs), 1e-6)
    repeats = int(min(20000, max(20, budget / once)))
    alone = {name: float(np.median([timed(fn) for _ in range(repeats)]))
             for name, fn in (("fastbn", ours), ("torch", theirs))}
    mixed = {"fastbn": [], "torch": []}
    for _ in range(repeats):
        mixed["fastbn"].append(timed(ours))
        mixed["torch"].append(timed(theirs))
    mixed = {name: float(np.median(values)) for name, values in mixed.items()}
    return alone, mixed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per measurement")
    args = parser.parse_args()
    print(f"{'shape':>16} {'op':>6} {'th':>2} {'fastbn us':>10} {'mixed':>8} {'ratio':>6}"
          f" {'torch us':>10} {'mixed':>8} {'ratio':>6}")
    for shape in SHAPES:
        for op in ("eval", "train"):
            if op == "train" and shape[0] * int(np.prod(shape[2:])) < 2:
                continue
            for threads in args.threads:
                alone, mixed = measure(shape, op, threads, args.budget)
                print(f"{str(shape):>16} {op:>6} {threads:>2}"
                      + "".join(f" {alone[n] * 1e6:>10.1f} {mixed[n] * 1e6:>8.1f}"
                                f" {mixed[n] / alone[n]:>6.2f}" for n in ("fastbn", "torch")),
                      flush=True)


if __name__ == "__main__":
    main()
