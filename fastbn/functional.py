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
(mixing is a TypeError, as in torch).  float16 input is computed in float32, with float32
parameters and buffers, and gives float16 output.

``n_threads`` follows scikit-learn: None uses the OpenMP runtime's current setting (which
honours OMP_NUM_THREADS, ``fastbn.set_num_threads`` and threadpoolctl); -1 means all CPUs.
Results are bitwise identical for any thread count.
"""

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
    """The dtype the kernels compute in for data of this dtype."""
    return np.dtype(np.float32) if dtype == V.FLOAT16 else dtype


def as_input(value, name="input"):
    """A validated float array with at least two dimensions (N, C, *)."""
    x = V.as_float_array(value, name)
    if x.ndim < 2:
        raise ValueError(f"expected {name} with at least 2 dimensions (N, C, *) (got {x.ndim}D {name})")
    return x


def kernel_view(x):
    """x as the C-contiguous array the kernels read: float16 widened to float32."""
    if x.dtype == V.FLOAT16:
        return x.astype(np.float32, order="C")  # (astype keeps a Fortran order by default)
    if not x.flags.c_contiguous:
        return np.ascontiguousarray(x)
    return x


def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, out, n_threads):
    """The forward on validated arguments: (output, save_mean, save_invstd).

    training=True normalises with batch statistics and, when the running buffers are given,
    updates them in place; training=False normalises with the running buffers.
    """
    xk = kernel_view(x)
    channels = x.shape[1]
    if out is not None and out.dtype == xk.dtype:
        if out is not x and np.may_share_memory(out, xk):
            # Overlapping but not identical memory would be read after being written.
            xk = xk.copy()
        y = out
    else:
        y = np.empty(xk.shape, xk.dtype)
    if training and xk.size == 0:
        # As torch: nothing to normalise, running buffers untouched; no statistics exist.
        # (np.zeros, not a fill: calloc'd pages cost nothing until read, whatever C is.)
        save_mean = np.zeros(channels)
        save_invstd = np.zeros(channels)
    else:
        save_mean = np.empty(channels)
        save_invstd = np.empty(channels)
    if training:
        if xk.size:
            _kernels.forward_train(xk, y, weight, bias, running_mean, running_var, momentum, eps,
                                   save_mean, save_invstd, n_threads)
    else:
        _kernels.forward_eval(xk, y, weight, bias, running_mean, running_var, eps, save_mean,
                              save_invstd, n_threads)
    if y.dtype != x.dtype:  # float16 data computed in float32
        if out is not None:
            out[...] = y
            y = out
        else:
            y = y.astype(x.dtype)
    return y, save_mean, save_invstd


def backward(dy, x, weight, save_mean, save_invstd, training, param_grads, n_threads):
    """The backward on validated arguments: (grad_input, grad_weight, grad_bias); the parameter
    gradients are None when param_grads is False."""
    xk = kernel_view(x)
    dyk = kernel_view(dy)
    channels = x.shape[1]
    dx = np.empty(xk.shape, xk.dtype)
    grad_weight = grad_bias = None
    if param_grads:
        grad_weight = np.zeros(channels, xk.dtype)
        grad_bias = np.zeros(channels, xk.dtype)
    _kernels.backward(dyk, xk, dx, weight, save_mean, save_invstd, grad_weight, grad_bias,
                      training, n_threads)
    if dx.dtype != x.dtype:
        dx = dx.astype(x.dtype)
    return dx, grad_weight, grad_bias


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


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def batch_norm_forward(input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, out=None, n_threads=None):
    """Batch normalisation forward, returning the statistics it used.

    Parameters
    ----------
    input : ndarray, shape (N, C, *)
        float16, float32 or float64 data; any strides (non-contiguous input is copied once).
    running_mean, running_var : ndarray, shape (C,), or None
        Running statistics, of the computing dtype.  In training mode they are updated in place
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
    out : ndarray, optional
        Where to write the output: exactly input's shape and dtype, C-contiguous (``out=input``
        normalises in place).
    n_threads : int or None
        OpenMP threads (None: the runtime's current setting).

    Returns
    -------
    output : ndarray, input's shape and dtype
        ``(input - mean) / sqrt(var + eps) * weight + bias``, var being the biased variance.
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
    result = forward(x, weight, bias, rm, rv, training, momentum, eps, out,
                     effective_n_threads(n_threads))
    # A non-contiguous buffer was updated through a contiguous copy: write it back.
    if training:
        for given, used in ((running_mean, rm), (running_var, rv)):
            if used is not None and used is not given:
                given[...] = used
    return result


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, out=None, n_threads=None):
    """``torch.nn.functional.batch_norm`` for numpy arrays.

    ``output = (input - mean) / sqrt(var + eps) * weight + bias`` per channel (dimension 1),
    with the batch's statistics in training mode (the running buffers, when given, are updated
    in place) and the running statistics otherwise.  See :func:`batch_norm_forward` for the
    parameters; this returns only the output.

    Examples
    --------
    >>> import numpy as np, fastbn.functional as F
    >>> x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    >>> rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    >>> F.batch_norm(x, rm, rv, training=True).round(3)[0]
    array([[-1.131, -0.754],
           [-1.131, -0.754]], dtype=float32)
    >>> rm
    array([0.35, 0.55], dtype=float32)
    """
    return batch_norm_forward(input, running_mean, running_var, weight, bias, training,
                              momentum, eps, out=out, n_threads=n_threads)[0]


def batch_norm_backward(grad_output, input, save_mean, save_invstd, weight=None, training=True,
                        *, n_threads=None):
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
    n_threads : int or None
        As in :func:`batch_norm_forward`.

    Returns
    -------
    grad_input : ndarray, input's shape and dtype
    grad_weight, grad_bias : ndarray, shape (C,)
        ``sum(grad_output * xhat)`` and ``sum(grad_output)`` per channel, xhat being the
        normalised input; returned whether or not the forward had affine parameters.
    """
    dy, x = _grad_and_input(grad_output, input)
    mean, invstd = _statistics(x.shape[1], save_mean=save_mean, save_invstd=save_invstd)
    weight = V.check_per_channel(weight, "weight", x.shape[1], compute_dtype(x.dtype))
    training = V.check_flag(training, "training")
    return backward(dy, x, weight, mean, invstd, training, True,
                    effective_n_threads(n_threads))


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
    ``M2 / (count - 1)`` (unbiased).  count is an int; mean and M2 are float64 arrays.  An
    empty batch gives ``(0, zeros, zeros)``, the identity of the merge.
    """
    x = kernel_view(as_input(input))
    channels = x.shape[1]
    count = x.shape[0] * int(np.prod(x.shape[2:], dtype=np.int64))
    mean = np.zeros(channels)
    m2 = np.zeros(channels)
    if count:
        _kernels.moments(x, mean, m2, effective_n_threads(n_threads))
    return count, mean, m2


def merge_stats(*stats):
    """Merge per-channel ``(count, mean, M2)`` triples of disjoint batches into one.

    Each triple is what :func:`batch_stats` returns.  The merge is Chan, Golub & LeVeque's
    pairwise update (stable: no sums of squares are formed), applied left to right, so the
    same triples in the same order give the same bits on every worker.  Empty batches
    (count 0) are the identity.

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


def batch_norm_elemt(input, mean, invstd, weight=None, bias=None, *, out=None, n_threads=None):
    """``(input - mean) * invstd * weight + bias`` with given per-channel statistics.

    The normalisation step of distributed batch norm, where mean and invstd come from all
    workers' merged statistics (torch: ``torch.batch_norm_elemt``).  mean and invstd are cast to
    float64; weight and bias must have the computing dtype; ``out`` as in
    :func:`batch_norm_forward`.
    """
    x = as_input(input)
    mean, invstd = _statistics(x.shape[1], mean=mean, invstd=invstd)
    dtype = compute_dtype(x.dtype)
    weight = V.check_per_channel(weight, "weight", x.shape[1], dtype)
    bias = V.check_per_channel(bias, "bias", x.shape[1], dtype)
    if out is not None:
        V.check_out(out, x.shape, x.dtype)
    xk = kernel_view(x)
    y = out if out is not None and out.dtype == xk.dtype else np.empty(xk.shape, xk.dtype)
    if y is out and out is not x and np.may_share_memory(out, xk):
        xk = xk.copy()
    _kernels.normalize_given(xk, y, weight, bias, mean, invstd, effective_n_threads(n_threads))
    if y.dtype != x.dtype:
        if out is None:
            return y.astype(x.dtype)
        out[...] = y
        return out
    return y


def batch_norm_backward_reduce(grad_output, input, mean, *, n_threads=None):
    """Per-channel ``(sum(grad_output), sum(grad_output * (input - mean)))``, float64.

    The local part of the training-mode backward; distributed batch norm sums these over all
    workers and passes the totals to :func:`batch_norm_backward_elemt`.  The parameter
    gradients follow from the totals: ``grad_bias = sum_dy``, ``grad_weight = sum_dy_xmu * invstd``.
    """
    dy, x = _grad_and_input(grad_output, input)
    (mean,) = _statistics(x.shape[1], mean=mean)
    sum_dy = np.zeros(x.shape[1])
    sum_dy_xmu = np.zeros(x.shape[1])
    _kernels.grad_sums(kernel_view(dy), kernel_view(x), mean, sum_dy, sum_dy_xmu,
                       effective_n_threads(n_threads))
    return sum_dy, sum_dy_xmu


def batch_norm_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                              *, n_threads=None):
    """Training-mode ``grad_input`` from per-channel sums over ``count`` values per channel.

    ``sum_dy`` and ``sum_dy_xmu`` are :func:`batch_norm_backward_reduce`'s results summed over
    every worker, and ``count`` the total number of values per channel (all workers' N * S);
    on a single process this equals :func:`batch_norm_backward`'s grad_input.
    """
    dy, x = _grad_and_input(grad_output, input)
    channels = x.shape[1]
    mean, invstd, sum_dy, sum_dy_xmu = _statistics(channels, mean=mean, invstd=invstd, sum_dy=sum_dy,
                                                   sum_dy_xmu=sum_dy_xmu)
    weight = V.check_per_channel(weight, "weight", channels, compute_dtype(x.dtype))
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"count must be an int (values per channel over all workers), got "
                        f"{type(count).__name__}")
    if count < 1:
        raise ValueError(f"count must be a positive int (values per channel over all workers), got {count!r}")
    xk = kernel_view(x)
    dx = np.empty(xk.shape, xk.dtype)
    _kernels.backward_from_sums(kernel_view(dy), xk, dx, weight, mean, invstd, sum_dy, sum_dy_xmu,
                                float(count), effective_n_threads(n_threads))
    return dx.astype(x.dtype, copy=False)
