"""Input checks and their error messages.

Every check raises before anything is computed or written, so a rejected call leaves all
state (running buffers, counters, ``out``) as it was.  Messages follow numpy's and torch's
wording and always show what was got against what was expected.  TypeError is for wrong
types and dtypes, ValueError for wrong shapes and values.
"""

import math
import numbers

import numpy as np

#: dtypes the kernels compute in; half data (float16, bfloat16) is computed in float32.
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
KERNEL_DTYPES = (FLOAT32, FLOAT64)
FLOAT16 = np.dtype(np.float16)
INPUT_DTYPES = KERNEL_DTYPES + (FLOAT16,)


def is_bfloat16(dt):
    """Whether dt is ml_dtypes' bfloat16 (recognised by name, without importing ml_dtypes: an
    array of it can only exist where ml_dtypes is already imported)."""
    return dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16"


def is_half(dt):
    """Whether dt is a 16-bit float storage (float16 or bfloat16), computed in float32."""
    return dt == FLOAT16 or is_bfloat16(dt)


# The kernels read an array's data, mask or no mask: say so rather than use masked values.
_MASKED = ("{name} is a masked array, which fastbn does not support (the kernels would use the "
           "masked values too): pass {name}.filled(value) or {name}.data explicitly")


def as_float_array(value, name):
    """``value`` as an ndarray of a supported float dtype, in native byte order (no copy when
    it already is one)."""
    # Fast path (tiny calls are dominated by checks): numpy's own float32/float64 dtypes.
    if type(value) is np.ndarray and (value.dtype is FLOAT32 or value.dtype is FLOAT64):
        return value
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(_MASKED.format(name=name))
    if not isinstance(value, np.ndarray):
        if value is None or isinstance(value, (str, bytes)):
            raise TypeError(f"{name} must be an array of floats, got {type(value).__name__}")
        try:
            value = np.asarray(value)
        except Exception as exc:  # e.g. ragged nested sequences
            raise TypeError(f"{name} must be an array of floats, could not convert "
                            f"{type(value).__name__}: {exc}") from None
    dt = value.dtype
    if is_bfloat16(dt):
        return value if dt.isnative else value.astype(dt.newbyteorder("="))
    if dt.kind != "f" or dt.newbyteorder("=") not in INPUT_DTYPES:
        raise TypeError(f"{name} must have a floating-point dtype (float16, bfloat16, float32 or "
                        f"float64), got {dt}")
    if not dt.isnative:
        value = value.astype(dt.newbyteorder("="))
    return value


def check_input_ndim(x, allowed, name="input"):
    """torch's message: "expected 4D input (got 3D input)"."""
    if x.ndim not in allowed:
        want = " or ".join(f"{d}D" for d in allowed)
        raise ValueError(f"expected {want} {name} (got {x.ndim}D {name})")


def check_channels(x, num_features, name="input"):
    if x.shape[1] != num_features:
        raise ValueError(f"expected {name} with {num_features} channels (num_features) in "
                         f"dimension 1, got {name} of shape {tuple(x.shape)}")


def check_input_dtype(x, compute_dtype, module_dtype, owner):
    """A module's input computes in the module's dtype (float32 for half input); callers on
    the small-call path compare first and call this to raise."""
    if compute_dtype != module_dtype:
        raise TypeError(f"input has dtype {x.dtype} but {owner} holds {module_dtype} parameters: "
                        f"all inputs must share the same dtype (convert it: np.asarray(input, "
                        f"dtype=np.{np.dtype(module_dtype).name}), or build the module with dtype=)")


def check_grad_output(dy, shape, dtype):
    """A backward's grad_output has the shape and dtype of the forward's input."""
    if dy.shape != shape:
        raise ValueError(f"grad_output has shape {tuple(dy.shape)} but the last forward's input "
                         f"has shape {shape}; they must match")
    if dy.dtype != dtype:
        raise TypeError(f"grad_output has dtype {dy.dtype} but the last forward's input had "
                        f"dtype {dtype}; they must match")


def check_counter(counter):
    """num_batches_tracked as a training step increments it: None, a non-negative integer, or
    a writable integer array of one non-negative value that one more batch does not overflow
    (torch's is a 0-d int64 tensor).  Checked before the step, so that the increment after
    it cannot fail."""
    if counter is None:
        return
    if isinstance(counter, np.ndarray):
        if counter.dtype.kind not in "iu" or counter.size != 1:
            raise TypeError(f"num_batches_tracked must be an integer array of one value, got "
                            f"{counter.dtype} of shape {tuple(counter.shape)}")
        if not counter.flags.writeable:
            raise ValueError("num_batches_tracked is read-only, but a training step increments "
                             "it in place")
        value, limit = int(counter.reshape(-1)[0]), int(np.iinfo(counter.dtype).max)
    elif isinstance(counter, bool) or not isinstance(counter, numbers.Integral):
        raise TypeError(f"num_batches_tracked must be None, an int or an integer array, got "
                        f"{type(counter).__name__}")
    else:
        value, limit = int(counter), 2**63 - 1  # (torch's int64; a float must hold it too)
    if value < 0:
        raise ValueError(f"num_batches_tracked must be non-negative, got {value}")
    if value >= limit:
        kind = f"its dtype {counter.dtype}" if isinstance(counter, np.ndarray) else "int64"
        shown = value if value.bit_length() <= 64 else f"an int of {value.bit_length()} bits"
        raise ValueError(f"num_batches_tracked is {shown}: one more batch overflows {kind}")


def check_per_channel(value, name, channels, dtype, writable=False):
    """A per-channel parameter or buffer: None, or a 1-D array of `channels` values of `dtype`."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or None, got {type(value).__name__}")
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(_MASKED.format(name=name))
    if value.dtype != dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but the input computes in {np.dtype(dtype)}: "
                        f"all inputs must share the same dtype (mixed dtypes are not cast silently)")
    if value.ndim != 1 or value.shape[0] != channels:
        raise ValueError(f"{name} should contain {channels} elements (one per channel), "
                         f"got shape {tuple(value.shape)}")
    if writable and not value.flags.writeable:
        raise ValueError(f"{name} is read-only, but it is updated in place in training mode")
    if type(value) is not np.ndarray:
        value = value.view(np.ndarray)  # (the kernels take plain arrays: a view of the same memory)
    if not value.flags.c_contiguous:
        value = np.ascontiguousarray(value)
    return value


def check_running_pair(running_mean, running_var, training):
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False "
                         "(eval mode normalises with them); pass training=True to use batch "
                         "statistics")


def _as_float(value, name):
    """float(value) for a real number; one too large for a float (an int such as 10**400)
    is a ValueError like the infinities, not an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, but got {value!r:.40}, which overflows a float") from None


def check_eps(eps, training):
    """torch 2.13's rules: eps > 0 in training, eps >= 0 otherwise; NaN and inf never."""
    if type(eps) is float and 0.0 < eps < math.inf:  # the common case, at ~1/10 of the cost
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    eps = _as_float(eps, "batch_norm eps")
    if math.isnan(eps) or math.isinf(eps):
        raise ValueError(f"batch_norm eps must be finite, but got {eps}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    return eps


def check_momentum(momentum, allow_none=False):
    """A finite real number (None too, where the caller supports a cumulative average)."""
    if type(momentum) is float and math.isfinite(momentum):  # the common case, fast
        return momentum
    if momentum is None:
        if allow_none:
            return None
        raise TypeError("momentum must be a float, got None (the modules take momentum=None for "
                        "a cumulative moving average; the functional form wants the factor itself, "
                        "e.g. 1 / num_batches_tracked)")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number or None, got {type(momentum).__name__}")
    momentum = _as_float(momentum, "momentum")
    if not math.isfinite(momentum):
        raise ValueError(f"momentum must be finite, got {momentum}")
    return momentum


def values_per_channel(shape):
    """N times the spatial size: the values a channel's statistics are taken over."""
    return shape[0] * math.prod(shape[2:])


def check_batch_size(shape):
    """torch's _verify_batch_size: training needs more than one value per channel."""
    if values_per_channel(shape) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{tuple(shape)}")


def check_num_features(num_features):
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features must be an int, got {type(num_features).__name__} "
                        f"{num_features!r}")
    num_features = int(num_features)
    if num_features < 0:
        raise ValueError(f"num_features must be non-negative, got {num_features}")
    return num_features


def check_flag(value, name):
    """A boolean option: bool, numpy bool, or the ints 0 and 1."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_module_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in KERNEL_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def check_activation(activation):
    """None or 'relu' (the activations the kernels apply in the normalisation's pass)."""
    if activation is None:
        return None
    if isinstance(activation, str) and activation.lower() == "relu":
        return "relu"
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def check_out(out, shape, dtype, name="out"):
    """numpy's rules for out=: exactly the result's shape and dtype; here also writable and
    C-contiguous or channels-last (contiguous as (N, *spatial, C)), since the kernels write it
    directly."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(out.shape)} but expected {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype} but expected {np.dtype(dtype)}")
    if not (out.flags.c_contiguous or (out.ndim >= 3 and np.moveaxis(out, 1, -1).flags.c_contiguous)):
        raise ValueError(f"{name} must be C-contiguous or channels-last (contiguous as (N, *spatial, C))")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def check_same_shape(a, b, name_a, name_b):
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape "
                         f"{tuple(b.shape)}; they must match")
