"""The internal pipeline beneath the public API: the modules (fastbn.modules), SyncBatchNorm
(fastbn.distributed) and the functional API (fastbn.functional) all run batch norm through it.

It takes validated arguments -- each caller checks its own, with the messages of
fastbn._validation -- puts the data in the layout the kernels read (channels-last stays
channels-last, half data stays half), calls the kernels of this CPU's SIMD level and keeps
what a backward needs.  Every argument past the data is keyword-only, so that a call reads
as what it passes.

Map
---
compute_dtype, is_channels_last, to_kernels, from_kernels   dtypes and memory formats
ForwardContext                  what a forward keeps for its backward
EvalTable, eval_table           eval coefficients kept between calls while the state is unchanged
forward, backward               one forward (train or eval) and its backward
local_moments, local_grad_sums, grad_input_from_sums
                                the pieces of a batch split over processes (SyncBatchNorm)
per_channel_arrays, checked_weight, counter_ok
                                state checks in the words of fastbn._validation, for when the
                                kernels' own contract checks refuse (and before collectives)
"""

import math
from collections import namedtuple

import numpy as np

from . import _validation as V
from ._dispatch import kernels as _kernels


def compute_dtype(dtype):
    """The dtype the kernels compute in for data of this dtype: float32 for half data."""
    if dtype is V.FLOAT32 or dtype is V.FLOAT64:
        return dtype
    return V.FLOAT32 if V.is_half(dtype) else dtype


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


class ForwardContext(namedtuple("ForwardContext", ["input", "output", "mean", "invstd",
                                                   "training", "channels_last", "shape",
                                                   "dtype", "count"])):
    """What a forward keeps for its backward: its input (and, with an activation, its output)
    as the kernels read them (half data as it is), the statistics it used, whether they were
    the batch's, the memory format, the logical shape and dtype, and the number of values per
    channel the statistics span (all ranks' for a distributed batch).  Immutable; made by
    _context (tuple.__new__: a namedtuple's own constructor is Python code, and a forward
    makes one at every call)."""

    __slots__ = ()


def _context(*fields):
    return tuple.__new__(ForwardContext, fields)


class EvalTable:
    """An eval forward's per-channel coefficients (the kernels' eval_table), kept with a copy of
    the parameters, buffers and eps they were computed from.  A module keeps one and uses it
    only while its arrays hold exactly those values, compared at every call (:func:`eval_table`:
    bits, presence, dtype and size): a change in place, through a view, by load_state_dict or
    by a new array or None is never served stale.  The coefficients are computed from the
    copy, so that another thread changing the arrays meanwhile cannot make them disagree with
    it.  Never written after it is made, so a forward's context may share its statistics."""

    __slots__ = ("snapshot", "eps", "table", "mean", "invstd")

    def __init__(self, weight, bias, running_mean, running_var, eps, *, dtype, channels):
        V.check_running_pair(running_mean, running_var, training=False)
        if dtype not in V.KERNEL_DTYPES:
            raise TypeError(f"an eval table is float32 or float64, not {dtype}")
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
        # (equal non-zero floats have one sign: copysign is needed for zeros alone)
        return (eps == self.eps
                and (eps != 0.0 or math.copysign(1.0, eps) == math.copysign(1.0, self.eps))
                and _kernels.same_values(self.snapshot, (weight, bias, running_mean, running_var)))


def eval_table(cached, weight, bias, running_mean, running_var, eps, dtype, channels):
    """`cached` (an EvalTable or None) if it was made from these parameters, buffers and eps,
    else a new EvalTable of them, which must be per-channel arrays of `channels` values of
    `dtype` (the input's compute dtype)."""
    # (fresh() compares each array's dtype and size with the snapshot's, and running_mean and
    # running_var are always present: a table of another dtype or C is never fresh)
    if cached is not None and cached.fresh(weight, bias, running_mean, running_var, eps):
        return cached
    return EvalTable(weight, bias, running_mean, running_var, eps, dtype=dtype, channels=channels)


def per_channel_arrays(channels, dtype, *, weight, bias, running_mean, running_var, update):
    """(weight, bias, running_mean, running_var) as the kernels take them, checked by
    fastbn._validation, whose messages name the problem: each None or a 1-D array of `channels`
    values of `dtype`, the running buffers both or neither None and writable when `update`;
    arrays of other strides come back as C-contiguous copies (forward writes updated buffers
    back).  A module's arrays are attributes anyone may assign or change in place, so they are
    checked at every call: on the everyday call by the kernels' own contract checks alone, and
    here when those refuse, or before a collective (SyncBatchNorm)."""
    V.check_running_pair(running_mean, running_var, training=True)
    return (V.check_per_channel(weight, "weight", channels, dtype),
            V.check_per_channel(bias, "bias", channels, dtype),
            V.check_per_channel(running_mean, "running_mean", channels, dtype, writable=update),
            V.check_per_channel(running_var, "running_var", channels, dtype, writable=update))


def forward(x, *, weight, bias, running_mean, running_var, training, momentum, eps, relu, out,
            n_threads, stats=None, table=None):
    """The forward of validated x, out, momentum and eps: (output, save_mean, save_invstd,
    context).  The per-channel arrays are checked here (:func:`per_channel_arrays`).

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
    if training and not count:
        # No kernel runs on an empty batch (and so none checks the arrays): check them here.
        per_channel_arrays(channels, compute_dtype(x.dtype), weight=weight, bias=bias,
                           running_mean=running_mean, running_var=running_var, update=True)
    try:
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
                _kernels.forward_train_with_stats(xk, yk, weight, bias, running_mean,
                                                  running_var, momentum, eps, float(count),
                                                  save_mean, mean_lo, m2, save_invstd, n_threads,
                                                  relu)
        elif count:
            _kernels.forward_train(xk, yk, weight, bias, running_mean, running_var, momentum,
                                   eps, save_mean, save_invstd, n_threads, relu)
    except (TypeError, ValueError) as refused:
        # The kernels check every array before they write anything.
        return _forward_checked(x, refused, weight=weight, bias=bias, running_mean=running_mean,
                                running_var=running_var, training=training, momentum=momentum,
                                eps=eps, relu=relu, out=out, n_threads=n_threads, stats=stats,
                                table=table)
    context = _context(xk, yk if relu else None, save_mean, save_invstd, training,
                       channels_last, x.shape, x.dtype, count)
    if out is None and not channels_last:  # (the everyday call's result, without _result's calls)
        return yk, save_mean, save_invstd, context
    return _result(yk, x, out, channels_last), save_mean, save_invstd, context


def _forward_checked(x, refused, *, weight, bias, running_mean, running_var, training, **call):
    """forward, after the kernels refused its per-channel arrays: say what is wrong in the
    attribute's own words; or, for arrays of other strides, run on contiguous copies and write
    updated buffers back to where they lie."""
    given = (weight, bias, running_mean, running_var)
    checked = per_channel_arrays(x.shape[1], compute_dtype(x.dtype), weight=weight, bias=bias,
                                 running_mean=running_mean, running_var=running_var,
                                 update=training)
    if all(c is g for c, g in zip(checked, given)):
        raise refused  # nothing wrong with them: the kernels' own message stands
    result = forward(x, weight=checked[0], bias=checked[1], running_mean=checked[2],
                     running_var=checked[3], training=training, **call)
    if training:
        for used, own in zip(checked[2:], given[2:]):
            if used is not own:
                own[...] = used
    return result


#: One compiled test that passes the everyday num_batches_tracked (a writable 0-d int64 array
#: one more batch cannot overflow); the modules ask _validation.check_counter otherwise.
counter_ok = _kernels.counter_ok


def checked_weight(weight, context):
    """The weight a backward of this context reads, checked by fastbn._validation (a C-
    contiguous copy if it has other strides)."""
    return V.check_per_channel(weight, "weight", context.shape[1], compute_dtype(context.dtype))


def backward(dy, context, *, weight, param_grads, n_threads):
    """The backward of a forward's context for validated dy (its shape and dtype): (grad_input,
    grad_weight, grad_bias); the parameter gradients are None when param_grads is False."""
    xk = context.input
    dyk = to_kernels(dy, context.channels_last)
    dxk = np.empty(xk.shape, xk.dtype)
    grad_weight = grad_bias = None
    if param_grads:
        grad_weight = np.zeros(context.shape[1], compute_dtype(xk.dtype))
        grad_bias = np.zeros(context.shape[1], compute_dtype(xk.dtype))
    try:
        _kernels.backward(dyk, xk, dxk, weight, context.mean, context.invstd, grad_weight,
                          grad_bias, context.training, n_threads, context.output)
    except (TypeError, ValueError):
        # (as in forward: the weight's own message, or a contiguous copy of a strided one)
        checked = checked_weight(weight, context)
        if checked is weight:
            raise
        _kernels.backward(dyk, xk, dxk, checked, context.mean, context.invstd, grad_weight,
                          grad_bias, context.training, n_threads, context.output)
    return from_kernels(dxk, context.shape, context.channels_last), grad_weight, grad_bias


# The pieces of a distributed batch's forward and backward (fastbn.distributed): each rank's
# contribution, and the rest from the merged totals, by the same kernels as the above.

def local_moments(x, *, n_threads):
    """``(count, mean, mean_lo, m2)`` of x's channels (validated input, any memory format):
    the mean unrounded as mean + mean_lo (float64 each), M2 the sum of squared deviations."""
    channels = x.shape[1]
    count = V.values_per_channel(x.shape)
    mean, mean_lo, m2 = np.zeros(channels), np.zeros(channels), np.zeros(channels)
    if count:
        _kernels.moments(to_kernels(x, is_channels_last(x)), mean, m2, n_threads, mean_lo)
    return count, mean, mean_lo, m2


def local_grad_sums(dy, context, *, n_threads):
    """``(sum(g), sum(g * (x - mean)))`` per channel over this forward's input (float64), g
    being dy gated by the activation of the context's output when it has one."""
    sum_dy, sum_dy_xc = np.zeros(context.shape[1]), np.zeros(context.shape[1])
    if context.input.size:
        _kernels.grad_sums(to_kernels(dy, context.channels_last), context.input, context.mean,
                           sum_dy, sum_dy_xc, n_threads, context.output)
    return sum_dy, sum_dy_xc


def grad_input_from_sums(dy, context, *, weight, sum_dy, sum_dy_xc, n_threads):
    """The training backward's grad_input for this forward's input, in its memory format, from
    per-channel sums (float64) over all context.count values of each channel."""
    weight = checked_weight(weight, context)
    xk = context.input
    dxk = np.empty(xk.shape, xk.dtype)
    if xk.size:
        _kernels.backward_from_sums(to_kernels(dy, context.channels_last), xk, dxk, weight,
                                    context.mean, context.invstd, sum_dy, sum_dy_xc,
                                    float(context.count), n_threads, context.output)
    return from_kernels(dxk, context.shape, context.channels_last)


def normalize_given(x, *, weight, bias, mean, invstd, relu, out, n_threads):
    """y = (x - mean) * invstd * weight + bias (then ReLU) for validated x and out and float64
    statistics, in out's memory format when out is given, else in x's."""
    channels_last = is_channels_last(x if out is None else out)
    xk, yk = _kernel_output(x, to_kernels(x, channels_last), out, channels_last)
    _kernels.normalize_given(xk, yk, weight, bias, mean, invstd, n_threads, relu)
    return _result(yk, x, out, channels_last)


def given_context(x, *, output, mean, invstd, training, count):
    """A forward's context for validated x (and its output, the ReLU's mask, or None) with given
    statistics over `count` values per channel: what a backward of them needs."""
    channels_last = is_channels_last(x)
    return _context(to_kernels(x, channels_last),
                    None if output is None else to_kernels(output, channels_last),
                    mean, invstd, training, channels_last, tuple(x.shape), x.dtype, count)
