# Storage types and conversion.  Data is stored as float32, float64, float16 or bfloat16; it is
# computed in `real`, float32 for all but float64.  Half storages (float16, bfloat16) are never
# copied whole into float32: the passes convert in registers (the intrinsics declared here) or
# widen small blocks into buffers on the stack, run the float32 loops on them and narrow their
# results (see staging.pxi), so every half result is the float32 path's on the widened data,
# rounded to nearest even.

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


cdef extern from "_engine/simd/reduce.h":
    # moment_lanes + fold_lanes and grad_lanes + fold_lanes (without dx, and with dx = scale *
    # g written in the half type) of a half run, converted in registers; HALF_TOTALS: built here
    bint HALF_TOTALS "FASTBN_HALF_TOTALS"
    void moment_totals_half "fastbn_moment_totals_half"(int bfloat, const void* src,
                                                        Py_ssize_t n, double shift, double* t1,
                                                        double* t2) noexcept nogil
    void grad_totals_half "fastbn_grad_totals_half"(int bfloat, int relu, const void* dy,
                                                    const void* out, const void* x,
                                                    Py_ssize_t n, double center, double* t1,
                                                    double* t2) noexcept nogil
    void grad_totals_half_dx "fastbn_grad_totals_half_dx"(int bfloat, int relu, const void* dy,
                                                          const void* out, const void* x,
                                                          Py_ssize_t n, double center,
                                                          float scale, void* dx, double* t1,
                                                          double* t2) noexcept nogil

cdef extern from "_engine/simd/affine.h":
    # affine_run (loops.pxi) of a half run, converted in registers; HALF_AFFINE: built here
    bint HALF_AFFINE "FASTBN_HALF_AFFINE"
    # affine_run of a float32 run with streaming stores; STREAM_AFFINE: built here
    bint STREAM_AFFINE "FASTBN_STREAM_AFFINE"
    void affine_stream "fastbn_affine_stream"(int relu, const float* x, float* y, Py_ssize_t n,
                                              float factor, float center, float scale,
                                              float shift) noexcept nogil
    # affine_row of a float32 row (factor NULL: all ones) with streaming stores, in the same
    # builds as affine_stream
    void affine_row_stream "fastbn_affine_row_stream"(int relu, const float* x, float* y,
                                                      Py_ssize_t n, const float* factor,
                                                      const float* center, const float* scale,
                                                      const float* shift) noexcept nogil
    # orders a thread's streaming stores before whatever it writes next (ends its share)
    void stream_fence "fastbn_stream_fence"() noexcept nogil
    # affine_row and grad_input_row (loops.pxi) of four float32 rows at once (factor NULL:
    # all ones); ROWS_AFFINE: built here
    bint ROWS_AFFINE "FASTBN_ROWS_AFFINE"
    void affine_rows4 "fastbn_affine_rows4"(int relu, const float* x, float* y,
                                            Py_ssize_t stride, Py_ssize_t n,
                                            const float* factor, const float* center,
                                            const float* scale, const float* shift) noexcept nogil
    void grad_input_rows4 "fastbn_grad_input_rows4"(int relu, const float* dy, const float* out,
                                                    const float* x, float* dx,
                                                    Py_ssize_t stride, Py_ssize_t n,
                                                    const float* gain, const float* factor,
                                                    const float* center, const float* scale,
                                                    const float* shift) noexcept nogil
    void affine_half "fastbn_affine_half"(int bfloat, int relu, const void* src, void* dst,
                                          Py_ssize_t n, float factor, float center, float scale,
                                          float shift) noexcept nogil
    # affine_row (loops.pxi) of a row of half data, converted in registers; built with
    # affine_half (factor NULL: all ones)
    void affine_half_row "fastbn_affine_half_row"(int bfloat, int relu, const void* src,
                                                  void* dst, Py_ssize_t n, const float* factor,
                                                  const float* center, const float* scale,
                                                  const float* shift) noexcept nogil
    # grad_input_row (loops.pxi) of a row of half data, converted in registers; built with
    # affine_half (factor NULL: all ones)
    void grad_input_half_row "fastbn_grad_input_half_row"(int bfloat, int relu, const void* dy,
                                                          const void* out, const void* x,
                                                          void* dx, Py_ssize_t n,
                                                          const float* gain, const float* factor,
                                                          const float* center, const float* scale,
                                                          const float* shift) noexcept nogil
    # grad_input_run (loops.pxi) of a half run, converted in registers; built with affine_half
    void grad_input_half "fastbn_grad_input_half"(int bfloat, int relu, const void* dy,
                                                  const void* out, const void* x, void* dx,
                                                  Py_ssize_t n, float gain, float factor,
                                                  float center, float scale,
                                                  float shift) noexcept nogil

cdef extern from "_engine/simd/convert.h":
    # half <-> float32 over runs, scalar, F16C/AVX2/AVX-512 or AArch64 (numpy's and ml_dtypes'
    # bits)
    bint HALF_SIMD "FASTBN_HALF_SIMD"
    const char* HALF_CONVERT "FASTBN_HALF_CONVERT"
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
