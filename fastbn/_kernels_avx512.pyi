# The kernels compiled for the AVX512 SIMD level: the same functions as fastbn._kernels.
from ._kernels import *
from ._kernels import _force_layout as _force_layout
