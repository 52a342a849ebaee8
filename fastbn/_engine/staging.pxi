# The loops of loops.pxi over stored data.  float32 and float64 data go to them as they are.
# Half data (float16, bfloat16) goes, where the build has them, to the intrinsics of
# _engine/simd/ that convert in registers and repeat those loops' arithmetic in their order
# (a planar run's moments, gradient sums and grad_input, its affine map, and a column tile
# row's affine map and grad_input); otherwise it is
# widened block by block into float32 buffers on the stack, fed to the same loops, and their
# results narrowed back.  The blocks are cut where the loops can resume in the same order
# (multiples of LANES along a run, of four rows down a tile).  Either way a half result is the
# float32 path's on the widened data, rounded, bit for bit, and no pass ever holds more of a
# half tensor in float32 than a few kilobytes.

cdef inline void segment_moments(const storage* x, Py_ssize_t n, double* shift_out,
                                 double* offset, double* m2) noexcept nogil:
    """Moments of x[:n] (n >= 1) as shift = x[0], offset = mean - shift and M2, by sums of
    d = x - shift in LANES float64 lanes.  The mean is kept as two parts so that merging
    chunks loses nothing to its rounding.  (A non-finite first value is no shift: 0 is used, so
    that a chunk holding +inf has mean +inf, as torch and numpy say, rather than inf - inf.)"""
    cdef double shift = finite_or_zero(first_value(x))
    cdef double s1[LANES]
    cdef double s2[LANES]
    cdef double t1, t2
    cdef float xs[STAGE_READ]
    cdef Py_ssize_t j = 0, m
    if storage is float and TOTALS_SIMD and n <= TOTALS_MAX_RUN:
        moment_totals_float(x, n, shift, &t1, &t2)  # (the same totals: see loops.pxi)
    elif storage is float or storage is double:
        moment_totals(x, n, shift, &t1, &t2)
    elif HALF_TOTALS:
        # converted in registers, the same sums (see fastbn_moment_totals_half)
        moment_totals_half(storage is bfloat, x, n, shift, &t1, &t2)
    else:
        clear(s1, LANES)
        clear(s2, LANES)
        while j < n:
            m = min(<Py_ssize_t>STAGE_READ, n - j)
            widen(x + j, xs, m)
            moment_lanes(xs, m, shift, s1, s2)
            j += m
        t1 = fold_lanes(s1)
        t2 = fold_lanes(s2)
    shift_out[0] = shift
    offset[0] = t1 / n
    m2[0] = nonnegative(t2 - t1 * t1 / n)


cdef inline void tile_moments(const Tile* t, const storage* x, double* shift_out,
                              double* offset, double* m2) noexcept nogil:
    """Per-column moments of a tile (x at its first element) as shift = the tile's first row,
    offset = mean - shift and M2, by sums of d = x - shift."""
    cdef double shift[TILE]
    cdef double s1[TILE]
    cdef double s2[TILE]
    cdef float rows[STAGE_ROWS * TILE]
    cdef Py_ssize_t r = 0, i, m
    if storage is float or storage is double:
        tile_moments_start(x, t.width, shift, s1, s2)
        tile_moments_rows(x, t.stride, t.nrows, t.width, shift, s1, s2)
    else:
        while r < t.nrows:
            m = min(<Py_ssize_t>STAGE_ROWS, t.nrows - r)
            for i in range(m):
                widen(x + (r + i) * t.stride, rows + i * TILE, t.width)
            if r == 0:
                tile_moments_start(rows, t.width, shift, s1, s2)
            tile_moments_rows(rows, TILE, m, t.width, shift, s1, s2)
            r += m
    tile_moments_finish(t.nrows, t.width, shift, s1, s2, shift_out, offset, m2)


cdef inline void segment_grad_sums(const activation* act, const storage* dy, const storage* out,
                                   const storage* x, Py_ssize_t n, double center, real scale,
                                   storage* dx, double* sum_dy, double* sum_dy_xc) noexcept nogil:
    """sum(g) and sum(g * (x - center)) over n elements, g being dy gated by the activation
    (see gate); with dx, also dx = scale * g."""
    cdef double s1[LANES]
    cdef double s2[LANES]
    cdef float dys[STAGE_READ]
    cdef float outs[STAGE_READ]
    cdef float xs[STAGE_READ]
    cdef float dxs[STAGE]
    cdef Py_ssize_t j = 0, m, stage = STAGE_READ if dx == NULL else STAGE
    if storage is float and TOTALS_SIMD and dx == NULL and n <= GRAD_TOTALS_MAX_RUN:
        # the same totals (see loops.pxi)
        grad_totals_float(activation is ReLU, dy, out, x, n, center, sum_dy, sum_dy_xc)
        return
    if (storage is half or storage is bfloat) and HALF_TOTALS:
        # converted in registers, the same sums (see fastbn_grad_totals_half); a function of
        # their own without dx, which the training backward's sums take
        if dx == NULL:
            grad_totals_half(storage is bfloat, activation is ReLU, dy, out, x, n, center,
                             sum_dy, sum_dy_xc)
        else:
            grad_totals_half_dx(storage is bfloat, activation is ReLU, dy, out, x, n, center,
                                <float>scale, dx, sum_dy, sum_dy_xc)
        return
    clear(s1, LANES)
    clear(s2, LANES)
    if storage is float or storage is double:
        grad_lanes(act, <const real*>dy, <const real*>out, <const real*>x, n, center, scale,
                   <real*>dx, s1, s2)
    else:
        while j < n:
            m = min(stage, n - j)
            widen(dy + j, dys, m)
            if activation is ReLU:
                widen(out + j, outs, m)
            widen(x + j, xs, m)
            grad_lanes(act, dys, outs, xs, m, center, <float>scale,
                       &dxs[0] if dx != NULL else <float*>NULL, s1, s2)
            if dx != NULL:
                narrow(dxs, dx + j, m)
            j += m
    sum_dy[0] = fold_lanes(s1)
    sum_dy_xc[0] = fold_lanes(s2)


cdef inline void tile_grad_sums(const activation* act, const Tile* t, const storage* dy,
                                const storage* out, const storage* x, const double* center,
                                const real* scale, storage* dx, double* sum_dy,
                                double* sum_dy_xc) noexcept nogil:
    """Per-column sum(g) and sum(g * (x - center[j])) of a tile (pointers at its first
    element), g being dy gated by the activation; with dx, also dx = scale[j] * g."""
    cdef double s1[TILE]
    cdef double s2[TILE]
    cdef float dys[TILE]
    cdef float outs[TILE]
    cdef float xs[TILE]
    cdef float dxs[TILE]
    cdef Tile row
    cdef Py_ssize_t r, j, o, ahead
    clear(s1, t.width)
    clear(s2, t.width)
    if storage is float or storage is double:
        tile_grad_rows(act, t, <const real*>dy, <const real*>out, <const real*>x, center, scale,
                       <real*>dx, s1, s2)
    else:
        # one row at a time, as a tile of one row
        row.offset = row.col0 = 0
        row.stride = t.width
        row.nrows = 1
        row.width = t.width
        ahead = PREFETCH_ROWS * t.stride
        for r in range(t.nrows):
            o = r * t.stride
            if r + PREFETCH_ROWS < t.nrows:
                prefetch_row(dy + o + ahead, t.width * sizeof(storage))
                prefetch_row(x + o + ahead, t.width * sizeof(storage))
            widen(dy + o, dys, t.width)
            if activation is ReLU:
                widen(out + o, outs, t.width)
            widen(x + o, xs, t.width)
            tile_grad_rows(act, &row, dys, outs, xs, center, <const float*>scale,
                           &dxs[0] if dx != NULL else <float*>NULL, s1, s2)
            if dx != NULL:
                narrow(dxs, dx + o, t.width)
    for j in range(t.width):
        sum_dy[j] = s1[j]
        sum_dy_xc[j] = s2[j]


cdef inline void span_affine(const activation* act, const storage* x, storage* y, Py_ssize_t n,
                             real** k, Py_ssize_t at, bint per_column) noexcept nogil:
    """y[:n] = the affine map of x[:n] (then the activation) with the coefficients of channel
    `at`, or, per_column, of the columns from `at` on."""
    cdef float xs[STAGE]
    cdef float ys[STAGE]
    cdef Py_ssize_t j = 0, m
    if storage is float or storage is double:
        if per_column:
            affine_row(act, <const real*>x, <real*>y, n, k, at)
        else:
            affine_run(act, <const real*>x, <real*>y, n, k, at)
    elif HALF_AFFINE and not per_column:
        # one channel's run, converted in registers (the same bits: see fastbn_affine_half)
        affine_half(storage is bfloat, activation is ReLU, x, y, n, k[FACTOR][at],
                    k[CENTER][at], k[SCALE][at], k[SHIFT][at])
    elif HALF_AFFINE:
        # a row's columns, converted in registers (the same bits: see fastbn_affine_half_row)
        affine_half_row(storage is bfloat, activation is ReLU, x, y, n,
                        <const float*>k[FACTOR] + at if k[FACTOR] != NULL else <const float*>NULL,
                        <const float*>k[CENTER] + at, <const float*>k[SCALE] + at,
                        <const float*>k[SHIFT] + at)
    else:
        while j < n:
            m = min(<Py_ssize_t>STAGE, n - j)
            widen(x + j, xs, m)
            if per_column:
                affine_row(act, xs, ys, m, <float**>k, at + j)
            else:
                affine_run(act, xs, ys, m, <float**>k, at)
            narrow(ys, y + j, m)
            j += m


cdef inline void rows_affine(const activation* act, const storage* x, storage* y,
                            Py_ssize_t stride, Py_ssize_t nrows, Py_ssize_t n, real** k,
                            Py_ssize_t at, bint by_four) noexcept nogil:
    """span_affine per column over nrows rows `stride` apart, n columns from column `at` of
    each; by_four: float32 rows four at a time where the build has fastbn_affine_rows4 (the
    same bits, each column's coefficients loaded once for the four; see rows_by_four)."""
    cdef Py_ssize_t r = 0
    if storage is float and real is float and ROWS_AFFINE and by_four:
        while r + 4 <= nrows:
            affine_rows4(activation is ReLU, <const float*>x + r * stride,
                         <float*>y + r * stride, stride, n,
                         <const float*>k[FACTOR] + at if k[FACTOR] != NULL else <const float*>NULL,
                         <const float*>k[CENTER] + at, <const float*>k[SCALE] + at,
                         <const float*>k[SHIFT] + at)
            r += 4
    for r in range(r, nrows):
        span_affine(act, x + r * stride, y + r * stride, n, k, at, True)


cdef inline void span_grad_input(const activation* act, const storage* dy, const storage* out,
                                 const storage* x, storage* dx, Py_ssize_t n, real** k,
                                 Py_ssize_t at, bint per_column) noexcept nogil:
    """dx[:n] from dy, out (the activation's mask) and x with the coefficients of channel `at`,
    or, per_column, of the columns from `at` on."""
    cdef float dys[STAGE]
    cdef float outs[STAGE]
    cdef float xs[STAGE]
    cdef float dxs[STAGE]
    cdef Py_ssize_t j = 0, m
    if storage is float or storage is double:
        if per_column:
            grad_input_row(act, <const real*>dy, <const real*>out, <const real*>x, <real*>dx, n,
                           k, at)
        else:
            grad_input_run(act, <const real*>dy, <const real*>out, <const real*>x, <real*>dx, n,
                           k, at)
    elif HALF_AFFINE and not per_column:
        # one channel's run, converted in registers (the same bits: see fastbn_grad_input_half)
        grad_input_half(storage is bfloat, activation is ReLU, dy, out, x, dx, n, k[GAIN][at],
                        k[FACTOR][at], k[CENTER][at], k[SCALE][at], k[SHIFT][at])
    elif HALF_AFFINE:
        # a row's columns, converted in registers (the same bits: see
        # fastbn_grad_input_half_row)
        grad_input_half_row(storage is bfloat, activation is ReLU, dy, out, x, dx, n,
                            <const float*>k[GAIN] + at,
                            <const float*>k[FACTOR] + at if k[FACTOR] != NULL else <const float*>NULL,
                            <const float*>k[CENTER] + at, <const float*>k[SCALE] + at,
                            <const float*>k[SHIFT] + at)
    else:
        while j < n:
            m = min(<Py_ssize_t>STAGE, n - j)
            widen(dy + j, dys, m)
            if activation is ReLU:
                widen(out + j, outs, m)
            widen(x + j, xs, m)
            if per_column:
                grad_input_row(act, dys, outs, xs, dxs, m, <float**>k, at + j)
            else:
                grad_input_run(act, dys, outs, xs, dxs, m, <float**>k, at)
            narrow(dxs, dx + j, m)
            j += m


cdef inline const storage* at(const storage* p, Py_ssize_t offset) noexcept nogil:
    """p + offset, or NULL for an absent (NULL) optional array."""
    return NULL if p == NULL else p + offset


cdef inline void rows_grad_input(const activation* act, const storage* dy, const storage* out,
                                 const storage* x, storage* dx, Py_ssize_t stride,
                                 Py_ssize_t nrows, Py_ssize_t n, real** k, Py_ssize_t col,
                                 bint by_four) noexcept nogil:
    """span_grad_input per column over nrows rows `stride` apart, n columns from column `col`
    of each; by_four: float32 rows four at a time where the build has
    fastbn_grad_input_rows4 (the same bits; see rows_affine)."""
    cdef Py_ssize_t r = 0, o
    if storage is float and real is float and ROWS_AFFINE and by_four:
        while r + 4 <= nrows:
            o = r * stride
            grad_input_rows4(activation is ReLU, dy + o, at(out, o), x + o, dx + o, stride, n,
                             k[GAIN] + col,
                             <const float*>k[FACTOR] + col if k[FACTOR] != NULL
                             else <const float*>NULL,
                             k[CENTER] + col, k[SCALE] + col, k[SHIFT] + col)
            r += 4
    for r in range(r, nrows):
        o = r * stride
        span_grad_input(act, dy + o, at(out, o), x + o, dx + o, n, k, col, True)
