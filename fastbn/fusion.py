"""Folding eval-mode batch norm into the layer before it, as ``torch.nn.utils.fusion`` does.

In eval mode batch norm is a per-channel affine map, ``y = x * scale + shift`` with
``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``, so it
can be folded into the weights of a preceding convolution or linear layer and disappear from
inference.  These functions take torch's arguments in torch's order and return numpy arrays;
the arithmetic is done in float64 and the results rounded once to the weights' dtypes (torch
computes in the weights' dtype; the results agree to that dtype's rounding).
"""

import numpy as np

from . import _validation as V

__all__ = ["fuse_conv_bn_weights", "fuse_linear_bn_weights", "bn_scale_shift"]


def _per_channel(value, name, channels, default):
    if value is None:
        return np.full(channels, default, dtype=np.float64)
    array = V.as_float_array(value, name)
    if array.shape != (channels,):
        raise ValueError(f"{name} should contain {channels} elements (one per channel), got shape "
                         f"{tuple(array.shape)}")
    return array.astype(np.float64)


def bn_scale_shift(bn_rm, bn_rv, bn_eps, bn_w=None, bn_b=None):
    """The per-channel ``(scale, shift)``, float64, of eval-mode batch norm:
    ``y = x * scale + shift``, ``scale = bn_w / sqrt(bn_rv + bn_eps)``,
    ``shift = bn_b - bn_rm * scale`` (bn_w and bn_b default to 1 and 0)."""
    rm = V.as_float_array(bn_rm, "bn_rm")
    if rm.ndim != 1:
        raise ValueError(f"bn_rm must be 1-D (one value per channel), got shape {tuple(rm.shape)}")
    channels = rm.shape[0]
    rv = _per_channel(bn_rv, "bn_rv", channels, 1.0)
    weight = _per_channel(bn_w, "bn_w", channels, 1.0)
    bias = _per_channel(bn_b, "bn_b", channels, 0.0)
    eps = V.check_eps(bn_eps, training=False)
    scale = weight / np.sqrt(rv + eps)
    return scale, bias - rm.astype(np.float64) * scale


def fuse_conv_bn_weights(conv_w, conv_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b, transpose=False):
    """Weights and bias of the convolution equal to ``conv`` followed by eval-mode batch norm.

    Parameters
    ----------
    conv_w : ndarray, shape (C_out, C_in / groups, *kernel), or (C_in, C_out / groups, *kernel)
        with ``transpose=True`` (a transposed convolution).
    conv_b : ndarray, shape (C_out,), or None
    bn_rm, bn_rv : ndarray, shape (C_out,)
        The batch norm's running mean and variance.
    bn_eps : float
    bn_w, bn_b : ndarray, shape (C_out,), or None
        The batch norm's weight and bias (None: 1 and 0).
    transpose : bool
        conv_w is a transposed convolution's weight, whose output channels are dimension 1.

    Returns
    -------
    fused_w, fused_b : ndarray
        ``conv_w * scale`` along the output channels, in conv_w's dtype, and
        ``(conv_b - bn_rm) * scale + bn_b``, in conv_b's dtype (conv_w's without conv_b).
    """
    w = V.as_float_array(conv_w, "conv_w")
    if w.ndim < 2:
        raise ValueError(f"conv_w must have at least 2 dimensions (got {w.ndim}D conv_w)")
    scale, shift = bn_scale_shift(bn_rm, bn_rv, bn_eps, bn_w, bn_b)
    axis = 1 if transpose else 0
    if w.shape[axis] != scale.shape[0]:
        raise ValueError(f"conv_w has {w.shape[axis]} output channels (dimension {axis}) but the "
                         f"batch norm has {scale.shape[0]}")
    shape = [1] * w.ndim
    shape[axis] = -1
    fused_w = (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype)
    b = _per_channel(conv_b, "conv_b", scale.shape[0], 0.0)
    bias_dtype = w.dtype if conv_b is None else V.as_float_array(conv_b, "conv_b").dtype
    return fused_w, (b * scale + shift).astype(bias_dtype)


def fuse_linear_bn_weights(linear_w, linear_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b):
    """Weight and bias of the linear layer equal to ``linear`` followed by eval-mode batch norm.

    linear_w has shape (out_features, in_features); the batch norm has out_features channels,
    or a single one (broadcast, as torch allows).  Returns ``linear_w * scale[:, None]`` in
    linear_w's dtype and ``(linear_b - bn_rm) * scale + bn_b`` in linear_b's dtype.
    """
    w = V.as_float_array(linear_w, "linear_w")
    if w.ndim != 2:
        raise ValueError(f"expected 2D linear_w (out_features, in_features) (got {w.ndim}D linear_w)")
    scale, shift = bn_scale_shift(bn_rm, bn_rv, bn_eps, bn_w, bn_b)
    if scale.shape[0] not in (w.shape[0], 1):
        raise ValueError(f"to fuse, the batch norm needs out_features = {w.shape[0]} channels or 1, "
                         f"got {scale.shape[0]}")
    fused_w = (w.astype(np.float64) * scale[:, None]).astype(w.dtype)
    b = _per_channel(linear_b, "linear_b", w.shape[0], 0.0)
    bias_dtype = w.dtype if linear_b is None else V.as_float_array(linear_b, "linear_b").dtype
    return fused_w, (b * scale + shift).astype(bias_dtype)
