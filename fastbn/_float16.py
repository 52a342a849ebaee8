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
    h = np.ascontiguousarray(h)  # a strided float16 copy is fast; the conversion is not
    w = np.empty(h.shape, FLOAT32)
    _kernels.convert_float16(h, w, effective_n_threads(n_threads))
    return w


def narrow(y, out=None, n_threads=None):
    """C-contiguous float32 array y as float16: into `out` (C-contiguous, y's size, any shape)
    when given, else a new array of y's shape.  Returns the float16 array."""
    if out is None:
        out = np.empty(y.shape, FLOAT16)
    if HALF_SIMD:
        _kernels.convert_float16(y, out, effective_n_threads(n_threads))
    else:
        np.copyto(out, y.reshape(out.shape), casting="same_kind")
    return out
