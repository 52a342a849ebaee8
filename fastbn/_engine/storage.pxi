# Storage types and conversion.  Data is stored as float32, float64, float16 or bfloat16; it is
# computed in `real`, float32 for all but float64.  Half storages (float16, bfloat16) are never
# copied whole into float32: the passes widen small blocks into buffers on the stack, run the
# float32 loops on them and narrow their results (see staging.pxi), so every half result is
# the float32 path's on the widened data, rounded to nearest even.

from libc.stdint cimport uint16_t

cdef struct half:
    # IEEE 754 binary16 (numpy's float16), as its bits
    uint16_t bits

cdef struct bfloat:
    # bfloat16 (ml_dtypes.bfloat16, torch.bfloat16): the high 16 bits of a float32
    uint16_t bits

# The storage types, and the types computed in.  Only the pairs (float, float), (double,
# double), (half, float) and (bfloat, float) are ever instantiated: Cython emits only the
# specialisations a call reaches, and the dispatcher (dispatch.pxi) reaches only these.
ctypedef fused storage:
    float
    double
    half
    bfloat

ctypedef fused real:
    float
    double


cdef enum:
    # Values per staging block: a few float32 buffers of this many values stay in L1.  A
    # multiple of LANES, so that a run fed to the lane sums block by block sums in one order.
    # Short blocks where a pass writes, so that narrowing one block overlaps widening the next
    # in the core's out-of-order window (2048-value blocks made float16 eval 4x slower); long
    # ones where it only reads, so that the lane sums are loaded and stored seldom.
    STAGE = 256
    STAGE_READ = 2048
    # Rows of a column tile staged at once (a multiple of four: tile_moments_rows' sweep).
    STAGE_ROWS = 16


cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>
    #if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
    #include <immintrin.h>
    #endif
    #if defined(__F16C__)
    #define FASTBN_HALF_SIMD 1
    #else
    #define FASTBN_HALF_SIMD 0
    #endif

    /* float16 <-> float32 without F16C: exact, round to nearest even (numpy's conversions,
       bit for bit; NaN stays NaN with its sign and the top bits of its payload, quieted). */
    static inline float fastbn_half_to_float_soft(uint16_t h) {
        uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
        if (exponent == 0x1fu) {
            bits = sign | 0x7f800000u | (mantissa << 13);
        } else if (exponent != 0) {
            bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
        } else {
            float magnitude = (float)mantissa * 5.9604644775390625e-8f;  /* mantissa * 2**-24, exact */
            memcpy(&bits, &magnitude, sizeof bits);
            bits |= sign;
        }
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    static inline uint16_t fastbn_float_to_half_soft(float f) {
        uint32_t x, ax, sign, e, m, shift, rest, halfway, h;
        memcpy(&x, &f, sizeof x);
        sign = (x >> 16) & 0x8000u;
        ax = x & 0x7fffffffu;
        if (ax >= 0x7f800000u) {  /* inf, NaN */
            return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
        }
        if (ax >= 0x477ff000u)    /* rounds to 65536 or more: inf */
            return (uint16_t)(sign | 0x7c00u);
        if (ax >= 0x38800000u) {  /* a normal half: drop 13 bits, to nearest even */
            h = (ax - 0x38000000u) >> 13;
            rest = ax & 0x1fffu;
            h += (rest > 0x1000u) | ((rest == 0x1000u) & (h & 1u));
            return (uint16_t)(sign | h);
        }
        if (ax <= 0x33000000u)    /* at most 2**-25, half the smallest subnormal: zero */
            return (uint16_t)sign;
        e = ax >> 23;             /* a subnormal half: mantissa * 2**(e - 150) in units of 2**-24 */
        m = (ax & 0x7fffffu) | 0x800000u;
        shift = 126u - e;         /* 14 to 24 */
        h = m >> shift;
        rest = m & ((1u << shift) - 1u);
        halfway = 1u << (shift - 1u);
        h += (rest > halfway) | ((rest == halfway) & (h & 1u));
        return (uint16_t)(sign | h);
    }

    static inline void fastbn_widen_half(const void *src, float *dst, Py_ssize_t n) {
        const uint16_t *s = (const uint16_t *)src;
        Py_ssize_t i = 0;
    #if FASTBN_HALF_SIMD
    #if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
    #endif
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
        for (; i < n; i++)
            dst[i] = _cvtsh_ss(s[i]);
    #else
        for (; i < n; i++)
            dst[i] = fastbn_half_to_float_soft(s[i]);
    #endif
    }
    static inline void fastbn_narrow_half(const float *src, void *dst, Py_ssize_t n) {
        uint16_t *d = (uint16_t *)dst;
        Py_ssize_t i = 0;
    #if FASTBN_HALF_SIMD
    #if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)(d + i),
                                _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    #endif
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(d + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++)
            d[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
    #else
        for (; i < n; i++)
            d[i] = fastbn_float_to_half_soft(src[i]);
    #endif
    }

    /* bfloat16 <-> float32 with integer arithmetic.  Widening is exact (a shift).  Narrowing
       rounds to nearest even, as torch and ml_dtypes do, denormals included; NaN stays NaN
       (quieted, sign kept).  AVX-512 and AVX2 builds do 16 or 8 values a step with the same integer
       operations (the compiler's own vectorisation of the scalar loop is several times slower:
       it packs 32-bit lanes to 16 with permutes).  AVX512-BF16's VCVTNEPS2BF16 is not used: it
       flushes denormal inputs to zero, so its results would differ from these, and from
       torch's, on such values. */
    static inline uint16_t fastbn_float_to_bfloat_soft(uint32_t x) {
        uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
        return (uint16_t)((x & 0x7fffffffu) > 0x7f800000u ? (x >> 16) | 0x40u : rounded);
    }
    #if defined(__AVX512F__) && defined(__AVX512BW__)
    /* 16 float32 bit patterns rounded to bfloat16 (the scalar function's arithmetic). */
    static inline __m256i fastbn_bfloat_round16(__m512i x) {
        __m512i high = _mm512_srli_epi32(x, 16);
        __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)),
                                                             _mm512_and_si512(high, _mm512_set1_epi32(1))), 16);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
        return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40))));
    }
    #endif
    #if defined(__AVX2__)
    /* 8 float32 bit patterns rounded to bfloat16. */
    static inline __m128i fastbn_bfloat_round8(__m256i x) {
        __m256i high = _mm256_srli_epi32(x, 16);
        __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)),
                                                             _mm256_and_si256(high, _mm256_set1_epi32(1))), 16);
        /* (magnitudes are non-negative as int32: a signed compare is the unsigned one) */
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
        __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(high, _mm256_set1_epi32(0x40)), nan);
        /* each lane < 2**16: packing with unsigned saturation keeps it */
        return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    }
    #endif
    static inline void fastbn_widen_bfloat(const void *src, float *dst, Py_ssize_t n) {
        const uint16_t *s = (const uint16_t *)src;
        Py_ssize_t i = 0;
    #if defined(__AVX512F__) && defined(__AVX512BW__)
        for (; i + 16 <= n; i += 16) {
            __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i)));
            _mm512_storeu_si512((void *)(dst + i), _mm512_slli_epi32(w, 16));
        }
    #endif
    #if defined(__AVX2__)
        for (; i + 8 <= n; i += 8) {
            __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
            _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(w, 16));
        }
    #endif
        for (; i < n; i++) {
            uint32_t bits = (uint32_t)s[i] << 16;
            memcpy(dst + i, &bits, sizeof bits);
        }
    }
    static inline void fastbn_narrow_bfloat(const float *src, void *dst, Py_ssize_t n) {
        uint16_t *d = (uint16_t *)dst;
        Py_ssize_t i = 0;
    #if defined(__AVX512F__) && defined(__AVX512BW__)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)(d + i), fastbn_bfloat_round16(_mm512_loadu_si512((const void *)(src + i))));
    #endif
    #if defined(__AVX2__)
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(d + i), fastbn_bfloat_round8(_mm256_loadu_si256((const __m256i *)(src + i))));
    #endif
        for (; i < n; i++) {
            uint32_t x;
            memcpy(&x, src + i, sizeof x);
            d[i] = fastbn_float_to_bfloat_soft(x);
        }
    }

    /* The affine map of a run of half data with one channel's coefficients, conversions in
       registers: y = act((x * factor - center) * scale + shift), rounded to the half type.
       Only where the compiler contracts the float32 loop (affine_run) into the same two fused
       multiply-adds -- the FMA builds -- so that every value is the float32 loop's, bit for bit
       (tests/test_bfloat16.py checks it at every level); elsewhere the run is staged. */
    #if defined(__FMA__) && (defined(__AVX2__) || defined(__AVX512F__))
    #define FASTBN_HALF_AFFINE 1
    #if defined(__AVX512F__) && defined(__AVX512BW__)
    static inline __m512 fastbn_load16(int bfloat, const uint16_t *s) {
        __m256i h = _mm256_loadu_si256((const __m256i *)s);
        if (bfloat)
            return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        return _mm512_cvtph_ps(h);
    }
    static inline void fastbn_store16(int bfloat, uint16_t *d, __m512 v) {
        if (bfloat)
            _mm256_storeu_si256((__m256i *)d, fastbn_bfloat_round16(_mm512_castps_si512(v)));
        else
            _mm256_storeu_si256((__m256i *)d, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    #endif
    static inline __m256 fastbn_load8(int bfloat, const uint16_t *s) {
        __m128i h = _mm_loadu_si128((const __m128i *)s);
        if (bfloat)
            return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        return _mm256_cvtph_ps(h);
    }
    static inline void fastbn_store8(int bfloat, uint16_t *d, __m256 v) {
        if (bfloat)
            _mm_storeu_si128((__m128i *)d, fastbn_bfloat_round8(_mm256_castps_si256(v)));
        else
            _mm_storeu_si128((__m128i *)d, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    static inline void fastbn_affine_half(int bfloat, int relu, const void *src, void *dst,
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
            for (; i + 8 <= n; i += 8) {
                __m256 z = _mm256_fmadd_ps(_mm256_fmsub_ps(fastbn_load8(bfloat, s + i), f, c), k, b);
                if (relu)
                    z = _mm256_blendv_ps(z, zero, _mm256_cmp_ps(z, zero, _CMP_LT_OQ));
                fastbn_store8(bfloat, d + i, z);
            }
        }
        for (; i < n; i++) {
            float v, z;
            if (bfloat)
                fastbn_widen_bfloat(s + i, &v, 1);
            else
                fastbn_widen_half(s + i, &v, 1);
            z = fmaf(fmaf(v, factor, -center), scale, shift);
            if (relu && z < 0.0f)
                z = 0.0f;
            if (bfloat)
                fastbn_narrow_bfloat(&z, d + i, 1);
            else
                fastbn_narrow_half(&z, d + i, 1);
        }
    }

    #if defined(__AVX512F__) && defined(__AVX512BW__)
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
    /* Never called (FASTBN_HALF_LANES): the run is staged. */
    static inline void fastbn_moment_lanes_half(int bfloat, const void *src, Py_ssize_t n,
                                                double shift, double *s1, double *s2) {
        (void)bfloat; (void)src; (void)n; (void)shift; (void)s1; (void)s2;
    }
    #endif
    #else
    #define FASTBN_HALF_AFFINE 0
    #define FASTBN_HALF_LANES 0
    /* Never called: FASTBN_HALF_AFFINE and FASTBN_HALF_LANES tell the caller to stage the run. */
    static inline void fastbn_moment_lanes_half(int bfloat, const void *src, Py_ssize_t n,
                                                double shift, double *s1, double *s2) {
        (void)bfloat; (void)src; (void)n; (void)shift; (void)s1; (void)s2;
    }
    static inline void fastbn_affine_half(int bfloat, int relu, const void *src, void *dst,
                                          Py_ssize_t n, float factor, float center, float scale,
                                          float shift) {
        (void)bfloat; (void)relu; (void)src; (void)dst; (void)n;
        (void)factor; (void)center; (void)scale; (void)shift;
    }
    #endif
    """
    bint HALF_SIMD "FASTBN_HALF_SIMD"
    bint HALF_AFFINE "FASTBN_HALF_AFFINE"
    bint HALF_LANES "FASTBN_HALF_LANES"
    void moment_lanes_half "fastbn_moment_lanes_half"(int bfloat, const void* src, Py_ssize_t n,
                                                      double shift, double* s1,
                                                      double* s2) noexcept nogil
    void affine_half "fastbn_affine_half"(int bfloat, int relu, const void* src, void* dst,
                                          Py_ssize_t n, float factor, float center, float scale,
                                          float shift) noexcept nogil
    void widen_half "fastbn_widen_half"(const void* src, float* dst, Py_ssize_t n) noexcept nogil
    void narrow_half "fastbn_narrow_half"(const float* src, void* dst, Py_ssize_t n) noexcept nogil
    void widen_bfloat "fastbn_widen_bfloat"(const void* src, float* dst, Py_ssize_t n) noexcept nogil
    void narrow_bfloat "fastbn_narrow_bfloat"(const float* src, void* dst, Py_ssize_t n) noexcept nogil


cdef inline void widen(const storage* src, float* dst, Py_ssize_t n) noexcept nogil:
    """dst[:n] = src[:n] in float32, for a half storage."""
    if storage is half:
        widen_half(src, dst, n)
    elif storage is bfloat:
        widen_bfloat(src, dst, n)


cdef inline void narrow(const float* src, storage* dst, Py_ssize_t n) noexcept nogil:
    """dst[:n] = src[:n] rounded to nearest even, for a half storage."""
    if storage is half:
        narrow_half(src, dst, n)
    elif storage is bfloat:
        narrow_bfloat(src, dst, n)


cdef inline double first_value(const storage* x) noexcept nogil:
    """x[0] as the compute type sees it, in float64."""
    cdef float v
    if storage is float or storage is double:
        return x[0]
    else:
        widen(x, &v, 1)
        return v


cdef void convert_run(int kind, const void* src, void* dst, Py_ssize_t n) noexcept nogil:
    """One conversion of convert(): kind 0 widens float16, 1 narrows to float16, 2 widens
    bfloat16, 3 narrows to bfloat16 (src, dst and n in values)."""
    if kind == 0:
        widen_half(src, <float*>dst, n)
    elif kind == 1:
        narrow_half(<const float*>src, dst, n)
    elif kind == 2:
        widen_bfloat(src, <float*>dst, n)
    else:
        narrow_bfloat(<const float*>src, dst, n)


cdef void convert(int kind, const char* src, char* dst, Py_ssize_t n, int n_threads) noexcept nogil:
    """A conversion of convert_run over n values, in contiguous chunks of whole cache lines,
    one per thread."""
    cdef Py_ssize_t parts = max(1, min(<Py_ssize_t>n_threads, n // GRAIN)), chunk, k, start
    cdef Py_ssize_t src_size = 2 if kind % 2 == 0 else 4
    cdef Py_ssize_t dst_size = 6 - src_size
    chunk = ((n + parts - 1) // parts + 31) // 32 * 32
    if parts == 1:
        convert_run(kind, src, dst, n)
        return
    for k in prange(parts, num_threads=<int>parts, schedule="static"):
        start = k * chunk
        if start < n:
            convert_run(kind, src + start * src_size, dst + start * dst_size, min(chunk, n - start))
