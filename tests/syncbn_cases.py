"""SyncBatchNorm checks shared by the in-process tests (ranks as threads, a fake communicator)
and the MPI worker (ranks as processes under mpiexec).

Each check is run by every rank with its own communicator.  Every rank rebuilds the global
batch from a seed derived from the case, normalises its slice with SyncBatchNorm, and compares
with a single-process BatchNorm on the whole batch; values that must be the same on every
rank are gathered and compared bit for bit.  A mismatch raises AssertionError naming the
case, the step and the rank.
"""

import zlib

import numpy as np

import fastbn
from fastbn import distributed
from fastbn import functional as F

from conftest import assert_close, data_error, make_input

# Per-rank batch sizes, by number of ranks: even and uneven splits, an empty rank, and ranks
# with a single sample (a single value per channel for 2-D input, fine once gathered).
SPLITS = {
    1: [[6]],
    2: [[3, 5], [0, 4], [1, 1]],
    3: [[2, 3, 4], [4, 0, 1], [1, 1, 1]],
}
OPTION_SPLIT = {1: [5], 2: [3, 5], 3: [2, 3, 4]}
TAILS = [(), (7,), (4, 5), (2, 3, 2)]  # the dimensions after C: 2-D to 5-D input
CHANNELS = 3
STEPS = 3

MODULES = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d, 5: fastbn.BatchNorm3d}


def case_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items())


def cases(size):
    """The comparison cases for `size` ranks: every split x input rank x dtype with the default
    options, then the options (momentum, affine, bias, track_running_stats) on one split."""
    out = []
    for sizes in SPLITS[size]:
        for tail in TAILS:
            for dtype in ("float32", "float64"):
                out.append(dict(sizes=sizes, tail=tail, dtype=dtype, momentum=0.1, affine=True,
                                bias=True, track=True, activation=None))
    for momentum in (0.1, None):
        for affine, bias in ((True, True), (True, False), (False, True)):
            for track in (True, False):
                out.append(dict(sizes=OPTION_SPLIT[size], tail=(4, 5), dtype="float64",
                                momentum=momentum, affine=affine, bias=bias, track=track,
                                activation=None))
    # the fused ReLU, whose backward gates the gradient by the output on every rank
    for dtype in ("float32", "float64"):
        out.append(dict(sizes=OPTION_SPLIT[size], tail=(4, 5), dtype=dtype, momentum=0.1,
                        affine=True, bias=True, track=True, activation="relu"))
    return out


class CountingComm:
    """A communicator that forwards to another and counts the collectives called on it."""

    def __init__(self, comm):
        self.comm = comm
        self.allgathers = []  # bytes sent by each Allgather

    def Get_rank(self):
        return self.comm.Get_rank()

    def Get_size(self):
        return self.comm.Get_size()

    def Allgather(self, sendbuf, recvbuf):
        self.allgathers.append(sendbuf.nbytes)
        self.comm.Allgather(sendbuf, recvbuf)


def _slices(sizes):
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _same_on_every_rank(comm, what, arrays):
    """Gather float64 copies of `arrays` from every rank and require identical bits."""
    mine = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays] + [np.zeros(1)])
    everyone = np.empty((comm.Get_size(), mine.size))
    comm.Allgather(mine, everyone)
    for r in range(1, comm.Get_size()):
        differ = np.flatnonzero(everyone[r].view(np.int64) != everyone[0].view(np.int64))
        assert differ.size == 0, (f"{what}: rank {r} differs from rank 0 at {differ.size} "
                                  f"positions, e.g. {everyone[r, differ[0]]!r} != "
                                  f"{everyone[0, differ[0]]!r}")


def run_case(comm, case):
    """Train a SyncBatchNorm and a BatchNorm side by side for STEPS steps and compare."""
    rank, size = comm.Get_rank(), comm.Get_size()
    sizes = case["sizes"]
    assert len(sizes) == size, f"case {case_id(case)} needs {len(sizes)} ranks, got {size}"
    dtype = np.dtype(case["dtype"])
    options = dict(momentum=case["momentum"], affine=case["affine"],
                   track_running_stats=case["track"], dtype=dtype, bias=case["bias"],
                   activation=case.get("activation"))
    counting = CountingComm(comm)
    sync = fastbn.SyncBatchNorm(CHANNELS, comm=counting, **options)
    ref = MODULES[2 + len(case["tail"])](CHANNELS, **options)
    rng = np.random.default_rng(zlib.crc32(case_id(case).encode()))
    if sync.weight is not None:
        # Parameters away from 1 and 0, the same on every rank (drawn from the shared seed).
        sync.weight[...] = ref.weight[...] = rng.uniform(0.5, 1.5, CHANNELS)
    if sync.bias is not None:
        sync.bias[...] = ref.bias[...] = rng.uniform(-1, 1, CHANNELS)
    mine = _slices(sizes)[rank]
    c = CHANNELS
    for step in range(STEPS):
        where = f"case {case_id(case)}, step {step}, rank {rank}"
        shape = (sum(sizes), c) + tuple(case["tail"])
        x = make_input(shape, dtype, rng, offset=5.0)
        dy = make_input(shape, dtype, rng)

        del counting.allgathers[:]
        y = sync(x[mine])
        header = 8 * len(distributed._HEADER)
        assert counting.allgathers == [header, 8 * (1 + 3 * c)], \
            f"{where}: forward made Allgathers of {counting.allgathers} bytes, expected a header " \
            f"and {8 * (1 + 3 * c)}"
        dx = sync.backward(dy[mine])
        assert counting.allgathers[2:] == [header, 8 * 2 * c], \
            f"{where}: backward made Allgathers of {counting.allgathers[2:]} bytes, expected a " \
            f"header and {8 * 2 * c}"
        y_ref = ref(x)
        dx_ref = ref.backward(dy)

        assert y.dtype == dtype and dx.dtype == dtype, f"{where}: dtypes {y.dtype}, {dx.dtype}"
        count, mean, m2 = F.batch_stats(x)
        invstd = 1.0 / np.sqrt(m2 / count + ref.eps)
        w = ref.weight if ref.weight is not None else np.ones(c)
        assert_close(y, y_ref[mine], dtype, f"{where}: output", atol=data_error(x, invstd, w))
        dy_max = float(np.max(np.abs(dy)))
        assert_close(dx, dx_ref[mine], dtype, f"{where}: grad_input",
                     scale=float(np.max(np.abs(w) * invstd)) * dy_max,
                     atol=data_error(x, invstd ** 2, w) * dy_max)
        xmu = np.abs(x - mean.reshape((1, -1) + (1,) * len(case["tail"])))
        for name, scale in (("grad_weight", np.sum(np.abs(dy)) * np.max(xmu) * np.max(invstd)),
                            ("grad_bias", np.sum(np.abs(dy)))):
            got, want = getattr(sync, name), getattr(ref, name)
            assert (got is None) == (want is None), f"{where}: {name} is {got!r}, expected {want!r}"
            if want is not None:
                assert got.dtype == dtype, f"{where}: {name} has dtype {got.dtype}"
                assert_close(got, want, dtype, f"{where}: {name}", scale=max(1.0, float(scale)))
        for name in ("running_mean", "running_var"):
            got, want = getattr(sync, name), getattr(ref, name)
            assert (got is None) == (want is None), f"{where}: {name} is {got!r}, expected {want!r}"
            if want is not None:
                assert_close(got, want, dtype, f"{where}: {name}")
        if ref.num_batches_tracked is not None:
            assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
        shared = [a for a in (sync.grad_weight, sync.grad_bias, sync.running_mean, sync.running_var,
                              sync.num_batches_tracked) if a is not None]
        _same_on_every_rank(comm, where, shared)


def _snapshot(module):
    """Copies of everything a call may change."""
    state = {name: np.array(value, copy=True) for name, value in module.state_dict().items()}
    for name in ("grad_weight", "grad_bias"):
        value = getattr(module, name)
        state[name] = None if value is None else value.copy()
    state["_saved"] = module._saved
    return state


def _assert_unchanged(module, before, where):
    after = _snapshot(module)
    assert after.keys() == before.keys()
    for name, value in before.items():
        if name == "_saved":
            assert after[name] is value, f"{where}: the saved forward was replaced"
        elif value is None:
            assert after[name] is None, f"{where}: {name} was set"
        else:
            np.testing.assert_array_equal(after[name], value, err_msg=f"{where}: {name} changed")


#: Bad inputs one rank may pass a SyncBatchNorm(4) expecting float32 (N, 4, 5) input:
#: (input, error class, the message every rank raises after "rank R: ").
BAD_INPUTS = {
    "channels": (lambda: np.ones((2, 3, 5), np.float32), ValueError,
                 "expected input with 4 channels (num_features) in dimension 1, got input of shape (2, 3, 5)"),
    "dtype": (lambda: np.ones((2, 4, 5), np.float64), TypeError,
              "input has dtype float64 but SyncBatchNorm holds float32 parameters"),
    "ndim": (lambda: np.ones(4, np.float32), ValueError, "expected at least 2D input (got 1D input)"),
    "type": (lambda: "not an array", TypeError, "input must be an array of floats, got str"),
}


def _expect_everywhere(call, error, lines, where):
    """call() raises `error` with one line per failed rank, each starting as in `lines`."""
    try:
        call()
    except error as exc:
        got = str(exc).split("\n")
        assert len(got) == len(lines) and all(g.startswith(w) for g, w in zip(got, lines)), \
            f"{where}: raised {str(exc)!r}, expected lines starting {lines!r}"
        return
    except Exception as exc:
        raise AssertionError(f"{where}: raised {type(exc).__name__}({exc}), expected {error.__name__}") from exc
    raise AssertionError(f"{where}: did not raise {error.__name__}")


def check_bad_input(comm, kind, bad_ranks):
    """A bad input on `bad_ranks` makes every rank raise the same error, and changes nothing;
    then the ranks carry on in step."""
    rank = comm.Get_rank()
    make_bad, error, detail = BAD_INPUTS[kind]
    rng = np.random.default_rng(rank)
    bn = fastbn.SyncBatchNorm(4, comm=comm)
    good = make_input((2, 4, 5), np.float32, rng)
    bn.backward(np.ones_like(bn(good)))  # some state, and a saved forward
    where = f"bad {kind} input on ranks {bad_ranks}, rank {rank}"
    before = _snapshot(bn)
    x = make_bad() if rank in bad_ranks else good
    _expect_everywhere(lambda: bn(x), error, [f"rank {r}: {detail}" for r in bad_ranks], where)
    _assert_unchanged(bn, before, where)

    dy = np.ones((3, 4, 5), np.float32) if rank in bad_ranks else np.ones_like(good)
    lines = [f"rank {r}: grad_output has shape (3, 4, 5) but the last forward's input has shape "
             f"(2, 4, 5); they must match" for r in bad_ranks]
    _expect_everywhere(lambda: bn.backward(dy), ValueError, lines, where + ", backward")
    _assert_unchanged(bn, before, where + ", backward")

    # Nobody is left behind in a collective: the next steps work on every rank.
    bn.backward(np.ones_like(good))
    bn.backward(np.ones_like(bn(good)))
    assert int(bn.num_batches_tracked) == 2


#: Ways one rank's module can differ from the others': (keyword arguments of that rank's
#: SyncBatchNorm, input channels, the field the error names).
DISAGREEMENTS = {
    "num_features": (dict(num_features=5), 5, "num_features by rank"),
    "affine": (dict(affine=False), 4, "weight by rank"),
    "bias": (dict(bias=False), 4, "bias by rank"),
    "track_running_stats": (dict(track_running_stats=False), 4, "track_running_stats by rank"),
    "activation": (dict(activation="relu"), 4, "activation by rank: [None, 'relu'"),
    "dtype": (dict(dtype=np.float64), 4, "dtype by rank: [float32, float64"),
    "eps": (dict(eps=1e-3), 4, "eps by rank"),
    "momentum": (dict(momentum=None), 4, "momentum by rank: [0.1, None"),
}


def check_disagreement(comm, what):
    """Ranks whose modules differ (rank 1 and above built otherwise) all raise the same
    ValueError naming what differs, change nothing, and carry on once they agree."""
    rank = comm.Get_rank()
    changes, channels, detail = DISAGREEMENTS[what]
    options = dict(num_features=4)
    if rank > 0:
        options.update(changes)
        c = channels
    else:
        c = 4
    bn = fastbn.SyncBatchNorm(comm=comm, **options)
    x = make_input((2, c, 5), bn.dtype, np.random.default_rng(rank))
    before = _snapshot(bn)
    where = f"{what} differs on ranks > 0, rank {rank}"
    _expect_everywhere(lambda: bn(x), ValueError,
                       [f"SyncBatchNorm: the ranks' modules or calls disagree ({detail}"], where)
    _assert_unchanged(bn, before, where)
    # Built alike, the same ranks carry on: nobody was left in a collective.
    bn = fastbn.SyncBatchNorm(4, comm=comm)
    good = make_input((2, 4, 5), np.float32, np.random.default_rng(rank))
    bn.backward(np.ones_like(bn(good)))


def check_phase_disagreement(comm):
    """One rank calls backward while the others call forward: every rank raises, nothing
    changes, and they carry on in step."""
    rank = comm.Get_rank()
    bn = fastbn.SyncBatchNorm(4, comm=comm)
    good = make_input((2, 4, 5), np.float32, np.random.default_rng(rank))
    y = bn(good)
    before = _snapshot(bn)
    call = (lambda: bn.backward(np.ones_like(y))) if rank == 0 else (lambda: bn(good))
    _expect_everywhere(call, ValueError, ["SyncBatchNorm: the ranks' modules or calls disagree "
                                          "(phase by rank: [backward, forward"], f"rank {rank}")
    _assert_unchanged(bn, before, f"rank {rank}")
    bn.backward(np.ones_like(bn(good)))


def check_bad_attribute_on_one_rank(comm):
    """An attribute of a type nothing expects (num_features as a str, on the last rank) is that
    rank's failure, reported through the collective: every rank raises, none is left waiting."""
    rank, size = comm.Get_rank(), comm.Get_size()
    bn = fastbn.SyncBatchNorm(4, comm=comm)
    x = make_input((2, 4, 5), np.float32, np.random.default_rng(rank))
    if rank == size - 1:
        bn.num_features = "4"
        bn.track_running_stats = np.array([True, False])
    try:
        bn(x)
    except (TypeError, ValueError) as exc:
        assert f"rank {size - 1}" in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {rank}: no error")


def check_one_value_per_channel(comm):
    """One value per channel over all ranks: every rank raises torch's error, nothing changes."""
    rank = comm.Get_rank()
    bn = fastbn.SyncBatchNorm(3, comm=comm)
    before = _snapshot(bn)
    x = np.ones((1 if rank == 0 else 0, 3), np.float32)
    _expect_everywhere(lambda: bn(x), ValueError, ["Expected more than 1 value per channel when "
                       "training, got 1 value per channel over all"], f"rank {rank}")
    _assert_unchanged(bn, before, f"rank {rank}")


def check_all_empty(comm):
    """Every rank empty: empty outputs, running estimates untouched, the batch counted, zero
    parameter gradients (as BatchNorm on an empty batch)."""
    bn = fastbn.SyncBatchNorm(3, comm=comm)
    ref = fastbn.BatchNorm2d(3)
    x = np.ones((0, 3, 4, 4), np.float32)
    y, y_ref = bn(x), ref(x)
    assert y.shape == y_ref.shape == x.shape and y.dtype == np.float32
    dx, dx_ref = bn.backward(x), ref.backward(x)
    assert dx.shape == dx_ref.shape == x.shape
    for name in ("running_mean", "running_var", "num_batches_tracked", "grad_weight", "grad_bias"):
        np.testing.assert_array_equal(getattr(bn, name), getattr(ref, name), err_msg=name)


def check_eval_is_local(comm):
    """Eval mode makes no collective: with running estimates, and with local batch statistics
    when the module tracks none; the results are BatchNorm's on the local input."""
    rank = comm.Get_rank()
    rng = np.random.default_rng(rank)
    x = make_input((rank + 2, 3, 4, 5), np.float64, rng)
    dy = make_input(x.shape, np.float64, rng)
    for track in (True, False):
        counting = CountingComm(comm)
        bn = fastbn.SyncBatchNorm(3, track_running_stats=track, dtype=np.float64, comm=counting).eval()
        ref = fastbn.BatchNorm2d(3, track_running_stats=track, dtype=np.float64).eval()
        if track:
            bn.running_mean[...] = ref.running_mean[...] = rng.standard_normal(3)
            bn.running_var[...] = ref.running_var[...] = rng.uniform(0.5, 2, 3)
        np.testing.assert_array_equal(bn(x), ref(x))
        np.testing.assert_array_equal(bn.backward(dy), ref.backward(dy))
        np.testing.assert_array_equal(bn.grad_weight, ref.grad_weight)
        assert counting.allgathers == [], f"rank {rank}: eval mode communicated: {counting.allgathers}"
