"""OpenMP shim: whether OpenMP was compiled in, and how many threads a call may use.

The build falls back to serial kernels where the compiler has no OpenMP; this module then
answers as a one-thread runtime would, so nothing above it needs an ``#ifdef``.

Thread counts follow scikit-learn's convention (``sklearn/utils/_openmp_helpers.pyx``):
``n_threads=None`` means "whatever the OpenMP runtime allows now", which honours
``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits`` (it calls ``omp_set_num_threads``
on the runtime these kernels are linked against).

Every kernel module is linked against the same OpenMP runtime as this one (setup.py gives
them the same flags), so the runtime this module reports and sets is the kernels' runtime.
"""

import operator
import os

from numpy import bool_ as np_bool

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

    /* The file of the shared library that defines omp_get_max_threads for this module: the
       OpenMP runtime actually loaded (the vendored copy in a repaired wheel).  dladdr is a
       glibc/musl/macOS extension; elsewhere, and without OpenMP, there is no answer. */
    #if defined(_OPENMP) && (defined(__linux__) || defined(__APPLE__))
    #ifndef _GNU_SOURCE
    #define _GNU_SOURCE
    #endif
    #include <dlfcn.h>
    /* glibc 2.34 moved dladdr from libdl into libc under a new version, GLIBC_2.34, which a
       module linked against glibc >= 2.34 would require, and with it a Linux that new.  The
       first version, which every glibc since keeps, is enough: so a wheel built on a new
       system loads on older ones (manylinux_2_28 and older; see .ci/wheel). */
    #if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
    #if defined(__x86_64__)
    __asm__(".symver dladdr,dladdr@GLIBC_2.2.5");
    #elif defined(__aarch64__)
    __asm__(".symver dladdr,dladdr@GLIBC_2.17");
    #endif
    #endif
    static const char *fastbn_openmp_library(void) {
        Dl_info info;
        if (dladdr((void *)&omp_get_max_threads, &info) && info.dli_fname != NULL)
            return info.dli_fname;
        return NULL;
    }
    #else
    static const char *fastbn_openmp_library(void) { return NULL; }
    #endif
    """
    int FASTBN_OPENMP_VERSION
    int omp_get_max_threads() noexcept nogil
    void omp_set_num_threads(int n) noexcept nogil
    const char* fastbn_openmp_library() noexcept nogil


def openmp_version():
    """The ``_OPENMP`` date-version the kernels were compiled with (e.g. 201511), 0 if none."""
    return FASTBN_OPENMP_VERSION


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return FASTBN_OPENMP_VERSION != 0


def openmp_library():
    """Path of the OpenMP runtime library the kernels call, or None where it cannot be told.

    Found with ``dladdr`` on Linux and macOS; None without OpenMP and on Windows (where
    ``threadpoolctl.threadpool_info()`` can tell instead).
    """
    cdef const char* path = fastbn_openmp_library()
    if path == NULL:
        return None
    return os.fsdecode(<bytes>path)


def get_num_threads():
    """Number of threads fastbn's kernels use by default on the calling thread.

    This is the OpenMP runtime's ``omp_get_max_threads()``: ``OMP_NUM_THREADS`` (or the
    number of CPUs) unless :func:`set_num_threads` or ``threadpoolctl.threadpool_limits``
    changed it.  It is what ``n_threads=None`` means in :mod:`fastbn.functional` and what the
    modules use.  Small arrays run on fewer threads, as starting threads would cost more than
    it saves.

    Returns
    -------
    int
        At least 1; always 1 in a build without OpenMP.

    See Also
    --------
    set_num_threads
    """
    return omp_get_max_threads() if FASTBN_OPENMP_VERSION else 1


def set_num_threads(n):
    """Set the number of threads fastbn's kernels use by default on the calling thread.

    Calls ``omp_set_num_threads(n)`` on the OpenMP runtime fastbn is linked against, as
    ``threadpoolctl.threadpool_limits`` does.

    Parameters
    ----------
    n : int
        A positive number of threads.  It may exceed the number of CPUs (the threads then
        share them, usually slower).

    Raises
    ------
    TypeError
        If `n` is not an integer.
    ValueError
        If `n` is less than 1.

    Notes
    -----
    The setting belongs to the calling Python thread, as OpenMP defines it: other threads,
    including threads started afterwards, keep their own setting, which starts at the
    process default (``OMP_NUM_THREADS``, else the number of CPUs).  It is shared with
    everything else in the process that uses the same OpenMP runtime (the same library
    file), and it is not restored automatically; ``with threadpoolctl.threadpool_limits(n):``
    sets and restores it.  In a build without OpenMP the value is checked and has no effect.

    See Also
    --------
    get_num_threads
    """
    if isinstance(n, bool):
        raise TypeError("number of threads must be an int, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"number of threads must be an int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"number of threads must be at least 1, got {n}")
    if n > 0x7FFFFFFF:
        raise ValueError(f"number of threads must be at most {0x7FFFFFFF}, got {n}")
    omp_set_num_threads(<int>n)


def effective_n_threads(n_threads=None):
    """The thread count a kernel call should use, as scikit-learn defines ``n_threads``.

    None means the OpenMP runtime's current maximum; a positive int is taken as is (capped at
    the runtime maximum only by the runtime itself); a negative int counts back from the CPU
    count (-1 means all CPUs, -2 all but one); 0 is an error.  Without OpenMP, always 1.
    """
    if n_threads is None:
        return omp_get_max_threads() if FASTBN_OPENMP_VERSION else 1
    if isinstance(n_threads, (bool, np_bool)):
        raise TypeError(f"n_threads must be None or an int, got {type(n_threads).__name__}")
    if not isinstance(n_threads, int):
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
