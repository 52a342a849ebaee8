"""SyncBatchNorm training steps under MPI: step time, and the share spent in the collectives.

    mpiexec -n 2 python benchmarks/syncbn_mpi.py [--shape 32,64,56,56] [--steps 20]

Every rank normalises an input of --shape (its own slice of the global batch, as in
data-parallel training) with a SyncBatchNorm: one training forward and one backward per step.
The ranks start each step together (a barrier, outside the timings); time spent inside the
communicator's Allgather calls is measured separately from the whole step.  The collective
time includes waiting for slower ranks, not only the transfer.  For comparison, the same step
on a plain BatchNorm (local statistics, no communication) is timed too.

Rank 0 prints medians over the steps for every rank; nothing is asserted.
"""

import argparse
import os
import platform
import sys
import time

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn._openmp import effective_n_threads


class TimedComm:
    """Forwards to a communicator, adding the seconds spent in each Allgather to ``seconds``."""

    def __init__(self, comm):
        self.comm = comm
        self.seconds = 0.0

    def Get_rank(self):
        return self.comm.Get_rank()

    def Get_size(self):
        return self.comm.Get_size()

    def Allgather(self, sendbuf, recvbuf):
        start = time.perf_counter()
        self.comm.Allgather(sendbuf, recvbuf)
        self.seconds += time.perf_counter() - start


def local_module(ndim):
    return {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d,
            5: fastbn.BatchNorm3d}[ndim]


def time_steps(comm, module, x, dy, steps, warmup, timed=None):
    """Per-step (total, in collectives) seconds of forward + backward."""
    totals, comms = [], []
    for step in range(warmup + steps):
        comm.Barrier()
        if timed is not None:
            timed.seconds = 0.0
        start = time.perf_counter()
        module(x)
        module.backward(dy)
        elapsed = time.perf_counter() - start
        if step >= warmup:
            totals.append(elapsed)
            comms.append(timed.seconds if timed is not None else 0.0)
    return np.array(totals), np.array(comms)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="32,64,56,56",
                        help="each rank's input shape N,C,... (default 32,64,56,56)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) < 2:
        parser.error(f"--shape needs at least N and C, got {args.shape!r}")

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    rng = np.random.default_rng(rank)
    x = rng.standard_normal(shape).astype(args.dtype)
    dy = rng.standard_normal(shape).astype(args.dtype)

    timed = TimedComm(world)
    sync = fastbn.SyncBatchNorm(shape[1], dtype=args.dtype, comm=timed)
    total, in_comm = time_steps(world, sync, x, dy, args.steps, args.warmup, timed)
    local, _ = time_steps(world, local_module(len(shape))(shape[1], dtype=args.dtype), x, dy,
                          args.steps, args.warmup)
    mine = (np.median(total), np.median(in_comm), np.median(in_comm / total), np.median(local))
    everyone = world.gather(mine, root=0)
    on_this_host = world.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    if rank != 0:
        return 0

    c = shape[1]
    print(f"fastbn {fastbn.__version__} ({fastbn.simd_level}, {effective_n_threads()} OpenMP "
          f"threads per rank), numpy {np.__version__}, mpi4py {sys.modules['mpi4py'].__version__}, "
          f"{MPI.Get_library_version().splitlines()[0].strip()}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{size} rank{'s' if size != 1 else ''}, each with input {shape} {args.dtype}: global batch "
          f"{(shape[0] * size,) + shape[1:]}; {args.steps} timed steps after {args.warmup} warm-up")
    print(f"per step: 4 Allgathers, headers of 80 bytes and {8 * (1 + 3 * c)} + {8 * 2 * c} bytes "
          f"sent per rank, "
          f"{size} times that received")
    print(f"{'rank':>4}  {'step ms':>9}  {'in collectives ms':>17}  {'comm share':>10}  "
          f"{'BatchNorm (local) ms':>20}  {'sync / local':>12}")
    for r, (step_s, comm_s, share, local_s) in enumerate(everyone):
        print(f"{r:>4}  {step_s * 1e3:9.3f}  {comm_s * 1e3:17.3f}  {share:10.1%}  "
              f"{local_s * 1e3:20.3f}  {step_s / local_s:12.2f}")
    threads = on_this_host * effective_n_threads()
    if threads > (os.cpu_count() or 1):
        # OpenMP threads of ranks sharing cores spin against each other and against MPI's
        # polling: steps then take many times longer, and the timings say little.
        print(f"warning: {on_this_host} ranks x {effective_n_threads()} OpenMP threads on "
              f"{os.cpu_count()} CPUs oversubscribes this host; set OMP_NUM_THREADS="
              f"{max(1, (os.cpu_count() or 1) // on_this_host)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
