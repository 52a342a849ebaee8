"""Which SIMD levels this CPU, and the operating system's saved register state, support.

Compiled without any ISA flags so that it runs everywhere; the kernels' wider variants are
chosen from its answers (fastbn/_dispatch.py).  GCC and clang's ``__builtin_cpu_supports``
check both the CPUID bits and XCR0 (that the OS saves the YMM/ZMM registers); the MSVC
branch does the same by hand.  The avx2 level is AVX2 + FMA + F16C (the float16 conversions),
which every AVX2 CPU has, but a virtual machine may hide.
"""

cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    static int fastbn_cpu_has_avx2(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("f16c");
    }
    static int fastbn_cpu_has_avx512(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512vl") && fastbn_cpu_has_avx2();
    }
    #elif defined(_MSC_VER) && defined(_M_X64)
    #include <intrin.h>
    #include <immintrin.h>
    static int fastbn_xcr0_has(unsigned long long mask) {
        int r[4];
        __cpuid(r, 1);
        if (!(r[2] & (1 << 27))) return 0;           /* OSXSAVE: XGETBV usable */
        return (_xgetbv(0) & mask) == mask;
    }
    static int fastbn_cpu_has_avx2(void) {
        int r1[4], r7[4];
        __cpuid(r1, 1);
        __cpuidex(r7, 7, 0);
        /* FMA, F16C; AVX2 */
        return (r1[2] & (1 << 12)) && (r1[2] & (1 << 29)) && (r7[1] & (1 << 5)) && fastbn_xcr0_has(0x6);
    }
    static int fastbn_cpu_has_avx512(void) {
        int r7[4];
        __cpuidex(r7, 7, 0);
        const int need = (1 << 16) | (1 << 17) | (1 << 28) | (1 << 30) | (1 << 31); /* F DQ CD BW VL */
        return ((r7[1] & need) == need) && fastbn_cpu_has_avx2() && fastbn_xcr0_has(0xe6);
    }
    #else
    static int fastbn_cpu_has_avx2(void) { return 0; }
    static int fastbn_cpu_has_avx512(void) { return 0; }
    #endif
    """
    int fastbn_cpu_has_avx2() noexcept nogil
    int fastbn_cpu_has_avx512() noexcept nogil


def supported_simd_levels():
    """SIMD levels the kernels can use on this machine, widest first; always ends in 'baseline'."""
    levels = []
    if fastbn_cpu_has_avx512():
        levels.append("avx512")
    if fastbn_cpu_has_avx2():
        levels.append("avx2")
    levels.append("baseline")
    return tuple(levels)
