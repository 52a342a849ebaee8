"""Stateless batch normalisation on numpy arrays, with torch's signatures and semantics.

* :func:`batch_norm` is ``torch.nn.functional.batch_norm``.
* :func:`batch_norm_forward` / :func:`batch_norm_backward` are the lower-level pair the modules
  are built on, modelled on torch's ``native_batch_norm`` / ``native_batch_norm_backward``.
* :func:`batch_stats`, :func:`merge_stats`, :func:`batch_norm_elemt`,
  :func:`batch_norm_backward_reduce` and :func:`batch_norm_backward_elemt` are the building
  blocks of distributed batch norm (torch's SyncBatchNorm uses ops of the same names): local
  statistics, their stable merge, normalisation with given statistics, the local sums of the
  backward, and the input gradient from sums gathered over all workers.

dtypes: float32 and float64 inputs are computed in their own precision, with float64
accumulation for all statistics; parameters and running buffers must have the input's dtype
(mixing is a TypeError, as in torch).  Half inputs -- float16, and bfloat16 as
``ml_dtypes.bfloat16`` arrays -- take float32 parameters and buffers, as torch's CPU batch norm
does; the kernels read and write them as they are and compute in float32, so every half result
is the float32 result on the widened data, rounded to nearest even, and the running buffers
and parameter gradients are the float32 path's, bit for bit.

``n_threads`` follows scikit-learn: None uses the OpenMP runtime's current setting (which
honours OMP_NUM_THREADS, ``fastbn.set_num_threads`` and threadpoolctl); -1 means all CPUs.
Results are bitwise identical for any thread count.
"""

import math

import numpy as np

from . import _validation as V
from ._dispatch import kernels as _kernels
from ._openmp import effective_n_threads

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward", "batch_stats", "merge_stats",
           "batch_norm_elemt", "batch_norm_backward_reduce", "batch_norm_backward_elemt"]


# ---------------------------------------------------------------------------------------------
# Helpers shared with the modules (which validate their own state once, at construction)
# ---------------------------------------------------------------------------------------------

def compute_dtype(dtype):
    """The dtype the kernels compute in for data of this dtype: float32 for half data."""
    if dtype is V.FLOAT32 or dtype is V.FLOAT64:
        return dtype
    return V.FLOAT32 if V.is_half(dtype) else dtype


def as_input(value, name="input"):
    """A validated float array with at least two dimensions (N, C, *)."""
    x = V.as_float_array(value, name)
    if x.ndim < 2:
        raise ValueError(f"expected {name} with at least 2 dimensions (N, C, *) (got {x.ndim}D {name})")
    return x


def is_channels_last(x):
    """Whether x, logically (N, C, *spatial), lies in memory as a contiguous (N, *spatial, C)
    array (torch's channels_last / channels_last_3d), and not also as (N, C, *spatial)."""
    return x.ndim >= 3 and not x.flags.c_contiguous and np.moveaxis(x, 1, -1).flags.c_contiguous


def to_kernels(x, channels_last):
    """x as the aligned, C-contiguous array the kernels read, in its own dtype (half data too).

    Channels-last memory is read as the (N * spatial, C) matrix it is -- BatchNorm1d's layout,
    one row per position -- without a copy; anything else as (N, C, *spatial), copied once if
    it is not C-contiguous.
    """
    if not channels_last and x.flags.c_contiguous and (x.dtype is V.FLOAT32 or x.dtype is V.FLOAT64):
        return x  # the common case, checked fast
    channels = x.shape[1]
    if channels_last:
        x = np.moveaxis(x, 1, -1)  # (N, *spatial, C): C-contiguous when x is channels-last
    x = np.require(x, None, ["C_CONTIGUOUS", "ALIGNED"])
    return x.reshape(-1, channels) if channels_last else x


def from_kernels(yk, shape, channels_last):
    """A result the kernels wrote in to_kernels' layout, seen with the logical shape (N, C, *)."""
    if channels_last:
        return np.moveaxis(yk.reshape((shape[0],) + tuple(shape[2:]) + (shape[1],)), -1, 1)
    return yk


def _same_memory(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape)


def _kernel_output(x, xk, out, channels_last):
    """(xk, yk): where the kernels read and write.  yk is a view of `out` when out can be written
    directly; an out that overlaps the input without being it gets a copy of the input."""
    if out is None or not out.flags.aligned:
        return xk, np.empty(xk.shape, xk.dtype)
    yk = to_kernels(out, channels_last)  # a view: out is C-contiguous or channels-last, aligned
    if not _same_memory(yk, xk) and np.may_share_memory(yk, xk):
        xk = xk.copy()
    return xk, yk


def _result(yk, x, out, channels_last):
    """The kernels' output as the caller sees it: `out` when given, x's shape, dtype and memory
    format otherwise."""
    if out is None:
        return from_kernels(yk, x.shape, channels_last)
    if not np.may_share_memory(yk, out):  # out was not aligned: the kernels wrote elsewhere
        out[...] = from_kernels(yk, x.shape, channels_last)
    return out


class ForwardContext:
    """What a forward keeps for its backward: its input (and, with an activation, its output)
    as the kernels read them (half data as it is), the statistics it used, and the number of
    values per channel they span (all ranks' for a distributed batch)."""

    __slots__ = ("input", "output", "mean", "invstd", "training", "channels_last", "shape", "dtype",
                 "count")

    def __init__(self, input, output, mean, invstd, training, channels_last, shape, dtype, count):
        self.input = input
        self.output = output
        self.mean = mean
        self.invstd = invstd
        self.training = training
        self.channels_last = channels_last
        self.shape = tuple(shape)
        self.dtype = dtype
        self.count = count


class EvalTable:
    """An eval forward's per-channel coefficients (the kernels' eval_table), kept with a copy of
    the parameters, buffers and eps they were computed from.  A module keeps one and uses it
    only while its arrays hold exactly those values, compared at every call (:func:`eval_table`:
    bits, presence, dtype and size): a change in place, through a view, by load_state_dict or
    by a new array or None is never served stale.  The coefficients are computed from the
    copy, so that another thread changing the arrays meanwhile cannot make them disagree with
    it.  Never written after it is made, so a forward's context may share its statistics."""

    __slots__ = ("snapshot", "eps", "table", "mean", "invstd")

    def __init__(self, weight, bias, running_mean, running_var, eps):
        if running_mean is None or running_var is None:
            raise ValueError("an eval table needs running_mean and running_var")
        dtype = running_mean.dtype
        if dtype not in V.KERNEL_DTYPES:
            raise TypeError(f"running_mean has dtype {dtype}; expected float32 or float64")
        channels = running_mean.shape[0] if running_mean.ndim == 1 else -1
        arrays = (weight, bias, running_mean, running_var)
        for name, a in zip(("weight", "bias", "running_mean", "running_var"), arrays):
            V.check_per_channel(a, name, channels, dtype)
        # rows 0-3: the arrays' values (ones and zeros for absent ones, which the kernels read
        # as such); row 4: which of them were present, as a bit mask in its first value
        self.snapshot = np.zeros((5, channels), dtype)
        self.snapshot[0] = 1
        present = 0
        for i, a in enumerate(arrays):
            if a is not None:
                self.snapshot[i] = a
                present |= 1 << i
        if channels:
            self.snapshot[4, 0] = present
        self.eps = eps
        self.table = np.empty((4, channels), dtype)
        self.mean = np.empty(channels)
        self.invstd = np.empty(channels)
        _kernels.eval_table(self.snapshot[0], self.snapshot[1], self.snapshot[2],
                            self.snapshot[3], eps, self.table, self.mean, self.invstd)

    def fresh(self, weight, bias, running_mean, running_var, eps):
        """Whether the table was made from exactly these values (bit for bit; eps's sign too)."""
        return (eps == self.eps and math.copysign(1.0, eps) == math.copysign(1.0, self.eps)
                and _kernels.same_values(self.snapshot, (weight, bias, running_mean, running_var)))


def eval_table(cached, weight, bias, running_mean, running_var, eps):
    """`cached` (an EvalTable or None) if it was made from these parameters, buffers and eps,
    else a new EvalTable of them."""
    if cached is not None and cached.fresh(weight, bias, running_mean, running_var, eps):
        return cached
    return EvalTable(weight, bias, running_mean, running_var, eps)


def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, relu, out,
            n_threads, stats=None, table=None):
    """The forward on validated arguments: (output, save_mean, save_invstd, context).

    training=True normalises with batch statistics and, when the running buffers are given,
    updates them in place; training=False normalises with the running buffers.  relu applies
    ReLU in the same pass.  The computation happens in out's memory format when out is given,
    else in the input's (channels-last stays channels-last).

    stats, in training: the batch statistics to use instead of x's own, ``(count, mean,
    mean_lo, m2)`` as :func:`local_moments` gives them (merged over the ranks of a distributed
    batch, which x is this rank's part of); the running buffers are updated from them, also
    when x itself is empty, by the same kernel code as with x's own statistics.

    table, in eval: the EvalTable of these parameters, buffers and eps (:func:`eval_table`),
    whose coefficients then normalise x, with the same bits; the statistics returned are the
    table's own arrays, not to be written.
    """
    channels = x.shape[1]
    if out is None and x.flags.c_contiguous and x.flags.aligned:
        # The everyday call, without the memory-format and out= logic (tiny calls are
        # dominated by it): the kernels read x as it is and write a new array.
        channels_last = False
        xk = x
        yk = np.empty(x.shape, x.dtype)
    else:
        channels_last = is_channels_last(x if out is None else out)
        xk, yk = _kernel_output(x, to_kernels(x, channels_last), out, channels_last)
    if stats is not None:
        count = stats[0]
    else:  # (x.size // channels, not values_per_channel: 0.1 us of a 2.5 us call)
        count = x.size // channels if channels else V.values_per_channel(x.shape)
    if not training and table is not None:
        save_mean, save_invstd = table.mean, table.invstd
    elif training and count == 0:
        # As torch: nothing to normalise, running buffers untouched; no statistics exist.
        # (np.zeros, not a fill: calloc'd pages cost nothing until read, whatever C is.)
        save_mean = np.zeros(channels)
        save_invstd = np.zeros(channels)
    else:
        save_mean = np.empty(channels)
        save_invstd = np.empty(channels)
    if not training:
        if table is not None:
            _kernels.apply_table(xk, yk, table.table, n_threads, relu)
        else:
            _kernels.forward_eval(xk, yk, weight, bias, running_mean, running_var, eps,
                                  save_mean, save_invstd, n_threads, relu)
    elif stats is not None:
        if count:
            _, mean, mean_lo, m2 = stats
            save_mean[...] = mean
            _kernels.forward_train_with_stats(xk, yk, weight, bias, running_mean, running_var,
                                              momentum, eps, float(count), save_mean, mean_lo, m2,
                                              save_invstd, n_threads, relu)
    elif count:
        _kernels.forward_train(xk, yk, weight, bias, running_mean, running_var, momentum, eps,
                               save_mean, save_invstd, n_threads, relu)
    context = ForwardContext(xk, yk if relu else None, save_mean, save_invstd, training,
                             channels_last, x.shape, x.dtype, count)
    if out is None and not channels_last:  # (the everyday call's result, without _result's calls)
        return yk, save_mean, save_invstd, context
    return _result(yk, x, out, channels_last), save_mean, save_invstd, context


def backward(dy, context, weight, param_grads, n_threads):
    """The backward of a forward's context: (grad_input, grad_weight, grad_bias); the parameter
    gradients are None when param_grads is False."""
    xk = context.input
    dyk = to_kernels(dy, context.channels_last)
    dxk = np.empty(xk.shape, xk.dtype)
    grad_weight = grad_bias = None
    if param_grads:
        grad_weight = np.zeros(context.shape[1], compute_dtype(xk.dtype))
        grad_bias = np.zeros(context.shape[1], compute_dtype(xk.dtype))
    _kernels.backward(dyk, xk, dxk, weight, context.mean, context.invstd, grad_weight, grad_bias,
                      context.training, n_threads, context.output)
    return from_kernels(dxk, context.shape, context.channels_last), grad_weight, grad_bias


# The pieces of a distributed batch's forward and backward (fastbn.distributed): each rank's
# contribution, and the rest from the merged totals, by the same kernels as the above.

def local_moments(x, n_threads):
    """``(count, mean, mean_lo, m2)`` of x's channels (validated input, any memory format):
    the mean unrounded as mean + mean_lo (float64 each), M2 the sum of squared deviations."""
    channels = x.shape[1]
    count = V.values_per_channel(x.shape)
    mean, mean_lo, m2 = np.zeros(channels), np.zeros(channels), np.zeros(channels)
    if count:
        _kernels.moments(to_kernels(x, is_channels_last(x)), mean, m2, n_threads, mean_lo)
    return count, mean, mean_lo, m2


def local_grad_sums(dy, context, n_threads):
    """``(sum(g), sum(g * (x - mean)))`` per channel over this forward's input (float64), g
    being dy gated by the activation of the context's output when it has one."""
    sum_dy, sum_dy_xc = np.zeros(context.shape[1]), np.zeros(context.shape[1])
    if context.input.size:
        _kernels.grad_sums(to_kernels(dy, context.channels_last), context.input, context.mean,
                           sum_dy, sum_dy_xc, n_threads, context.output)
    return sum_dy, sum_dy_xc


def grad_input_from_sums(dy, context, weight, sum_dy, sum_dy_xc, n_threads):
    """The training backward's grad_input for this forward's input, in its memory format, from
    per-channel sums (float64) over all context.count values of each channel."""
    xk = context.input
    dxk = np.empty(xk.shape, xk.dtype)
    if xk.size:
        _kernels.backward_from_sums(to_kernels(dy, context.channels_last), xk, dxk, weight,
                                    context.mean, context.invstd, sum_dy, sum_dy_xc,
                                    float(context.count), n_threads, context.output)
    return from_kernels(dxk, context.shape, context.channels_last)


def _check_forward_args(x, running_mean, running_var, weight, bias, training, momentum, eps, out):
    """Validate everything the forward reads or writes; return the per-channel arrays as the
    kernels take them."""
    dtype = compute_dtype(x.dtype)
    channels = x.shape[1]
    V.check_running_pair(running_mean, running_var, training)
    eps = V.check_eps(eps, training)
    momentum = V.check_momentum(momentum)
    if training:
        V.check_batch_size(x.shape)
    weight = V.check_per_channel(weight, "weight", channels, dtype)
    bias = V.check_per_channel(bias, "bias", channels, dtype)
    rm = V.check_per_channel(running_mean, "running_mean", channels, dtype, writable=training)
    rv = V.check_per_channel(running_var, "running_var", channels, dtype, writable=training)
    if out is not None:
        V.check_out(out, x.shape, x.dtype)
    return weight, bias, rm, rv, momentum, eps


def _gating_output(activation, output, x):
    """The forward's output as the backward's ReLU mask (None without an activation)."""
    if V.check_activation(activation) is None:
        if output is not None:
            raise ValueError("output is only used with activation='relu' (it supplies the ReLU's mask)")
        return None
    if output is None:
        raise ValueError("activation='relu' needs output=, the forward's output: its ReLU's mask")
    output = as_input(output, "output")
    V.check_same_shape(output, x, "output", "input")
    if output.dtype != x.dtype:
        raise TypeError(f"output has dtype {output.dtype} but input has dtype {x.dtype}; they must match")
    return output


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def batch_norm_forward(input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, activation=None, out=None, n_threads=None):
    """Batch normalisation forward, returning the statistics it used.

    Parameters
    ----------
    input : ndarray, shape (N, C, *)
        float16, bfloat16 (ml_dtypes.bfloat16), float32 or float64 data.  C-contiguous and
        channels-last memory (torch's channels_last: contiguous as (N, *spatial, C)) are read
        in place, and the output keeps the input's memory format; other strides are copied
        once.  Half data is read and written as it is and computed in float32.
    running_mean, running_var : ndarray, shape (C,), or None
        Running statistics, of the computing dtype (float32 for half data).  In training mode they are updated in place
        (``new = (1 - momentum) * old + momentum * batch``, the variance unbiased) when given;
        in eval mode (``training=False``) they are required and used to normalise.
    weight, bias : ndarray, shape (C,), or None
        The affine parameters gamma and beta (None: 1 and 0).
    training : bool
        Normalise with the batch's statistics (True) or the running ones (False).
    momentum : float
        Update factor of the running buffers (training only).
    eps : float
        Added to the variance; must be > 0 in training, >= 0 in eval.
    activation : None or 'relu'
        Applied to the output in the same pass over memory (``max(0, .)``, as torch's ReLU).
    out : ndarray, optional
        Where to write the output: exactly input's shape and dtype, C-contiguous or
        channels-last (``out=input`` normalises in place).
    n_threads : int or None, default None
        OpenMP threads, as scikit-learn's ``n_threads``: None uses
        :func:`fastbn.get_num_threads` (which honours ``OMP_NUM_THREADS``,
        :func:`fastbn.set_num_threads` and ``threadpoolctl.threadpool_limits``); a positive
        count is used as given; -1 means all CPUs, -2 all but one.  Results are bitwise
        identical for any value.

    Returns
    -------
    output : ndarray, input's shape and dtype (and memory format)
        ``(input - mean) / sqrt(var + eps) * weight + bias``, var being the biased variance,
        then the activation.
    save_mean, save_invstd : ndarray, shape (C,), float64
        The mean and ``1 / sqrt(var + eps)`` used, whatever the mode, so that
        :func:`batch_norm_backward` needs nothing else (torch returns empty tensors in eval
        mode on the CPU).  They are float64, the precision they were computed in.  For an empty
        batch in training mode there are no statistics and both are zeros.
    """
    x = as_input(input)
    training = V.check_flag(training, "training")
    weight, bias, rm, rv, momentum, eps = _check_forward_args(
        x, running_mean, running_var, weight, bias, training, momentum, eps, out)
    relu = V.check_activation(activation) == "relu"
    result = forward(x, weight, bias, rm, rv, training, momentum, eps, relu, out,
                     effective_n_threads(n_threads))[:3]
    # A non-contiguous buffer was updated through a contiguous copy: write it back.
    if training:
        for given, used in ((running_mean, rm), (running_var, rv)):
            if used is not None and used is not given:
                given[...] = used
    return result


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None, out=None, n_threads=None):
    """``torch.nn.functional.batch_norm`` for numpy arrays.

    ``output = (input - mean) / sqrt(var + eps) * weight + bias`` per channel (dimension 1),
    with the batch's statistics in training mode (the running buffers, when given, are updated
    in place) and the running statistics otherwise.

    Parameters
    ----------
    input, running_mean, running_var, weight, bias, training, momentum, eps, out, n_threads
        As in :func:`batch_norm_forward`.

    Returns
    -------
    output : ndarray, input's shape and dtype

    Examples
    --------
    >>> import numpy as np, fastbn.functional as F
    >>> x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    >>> rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    >>> F.batch_norm(x, rm, rv, training=True).round(3)[0]
    array([[-1.213, -0.728],
           [-1.213, -0.728]], dtype=float32)
    >>> rm
    array([0.25, 0.45], dtype=float32)
    """
    return batch_norm_forward(input, running_mean, running_var, weight, bias, training,
                              momentum, eps, activation=activation, out=out,
                              n_threads=n_threads)[0]


def batch_norm_backward(grad_output, input, save_mean, save_invstd, weight=None, training=True,
                        *, output=None, activation=None, n_threads=None):
    """Gradients of :func:`batch_norm_forward`.

    Parameters
    ----------
    grad_output : ndarray
        Gradient of the loss with respect to the forward's output: input's shape and dtype.
    input : ndarray
        The forward's input.
    save_mean, save_invstd : array_like, shape (C,)
        The statistics :func:`batch_norm_forward` returned.
    weight : ndarray, shape (C,), or None
        The forward's weight (None: 1).
    training : bool
        True when the forward normalised with batch statistics (they then depend on the input
        and contribute to its gradient); False when it used running statistics.
    output : ndarray, optional
        The forward's output, needed with ``activation='relu'``: the gradient passes where it
        is not <= 0 (torch's ReLU backward).
    activation : None or 'relu'
        The forward's activation.
    n_threads : int or None, default None
        As in :func:`batch_norm_forward`.

    Returns
    -------
    grad_input : ndarray, input's shape and dtype
    grad_weight, grad_bias : ndarray, shape (C,)
        ``sum(grad_output * xhat)`` and ``sum(grad_output)`` per channel, xhat being the
        normalised input; returned whether or not the forward had affine parameters.
    """
    dy, x = _grad_and_input(grad_output, input)
    output = _gating_output(activation, output, x)
    mean, invstd = _statistics(x.shape[1], save_mean=save_mean, save_invstd=save_invstd)
    weight = V.check_per_channel(weight, "weight", x.shape[1], compute_dtype(x.dtype))
    training = V.check_flag(training, "training")
    channels_last = is_channels_last(x)
    context = ForwardContext(to_kernels(x, channels_last),
                             None if output is None else to_kernels(output, channels_last),
                             mean, invstd, training, channels_last, x.shape, x.dtype,
                             V.values_per_channel(x.shape))
    return backward(dy, context, weight, True, effective_n_threads(n_threads))


def _grad_and_input(grad_output, input):
    x = as_input(input)
    dy = as_input(grad_output, "grad_output")
    V.check_same_shape(dy, x, "grad_output", "input")
    if dy.dtype != x.dtype:
        raise TypeError(f"grad_output has dtype {dy.dtype} but input has dtype {x.dtype}; they must match")
    return dy, x


def _statistics(channels, **named):
    """Per-channel statistics as contiguous float64 arrays of length `channels`."""
    arrays = []
    for name, value in named.items():
        value = V.as_float_array(value, name)
        if value.shape != (channels,):
            raise ValueError(f"{name} should contain {channels} elements (one per channel), "
                             f"got shape {tuple(value.shape)}")
        arrays.append(np.ascontiguousarray(value, dtype=np.float64))
    return arrays


def batch_stats(input, *, n_threads=None):
    """Per-channel ``(count, mean, M2)`` of a batch, M2 being the sum of squared deviations.

    These are what distributed batch norm combines across workers (see
    :func:`fastbn.merge_stats`): the variance is ``M2 / count`` (biased) or
    ``M2 / (count - 1)`` (unbiased).

    Parameters
    ----------
    input : ndarray, shape (N, C, *)
        float16, bfloat16 (ml_dtypes.bfloat16), float32 or float64 data.
    n_threads : int or None, default None
        As in :func:`batch_norm_forward`.

    Returns
    -------
    count : int
        Values per channel, N times the spatial size.
    mean, m2 : ndarray, shape (C,), float64
        Per-channel mean and sum of squared deviations from it.  An empty batch gives
        ``(0, zeros, zeros)``, the identity of the merge.
    """
    count, mean, _, m2 = local_moments(as_input(input), effective_n_threads(n_threads))
    return count, mean, m2


def merge_stats(*stats):
    """Merge per-channel ``(count, mean, M2)`` triples of disjoint batches into one.

    Each triple is what :func:`batch_stats` returns.  The merge is Chan, Golub & LeVeque's
    pairwise update (stable: no sums of squares are formed), applied left to right, so the
    same triples in the same order give the same bits on every worker.  Empty batches
    (count 0) are the identity.

    Parameters
    ----------
    *stats : tuple of (int, array_like, array_like)
        One or more ``(count, mean, m2)`` triples with the same number of channels.

    Returns
    -------
    count : int
    mean, m2 : ndarray, shape (C,), float64
        The statistics of the union of the batches.

    Examples
    --------
    >>> a, b = np.arange(6.0).reshape(3, 2), np.arange(6.0, 10.0).reshape(2, 2)
    >>> count, mean, m2 = merge_stats(batch_stats(a), batch_stats(b))
    >>> count, mean, m2 / count
    (5, array([4., 5.]), array([8., 8.]))
    """
    if not stats:
        raise TypeError("merge_stats() needs at least one (count, mean, m2) triple")
    count, mean, m2 = _check_triple(stats[0], 0)
    for i, other in enumerate(stats[1:], 1):
        n_b, mean_b, m2_b = _check_triple(other, i)
        if mean_b.shape != mean.shape:
            raise ValueError(f"triple {i} has {mean_b.shape[0]} channels but triple 0 has {mean.shape[0]}")
        if n_b == 0:
            continue
        if count == 0:
            count, mean, m2 = n_b, mean_b, m2_b
            continue
        n = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + delta * delta * (count * n_b / n)
        count = n
    return count, np.array(mean, dtype=np.float64), np.array(m2, dtype=np.float64)


def _check_triple(triple, i):
    try:
        count, mean, m2 = triple
    except (TypeError, ValueError):
        raise TypeError(f"triple {i} must be (count, mean, m2), got {type(triple).__name__}") from None
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"triple {i}: count must be an int, got {type(count).__name__} {count!r}")
    if count < 0:
        raise ValueError(f"triple {i}: count must be a non-negative int, got {count!r}")
    mean, m2 = (_real_vector(v, f"triple {i}: {name}") for v, name in ((mean, "mean"), (m2, "m2")))
    if mean.ndim != 1 or m2.shape != mean.shape:
        raise ValueError(f"triple {i}: mean and m2 must be 1-D arrays of the same length, got "
                         f"shapes {mean.shape} and {m2.shape}")
    if np.any(m2 < 0):  # (NaN passes: it propagates, as NaN data does)
        raise ValueError(f"triple {i}: m2 (a sum of squared deviations) must be non-negative, "
                         f"got {m2[m2 < 0][:4]}")
    return int(count), mean, m2


def _real_vector(value, what):
    """value as a float64 array, refusing what is not real numbers (strings, complex, objects)
    rather than converting it or dropping imaginary parts."""
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{what} must be an array of real numbers, could not convert "
                        f"{type(value).__name__}: {exc}") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what} must be an array of real numbers, got dtype {array.dtype}")
    return array.astype(np.float64)


def batch_norm_elemt(input, mean, invstd, weight=None, bias=None, *, activation=None, out=None,
                     n_threads=None):
    """``(input - mean) * invstd * weight + bias`` with given per-channel statistics.

    The normalisation step of distributed batch norm, where mean and invstd come from all
    workers' merged statistics (torch: ``torch.batch_norm_elemt``).

    Parameters
    ----------
    input : ndarray, shape (N, C, *)
        float16, bfloat16, float32 or float64 data, C-contiguous or channels-last (kept in the
        output).
    mean, invstd : array_like, shape (C,)
        The statistics to normalise with, cast to float64.
    weight, bias : ndarray, shape (C,), or None
        Affine parameters of the computing dtype (None: 1 and 0).
    activation : None or 'relu'
        As in :func:`batch_norm_forward`.
    out : ndarray, optional
        As in :func:`batch_norm_forward`.
    n_threads : int or None, default None
        As in :func:`batch_norm_forward`.

    Returns
    -------
    output : ndarray, input's shape and dtype
    """
    x = as_input(input)
    mean, invstd = _statistics(x.shape[1], mean=mean, invstd=invstd)
    dtype = compute_dtype(x.dtype)
    weight = V.check_per_channel(weight, "weight", x.shape[1], dtype)
    bias = V.check_per_channel(bias, "bias", x.shape[1], dtype)
    relu = V.check_activation(activation) == "relu"
    if out is not None:
        V.check_out(out, x.shape, x.dtype)
    channels_last = is_channels_last(x if out is None else out)
    xk, yk = _kernel_output(x, to_kernels(x, channels_last), out, channels_last)
    _kernels.normalize_given(xk, yk, weight, bias, mean, invstd, effective_n_threads(n_threads), relu)
    return _result(yk, x, out, channels_last)


def batch_norm_backward_reduce(grad_output, input, mean, *, output=None, activation=None,
                               n_threads=None):
    """Per-channel ``(sum(grad_output), sum(grad_output * (input - mean)))``, float64.

    The local part of the training-mode backward; distributed batch norm sums these over all
    workers and passes the totals to :func:`batch_norm_backward_elemt`.  The parameter
    gradients follow from the totals: ``grad_bias = sum_dy``, ``grad_weight = sum_dy_xmu * invstd``.
    With ``activation='relu'`` and the forward's ``output``, grad_output is first gated by the
    ReLU (as in :func:`batch_norm_backward`).

    Parameters
    ----------
    grad_output : ndarray
        Gradient with respect to the forward's output: input's shape and dtype.
    input : ndarray, shape (N, C, *)
        The forward's input.
    mean : array_like, shape (C,)
        The mean the forward normalised with (all workers' merged mean).
    output : ndarray, optional
        The forward's output, with ``activation='relu'``.
    activation : None or 'relu'
        The forward's activation.
    n_threads : int or None, default None
        As in :func:`batch_norm_forward`.

    Returns
    -------
    sum_dy, sum_dy_xmu : ndarray, shape (C,), float64
    """
    dy, x = _grad_and_input(grad_output, input)
    output = _gating_output(activation, output, x)
    (mean,) = _statistics(x.shape[1], mean=mean)
    return local_grad_sums(dy, _given_context(x, output, mean, None), effective_n_threads(n_threads))


def batch_norm_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                              *, output=None, activation=None, n_threads=None):
    """Training-mode ``grad_input`` from per-channel sums over ``count`` values per channel.

    ``sum_dy`` and ``sum_dy_xmu`` are :func:`batch_norm_backward_reduce`'s results summed over
    every worker, and ``count`` the total number of values per channel (all workers' N * S);
    on a single process this equals :func:`batch_norm_backward`'s grad_input.

    Parameters
    ----------
    grad_output : ndarray
        Gradient with respect to the forward's output: input's shape and dtype.
    input : ndarray, shape (N, C, *)
        The forward's input.
    mean, invstd : array_like, shape (C,)
        The statistics the forward normalised with.
    weight : ndarray, shape (C,), or None
        The forward's weight (None: 1).
    sum_dy, sum_dy_xmu : array_like, shape (C,)
        The totals of :func:`batch_norm_backward_reduce` over all workers.
    count : int
        Values per channel over all workers.
    output, activation
        As in :func:`batch_norm_backward_reduce`.
    n_threads : int or None, default None
        As in :func:`batch_norm_forward`.

    Returns
    -------
    grad_input : ndarray, input's shape and dtype
    """
    dy, x = _grad_and_input(grad_output, input)
    output = _gating_output(activation, output, x)
    channels = x.shape[1]
    mean, invstd, sum_dy, sum_dy_xmu = _statistics(channels, mean=mean, invstd=invstd, sum_dy=sum_dy,
                                                   sum_dy_xmu=sum_dy_xmu)
    weight = V.check_per_channel(weight, "weight", channels, compute_dtype(x.dtype))
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"count must be an int (values per channel over all workers), got "
                        f"{type(count).__name__}")
    if count < 1:
        raise ValueError(f"count must be a positive int (values per channel over all workers), got {count!r}")
    context = _given_context(x, output, mean, invstd, count)
    return grad_input_from_sums(dy, context, weight, sum_dy, sum_dy_xmu, effective_n_threads(n_threads))


def _given_context(x, output, mean, invstd, count=None):
    """A training forward's context for validated x (and output), with given statistics."""
    channels_last = is_channels_last(x)
    return ForwardContext(to_kernels(x, channels_last),
                          None if output is None else to_kernels(output, channels_last),
                          mean, invstd, True, channels_last, x.shape, x.dtype,
                          V.values_per_channel(x.shape) if count is None else count)
