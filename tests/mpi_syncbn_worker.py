"""Run by tests/test_syncbn.py as ``mpiexec -n R python mpi_syncbn_worker.py R``.

Every rank runs the checks of syncbn_cases.py on MPI.COMM_WORLD: SyncBatchNorm against
single-process BatchNorm on the global batch, bit-identical results across ranks, errors on
every rank when one rank's input is bad, no communication in eval mode.  A failing rank prints
what failed and aborts the whole job (the other ranks may be waiting in a collective), so the
exit status is non-zero; on success rank 0 prints "ok: SyncBatchNorm on R ranks".
"""

import sys
import traceback

from mpi4py import MPI

import syncbn_cases as cases


def main():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    expected = int(sys.argv[1])
    if size != expected:
        # Typically an mpiexec from another MPI library than mpi4py's: each process then
        # starts alone, as a world of one.
        print(f"launched as {expected} ranks, but MPI.COMM_WORLD has {size}: does mpiexec "
              f"belong to mpi4py's MPI library ({MPI.Get_library_version().splitlines()[0]})?",
              file=sys.stderr, flush=True)
        return 2
    checks = [(f"case {cases.case_id(case)}", cases.run_case, (case,)) for case in cases.cases(size)]
    for kind in sorted(cases.BAD_INPUTS):
        for bad in ([size - 1], list(range(size))):
            checks.append((f"bad {kind} input on ranks {bad}", cases.check_bad_input, (kind, bad)))
    checks += [(f"{what} differs between ranks", cases.check_disagreement, (what,))
               for what in sorted(cases.DISAGREEMENTS)]
    checks += [("a rank in backward, the others in forward", cases.check_phase_disagreement, ()),
               ("one value per channel", cases.check_one_value_per_channel, ()),
               ("all ranks empty", cases.check_all_empty, ()),
               ("eval mode is local", cases.check_eval_is_local, ())]
    for name, check, args in checks:
        try:
            check(comm, *args)
        except BaseException:
            print(f"rank {rank} of {size}: FAILED {name}\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            comm.Abort(1)
    comm.Barrier()
    if rank == 0:
        print(f"ok: SyncBatchNorm on {size} ranks, {len(checks)} checks", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
