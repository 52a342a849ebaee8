# The kernels compiled for the AVX512 SIMD level (flags in setup.py); the source is _kernels.pyx.
include "_kernels.pyx"
