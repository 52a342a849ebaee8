/* Reductions written with intrinsics: the moment and gradient lane sums the statistics and
 * the backward accumulate.
 *
 * Part of fastbn's kernels (declared to Cython in fastbn/_engine/storage.pxi and loops.pxi).
 * Each function must give the bits of a Cython loop -- the same float64 arithmetic, lane for
 * lane, in the same order -- so that a result never depends on which path ran:
 *
 *   fastbn_moment_totals_float   moment_totals (loops.pxi) of a float32 run, and its fold
 *   fastbn_grad_totals_float     grad_lanes + fold_lanes (loops.pxi) of a float32 run;
 *                                FASTBN_TOTALS_SIMD says whether this build has them, for
 *                                runs of up to FASTBN_TOTALS_MAX_RUN and
 *                                FASTBN_GRAD_TOTALS_MAX_RUN values (the AVX-512 builds: all
 *                                32 lanes in registers, any run; the AVX2 ones: the moments
 *                                of short runs, half the lanes per sweep)
 *   fastbn_moment_totals_half    moment_lanes + fold_lanes of a half run widened to float32,
 *   fastbn_grad_totals_half      grad_lanes + fold_lanes (no dx) and the same with dx
 *   fastbn_grad_totals_half_dx   narrowed to the half type, conversions in registers;
 *                                FASTBN_HALF_TOTALS says whether this build has the three
 *                                (the AVX2 and AVX-512BW ones)
 *   (fastbn_load16_part, fastbn_store16_part: the masked last sweep of a half run, AVX-512)
 *
 * tests/test_kernels.py and the SIMD-level tests compare every level's results bit for bit.
 */
#ifndef FASTBN_SIMD_REDUCE_H
#define FASTBN_SIMD_REDUCE_H

#include "convert.h"

/* GCC and clang only: the compiled loops these reproduce contract s2 += a * b into a fused
   multiply-add there (-ffp-contract=fast, their default for C), which is what the
   intrinsics do; a compiler that does not contract would give other bits. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512F__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FASTBN_TOTALS_SIMD 1
#define FASTBN_TOTALS_MAX_RUN PY_SSIZE_T_MAX
#define FASTBN_GRAD_TOTALS_MAX_RUN PY_SSIZE_T_MAX
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
static inline void fastbn_moment_lanes8_reg(__m256 v, __mmask8 m, __m512d k, __m512d *a,
                                            __m512d *b) {
    /* Eight lanes of a sweep, their values in v (m: the lanes present; all eight but in the
       last sweep, whose absent lanes add d = +0.0). */
    __m512d d = _mm512_maskz_sub_pd(m, _mm512_cvtps_pd(v), k);
    *a = _mm512_add_pd(*a, d);
    *b = _mm512_fmadd_pd(d, d, *b);
}
static inline void fastbn_moment_lanes8(const float *x, __mmask8 m, __m512d k, __m512d *a,
                                        __m512d *b) {
    fastbn_moment_lanes8_reg(_mm256_maskz_loadu_ps(m, x), m, k, a, b);
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
        fastbn_grad_lanes8(relu, dy + i, relu ? out + i : out, x + i, 0xFF, k, &a[0], &b[0]);
        fastbn_grad_lanes8(relu, dy + i + 8, relu ? out + i + 8 : out, x + i + 8, 0xFF, k, &a[1], &b[1]);
        fastbn_grad_lanes8(relu, dy + i + 16, relu ? out + i + 16 : out, x + i + 16, 0xFF, k, &a[2], &b[2]);
        fastbn_grad_lanes8(relu, dy + i + 24, relu ? out + i + 24 : out, x + i + 24, 0xFF, k, &a[3], &b[3]);
    }
    if (i < n) {
        fastbn_grad_lanes8(relu, dy + i, relu ? out + i : out, x + i, fastbn_first(n - i), k, &a[0], &b[0]);
        fastbn_grad_lanes8(relu, dy + i + 8, relu ? out + i + 8 : out, x + i + 8, fastbn_first(n - i - 8), k, &a[1], &b[1]);
        fastbn_grad_lanes8(relu, dy + i + 16, relu ? out + i + 16 : out, x + i + 16, fastbn_first(n - i - 16), k, &a[2], &b[2]);
        fastbn_grad_lanes8(relu, dy + i + 24, relu ? out + i + 24 : out, x + i + 24, fastbn_first(n - i - 24), k, &a[3], &b[3]);
    }
    *t1 = fastbn_fold32(a);
    *t2 = fastbn_fold32(b);
}
/* The half runs, conversions in registers (AVX-512BW for the 16-value conversions of
   convert.h, which has them in its FMA builds): the same lanes, arithmetic and fold as the
   float32 functions above on the run widened to float32, which is what the staged path feeds
   moment_lanes and grad_lanes. */
#if defined(__FMA__) && defined(__AVX512BW__)
#define FASTBN_HALF_TOTALS 1
static inline __mmask16 fastbn_first16(Py_ssize_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u));
}
static inline __m512 fastbn_load16_part(int bfloat, const uint16_t *s, Py_ssize_t at,
                                        Py_ssize_t n) {
    /* s[at:at + 16] as far as it lies below s[n], zeros after: a masked load, which reads
       nothing past the run (and no pointer past it is formed: at >= n loads nothing from s) */
    __m256i h = _mm256_maskz_loadu_epi16(fastbn_first16(n - at), s + (at < n ? at : 0));
    if (bfloat)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}
static inline __m256 fastbn_low8(__m512 v) { return _mm512_castps512_ps256(v); }
static inline __m256 fastbn_high8(__m512 v) {
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}
FASTBN_RUN_FUNCTION void fastbn_moment_totals_half(int bfloat, const void *src, Py_ssize_t n,
                                             double shift, double *t1, double *t2) {
    const uint16_t *x = (const uint16_t *)src;
    __m512d a[4], b[4];
    const __m512d k = _mm512_set1_pd(shift);
    Py_ssize_t i = 0, full = n - n % 32;
    a[0] = a[1] = a[2] = a[3] = b[0] = b[1] = b[2] = b[3] = _mm512_setzero_pd();
    for (; i < full; i += 32) {
        __m512 lo = fastbn_load16(bfloat, x + i), hi = fastbn_load16(bfloat, x + i + 16);
        fastbn_moment_lanes8_reg(fastbn_low8(lo), 0xFF, k, &a[0], &b[0]);
        fastbn_moment_lanes8_reg(fastbn_high8(lo), 0xFF, k, &a[1], &b[1]);
        fastbn_moment_lanes8_reg(fastbn_low8(hi), 0xFF, k, &a[2], &b[2]);
        fastbn_moment_lanes8_reg(fastbn_high8(hi), 0xFF, k, &a[3], &b[3]);
    }
    if (i < n) {  /* the last, partial sweep: absent lanes add d = +0.0, as in the float32 one */
        __m512 lo = fastbn_load16_part(bfloat, x, i, n);
        __m512 hi = fastbn_load16_part(bfloat, x, i + 16, n);
        fastbn_moment_lanes8_reg(fastbn_low8(lo), fastbn_first(n - i), k, &a[0], &b[0]);
        fastbn_moment_lanes8_reg(fastbn_high8(lo), fastbn_first(n - i - 8), k, &a[1], &b[1]);
        fastbn_moment_lanes8_reg(fastbn_low8(hi), fastbn_first(n - i - 16), k, &a[2], &b[2]);
        fastbn_moment_lanes8_reg(fastbn_high8(hi), fastbn_first(n - i - 24), k, &a[3], &b[3]);
    }
    *t1 = fastbn_fold32(a);
    *t2 = fastbn_fold32(b);
}
static inline __m512 fastbn_grad_lanes16_reg(int relu, __m512 g, __m512 o, __m512 x, __mmask16 m,
                                        __m512d k, __m512d *a, __m512d *b) {
    /* fastbn_grad_lanes8 on sixteen values already in registers (lanes a[0], a[1]): g gated
       as gate does (ReLU: +0.0 where out <= 0), then a += g and b += g * (x - center), one
       fused multiply-add, in the lanes present (m); returns the gated g */
    __m512d g0, g1;
    if (relu)
        g = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(o, _mm512_setzero_ps(), _CMP_NLE_UQ), g);
    g0 = _mm512_cvtps_pd(fastbn_low8(g));
    g1 = _mm512_cvtps_pd(fastbn_high8(g));
    a[0] = _mm512_mask_add_pd(a[0], (__mmask8)m, a[0], g0);
    a[1] = _mm512_mask_add_pd(a[1], (__mmask8)(m >> 8), a[1], g1);
    b[0] = _mm512_mask3_fmadd_pd(g0, _mm512_sub_pd(_mm512_cvtps_pd(fastbn_low8(x)), k), b[0], (__mmask8)m);
    b[1] = _mm512_mask3_fmadd_pd(g1, _mm512_sub_pd(_mm512_cvtps_pd(fastbn_high8(x)), k), b[1],
                                 (__mmask8)(m >> 8));
    return g;
}
static inline void fastbn_store16_part(int bfloat, uint16_t *d, __m512 v, Py_ssize_t at,
                                       Py_ssize_t n) {
    /* v narrowed (fastbn_store16's bits) into d[at:at + 16] as far as it lies below d[n]: a
       masked store, which writes nothing past the run */
    __m256i h = bfloat ? fastbn_bfloat_round16(_mm512_castps_si512(v))
                       : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    _mm256_mask_storeu_epi16(d + (at < n ? at : 0), fastbn_first16(n - at), h);
}
/* grad_lanes + fold_lanes of a half run, and with dx (not NULL) grad_lanes' dx = scale * g,
   narrowed to the half type as the staged path narrows it (the eval backward's pass).  The
   last, partial sweep is loaded and stored under masks; its absent lanes keep their sums (the
   padded zeros could make g * (x - center) NaN where the center -- a running mean there -- is
   infinite). */
FASTBN_RUN_FUNCTION void fastbn_grad_totals_half_dx(int bfloat, int relu, const void *dy,
                                                    const void *out, const void *x, Py_ssize_t n,
                                                    double center, float scale, void *dx,
                                                    double *t1, double *t2) {
    const uint16_t *g = (const uint16_t *)dy, *o = (const uint16_t *)out, *s = (const uint16_t *)x;
    uint16_t *d = (uint16_t *)dx;
    const __m512 unused_out = _mm512_setzero_ps(), factor = _mm512_set1_ps(scale);
    __m512d a[4], b[4];
    const __m512d k = _mm512_set1_pd(center);
    Py_ssize_t i = 0, full = n - n % 32;
    __m512 v;
    a[0] = a[1] = a[2] = a[3] = b[0] = b[1] = b[2] = b[3] = _mm512_setzero_pd();
    for (; i < full; i += 32) {  /* (out is read only for ReLU, and may be NULL otherwise) */
        v = fastbn_grad_lanes16_reg(relu, fastbn_load16(bfloat, g + i),
                                    relu ? fastbn_load16(bfloat, o + i) : unused_out,
                                    fastbn_load16(bfloat, s + i), 0xFFFF, k, a, b);
        if (d != NULL)
            fastbn_store16(bfloat, d + i, _mm512_mul_ps(factor, v));
        v = fastbn_grad_lanes16_reg(relu, fastbn_load16(bfloat, g + i + 16),
                                    relu ? fastbn_load16(bfloat, o + i + 16) : unused_out,
                                    fastbn_load16(bfloat, s + i + 16), 0xFFFF, k, a + 2, b + 2);
        if (d != NULL)
            fastbn_store16(bfloat, d + i + 16, _mm512_mul_ps(factor, v));
    }
    if (i < n) {
        v = fastbn_grad_lanes16_reg(relu, fastbn_load16_part(bfloat, g, i, n),
                                    relu ? fastbn_load16_part(bfloat, o, i, n) : unused_out,
                                    fastbn_load16_part(bfloat, s, i, n), fastbn_first16(n - i),
                                    k, a, b);
        if (d != NULL)
            fastbn_store16_part(bfloat, d, _mm512_mul_ps(factor, v), i, n);
        v = fastbn_grad_lanes16_reg(relu, fastbn_load16_part(bfloat, g, i + 16, n),
                                    relu ? fastbn_load16_part(bfloat, o, i + 16, n) : unused_out,
                                    fastbn_load16_part(bfloat, s, i + 16, n),
                                    fastbn_first16(n - i - 16), k, a + 2, b + 2);
        if (d != NULL)
            fastbn_store16_part(bfloat, d, _mm512_mul_ps(factor, v), i + 16, n);
    }
    *t1 = fastbn_fold32(a);
    *t2 = fastbn_fold32(b);
}
FASTBN_RUN_FUNCTION void fastbn_grad_totals_half(int bfloat, int relu, const void *dy, const void *out,
                                           const void *x, Py_ssize_t n, double center,
                                           double *t1, double *t2) {
    fastbn_grad_totals_half_dx(bfloat, relu, dy, out, x, n, center, 0.0f, NULL, t1, t2);
}
#endif
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTBN_TOTALS_SIMD 1
/* (moments of runs up to 2,048 values, whose second sweep then comes from L1; longer runs
   are as fast through the compiled loop, which reads them once) */
#define FASTBN_TOTALS_MAX_RUN 2048
#define FASTBN_GRAD_TOTALS_MAX_RUN 0
/* The moment totals in AVX2, whose 16 vector registers cannot hold both sums' 32 lanes (16
   vectors) and the data besides: the compiled loop keeps them on the stack, and a run of tens
   of values (a 7x7 plane) cost ~70 ns on a Zen 3.  Here each half of the lanes (lanes 0-15,
   then 16-31: four vectors per sum) takes its own sweep over the run -- the second from L1 --
   and every lane still adds its values in the run's order, so the same bits; the fold is
   fold_lanes' pairwise order across the two halves. */
static inline double fastbn_fold32_halves(const __m256d *lo, const __m256d *hi) {
    /* lanes j += j + 16 (lo[q] + hi[q]), then j + 8, j + 4, j + 2, j + 1 */
    __m256d s0 = _mm256_add_pd(lo[0], hi[0]), s1 = _mm256_add_pd(lo[1], hi[1]);
    __m256d s2 = _mm256_add_pd(lo[2], hi[2]), s3 = _mm256_add_pd(lo[3], hi[3]);
    __m256d u = _mm256_add_pd(_mm256_add_pd(s0, s2), _mm256_add_pd(s1, s3));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(u), _mm256_extractf128_pd(u, 1));
    return _mm_cvtsd_f64(h) + _mm_cvtsd_f64(_mm_unpackhi_pd(h, h));
}
static inline void fastbn_clear16(__m256d *a, __m256d *b) {
    /* a[0..7] = b[0..7] = 0, one store each (a loop of them becomes a memset, which GCC
       expands to rep stos: a tenth of a 784-value run's gradient sums) */
    const __m256d z = _mm256_setzero_pd();
    a[0] = z; a[1] = z; a[2] = z; a[3] = z; a[4] = z; a[5] = z; a[6] = z; a[7] = z;
    b[0] = z; b[1] = z; b[2] = z; b[3] = z; b[4] = z; b[5] = z; b[6] = z; b[7] = z;
}
static inline void fastbn_moment_half(const float *x, Py_ssize_t full, __m256d k, __m256d *a,
                                      __m256d *b) {
    /* Sixteen lanes (x at the first) of every 32-value sweep of x[:full]. */
    __m256d a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];
    Py_ssize_t i;
    for (i = 0; i < full; i += 32) {
        __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), k);
        __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 4)), k);
        __m256d d2 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 8)), k);
        __m256d d3 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 12)), k);
        a0 = _mm256_add_pd(a0, d0);
        a1 = _mm256_add_pd(a1, d1);
        a2 = _mm256_add_pd(a2, d2);
        a3 = _mm256_add_pd(a3, d3);
        b0 = _mm256_fmadd_pd(d0, d0, b0);
        b1 = _mm256_fmadd_pd(d1, d1, b1);
        b2 = _mm256_fmadd_pd(d2, d2, b2);
        b3 = _mm256_fmadd_pd(d3, d3, b3);
    }
    a[0] = a0; a[1] = a1; a[2] = a2; a[3] = a3;
    b[0] = b0; b[1] = b1; b[2] = b2; b[3] = b3;
}
/* moment_totals of a float32 run: its last, partial sweep on a copy of the run's end padded
   with the shift, as moment_totals does (deviations of +0.0, which change no lane). */
static inline void fastbn_moment_totals_float(const float *x, Py_ssize_t n, double shift,
                                              double *t1, double *t2) {
    __m256d a[8], b[8];
    float tail[32];
    const __m256d k = _mm256_set1_pd(shift);
    Py_ssize_t full = n - n % 32, j;
    fastbn_clear16(a, b);
    if (full > 0) {  /* (x + 16 is only formed within the run) */
        fastbn_moment_half(x, full, k, a, b);
        fastbn_moment_half(x + 16, full, k, a + 4, b + 4);
    }
    if (full < n) {
        for (j = 0; j < 32; j++)
            tail[j] = (float)shift;
        memcpy(tail, x + full, (size_t)(n - full) * sizeof(float));
        fastbn_moment_half(tail, 32, k, a, b);
        fastbn_moment_half(tail + 16, 32, k, a + 4, b + 4);
    }
    *t1 = fastbn_fold32_halves(a, a + 4);
    *t2 = fastbn_fold32_halves(b, b + 4);
}
/* The same two sweeps over a run of half data, widened in registers (the float32 lanes'
   bits, which are the bits of moment_lanes and grad_lanes + fold_lanes on the widened run),
   in chunks of FASTBN_HALF_CHUNK values whose second sweep comes from L1.  Staged through
   float32 buffers instead, a float16 run cost more than a float32 one of the same length. */
#define FASTBN_HALF_TOTALS 1
#define FASTBN_HALF_CHUNK 2048
static inline void fastbn_widen_lanes(__m256 v, __m256d *lo, __m256d *hi) {
    /* eight float32 values as two vectors of four float64 lanes */
    *lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    *hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
}
static inline void fastbn_moment_half16(int bfloat, const uint16_t *x, Py_ssize_t full,
                                        __m256d k, __m256d *a, __m256d *b) {
    /* Sixteen lanes (x at the first) of every 32-value sweep of the half run x[:full]. */
    __m256d a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];
    __m256d d0, d1, d2, d3;
    Py_ssize_t i;
    for (i = 0; i < full; i += 32) {
        fastbn_widen_lanes(fastbn_load8(bfloat, x + i), &d0, &d1);
        fastbn_widen_lanes(fastbn_load8(bfloat, x + i + 8), &d2, &d3);
        d0 = _mm256_sub_pd(d0, k);
        d1 = _mm256_sub_pd(d1, k);
        d2 = _mm256_sub_pd(d2, k);
        d3 = _mm256_sub_pd(d3, k);
        a0 = _mm256_add_pd(a0, d0);
        a1 = _mm256_add_pd(a1, d1);
        a2 = _mm256_add_pd(a2, d2);
        a3 = _mm256_add_pd(a3, d3);
        b0 = _mm256_fmadd_pd(d0, d0, b0);
        b1 = _mm256_fmadd_pd(d1, d1, b1);
        b2 = _mm256_fmadd_pd(d2, d2, b2);
        b3 = _mm256_fmadd_pd(d3, d3, b3);
    }
    a[0] = a0; a[1] = a1; a[2] = a2; a[3] = a3;
    b[0] = b0; b[1] = b1; b[2] = b2; b[3] = b3;
}
/* The moments of a half run: the last, partial sweep widened into a copy padded with the
   shift (a half value, so exact in float32), as fastbn_moment_totals_float pads it. */
FASTBN_RUN_FUNCTION void fastbn_moment_totals_half(int bfloat, const void *src, Py_ssize_t n,
                                             double shift, double *t1, double *t2) {
    const uint16_t *x = (const uint16_t *)src;
    __m256d a[8], b[8];
    float tail[32];
    const __m256d k = _mm256_set1_pd(shift);
    Py_ssize_t full = n - n % 32, c, m, j;
    fastbn_clear16(a, b);
    for (c = 0; c < full; c += FASTBN_HALF_CHUNK) {
        m = full - c < FASTBN_HALF_CHUNK ? full - c : FASTBN_HALF_CHUNK;
        fastbn_moment_half16(bfloat, x + c, m, k, a, b);
        fastbn_moment_half16(bfloat, x + c + 16, m, k, a + 4, b + 4);
    }
    if (full < n) {
        for (j = 0; j < 32; j++)
            tail[j] = full + j < n ? fastbn_widen1(bfloat, x[full + j]) : (float)shift;
        fastbn_moment_half(tail, 32, k, a, b);
        fastbn_moment_half(tail + 16, 32, k, a + 4, b + 4);
    }
    *t1 = fastbn_fold32_halves(a, a + 4);
    *t2 = fastbn_fold32_halves(b, b + 4);
}
FASTBN_ALWAYS_INLINE void fastbn_grad_half16(int bfloat, int relu, const uint16_t *dy,
                                      const uint16_t *out, const uint16_t *x, Py_ssize_t full,
                                      __m256d k, float scale, uint16_t *dx, __m256d *a,
                                      __m256d *b) {
    /* Sixteen lanes (the pointers at the first) of every 32-value sweep: g = dy gated as gate
       does (ReLU: +0.0 where out <= 0), a += g, b += g * (x - center) as one fused
       multiply-add, as grad_lanes compiles; with dx (not NULL), dx = scale * g narrowed. */
    __m256d a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];
    __m256d g0, g1, d0, d1;
    const __m256 zero = _mm256_setzero_ps();
    Py_ssize_t i;
    for (i = 0; i < full; i += 32) {  /* eight values at a time: the sums and four temporaries fit the 16 registers */
        __m256 v = fastbn_load8(bfloat, dy + i);
        if (relu)
            v = _mm256_and_ps(_mm256_cmp_ps(fastbn_load8(bfloat, out + i), zero, _CMP_NLE_UQ), v);
        if (dx != NULL)
            fastbn_store8(bfloat, dx + i, _mm256_mul_ps(_mm256_set1_ps(scale), v));
        fastbn_widen_lanes(v, &g0, &g1);
        fastbn_widen_lanes(fastbn_load8(bfloat, x + i), &d0, &d1);
        a0 = _mm256_add_pd(a0, g0);
        a1 = _mm256_add_pd(a1, g1);
        b0 = _mm256_fmadd_pd(g0, _mm256_sub_pd(d0, k), b0);
        b1 = _mm256_fmadd_pd(g1, _mm256_sub_pd(d1, k), b1);
        v = fastbn_load8(bfloat, dy + i + 8);
        if (relu)
            v = _mm256_and_ps(_mm256_cmp_ps(fastbn_load8(bfloat, out + i + 8), zero, _CMP_NLE_UQ), v);
        if (dx != NULL)
            fastbn_store8(bfloat, dx + i + 8, _mm256_mul_ps(_mm256_set1_ps(scale), v));
        fastbn_widen_lanes(v, &g0, &g1);
        fastbn_widen_lanes(fastbn_load8(bfloat, x + i + 8), &d0, &d1);
        a2 = _mm256_add_pd(a2, g0);
        a3 = _mm256_add_pd(a3, g1);
        b2 = _mm256_fmadd_pd(g0, _mm256_sub_pd(d0, k), b2);
        b3 = _mm256_fmadd_pd(g1, _mm256_sub_pd(d1, k), b3);
    }
    a[0] = a0; a[1] = a1; a[2] = a2; a[3] = a3;
    b[0] = b0; b[1] = b1; b[2] = b2; b[3] = b3;
}
/* grad_lanes + fold_lanes of a half run, and with dx (not NULL) grad_lanes' dx = scale * g,
   narrowed to the half type as the staged path narrows it (the eval backward's pass).  The
   last, partial sweep is loaded padded with zeros and added under a mask (the lanes past the
   run keep their sums: a padded value could make g * (x - center) NaN where the center -- a
   running mean in the eval backward -- is infinite), so its lanes add what grad_lanes adds to
   them; its dx goes through a copy on the stack, only the values of the run stored.  (The
   body of both functions below, inlined into each, so that the sums alone -- the training
   backward's -- get a copy without dx: sharing one, the bfloat16 rounding constants took
   registers there too and two lane sums went to the stack.) */
FASTBN_ALWAYS_INLINE void fastbn_grad_sweeps_half(int bfloat, int relu, const void *dy,
                                                  const void *out, const void *x, Py_ssize_t n,
                                                  double center, float scale, void *dx,
                                                  double *t1, double *t2) {
    const uint16_t *g = (const uint16_t *)dy, *o = (const uint16_t *)out, *s = (const uint16_t *)x;
    uint16_t *d = (uint16_t *)dx;
    uint16_t narrowed[8];
    __m256d a[8], b[8];
    const __m256d k = _mm256_set1_pd(center);
    Py_ssize_t full = n - n % 32, c, m, j;
    fastbn_clear16(a, b);
    for (c = 0; c < full; c += FASTBN_HALF_CHUNK) {  /* (pointers formed only within the run) */
        m = full - c < FASTBN_HALF_CHUNK ? full - c : FASTBN_HALF_CHUNK;
        fastbn_grad_half16(bfloat, relu, g + c, relu ? o + c : o, s + c, m, k, scale,
                           d != NULL ? d + c : d, a, b);
        fastbn_grad_half16(bfloat, relu, g + c + 16, relu ? o + c + 16 : o, s + c + 16, m, k,
                           scale, d != NULL ? d + c + 16 : d, a + 4, b + 4);
    }
    for (j = 0; full + 8 * j < n; j++) {  /* the last sweep, eight values (two vectors) a step */
        const Py_ssize_t at = full + 8 * j, count = n - at < 8 ? n - at : 8;
        const __m256d left = _mm256_set1_pd((double)count);
        const __m256d first = _mm256_set_pd(3.0, 2.0, 1.0, 0.0), second = _mm256_set_pd(7.0, 6.0, 5.0, 4.0);
        __m256 v = fastbn_load8_part(bfloat, g + at, count);
        __m256d v0, v1, d0, d1, present;
        if (relu)
            v = _mm256_and_ps(_mm256_cmp_ps(fastbn_load8_part(bfloat, o + at, count),
                                            _mm256_setzero_ps(), _CMP_NLE_UQ), v);
        if (d != NULL) {
            _mm_storeu_si128((__m128i *)narrowed,
                             fastbn_narrow8(bfloat, _mm256_mul_ps(_mm256_set1_ps(scale), v)));
            memcpy(d + at, narrowed, (size_t)count * sizeof narrowed[0]);
        }
        fastbn_widen_lanes(v, &v0, &v1);
        fastbn_widen_lanes(fastbn_load8_part(bfloat, s + at, count), &d0, &d1);
        d0 = _mm256_sub_pd(d0, k);
        d1 = _mm256_sub_pd(d1, k);
        present = _mm256_cmp_pd(first, left, _CMP_LT_OQ);
        a[2 * j] = _mm256_blendv_pd(a[2 * j], _mm256_add_pd(a[2 * j], v0), present);
        b[2 * j] = _mm256_blendv_pd(b[2 * j], _mm256_fmadd_pd(v0, d0, b[2 * j]), present);
        present = _mm256_cmp_pd(second, left, _CMP_LT_OQ);
        a[2 * j + 1] = _mm256_blendv_pd(a[2 * j + 1], _mm256_add_pd(a[2 * j + 1], v1), present);
        b[2 * j + 1] = _mm256_blendv_pd(b[2 * j + 1], _mm256_fmadd_pd(v1, d1, b[2 * j + 1]), present);
    }
    *t1 = fastbn_fold32_halves(a, a + 4);
    *t2 = fastbn_fold32_halves(b, b + 4);
}
FASTBN_RUN_FUNCTION void fastbn_grad_totals_half_dx(int bfloat, int relu, const void *dy,
                                                    const void *out, const void *x, Py_ssize_t n,
                                                    double center, float scale, void *dx,
                                                    double *t1, double *t2) {
    fastbn_grad_sweeps_half(bfloat, relu, dy, out, x, n, center, scale, dx, t1, t2);
}
FASTBN_RUN_FUNCTION void fastbn_grad_totals_half(int bfloat, int relu, const void *dy, const void *out,
                                           const void *x, Py_ssize_t n, double center,
                                           double *t1, double *t2) {
    fastbn_grad_sweeps_half(bfloat, relu, dy, out, x, n, center, 0.0f, NULL, t1, t2);
}
/* The gradient sums of float32 runs stay on the compiled loop in AVX2: written this way (half the lanes per
   sweep over three arrays, the remainder blended from padded copies) they were 0.70x its
   speed on 49-value runs and 0.85x on 784-value ones, and faster only on runs of whole
   sweeps; FASTBN_GRAD_TOTALS_MAX_RUN 0 keeps this stub from being called. */
static inline void fastbn_grad_totals_float(int relu, const float *dy, const float *out,
                                            const float *x, Py_ssize_t n, double center,
                                            double *t1, double *t2) {
    (void)relu; (void)dy; (void)out; (void)x; (void)n; (void)center; (void)t1; (void)t2;
}
#else
#define FASTBN_TOTALS_SIMD 0
#define FASTBN_TOTALS_MAX_RUN 0
#define FASTBN_GRAD_TOTALS_MAX_RUN 0
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

#ifndef FASTBN_HALF_TOTALS
/* Never called: FASTBN_HALF_TOTALS tells the caller to stage half runs (the AVX2 and
   AVX-512BW builds have the functions above; the others, these). */
#define FASTBN_HALF_TOTALS 0
static inline void fastbn_moment_totals_half(int bfloat, const void *src, Py_ssize_t n,
                                             double shift, double *t1, double *t2) {
    (void)bfloat; (void)src; (void)n; (void)shift; (void)t1; (void)t2;
}
static inline void fastbn_grad_totals_half(int bfloat, int relu, const void *dy, const void *out,
                                           const void *x, Py_ssize_t n, double center,
                                           double *t1, double *t2) {
    (void)bfloat; (void)relu; (void)dy; (void)out; (void)x; (void)n; (void)center;
    (void)t1; (void)t2;
}
static inline void fastbn_grad_totals_half_dx(int bfloat, int relu, const void *dy,
                                              const void *out, const void *x, Py_ssize_t n,
                                              double center, float scale, void *dx,
                                              double *t1, double *t2) {
    (void)bfloat; (void)relu; (void)dy; (void)out; (void)x; (void)n; (void)center;
    (void)scale; (void)dx; (void)t1; (void)t2;
}
#endif

#endif /* FASTBN_SIMD_REDUCE_H */
