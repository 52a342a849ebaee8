"""float16 <-> float32 conversion for float16 data, which fastbn computes in float32.

numpy's ``astype`` between float16 and float32 runs at about a tenth of memory speed, single
threaded: on a float16 batch it cost several times the batch norm itself.  Builds with F16C
(the avx2 and avx512 kernel variants) convert with those instructions on all threads instead;
others (the baseline variant, other compilers) fall back to numpy.  Both round to nearest even
and agree bit for bit on every non-NaN value (NaN payloads may come back quieted).
"""

import numpy as np

from ._dispatch import kernels as _kernels
from ._openmp import effective_n_threads

#: Whether the loaded kernels convert with F16C (else numpy converts).
HALF_SIMD = _kernels.half_simd()

FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)


def widen(h, n_threads=None):
    """float16 array h as a new C-contiguous float32 array of its shape."""
    if not HALF_SIMD:
        return h.astype(FLOAT32, order="C")
    # A strided, unaligned or byte-swapped float16 copy is fast; the conversion is not.
    h = np.require(h, FLOAT16, ["C_CONTIGUOUS", "ALIGNED"])
    w = np.empty(h.shape, FLOAT32)
    _kernels.convert_float16(h, w, effective_n_threads(n_threads))
    return w


def narrow(y, out=None, n_threads=None):
    """float32 array y as float16: into `out` (a float16 array of y's size, C-contiguous, any
    shape) when given, else a new C-contiguous array of y's shape.  Returns the float16 array.
    Values beyond float16's range become inf, without a warning (as torch)."""
    if out is None:
        out = np.empty(y.shape, FLOAT16)
    if HALF_SIMD and out.flags.aligned and out.dtype.isnative:
        _kernels.convert_float16(np.require(y, FLOAT32, ["C_CONTIGUOUS", "ALIGNED"]), out,
                                 effective_n_threads(n_threads))
    else:
        with np.errstate(over="ignore"):
            np.copyto(out, y.reshape(out.shape), casting="same_kind")
    return out
