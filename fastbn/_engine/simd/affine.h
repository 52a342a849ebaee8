/* The elementwise affine maps written with intrinsics: the forward's over half runs and rows
 * and over float32 runs with streaming stores, and the backward's over half runs and rows.
 *
 * Part of fastbn's kernels (declared to Cython in fastbn/_engine/storage.pxi).  Each must give
 * the bits of a Cython loop of fastbn/_engine/loops.pxi (affine_run, grad_input_run,
 * affine_row, grad_input_row) on the widened data, each value rounded to the half type:
 * tests/test_float16.py,
 * tests/test_bfloat16.py and tests/test_kernels.py check it at every SIMD level this CPU runs.
 *
 *   fastbn_affine_half      y = act((x * factor - center) * scale + shift) over a half run;
 *                           FASTBN_HALF_AFFINE says whether this build has it (else the
 *                           caller stages the run through float32 blocks)
 *   fastbn_affine_stream    the same map over a float32 run, written with streaming stores
 *                           (past the caches) for outputs too large to stay in them;
 *                           FASTBN_STREAM_AFFINE says whether this build has it; each
 *                           thread's share of runs ends with fastbn_stream_fence
 *   fastbn_affine_row_stream  affine_row over a float32 row so written (the same builds)
 *   fastbn_grad_input_half  the backward's map, dx = gain * (g + (x * factor - center) *
 *                           scale + shift) with g the gated gradient, over a half run
 *                           (grad_input_run's bits), in the builds of fastbn_affine_half
 *   fastbn_affine_half_row  the forward's map over a row of half data, every column with its
 *                           own coefficients (affine_row's bits), in the same builds
 *   fastbn_grad_input_half_row  the backward's map over such a row (grad_input_row's bits)
 *   fastbn_affine_rows4     affine_row over four float32 rows at once, each column's
 *   fastbn_grad_input_rows4 coefficients loaded once for the four, and grad_input_row
 *                           likewise (FASTBN_ROWS_AFFINE says whether this build has them)
 */
#ifndef FASTBN_SIMD_AFFINE_H
#define FASTBN_SIMD_AFFINE_H

#include "convert.h"

/* The affine map of a run of half data with one channel's coefficients, conversions in
   registers: y = act((x * factor - center) * scale + shift), rounded to the half type.
   Only where the compiler contracts the float32 loop (affine_run) into the same two fused
   multiply-adds -- the FMA builds -- so that every value is the float32 loop's, bit for bit
   (tests/test_bfloat16.py checks it at every level); elsewhere the run is staged. */
#if defined(__FMA__) && (defined(__AVX2__) || defined(__AVX512F__))
#define FASTBN_HALF_AFFINE 1
FASTBN_RUN_FUNCTION void fastbn_affine_half(int bfloat, int relu, const void *src, void *dst,
                                      Py_ssize_t n, float factor, float center, float scale,
                                      float shift) {
    const uint16_t *s = (const uint16_t *)src;
    uint16_t *d = (uint16_t *)dst;
    Py_ssize_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    {
        const __m512 f = _mm512_set1_ps(factor), c = _mm512_set1_ps(center);
        const __m512 k = _mm512_set1_ps(scale), b = _mm512_set1_ps(shift), zero = _mm512_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            __m512 z = _mm512_fmadd_ps(_mm512_fmsub_ps(fastbn_load16(bfloat, s + i), f, c), k, b);
            if (relu)  /* torch's ReLU: 0 where z < 0; NaN and -0.0 pass */
                z = _mm512_mask_mov_ps(z, _mm512_cmp_ps_mask(z, zero, _CMP_LT_OQ), zero);
            fastbn_store16(bfloat, d + i, z);
        }
    }
#endif
    {
        const __m256 f = _mm256_set1_ps(factor), c = _mm256_set1_ps(center);
        const __m256 k = _mm256_set1_ps(scale), b = _mm256_set1_ps(shift), zero = _mm256_setzero_ps();
        for (; i + 16 <= n; i += 16) {  /* (sixteen a step: bfloat16 packs them at once) */
            __m256 z0 = _mm256_fmadd_ps(_mm256_fmsub_ps(fastbn_load8(bfloat, s + i), f, c), k, b);
            __m256 z1 = _mm256_fmadd_ps(_mm256_fmsub_ps(fastbn_load8(bfloat, s + i + 8), f, c), k, b);
            if (relu) {
                z0 = _mm256_blendv_ps(z0, zero, _mm256_cmp_ps(z0, zero, _CMP_LT_OQ));
                z1 = _mm256_blendv_ps(z1, zero, _mm256_cmp_ps(z1, zero, _CMP_LT_OQ));
            }
            fastbn_store8x2(bfloat, d + i, z0, z1);
        }
        for (; i + 8 <= n; i += 8) {
            __m256 z = _mm256_fmadd_ps(_mm256_fmsub_ps(fastbn_load8(bfloat, s + i), f, c), k, b);
            if (relu)
                z = _mm256_blendv_ps(z, zero, _mm256_cmp_ps(z, zero, _CMP_LT_OQ));
            fastbn_store8(bfloat, d + i, z);
        }
    }
    for (; i < n; i++) {
        float z = fmaf(fmaf(fastbn_widen1(bfloat, s[i]), factor, -center), scale, shift);
        if (relu && z < 0.0f)
            z = 0.0f;
        d[i] = fastbn_narrow1(bfloat, z);
    }
}
/* affine_row (fastbn/_engine/loops.pxi) on a row of half data whose columns have coefficients
   of their own (the columns layout), conversions in registers: the compiled loop's operations,
   which the FMA builds contract into t = fma(x, factor, -center) -- t = x - center where
   factor is NULL (all ones), which that fma with a factor of 1 would give exactly -- then
   fma(t, scale, shift), so the float32 loop's bits, each rounded to the half type. */
static inline __m256 fastbn_affine_row8(int relu, __m256 x, const float *factor,
                                        const float *center, const float *scale,
                                        const float *shift) {
    /* eight columns (the pointers at the first) */
    const __m256 c = _mm256_loadu_ps(center), zero = _mm256_setzero_ps();
    __m256 t = factor != NULL ? _mm256_fmsub_ps(x, _mm256_loadu_ps(factor), c) : _mm256_sub_ps(x, c);
    __m256 z = _mm256_fmadd_ps(t, _mm256_loadu_ps(scale), _mm256_loadu_ps(shift));
    return relu ? _mm256_blendv_ps(z, zero, _mm256_cmp_ps(z, zero, _CMP_LT_OQ)) : z;
}
FASTBN_RUN_FUNCTION void fastbn_affine_half_row(int bfloat, int relu, const void *src, void *dst,
                                                Py_ssize_t n, const float *factor,
                                                const float *center, const float *scale,
                                                const float *shift) {
    const uint16_t *s = (const uint16_t *)src;
    uint16_t *d = (uint16_t *)dst;
    Py_ssize_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    {
        const __m512 zero = _mm512_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            const __m512 x = fastbn_load16(bfloat, s + i), c = _mm512_loadu_ps(center + i);
            __m512 t = factor != NULL ? _mm512_fmsub_ps(x, _mm512_loadu_ps(factor + i), c)
                                      : _mm512_sub_ps(x, c);
            __m512 z = _mm512_fmadd_ps(t, _mm512_loadu_ps(scale + i), _mm512_loadu_ps(shift + i));
            if (relu)  /* torch's ReLU: 0 where z < 0; NaN and -0.0 pass */
                z = _mm512_mask_mov_ps(z, _mm512_cmp_ps_mask(z, zero, _CMP_LT_OQ), zero);
            fastbn_store16(bfloat, d + i, z);
        }
    }
#endif
    for (; i + 16 <= n; i += 16)  /* (sixteen a step: bfloat16 packs them at once) */
        fastbn_store8x2(bfloat, d + i,
                        fastbn_affine_row8(relu, fastbn_load8(bfloat, s + i),
                                           factor != NULL ? factor + i : NULL, center + i,
                                           scale + i, shift + i),
                        fastbn_affine_row8(relu, fastbn_load8(bfloat, s + i + 8),
                                           factor != NULL ? factor + i + 8 : NULL, center + i + 8,
                                           scale + i + 8, shift + i + 8));
    for (; i + 8 <= n; i += 8)
        fastbn_store8(bfloat, d + i, fastbn_affine_row8(relu, fastbn_load8(bfloat, s + i),
                                                        factor != NULL ? factor + i : NULL,
                                                        center + i, scale + i, shift + i));
    for (; i < n; i++) {
        float x = fastbn_widen1(bfloat, s[i]);
        float z = fmaf(factor != NULL ? fmaf(x, factor[i], -center[i]) : x - center[i], scale[i],
                       shift[i]);
        if (relu && z < 0.0f)
            z = 0.0f;
        d[i] = fastbn_narrow1(bfloat, z);
    }
}
/* grad_input_run (fastbn/_engine/loops.pxi) on a half run with one channel's coefficients,
   conversions in registers: dx = gain * ((g + (x * factor - center) * scale) + shift), g being
   dy gated by the activation (ReLU: dy where out is not <= 0, else +0.0, as gate does), which
   the FMA builds compile to t = fma(x, factor, -center), u = fma(t, scale, g), then
   gain * (u + shift): the same operations here, so the float32 loop's bits on the widened
   run, each rounded to the half type (the half tests compare the two at every level). */
FASTBN_RUN_FUNCTION void fastbn_grad_input_half(int bfloat, int relu, const void *dy, const void *out,
                                          const void *x, void *dx, Py_ssize_t n, float gain,
                                          float factor, float center, float scale, float shift) {
    const uint16_t *g = (const uint16_t *)dy, *o = (const uint16_t *)out, *s = (const uint16_t *)x;
    uint16_t *d = (uint16_t *)dx;
    Py_ssize_t i = 0;
    const __m256 a = _mm256_set1_ps(gain), f = _mm256_set1_ps(factor), c = _mm256_set1_ps(center);
    const __m256 k = _mm256_set1_ps(scale), b = _mm256_set1_ps(shift), zero = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {  /* (sixteen a step: bfloat16 packs them at once) */
        __m256 v0 = fastbn_load8(bfloat, g + i), v1 = fastbn_load8(bfloat, g + i + 8);
        if (relu) {  /* (not out <= 0: NaN outputs pass their gradient, as torch's do) */
            v0 = _mm256_and_ps(_mm256_cmp_ps(fastbn_load8(bfloat, o + i), zero, _CMP_NLE_UQ), v0);
            v1 = _mm256_and_ps(_mm256_cmp_ps(fastbn_load8(bfloat, o + i + 8), zero, _CMP_NLE_UQ), v1);
        }
        v0 = _mm256_fmadd_ps(_mm256_fmsub_ps(fastbn_load8(bfloat, s + i), f, c), k, v0);
        v1 = _mm256_fmadd_ps(_mm256_fmsub_ps(fastbn_load8(bfloat, s + i + 8), f, c), k, v1);
        fastbn_store8x2(bfloat, d + i, _mm256_mul_ps(a, _mm256_add_ps(v0, b)),
                        _mm256_mul_ps(a, _mm256_add_ps(v1, b)));
    }
    for (; i + 8 <= n; i += 8) {
        __m256 v = fastbn_load8(bfloat, g + i);
        if (relu)
            v = _mm256_and_ps(_mm256_cmp_ps(fastbn_load8(bfloat, o + i), zero, _CMP_NLE_UQ), v);
        v = _mm256_fmadd_ps(_mm256_fmsub_ps(fastbn_load8(bfloat, s + i), f, c), k, v);
        fastbn_store8(bfloat, d + i, _mm256_mul_ps(a, _mm256_add_ps(v, b)));
    }
    for (; i < n; i++) {
        float v = fastbn_widen1(bfloat, g[i]);
        if (relu && fastbn_widen1(bfloat, o[i]) <= 0.0f)  /* (+0.0, as gate gives) */
            v = 0.0f;
        d[i] = fastbn_narrow1(bfloat, gain * (fmaf(fmaf(fastbn_widen1(bfloat, s[i]), factor, -center), scale, v) + shift));
    }
}
/* grad_input_row (fastbn/_engine/loops.pxi) on a row of half data whose columns have
   coefficients of their own, conversions in registers: fastbn_grad_input_half's operations
   (t as in fastbn_affine_half_row), so the float32 loop's bits, each rounded. */
static inline __m256 fastbn_grad_input_row8(int relu, __m256 g, __m256 o, __m256 x,
                                            const float *gain, const float *factor,
                                            const float *center, const float *scale,
                                            const float *shift) {
    /* eight columns (the pointers at the first); o is read only for ReLU */
    const __m256 c = _mm256_loadu_ps(center);
    __m256 t = factor != NULL ? _mm256_fmsub_ps(x, _mm256_loadu_ps(factor), c) : _mm256_sub_ps(x, c);
    if (relu)  /* (not out <= 0: NaN outputs pass their gradient, as torch's do) */
        g = _mm256_and_ps(_mm256_cmp_ps(o, _mm256_setzero_ps(), _CMP_NLE_UQ), g);
    return _mm256_mul_ps(_mm256_loadu_ps(gain),
                         _mm256_add_ps(_mm256_fmadd_ps(t, _mm256_loadu_ps(scale), g),
                                       _mm256_loadu_ps(shift)));
}
FASTBN_RUN_FUNCTION void fastbn_grad_input_half_row(int bfloat, int relu, const void *dy,
                                                    const void *out, const void *x, void *dx,
                                                    Py_ssize_t n, const float *gain,
                                                    const float *factor, const float *center,
                                                    const float *scale, const float *shift) {
    const uint16_t *g = (const uint16_t *)dy, *o = (const uint16_t *)out, *s = (const uint16_t *)x;
    uint16_t *d = (uint16_t *)dx;
    const __m256 unused_out = _mm256_setzero_ps();
    Py_ssize_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    for (; i + 16 <= n; i += 16) {
        const __m512 c = _mm512_loadu_ps(center + i), v = fastbn_load16(bfloat, s + i);
        __m512 t = factor != NULL ? _mm512_fmsub_ps(v, _mm512_loadu_ps(factor + i), c)
                                  : _mm512_sub_ps(v, c);
        __m512 w = fastbn_load16(bfloat, g + i);
        if (relu)
            w = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(fastbn_load16(bfloat, o + i),
                                                       _mm512_setzero_ps(), _CMP_NLE_UQ), w);
        fastbn_store16(bfloat, d + i,
                       _mm512_mul_ps(_mm512_loadu_ps(gain + i),
                                     _mm512_add_ps(_mm512_fmadd_ps(t, _mm512_loadu_ps(scale + i), w),
                                                   _mm512_loadu_ps(shift + i))));
    }
#endif
    for (; i + 16 <= n; i += 16)  /* (sixteen a step: bfloat16 packs them at once) */
        fastbn_store8x2(bfloat, d + i,
                        fastbn_grad_input_row8(relu, fastbn_load8(bfloat, g + i),
                                               relu ? fastbn_load8(bfloat, o + i) : unused_out,
                                               fastbn_load8(bfloat, s + i), gain + i,
                                               factor != NULL ? factor + i : NULL, center + i,
                                               scale + i, shift + i),
                        fastbn_grad_input_row8(relu, fastbn_load8(bfloat, g + i + 8),
                                               relu ? fastbn_load8(bfloat, o + i + 8) : unused_out,
                                               fastbn_load8(bfloat, s + i + 8), gain + i + 8,
                                               factor != NULL ? factor + i + 8 : NULL,
                                               center + i + 8, scale + i + 8, shift + i + 8));
    for (; i + 8 <= n; i += 8)
        fastbn_store8(bfloat, d + i,
                      fastbn_grad_input_row8(relu, fastbn_load8(bfloat, g + i),
                                             relu ? fastbn_load8(bfloat, o + i) : unused_out,
                                             fastbn_load8(bfloat, s + i), gain + i,
                                             factor != NULL ? factor + i : NULL, center + i,
                                             scale + i, shift + i));
    for (; i < n; i++) {
        float v = fastbn_widen1(bfloat, g[i]), w = fastbn_widen1(bfloat, s[i]);
        if (relu && fastbn_widen1(bfloat, o[i]) <= 0.0f)  /* (+0.0, as gate gives) */
            v = 0.0f;
        d[i] = fastbn_narrow1(bfloat, gain[i] * (fmaf(factor != NULL ? fmaf(w, factor[i], -center[i])
                                                                     : w - center[i],
                                                      scale[i], v) + shift[i]));
    }
}
#else
#define FASTBN_HALF_AFFINE 0
/* Never called: FASTBN_HALF_AFFINE tells the caller to stage the run. */
static inline void fastbn_affine_half(int bfloat, int relu, const void *src, void *dst,
                                      Py_ssize_t n, float factor, float center, float scale,
                                      float shift) {
    (void)bfloat; (void)relu; (void)src; (void)dst; (void)n;
    (void)factor; (void)center; (void)scale; (void)shift;
}
static inline void fastbn_grad_input_half(int bfloat, int relu, const void *dy, const void *out,
                                          const void *x, void *dx, Py_ssize_t n, float gain,
                                          float factor, float center, float scale, float shift) {
    (void)bfloat; (void)relu; (void)dy; (void)out; (void)x; (void)dx; (void)n;
    (void)gain; (void)factor; (void)center; (void)scale; (void)shift;
}
static inline void fastbn_affine_half_row(int bfloat, int relu, const void *src, void *dst,
                                          Py_ssize_t n, const float *factor, const float *center,
                                          const float *scale, const float *shift) {
    (void)bfloat; (void)relu; (void)src; (void)dst; (void)n;
    (void)factor; (void)center; (void)scale; (void)shift;
}
static inline void fastbn_grad_input_half_row(int bfloat, int relu, const void *dy,
                                              const void *out, const void *x, void *dx,
                                              Py_ssize_t n, const float *gain,
                                              const float *factor, const float *center,
                                              const float *scale, const float *shift) {
    (void)bfloat; (void)relu; (void)dy; (void)out; (void)x; (void)dx; (void)n;
    (void)gain; (void)factor; (void)center; (void)scale; (void)shift;
}
#endif

/* affine_run (fastbn/_engine/loops.pxi) on a float32 run, the results written with streaming
   stores: the same two fused multiply-adds as the FMA builds compile that loop to, so the
   same bits (tests/test_kernels.py compares the two), in 256-bit vectors in the AVX2 and
   AVX-512 builds alike.  A store that bypasses the caches saves the read of the destination
   line that an ordinary store makes (read for ownership): worth it where the output would not
   stay in cache anyway (see _tuning.stream_min_bytes).  Streaming stores are weakly ordered:
   the caller ends each thread's share of runs with fastbn_stream_fence, so the values are
   visible to whatever runs next on any thread.  (A fence after every run drained the
   write-combining buffers each time: runs of 512 B went 5x slower than ordinary stores.) */
#if defined(__FMA__) && defined(__AVX2__)
#define FASTBN_STREAM_AFFINE 1
static inline float fastbn_affine_one(int relu, float x, float factor, float center, float scale,
                                      float shift) {
    float z = fmaf(fmaf(x, factor, -center), scale, shift);
    return (relu && z < 0.0f) ? 0.0f : z;  /* torch's ReLU: NaN and -0.0 pass */
}
static inline void fastbn_affine_stream(int relu, const float *x, float *y, Py_ssize_t n,
                                        float factor, float center, float scale, float shift) {
    Py_ssize_t i = 0;
    const __m256 f = _mm256_set1_ps(factor), c = _mm256_set1_ps(center);
    const __m256 k = _mm256_set1_ps(scale), b = _mm256_set1_ps(shift), zero = _mm256_setzero_ps();
    __m256 z0, z1;
    for (; i < n && ((uintptr_t)(y + i) & 63u) != 0; i++)  /* to a cache line's start */
        y[i] = fastbn_affine_one(relu, x[i], factor, center, scale, shift);
    /* Whole cache lines only: a line that a run shares with its neighbour (or another
       thread's share) is written with ordinary stores by both, never half streamed -- a
       line streamed in part is flushed as a partial write, and runs of 1,028 B went 3x
       slower than with ordinary stores when their lines were split at 32 bytes. */
    for (; i + 16 <= n; i += 16) {
        z0 = _mm256_fmadd_ps(_mm256_fmsub_ps(_mm256_loadu_ps(x + i), f, c), k, b);
        z1 = _mm256_fmadd_ps(_mm256_fmsub_ps(_mm256_loadu_ps(x + i + 8), f, c), k, b);
        if (relu) {
            z0 = _mm256_blendv_ps(z0, zero, _mm256_cmp_ps(z0, zero, _CMP_LT_OQ));
            z1 = _mm256_blendv_ps(z1, zero, _mm256_cmp_ps(z1, zero, _CMP_LT_OQ));
        }
        _mm256_stream_ps(y + i, z0);
        _mm256_stream_ps(y + i + 8, z1);
    }
    for (; i < n; i++)
        y[i] = fastbn_affine_one(relu, x[i], factor, center, scale, shift);
}
/* affine_row (fastbn/_engine/loops.pxi) on a float32 row whose columns have coefficients of
   their own (factor NULL: all ones), written with streaming stores in whole cache lines as
   fastbn_affine_stream writes a run: t = fma(x, factor, -center), or x - center, then
   fma(t, scale, shift), the operations the FMA builds compile affine_row to, so the same bits
   (tests/test_kernels.py compares the two).  For the columns layout's outputs too large for
   the caches (_tuning.stream_min_bytes): in C, one row at a time over (4096, 1024) and
   (8192, 512) went 1.25-1.7x faster than with ordinary stores (benchmarks/RESULTS.md).
   The caller fences each thread's share (fastbn_stream_fence). */
static inline void fastbn_affine_row_stream(int relu, const float *x, float *y, Py_ssize_t n,
                                            const float *factor, const float *center,
                                            const float *scale, const float *shift) {
    Py_ssize_t i = 0;
#define FASTBN_ROW_ONE(i) \
    y[i] = fastbn_affine_one(relu, x[i], factor != NULL ? factor[i] : 1.0f, center[i], \
                             scale[i], shift[i])
    for (; i < n && ((uintptr_t)(y + i) & 63u) != 0; i++)  /* to a cache line's start */
        FASTBN_ROW_ONE(i);
    for (; i + 16 <= n; i += 16) {  /* whole lines only (see fastbn_affine_stream) */
        /* (the half rows' eight-column step, on float32 loaded as it is) */
        const __m256 z0 = fastbn_affine_row8(relu, _mm256_loadu_ps(x + i),
                                             factor != NULL ? factor + i : NULL, center + i,
                                             scale + i, shift + i);
        const __m256 z1 = fastbn_affine_row8(relu, _mm256_loadu_ps(x + i + 8),
                                             factor != NULL ? factor + i + 8 : NULL, center + i + 8,
                                             scale + i + 8, shift + i + 8);
        _mm256_stream_ps(y + i, z0);
        _mm256_stream_ps(y + i + 8, z1);
    }
    for (; i < n; i++)
        FASTBN_ROW_ONE(i);
#undef FASTBN_ROW_ONE
}
static inline void fastbn_stream_fence(void) {
    _mm_sfence();
}
#else
#define FASTBN_STREAM_AFFINE 0
/* Never called (FASTBN_STREAM_AFFINE): the run goes through affine_run. */
static inline void fastbn_affine_stream(int relu, const float *x, float *y, Py_ssize_t n,
                                        float factor, float center, float scale, float shift) {
    (void)relu; (void)x; (void)y; (void)n; (void)factor; (void)center; (void)scale; (void)shift;
}
static inline void fastbn_affine_row_stream(int relu, const float *x, float *y, Py_ssize_t n,
                                            const float *factor, const float *center,
                                            const float *scale, const float *shift) {
    (void)relu; (void)x; (void)y; (void)n; (void)factor; (void)center; (void)scale; (void)shift;
}
static inline void fastbn_stream_fence(void) {
}
#endif

/* affine_row (fastbn/_engine/loops.pxi) over four float32 rows `stride` apart, n columns each:
   the same two fused multiply-adds per value as the FMA builds compile that loop to (t =
   fma(x, factor, -center), or x - center where factor is NULL, then fma(t, scale, shift)),
   so the same bits (tests/test_kernels.py compares the two).  A row pass loads three
   coefficients per value and stores one, which bounds it at about 1.4x a copy of the same
   bytes in cache; here each column's coefficients are loaded once for four rows.

   The loads of a step come before its stores, and the columns are walked in the direction
   in which no load follows a recent store to the same address modulo 4 KiB: the core takes
   such a load for one that depends on the store (4K aliasing) and makes it wait, and four
   rows are four stores a step.  With y a little after x (modulo 4 KiB) an upward walk ran
   1.3-1.6x slower in C than with y elsewhere; walking downward puts every store behind the
   loads still to come.  (Rows a multiple of 4 KiB long, whose four rows share one address
   modulo 4 KiB, are left to one row at a time: _engine/geometry.pxi, rows_by_four.)

   The steps are inlined in every build (FASTBN_ALWAYS_INLINE): called out of line, as the
   compiler left the backward's sixteen-column step in the AVX-512 build, each step of 64
   values paid for a call. */
#if defined(__FMA__) && defined(__AVX2__)
#define FASTBN_ROWS_AFFINE 1
#if defined(__AVX512F__)
FASTBN_ALWAYS_INLINE void fastbn_affine4_step16(int relu, const float *x, float *y,
                                                Py_ssize_t stride, const float *factor,
                                                const float *center,
                                                const float *scale, const float *shift) {
    /* sixteen columns of the four rows (every pointer at the first column) */
    const __m512 c = _mm512_loadu_ps(center), k = _mm512_loadu_ps(scale);
    const __m512 b = _mm512_loadu_ps(shift), zero = _mm512_setzero_ps();
    __m512 v[4];
    int r;
    for (r = 0; r < 4; r++)
        v[r] = _mm512_loadu_ps(x + r * stride);
    if (factor != NULL) {
        const __m512 f = _mm512_loadu_ps(factor);
        for (r = 0; r < 4; r++)
            v[r] = _mm512_fmsub_ps(v[r], f, c);
    } else {
        for (r = 0; r < 4; r++)
            v[r] = _mm512_sub_ps(v[r], c);
    }
    for (r = 0; r < 4; r++) {
        __m512 z = _mm512_fmadd_ps(v[r], k, b);
        if (relu)  /* torch's ReLU: 0 where z < 0; NaN and -0.0 pass */
            z = _mm512_mask_mov_ps(z, _mm512_cmp_ps_mask(z, zero, _CMP_LT_OQ), zero);
        _mm512_storeu_ps(y + r * stride, z);
    }
}
#endif
FASTBN_ALWAYS_INLINE void fastbn_affine4_step8(int relu, const float *x, float *y,
                                               Py_ssize_t stride, const float *factor,
                                               const float *center,
                                               const float *scale, const float *shift) {
    /* eight columns of the four rows */
    const __m256 c = _mm256_loadu_ps(center), k = _mm256_loadu_ps(scale);
    const __m256 b = _mm256_loadu_ps(shift), zero = _mm256_setzero_ps();
    __m256 v[4];
    int r;
    for (r = 0; r < 4; r++)
        v[r] = _mm256_loadu_ps(x + r * stride);
    if (factor != NULL) {
        const __m256 f = _mm256_loadu_ps(factor);
        for (r = 0; r < 4; r++)
            v[r] = _mm256_fmsub_ps(v[r], f, c);
    } else {
        for (r = 0; r < 4; r++)
            v[r] = _mm256_sub_ps(v[r], c);
    }
    for (r = 0; r < 4; r++) {
        __m256 z = _mm256_fmadd_ps(v[r], k, b);
        if (relu)
            z = _mm256_blendv_ps(z, zero, _mm256_cmp_ps(z, zero, _CMP_LT_OQ));
        _mm256_storeu_ps(y + r * stride, z);
    }
}
static inline int fastbn_just_behind(const void *store, const void *load) {
    /* whether `store` lies a little after `load` modulo 4 KiB: walking upward, the loads
       would meet the stores just made */
    const uintptr_t apart = ((uintptr_t)store - (uintptr_t)load) & 4095u;
    return apart != 0 && apart < 2048;
}
FASTBN_ALWAYS_INLINE void fastbn_affine4_step1(int relu, const float *x, float *y,
                                               Py_ssize_t stride, const float *factor,
                                               const float *center,
                                               const float *scale, const float *shift) {
    /* one column of the four rows */
    int r;
    for (r = 0; r < 4; r++)
        y[r * stride] = fastbn_affine_one(relu, x[r * stride], factor != NULL ? *factor : 1.0f,
                                          *center, *scale, *shift);
}
/* the widest step of this build */
#if defined(__AVX512F__)
#define FASTBN_ROWS4_WIDE 16
#define FASTBN_ROWS4_WIDE_STEP fastbn_affine4_step16
#define FASTBN_GRAD4_WIDE_STEP fastbn_grad4_step16
#else
#define FASTBN_ROWS4_WIDE 8
#define FASTBN_ROWS4_WIDE_STEP fastbn_affine4_step8
#define FASTBN_GRAD4_WIDE_STEP fastbn_grad4_step8
#endif
/* The walk of a four-row pass over its columns [0, n): the widest steps over [0, wide), the
   eight-column step (AVX-512 builds: at most one) over [wide, eight), single columns over the
   rest; upward, or where `upward` is 0 downward (the same values, the stores behind the loads
   still to come).  at(step, i) runs a step at column i. */
#define FASTBN_ROWS4_WALK(upward, n, at, wide_step, step8, step1) \
    do { \
        const Py_ssize_t wide_ = (n) - (n) % FASTBN_ROWS4_WIDE, eight_ = (n) - (n) % 8; \
        Py_ssize_t i_; \
        if (upward) { \
            for (i_ = 0; i_ < wide_; i_ += FASTBN_ROWS4_WIDE) \
                at(wide_step, i_); \
            for (i_ = wide_; i_ < eight_; i_ += 8) \
                at(step8, i_); \
            for (i_ = eight_; i_ < (n); i_++) \
                at(step1, i_); \
        } else { \
            for (i_ = (n) - 1; i_ >= eight_; i_--) \
                at(step1, i_); \
            for (i_ = eight_ - 8; i_ >= wide_; i_ -= 8) \
                at(step8, i_); \
            for (i_ = wide_ - FASTBN_ROWS4_WIDE; i_ >= 0; i_ -= FASTBN_ROWS4_WIDE) \
                at(wide_step, i_); \
        } \
    } while (0)
static inline void fastbn_affine_rows4(int relu, const float *x, float *y, Py_ssize_t stride,
                                       Py_ssize_t n, const float *factor, const float *center,
                                       const float *scale, const float *shift) {
/* (factor NULL stays NULL: a pointer past it is never formed) */
#define FASTBN_AFFINE4_AT(step, i) \
    step(relu, x + (i), y + (i), stride, factor != NULL ? factor + (i) : NULL, center + (i), \
         scale + (i), shift + (i))
    /* upward unless y lies a little after x */
    FASTBN_ROWS4_WALK(!fastbn_just_behind(y, x), n, FASTBN_AFFINE4_AT, FASTBN_ROWS4_WIDE_STEP,
                      fastbn_affine4_step8, fastbn_affine4_step1);
#undef FASTBN_AFFINE4_AT
}
/* grad_input_row (fastbn/_engine/loops.pxi) over four float32 rows likewise: t as in
   fastbn_affine_rows4, then gain * (fma(t, scale, g) + shift), g being dy gated by the
   activation (ReLU: +0.0 where out <= 0, as gate gives), the operations the FMA builds
   compile that loop to (see fastbn_grad_input_row8), so the same bits.  Its inputs (dy, x
   and, with ReLU, out) may each lie anywhere from dx modulo 4 KiB: the columns go the way
   that leaves the fewer of them just behind dx's stores. */
#if defined(__AVX512F__)
FASTBN_ALWAYS_INLINE void fastbn_grad4_step16(int relu, const float *dy, const float *out,
                                              const float *x, float *dx, Py_ssize_t stride,
                                              const float *gain, const float *factor,
                                              const float *center, const float *scale,
                                              const float *shift) {
    /* sixteen columns of the four rows (every pointer at the first column) */
    const __m512 c = _mm512_loadu_ps(center), k = _mm512_loadu_ps(scale);
    const __m512 b = _mm512_loadu_ps(shift), a = _mm512_loadu_ps(gain);
    __m512 t[4], g[4];
    int r;
    for (r = 0; r < 4; r++) {
        t[r] = _mm512_loadu_ps(x + r * stride);
        g[r] = _mm512_loadu_ps(dy + r * stride);
        if (relu)  /* (not out <= 0: NaN outputs pass their gradient, as torch's do) */
            g[r] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_loadu_ps(out + r * stride),
                                                          _mm512_setzero_ps(), _CMP_NLE_UQ), g[r]);
    }
    if (factor != NULL) {
        const __m512 f = _mm512_loadu_ps(factor);
        for (r = 0; r < 4; r++)
            t[r] = _mm512_fmsub_ps(t[r], f, c);
    } else {
        for (r = 0; r < 4; r++)
            t[r] = _mm512_sub_ps(t[r], c);
    }
    for (r = 0; r < 4; r++)
        _mm512_storeu_ps(dx + r * stride,
                         _mm512_mul_ps(a, _mm512_add_ps(_mm512_fmadd_ps(t[r], k, g[r]), b)));
}
#endif
FASTBN_ALWAYS_INLINE void fastbn_grad4_step8(int relu, const float *dy, const float *out,
                                             const float *x, float *dx, Py_ssize_t stride,
                                             const float *gain, const float *factor,
                                             const float *center, const float *scale,
                                             const float *shift) {
    /* eight columns of the four rows */
    const __m256 c = _mm256_loadu_ps(center), k = _mm256_loadu_ps(scale);
    const __m256 b = _mm256_loadu_ps(shift), a = _mm256_loadu_ps(gain);
    __m256 t[4], g[4];
    int r;
    for (r = 0; r < 4; r++) {
        t[r] = _mm256_loadu_ps(x + r * stride);
        g[r] = _mm256_loadu_ps(dy + r * stride);
        if (relu)
            g[r] = _mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(out + r * stride),
                                               _mm256_setzero_ps(), _CMP_NLE_UQ), g[r]);
    }
    if (factor != NULL) {
        const __m256 f = _mm256_loadu_ps(factor);
        for (r = 0; r < 4; r++)
            t[r] = _mm256_fmsub_ps(t[r], f, c);
    } else {
        for (r = 0; r < 4; r++)
            t[r] = _mm256_sub_ps(t[r], c);
    }
    for (r = 0; r < 4; r++)
        _mm256_storeu_ps(dx + r * stride,
                         _mm256_mul_ps(a, _mm256_add_ps(_mm256_fmadd_ps(t[r], k, g[r]), b)));
}
FASTBN_ALWAYS_INLINE void fastbn_grad4_step1(int relu, const float *dy, const float *out,
                                             const float *x, float *dx, Py_ssize_t stride,
                                             const float *gain, const float *factor,
                                             const float *center, const float *scale,
                                             const float *shift) {
    /* one column of the four rows */
    int r;
    for (r = 0; r < 4; r++) {
        float g = dy[r * stride];
        float t = factor != NULL ? fmaf(x[r * stride], *factor, -*center) : x[r * stride] - *center;
        if (relu && out[r * stride] <= 0.0f)  /* (+0.0, as gate gives; NaN outputs pass) */
            g = 0.0f;
        dx[r * stride] = *gain * (fmaf(t, *scale, g) + *shift);
    }
}
static inline void fastbn_grad_input_rows4(int relu, const float *dy, const float *out,
                                           const float *x, float *dx, Py_ssize_t stride,
                                           Py_ssize_t n, const float *gain,
                                           const float *factor, const float *center,
                                           const float *scale, const float *shift) {
/* (out, read only with ReLU, and factor NULL stay as they are: no pointer past them formed) */
#define FASTBN_GRAD4_AT(step, i) \
    step(relu, dy + (i), relu ? out + (i) : out, x + (i), dx + (i), stride, gain + (i), \
         factor != NULL ? factor + (i) : NULL, center + (i), scale + (i), shift + (i))
    const int upward_waits = fastbn_just_behind(dx, x) + fastbn_just_behind(dx, dy)
                             + (relu && fastbn_just_behind(dx, out));
    const int downward_waits = fastbn_just_behind(x, dx) + fastbn_just_behind(dy, dx)
                               + (relu && fastbn_just_behind(out, dx));
    FASTBN_ROWS4_WALK(upward_waits <= downward_waits, n, FASTBN_GRAD4_AT, FASTBN_GRAD4_WIDE_STEP,
                      fastbn_grad4_step8, fastbn_grad4_step1);
#undef FASTBN_GRAD4_AT
}
#else
#define FASTBN_ROWS_AFFINE 0
/* Never called (FASTBN_ROWS_AFFINE): the rows go through affine_row and grad_input_row one
   by one. */
static inline void fastbn_grad_input_rows4(int relu, const float *dy, const float *out,
                                           const float *x, float *dx, Py_ssize_t stride,
                                           Py_ssize_t n, const float *gain,
                                           const float *factor, const float *center,
                                           const float *scale, const float *shift) {
    (void)relu; (void)dy; (void)out; (void)x; (void)dx; (void)stride; (void)n; (void)gain;
    (void)factor; (void)center; (void)scale; (void)shift;
}
static inline void fastbn_affine_rows4(int relu, const float *x, float *y, Py_ssize_t stride,
                                       Py_ssize_t n, const float *factor, const float *center,
                                       const float *scale, const float *shift) {
    (void)relu; (void)x; (void)y; (void)stride; (void)n; (void)factor; (void)center;
    (void)scale; (void)shift;
}
#endif

#endif /* FASTBN_SIMD_AFFINE_H */
