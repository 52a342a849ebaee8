"""Stateless batch normalisation on numpy arrays, with torch's signatures and semantics.

* :func:`batch_norm` is ``torch.nn.functional.batch_norm``.
* :func:`batch_norm_forward` / :func:`batch_norm_backward` are the lower-level pair, modelled on
  torch's ``native_batch_norm`` / ``native_batch_norm_backward``.

Every function checks its arguments and runs fastbn._pipeline, the same pipeline the modules
and SyncBatchNorm run.
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

import numpy as np

from . import _pipeline as P
from . import _validation as V
from ._openmp import effective_n_threads

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward", "batch_stats", "merge_stats",
           "batch_norm_elemt", "batch_norm_backward_reduce", "batch_norm_backward_elemt"]


# ---------------------------------------------------------------------------------------------
# Checks of the public API's arguments (the computation is fastbn._pipeline's)
# ---------------------------------------------------------------------------------------------

def as_input(value, name="input"):
    """A validated float array with at least two dimensions (N, C, *)."""
    x = V.as_float_array(value, name)
    if x.ndim < 2:
        raise ValueError(f"expected {name} with at least 2 dimensions (N, C, *) (got {x.ndim}D {name})")
    return x


def _check_forward_args(x, running_mean, running_var, training, momentum, eps, out):
    """Validate the scalars, the running pair and out of a forward: (momentum, eps).  The
    per-channel arrays are checked by the pipeline's forward, which modules share."""
    V.check_running_pair(running_mean, running_var, training)
    eps = V.check_eps(eps, training)
    momentum = V.check_momentum(momentum)
    if training:
        V.check_batch_size(x.shape)
    if out is not None:
        V.check_out(out, x.shape, x.dtype)
    return momentum, eps


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
    momentum, eps = _check_forward_args(x, running_mean, running_var, training, momentum, eps, out)
    relu = V.check_activation(activation) == "relu"
    return P.forward(x, weight=weight, bias=bias, running_mean=running_mean,
                     running_var=running_var, training=training, momentum=momentum, eps=eps,
                     relu=relu, out=out, n_threads=effective_n_threads(n_threads))[:3]


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
    training = V.check_flag(training, "training")
    context = P.given_context(x, output=output, mean=mean, invstd=invstd, training=training,
                              count=V.values_per_channel(x.shape))
    return P.backward(dy, context, weight=weight, param_grads=True,
                      n_threads=effective_n_threads(n_threads))


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
    count, mean, _, m2 = P.local_moments(as_input(input), n_threads=effective_n_threads(n_threads))
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
    dtype = P.compute_dtype(x.dtype)
    weight = V.check_per_channel(weight, "weight", x.shape[1], dtype)
    bias = V.check_per_channel(bias, "bias", x.shape[1], dtype)
    relu = V.check_activation(activation) == "relu"
    if out is not None:
        V.check_out(out, x.shape, x.dtype)
    return P.normalize_given(x, weight=weight, bias=bias, mean=mean, invstd=invstd, relu=relu,
                             out=out, n_threads=effective_n_threads(n_threads))


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
    context = P.given_context(x, output=output, mean=mean, invstd=None, training=True,
                              count=V.values_per_channel(x.shape))
    return P.local_grad_sums(dy, context, n_threads=effective_n_threads(n_threads))


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
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"count must be an int (values per channel over all workers), got "
                        f"{type(count).__name__}")
    if count < 1:
        raise ValueError(f"count must be a positive int (values per channel over all workers), got {count!r}")
    context = P.given_context(x, output=output, mean=mean, invstd=invstd, training=True,
                              count=count)
    return P.grad_input_from_sums(dy, context, weight=weight, sum_dy=sum_dy, sum_dy_xc=sum_dy_xmu,
                                  n_threads=effective_n_threads(n_threads))
