# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Typed batch-norm kernels over C-contiguous (N, C, *spatial) memory.

These functions trust their caller (fastbn.functional): arrays are C-contiguous, data is
float32 or float64, per-channel parameters and buffers have the data's dtype, and saved
statistics and per-channel sums are float64 arrays of length C.  Every kernel releases the GIL
and splits its work over OpenMP threads.

Layouts
-------
An input of shape (N, C, *spatial) is walked as (N, C, S), S being the product of the spatial
sizes, in one of two ways chosen from the shape alone:

* planar (S >= PLANAR_MIN_S): each plane x[n, c, :] is long and contiguous.  Reductions cut
  planes into fixed segments of at most SEGMENT elements; elementwise passes use one set of
  per-channel coefficients per segment.
* columns (smaller S, BatchNorm1d's (N, C) among them): the tensor is a matrix whose rows hold
  `group` whole samples (`period` = group*C*S elements, enough to vectorise along a row), plus
  a shorter last row for the samples left over.  Reductions run down the columns, in fixed
  blocks of rows and tiles of TILE columns; elementwise passes use per-column coefficients.

Determinism
-----------
A reduction is cut into work items that depend only on the shape.  Each item stores its
partial result, and the partials of a channel are merged in a fixed order afterwards, so which
thread computed an item does not matter: results are bitwise identical for any thread count.

Numerics
--------
* Statistics are single-pass shifted sums accumulated in float64 (Chan, Golub & LeVeque,
  "Algorithms for computing the sample variance", 1983): each chunk sums d = x - K and d*d
  around K = its own first element, so that the cancellation in M2 = sum(d*d) - sum(d)**2/n is
  bounded by the chunk length rather than by the data's offset.  For float32 data d is exact
  in float64.  Chunk results (n, K, mean - K, M2) are combined with Chan's pairwise update,
  their means taken as offsets from one reference value of the channel so that the rounding
  of a mean to the data's magnitude never enters; the channel's mean comes out unrounded, as
  a float64 pair (TwoSum).
* Normalisation computes y = (x - mean_hi) * scale + shift', mean_hi being the mean rounded to
  the data's dtype and shift' = bias - (mean - mean_hi) * scale folding the rest back in.
  The subtraction of two nearby floats is exact, so the output keeps full precision on data
  with a large offset, where the one-FMA form x * scale + (bias - mean * scale) loses
  |mean| / std ulps to cancellation (and so, for float64 data, does a float64 two-pass
  computation).  The backward's elementwise pass uses the same split.
"""

from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

cimport numpy as cnp

cnp.import_array()

ctypedef fused floating:
    float
    double

cdef enum:
    # Explicit accumulator lanes of a plane reduction.  A compile-time count lets the compiler
    # keep them in SIMD registers (32 doubles = 4 AVX-512 or 8 AVX2 registers per sum) with
    # enough independent chains to hide the add latency; the summation order is fixed by this
    # source, whatever the instruction set.
    LANES = 32
    # Planes at least this long are reduced along their length; shorter ones down the columns.
    PLANAR_MIN_S = 256
    # Longest plane segment reduced as one chunk.
    SEGMENT = 8192
    # Columns per tile of a column reduction: its float64 accumulators live on the stack.
    TILE = 256
    # Shortest row of the columns layout (several samples share a row when C*S is smaller).
    MIN_PERIOD = 128
    # Column reductions cut the rows into blocks so as to have at least this many work items.
    ITEMS_TARGET = 64
    BLOCK_MIN_ROWS = 16
    # Elements per thread under which another thread costs more (fork/join) than it saves.
    GRAIN = 32768


cdef struct Geometry:
    Py_ssize_t n, c, s, total
    bint planar
    # planar layout: each plane is cut into `segs` segments of `seg_len` (the last may be shorter)
    Py_ssize_t segs, seg_len
    # columns layout: `rows` rows of `period` elements, then a last row of `tail` samples
    Py_ssize_t group, period, rows, tail
    Py_ssize_t block, full_blocks, tiles, tail_tiles
    # reduction work items and the length of their partial-result arrays
    Py_ssize_t items, partial_len


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef void set_geometry(Geometry* g, cnp.ndarray x) noexcept:
    cdef cnp.npy_intp* shape = cnp.PyArray_DIMS(x)
    cdef Py_ssize_t i, cs
    g.n = shape[0]
    g.c = shape[1]
    g.s = 1
    for i in range(2, cnp.PyArray_NDIM(x)):
        g.s *= shape[i]
    g.total = g.n * g.c * g.s
    g.planar = g.s >= PLANAR_MIN_S
    g.segs = g.seg_len = g.group = g.period = g.rows = g.tail = 0
    g.block = g.full_blocks = g.tiles = g.tail_tiles = g.items = g.partial_len = 0
    if g.total == 0:
        return
    if g.planar:
        g.segs = ceil_div(g.s, SEGMENT)
        g.seg_len = ceil_div(ceil_div(g.s, g.segs), LANES) * LANES
        g.segs = ceil_div(g.s, g.seg_len)
        g.items = g.n * g.c * g.segs
        g.partial_len = g.items
    else:
        cs = g.c * g.s
        g.group = 1 if cs >= MIN_PERIOD else min(g.n, ceil_div(MIN_PERIOD, cs))
        g.period = g.group * cs
        g.rows = g.n // g.group
        g.tail = g.n - g.rows * g.group
        g.tiles = ceil_div(g.period, TILE)
        g.block = max(<Py_ssize_t>BLOCK_MIN_ROWS, ceil_div(g.rows, ceil_div(ITEMS_TARGET, g.tiles)))
        g.full_blocks = ceil_div(g.rows, g.block)
        g.tail_tiles = ceil_div(g.tail * cs, TILE)
        g.items = g.full_blocks * g.tiles + g.tail_tiles
        g.partial_len = (g.full_blocks + (g.tail > 0)) * g.period


cdef inline int threads_for(const Geometry* g, int n_threads, Py_ssize_t work_items) noexcept nogil:
    """Threads worth starting for this much data and this many independent items."""
    cdef Py_ssize_t nt = n_threads
    nt = min(nt, g.total // GRAIN)
    nt = min(nt, work_items)
    return <int>max(nt, <Py_ssize_t>1)


# ---------------------------------------------------------------------------------------------
# Work items.  A reduction item is a plane segment (planar) or a tile of a block of rows
# (columns); an elementwise item is a plane segment (planar) or a row (columns).
# ---------------------------------------------------------------------------------------------

cdef inline Py_ssize_t planar_item(const Geometry* g, Py_ssize_t k, Py_ssize_t* length,
                                   Py_ssize_t* channel, Py_ssize_t* slot) noexcept nogil:
    """Offset of plane segment k, its length, its channel and its partial slot.

    Slots are channel-major, (channel, sample, segment), so a channel's partials are contiguous.
    """
    cdef Py_ssize_t plane = k // g.segs
    cdef Py_ssize_t seg = k - plane * g.segs
    cdef Py_ssize_t start = seg * g.seg_len
    cdef Py_ssize_t sample = plane // g.c
    channel[0] = plane - sample * g.c
    length[0] = min(g.seg_len, g.s - start)
    slot[0] = (channel[0] * g.n + sample) * g.segs + seg
    return plane * g.s + start


cdef inline Py_ssize_t columns_item(const Geometry* g, Py_ssize_t k, Py_ssize_t* nrows,
                                    Py_ssize_t* width, Py_ssize_t* col0) noexcept nogil:
    """Offset of the first element of column tile k, its rows and columns; its partials go to
    the partial arrays at offset returned-offset's (block * period + col0)."""
    cdef Py_ssize_t b, t, row0, row_width
    if k < g.full_blocks * g.tiles:
        b = k // g.tiles
        t = k - b * g.tiles
        row0 = b * g.block
        nrows[0] = min(g.block, g.rows - row0)
        row_width = g.period
    else:
        t = k - g.full_blocks * g.tiles
        row0 = g.rows
        nrows[0] = 1
        row_width = g.tail * g.c * g.s
    col0[0] = t * TILE
    width[0] = min(<Py_ssize_t>TILE, row_width - col0[0])
    return row0 * g.period + col0[0]


cdef inline Py_ssize_t columns_slot(const Geometry* g, Py_ssize_t k, Py_ssize_t col0) noexcept nogil:
    """Partial slot of column tile k: its block's row of partials, at its first column."""
    cdef Py_ssize_t b = k // g.tiles if k < g.full_blocks * g.tiles else g.full_blocks
    return b * g.period + col0


cdef inline Py_ssize_t row_length(const Geometry* g, Py_ssize_t r) noexcept nogil:
    """Elements in row r of the columns layout (the last, short row holds `tail` samples)."""
    return g.period if r < g.rows else g.tail * g.c * g.s


cdef inline Py_ssize_t n_rows(const Geometry* g) noexcept nogil:
    return g.rows + (g.tail > 0)


cdef void expand(const Geometry* g, const floating* per_channel, floating* per_column) noexcept nogil:
    """per_column[j] = per_channel[channel of column j], for the `period` columns of a row."""
    cdef Py_ssize_t rep, ch, i, j = 0
    cdef floating v
    for rep in range(g.group):
        for ch in range(g.c):
            v = per_channel[ch]
            for i in range(g.s):
                per_column[j] = v
                j += 1


# ---------------------------------------------------------------------------------------------
# Inner loops
# ---------------------------------------------------------------------------------------------

cdef inline double fold_lanes(double* acc) noexcept nogil:
    """Sum of LANES partial sums, pairwise (fixed order)."""
    cdef int width = LANES // 2, j
    while width > 0:
        for j in range(width):
            acc[j] += acc[j + width]
        width //= 2
    return acc[0]


cdef inline void segment_moments(const floating* x, Py_ssize_t n, double* shift_out,
                                 double* offset, double* m2) noexcept nogil:
    """Moments of x[:n] (n >= 1) as shift = x[0], offset = mean - shift and M2, by sums of
    d = x - shift in LANES float64 lanes.  The mean is kept as two parts so that merging
    chunks loses nothing to its rounding."""
    cdef double shift = x[0]
    cdef double s1[LANES]
    cdef double s2[LANES]
    cdef double d, t1, t2
    cdef Py_ssize_t i = 0, j, full = n - n % LANES
    for j in range(LANES):
        s1[j] = 0.0
        s2[j] = 0.0
    while i < full:
        for j in range(LANES):
            d = <double>x[i + j] - shift
            s1[j] += d
            s2[j] += d * d
        i += LANES
    for j in range(n - full):
        d = <double>x[full + j] - shift
        s1[j] += d
        s2[j] += d * d
    t1 = fold_lanes(s1)
    t2 = fold_lanes(s2)
    shift_out[0] = shift
    offset[0] = t1 / n
    m2[0] = max(t2 - t1 * t1 / n, 0.0)


cdef inline void segment_grad_sums(const floating* dy, const floating* x, Py_ssize_t n,
                                   double center, floating scale, floating* dx,
                                   double* sum_dy, double* sum_dy_xc) noexcept nogil:
    """sum(dy) and sum(dy * (x - center)) over n elements; with dx, also dx = scale * dy."""
    cdef double s1[LANES]
    cdef double s2[LANES]
    cdef double v
    cdef Py_ssize_t i = 0, j, full = n - n % LANES
    for j in range(LANES):
        s1[j] = 0.0
        s2[j] = 0.0
    if dx == NULL:
        while i < full:
            for j in range(LANES):
                v = dy[i + j]
                s1[j] += v
                s2[j] += v * (<double>x[i + j] - center)
            i += LANES
    else:
        while i < full:
            for j in range(LANES):
                v = dy[i + j]
                dx[i + j] = scale * dy[i + j]
                s1[j] += v
                s2[j] += v * (<double>x[i + j] - center)
            i += LANES
    for j in range(n - full):
        v = dy[full + j]
        if dx != NULL:
            dx[full + j] = scale * dy[full + j]
        s1[j] += v
        s2[j] += v * (<double>x[full + j] - center)
    sum_dy[0] = fold_lanes(s1)
    sum_dy_xc[0] = fold_lanes(s2)


cdef inline void tile_moments(const floating* x, Py_ssize_t stride, Py_ssize_t nrows,
                              Py_ssize_t width, double* shift_out, double* offset,
                              double* m2) noexcept nogil:
    """Per-column moments of a tile (nrows rows `stride` apart, `width` columns) as shift = the
    tile's first row, offset = mean - shift and M2, by sums of d = x - shift."""
    cdef double shift[TILE]
    cdef double s1[TILE]
    cdef double s2[TILE]
    cdef const floating* row
    cdef double d, inv_n = 1.0 / nrows
    cdef Py_ssize_t r, j
    for j in range(width):
        shift[j] = x[j]
        s1[j] = 0.0
        s2[j] = 0.0
    for r in range(1, nrows):
        row = x + r * stride
        for j in range(width):
            d = <double>row[j] - shift[j]
            s1[j] += d
            s2[j] += d * d
    for j in range(width):
        shift_out[j] = shift[j]
        offset[j] = s1[j] * inv_n
        m2[j] = max(s2[j] - s1[j] * s1[j] * inv_n, 0.0)


cdef inline void tile_grad_sums(const floating* dy, const floating* x, Py_ssize_t stride,
                                Py_ssize_t nrows, Py_ssize_t width, const double* center,
                                const floating* scale, floating* dx,
                                double* sum_dy, double* sum_dy_xc) noexcept nogil:
    """Per-column sum(dy) and sum(dy * (x - center[j])) of a tile; with dx, also dx = scale[j] * dy."""
    cdef double s1[TILE]
    cdef double s2[TILE]
    cdef double v
    cdef Py_ssize_t r, j, o
    for j in range(width):
        s1[j] = 0.0
        s2[j] = 0.0
    for r in range(nrows):
        o = r * stride
        if dx == NULL:
            for j in range(width):
                v = dy[o + j]
                s1[j] += v
                s2[j] += v * (<double>x[o + j] - center[j])
        else:
            for j in range(width):
                v = dy[o + j]
                dx[o + j] = scale[j] * dy[o + j]
                s1[j] += v
                s2[j] += v * (<double>x[o + j] - center[j])
    for j in range(width):
        sum_dy[j] = s1[j]
        sum_dy_xc[j] = s2[j]


cdef inline void affine_run(const floating* x, floating* y, Py_ssize_t n,
                            floating center, floating scale, floating shift) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = (x[i] - center) * scale + shift


cdef inline void affine_row(const floating* x, floating* y, Py_ssize_t n, const floating* center,
                            const floating* scale, const floating* shift) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = (x[i] - center[i]) * scale[i] + shift[i]


cdef inline void grad_input_run(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                                floating a, floating b, floating center, floating c) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = a * dy[i] + b * (x[i] - center) + c


cdef inline void grad_input_row(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                                const floating* a, const floating* b, const floating* center,
                                const floating* c) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = a[i] * dy[i] + b[i] * (x[i] - center[i]) + c[i]


# ---------------------------------------------------------------------------------------------
# Merging partials, per channel, in a fixed order
# ---------------------------------------------------------------------------------------------

cdef inline void chan_merge(double* n_a, double* mean_a, double* m2_a,
                            double n_b, double mean_b, double m2_b) noexcept nogil:
    """(n_a, mean_a, m2_a) <- the moments of both sets (Chan et al.'s pairwise update)."""
    cdef double n, delta, r
    if n_a[0] == 0.0:
        n_a[0] = n_b
        mean_a[0] = mean_b
        m2_a[0] = m2_b
        return
    n = n_a[0] + n_b
    delta = mean_b - mean_a[0]
    r = n_b / n
    mean_a[0] += delta * r
    m2_a[0] += m2_b + delta * delta * n_a[0] * r
    n_a[0] = n


cdef inline Py_ssize_t block_rows(const Geometry* g, Py_ssize_t b) noexcept nogil:
    return min(g.block, g.rows - b * g.block) if b < g.full_blocks else 1


cdef inline Py_ssize_t block_groups(const Geometry* g, Py_ssize_t b) noexcept nogil:
    return g.group if b < g.full_blocks else g.tail


cdef inline void two_sum(double a, double b, double* total, double* error) noexcept nogil:
    """total = fl(a + b) and error = (a + b) - total exactly (Knuth's TwoSum)."""
    cdef double t = a + b
    cdef double bb = t - a
    error[0] = (a - (t - bb)) + (b - bb)
    total[0] = t


cdef void merge_moments(const Geometry* g, const double* pshift, const double* poffset,
                        const double* pm2, Py_ssize_t ch, double* mean_hi, double* mean_lo,
                        double* m2) noexcept nogil:
    """Channel ch's mean and M2 from its partials (planar: one per plane segment; columns: one
    per column and block of rows).

    Partial means are merged as offsets from one reference shift, the channel's first data
    value, so that their rounding relative to the data's magnitude never enters; the mean is
    returned unrounded as mean_hi + mean_lo.
    """
    cdef double n = 0.0, mu = 0.0, q = 0.0, first, gm, sq, sq2, dev
    cdef double ref = pshift[ch * g.n * g.segs] if g.planar else pshift[ch * g.s]
    cdef Py_ssize_t p, b, grp, j, base, off, groups, nrows, k
    if g.planar:
        base = ch * g.n * g.segs
        for p in range(g.n * g.segs):
            k = p % g.segs
            chan_merge(&n, &mu, &q, <double>min(g.seg_len, g.s - k * g.seg_len),
                       (pshift[base + p] - ref) + poffset[base + p], pm2[base + p])
    else:
        # Within a block every column has the same count, so a channel's columns merge in closed
        # form: M2 = sum(M2_j) + rows * sum((mean_j - mean)**2).  Their mean is taken relative
        # to the first one, so equal means (a constant channel) merge exactly.
        for b in range(g.full_blocks + (g.tail > 0)):
            nrows = block_rows(g, b)
            groups = block_groups(g, b)
            base = b * g.period + ch * g.s
            first = (pshift[base] - ref) + poffset[base]
            gm = 0.0
            for grp in range(groups):
                off = base + grp * g.c * g.s
                for j in range(g.s):
                    gm += ((pshift[off + j] - ref) + poffset[off + j]) - first
            gm = first + gm / (groups * g.s)
            sq = 0.0
            sq2 = 0.0
            for grp in range(groups):
                off = base + grp * g.c * g.s
                for j in range(g.s):
                    dev = ((pshift[off + j] - ref) + poffset[off + j]) - gm
                    sq += dev * dev
                    sq2 += pm2[off + j]
            chan_merge(&n, &mu, &q, <double>(nrows * groups * g.s), gm, sq2 + nrows * sq)
    two_sum(ref, mu, mean_hi, mean_lo)
    m2[0] = q


cdef void merge_sums(const Geometry* g, const double* pa, const double* pb, Py_ssize_t ch,
                     double* sum_a, double* sum_b) noexcept nogil:
    """Channel ch's two sums from its partials, added in a fixed order."""
    cdef double ta = 0.0, tb = 0.0
    cdef Py_ssize_t p, b, grp, j, base, off
    if g.planar:
        base = ch * g.n * g.segs
        for p in range(g.n * g.segs):
            ta += pa[base + p]
            tb += pb[base + p]
    else:
        for b in range(g.full_blocks + (g.tail > 0)):
            base = b * g.period + ch * g.s
            for grp in range(block_groups(g, b)):
                off = base + grp * g.c * g.s
                for j in range(g.s):
                    ta += pa[off + j]
                    tb += pb[off + j]
    sum_a[0] = ta
    sum_b[0] = tb


# ---------------------------------------------------------------------------------------------
# Passes over the whole tensor
# ---------------------------------------------------------------------------------------------

cdef inline void moments_item(const Geometry* g, const floating* x, Py_ssize_t k,
                              double* pshift, double* poffset, double* pm2) noexcept nogil:
    cdef Py_ssize_t off, length, ch, slot, nrows, width, col0
    if g.planar:
        off = planar_item(g, k, &length, &ch, &slot)
        segment_moments(x + off, length, pshift + slot, poffset + slot, pm2 + slot)
    else:
        off = columns_item(g, k, &nrows, &width, &col0)
        slot = columns_slot(g, k, col0)
        tile_moments(x + off, g.period, nrows, width, pshift + slot, poffset + slot, pm2 + slot)


cdef int moments_pass(const Geometry* g, const floating* x, double* mean_hi, double* mean_lo,
                      double* m2, int n_threads) noexcept nogil:
    """Per-channel mean (as mean_hi + mean_lo; mean_lo may be NULL) and M2 (sum of squared
    deviations) of x; -1 if out of memory."""
    if g.total == 0:
        return 0
    cdef Py_ssize_t k, ch
    cdef double lo
    cdef int nt = threads_for(g, n_threads, g.items)
    cdef double* pshift = <double*>malloc(3 * g.partial_len * sizeof(double))
    if pshift == NULL:
        return -1
    cdef double* poffset = pshift + g.partial_len
    cdef double* pm2 = pshift + 2 * g.partial_len
    if nt == 1:
        for k in range(g.items):
            moments_item(g, x, k, pshift, poffset, pm2)
    else:
        for k in prange(g.items, num_threads=nt, schedule="static"):
            moments_item(g, x, k, pshift, poffset, pm2)
    for ch in range(g.c):
        merge_moments(g, pshift, poffset, pm2, ch, mean_hi + ch, &lo, m2 + ch)
        if mean_lo != NULL:
            mean_lo[ch] = lo
    free(pshift)
    return 0


cdef inline void grad_sums_item(const Geometry* g, const floating* dy, const floating* x,
                                const double* center, const floating* scale, floating* dx,
                                Py_ssize_t k, double* pa, double* pb) noexcept nogil:
    """Partial sums of item k.  `center` and `scale` are per channel (planar) or per column
    (columns); dx, when not NULL, receives scale * dy."""
    cdef Py_ssize_t off, length, ch, slot, nrows, width, col0
    if g.planar:
        off = planar_item(g, k, &length, &ch, &slot)
        segment_grad_sums(dy + off, x + off, length, center[ch],
                          scale[ch] if dx != NULL else <floating>0, NULL if dx == NULL else dx + off,
                          pa + slot, pb + slot)
    else:
        off = columns_item(g, k, &nrows, &width, &col0)
        slot = columns_slot(g, k, col0)
        tile_grad_sums(dy + off, x + off, g.period, nrows, width, center + col0,
                       NULL if dx == NULL else scale + col0, NULL if dx == NULL else dx + off,
                       pa + slot, pb + slot)


cdef int grad_sums_pass(const Geometry* g, const floating* dy, const floating* x,
                        const double* center, const floating* scale, floating* dx,
                        double* sum_dy, double* sum_dy_xc, int n_threads) noexcept nogil:
    """Per-channel sum(dy) and sum(dy * (x - center)); with dx, also dx = scale * dy in the
    same pass.  center and scale are per channel.  -1 if out of memory."""
    if g.total == 0:
        return 0
    cdef Py_ssize_t k, ch
    cdef int nt = threads_for(g, n_threads, g.items)
    cdef double* pa = <double*>malloc(2 * g.partial_len * sizeof(double))
    cdef double* col_center = NULL
    cdef floating* col_scale = NULL
    if pa == NULL:
        return -1
    cdef double* pb = pa + g.partial_len
    if not g.planar:
        col_center = <double*>malloc(g.period * sizeof(double))
        col_scale = <floating*>malloc(g.period * sizeof(floating))
        if col_center == NULL or col_scale == NULL:
            free(pa); free(col_center); free(col_scale)
            return -1
        expand(g, center, col_center)
        if dx != NULL:
            expand(g, scale, col_scale)
        center = col_center
        scale = col_scale
    if nt == 1:
        for k in range(g.items):
            grad_sums_item(g, dy, x, center, scale, dx, k, pa, pb)
    else:
        for k in prange(g.items, num_threads=nt, schedule="static"):
            grad_sums_item(g, dy, x, center, scale, dx, k, pa, pb)
    for ch in range(g.c):
        merge_sums(g, pa, pb, ch, sum_dy + ch, sum_dy_xc + ch)
    free(pa)
    free(col_center)
    free(col_scale)
    return 0


cdef inline void affine_item(const Geometry* g, const floating* x, floating* y, Py_ssize_t k,
                             const floating* center, const floating* scale,
                             const floating* shift) noexcept nogil:
    cdef Py_ssize_t off, length, ch, slot
    if g.planar:
        off = planar_item(g, k, &length, &ch, &slot)
        affine_run(x + off, y + off, length, center[ch], scale[ch], shift[ch])
    else:
        off = k * g.period
        affine_row(x + off, y + off, row_length(g, k), center, scale, shift)


cdef int affine_pass(const Geometry* g, const floating* x, floating* y, const floating* center,
                     const floating* scale, const floating* shift, int n_threads) noexcept nogil:
    """y = (x - center) * scale + shift with per-channel coefficients; -1 if out of memory."""
    if g.total == 0:
        return 0
    cdef Py_ssize_t k, items = g.items if g.planar else n_rows(g)
    cdef int nt = threads_for(g, n_threads, items)
    cdef floating* cols = NULL
    if not g.planar:
        cols = <floating*>malloc(3 * g.period * sizeof(floating))
        if cols == NULL:
            return -1
        expand(g, center, cols)
        expand(g, scale, cols + g.period)
        expand(g, shift, cols + 2 * g.period)
        center = cols
        scale = cols + g.period
        shift = cols + 2 * g.period
    if nt == 1:
        for k in range(items):
            affine_item(g, x, y, k, center, scale, shift)
    else:
        for k in prange(items, num_threads=nt, schedule="static"):
            affine_item(g, x, y, k, center, scale, shift)
    free(cols)
    return 0


cdef inline void grad_input_item(const Geometry* g, const floating* dy, const floating* x,
                                 floating* dx, Py_ssize_t k, const floating* a, const floating* b,
                                 const floating* center, const floating* c) noexcept nogil:
    cdef Py_ssize_t off, length, ch, slot
    if g.planar:
        off = planar_item(g, k, &length, &ch, &slot)
        grad_input_run(dy + off, x + off, dx + off, length, a[ch], b[ch], center[ch], c[ch])
    else:
        off = k * g.period
        grad_input_row(dy + off, x + off, dx + off, row_length(g, k), a, b, center, c)


cdef int grad_input_pass(const Geometry* g, const floating* dy, const floating* x, floating* dx,
                         const floating* a, const floating* b, const floating* center,
                         const floating* c, int n_threads) noexcept nogil:
    """dx = a * dy + b * (x - center) + c with per-channel coefficients; -1 if out of memory."""
    if g.total == 0:
        return 0
    cdef Py_ssize_t k, items = g.items if g.planar else n_rows(g)
    cdef int nt = threads_for(g, n_threads, items)
    cdef floating* cols = NULL
    if not g.planar:
        cols = <floating*>malloc(4 * g.period * sizeof(floating))
        if cols == NULL:
            return -1
        expand(g, a, cols)
        expand(g, b, cols + g.period)
        expand(g, center, cols + 2 * g.period)
        expand(g, c, cols + 3 * g.period)
        a = cols
        b = cols + g.period
        center = cols + 2 * g.period
        c = cols + 3 * g.period
    if nt == 1:
        for k in range(items):
            grad_input_item(g, dy, x, dx, k, a, b, center, c)
    else:
        for k in prange(items, num_threads=nt, schedule="static"):
            grad_input_item(g, dy, x, dx, k, a, b, center, c)
    free(cols)
    return 0


# ---------------------------------------------------------------------------------------------
# Per-channel epilogues: from statistics to the coefficients of the elementwise passes
# ---------------------------------------------------------------------------------------------

cdef inline void split_center(double mean_hi, double mean_lo, double scale, double shift,
                              floating* center, floating* shift_out) noexcept nogil:
    """center = the mean (mean_hi + mean_lo) rounded to the data's dtype; shift_out folds the
    rest back in, so that (x - center) * scale + shift_out == (x - mean) * scale + shift."""
    center[0] = <floating>mean_hi
    cdef double rest = (mean_hi - <double>center[0]) + mean_lo
    if rest == 0.0:
        shift_out[0] = <floating>shift      # also avoids 0 * inf when scale is infinite
    else:
        shift_out[0] = <floating>(shift - rest * scale)


cdef int normalize(const Geometry* g, const floating* x, floating* y, const floating* weight,
                   const floating* bias, const double* mean, const double* mean_lo,
                   const double* invstd, int n_threads) noexcept nogil:
    """y = (x - mean) * invstd * weight + bias, the mean given as mean + mean_lo (mean_lo and
    weight and bias may be NULL)."""
    cdef floating* coef = <floating*>malloc(3 * g.c * sizeof(floating))
    cdef Py_ssize_t ch
    cdef double scale
    cdef int rc
    if coef == NULL:
        return -1
    for ch in range(g.c):
        scale = invstd[ch] * (1.0 if weight == NULL else <double>weight[ch])
        coef[g.c + ch] = <floating>scale
        split_center(mean[ch], 0.0 if mean_lo == NULL else mean_lo[ch], scale,
                     0.0 if bias == NULL else <double>bias[ch], coef + ch, coef + 2 * g.c + ch)
    rc = affine_pass(g, x, y, coef, coef + g.c, coef + 2 * g.c, n_threads)
    free(coef)
    return rc


cdef int forward_train_impl(const Geometry* g, const floating* x, floating* y,
                            const floating* weight, const floating* bias,
                            floating* running_mean, floating* running_var,
                            double momentum, double eps, double* save_mean, double* save_invstd,
                            int n_threads) noexcept nogil:
    cdef double* m2 = <double*>malloc(2 * g.c * sizeof(double))
    cdef double count = <double>(g.n * g.s)
    cdef Py_ssize_t ch
    cdef int rc
    if m2 == NULL:
        return -1
    cdef double* mean_lo = m2 + g.c
    rc = moments_pass(g, x, save_mean, mean_lo, m2, n_threads)
    if rc == 0:
        for ch in range(g.c):
            save_invstd[ch] = 1.0 / sqrt(m2[ch] / count + eps)
            if running_mean != NULL:
                running_mean[ch] = <floating>(momentum * save_mean[ch]
                                              + (1.0 - momentum) * running_mean[ch])
            if running_var != NULL:
                # running_var tracks the unbiased variance; normalisation uses the biased one.
                running_var[ch] = <floating>(momentum * (m2[ch] / (count - 1.0))
                                             + (1.0 - momentum) * running_var[ch])
        rc = normalize(g, x, y, weight, bias, save_mean, mean_lo, save_invstd, n_threads)
    free(m2)
    return rc


cdef int forward_eval_impl(const Geometry* g, const floating* x, floating* y,
                           const floating* weight, const floating* bias,
                           const floating* running_mean, const floating* running_var, double eps,
                           double* save_mean, double* save_invstd, int n_threads) noexcept nogil:
    cdef Py_ssize_t ch
    for ch in range(g.c):
        save_mean[ch] = running_mean[ch]
        save_invstd[ch] = 1.0 / sqrt(<double>running_var[ch] + eps)
    return normalize(g, x, y, weight, bias, save_mean, NULL, save_invstd, n_threads)


cdef int grad_input_from_sums(const Geometry* g, const floating* dy, const floating* x,
                              floating* dx, const floating* weight, const double* mean,
                              const double* invstd, const double* sum_dy,
                              const double* sum_dy_xc, double count, floating* grad_weight,
                              floating* grad_bias, int n_threads) noexcept nogil:
    """Training-mode backward given the per-channel sums of dy and dy * (x - mean) over all
    `count` values of each channel (on one process, or gathered from several)."""
    cdef floating* coef = <floating*>malloc(4 * g.c * sizeof(floating))
    cdef double w, a, b, c
    cdef Py_ssize_t ch
    cdef int rc
    if coef == NULL:
        return -1
    for ch in range(g.c):
        if grad_bias != NULL:
            grad_bias[ch] = <floating>sum_dy[ch]
        if grad_weight != NULL:
            grad_weight[ch] = <floating>(sum_dy_xc[ch] * invstd[ch])
        # dx = w*invstd * (dy - mean(dy) - (x - mean) * invstd**2 * mean(dy * (x - mean)))
        w = 1.0 if weight == NULL else <double>weight[ch]
        a = w * invstd[ch]
        b = -a * invstd[ch] * invstd[ch] * sum_dy_xc[ch] / count
        c = -a * sum_dy[ch] / count
        coef[ch] = <floating>a
        coef[g.c + ch] = <floating>b
        split_center(mean[ch], 0.0, b, c, coef + 2 * g.c + ch, coef + 3 * g.c + ch)
    rc = grad_input_pass(g, dy, x, dx, coef, coef + g.c, coef + 2 * g.c, coef + 3 * g.c, n_threads)
    free(coef)
    return rc


cdef int backward_train_impl(const Geometry* g, const floating* dy, const floating* x,
                             floating* dx, const floating* weight, const double* mean,
                             const double* invstd, floating* grad_weight, floating* grad_bias,
                             int n_threads) noexcept nogil:
    """Backward of training-mode normalisation (batch statistics depend on x)."""
    cdef double* sums = <double*>malloc(2 * g.c * sizeof(double))
    cdef int rc
    if sums == NULL:
        return -1
    rc = grad_sums_pass(g, dy, x, mean, <floating*>NULL, <floating*>NULL,
                        sums, sums + g.c, n_threads)
    if rc == 0:
        rc = grad_input_from_sums(g, dy, x, dx, weight, mean, invstd, sums, sums + g.c,
                                  <double>(g.n * g.s), grad_weight, grad_bias, n_threads)
    free(sums)
    return rc


cdef int backward_eval_impl(const Geometry* g, const floating* dy, const floating* x,
                            floating* dx, const floating* weight, const double* mean,
                            const double* invstd, floating* grad_weight, floating* grad_bias,
                            int n_threads) noexcept nogil:
    """Backward of eval-mode normalisation (fixed statistics): dx = weight * invstd * dy, in the
    same pass as the sums for the parameter gradients when those are wanted."""
    cdef floating* coef = <floating*>malloc(3 * g.c * sizeof(floating))
    cdef double* sums = NULL
    cdef Py_ssize_t ch
    cdef int rc
    if coef == NULL:
        return -1
    for ch in range(g.c):
        coef[ch] = <floating>(invstd[ch] * (1.0 if weight == NULL else <double>weight[ch]))
        coef[g.c + ch] = 0
        coef[2 * g.c + ch] = 0
    if grad_weight == NULL and grad_bias == NULL:
        # dx = scale * (dy - 0) + 0: the normalisation pass applied to dy.
        rc = affine_pass(g, dy, dx, coef + g.c, coef, coef + 2 * g.c, n_threads)
    else:
        sums = <double*>malloc(2 * g.c * sizeof(double))
        if sums == NULL:
            free(coef)
            return -1
        rc = grad_sums_pass(g, dy, x, mean, coef, dx, sums, sums + g.c, n_threads)
        if rc == 0:
            for ch in range(g.c):
                if grad_bias != NULL:
                    grad_bias[ch] = <floating>sums[ch]
                if grad_weight != NULL:
                    grad_weight[ch] = <floating>(sums[g.c + ch] * invstd[ch])
    free(coef)
    free(sums)
    return rc


# ---------------------------------------------------------------------------------------------
# Python entry points.  x decides the specialisation; other data arrays share its dtype, and
# every pointer is taken while the GIL is held.
# ---------------------------------------------------------------------------------------------

cdef inline void* ptr(object a):
    """The data pointer of an ndarray, NULL for None."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline void check(int rc) except *:
    if rc != 0:
        raise MemoryError("fastbn: could not allocate the kernel's work space")


cdef cnp.ndarray _shape_probe(shape):
    """A zero-strided array of the given shape, enough for set_geometry (no memory behind it)."""
    import numpy as np
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=tuple(shape),
                                           strides=(0,) * len(shape))


def describe_layout(shape):
    """How the kernels walk an input of this shape: a dict of the geometry (for tests and bench)."""
    cdef Geometry g
    set_geometry(&g, _shape_probe(shape))
    return dict(layout="planar" if g.planar else "columns", n=g.n, c=g.c, s=g.s,
                segments=g.segs, segment_length=g.seg_len, group=g.group, period=g.period,
                rows=g.rows, tail=g.tail, block=g.block, tiles=g.tiles, items=g.items)


def moments(cnp.ndarray x, cnp.ndarray mean, cnp.ndarray m2, int n_threads):
    """Per-channel mean and M2 = sum((x - mean)**2) of x (N, C, ...), into float64 arrays."""
    cdef Geometry g
    cdef int rc = 0
    cdef bint f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef void* xp = ptr(x)
    cdef double* mp = <double*>ptr(mean)
    cdef double* qp = <double*>ptr(m2)
    set_geometry(&g, x)
    if g.total == 0:
        return
    with nogil:
        if f32:
            rc = moments_pass(&g, <const float*>xp, mp, NULL, qp, n_threads)
        else:
            rc = moments_pass(&g, <const double*>xp, mp, NULL, qp, n_threads)
    check(rc)


def normalize_given(cnp.ndarray x, cnp.ndarray y, object weight, object bias,
                    cnp.ndarray mean, cnp.ndarray invstd, int n_threads):
    """y = (x - mean) * invstd * weight + bias with given float64 statistics."""
    cdef Geometry g
    cdef int rc = 0
    cdef bint f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef void* xp = ptr(x)
    cdef void* yp = ptr(y)
    cdef void* wp = ptr(weight)
    cdef void* bp = ptr(bias)
    cdef double* mp = <double*>ptr(mean)
    cdef double* ip = <double*>ptr(invstd)
    set_geometry(&g, x)
    if g.total == 0:
        return
    with nogil:
        if f32:
            rc = normalize(&g, <const float*>xp, <float*>yp, <const float*>wp, <const float*>bp,
                           mp, NULL, ip, n_threads)
        else:
            rc = normalize(&g, <const double*>xp, <double*>yp, <const double*>wp,
                           <const double*>bp, mp, NULL, ip, n_threads)
    check(rc)


def forward_train(cnp.ndarray x, cnp.ndarray y, object weight, object bias,
                  object running_mean, object running_var, double momentum, double eps,
                  cnp.ndarray save_mean, cnp.ndarray save_invstd, int n_threads):
    """Training-mode forward: batch statistics into save_mean/save_invstd (float64), running
    buffers (when not None) updated in place, y written.  Needs N * S >= 2."""
    cdef Geometry g
    cdef int rc = 0
    cdef bint f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef void* xp = ptr(x)
    cdef void* yp = ptr(y)
    cdef void* wp = ptr(weight)
    cdef void* bp = ptr(bias)
    cdef void* rmp = ptr(running_mean)
    cdef void* rvp = ptr(running_var)
    cdef double* mp = <double*>ptr(save_mean)
    cdef double* ip = <double*>ptr(save_invstd)
    set_geometry(&g, x)
    if g.total == 0:
        return
    with nogil:
        if f32:
            rc = forward_train_impl(&g, <const float*>xp, <float*>yp, <const float*>wp,
                                    <const float*>bp, <float*>rmp, <float*>rvp, momentum, eps,
                                    mp, ip, n_threads)
        else:
            rc = forward_train_impl(&g, <const double*>xp, <double*>yp, <const double*>wp,
                                    <const double*>bp, <double*>rmp, <double*>rvp, momentum, eps,
                                    mp, ip, n_threads)
    check(rc)


def forward_eval(cnp.ndarray x, cnp.ndarray y, object weight, object bias,
                 cnp.ndarray running_mean, cnp.ndarray running_var, double eps,
                 cnp.ndarray save_mean, cnp.ndarray save_invstd, int n_threads):
    """Eval-mode forward with running statistics; save_mean/save_invstd (float64) receive the
    statistics used: running_mean and 1 / sqrt(running_var + eps)."""
    cdef Geometry g
    cdef int rc = 0
    cdef bint f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef void* xp = ptr(x)
    cdef void* yp = ptr(y)
    cdef void* wp = ptr(weight)
    cdef void* bp = ptr(bias)
    cdef void* rmp = ptr(running_mean)
    cdef void* rvp = ptr(running_var)
    cdef double* mp = <double*>ptr(save_mean)
    cdef double* ip = <double*>ptr(save_invstd)
    set_geometry(&g, x)
    with nogil:
        if f32:
            rc = forward_eval_impl(&g, <const float*>xp, <float*>yp, <const float*>wp,
                                   <const float*>bp, <const float*>rmp, <const float*>rvp, eps,
                                   mp, ip, n_threads)
        else:
            rc = forward_eval_impl(&g, <const double*>xp, <double*>yp, <const double*>wp,
                                   <const double*>bp, <const double*>rmp, <const double*>rvp, eps,
                                   mp, ip, n_threads)
    check(rc)


def grad_sums(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray center, cnp.ndarray sum_dy,
              cnp.ndarray sum_dy_xc, int n_threads):
    """Per-channel sum(dy) and sum(dy * (x - center)) into float64 arrays."""
    cdef Geometry g
    cdef int rc = 0
    cdef bint f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef void* dyp = ptr(dy)
    cdef void* xp = ptr(x)
    cdef double* cp = <double*>ptr(center)
    cdef double* sap = <double*>ptr(sum_dy)
    cdef double* sbp = <double*>ptr(sum_dy_xc)
    set_geometry(&g, x)
    if g.total == 0:
        return
    with nogil:
        if f32:
            rc = grad_sums_pass(&g, <const float*>dyp, <const float*>xp, cp, <float*>NULL,
                                <float*>NULL, sap, sbp, n_threads)
        else:
            rc = grad_sums_pass(&g, <const double*>dyp, <const double*>xp, cp, <double*>NULL,
                                <double*>NULL, sap, sbp, n_threads)
    check(rc)


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, object weight, cnp.ndarray mean,
             cnp.ndarray invstd, object grad_weight, object grad_bias, bint training,
             int n_threads):
    """dx (and grad_weight/grad_bias when not None) of y = (x - mean) * invstd * weight + bias.

    training=True: mean and invstd are the batch statistics of x (so depend on it);
    training=False: they are constants (running statistics).
    """
    cdef Geometry g
    cdef int rc = 0
    cdef bint f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef void* dyp = ptr(dy)
    cdef void* xp = ptr(x)
    cdef void* dxp = ptr(dx)
    cdef void* wp = ptr(weight)
    cdef double* mp = <double*>ptr(mean)
    cdef double* ip = <double*>ptr(invstd)
    cdef void* gwp = ptr(grad_weight)
    cdef void* gbp = ptr(grad_bias)
    set_geometry(&g, x)
    if g.total == 0:
        return
    with nogil:
        if f32 and training:
            rc = backward_train_impl(&g, <const float*>dyp, <const float*>xp, <float*>dxp,
                                     <const float*>wp, mp, ip, <float*>gwp, <float*>gbp, n_threads)
        elif f32:
            rc = backward_eval_impl(&g, <const float*>dyp, <const float*>xp, <float*>dxp,
                                    <const float*>wp, mp, ip, <float*>gwp, <float*>gbp, n_threads)
        elif training:
            rc = backward_train_impl(&g, <const double*>dyp, <const double*>xp, <double*>dxp,
                                     <const double*>wp, mp, ip, <double*>gwp, <double*>gbp,
                                     n_threads)
        else:
            rc = backward_eval_impl(&g, <const double*>dyp, <const double*>xp, <double*>dxp,
                                    <const double*>wp, mp, ip, <double*>gwp, <double*>gbp,
                                    n_threads)
    check(rc)


def backward_from_sums(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, object weight,
                       cnp.ndarray mean, cnp.ndarray invstd, cnp.ndarray sum_dy,
                       cnp.ndarray sum_dy_xc, double count, int n_threads):
    """Training-mode dx given per-channel sum(dy) and sum(dy * (x - mean)) over `count` values
    per channel, which may span several processes (distributed batch norm)."""
    cdef Geometry g
    cdef int rc = 0
    cdef bint f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef void* dyp = ptr(dy)
    cdef void* xp = ptr(x)
    cdef void* dxp = ptr(dx)
    cdef void* wp = ptr(weight)
    cdef double* mp = <double*>ptr(mean)
    cdef double* ip = <double*>ptr(invstd)
    cdef double* sap = <double*>ptr(sum_dy)
    cdef double* sbp = <double*>ptr(sum_dy_xc)
    set_geometry(&g, x)
    if g.total == 0:
        return
    with nogil:
        if f32:
            rc = grad_input_from_sums(&g, <const float*>dyp, <const float*>xp, <float*>dxp,
                                      <const float*>wp, mp, ip, sap, sbp, count, <float*>NULL,
                                      <float*>NULL, n_threads)
        else:
            rc = grad_input_from_sums(&g, <const double*>dyp, <const double*>xp, <double*>dxp,
                                      <const double*>wp, mp, ip, sap, sbp, count, <double*>NULL,
                                      <double*>NULL, n_threads)
    check(rc)
