"""SyncBatchNorm: batch normalisation with statistics shared by data-parallel processes over MPI.

Each process (an MPI rank) holds a slice of the global batch.  In training mode the ranks
combine their per-channel statistics, so every rank normalises with the statistics of the
global batch, and combine the sums of the backward, so every rank's gradients are those of a
single process holding the whole batch.  The transport is MPI through mpi4py; it is imported
only when a module without an explicit ``comm`` first needs ``MPI.COMM_WORLD``, so that
``import fastbn`` never requires it.

Collectives
-----------
Two ``Allgather`` calls per training forward and two per training backward; eval mode does no
communication.  First every rank sends a header of a fixed size (``_HEADER``): a status slot,
0 when the rank's local work succeeded and otherwise the length of its error message, then
what the ranks must agree on -- the phase (forward or backward), num_features, the affine
parameters present, track_running_stats, the activation, the dtype, eps and momentum.  A rank
that rejects its input therefore still joins the collective, every rank sees the failure, a
second ``Allgather`` (only on that path) spreads the messages, and all ranks raise the same
error instead of the healthy ones waiting for a rank that never comes.  Ranks whose modules
disagree (a model built differently on one rank) all raise the same ValueError, naming what
differs by rank, before any payload of a size they would disagree on is sent.  Only then
does the payload -- statistics or gradient sums -- go round.

Gathering rows, rather than reducing them with ``Allreduce``, lets each rank combine them
itself, in rank order and with the same code: the results are bitwise identical on every
rank whatever the MPI library's reduction algorithm, and the statistics can be merged with
Chan's stable update (:func:`fastbn.functional.merge_stats`) rather than summed as raw
moments.  The cost is that a rank receives ``size`` rows instead of one: 8 * (2 + 3C) bytes
per rank in the forward and 8 * (1 + 2C) in the backward, each with its header of 8 * 10
(torch's SyncBatchNorm also gathers its forward statistics).

Pipeline
--------
Only the statistics and the sums cross ranks; everything else is the modules' own code,
through their interface for subclasses: the base class validates the call (``_prepare``),
the ranks merge their statistics, and the base class runs it (``_run``, with ``stats=``),
which checks the parameters and buffers, updates the running estimates and the counter and
normalises by the same pipeline as :class:`fastbn.BatchNorm2d` (``fastbn._pipeline``), in the
input's memory format and storage type: channels-last stays channels-last, float16 and
bfloat16 are read and written as they are.  The backward takes the local sums and grad_input
from the same forward context (``_pipeline.local_grad_sums``, ``grad_input_from_sums``).  On a
single rank every result is bitwise :class:`fastbn.BatchNorm2d`'s.
"""

import numpy as np

from . import _pipeline as P
from . import _validation as V
from . import functional as F
from ._openmp import effective_n_threads
from .modules import _BatchNorm

__all__ = ["SyncBatchNorm"]

#: Methods of an mpi4py communicator that SyncBatchNorm calls.
_COMM_METHODS = ("Allgather", "Get_rank", "Get_size")

#: Errors a failed rank's exception is re-raised as on every rank, by name; others become
#: RuntimeError (the rank that failed chains its original exception).
_ERRORS = {cls.__name__: cls for cls in (ValueError, TypeError, MemoryError, RuntimeError)}

#: Longest error message (UTF-8 bytes) a rank sends to the others.
_MAX_MESSAGE = 4096

#: The fields of the header every rank sends before a payload (float64 each): the status slot,
#: then what the ranks must agree on.
_HEADER = ("status", "phase", "num_features", "weight", "bias", "track_running_stats",
           "activation", "dtype", "eps", "momentum")
_FORWARD, _BACKWARD = 1.0, 2.0


def _world():
    """mpi4py's ``MPI.COMM_WORLD``, imported on first use."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "SyncBatchNorm needs mpi4py for its default communicator (MPI.COMM_WORLD), and it "
            "could not be imported: install it with `pip install fastbn[mpi]` (mpi4py and an "
            f"MPI library), or pass comm= explicitly ({exc})") from exc
    return MPI.COMM_WORLD


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalisation over dimension 1 of an (N, C, \*) array, with the batch split
    over the ranks of an MPI communicator.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    In training mode the mean and (biased) variance are those of the global batch, the
    concatenation of every rank's input along dimension 0: each rank's output and
    :meth:`backward` result are the matching slice of what :class:`fastbn.BatchNorm2d` (or 1d,
    3d) gives on the global batch, and ``grad_weight``, ``grad_bias`` and the running buffers
    are that module's, identical on every rank.  Ranks may hold different batch sizes,
    including none (N = 0).  Every rank must call :meth:`forward` and :meth:`backward`
    together, in the same mode, with the same ``num_features``, ``dtype`` and options.

    In eval mode each rank works alone, with no communication, exactly as the base class: with
    the running estimates, or with its local batch statistics when the module does not track
    them (as torch's SyncBatchNorm, which synchronises only in training).

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance for numerical stability (must be > 0 to train).
    momentum : float or None, default 0.1
        Update factor of the running estimates; None for a cumulative moving average.
    affine : bool, default True
        Learnable ``weight`` (gamma, ones) and ``bias`` (beta, zeros).
    track_running_stats : bool, default True
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked``.
    dtype : float32 or float64, default float32
        dtype of the parameters and buffers, and of the input the module accepts (plus float16
        and bfloat16 input for a float32 module, computed in float32).
    bias : bool, default True (keyword only)
        With ``affine=True``, whether to learn the bias; ``bias=False`` keeps a weight only.
    activation : None or 'relu', default None (keyword only)
        Applied in the same pass as the normalisation, as in :class:`fastbn.BatchNorm2d`.
    comm : mpi4py communicator, optional (keyword only)
        The ranks that share statistics.  None (the default) means ``MPI.COMM_WORLD``, looked
        up when a training forward first needs it (mpi4py is imported then, not before).  Any
        object with mpi4py's ``Allgather(sendbuf, recvbuf)``, ``Get_rank()`` and ``Get_size()``
        works, e.g. a sub-communicator from ``Comm.Split``.

    Notes
    -----
    Each training forward makes one ``Allgather`` of a fixed-size header per rank (a status
    slot and what the ranks must agree on: the phase, num_features, the affine parameters,
    track_running_stats, the activation, the dtype, eps and momentum), then one of a float64
    row ``[count, mean[C], mean_lo[C], M2[C]]`` per rank, M2 being the sum of squared deviations from the rank's mean
    (:func:`fastbn.functional.batch_stats`) and mean + mean_lo its mean unrounded.  Every rank
    merges the rows in rank order with Chan's update (:func:`fastbn.functional.merge_stats`):
    the stable equivalent of an allreduce of the moments, bitwise identical on every rank.  The
    running estimates take the global mean and the unbiased global variance
    ``M2 / (count - 1)``.  The output and grad_input keep the input's memory format
    (channels-last too) and dtype.

    Each training backward makes one ``Allgather`` of the header, then one of
    ``[sum(dy), sum(dy * (x - mean))]`` per rank, summed in rank order on every rank.  ``grad_input`` follows from the global sums
    and count (:func:`fastbn.functional.batch_norm_backward_elemt`); ``grad_bias`` is the
    global ``sum(dy)`` and ``grad_weight`` the global ``sum(dy * xhat)``.

    All gradients are therefore those of the *sum* of the ranks' losses.  torch's
    SyncBatchNorm instead leaves the parameter gradients local, for DistributedDataParallel
    to average: to follow that convention, divide ``grad_weight`` and ``grad_bias`` by
    ``comm.Get_size()`` rather than averaging them again.

    A rank whose input or state is invalid (wrong channels, dtype, dimensions, a bad parameter
    or buffer) still joins the collective; every rank then raises the same error, naming the
    failing rank, and no rank changes any state.  Ranks whose modules or calls disagree (a
    model built differently on one rank, one rank in backward while another is in forward)
    all raise the same ValueError, naming what differs by rank, before any payload is sent.

    Examples
    --------
    Run with ``mpiexec -n 2 python script.py``; each rank normalises its half of the batch:

    >>> import numpy as np, fastbn                                      # doctest: +SKIP
    >>> bn = fastbn.SyncBatchNorm(64)
    >>> x = np.random.rand(16, 64, 28, 28).astype(np.float32)          # this rank's samples
    >>> y = bn(x)                                   # global statistics: header, Allgather
    >>> dx = bn.backward(np.ones_like(y))           # global sums: header, Allgather
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, *, bias=True, comm=None,
                 activation=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype,
                         bias=bias, activation=activation)
        if comm is not None:
            missing = [name for name in _COMM_METHODS if not callable(getattr(comm, name, None))]
            if missing:
                raise TypeError(f"comm must be an MPI communicator (with methods "
                                f"{', '.join(_COMM_METHODS)}), got {type(comm).__name__} "
                                f"without {', '.join(missing)}")
        self._comm = comm
        self._synced = None  # the context of the last forward when it was synchronised

    def __getstate__(self):
        state = super().__getstate__()
        state["_synced"] = None
        return state

    @property
    def comm(self):
        """The communicator: the one given, or ``MPI.COMM_WORLD``."""
        return self._comm if self._comm is not None else _world()

    @classmethod
    def convert_sync_batchnorm(cls, module, comm=None):
        """A SyncBatchNorm sharing ``module``'s parameters, buffers and mode.

        As torch's ``convert_sync_batchnorm``: a BatchNorm1d/2d/3d becomes a SyncBatchNorm
        holding the *same* arrays (so the two alias each other's state); a SyncBatchNorm, or
        anything else, is returned unchanged, so a list of layers converts with
        ``[SyncBatchNorm.convert_sync_batchnorm(m) for m in layers]``.
        """
        if isinstance(module, SyncBatchNorm) or not isinstance(module, _BatchNorm):
            return module
        # Every constructor argument of the module's own (activation included), so that one
        # added to the modules later is carried over too.
        sync = cls(**module._constructor_arguments(), comm=comm)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(sync, name, getattr(module, name))
        sync.training = module.training
        return sync

    # -- computation --------------------------------------------------------------------------

    def _check_input(self, input):
        # torch's SyncBatchNorm takes any (N, C, *) input, as the functional API does.
        x = V.as_float_array(input, "input")
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
        if x.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        V.check_channels(x, self.num_features)
        compute = P.compute_dtype(x.dtype)
        if compute != self.dtype:
            V.check_input_dtype(x, compute, self.dtype, type(self).__name__)
        return x

    def forward(self, input, *, out=None):
        """Normalise this rank's ``input`` (N, C, ...) with the global batch statistics.

        In training mode every rank of ``comm`` must call this together (one ``Allgather``);
        the running estimates and ``num_batches_tracked`` are updated identically on every
        rank.  In eval mode there is no communication.  ``out`` (keyword only) receives the
        output, as in the base class.  Returns an array of input's shape, dtype and memory
        format.  The input and the statistics used are kept for :meth:`backward`; do not
        modify the input in place before calling it.
        """
        if not self.training:
            y = super().forward(input, out=out)
            self._synced = None  # (only once the call has succeeded: a rejected one changes nothing)
            return y
        comm = self.comm
        row = None
        failure = None
        try:
            c = self.num_features
            row = np.zeros(1 + 3 * c)
            x, out, update, batch_stats, eps, momentum = self._prepare(input, out)
            self._check_state(x, update)
            if not (x.flags.c_contiguous or P.is_channels_last(x)):
                x = np.ascontiguousarray(x)  # once, for the statistics and the normalisation
            count, mean, mean_lo, m2 = P.local_moments(x, n_threads=effective_n_threads())
            row[0] = count
            row[1:] = np.concatenate([mean, mean_lo, m2])
        except Exception as exc:  # noqa: BLE001 - this rank must still join the collective
            failure = exc
        rows = _allgather_checked(comm, self._header(_FORWARD), row, failure)
        stats = _merged_statistics(rows, c)
        if stats[0] == 1:
            counts = [int(n) for n in rows[:, 0]]
            raise ValueError(f"Expected more than 1 value per channel when training, got 1 value "
                             f"per channel over all {len(counts)} ranks (values per channel by "
                             f"rank: {counts})")
        # (after out=input there is no input to differentiate: the base class's backward says so)
        y, self._synced = self._run(x, out, update, batch_stats, eps, momentum, stats)
        return y

    __call__ = forward

    def backward(self, grad_output):
        """Gradient with respect to this rank's input of the last :meth:`forward`.

        After a training forward every rank must call this together (one ``Allgather``); it
        sets ``grad_weight`` and ``grad_bias`` to the global gradients, identical on every rank
        (None without the parameter), overwritten at each call.  After an eval forward there
        is no communication, as in the base class.  grad_input has the input's memory format.
        """
        if self._synced is None:
            return super().backward(grad_output)
        context = self._synced
        comm = self.comm
        n_threads = effective_n_threads()
        row = None
        failure = None
        try:
            c = self.num_features
            row = np.zeros(2 * c)
            dy, context = self._backward_inputs(grad_output)
            P.checked_weight(self.weight, context)
            sum_dy, sum_dy_xmu = P.local_grad_sums(dy, context, n_threads=n_threads)
            row[:c] = sum_dy
            row[c:] = sum_dy_xmu
        except Exception as exc:  # noqa: BLE001 - this rank must still join the collective
            failure = exc
        rows = _allgather_checked(comm, self._header(_BACKWARD), row, failure)

        # Summed in rank order, so every rank gets the same bits (an MPI reduction may combine
        # in an order that differs between ranks).
        total = rows[0].copy()
        for other in rows[1:]:
            total += other
        sum_dy, sum_dy_xmu = total[:c], total[c:]
        dx = P.grad_input_from_sums(dy, context, weight=self.weight, sum_dy=sum_dy,
                                    sum_dy_xc=sum_dy_xmu, n_threads=n_threads)
        # The same arithmetic as the kernels' epilogue: float64, rounded to the module's dtype.
        self.grad_weight = ((sum_dy_xmu * context.invstd).astype(self.dtype)
                            if self.weight is not None else None)
        self.grad_bias = sum_dy.astype(self.dtype) if self.bias is not None else None
        return dx


    def _header(self, phase):
        """This rank's header (_HEADER), the status slot 0: built from whatever the attributes
        hold, never raising (a bad value is the rank's failure to report, not to trip on)."""
        def number(value, none=-1.0):
            if value is None:
                return none
            if isinstance(value, (bool, np.bool_)):
                return float(bool(value))
            try:
                return float(value)
            except Exception:  # noqa: BLE001 - never raise before the collective
                return np.nan  # (not a number every rank can agree on: the ranks differ)
        dtype = self.dtype if isinstance(self.dtype, np.dtype) else None
        activation = self.activation if isinstance(self.activation, str) else None
        return np.array([0.0, phase, number(self.num_features), self.weight is not None,
                         self.bias is not None, number(self.track_running_stats),
                         activation == "relu", -1.0 if dtype is None else dtype.itemsize,
                         number(self.eps), number(self.momentum)])


def _merged_statistics(rows, c):
    """``(count, mean, mean_lo, m2)`` of the global batch from the gathered rows, merged in
    rank order with Chan's update (the same bits on every rank).  mean + mean_lo is the mean
    unrounded: a single rank's own pair when only one rank has data (so one rank gives
    BatchNorm's bits), else Chan's merged mean and the ranks' low parts, count-weighted."""
    counts = [int(n) for n in rows[:, 0]]
    means, lows, m2s = rows[:, 1:1 + c], rows[:, 1 + c:1 + 2 * c], rows[:, 1 + 2 * c:]
    count, mean, m2 = F.merge_stats(*zip(counts, means, m2s))
    filled = [r for r, n in enumerate(counts) if n]
    if len(filled) == 1:
        mean_lo = lows[filled[0]].copy()
    else:
        mean_lo = np.zeros(c)
        for r in filled:
            mean_lo += counts[r] * lows[r]
        if count:
            mean_lo /= count
    return count, mean, mean_lo, m2


def _allgather_checked(comm, header, row, failure):
    """Allgather every rank's header (its status slot set from ``failure``): if any rank
    failed, raise its error on all; if the ranks disagree on anything else in the header,
    raise that on all.  Then Allgather ``row`` (float64) into a (size, len(row)) array."""
    message = b""
    if failure is not None:
        try:
            text = f"{type(failure).__name__}:rank {comm.Get_rank()}: {failure}"
        except Exception:  # noqa: BLE001 - a message that cannot be formatted still goes round
            text = f"{type(failure).__name__}:rank {comm.Get_rank()}: (unprintable error)"
        message = text.encode("utf-8", "replace")[:_MAX_MESSAGE]
        header[0] = len(message)
    size = comm.Get_size()
    headers = np.empty((size, len(_HEADER)))
    comm.Allgather(header, headers)
    lengths = headers[:, 0].astype(np.int64)
    if lengths.any():
        _raise_everywhere(comm, message, lengths, failure)
    _check_agreement(headers)
    rows = np.empty((size, row.shape[0]))
    comm.Allgather(row, rows)
    return rows


def _check_agreement(headers):
    """Raise, on every rank alike (the headers are the same everywhere), if the ranks'
    headers differ in anything but the status slot."""
    differ = [i for i in range(1, len(_HEADER))
              if not np.array_equal(headers[:, i], headers[0, i].repeat(len(headers)),
                                    equal_nan=True)]
    if not differ:
        return
    def shown(i, value):
        if _HEADER[i] == "phase":
            return {_FORWARD: "forward", _BACKWARD: "backward"}.get(value, "?")
        if _HEADER[i] in ("weight", "bias", "track_running_stats"):
            return str(bool(value))
        if _HEADER[i] == "activation":
            return "'relu'" if value else "None"
        if _HEADER[i] == "dtype":
            return {4.0: "float32", 8.0: "float64"}.get(value, "?")
        if _HEADER[i] == "momentum" and value == -1.0:
            return "None"
        return f"{value:g}"
    details = "; ".join(f"{_HEADER[i]} by rank: [{', '.join(shown(i, v) for v in headers[:, i])}]"
                        for i in differ)
    raise ValueError(f"SyncBatchNorm: the ranks' modules or calls disagree ({details}): every "
                     f"rank must build the same module and call forward and backward together")


def _raise_everywhere(comm, message, lengths, failure):
    """Share the failed ranks' messages (a second Allgather, only on this path: every rank
    knows from the status slots that it is needed, and how long it is) and raise them."""
    width = int(lengths.max())
    mine = np.zeros(width, np.uint8)
    mine[:len(message)] = np.frombuffer(message, np.uint8)
    everyone = np.empty((lengths.shape[0], width), np.uint8)
    comm.Allgather(mine, everyone)
    texts = [bytes(everyone[r, :n]).decode("utf-8", "replace")
             for r, n in enumerate(lengths) if n]
    names, details = zip(*(text.split(":", 1) for text in texts))
    cls = _ERRORS.get(names[0], RuntimeError)
    error = cls("\n".join(details))
    if failure is not None:
        raise error from failure
    raise error
