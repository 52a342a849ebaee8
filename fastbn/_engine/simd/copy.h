/* A copy written with streaming stores: the benchmarks' yardstick for passes whose output is
 * written past the caches.
 *
 * Part of fastbn's kernels (declared to Cython in fastbn/_kernels.pyx, used by parallel_copy
 * only).  fastbn's elementwise pass writes large float32 outputs with streaming stores
 * (fastbn_affine_stream in affine.h); a copy with ordinary stores pays a read of every
 * destination line (read for ownership) that such a pass does not, so `python -m fastbn bench`
 * holds those passes to this copy's time instead (tests/test_bench.py).
 *
 *   fastbn_copy_stream  dst[0:n] = src[0:n] (bytes), the aligned middle written with 256-bit
 *                       streaming stores; built where FASTBN_STREAM_AFFINE is (the builds that
 *                       stream their outputs), which says so
 */
#ifndef FASTBN_SIMD_COPY_H
#define FASTBN_SIMD_COPY_H

#include <string.h>
#include "affine.h"

#if FASTBN_STREAM_AFFINE
static inline void fastbn_copy_stream(const char *src, char *dst, Py_ssize_t n) {
    Py_ssize_t head = (Py_ssize_t)((32u - ((uintptr_t)dst & 31u)) & 31u), i;
    if (head > n)
        head = n;
    memcpy(dst, src, (size_t)head);  /* to a 32-byte boundary of the destination */
    for (i = head; i + 32 <= n; i += 32)
        _mm256_stream_si256((__m256i *)(dst + i), _mm256_loadu_si256((const __m256i *)(src + i)));
    memcpy(dst + i, src + i, (size_t)(n - i));
    _mm_sfence();  /* the copy is visible to whatever runs next, on any thread */
}
#else
/* Never called (FASTBN_STREAM_AFFINE): parallel_copy refuses streaming=True in this build. */
static inline void fastbn_copy_stream(const char *src, char *dst, Py_ssize_t n) {
    memcpy(dst, src, (size_t)n);
}
#endif

#endif /* FASTBN_SIMD_COPY_H */
