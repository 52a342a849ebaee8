/* Small portable helpers of the inner loops (fastbn/_engine/loops.pxi declares them).
 *
 *   FASTBN_PREFETCH(p)                          a read prefetch where the compiler has one
 *   fastbn_keep_float / fastbn_keep_double      v or +0.0, chosen by masking v's bits
 */
#ifndef FASTBN_SIMD_BITS_H
#define FASTBN_SIMD_BITS_H

#if defined(__GNUC__) || defined(__clang__)
#define FASTBN_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)
#elif defined(_MSC_VER)
#include <xmmintrin.h>
#define FASTBN_PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
#define FASTBN_PREFETCH(p) ((void)(p))
#endif

#include <stdint.h>
#include <string.h>
/* v where keep is 1, +0.0 where it is 0, by masking v's bits.  gcc 12 does not vectorise
   a float32 select (keep ? v : 0) whose result is widened to double, but does vectorise
   this; the memcpys compile to register moves. */
static inline float fastbn_keep_float(int keep, float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits &= (uint32_t)0 - (uint32_t)keep;
    memcpy(&v, &bits, sizeof bits);
    return v;
}
static inline double fastbn_keep_double(int keep, double v) {
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits &= (uint64_t)0 - (uint64_t)keep;
    memcpy(&v, &bits, sizeof bits);
    return v;
}

#endif /* FASTBN_SIMD_BITS_H */
