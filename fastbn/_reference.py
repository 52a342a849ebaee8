"""Slow, readable float64 twins of fastbn's kernels and functional API.

Everything here is plain numpy in float64, with two-pass statistics, written to be obviously
right rather than fast.  The tests compare the compiled kernels and the public API with these
functions, and gradients of these functions are checked by finite differences.  Nothing here
imports the kernels.

Notation: x has shape (N, C, *spatial); statistics are per channel c over the N * S values of
x[:, c], S being the product of the spatial sizes.

    mean    = sum(x) / n                      n = N * S
    M2      = sum((x - mean)**2)
    var     = M2 / n                          (biased: used to normalise)
    var_u   = M2 / (n - 1)                    (unbiased: tracked in running_var)
    invstd  = 1 / sqrt(var + eps)
    y       = (x - mean) * invstd * weight + bias
"""

import numpy as np


def _per_channel(x):
    """x as a float64 (N, C, S) array."""
    x = np.asarray(x, dtype=np.float64)
    # (not -1: it cannot be inferred when another dimension is 0)
    return x.reshape(x.shape[0], x.shape[1], int(np.prod(x.shape[2:], dtype=np.int64)))


def _broadcast(v, ndim):
    """A per-channel vector shaped to broadcast against an (N, C, *spatial) array."""
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def moments(x):
    """Per-channel (mean, M2) of x, in float64, by the two-pass algorithm."""
    x3 = _per_channel(x)
    mean = x3.mean(axis=(0, 2))
    m2 = ((x3 - mean[None, :, None]) ** 2).sum(axis=(0, 2))
    return mean, m2


def batch_stats(x):
    """(count, mean, M2) per channel: count = N * S, as an int; mean and M2 as float64 arrays."""
    x = np.asarray(x)
    count = x.shape[0] * int(np.prod(x.shape[2:], dtype=np.int64))
    if count == 0:
        return 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    mean, m2 = moments(x)
    return count, mean, m2


def merge_stats(*stats):
    """Moments of the union of disjoint sets given as (count, mean, M2) triples, recomputed
    from their definitions: the pooled mean, then each set's M2 plus its count times its
    mean's squared distance from the pooled one."""
    counts = [n for n, _, _ in stats]
    means = [np.asarray(m, dtype=np.float64) for _, m, _ in stats]
    n = sum(counts)
    if n == 0:
        return 0, np.zeros_like(means[0]), np.zeros_like(means[0])
    mean = sum(c * m for c, m in zip(counts, means)) / n
    m2 = sum(np.asarray(q, dtype=np.float64) + c * (m - mean) ** 2
             for c, m, (_, _, q) in zip(counts, means, stats))
    return n, mean, m2


def normalize_given(x, weight, bias, mean, invstd):
    """y = (x - mean) * invstd * weight + bias (weight, bias may be None: 1 and 0)."""
    x = np.asarray(x, dtype=np.float64)
    y = (x - _broadcast(mean, x.ndim)) * _broadcast(invstd, x.ndim)
    if weight is not None:
        y = y * _broadcast(weight, x.ndim)
    if bias is not None:
        y = y + _broadcast(bias, x.ndim)
    return y


def batch_norm_elemt(input, mean, invstd, weight=None, bias=None):
    """(input - mean) * invstd * weight + bias with given statistics."""
    return normalize_given(input, weight, bias, mean, invstd)


def batch_norm_backward_reduce(grad_output, input, mean):
    """Per-channel (sum(dy), sum(dy * (x - mean)))."""
    return grad_sums(grad_output, input, mean)


def batch_norm_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """Training-mode grad_input from sums over `count` values per channel:
    dx = weight * invstd * (dy - sum_dy / count - (x - mean) * invstd**2 * sum_dy_xmu / count)."""
    dy = np.asarray(grad_output, dtype=np.float64)
    x = np.asarray(input, dtype=np.float64)
    nd = x.ndim
    w = np.ones(x.shape[1]) if weight is None else weight
    invstd = np.asarray(invstd, dtype=np.float64)
    return _broadcast(np.asarray(w, dtype=np.float64) * invstd, nd) * (
        dy - _broadcast(np.asarray(sum_dy) / count, nd)
        - (x - _broadcast(mean, nd)) * _broadcast(invstd ** 2 * np.asarray(sum_dy_xmu) / count, nd))


def grad_sums(dy, x, center):
    """Per-channel (sum(dy), sum(dy * (x - center)))."""
    dy3 = _per_channel(dy)
    x3 = _per_channel(x)
    center = np.asarray(center, dtype=np.float64)
    return dy3.sum(axis=(0, 2)), (dy3 * (x3 - center[None, :, None])).sum(axis=(0, 2))


def relu(y):
    """torch's ReLU: 0 where y < 0, y itself otherwise (-0.0 and NaN pass through)."""
    return np.where(y < 0, 0.0, y)


def batch_norm_forward(input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, activation=None):
    """(output, save_mean, save_invstd), all float64; running buffers updated in place in
    training mode (as ``fastbn.functional.batch_norm_forward``); ReLU applied to the output
    with activation='relu'."""
    x = np.asarray(input, dtype=np.float64)
    if training:
        count, mean, m2 = batch_stats(x)
        if count == 0:
            return x.copy(), np.zeros(x.shape[1]), np.zeros(x.shape[1])
        invstd = 1.0 / np.sqrt(m2 / count + eps)
        if running_mean is not None:
            running_mean[...] = momentum * mean + (1.0 - momentum) * np.asarray(running_mean, np.float64)
        if running_var is not None:
            running_var[...] = momentum * (m2 / (count - 1)) + (1.0 - momentum) * np.asarray(running_var, np.float64)
    else:
        mean = np.asarray(running_mean, dtype=np.float64).copy()
        invstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    y = normalize_given(x, weight, bias, mean, invstd)
    return (relu(y) if activation == "relu" else y), mean, invstd


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None):
    """float64 ``torch.nn.functional.batch_norm`` (then ReLU with activation='relu')."""
    return batch_norm_forward(input, running_mean, running_var, weight, bias, training,
                              momentum, eps, activation=activation)[0]


def batch_norm_backward(grad_output, input, save_mean, save_invstd, weight=None, training=True,
                        *, output=None, activation=None):
    """(grad_input, grad_weight, grad_bias) in float64.

    With activation='relu', dy is first replaced by 0 where the forward's output <= 0 (torch's
    ReLU backward).  Then, with xhat = (x - mean) * invstd, per channel:
        grad_bias   = sum(dy)
        grad_weight = sum(dy * xhat)
        training:   dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))
        eval:       dx = weight * invstd * dy
    """
    dy = np.asarray(grad_output, dtype=np.float64)
    if activation == "relu":
        dy = np.where(np.asarray(output) <= 0, 0.0, dy)
    x = np.asarray(input, dtype=np.float64)
    nd = x.ndim
    mean = _broadcast(save_mean, nd)
    invstd = _broadcast(save_invstd, nd)
    w = _broadcast(np.ones(x.shape[1]) if weight is None else weight, nd)
    axes = (0,) + tuple(range(2, nd))
    xhat = (x - mean) * invstd
    grad_bias = dy.sum(axis=axes)
    grad_weight = (dy * xhat).sum(axis=axes)
    if training:
        count = x.size // x.shape[1] if x.shape[1] else 0
        if count == 0:
            return np.zeros_like(x), np.zeros(x.shape[1]), np.zeros(x.shape[1])
        grad_input = w * invstd * (dy - _broadcast(grad_bias / count, nd)
                                   - xhat * _broadcast(grad_weight / count, nd))
    else:
        grad_input = w * invstd * dy
    return grad_input, grad_weight, grad_bias
