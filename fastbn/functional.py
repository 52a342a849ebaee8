"""Stateless batch normalisation on numpy arrays, with torch's signatures and semantics.

* :func:`batch_norm` is ``torch.nn.functional.batch_norm``.
* :func:`batch_norm_forward` / :func:`batch_norm_backward` are the lower-level pair the modules
  are built on, modelled on torch's ``native_batch_norm`` / ``native_batch_norm_backward``.
* :func:`batch_stats` gives the per-channel (count, mean, M2) that distributed batch norm merges.

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

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward", "batch_stats"]


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
        return x.astype(np.float32)
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
    save_mean = np.empty(channels)
    save_invstd = np.empty(channels)
    if training:
        if xk.size == 0:
            # As torch: nothing to normalise, running buffers untouched; no statistics exist.
            save_mean[:] = 0.0
            save_invstd[:] = 0.0
        else:
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
    weight, bias, rm, rv, momentum, eps = _check_forward_args(
        x, running_mean, running_var, weight, bias, training, momentum, eps, out)
    result = forward(x, weight, bias, rm, rv, bool(training), momentum, eps, out,
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
    x = as_input(input)
    dy = as_input(grad_output, "grad_output")
    V.check_same_shape(dy, x, "grad_output", "input")
    if dy.dtype != x.dtype:
        raise TypeError(f"grad_output has dtype {dy.dtype} but input has dtype {x.dtype}; they must match")
    channels = x.shape[1]
    stats = []
    for name, value in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        value = V.as_float_array(value, name)
        if value.shape != (channels,):
            raise ValueError(f"{name} should contain {channels} elements (one per channel), "
                             f"got shape {tuple(value.shape)}")
        stats.append(np.ascontiguousarray(value, dtype=np.float64))
    weight = V.check_per_channel(weight, "weight", channels, compute_dtype(x.dtype))
    return backward(dy, x, weight, stats[0], stats[1], bool(training), True,
                    effective_n_threads(n_threads))


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
