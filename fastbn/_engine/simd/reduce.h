/* Reductions written with intrinsics: the moment and gradient lane sums the statistics and
 * the backward accumulate.
 *
 * Part of fastbn's kernels (declared to Cython in fastbn/_engine/storage.pxi and loops.pxi).
 * Each function must give the bits of a Cython loop -- the same float64 arithmetic, lane for
 * lane, in the same order -- so that a result never depends on which path ran:
 *
 *   fastbn_moment_lanes_half     moment_lanes (loops.pxi) on a half run widened to float32;
 *                                FASTBN_HALF_LANES says whether this build has it
 *   fastbn_moment_totals_float   moment_totals (loops.pxi) of a float32 run, and its fold
 *   fastbn_grad_totals_float     grad_lanes + fold_lanes (loops.pxi) of a float32 run;
 *                                FASTBN_TOTALS_SIMD says whether this build has them
 *
 * tests/test_kernels.py and the SIMD-level tests compare every level's results bit for bit.
 */
#ifndef FASTBN_SIMD_REDUCE_H
#define FASTBN_SIMD_REDUCE_H

#include "convert.h"

/* (AVX-512BW for the 16-value conversions of convert.h; FMA, which the FMA builds contract
   the compiled loop's d * d into) */
#if defined(__FMA__) && defined(__AVX512F__) && defined(__AVX512BW__)
/* The lane sums of a run of half data, conversions in registers: moment_lanes' arithmetic
   (d = x - shift in float64; s1 += d; s2 += d * d, which the FMA builds compile to one
   fused multiply-add) in its order, value i into lane i % 32, so the same bits. */
#define FASTBN_HALF_LANES 1
static inline void fastbn_moment_lanes_half(int bfloat, const void *src, Py_ssize_t n,
                                            double shift, double *s1, double *s2) {
    const uint16_t *s = (const uint16_t *)src;
    __m512d a[4], b[4];
    const __m512d k = _mm512_set1_pd(shift);
    Py_ssize_t i = 0, full = n - n % 32, j;
    for (j = 0; j < 4; j++) {
        a[j] = _mm512_loadu_pd(s1 + 8 * j);
        b[j] = _mm512_loadu_pd(s2 + 8 * j);
    }
    for (; i < full; i += 32) {
        __m512 lo = fastbn_load16(bfloat, s + i), hi = fastbn_load16(bfloat, s + i + 16);
        __m512d d[4];
        d[0] = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(lo)), k);
        d[1] = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lo), 1))), k);
        d[2] = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(hi)), k);
        d[3] = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(hi), 1))), k);
        for (j = 0; j < 4; j++) {
            a[j] = _mm512_add_pd(a[j], d[j]);
            b[j] = _mm512_fmadd_pd(d[j], d[j], b[j]);
        }
    }
    for (j = 0; j < 4; j++) {
        _mm512_storeu_pd(s1 + 8 * j, a[j]);
        _mm512_storeu_pd(s2 + 8 * j, b[j]);
    }
    for (j = 0; i + j < n; j++) {
        float v;
        double d;
        if (bfloat)
            fastbn_widen_bfloat(s + i + j, &v, 1);
        else
            fastbn_widen_half(s + i + j, &v, 1);
        d = (double)v - shift;
        s1[j] += d;
        s2[j] = fma(d, d, s2[j]);
    }
}
#else
#define FASTBN_HALF_LANES 0
/* Never called: FASTBN_HALF_LANES tells the caller to stage the run. */
static inline void fastbn_moment_lanes_half(int bfloat, const void *src, Py_ssize_t n,
                                            double shift, double *s1, double *s2) {
    (void)bfloat; (void)src; (void)n; (void)shift; (void)s1; (void)s2;
}
#endif

/* GCC and clang only: the compiled loops these reproduce contract s2 += a * b into a fused
   multiply-add there (-ffp-contract=fast, their default for C), which is what the
   intrinsics do; a compiler that does not contract would give other bits. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512F__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FASTBN_TOTALS_SIMD 1
/* The pairwise fold of 32 lanes (four vectors) in fold_lanes' order: lanes j += j + 16,
   then j + 8, j + 4, j + 2, j + 1. */
static inline double fastbn_fold32(const __m512d *a) {
    __m512d s = _mm512_add_pd(_mm512_add_pd(a[0], a[2]), _mm512_add_pd(a[1], a[3]));
    __m256d q = _mm256_add_pd(_mm512_castpd512_pd256(s), _mm512_extractf64x4_pd(s, 1));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(q), _mm256_extractf128_pd(q, 1));
    return _mm_cvtsd_f64(h) + _mm_cvtsd_f64(_mm_unpackhi_pd(h, h));
}
static inline __mmask8 fastbn_first(Py_ssize_t left) {
    return left >= 8 ? (__mmask8)0xFF : (left <= 0 ? (__mmask8)0 : (__mmask8)((1u << left) - 1u));
}
/* moment_totals of a float32 run, written out for AVX-512: the same float64 arithmetic
   (d = x - shift; s1 += d; s2 += d * d as one fused multiply-add, as the compiled loop
   does), lane i % 32 for value i, and the fold in fold_lanes' pairwise order, so the same
   bits.  The last partial sweep loads under a mask, its absent lanes adding d = +0.0 (see
   moment_totals), so the lanes never leave the registers, as they must through the
   compiled loop's remainder. */
static inline void fastbn_moment_lanes8(const float *x, __mmask8 m, __m512d k, __m512d *a,
                                        __m512d *b) {
    /* Eight lanes of a sweep (m: the lanes present; all eight but in the last sweep). */
    __m512d d = _mm512_maskz_sub_pd(m, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x)), k);
    *a = _mm512_add_pd(*a, d);
    *b = _mm512_fmadd_pd(d, d, *b);
}
static inline void fastbn_moment_totals_float(const float *x, Py_ssize_t n, double shift,
                                              double *t1, double *t2) {
    __m512d a[4], b[4];
    const __m512d k = _mm512_set1_pd(shift);
    Py_ssize_t i = 0, full = n - n % 32;
    a[0] = a[1] = a[2] = a[3] = b[0] = b[1] = b[2] = b[3] = _mm512_setzero_pd();
    for (; i < full; i += 32) {
        fastbn_moment_lanes8(x + i, 0xFF, k, &a[0], &b[0]);
        fastbn_moment_lanes8(x + i + 8, 0xFF, k, &a[1], &b[1]);
        fastbn_moment_lanes8(x + i + 16, 0xFF, k, &a[2], &b[2]);
        fastbn_moment_lanes8(x + i + 24, 0xFF, k, &a[3], &b[3]);
    }
    if (i < n) {
        fastbn_moment_lanes8(x + i, fastbn_first(n - i), k, &a[0], &b[0]);
        fastbn_moment_lanes8(x + i + 8, fastbn_first(n - i - 8), k, &a[1], &b[1]);
        fastbn_moment_lanes8(x + i + 16, fastbn_first(n - i - 16), k, &a[2], &b[2]);
        fastbn_moment_lanes8(x + i + 24, fastbn_first(n - i - 24), k, &a[3], &b[3]);
    }
    *t1 = fastbn_fold32(a);
    *t2 = fastbn_fold32(b);
}
static inline void fastbn_grad_lanes8(int relu, const float *dy, const float *out,
                                      const float *x, __mmask8 m, __m512d k, __m512d *a,
                                      __m512d *b) {
    /* Eight lanes of a sweep (m: the lanes present; all eight but in the last sweep). */
    __m256 v = _mm256_maskz_loadu_ps(m, dy);
    __m512d g, t;
    if (relu)
        v = _mm256_maskz_mov_ps(_mm256_cmp_ps_mask(_mm256_maskz_loadu_ps(m, out),
                                                   _mm256_setzero_ps(), _CMP_NLE_UQ), v);
    g = _mm512_cvtps_pd(v);
    t = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x)), k);
    *a = _mm512_mask_add_pd(*a, m, *a, g);
    *b = _mm512_mask3_fmadd_pd(g, t, *b, m);
}
static inline void fastbn_grad_totals_float(int relu, const float *dy, const float *out,
                                            const float *x, Py_ssize_t n, double center,
                                            double *t1, double *t2) {
    __m512d a[4], b[4];
    const __m512d k = _mm512_set1_pd(center);
    Py_ssize_t i = 0, full = n - n % 32;
    a[0] = a[1] = a[2] = a[3] = b[0] = b[1] = b[2] = b[3] = _mm512_setzero_pd();
    for (; i < full; i += 32) {
        fastbn_grad_lanes8(relu, dy + i, out + i, x + i, 0xFF, k, &a[0], &b[0]);
        fastbn_grad_lanes8(relu, dy + i + 8, out + i + 8, x + i + 8, 0xFF, k, &a[1], &b[1]);
        fastbn_grad_lanes8(relu, dy + i + 16, out + i + 16, x + i + 16, 0xFF, k, &a[2], &b[2]);
        fastbn_grad_lanes8(relu, dy + i + 24, out + i + 24, x + i + 24, 0xFF, k, &a[3], &b[3]);
    }
    if (i < n) {
        fastbn_grad_lanes8(relu, dy + i, out + i, x + i, fastbn_first(n - i), k, &a[0], &b[0]);
        fastbn_grad_lanes8(relu, dy + i + 8, out + i + 8, x + i + 8, fastbn_first(n - i - 8), k, &a[1], &b[1]);
        fastbn_grad_lanes8(relu, dy + i + 16, out + i + 16, x + i + 16, fastbn_first(n - i - 16), k, &a[2], &b[2]);
        fastbn_grad_lanes8(relu, dy + i + 24, out + i + 24, x + i + 24, fastbn_first(n - i - 24), k, &a[3], &b[3]);
    }
    *t1 = fastbn_fold32(a);
    *t2 = fastbn_fold32(b);
}
#else
#define FASTBN_TOTALS_SIMD 0
/* Never called (FASTBN_TOTALS_SIMD): moment_totals and grad_lanes run as compiled. */
static inline void fastbn_moment_totals_float(const float *x, Py_ssize_t n, double shift,
                                              double *t1, double *t2) {
    (void)x; (void)n; (void)shift; (void)t1; (void)t2;
}
static inline void fastbn_grad_totals_float(int relu, const float *dy, const float *out,
                                            const float *x, Py_ssize_t n, double center,
                                            double *t1, double *t2) {
    (void)relu; (void)dy; (void)out; (void)x; (void)n; (void)center; (void)t1; (void)t2;
}
#endif

#endif /* FASTBN_SIMD_REDUCE_H */
