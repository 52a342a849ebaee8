"""OpenMP shim: whether OpenMP was compiled in, and how many threads a call may use.

The build falls back to serial kernels where the compiler has no OpenMP; this module then
answers as a one-thread runtime would, so nothing above it needs an ``#ifdef``.

Thread counts follow scikit-learn's convention (``sklearn/utils/_openmp_helpers.pyx``):
``n_threads=None`` means "whatever the OpenMP runtime allows now", which honours
``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits`` (it calls ``omp_set_num_threads``
on the runtime these kernels are linked against).
"""

import os

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTBN_OPENMP_VERSION _OPENMP
    #else
    #define FASTBN_OPENMP_VERSION 0
    static int omp_get_max_threads(void) { return 1; }
    static void omp_set_num_threads(int n) { (void)n; }
    #endif
    """
    int FASTBN_OPENMP_VERSION
    int omp_get_max_threads() noexcept nogil
    void omp_set_num_threads(int n) noexcept nogil


def openmp_version():
    """The ``_OPENMP`` date-version the kernels were compiled with (e.g. 201511), 0 if none."""
    return FASTBN_OPENMP_VERSION


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return FASTBN_OPENMP_VERSION != 0


def get_max_threads():
    """Threads an OpenMP region started now on this Python thread would use."""
    return omp_get_max_threads()


def set_max_threads(int n):
    """Set the OpenMP runtime's default thread count for this Python thread (n >= 1)."""
    if n < 1:
        raise ValueError(f"number of threads must be at least 1, got {n}")
    omp_set_num_threads(n)


def effective_n_threads(n_threads=None):
    """The thread count a kernel call should use, as scikit-learn defines ``n_threads``.

    None means the OpenMP runtime's current maximum; a positive int is taken as is (capped at
    the runtime maximum only by the runtime itself); a negative int counts back from the CPU
    count (-1 means all CPUs, -2 all but one); 0 is an error.  Without OpenMP, always 1.
    """
    if n_threads is None:
        return omp_get_max_threads() if FASTBN_OPENMP_VERSION else 1
    if isinstance(n_threads, bool) or not isinstance(n_threads, int):
        try:
            n_threads = n_threads.__index__()
        except (AttributeError, TypeError):
            raise TypeError(f"n_threads must be None or an int, got {type(n_threads).__name__}") from None
    if n_threads == 0:
        raise ValueError("n_threads == 0 is invalid: use None, a positive count, or -1 for all CPUs")
    if not -2**31 < n_threads < 2**31:  # the kernels take a C int
        raise ValueError(f"n_threads={n_threads} is out of range: use None, a positive count "
                         f"below 2**31, or -1 for all CPUs")
    if not FASTBN_OPENMP_VERSION:
        return 1
    if n_threads < 0:
        return max(1, (os.cpu_count() or 1) + 1 + n_threads)
    return n_threads
