# Inner loops over contiguous runs and rows of the compute type `real` (float32 or float64),
# the arithmetic helpers of the statistics, and the activation applied in the same pass.
# Nothing here knows about storage types: storage.pxi and staging.pxi feed these loops, from
# the data itself (float32, float64) or from blocks widened on the stack (halves, where the
# build has no intrinsics for the pass: see _engine/simd/).  Of the work
# items they know only a column tile's extent (Tile, from geometry.pxi), which the column
# loops walk.

# The C written by hand lives in _engine/simd/*.h, by job, each function naming the loop here
# whose bits it must reproduce.
cdef extern from "_engine/simd/bits.h":
    void prefetch "FASTBN_PREFETCH"(const void* p) noexcept nogil
    float keep_float "fastbn_keep_float"(int keep, float v) noexcept nogil
    double keep_double "fastbn_keep_double"(int keep, double v) noexcept nogil


cdef extern from "_engine/simd/reduce.h":
    # moment_totals (AVX-512, AVX2) and grad_lanes + fold_lanes (AVX-512) of a float32 run
    bint TOTALS_SIMD "FASTBN_TOTALS_SIMD"
    Py_ssize_t TOTALS_MAX_RUN "FASTBN_TOTALS_MAX_RUN"
    Py_ssize_t GRAD_TOTALS_MAX_RUN "FASTBN_GRAD_TOTALS_MAX_RUN"
    void moment_totals_float "fastbn_moment_totals_float"(const float* x, Py_ssize_t n,
                                                          double shift, double* t1,
                                                          double* t2) noexcept nogil
    void grad_totals_float "fastbn_grad_totals_float"(int relu, const float* dy,
                                                      const float* out, const float* x,
                                                      Py_ssize_t n, double center, double* t1,
                                                      double* t2) noexcept nogil


# The activation applied in the same pass as the normalisation: a compile-time choice, so each
# loop is written once and costs nothing when there is none.
cdef struct Identity:
    char unused

cdef struct ReLU:
    char unused

ctypedef fused activation:
    Identity
    ReLU


cdef enum:
    # Rows of the coefficients of an elementwise pass, per channel (or per column: see
    # per_column), in one block of the compute type; a pass takes `real** k`, k[row] + channel.
    #   forward:   y  = activation((x * FACTOR - CENTER) * SCALE + SHIFT)
    #   backward:  dx = GAIN * (g + (x * FACTOR - CENTER) * SCALE + SHIFT)
    # x - CENTER is computed as x * FACTOR - CENTER, FACTOR being 1 (the exact subtraction)
    # except in the corners of the dtype's range that split_center describes.
    CENTER, SCALE, SHIFT, FACTOR, GAIN, N_COEFFICIENTS


cdef inline real activate(const activation* act, real z) noexcept nogil:
    """The activation of z.  ReLU is torch's: 0 where z < 0, z itself otherwise (so -0.0 and
    NaN pass through)."""
    cdef real zero = 0  # typed: a bare 0 would compare float32 z as a double
    if activation is ReLU:
        return zero if z < zero else z
    else:
        return z


cdef inline real gate(const activation* act, const real* dy, const real* out,
                      Py_ssize_t i) noexcept nogil:
    """The gradient reaching the normalisation: dy[i] where the activation passes it (ReLU:
    where its output out[i] is not <= 0, as torch's threshold_backward), else 0.  `out` is read
    only with an activation."""
    # Branch-free (see fastbn_keep_float), so that the loops calling this vectorise; `not
    # out <= 0` rather than `out > 0` keeps dy where out is NaN, as torch does.
    cdef real zero = 0
    if activation is ReLU:
        if real is float:
            return keep_float(not (out[i] <= zero), dy[i])
        else:
            return keep_double(not (out[i] <= zero), dy[i])
    else:
        return dy[i]


# ---------------------------------------------------------------------------------------------
# Arithmetic of the statistics
# ---------------------------------------------------------------------------------------------

cdef inline double finite_or_zero(double v) noexcept nogil:
    """v, or 0 when it is infinite or NaN (a shift must be finite to be one)."""
    return v if fabs(v) <= DBL_MAX else 0.0


cdef inline double nonnegative(double v) noexcept nogil:
    """max(v, 0) that keeps NaN (a channel with infinities has an undefined variance)."""
    return 0.0 if v < 0.0 else v


cdef inline double difference(double a, double b) noexcept nogil:
    """a - b, but 0 for equal a and b: two infinite means of the same sign are the same mean,
    where inf - inf would make it NaN."""
    return 0.0 if a == b else a - b


cdef inline bint finite(double v) noexcept nogil:
    return fabs(v) <= DBL_MAX


cdef inline double merged_mean(double mean, double other, double r) noexcept nogil:
    """Chan's update of a mean towards another by the weight r; where either is infinite or
    NaN, the arithmetic of the sums they stand for instead (inf + finite = inf, inf - inf =
    NaN), as torch and numpy compute a mean."""
    return mean + (other - mean) * r if finite(mean) & finite(other) else mean + other


cdef inline void two_sum(double a, double b, double* total, double* error) noexcept nogil:
    """total = fl(a + b) and error = (a + b) - total exactly (Knuth's TwoSum)."""
    cdef double t = a + b
    cdef double bb = t - a
    error[0] = (a - (t - bb)) + (b - bb)
    total[0] = t


cdef inline void clear(double* a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        a[j] = 0.0


cdef inline double fold_lanes(double* acc) noexcept nogil:
    """Sum of the LANES (32) partial sums, pairwise in a fixed order: lanes j += j + 16, then
    j + 8, j + 4, j + 2, j + 1.  Written with constant bounds, so that the compiler unrolls it
    and, inlined beside the loop that filled acc, keeps the lanes in registers (a loop over a
    variable width reloads them from the stack in narrowing pieces, which stalls
    store-to-load forwarding)."""
    cdef int j
    for j in range(LANES // 2):
        acc[j] += acc[j + LANES // 2]
    for j in range(LANES // 4):
        acc[j] += acc[j + LANES // 4]
    for j in range(LANES // 8):
        acc[j] += acc[j + LANES // 8]
    for j in range(LANES // 16):
        acc[j] += acc[j + LANES // 16]
    return acc[0] + acc[1]


# ---------------------------------------------------------------------------------------------
# Reductions along a run: element i goes to lane i % LANES.  A run fed in pieces whose lengths
# are multiples of LANES (all but the last) is summed in the same order as in one piece.
# ---------------------------------------------------------------------------------------------

cdef inline void moment_lanes(const real* x, Py_ssize_t n, double shift, double* s1,
                              double* s2) noexcept nogil:
    """Add d = x - shift and d * d over x[:n] to the lane sums s1 and s2."""
    # The sums are carried in local arrays, which the compiler can prove apart from x and so
    # keep in registers (through the pointers it would have to store and reload them at every
    # step where x is float64).
    cdef double a[LANES]
    cdef double b[LANES]
    cdef double d
    cdef Py_ssize_t i = 0, j, full = n - n % LANES
    for j in range(LANES):
        a[j] = s1[j]
        b[j] = s2[j]
    while i < full:
        for j in range(LANES):
            d = <double>x[i + j] - shift
            a[j] += d
            b[j] += d * d
        i += LANES
    for j in range(n - full):
        d = <double>x[full + j] - shift
        a[j] += d
        b[j] += d * d
    for j in range(LANES):
        s1[j] = a[j]
        s2[j] = b[j]


cdef inline void moment_totals(const real* x, Py_ssize_t n, double shift, double* t1,
                               double* t2) noexcept nogil:
    """fold_lanes of the lane sums moment_lanes makes of x[:n] from zero: the same totals, for
    a run fed in one piece, with the lanes in registers throughout.  (Through moment_lanes'
    pointers, and its remainder loop's variable index, the compiler keeps them on the stack:
    half the time of a run of tens of values.)

    The last, partial sweep reads a copy of the run's end padded with `shift` (finite: the
    run's first value or 0), whose deviation is +0.0.  Adding +0.0 changes no lane: only -0.0
    + +0.0 differs from -0.0, and a lane that starts at +0.0 is never -0.0 (in round to
    nearest, zeros of opposite signs and exact cancellations sum to +0.0), so the totals are
    moment_lanes' bit for bit."""
    cdef double a[LANES]
    cdef double b[LANES]
    cdef real tail[LANES]
    cdef double d
    cdef Py_ssize_t i = 0, j, full = n - n % LANES
    for j in range(LANES):
        a[j] = 0.0
        b[j] = 0.0
    while i < full:
        for j in range(LANES):
            d = <double>x[i + j] - shift
            a[j] += d
            b[j] += d * d
        i += LANES
    if full < n:
        for j in range(LANES):
            tail[j] = <real>shift
        memcpy(tail, x + full, (n - full) * sizeof(real))
        for j in range(LANES):
            d = <double>tail[j] - shift
            a[j] += d
            b[j] += d * d
    t1[0] = fold_lanes(a)
    t2[0] = fold_lanes(b)


cdef inline void grad_lanes(const activation* act, const real* dy, const real* out,
                            const real* x, Py_ssize_t n, double center, real scale, real* dx,
                            double* s1, double* s2) noexcept nogil:
    """Add g and g * (x - center) over n elements to the lane sums s1 and s2, g being dy gated
    by the activation (see gate); with dx, also dx = scale * g."""
    cdef double a[LANES]  # (local sums, kept in registers: see moment_lanes)
    cdef double b[LANES]
    cdef double v
    cdef Py_ssize_t i = 0, j, full = n - n % LANES
    for j in range(LANES):
        a[j] = s1[j]
        b[j] = s2[j]
    if dx == NULL:
        while i < full:
            for j in range(LANES):
                v = gate(act, dy, out, i + j)
                a[j] += v
                b[j] += v * (<double>x[i + j] - center)
            i += LANES
    else:
        while i < full:
            for j in range(LANES):
                v = gate(act, dy, out, i + j)
                dx[i + j] = scale * gate(act, dy, out, i + j)
                a[j] += v
                b[j] += v * (<double>x[i + j] - center)
            i += LANES
    for j in range(n - full):
        v = gate(act, dy, out, full + j)
        if dx != NULL:
            dx[full + j] = scale * gate(act, dy, out, full + j)
        a[j] += v
        b[j] += v * (<double>x[full + j] - center)
    for j in range(LANES):
        s1[j] = a[j]
        s2[j] = b[j]


# ---------------------------------------------------------------------------------------------
# Reductions down the columns of a tile (columns layout), per column
# ---------------------------------------------------------------------------------------------

cdef inline void prefetch_row(const void* p, Py_ssize_t nbytes) noexcept nogil:
    """Ask for the cache lines of nbytes from p ahead of their use."""
    cdef Py_ssize_t i = 0
    while i < nbytes:
        prefetch(<const char*>p + i)
        i += 64


cdef inline void tile_moments_start(const real* x, Py_ssize_t width, double* shift,
                                    double* s1, double* s2) noexcept nogil:
    """The accumulators of the tile moments, shifted by the tile's first row x[:width]."""
    cdef Py_ssize_t j
    for j in range(width):
        shift[j] = finite_or_zero(x[j])
        s1[j] = 0.0
        s2[j] = 0.0


cdef inline void tile_moments_rows(const real* x, Py_ssize_t stride, Py_ssize_t nrows,
                                   Py_ssize_t width, const double* shift, double* s1,
                                   double* s2) noexcept nogil:
    """Add nrows rows (`stride` apart) of a tile to its sums of d = x - shift and d * d.
    Feeding a tile's rows in pieces of multiples of four rows sums in the same order."""
    cdef const real* row
    cdef double d, e, f, h, a, b, k
    cdef Py_ssize_t r = 0, j
    # Four rows per step: the accumulators are loaded and stored once per four rows, which
    # halves the time of a one-row sweep (bound by those stores).  Row 0 is swept too: its
    # deviation is 0 unless its value was no shift (infinite or NaN), which must still count.
    # Two steps per sweep where there are eight rows, the sums carried between them in
    # registers: the same additions in the same order, with half the loads and stores.
    while r + 8 <= nrows:
        row = x + r * stride
        for j in range(width):
            k = shift[j]
            d = <double>row[j] - k
            e = <double>row[stride + j] - k
            f = <double>row[2 * stride + j] - k
            h = <double>row[3 * stride + j] - k
            a = s1[j] + ((d + e) + (f + h))
            b = s2[j] + ((d * d + e * e) + (f * f + h * h))
            d = <double>row[4 * stride + j] - k
            e = <double>row[5 * stride + j] - k
            f = <double>row[6 * stride + j] - k
            h = <double>row[7 * stride + j] - k
            s1[j] = a + ((d + e) + (f + h))
            s2[j] = b + ((d * d + e * e) + (f * f + h * h))
        r += 8
    while r + 4 <= nrows:
        row = x + r * stride
        for j in range(width):
            d = <double>row[j] - shift[j]
            e = <double>row[stride + j] - shift[j]
            f = <double>row[2 * stride + j] - shift[j]
            h = <double>row[3 * stride + j] - shift[j]
            s1[j] += (d + e) + (f + h)
            s2[j] += (d * d + e * e) + (f * f + h * h)
        r += 4
    while r < nrows:
        row = x + r * stride
        for j in range(width):
            d = <double>row[j] - shift[j]
            s1[j] += d
            s2[j] += d * d
        r += 1


cdef inline void tile_moments_finish(Py_ssize_t nrows, Py_ssize_t width, const double* shift,
                                     const double* s1, const double* s2, double* shift_out,
                                     double* offset, double* m2) noexcept nogil:
    cdef double inv_n = 1.0 / nrows
    cdef Py_ssize_t j
    for j in range(width):
        shift_out[j] = shift[j]
        offset[j] = s1[j] * inv_n
        m2[j] = nonnegative(s2[j] - s1[j] * s1[j] * inv_n)


cdef inline void tile_grad_rows(const activation* act, const Tile* t, const real* dy,
                                const real* out, const real* x, const double* center,
                                const real* scale, real* dx, double* s1,
                                double* s2) noexcept nogil:
    """Add the tile's per-column g and g * (x - center[j]) to s1 and s2, g being dy gated by
    the activation (pointers at the tile's first element); with dx, also dx = scale[j] * g."""
    cdef double v, w, u, z, a, b, c
    cdef Py_ssize_t r = 0, q, j, o, width = t.width, ahead = PREFETCH_ROWS * t.stride
    cdef Py_ssize_t s = t.stride
    if dx == NULL:
        # Four rows per sweep, each column's sums carried through them in registers: the
        # same additions in the same order as row by row, with a quarter of the loads and
        # stores of the sums (which bound a one-row sweep).
        while r + 4 <= t.nrows:
            o = r * s
            for q in range(4):
                if r + q + PREFETCH_ROWS < t.nrows:
                    prefetch_row(dy + o + q * s + ahead, width * sizeof(real))
                    prefetch_row(x + o + q * s + ahead, width * sizeof(real))
            for j in range(width):
                c = center[j]
                v = gate(act, dy, out, o + j)
                w = gate(act, dy, out, o + s + j)
                u = gate(act, dy, out, o + 2 * s + j)
                z = gate(act, dy, out, o + 3 * s + j)
                a = s1[j] + v
                b = s2[j] + v * (<double>x[o + j] - c)
                a = a + w
                b = b + w * (<double>x[o + s + j] - c)
                a = a + u
                b = b + u * (<double>x[o + 2 * s + j] - c)
                s1[j] = a + z
                s2[j] = b + z * (<double>x[o + 3 * s + j] - c)
            r += 4
    for r in range(r, t.nrows):
        o = r * t.stride
        if r + PREFETCH_ROWS < t.nrows:
            prefetch_row(dy + o + ahead, width * sizeof(real))
            prefetch_row(x + o + ahead, width * sizeof(real))
        if dx == NULL:
            for j in range(width):
                v = gate(act, dy, out, o + j)
                s1[j] += v
                s2[j] += v * (<double>x[o + j] - center[j])
        else:
            for j in range(width):
                v = gate(act, dy, out, o + j)
                dx[o + j] = scale[j] * gate(act, dy, out, o + j)
                s1[j] += v
                s2[j] += v * (<double>x[o + j] - center[j])


# ---------------------------------------------------------------------------------------------
# Elementwise loops: a run of one channel (its coefficients k[row][ch]) or a row of columns
# (their coefficients k[row][col0:col0 + n])
# ---------------------------------------------------------------------------------------------

cdef inline void affine_run(const activation* act, const real* x, real* y, Py_ssize_t n,
                            real** k, Py_ssize_t ch) noexcept nogil:
    cdef real factor = k[FACTOR][ch], center = k[CENTER][ch]
    cdef real scale = k[SCALE][ch], shift = k[SHIFT][ch]
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = activate(act, (x[i] * factor - center) * scale + shift)


cdef inline void affine_row(const activation* act, const real* x, real* y, Py_ssize_t n,
                            real** k, Py_ssize_t col0) noexcept nogil:
    """The affine map of a row's columns.  k[FACTOR] NULL stands for factors that are all 1
    (the usual case): x * 1 is x exactly, so the same values with one stream of coefficients
    fewer to load per value -- a quarter of the loads of a row, whose coefficients, unlike a
    run's, change at every value."""
    cdef const real* center = k[CENTER] + col0
    cdef const real* scale = k[SCALE] + col0
    cdef const real* shift = k[SHIFT] + col0
    cdef const real* factor
    cdef Py_ssize_t i
    if k[FACTOR] == NULL:
        for i in range(n):
            y[i] = activate(act, (x[i] - center[i]) * scale[i] + shift[i])
    else:
        factor = k[FACTOR] + col0
        for i in range(n):
            y[i] = activate(act, (x[i] * factor[i] - center[i]) * scale[i] + shift[i])


cdef inline void grad_input_run(const activation* act, const real* dy, const real* out,
                                const real* x, real* dx, Py_ssize_t n, real** k,
                                Py_ssize_t ch) noexcept nogil:
    cdef real a = k[GAIN][ch], b = k[SCALE][ch], factor = k[FACTOR][ch]
    cdef real center = k[CENTER][ch], c = k[SHIFT][ch]
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = a * (gate(act, dy, out, i) + (x[i] * factor - center) * b + c)


cdef inline void grad_input_row(const activation* act, const real* dy, const real* out,
                                const real* x, real* dx, Py_ssize_t n, real** k,
                                Py_ssize_t col0) noexcept nogil:
    """dx of a row's columns; k[FACTOR] NULL stands for factors that are all 1 (see
    affine_row)."""
    cdef const real* a = k[GAIN] + col0
    cdef const real* b = k[SCALE] + col0
    cdef const real* center = k[CENTER] + col0
    cdef const real* c = k[SHIFT] + col0
    cdef const real* factor
    cdef Py_ssize_t i
    if k[FACTOR] == NULL:
        for i in range(n):
            dx[i] = a[i] * (gate(act, dy, out, i) + (x[i] - center[i]) * b[i] + c[i])
    else:
        factor = k[FACTOR] + col0
        for i in range(n):
            dx[i] = a[i] * (gate(act, dy, out, i) + (x[i] * factor[i] - center[i]) * b[i] + c[i])
