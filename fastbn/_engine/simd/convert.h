/* Conversions between the half storages (float16, bfloat16) and float32, scalar and SIMD.
 *
 * Part of fastbn's kernels (fastbn/_engine/storage.pxi declares these to Cython; every SIMD
 * variant of _kernels.pyx compiles them with its own flags).  The scalar functions are the
 * reference: every SIMD path (F16C, AArch64's FCVT) gives their bits -- numpy's float16 conversions and
 * ml_dtypes' bfloat16 rounding (round to nearest even; NaN quieted, sign and top payload
 * kept) -- which tests/test_float16_conversion.py and tests/test_bfloat16_conversion.py check
 * against numpy and ml_dtypes at every SIMD level this CPU runs.
 *
 *   fastbn_widen_half / fastbn_narrow_half        float16 <-> float32 over a run (storage.pxi:
 *                                                 widen, narrow)
 *   fastbn_widen_bfloat / fastbn_narrow_bfloat    bfloat16 <-> float32 over a run
 *   fastbn_load8/16, fastbn_store8/16/8x2          eight or sixteen values converted in
 *   (fastbn_widen8, fastbn_narrow8)                registers, for affine.h and reduce.h
 *   fastbn_bfloat_round_lanes8, _round8, _round16x2  bfloat16 rounding of 8 or 16 values
 *   fastbn_widen1, fastbn_narrow1                  one value (the ends of runs)
 *   fastbn_load8_part                              the first few of eight, zero-padded
 *   FASTBN_RUN_FUNCTION, FASTBN_ALWAYS_INLINE      how affine.h and reduce.h declare their
 *                                                  run functions (always inlined on AVX-512)
 *                                                  and the bodies they share
 */
#ifndef FASTBN_SIMD_CONVERT_H
#define FASTBN_SIMD_CONVERT_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
/* How this build converts float16: FASTBN_HALF_SIMD is 1 where an instruction does it (F16C
   on x86-64 builds that have it; AArch64's FCVT, in every AArch64 build, through Advanced
   SIMD's vcvt), 0 where the integer arithmetic below does; FASTBN_HALF_CONVERT names it for
   fastbn.show_config().  bfloat16 is converted with integer arithmetic everywhere. */
#if defined(__F16C__)
#define FASTBN_HALF_SIMD 1
#define FASTBN_HALF_NEON 0
#define FASTBN_HALF_CONVERT "F16C"
#elif defined(__aarch64__) && defined(__ARM_FP16_FORMAT_IEEE)
#include <arm_neon.h>
#define FASTBN_HALF_SIMD 1
#define FASTBN_HALF_NEON 1
#define FASTBN_HALF_CONVERT "AArch64 FCVT"
#else
#define FASTBN_HALF_SIMD 0
#define FASTBN_HALF_NEON 0
#define FASTBN_HALF_CONVERT "integer"
#endif

/* The run functions of affine.h and reduce.h, in the AVX-512 builds inlined at every call:
   each is called from a few specialisations of a short loop, and there, called out of line
   (the compiler stopped inlining them as the kernels' file grew), a run of tens of values
   paid for the call: 0.92-0.95x on runs of 32 and 50 values, where inlined they are 1.04-1.5x.
   The AVX2 builds leave it to the compiler: forced there, the larger AVX2 functions made
   bfloat16 runs of 49 values 0.84-0.89x. */
#if defined(__GNUC__) || defined(__clang__)
#define FASTBN_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define FASTBN_ALWAYS_INLINE static inline
#endif
#if defined(__AVX512F__)
#define FASTBN_RUN_FUNCTION FASTBN_ALWAYS_INLINE
#else
#define FASTBN_RUN_FUNCTION static inline
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
#if FASTBN_HALF_NEON
    /* FCVT, exact; with FPCR's defaults (no flush to zero, default NaN off), as Linux sets
       them, a NaN keeps its sign and payload, quieted */
    for (; i + 8 <= n; i += 8) {
        float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(s + i));
        vst1q_f32(dst + i, vcvt_f32_f16(vget_low_f16(h)));
        vst1q_f32(dst + i + 4, vcvt_high_f32_f16(h));
    }
    for (; i < n; i++) {
        __fp16 h;
        memcpy(&h, s + i, sizeof h);
        dst[i] = (float)h;
    }
#elif FASTBN_HALF_SIMD
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
#if FASTBN_HALF_NEON
    /* FCVT under FPCR's rounding mode, to nearest even by default (numpy's rounding) */
    for (; i + 8 <= n; i += 8) {
        float16x8_t h = vcvt_high_f16_f32(vcvt_f16_f32(vld1q_f32(src + i)), vld1q_f32(src + i + 4));
        vst1q_u16(d + i, vreinterpretq_u16_f16(h));
    }
    for (; i < n; i++) {
        __fp16 h = (__fp16)src[i];
        memcpy(d + i, &h, sizeof h);
    }
#elif FASTBN_HALF_SIMD
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
/* 8 float32 bit patterns rounded to bfloat16, each in the low half of its 32-bit lane. */
static inline __m256i fastbn_bfloat_round_lanes8(__m256i x) {
    __m256i high = _mm256_srli_epi32(x, 16);
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)),
                                                         _mm256_and_si256(high, _mm256_set1_epi32(1))), 16);
    /* NaN: unordered with itself (one compare where a magnitude test takes two) */
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(_mm256_castsi256_ps(x), _mm256_castsi256_ps(x),
                                                    _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_or_si256(high, _mm256_set1_epi32(0x40)), nan);
}
/* 8 float32 bit patterns rounded to bfloat16. */
static inline __m128i fastbn_bfloat_round8(__m256i x) {
    __m256i r = fastbn_bfloat_round_lanes8(x);
    /* each lane < 2**16: packing with unsigned saturation keeps it */
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
/* 16 float32 bit patterns (two vectors) rounded to bfloat16: one pack and one permute for
   the sixteen, where two vectors of eight take two packs and two extracts. */
static inline __m256i fastbn_bfloat_round16x2(__m256i x0, __m256i x1) {
    __m256i packed = _mm256_packus_epi32(fastbn_bfloat_round_lanes8(x0), fastbn_bfloat_round_lanes8(x1));
    return _mm256_permute4x64_epi64(packed, 0xD8);  /* (the pack works within 128-bit halves) */
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
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i),
                            fastbn_bfloat_round16x2(_mm256_loadu_si256((const __m256i *)(src + i)),
                                                    _mm256_loadu_si256((const __m256i *)(src + i + 8))));
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), fastbn_bfloat_round8(_mm256_loadu_si256((const __m256i *)(src + i))));
#endif
    for (; i < n; i++) {
        uint32_t x;
        memcpy(&x, src + i, sizeof x);
        d[i] = fastbn_float_to_bfloat_soft(x);
    }
}

/* Eight (AVX2) or sixteen (AVX-512) half values widened into, or narrowed from, a float32
   register with the bits of the run functions above: for the passes that keep half data in registers
   (affine.h, reduce.h), in the builds where those run. */
#if defined(__FMA__) && (defined(__AVX2__) || defined(__AVX512F__))
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
static inline __m256 fastbn_widen8(int bfloat, __m128i h) {
    if (bfloat)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}
static inline __m128i fastbn_narrow8(int bfloat, __m256 v) {
    if (bfloat)
        return fastbn_bfloat_round8(_mm256_castps_si256(v));
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
}
static inline __m256 fastbn_load8(int bfloat, const uint16_t *s) {
    return fastbn_widen8(bfloat, _mm_loadu_si128((const __m128i *)s));
}
static inline void fastbn_store8(int bfloat, uint16_t *d, __m256 v) {
    _mm_storeu_si128((__m128i *)d, fastbn_narrow8(bfloat, v));
}
static inline void fastbn_store8x2(int bfloat, uint16_t *d, __m256 v0, __m256 v1) {
    /* sixteen values, d[0..7] from v0 and d[8..15] from v1 */
    if (bfloat) {
        _mm256_storeu_si256((__m256i *)d, fastbn_bfloat_round16x2(_mm256_castps_si256(v0),
                                                                   _mm256_castps_si256(v1)));
    } else {
        _mm_storeu_si128((__m128i *)d, _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128((__m128i *)(d + 8), _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT));
    }
}
/* One value (the ends of runs), with the run functions' bits, in a few instructions: the
   run functions, called for one value, stop being inlined once they have many callers. */
static inline float fastbn_widen1(int bfloat, uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float v;
    if (!bfloat)
        return _cvtsh_ss(h);
    memcpy(&v, &bits, sizeof v);
    return v;
}
static inline uint16_t fastbn_narrow1(int bfloat, float v) {
    uint32_t bits;
    if (!bfloat)
        return (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    memcpy(&bits, &v, sizeof bits);
    return fastbn_float_to_bfloat_soft(bits);
}
/* The first `count` (0 to 8) of eight values, zeros after them, in a register: the last,
   partial sweep of a reduction.  Assembled in general registers -- a copy through a buffer
   on the stack would stall the vector load on its small stores. */
static inline __m256 fastbn_load8_part(int bfloat, const uint16_t *s, Py_ssize_t count) {
    uint64_t lo = 0, hi = 0;
    Py_ssize_t j;
    for (j = 0; j < count && j < 4; j++)
        lo |= (uint64_t)s[j] << (16 * j);
    for (; j < count && j < 8; j++)
        hi |= (uint64_t)s[j] << (16 * (j - 4));
    return fastbn_widen8(bfloat, _mm_set_epi64x((long long)hi, (long long)lo));
}
#endif

#endif /* FASTBN_SIMD_CONVERT_H */
