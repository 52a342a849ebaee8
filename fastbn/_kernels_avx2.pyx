# The kernels compiled for the AVX2 SIMD level (flags in setup.py); the source is _kernels.pyx.
include "_kernels.pyx"
