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

* planar (S large enough; see PLANAR_MIN_S): each plane x[n, c, :] is long and contiguous.  Reductions cut
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
from libc.float cimport DBL_EPSILON, DBL_MAX, FLT_EPSILON, FLT_MAX
from libc.math cimport fabs, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define FASTBN_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)
    #elif defined(_MSC_VER)
    #include <xmmintrin.h>
    #define FASTBN_PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
    #else
    #define FASTBN_PREFETCH(p) ((void)(p))
    #endif
    """
    void prefetch "FASTBN_PREFETCH"(const void* p) noexcept nogil

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* v where keep is 1, +0.0 where it is 0, by masking v's bits.  gcc 12 does not vectorise
       a float32 select (keep ? v : 0) whose result is widened to double, but does vectorise
       this; the memcpys compile to register moves. */
    static inline float fastbn_keep_float(int keep, float v) {
        uint32_t bits;
        memcpy(&bits, &v, sizeof bits);
        bits &= (uint32_t)0 - (uint32_t)keep;
        memcpy(&v, &bits, sizeof bits);
        return v;
    }
    static inline double fastbn_keep_double(int keep, double v) {
        uint64_t bits;
        memcpy(&bits, &v, sizeof bits);
        bits &= (uint64_t)0 - (uint64_t)keep;
        memcpy(&v, &bits, sizeof bits);
        return v;
    }
    """
    float keep_float "fastbn_keep_float"(int keep, float v) noexcept nogil
    double keep_double "fastbn_keep_double"(int keep, double v) noexcept nogil

ctypedef fused floating:
    float
    double


# The activation applied in the same pass as the normalisation: a compile-time choice, so each
# loop is written once and costs nothing when there is none.
cdef struct Identity:
    char unused

cdef struct ReLU:
    char unused

ctypedef fused activation:
    Identity
    ReLU


cdef inline floating activate(const activation* act, floating z) noexcept nogil:
    """The activation of z.  ReLU is torch's: 0 where z < 0, z itself otherwise (so -0.0 and
    NaN pass through)."""
    cdef floating zero = 0  # typed: a bare 0 would compare float32 z as a double
    if activation is ReLU:
        return zero if z < zero else z
    else:
        return z


cdef inline floating gate(const activation* act, const floating* dy, const floating* out,
                          Py_ssize_t i) noexcept nogil:
    """The gradient reaching the normalisation: dy[i] where the activation passes it (ReLU:
    where its output out[i] is not <= 0, as torch's threshold_backward), else 0.  `out` is read
    only with an activation."""
    # Branch-free (see fastbn_keep_float), so that the loops calling this vectorise; `not
    # out <= 0` rather than `out > 0` keeps dy where out is NaN, as torch does.
    cdef floating zero = 0
    if activation is ReLU:
        if floating is float:
            return keep_float(not (out[i] <= zero), dy[i])
        else:
            return keep_double(not (out[i] <= zero), dy[i])
    else:
        return dy[i]

cdef enum:
    # Explicit accumulator lanes of a plane reduction.  A compile-time count lets the compiler
    # keep them in SIMD registers (32 doubles = 4 AVX-512 or 8 AVX2 registers per sum) with
    # enough independent chains to hide the add latency; the summation order is fixed by this
    # source, whatever the instruction set.
    LANES = 32
    # Planes are reduced along their length (planar layout) when at least
    # max(RUN_MIN_S, min(PLANAR_MIN_S, PLANAR_PER_SAMPLE * N)) long, else down the columns: a
    # plane costs a fixed ~70 cycles, a column ~10 whatever N, so few samples favour planes.
    # (Measured on 1 MiB float32 tensors over N in 1..256, S in 4..400.)
    PLANAR_MIN_S = 384
    PLANAR_PER_SAMPLE = 10
    # Longest plane segment reduced as one chunk.
    SEGMENT = 8192
    # Columns per tile of a column reduction: its float64 accumulators live on the stack.
    TILE = 256
    # A column tile's rows are far apart in memory (a new page each), beyond the hardware
    # prefetcher's reach: the tile loops fetch the row this many rows ahead themselves.
    PREFETCH_ROWS = 4
    # Shortest row of the columns layout (several samples share a row when C*S is smaller).
    MIN_PERIOD = 128
    # Planes at least this long are walked as runs with their channel's coefficients by the
    # elementwise passes of the columns layout; shorter ones by rows with per-column ones.
    RUN_MIN_S = 16
    # Column reductions cut the rows into blocks so as to have at least this many work items.
    ITEMS_TARGET = 32
    BLOCK_MIN_ROWS = 64
    # Elements per thread under which another thread costs more (fork/join) than it saves.
    GRAIN = 32768
    # Planar channels of at most this many bytes per array are processed one by one,
    # statistics then the elementwise pass while the channel is still in cache (L2): two
    # passes over memory instead of three in the forward, three instead of five in the
    # backward.  Where a channel does not fit, the second read comes from further out, as it
    # would unfused: fusing never moves more bytes.
    FUSE_BYTES = 1024 * 1024


# Tests and tuning may force one layout for every shape (0: choose by shape, 1: planar,
# 2: columns); see _force_layout.  Not for production use: it is process-wide.
cdef int forced_layout = 0
# Likewise, tests and tuning may switch the channel- and tile-fused passes off (_set_fusion).
cdef bint fusion_enabled = True


cdef struct Geometry:
    Py_ssize_t n, c, s, total
    bint planar
    # planar layout: each plane is cut into `segs` segments of `seg_len` (the last may be shorter)
    Py_ssize_t segs, seg_len
    # columns layout: `rows` rows of `period` elements, then a last row of `tail` samples
    Py_ssize_t group, period, rows, tail
    Py_ssize_t tile, block, full_blocks, tiles, tail_tiles
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
    g.planar = g.s >= max(<Py_ssize_t>RUN_MIN_S, min(<Py_ssize_t>PLANAR_MIN_S, PLANAR_PER_SAMPLE * g.n))
    if forced_layout:
        g.planar = forced_layout == 1
    g.segs = g.seg_len = g.group = g.period = g.rows = g.tail = g.tile = 0
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
        # Tiles hold whole channels when a row's channels are contiguous runs no longer than
        # a tile, so that a tile over all rows holds complete channels (fused passes).
        g.tile = (TILE // g.s) * g.s if g.group == 1 and g.s <= TILE else TILE
        g.tiles = ceil_div(g.period, g.tile)
        g.block = max(<Py_ssize_t>BLOCK_MIN_ROWS, ceil_div(g.rows, ceil_div(ITEMS_TARGET, g.tiles)))
        g.full_blocks = ceil_div(g.rows, g.block)
        g.tail_tiles = ceil_div(g.tail * cs, g.tile)
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

    Slots are (sample, segment, channel): part q = sample * segs + segment of every channel is
    one row of C slots, merged in the order of q.
    """
    cdef Py_ssize_t plane = k // g.segs
    cdef Py_ssize_t seg = k - plane * g.segs
    cdef Py_ssize_t start = seg * g.seg_len
    cdef Py_ssize_t sample = plane // g.c
    channel[0] = plane - sample * g.c
    length[0] = min(g.seg_len, g.s - start)
    slot[0] = (sample * g.segs + seg) * g.c + channel[0]
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
    col0[0] = t * g.tile
    width[0] = min(g.tile, row_width - col0[0])
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


cdef inline const floating* per_column(const Geometry* g, const floating* per_channel,
                                       floating* work) noexcept nogil:
    """Coefficients per column of a row of the columns layout: the per-channel array itself
    when a row's columns are the channels, else `work` (period entries) filled by expand()."""
    if g.group == 1 and g.s == 1:
        return per_channel
    expand(g, per_channel, work)
    return work


cdef inline bint by_rows(const Geometry* g) noexcept nogil:
    """Whether elementwise passes walk rows with per-column coefficients (short planes of the
    columns layout) rather than runs of planes with per-channel ones."""
    return not g.planar and g.s < RUN_MIN_S


cdef inline bint needs_expansion(const Geometry* g) noexcept nogil:
    return by_rows(g) and not (g.group == 1 and g.s == 1)


cdef inline Py_ssize_t elementwise_items(const Geometry* g) noexcept nogil:
    """Work items of an elementwise pass: plane segments (planar), samples (runs of planes in
    the columns layout) or rows."""
    if g.planar:
        return g.items
    return g.n if g.s >= RUN_MIN_S else n_rows(g)


# ---------------------------------------------------------------------------------------------
# Inner loops
# ---------------------------------------------------------------------------------------------

cdef inline void prefetch_row(const floating* p, Py_ssize_t n) noexcept nogil:
    """Ask for the cache lines of p[:n] ahead of their use."""
    cdef Py_ssize_t i = 0, step = 64 // sizeof(floating)
    while i < n:
        prefetch(p + i)
        i += step


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
    chunks loses nothing to its rounding.  (A non-finite first value is no shift: 0 is used, so
    that a chunk holding +inf has mean +inf, as torch and numpy say, rather than inf - inf.)"""
    cdef double shift = finite_or_zero(x[0])
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
    m2[0] = nonnegative(t2 - t1 * t1 / n)


cdef inline void segment_grad_sums(const activation* act, const floating* dy, const floating* out,
                                   const floating* x, Py_ssize_t n, double center, floating scale,
                                   floating* dx, double* sum_dy, double* sum_dy_xc) noexcept nogil:
    """sum(g) and sum(g * (x - center)) over n elements, g being dy gated by the activation
    (see gate); with dx, also dx = scale * g."""
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
                v = gate(act, dy, out, i + j)
                s1[j] += v
                s2[j] += v * (<double>x[i + j] - center)
            i += LANES
    else:
        while i < full:
            for j in range(LANES):
                v = gate(act, dy, out, i + j)
                dx[i + j] = scale * gate(act, dy, out, i + j)
                s1[j] += v
                s2[j] += v * (<double>x[i + j] - center)
            i += LANES
    for j in range(n - full):
        v = gate(act, dy, out, full + j)
        if dx != NULL:
            dx[full + j] = scale * gate(act, dy, out, full + j)
        s1[j] += v
        s2[j] += v * (<double>x[full + j] - center)
    sum_dy[0] = fold_lanes(s1)
    sum_dy_xc[0] = fold_lanes(s2)


cdef inline void tile_moments_start(const floating* x, Py_ssize_t width, double* shift,
                                    double* s1, double* s2) noexcept nogil:
    """The accumulators of tile_moments, shifted by the tile's first row x[:width]."""
    cdef Py_ssize_t j
    for j in range(width):
        shift[j] = finite_or_zero(x[j])
        s1[j] = 0.0
        s2[j] = 0.0


cdef inline void tile_moments_rows(const floating* x, Py_ssize_t stride, Py_ssize_t nrows,
                                   Py_ssize_t width, const double* shift, double* s1,
                                   double* s2) noexcept nogil:
    """Add nrows rows (`stride` apart) of a tile to its sums of d = x - shift and d * d.
    Feeding a tile's rows in pieces of multiples of four rows sums in the same order."""
    cdef const floating* row
    cdef double d, e, f, h
    cdef Py_ssize_t r = 0, j
    # Four rows per sweep: the accumulators are loaded and stored once per four rows, which
    # halves the time of a one-row sweep (bound by those stores).  Row 0 is swept too: its
    # deviation is 0 unless its value was no shift (infinite or NaN), which must still count.
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


cdef inline void tile_moments(const floating* x, Py_ssize_t stride, Py_ssize_t nrows,
                              Py_ssize_t width, double* shift_out, double* offset,
                              double* m2) noexcept nogil:
    """Per-column moments of a tile (nrows rows `stride` apart, `width` columns) as shift = the
    tile's first row, offset = mean - shift and M2, by sums of d = x - shift."""
    cdef double shift[TILE]
    cdef double s1[TILE]
    cdef double s2[TILE]
    tile_moments_start(x, width, shift, s1, s2)
    tile_moments_rows(x, stride, nrows, width, shift, s1, s2)
    tile_moments_finish(nrows, width, shift, s1, s2, shift_out, offset, m2)


cdef inline void tile_grad_sums(const activation* act, const floating* dy, const floating* out,
                                const floating* x, Py_ssize_t stride, Py_ssize_t nrows,
                                Py_ssize_t width, const double* center, const floating* scale,
                                floating* dx, double* sum_dy, double* sum_dy_xc) noexcept nogil:
    """Per-column sum(g) and sum(g * (x - center[j])) of a tile, g being dy gated by the
    activation; with dx, also dx = scale[j] * g."""
    cdef double s1[TILE]
    cdef double s2[TILE]
    cdef double v
    cdef Py_ssize_t r, j, o
    for j in range(width):
        s1[j] = 0.0
        s2[j] = 0.0
    for r in range(nrows):
        o = r * stride
        if r + PREFETCH_ROWS < nrows:
            prefetch_row(dy + o + PREFETCH_ROWS * stride, width)
            prefetch_row(x + o + PREFETCH_ROWS * stride, width)
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
    for j in range(width):
        sum_dy[j] = s1[j]
        sum_dy_xc[j] = s2[j]


# The elementwise passes compute x - center as x * factor - center: factor is 1 (the
# subtraction itself, exact for nearby values) except for channels whose center is so close to
# the dtype's largest value that x - center could overflow; see guard_overflow.

cdef inline void affine_run(const activation* act, const floating* x, floating* y, Py_ssize_t n,
                            floating factor, floating center, floating scale,
                            floating shift) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = activate(act, (x[i] * factor - center) * scale + shift)


cdef inline void affine_row(const activation* act, const floating* x, floating* y, Py_ssize_t n,
                            const floating* factor, const floating* center, const floating* scale,
                            const floating* shift) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = activate(act, (x[i] * factor[i] - center[i]) * scale[i] + shift[i])


cdef inline void grad_input_run(const activation* act, const floating* dy, const floating* out,
                                const floating* x, floating* dx, Py_ssize_t n, floating a,
                                floating b, floating factor, floating center,
                                floating c) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = a * (gate(act, dy, out, i) + (x[i] * factor - center) * b + c)


cdef inline void grad_input_row(const activation* act, const floating* dy, const floating* out,
                                const floating* x, floating* dx, Py_ssize_t n, const floating* a,
                                const floating* b, const floating* factor, const floating* center,
                                const floating* c) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = a[i] * (gate(act, dy, out, i) + (x[i] * factor[i] - center[i]) * b[i] + c[i])


# ---------------------------------------------------------------------------------------------
# Merging partials, per channel, in a fixed order
# ---------------------------------------------------------------------------------------------

cdef inline Py_ssize_t block_rows(const Geometry* g, Py_ssize_t b) noexcept nogil:
    return min(g.block, g.rows - b * g.block) if b < g.full_blocks else 1


cdef inline Py_ssize_t block_groups(const Geometry* g, Py_ssize_t b) noexcept nogil:
    return g.group if b < g.full_blocks else g.tail


cdef inline Py_ssize_t n_parts(const Geometry* g) noexcept nogil:
    """Parts a channel's reduction is merged from: plane segments, or blocks of rows."""
    return g.n * g.segs if g.planar else g.full_blocks + (g.tail > 0)


cdef double* merge_plan(const Geometry* g) noexcept nogil:
    """Chan's merge coefficients for each part, in merge order; NULL if out of memory.

    Every channel's parts have the same counts, so the coefficients of merging part q into
    the parts before it, r = n_q / (n_<q + n_q) and n_<q * r, are computed once for all
    channels (plan[2q], plan[2q + 1]); plan[2 * parts + q] is 1 / (columns of a channel) for
    the closed-form merge of a block's columns.
    """
    cdef Py_ssize_t q, parts = n_parts(g)
    cdef double n_before = 0.0, n_q, r
    cdef double* plan = <double*>malloc(3 * parts * sizeof(double))
    if plan == NULL:
        return NULL
    for q in range(parts):
        if g.planar:
            n_q = <double>min(g.seg_len, g.s - (q % g.segs) * g.seg_len)
            plan[2 * parts + q] = 1.0
        else:
            n_q = <double>(block_rows(g, q) * block_groups(g, q) * g.s)
            plan[2 * parts + q] = 1.0 / <double>(block_groups(g, q) * g.s)
        r = n_q / (n_before + n_q)
        plan[2 * q] = r
        plan[2 * q + 1] = n_before * r
        n_before += n_q
    return plan


cdef inline void two_sum(double a, double b, double* total, double* error) noexcept nogil:
    """total = fl(a + b) and error = (a + b) - total exactly (Knuth's TwoSum)."""
    cdef double t = a + b
    cdef double bb = t - a
    error[0] = (a - (t - bb)) + (b - bb)
    total[0] = t


cdef void merge_planar_moments(const Geometry* g, const double* plan, const double* pshift,
                               const double* poffset, const double* pm2, Py_ssize_t ch,
                               double* mean_hi, double* mean_lo, double* m2) noexcept nogil:
    """Channel ch's mean and M2 from its plane segments' moments, by Chan's update in a fixed
    order (the same whichever thread runs it, and whether or not the channel was fused).

    Segment means are merged as offsets from one reference value, the channel's first shift
    (a data value), so that their rounding relative to the data's magnitude never enters; the
    mean is returned unrounded, as mean_hi + mean_lo.
    """
    cdef Py_ssize_t q, i
    cdef double ref = pshift[ch], mu = poffset[ch], m2_acc = pm2[ch], delta, rel
    for q in range(1, g.n * g.segs):
        i = q * g.c + ch
        rel = (pshift[i] - ref) + poffset[i]
        delta = difference(rel, mu)
        mu = merged_mean(mu, rel, plan[2 * q])
        m2_acc = m2_acc + (pm2[i] + delta * delta * plan[2 * q + 1])
    two_sum(ref, mu, mean_hi, mean_lo)
    m2[0] = m2_acc


cdef inline void block_channel_moments(const Geometry* g, const double* pshift,
                                       const double* poffset, const double* pm2, Py_ssize_t b,
                                       Py_ssize_t ch, double ref, double inv_k, double* mean,
                                       double* m2) noexcept nogil:
    """Channel ch's moments over block b, from its columns' (all of them the same count):
    M2 = sum(M2_j) + rows * sum((mean_j - mean)**2), the means averaged relative to the first
    column so that equal means (a constant channel) merge exactly."""
    cdef Py_ssize_t grp, j, o, cs = g.c * g.s, base = b * g.period + ch * g.s
    cdef double first = (pshift[base] - ref) + poffset[base], gm = 0.0, plain = 0.0
    cdef double sq = 0.0, own = 0.0, dev, rel
    for grp in range(block_groups(g, b)):
        o = base + grp * cs
        for j in range(g.s):
            rel = (pshift[o + j] - ref) + poffset[o + j]
            gm += difference(rel, first)
            plain += rel
    # (the plain mean where infinities make the relative one meaningless; see merged_mean)
    gm = first + gm * inv_k if finite(first) & finite(gm) else plain * inv_k
    for grp in range(block_groups(g, b)):
        o = base + grp * cs
        for j in range(g.s):
            dev = difference((pshift[o + j] - ref) + poffset[o + j], gm)
            sq += dev * dev
            own += pm2[o + j]
    mean[0] = gm
    m2[0] = own + block_rows(g, b) * sq


cdef int merge_columns_moments(const Geometry* g, const double* plan, const double* pshift,
                               const double* poffset, const double* pm2, double* mean_hi,
                               double* mean_lo, double* m2, Py_ssize_t ch0,
                               Py_ssize_t ch1) noexcept nogil:
    """Channels ch0 to ch1's mean and M2 from the columns layout's per-column moments (a
    channel's result does not depend on the range it is merged in).

    Block by block: a channel's columns in a block merge in closed form (block_channel_moments),
    then blocks merge by Chan's update.  Means are offsets from each channel's first shift, as
    in merge_planar_moments.  When a column is a channel (S = 1) the loops run over channels
    innermost, contiguous, so they vectorise; otherwise over a channel's contiguous columns.
    -1 if out of memory.
    """
    cdef Py_ssize_t c = ch1 - ch0, b, grp, ch, o, base, i
    cdef double* work = <double*>malloc(6 * c * sizeof(double))
    if work == NULL:
        return -1
    cdef double* ref = work
    cdef double* mu = work + c
    cdef double* first = work + 2 * c
    cdef double* gm = work + 3 * c
    cdef double* bq = work + 4 * c
    cdef double* sq = work + 5 * c
    cdef double inv_k, rows, r, w, delta, dev, rel
    for ch in range(ch0, ch1):
        ref[ch - ch0] = pshift[ch * g.s]
    for b in range(g.full_blocks + (g.tail > 0)):
        base = b * g.period
        inv_k = plan[2 * n_parts(g) + b]
        rows = <double>block_rows(g, b)
        if g.s > 1:
            for ch in range(ch0, ch1):
                i = ch - ch0
                block_channel_moments(g, pshift, poffset, pm2, b, ch, ref[i], inv_k, gm + i, bq + i)
        else:
            # the same arithmetic as block_channel_moments, channels innermost
            for ch in range(ch0, ch1):
                first[ch - ch0] = (pshift[base + ch] - ref[ch - ch0]) + poffset[base + ch]
                gm[ch - ch0] = 0.0
                sq[ch - ch0] = 0.0   # (first the plain sum, for infinities; see merged_mean)
            for grp in range(block_groups(g, b)):
                o = base + grp * g.c
                for ch in range(ch0, ch1):
                    rel = (pshift[o + ch] - ref[ch - ch0]) + poffset[o + ch]
                    gm[ch - ch0] += difference(rel, first[ch - ch0])
                    sq[ch - ch0] += rel
            for i in range(c):
                gm[i] = (first[i] + gm[i] * inv_k if finite(first[i]) & finite(gm[i])
                         else sq[i] * inv_k)
                sq[i] = 0.0
                bq[i] = 0.0
            for grp in range(block_groups(g, b)):
                o = base + grp * g.c
                for ch in range(ch0, ch1):
                    dev = difference((pshift[o + ch] - ref[ch - ch0]) + poffset[o + ch], gm[ch - ch0])
                    sq[ch - ch0] += dev * dev
                    bq[ch - ch0] += pm2[o + ch]
            for i in range(c):
                bq[i] = bq[i] + rows * sq[i]
        if b == 0:
            for i in range(c):
                mu[i] = gm[i]
                m2[ch0 + i] = bq[i]
        else:
            r = plan[2 * b]
            w = plan[2 * b + 1]
            for i in range(c):
                delta = difference(gm[i], mu[i])
                mu[i] = merged_mean(mu[i], gm[i], r)
                m2[ch0 + i] = m2[ch0 + i] + (bq[i] + delta * delta * w)
    for i in range(c):
        two_sum(ref[i], mu[i], mean_hi + ch0 + i, mean_lo + ch0 + i)
    free(work)
    return 0


cdef void merge_sums(const Geometry* g, const double* pa, const double* pb, double* sum_a,
                     double* sum_b, Py_ssize_t ch0, Py_ssize_t ch1) noexcept nogil:
    """Channels ch0 to ch1's two sums from their parts' sums, added part by part in a fixed
    order (a channel's sum does not depend on the range it is merged in)."""
    cdef Py_ssize_t q, b, grp, j, ch, o, c = g.c, s = g.s
    cdef double ta, tb
    for ch in range(ch0, ch1):
        sum_a[ch] = 0.0
        sum_b[ch] = 0.0
    if g.planar:
        for q in range(g.n * g.segs):
            for ch in range(ch0, ch1):
                sum_a[ch] += pa[q * c + ch]
                sum_b[ch] += pb[q * c + ch]
    elif s == 1:
        for b in range(g.full_blocks + (g.tail > 0)):
            for grp in range(block_groups(g, b)):
                o = b * g.period + grp * c
                for ch in range(ch0, ch1):
                    sum_a[ch] += pa[o + ch]
                    sum_b[ch] += pb[o + ch]
    else:
        for ch in range(ch0, ch1):
            ta = 0.0
            tb = 0.0
            for b in range(g.full_blocks + (g.tail > 0)):
                for grp in range(block_groups(g, b)):
                    o = b * g.period + grp * c * s + ch * s
                    for j in range(s):
                        ta += pa[o + j]
                        tb += pb[o + j]
            sum_a[ch] = ta
            sum_b[ch] = tb


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
                      double* m2, int n_threads, const unsigned short* half=NULL) noexcept nogil:
    """Per-channel mean (as mean_hi + mean_lo; mean_lo may be NULL) and M2 (sum of squared
    deviations) of x, or of float16 data `half` when given (x then unused, floating float:
    the float32 data's results, bit for bit); -1 if out of memory."""
    if g.total == 0:
        return 0
    cdef Py_ssize_t k, ch
    cdef int rc = 0
    cdef int nt = threads_for(g, n_threads, g.items)
    cdef double* pshift = <double*>malloc(3 * g.partial_len * sizeof(double))
    cdef double* plan = merge_plan(g)
    cdef double* lo = mean_lo if mean_lo != NULL else <double*>malloc(g.c * sizeof(double))
    if pshift == NULL or plan == NULL or lo == NULL:
        free(pshift)
        free(plan)
        if mean_lo == NULL:
            free(lo)
        return -1
    cdef double* poffset = pshift + g.partial_len
    cdef double* pm2 = pshift + 2 * g.partial_len
    if nt == 1:
        for k in range(g.items):
            if half != NULL:
                moments_item_half(g, half, k, pshift, poffset, pm2)
            else:
                moments_item(g, x, k, pshift, poffset, pm2)
    else:
        for k in prange(g.items, num_threads=nt, schedule="static"):
            if half != NULL:
                moments_item_half(g, half, k, pshift, poffset, pm2)
            else:
                moments_item(g, x, k, pshift, poffset, pm2)
    if not g.planar:
        rc = merge_columns_moments(g, plan, pshift, poffset, pm2, mean_hi, lo, m2, 0, g.c)
    elif nt == 1 or g.c < 2 * nt:
        for ch in range(g.c):
            merge_planar_moments(g, plan, pshift, poffset, pm2, ch, mean_hi + ch, lo + ch, m2 + ch)
    else:
        for ch in prange(g.c, num_threads=nt, schedule="static"):
            merge_planar_moments(g, plan, pshift, poffset, pm2, ch, mean_hi + ch, lo + ch, m2 + ch)
    free(pshift)
    free(plan)
    if mean_lo == NULL:
        free(lo)
    return rc


cdef inline const floating* at(const floating* p, Py_ssize_t off) noexcept nogil:
    """p + off, or NULL for an absent (NULL) optional array."""
    return NULL if p == NULL else p + off


cdef inline void grad_sums_item(const activation* act, const Geometry* g, const floating* dy,
                                const floating* out, const floating* x, const double* center,
                                const floating* scale, floating* dx, Py_ssize_t k, double* pa,
                                double* pb) noexcept nogil:
    """Partial sums of item k.  `center` and `scale` are per channel (planar) or per column
    (columns); dx, when not NULL, receives scale * (gated) dy."""
    cdef Py_ssize_t off, length, ch, slot, nrows, width, col0
    if g.planar:
        off = planar_item(g, k, &length, &ch, &slot)
        segment_grad_sums(act, dy + off, at(out, off), x + off, length, center[ch],
                          scale[ch] if dx != NULL else <floating>0, at(dx, off), pa + slot,
                          pb + slot)
    else:
        off = columns_item(g, k, &nrows, &width, &col0)
        slot = columns_slot(g, k, col0)
        tile_grad_sums(act, dy + off, at(out, off), x + off, g.period, nrows, width, center + col0,
                       NULL if dx == NULL else scale + col0, at(dx, off), pa + slot, pb + slot)


cdef int grad_sums_pass(const activation* act, const Geometry* g, const floating* dy,
                        const floating* out, const floating* x, const double* center,
                        const floating* scale, floating* dx, double* sum_dy,
                        double* sum_dy_xc, int n_threads) noexcept nogil:
    """Per-channel sum(g) and sum(g * (x - center)), g being dy gated by the activation of the
    output `out`; with dx, also dx = scale * g in the same pass.  center and scale are per
    channel.  -1 if out of memory."""
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
        # Tiles cut across channels: they take their coefficients per column.
        col_center = <double*>malloc(g.period * sizeof(double))
        col_scale = <floating*>malloc(g.period * sizeof(floating))
        if col_center == NULL or col_scale == NULL:
            free(pa); free(col_center); free(col_scale)
            return -1
        center = per_column(g, center, col_center)
        if dx != NULL:
            scale = per_column(g, scale, col_scale)
    if nt == 1:
        for k in range(g.items):
            grad_sums_item(act, g, dy, out, x, center, scale, dx, k, pa, pb)
    else:
        for k in prange(g.items, num_threads=nt, schedule="static"):
            grad_sums_item(act, g, dy, out, x, center, scale, dx, k, pa, pb)
    merge_sums(g, pa, pb, sum_dy, sum_dy_xc, 0, g.c)
    free(pa)
    free(col_center)
    free(col_scale)
    return 0


cdef inline void affine_item(const activation* act, const Geometry* g, const floating* x,
                             floating* y, Py_ssize_t k, const floating* factor,
                             const floating* center, const floating* scale,
                             const floating* shift) noexcept nogil:
    cdef Py_ssize_t off, length, ch, slot
    if g.planar:
        off = planar_item(g, k, &length, &ch, &slot)
        affine_run(act, x + off, y + off, length, factor[ch], center[ch], scale[ch], shift[ch])
    elif not by_rows(g):
        off = k * g.c * g.s
        for ch in range(g.c):
            affine_run(act, x + off + ch * g.s, y + off + ch * g.s, g.s, factor[ch], center[ch],
                       scale[ch], shift[ch])
    else:
        off = k * g.period
        affine_row(act, x + off, y + off, row_length(g, k), factor, center, scale, shift)


cdef inline void affine_item_any(const activation* act, const Geometry* g, const floating* x,
                                 floating* y, const unsigned short* half_x,
                                 unsigned short* half_y, Py_ssize_t k, const floating* factor,
                                 const floating* center, const floating* scale,
                                 const floating* shift) noexcept nogil:
    """affine_item, or affine_item_half where float16 data is given (float coefficients)."""
    if floating is float:
        if half_x != NULL:
            affine_item_half(act, g, half_x, half_y, k, factor, center, scale, shift)
            return
    affine_item(act, g, x, y, k, factor, center, scale, shift)


cdef int affine_pass(const activation* act, const Geometry* g, const floating* x, floating* y,
                     const floating* coef, int n_threads, const unsigned short* half_x=NULL,
                     unsigned short* half_y=NULL) noexcept nogil:
    """y = activation((x * factor - center) * scale + shift) with per-channel coefficients
    coef = [center, scale, shift, factor] (4 * C values), or the same from float16 data half_x
    into half_y when given (x and y then unused, floating float); -1 if out of memory."""
    if g.total == 0:
        return 0
    cdef Py_ssize_t k, items = elementwise_items(g)
    cdef int nt = threads_for(g, n_threads, items)
    cdef const floating* center = coef
    cdef const floating* scale = coef + g.c
    cdef const floating* shift = coef + 2 * g.c
    cdef const floating* factor = coef + 3 * g.c
    cdef floating* work = NULL
    if needs_expansion(g):
        work = <floating*>malloc(4 * g.period * sizeof(floating))
        if work == NULL:
            return -1
        center = per_column(g, center, work)
        scale = per_column(g, scale, work + g.period)
        shift = per_column(g, shift, work + 2 * g.period)
        factor = per_column(g, factor, work + 3 * g.period)
    if nt == 1:
        for k in range(items):
            affine_item_any(act, g, x, y, half_x, half_y, k, factor, center, scale, shift)
    else:
        for k in prange(items, num_threads=nt, schedule="static"):
            affine_item_any(act, g, x, y, half_x, half_y, k, factor, center, scale, shift)
    free(work)
    return 0


cdef inline void grad_input_item(const activation* act, const Geometry* g, const floating* dy,
                                 const floating* out, const floating* x, floating* dx,
                                 Py_ssize_t k, const floating* a, const floating* b,
                                 const floating* factor, const floating* center,
                                 const floating* c) noexcept nogil:
    cdef Py_ssize_t off, length, ch, slot, o
    if g.planar:
        off = planar_item(g, k, &length, &ch, &slot)
        grad_input_run(act, dy + off, at(out, off), x + off, dx + off, length, a[ch], b[ch],
                       factor[ch], center[ch], c[ch])
    elif not by_rows(g):
        off = k * g.c * g.s
        for ch in range(g.c):
            o = off + ch * g.s
            grad_input_run(act, dy + o, at(out, o), x + o, dx + o, g.s, a[ch], b[ch], factor[ch],
                           center[ch], c[ch])
    else:
        off = k * g.period
        grad_input_row(act, dy + off, at(out, off), x + off, dx + off, row_length(g, k), a, b,
                       factor, center, c)


cdef int grad_input_pass(const activation* act, const Geometry* g, const floating* dy,
                         const floating* out, const floating* x, floating* dx,
                         const floating* coef, int n_threads) noexcept nogil:
    """dx = a * (g + (x * factor - center) * b + shift) with per-channel coefficients
    coef = [a, b, center, shift, factor] (5 * C values), g being dy gated by the activation of
    the output `out`; -1 if out of memory."""
    if g.total == 0:
        return 0
    cdef Py_ssize_t k, items = elementwise_items(g)
    cdef int nt = threads_for(g, n_threads, items)
    cdef const floating* a = coef
    cdef const floating* b = coef + g.c
    cdef const floating* center = coef + 2 * g.c
    cdef const floating* c = coef + 3 * g.c
    cdef const floating* factor = coef + 4 * g.c
    cdef floating* work = NULL
    if needs_expansion(g):
        work = <floating*>malloc(5 * g.period * sizeof(floating))
        if work == NULL:
            return -1
        a = per_column(g, a, work)
        b = per_column(g, b, work + g.period)
        center = per_column(g, center, work + 2 * g.period)
        c = per_column(g, c, work + 3 * g.period)
        factor = per_column(g, factor, work + 4 * g.period)
    if nt == 1:
        for k in range(items):
            grad_input_item(act, g, dy, out, x, dx, k, a, b, factor, center, c)
    else:
        for k in prange(items, num_threads=nt, schedule="static"):
            grad_input_item(act, g, dy, out, x, dx, k, a, b, factor, center, c)
    free(work)
    return 0


# ---------------------------------------------------------------------------------------------
# Per-channel epilogues: from statistics to the coefficients of the elementwise passes
# ---------------------------------------------------------------------------------------------

cdef inline void split_center(double mean_hi, double mean_lo, double scale, double shift,
                              floating* center, floating* scale_out, floating* shift_out,
                              floating* factor) noexcept nogil:
    """The coefficients of (x - mean) * scale + shift as the elementwise passes compute it,
    (x * factor - center) * scale_out + shift_out.

    center is the mean (mean_hi + mean_lo) rounded to the data's dtype and shift_out folds the
    rest back in.  factor is 1 -- the exact subtraction -- except in two corners of the
    dtype's range, where a power of two keeps every intermediate representable (all the
    scalings are exact):

    * x - center could overflow: that needs |center| within 2**-(mantissa bits + 2) of the
      largest value; factor = 1/2 halves x and center and doubles the scale;
    * the scale itself would overflow (var + eps below ~1/limit: denormal data with a tinier
      eps); factor = 2**64 scales x - center up and the scale down.
    """
    cdef double limit = FLT_MAX if floating is float else DBL_MAX
    cdef double ulp = FLT_EPSILON if floating is float else DBL_EPSILON
    cdef double big = 18446744073709551616.0  # 2**64
    cdef floating c = <floating>mean_hi
    cdef double rest = (mean_hi - <double>c) + mean_lo
    cdef bint huge_center = fabs(<double>c) >= limit * ulp * 0.25
    # (& rather than "and", which Cython compiles to a branch)
    cdef bint huge_scale = (not huge_center) & (fabs(scale) > limit * 0.25) & (fabs(scale) < limit * big * 0.25)
    cdef double p = 0.5 if huge_center else (big if huge_scale else 1.0)
    # (selects, not branches, so that loops over channels vectorise; a zero rest must not meet
    # an infinite scale, 0 * inf being NaN)
    shift_out[0] = <floating>(shift - (rest * scale if rest != 0.0 else 0.0))
    center[0] = <floating>(<double>c * p)
    scale_out[0] = <floating>(scale / p)
    factor[0] = <floating>p


cdef inline void widen(const floating* src, double fill, double* dst, Py_ssize_t n) noexcept nogil:
    """dst = src in float64, or `fill` everywhere when src is NULL (an absent parameter), so
    that the loops over channels that follow have no branches and vectorise."""
    cdef Py_ssize_t i
    if src == NULL:
        for i in range(n):
            dst[i] = fill
    else:
        for i in range(n):
            dst[i] = src[i]


cdef floating* affine_coefficients(Py_ssize_t c, const floating* weight, const floating* bias,
                                   const double* mean, const double* mean_lo,
                                   const double* invstd) noexcept nogil:
    """The coefficients [center, scale, shift, factor] (4 * c values, malloc'd; NULL when out
    of memory or c is 0) of y = (x - mean) * invstd * weight + bias for affine_pass, the mean
    given as mean + mean_lo (mean_lo and weight and bias may be NULL)."""
    cdef Py_ssize_t ch
    if c == 0:
        return NULL
    cdef double* work = <double*>malloc(3 * c * sizeof(double))
    cdef floating* coef = <floating*>malloc(4 * c * sizeof(floating))
    if work == NULL or coef == NULL:
        free(work)
        free(coef)
        return NULL
    cdef double* scale = work
    cdef double* shift = work + c
    cdef double* lo = work + 2 * c
    widen(weight, 1.0, scale, c)
    widen(bias, 0.0, shift, c)
    widen(<double*>mean_lo, 0.0, lo, c)
    for ch in range(c):
        scale[ch] *= invstd[ch]
        split_center(mean[ch], lo[ch], scale[ch], shift[ch], coef + ch, coef + c + ch,
                     coef + 2 * c + ch, coef + 3 * c + ch)
    free(work)
    return coef


cdef int normalize(const activation* act, const Geometry* g, const floating* x, floating* y,
                   const floating* weight,
                   const floating* bias, const double* mean, const double* mean_lo,
                   const double* invstd, int n_threads, const unsigned short* half_x=NULL,
                   unsigned short* half_y=NULL) noexcept nogil:
    """y = (x - mean) * invstd * weight + bias, the mean given as mean + mean_lo (mean_lo and
    weight and bias may be NULL); float16 data half_x into half_y instead when given."""
    cdef int rc
    if g.total == 0:
        return 0  # (and no malloc(0), which may return NULL)
    cdef floating* coef = affine_coefficients(g.c, weight, bias, mean, mean_lo, invstd)
    if coef == NULL:
        return -1
    rc = affine_pass(act, g, x, y, coef, n_threads, half_x, half_y)
    free(coef)
    return rc


cdef floating* fillers(const floating* like, Py_ssize_t c) noexcept nogil:
    """4 * c values of like's type standing in for absent parameters and buffers: ones (weight), zeros
    (bias), and two zeroed scratch arrays (running_mean, running_var, or gradients nobody
    asked for).  With them every per-channel epilogue is free of branches, so its loop over
    channels vectorises and the channel-fused paths run exactly the same arithmetic."""
    cdef floating* f = <floating*>malloc(4 * c * sizeof(floating))
    cdef Py_ssize_t i
    if f != NULL:
        for i in range(c):
            f[i] = 1
        for i in range(c, 4 * c):
            f[i] = 0
    return f


cdef inline void train_channel(Py_ssize_t ch, Py_ssize_t c, double count, double momentum,
                               double eps, const double* mean, const double* mean_lo,
                               const double* m2, const floating* weight, const floating* bias,
                               floating* running_mean, floating* running_var,
                               double* save_invstd, floating* coef) noexcept nogil:
    """Channel ch's epilogue of a training forward: invstd, the running buffers, and the
    coefficients (center, scale, shift, factor) of its normalisation in coef[ch + k * c].  No
    pointer is NULL (see fillers)."""
    cdef double invstd = 1.0 / sqrt(m2[ch] / count + eps)
    cdef double scale = invstd * <double>weight[ch]
    save_invstd[ch] = invstd
    running_mean[ch] = <floating>(momentum * mean[ch] + (1.0 - momentum) * running_mean[ch])
    # running_var tracks the unbiased variance; normalisation uses the biased one.
    running_var[ch] = <floating>(momentum * (m2[ch] / (count - 1.0))
                                 + (1.0 - momentum) * running_var[ch])
    split_center(mean[ch], mean_lo[ch], scale, <double>bias[ch], coef + ch, coef + c + ch,
                 coef + 2 * c + ch, coef + 3 * c + ch)


cdef inline Py_ssize_t channel_segment(const Geometry* g, Py_ssize_t ch, Py_ssize_t q) noexcept nogil:
    """The planar work item of channel ch's q-th part (sample q // segs, segment q % segs)."""
    return ((q // g.segs) * g.c + ch) * g.segs + q % g.segs


cdef inline bint fuse_channels(const Geometry* g, Py_ssize_t bytes_per_value, int nt) noexcept nogil:
    """Whether a pass goes channel by channel with its channels in cache (planar layout, small
    enough channels, and enough of them to keep every thread busy)."""
    return (fusion_enabled and g.planar and g.n * g.s * bytes_per_value <= FUSE_BYTES
            and (nt == 1 or g.c >= 4 * nt))


cdef inline bint fuse_tiles(const Geometry* g, Py_ssize_t bytes_per_value, int nt) noexcept nogil:
    """Whether a columns-layout pass goes tile by tile over all rows with each tile in cache:
    tiles must hold whole channels (one sample per row, planes no longer than a tile), be
    small enough, and be numerous enough to keep every thread busy."""
    return (fusion_enabled and not g.planar and g.group == 1 and g.s <= TILE
            and g.n * g.tile * bytes_per_value <= FUSE_BYTES and (nt == 1 or g.tiles >= 4 * nt))


cdef inline void tile_channels(const Geometry* g, Py_ssize_t t, Py_ssize_t* col0,
                               Py_ssize_t* width, Py_ssize_t* ch0, Py_ssize_t* ch1) noexcept nogil:
    """Columns and (whole) channels of tile t when tiles hold whole channels."""
    col0[0] = t * g.tile
    width[0] = min(g.tile, g.period - col0[0])
    ch0[0] = col0[0] // g.s
    ch1[0] = ch0[0] + width[0] // g.s


cdef inline int train_columns_tile(const activation* act, const Geometry* g, const floating* x,
                                   floating* y,
                                   Py_ssize_t t, const double* plan, double* pshift,
                                   double* poffset, double* pm2, double count, double momentum,
                                   double eps, double* mean, double* mean_lo, double* m2,
                                   const floating* weight, const floating* bias,
                                   floating* running_mean, floating* running_var,
                                   double* save_invstd, floating* coef) noexcept nogil:
    """The whole training forward of the channels of one column tile, over all rows: the same
    items, merge and epilogue as the unfused passes (so the same bits), then their
    normalisation while the tile is in cache.  -1 if out of memory."""
    cdef Py_ssize_t b, r, ch, off, col0, width, ch0, ch1, c = g.c
    tile_channels(g, t, &col0, &width, &ch0, &ch1)
    for b in range(g.full_blocks):
        moments_item(g, x, b * g.tiles + t, pshift, poffset, pm2)
    if merge_columns_moments(g, plan, pshift, poffset, pm2, mean, mean_lo, m2, ch0, ch1) != 0:
        return -1
    for ch in range(ch0, ch1):
        train_channel(ch, c, count, momentum, eps, mean, mean_lo, m2, weight, bias, running_mean,
                      running_var, save_invstd, coef)
    for r in range(g.rows):
        off = r * g.period
        if g.s == 1:
            affine_row(act, x + off + col0, y + off + col0, width, coef + 3 * c + ch0, coef + ch0,
                       coef + c + ch0, coef + 2 * c + ch0)
        else:
            for ch in range(ch0, ch1):
                affine_run(act, x + off + ch * g.s, y + off + ch * g.s, g.s, coef[3 * c + ch],
                           coef[ch], coef[c + ch], coef[2 * c + ch])
    return 0


cdef inline void train_planar_channel(const activation* act, const Geometry* g,
                                      const floating* x, floating* y,
                                      Py_ssize_t ch, const double* plan, double* pshift,
                                      double* poffset, double* pm2, double count,
                                      double momentum, double eps, double* mean,
                                      double* mean_lo, double* m2, const floating* weight,
                                      const floating* bias, floating* running_mean,
                                      floating* running_var, double* save_invstd,
                                      floating* coef) noexcept nogil:
    """The whole training forward of one planar channel: the same segments, merge and
    epilogue as the unfused passes (so the same bits), then its normalisation at once."""
    cdef Py_ssize_t q, off, length, chan, slot
    for q in range(g.n * g.segs):
        off = planar_item(g, channel_segment(g, ch, q), &length, &chan, &slot)
        segment_moments(x + off, length, pshift + slot, poffset + slot, pm2 + slot)
    merge_planar_moments(g, plan, pshift, poffset, pm2, ch, mean + ch, mean_lo + ch, m2 + ch)
    train_channel(ch, g.c, count, momentum, eps, mean, mean_lo, m2, weight, bias, running_mean,
                  running_var, save_invstd, coef)
    for q in range(g.n * g.segs):
        off = planar_item(g, channel_segment(g, ch, q), &length, &chan, &slot)
        affine_run(act, x + off, y + off, length, coef[3 * g.c + ch], coef[ch], coef[g.c + ch],
                   coef[2 * g.c + ch])


cdef int forward_train_impl(const activation* act, const Geometry* g, const floating* x,
                            floating* y,
                            const floating* weight, const floating* bias,
                            floating* running_mean, floating* running_var,
                            double momentum, double eps, double* save_mean, double* save_invstd,
                            int n_threads, const unsigned short* half_x=NULL,
                            unsigned short* half_y=NULL) noexcept nogil:
    """The training forward of x into y, or of float16 data half_x into half_y when given (x
    and y then unused, floating float; by the unfused passes, whose bits the fused ones give)."""
    cdef Py_ssize_t ch, c = g.c
    cdef bint may_fuse = half_x == NULL
    cdef double count = <double>(g.n * g.s)
    cdef int rc = 0
    cdef int nt = threads_for(g, n_threads, c)
    cdef double* work = <double*>malloc(2 * c * sizeof(double) + 4 * c * sizeof(floating))
    cdef floating* fill = fillers(x, c)
    cdef double* plan = merge_plan(g)
    cdef double* parts = <double*>malloc(3 * g.partial_len * sizeof(double))
    if work == NULL or fill == NULL or plan == NULL or parts == NULL:
        free(work); free(fill); free(plan); free(parts)
        return -1
    cdef double* m2 = work
    cdef double* mean_lo = work + c
    cdef floating* coef = <floating*>(work + 2 * c)
    if weight == NULL:
        weight = fill
    if bias == NULL:
        bias = fill + c
    if running_mean == NULL:
        running_mean = fill + 2 * c
    if running_var == NULL:
        running_var = fill + 3 * c
    cdef Py_ssize_t t
    cdef int nt_tiles = threads_for(g, n_threads, g.tiles)
    if may_fuse and fuse_channels(g, sizeof(floating), nt):
        if nt == 1:
            for ch in range(c):
                train_planar_channel(act, g, x, y, ch, plan, parts, parts + g.partial_len,
                                     parts + 2 * g.partial_len, count, momentum, eps, save_mean,
                                     mean_lo, m2, weight, bias, running_mean, running_var,
                                     save_invstd, coef)
        else:
            for ch in prange(c, num_threads=nt, schedule="static"):
                train_planar_channel(act, g, x, y, ch, plan, parts, parts + g.partial_len,
                                     parts + 2 * g.partial_len, count, momentum, eps, save_mean,
                                     mean_lo, m2, weight, bias, running_mean, running_var,
                                     save_invstd, coef)
    elif may_fuse and fuse_tiles(g, sizeof(floating), nt_tiles):
        if nt_tiles == 1:
            for t in range(g.tiles):
                if train_columns_tile(act, g, x, y, t, plan, parts, parts + g.partial_len,
                                      parts + 2 * g.partial_len, count, momentum, eps, save_mean,
                                      mean_lo, m2, weight, bias, running_mean, running_var,
                                      save_invstd, coef) != 0:
                    rc = -1
        else:
            for t in prange(g.tiles, num_threads=nt_tiles, schedule="static"):
                if train_columns_tile(act, g, x, y, t, plan, parts, parts + g.partial_len,
                                      parts + 2 * g.partial_len, count, momentum, eps, save_mean,
                                      mean_lo, m2, weight, bias, running_mean, running_var,
                                      save_invstd, coef) != 0:
                    rc = -1
    else:
        rc = moments_pass(g, x, save_mean, mean_lo, m2, n_threads, half_x)
        if rc == 0:
            for ch in range(c):
                train_channel(ch, c, count, momentum, eps, save_mean, mean_lo, m2, weight, bias,
                              running_mean, running_var, save_invstd, coef)
            rc = affine_pass(act, g, x, y, coef, n_threads, half_x, half_y)
    free(work)
    free(fill)
    free(plan)
    free(parts)
    return rc


cdef int forward_eval_impl(const activation* act, const Geometry* g, const floating* x,
                           floating* y,
                           const floating* weight, const floating* bias,
                           const floating* running_mean, const floating* running_var, double eps,
                           double* save_mean, double* save_invstd, int n_threads,
                           const unsigned short* half_x=NULL,
                           unsigned short* half_y=NULL) noexcept nogil:
    running_statistics(g.c, running_mean, running_var, eps, save_mean, save_invstd)
    return normalize(act, g, x, y, weight, bias, save_mean, NULL, save_invstd, n_threads, half_x,
                     half_y)


cdef inline void running_statistics(Py_ssize_t c, const floating* running_mean,
                                    const floating* running_var, double eps, double* mean,
                                    double* invstd) noexcept nogil:
    """The statistics an eval forward normalises with: running_mean, 1 / sqrt(running_var + eps)."""
    cdef Py_ssize_t ch
    for ch in range(c):
        mean[ch] = running_mean[ch]
        invstd[ch] = 1.0 / sqrt(<double>running_var[ch] + eps)


cdef inline void parameter_grads(Py_ssize_t c, const double* sum_dy, const double* sum_dy_xc,
                                 const double* invstd, floating* grad_weight,
                                 floating* grad_bias) noexcept nogil:
    """grad_bias = sum(dy), grad_weight = sum(dy * (x - mean)) * invstd (each when wanted)."""
    cdef Py_ssize_t ch
    if grad_bias != NULL:
        for ch in range(c):
            grad_bias[ch] = <floating>sum_dy[ch]
    if grad_weight != NULL:
        for ch in range(c):
            grad_weight[ch] = <floating>(sum_dy_xc[ch] * invstd[ch])


cdef inline void backward_channel(Py_ssize_t ch, Py_ssize_t c, double count, const double* mean,
                                  const double* invstd, const double* sum_dy,
                                  const double* sum_dy_xc, const floating* weight,
                                  floating* grad_weight, floating* grad_bias,
                                  floating* coef) noexcept nogil:
    """Channel ch's epilogue of a training backward: the parameter gradients and the
    coefficients (a, b, center, shift, factor) of dx = a * (dy + b * (x * factor - center) +
    shift) in coef[ch + k * c].  No pointer is NULL (see fillers).

    dx = w * invstd * (dy - mean(dy) - (x - mean) * invstd**2 * mean(dy * (x - mean))); the
    factor a = w * invstd is applied last so that b ~ invstd * |dy| rather than invstd**3 * |dy|
    stays representable when the data is huge (x ~ 1e38 in float32).
    """
    cdef double b = -invstd[ch] * invstd[ch] * sum_dy_xc[ch] / count
    grad_bias[ch] = <floating>sum_dy[ch]
    grad_weight[ch] = <floating>(sum_dy_xc[ch] * invstd[ch])
    coef[ch] = <floating>(<double>weight[ch] * invstd[ch])
    split_center(mean[ch], 0.0, b, -sum_dy[ch] / count, coef + 2 * c + ch, coef + c + ch,
                 coef + 3 * c + ch, coef + 4 * c + ch)


cdef int grad_input_from_sums(const activation* act, const Geometry* g, const floating* dy,
                              const floating* out, const floating* x, floating* dx, const floating* weight, const double* mean,
                              const double* invstd, const double* sum_dy,
                              const double* sum_dy_xc, double count, floating* grad_weight,
                              floating* grad_bias, int n_threads) noexcept nogil:
    """Training-mode backward given the per-channel sums of dy and dy * (x - mean) over all
    `count` values of each channel (on one process, or gathered from several)."""
    cdef Py_ssize_t ch, c = g.c
    cdef int rc
    cdef floating* coef = <floating*>malloc(5 * c * sizeof(floating))
    cdef floating* fill = fillers(x, c)
    if coef == NULL or fill == NULL:
        free(coef); free(fill)
        return -1
    for ch in range(c):
        backward_channel(ch, c, count, mean, invstd, sum_dy, sum_dy_xc,
                         fill if weight == NULL else weight,
                         fill + 2 * c if grad_weight == NULL else grad_weight,
                         fill + 3 * c if grad_bias == NULL else grad_bias, coef)
    rc = grad_input_pass(act, g, dy, out, x, dx, coef, n_threads)
    free(coef)
    free(fill)
    return rc


cdef inline void backward_planar_channel(const activation* act, const Geometry* g,
                                         const floating* dy, const floating* out,
                                         const floating* x, floating* dx, Py_ssize_t ch, double* pa, double* pb,
                                         double count, const double* mean, const double* invstd,
                                         double* sum_dy, double* sum_dy_xc,
                                         const floating* weight, floating* grad_weight,
                                         floating* grad_bias, floating* coef) noexcept nogil:
    """The whole training backward of one planar channel: the same segment sums, added in the
    same order, and the same epilogue as the unfused passes, then its dx at once."""
    cdef Py_ssize_t q, off, length, chan, slot
    cdef double ta = 0.0, tb = 0.0
    for q in range(g.n * g.segs):
        off = planar_item(g, channel_segment(g, ch, q), &length, &chan, &slot)
        segment_grad_sums(act, dy + off, at(out, off), x + off, length, mean[ch], <floating>0,
                          <floating*>NULL, pa + slot, pb + slot)
        ta += pa[slot]
        tb += pb[slot]
    sum_dy[ch] = ta
    sum_dy_xc[ch] = tb
    backward_channel(ch, g.c, count, mean, invstd, sum_dy, sum_dy_xc, weight, grad_weight,
                     grad_bias, coef)
    for q in range(g.n * g.segs):
        off = planar_item(g, channel_segment(g, ch, q), &length, &chan, &slot)
        grad_input_run(act, dy + off, at(out, off), x + off, dx + off, length, coef[ch],
                       coef[g.c + ch], coef[4 * g.c + ch], coef[2 * g.c + ch], coef[3 * g.c + ch])


cdef inline void backward_columns_tile(const activation* act, const Geometry* g,
                                       const floating* dy, const floating* out,
                                       const floating* x, floating* dx, Py_ssize_t t, double* pa, double* pb,
                                       const double* col_center, double count,
                                       const double* mean, const double* invstd, double* sum_dy,
                                       double* sum_dy_xc, const floating* weight,
                                       floating* grad_weight, floating* grad_bias,
                                       floating* coef) noexcept nogil:
    """The whole training backward of the channels of one column tile, over all rows: the same
    items, sums and epilogue as the unfused passes, then their dx while the tile is in cache."""
    cdef Py_ssize_t b, r, ch, off, col0, width, ch0, ch1, c = g.c
    tile_channels(g, t, &col0, &width, &ch0, &ch1)
    for b in range(g.full_blocks):
        grad_sums_item(act, g, dy, out, x, col_center, <floating*>NULL, <floating*>NULL,
                       b * g.tiles + t, pa, pb)
    merge_sums(g, pa, pb, sum_dy, sum_dy_xc, ch0, ch1)
    for ch in range(ch0, ch1):
        backward_channel(ch, c, count, mean, invstd, sum_dy, sum_dy_xc, weight, grad_weight,
                         grad_bias, coef)
    for r in range(g.rows):
        off = r * g.period
        if g.s == 1:
            grad_input_row(act, dy + off + col0, at(out, off + col0), x + off + col0,
                           dx + off + col0, width, coef + ch0, coef + c + ch0,
                           coef + 4 * c + ch0, coef + 2 * c + ch0, coef + 3 * c + ch0)
        else:
            for ch in range(ch0, ch1):
                grad_input_run(act, dy + off + ch * g.s, at(out, off + ch * g.s), x + off + ch * g.s,
                               dx + off + ch * g.s, g.s,
                               coef[ch], coef[c + ch], coef[4 * c + ch], coef[2 * c + ch],
                               coef[3 * c + ch])


cdef int backward_train_impl(const activation* act, const Geometry* g, const floating* dy,
                             const floating* out, const floating* x, floating* dx, const floating* weight, const double* mean,
                             const double* invstd, floating* grad_weight, floating* grad_bias,
                             int n_threads) noexcept nogil:
    """Backward of training-mode normalisation (batch statistics depend on x)."""
    cdef Py_ssize_t ch, c = g.c
    cdef double count = <double>(g.n * g.s)
    cdef int rc = 0
    cdef int nt = threads_for(g, n_threads, c)
    cdef double* sums
    cdef double* center_work = NULL
    cdef const double* col_center
    cdef floating* coef
    cdef floating* fill
    cdef Py_ssize_t t
    cdef int nt_tiles = threads_for(g, n_threads, g.tiles)
    cdef bint tiles = not fuse_channels(g, sizeof(floating), nt) and fuse_tiles(g, sizeof(floating), nt_tiles)
    if not fuse_channels(g, sizeof(floating), nt) and not tiles:
        sums = <double*>malloc(2 * c * sizeof(double))
        if sums == NULL:
            return -1
        rc = grad_sums_pass(act, g, dy, out, x, mean, <floating*>NULL, <floating*>NULL,
                            sums, sums + c, n_threads)
        if rc == 0:
            rc = grad_input_from_sums(act, g, dy, out, x, dx, weight, mean, invstd, sums, sums + c,
                                      count, grad_weight, grad_bias, n_threads)
        free(sums)
        return rc
    sums = <double*>malloc((2 * c + 2 * g.partial_len) * sizeof(double))
    coef = <floating*>malloc(5 * c * sizeof(floating))
    fill = fillers(x, c)
    if tiles:
        center_work = <double*>malloc(g.period * sizeof(double))
    if sums == NULL or coef == NULL or fill == NULL or (tiles and center_work == NULL):
        free(sums); free(coef); free(fill); free(center_work)
        return -1
    if weight == NULL:
        weight = fill
    if grad_weight == NULL:
        grad_weight = fill + 2 * c
    if grad_bias == NULL:
        grad_bias = fill + 3 * c
    if tiles:
        # the tiles' sums take the mean per column, as the unfused pass's do
        col_center = per_column(g, mean, center_work)
        if nt_tiles == 1:
            for t in range(g.tiles):
                backward_columns_tile(act, g, dy, out, x, dx, t, sums + 2 * c, sums + 2 * c + g.partial_len,
                                      col_center, count, mean, invstd, sums, sums + c, weight,
                                      grad_weight, grad_bias, coef)
        else:
            for t in prange(g.tiles, num_threads=nt_tiles, schedule="static"):
                backward_columns_tile(act, g, dy, out, x, dx, t, sums + 2 * c, sums + 2 * c + g.partial_len,
                                      col_center, count, mean, invstd, sums, sums + c, weight,
                                      grad_weight, grad_bias, coef)
    elif nt == 1:
        for ch in range(c):
            backward_planar_channel(act, g, dy, out, x, dx, ch, sums + 2 * c, sums + 2 * c + g.partial_len,
                                    count, mean, invstd, sums, sums + c, weight, grad_weight,
                                    grad_bias, coef)
    else:
        for ch in prange(c, num_threads=nt, schedule="static"):
            backward_planar_channel(act, g, dy, out, x, dx, ch, sums + 2 * c, sums + 2 * c + g.partial_len,
                                    count, mean, invstd, sums, sums + c, weight, grad_weight,
                                    grad_bias, coef)
    free(center_work)
    free(sums)
    free(coef)
    free(fill)
    return rc


cdef int backward_eval_impl(const activation* act, const Geometry* g, const floating* dy,
                            const floating* out, const floating* x, floating* dx, const floating* weight, const double* mean,
                            const double* invstd, floating* grad_weight, floating* grad_bias,
                            int n_threads) noexcept nogil:
    """Backward of eval-mode normalisation (fixed statistics): dx = weight * invstd * dy, in the
    same pass as the sums for the parameter gradients when those are wanted."""
    cdef Py_ssize_t ch, c = g.c
    cdef int rc
    cdef double* work = <double*>malloc(3 * c * sizeof(double) + 5 * c * sizeof(floating))
    if work == NULL:
        return -1
    cdef double* sums = work + c
    cdef floating* scale = <floating*>(work + 3 * c)
    cdef floating* coef = scale + c   # [center 0, scale, shift 0, factor 1] of dx = scale * dy
    widen(weight, 1.0, work, c)
    for ch in range(c):
        scale[ch] = <floating>(work[ch] * invstd[ch])
        coef[ch] = 0
        coef[c + ch] = scale[ch]
        coef[2 * c + ch] = 0
        coef[3 * c + ch] = 1
    if grad_weight == NULL and grad_bias == NULL and activation is Identity:
        # dx = (dy * 1 - 0) * scale + 0: the normalisation pass applied to dy.
        rc = affine_pass(act, g, dy, dx, coef, n_threads)
    else:
        # (with an activation, dy must be gated: the sums pass does that, and its sums are
        # the parameter gradients when those are wanted)
        rc = grad_sums_pass(act, g, dy, out, x, mean, scale, dx, sums, sums + c, n_threads)
        if rc == 0:
            parameter_grads(c, sums, sums + c, invstd, grad_weight, grad_bias)
    free(work)
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


def _force_layout(name):
    """Force the 'planar' or 'columns' layout for every shape, or None to choose by shape.
    For tests and tuning only: both layouts must give the same results to rounding."""
    global forced_layout
    forced_layout = {None: 0, "planar": 1, "columns": 2}[name]


def _set_fusion(enabled):
    """Allow (True) or forbid (False) the fused passes.  For tests and tuning only: fused and
    unfused passes must give the same bits."""
    global fusion_enabled
    fusion_enabled = bool(enabled)


def describe_layout(shape):
    """How the kernels walk an input of this shape: a dict of the geometry (for tests and bench)."""
    cdef Geometry g
    set_geometry(&g, _shape_probe(shape))
    return dict(layout="planar" if g.planar else "columns", n=g.n, c=g.c, s=g.s,
                segments=g.segs, segment_length=g.seg_len, group=g.group, period=g.period,
                rows=g.rows, tail=g.tail, tile=g.tile, block=g.block, tiles=g.tiles, items=g.items)


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
                    cnp.ndarray mean, cnp.ndarray invstd, int n_threads, bint relu=False):
    """y = (x - mean) * invstd * weight + bias with given float64 statistics (then ReLU)."""
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
        if f32 and relu:
            rc = normalize(<ReLU*>NULL, &g, <const float*>xp, <float*>yp, <const float*>wp,
                           <const float*>bp, mp, NULL, ip, n_threads)
        elif f32:
            rc = normalize(<Identity*>NULL, &g, <const float*>xp, <float*>yp, <const float*>wp,
                           <const float*>bp, mp, NULL, ip, n_threads)
        elif relu:
            rc = normalize(<ReLU*>NULL, &g, <const double*>xp, <double*>yp, <const double*>wp,
                           <const double*>bp, mp, NULL, ip, n_threads)
        else:
            rc = normalize(<Identity*>NULL, &g, <const double*>xp, <double*>yp, <const double*>wp,
                           <const double*>bp, mp, NULL, ip, n_threads)
    check(rc)


def forward_train(cnp.ndarray x, cnp.ndarray y, object weight, object bias,
                  object running_mean, object running_var, double momentum, double eps,
                  cnp.ndarray save_mean, cnp.ndarray save_invstd, int n_threads, bint relu=False):
    """Training-mode forward: batch statistics into save_mean/save_invstd (float64), running
    buffers (when not None) updated in place, y written (then ReLU).  Needs N * S >= 2.
    float16 x and y (where half_simd() is True) are computed in float32 with float32
    parameters and buffers (see check_half_arguments)."""
    cdef Geometry g
    cdef int rc = 0
    cdef bint half = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT16 or cnp.PyArray_TYPE(y) == cnp.NPY_FLOAT16
    if half:
        check_half_arguments("forward_train", x, y, (weight, bias, running_mean, running_var))
    cdef bint f32 = half or cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef void* xp = ptr(x)
    cdef void* yp = ptr(y)
    # float16 data is handed over as such, to the float32 specialisation (see affine_pass)
    cdef const unsigned short* half_x = <const unsigned short*>xp if half else NULL
    cdef unsigned short* half_y = <unsigned short*>yp if half else NULL
    if half:
        xp = yp = NULL
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
        if f32 and relu:
            rc = forward_train_impl(<ReLU*>NULL, &g, <const float*>xp, <float*>yp, <const float*>wp,
                                    <const float*>bp, <float*>rmp, <float*>rvp, momentum, eps,
                                    mp, ip, n_threads, half_x, half_y)
        elif f32:
            rc = forward_train_impl(<Identity*>NULL, &g, <const float*>xp, <float*>yp,
                                    <const float*>wp, <const float*>bp, <float*>rmp, <float*>rvp,
                                    momentum, eps, mp, ip, n_threads, half_x, half_y)
        elif relu:
            rc = forward_train_impl(<ReLU*>NULL, &g, <const double*>xp, <double*>yp,
                                    <const double*>wp, <const double*>bp, <double*>rmp,
                                    <double*>rvp, momentum, eps, mp, ip, n_threads)
        else:
            rc = forward_train_impl(<Identity*>NULL, &g, <const double*>xp, <double*>yp,
                                    <const double*>wp, <const double*>bp, <double*>rmp,
                                    <double*>rvp, momentum, eps, mp, ip, n_threads)
    check(rc)


def forward_eval(cnp.ndarray x, cnp.ndarray y, object weight, object bias,
                 cnp.ndarray running_mean, cnp.ndarray running_var, double eps,
                 cnp.ndarray save_mean, cnp.ndarray save_invstd, int n_threads, bint relu=False):
    """Eval-mode forward with running statistics (then ReLU); save_mean/save_invstd (float64)
    receive the statistics used: running_mean and 1 / sqrt(running_var + eps).  float16 x and
    y as forward_train takes them."""
    cdef Geometry g
    cdef int rc = 0
    cdef bint half = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT16 or cnp.PyArray_TYPE(y) == cnp.NPY_FLOAT16
    if half:
        check_half_arguments("forward_eval", x, y, (weight, bias, running_mean, running_var))
    cdef bint f32 = half or cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef void* xp = ptr(x)
    cdef void* yp = ptr(y)
    # float16 data is handed over as such, to the float32 specialisation (see affine_pass)
    cdef const unsigned short* half_x = <const unsigned short*>xp if half else NULL
    cdef unsigned short* half_y = <unsigned short*>yp if half else NULL
    if half:
        xp = yp = NULL
    cdef void* wp = ptr(weight)
    cdef void* bp = ptr(bias)
    cdef void* rmp = ptr(running_mean)
    cdef void* rvp = ptr(running_var)
    cdef double* mp = <double*>ptr(save_mean)
    cdef double* ip = <double*>ptr(save_invstd)
    set_geometry(&g, x)
    with nogil:
        if f32 and relu:
            rc = forward_eval_impl(<ReLU*>NULL, &g, <const float*>xp, <float*>yp, <const float*>wp,
                                   <const float*>bp, <const float*>rmp, <const float*>rvp, eps,
                                   mp, ip, n_threads, half_x, half_y)
        elif f32:
            rc = forward_eval_impl(<Identity*>NULL, &g, <const float*>xp, <float*>yp,
                                   <const float*>wp, <const float*>bp, <const float*>rmp,
                                   <const float*>rvp, eps, mp, ip, n_threads, half_x, half_y)
        elif relu:
            rc = forward_eval_impl(<ReLU*>NULL, &g, <const double*>xp, <double*>yp,
                                   <const double*>wp, <const double*>bp, <const double*>rmp,
                                   <const double*>rvp, eps, mp, ip, n_threads)
        else:
            rc = forward_eval_impl(<Identity*>NULL, &g, <const double*>xp, <double*>yp,
                                   <const double*>wp, <const double*>bp, <const double*>rmp,
                                   <const double*>rvp, eps, mp, ip, n_threads)
    check(rc)


def grad_sums(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray center, cnp.ndarray sum_dy,
              cnp.ndarray sum_dy_xc, int n_threads, object output=None):
    """Per-channel sum(g) and sum(g * (x - center)) into float64 arrays, g being dy, or, when
    the forward's output is given, dy gated by its ReLU (dy where output > 0)."""
    cdef Geometry g
    cdef int rc = 0
    cdef bint f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef bint relu = output is not None
    cdef void* dyp = ptr(dy)
    cdef void* op = ptr(output)
    cdef void* xp = ptr(x)
    cdef double* cp = <double*>ptr(center)
    cdef double* sap = <double*>ptr(sum_dy)
    cdef double* sbp = <double*>ptr(sum_dy_xc)
    set_geometry(&g, x)
    if g.total == 0:
        return
    with nogil:
        if f32 and relu:
            rc = grad_sums_pass(<ReLU*>NULL, &g, <const float*>dyp, <const float*>op,
                                <const float*>xp, cp, <float*>NULL, <float*>NULL, sap, sbp,
                                n_threads)
        elif f32:
            rc = grad_sums_pass(<Identity*>NULL, &g, <const float*>dyp, <const float*>NULL,
                                <const float*>xp, cp, <float*>NULL, <float*>NULL, sap, sbp,
                                n_threads)
        elif relu:
            rc = grad_sums_pass(<ReLU*>NULL, &g, <const double*>dyp, <const double*>op,
                                <const double*>xp, cp, <double*>NULL, <double*>NULL, sap, sbp,
                                n_threads)
        else:
            rc = grad_sums_pass(<Identity*>NULL, &g, <const double*>dyp, <const double*>NULL,
                                <const double*>xp, cp, <double*>NULL, <double*>NULL, sap, sbp,
                                n_threads)
    check(rc)


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, object weight, cnp.ndarray mean,
             cnp.ndarray invstd, object grad_weight, object grad_bias, bint training,
             int n_threads, object output=None):
    """dx (and grad_weight/grad_bias when not None) of y = (x - mean) * invstd * weight + bias,
    or of ReLU(y) when the forward's output is given (it supplies the ReLU's mask).

    training=True: mean and invstd are the batch statistics of x (so depend on it);
    training=False: they are constants (running statistics).
    """
    cdef Geometry g
    cdef int rc = 0
    cdef bint f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef bint relu = output is not None
    cdef void* dyp = ptr(dy)
    cdef void* op = ptr(output)
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
        if f32:
            if training and relu:
                rc = backward_train_impl(<ReLU*>NULL, &g, <const float*>dyp, <const float*>op,
                                         <const float*>xp, <float*>dxp, <const float*>wp, mp, ip,
                                         <float*>gwp, <float*>gbp, n_threads)
            elif training:
                rc = backward_train_impl(<Identity*>NULL, &g, <const float*>dyp, <const float*>NULL,
                                         <const float*>xp, <float*>dxp, <const float*>wp, mp, ip,
                                         <float*>gwp, <float*>gbp, n_threads)
            elif relu:
                rc = backward_eval_impl(<ReLU*>NULL, &g, <const float*>dyp, <const float*>op,
                                        <const float*>xp, <float*>dxp, <const float*>wp, mp, ip,
                                        <float*>gwp, <float*>gbp, n_threads)
            else:
                rc = backward_eval_impl(<Identity*>NULL, &g, <const float*>dyp, <const float*>NULL,
                                        <const float*>xp, <float*>dxp, <const float*>wp, mp, ip,
                                        <float*>gwp, <float*>gbp, n_threads)
        else:
            if training and relu:
                rc = backward_train_impl(<ReLU*>NULL, &g, <const double*>dyp, <const double*>op,
                                         <const double*>xp, <double*>dxp, <const double*>wp, mp,
                                         ip, <double*>gwp, <double*>gbp, n_threads)
            elif training:
                rc = backward_train_impl(<Identity*>NULL, &g, <const double*>dyp,
                                         <const double*>NULL, <const double*>xp, <double*>dxp,
                                         <const double*>wp, mp, ip, <double*>gwp, <double*>gbp,
                                         n_threads)
            elif relu:
                rc = backward_eval_impl(<ReLU*>NULL, &g, <const double*>dyp, <const double*>op,
                                        <const double*>xp, <double*>dxp, <const double*>wp, mp,
                                        ip, <double*>gwp, <double*>gbp, n_threads)
            else:
                rc = backward_eval_impl(<Identity*>NULL, &g, <const double*>dyp,
                                        <const double*>NULL, <const double*>xp, <double*>dxp,
                                        <const double*>wp, mp, ip, <double*>gwp, <double*>gbp,
                                        n_threads)
    check(rc)


def backward_from_sums(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, object weight,
                       cnp.ndarray mean, cnp.ndarray invstd, cnp.ndarray sum_dy,
                       cnp.ndarray sum_dy_xc, double count, int n_threads, object output=None):
    """Training-mode dx given per-channel sums of g and g * (x - mean) over `count` values per
    channel, which may span several processes (distributed batch norm); g is dy, or dy gated
    by the ReLU of the forward's output when that is given."""
    cdef Geometry g
    cdef int rc = 0
    cdef bint f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef bint relu = output is not None
    cdef void* dyp = ptr(dy)
    cdef void* op = ptr(output)
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
        if f32 and relu:
            rc = grad_input_from_sums(<ReLU*>NULL, &g, <const float*>dyp, <const float*>op,
                                      <const float*>xp, <float*>dxp, <const float*>wp, mp, ip,
                                      sap, sbp, count, <float*>NULL, <float*>NULL, n_threads)
        elif f32:
            rc = grad_input_from_sums(<Identity*>NULL, &g, <const float*>dyp, <const float*>NULL,
                                      <const float*>xp, <float*>dxp, <const float*>wp, mp, ip,
                                      sap, sbp, count, <float*>NULL, <float*>NULL, n_threads)
        elif relu:
            rc = grad_input_from_sums(<ReLU*>NULL, &g, <const double*>dyp, <const double*>op,
                                      <const double*>xp, <double*>dxp, <const double*>wp, mp, ip,
                                      sap, sbp, count, <double*>NULL, <double*>NULL, n_threads)
        else:
            rc = grad_input_from_sums(<Identity*>NULL, &g, <const double*>dyp,
                                      <const double*>NULL, <const double*>xp, <double*>dxp,
                                      <const double*>wp, mp, ip, sap, sbp, count, <double*>NULL,
                                      <double*>NULL, n_threads)
    check(rc)


def parallel_copy(cnp.ndarray src, cnp.ndarray dst, int n_threads):
    """dst[...] = src for C-contiguous arrays of the same size, on up to n_threads threads.

    The bandwidth yardstick of the benchmarks: the fastest way to move these bytes with this
    many threads, which a kernel that reads and writes each byte once cannot beat.
    """
    cdef char* s = <char*>cnp.PyArray_DATA(src)
    cdef char* d = <char*>cnp.PyArray_DATA(dst)
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(src), chunk, k, parts
    if cnp.PyArray_NBYTES(dst) != nbytes:
        raise ValueError("parallel_copy: src and dst sizes differ")
    parts = max(1, min(<Py_ssize_t>n_threads, nbytes // (GRAIN * 4)))
    chunk = ((nbytes + parts - 1) // parts + 63) // 64 * 64
    with nogil:
        if parts == 1:
            memcpy(d, s, nbytes)
        else:
            for k in prange(parts, num_threads=<int>parts, schedule="static"):
                if k * chunk < nbytes:
                    memcpy(d + k * chunk, s + k * chunk, min(chunk, nbytes - k * chunk))


# ---------------------------------------------------------------------------------------------
# float16 <-> float32.  fastbn computes float16 data in float32; numpy's astype converts about
# ten times slower than memory moves, which made the conversions cost more than the batch norm.
# With F16C (the avx2 and avx512 variants) these convert 8 or 16 values per instruction, with
# IEEE round-to-nearest-even -- numpy's rounding -- on all threads.  Without it (the baseline
# build, other compilers), half_simd() is False and callers use numpy.
# ---------------------------------------------------------------------------------------------

cdef extern from *:
    """
    #if defined(__F16C__)
    #include <immintrin.h>
    #define FASTBN_HALF_SIMD 1
    static void fastbn_widen_half(const void *src, float *dst, Py_ssize_t n) {
        const unsigned short *s = (const unsigned short *)src;
        Py_ssize_t i = 0;
    #if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
    #endif
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
        for (; i < n; i++)
            dst[i] = _cvtsh_ss(s[i]);
    }
    static void fastbn_narrow_half(const float *src, void *dst, Py_ssize_t n) {
        unsigned short *d = (unsigned short *)dst;
        Py_ssize_t i = 0;
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
    }
    #else
    #define FASTBN_HALF_SIMD 0
    /* Never called: half_simd() tells the caller to convert with numpy. */
    static void fastbn_widen_half(const void *src, float *dst, Py_ssize_t n) {
        (void)src; (void)dst; (void)n;
    }
    static void fastbn_narrow_half(const float *src, void *dst, Py_ssize_t n) {
        (void)src; (void)dst; (void)n;
    }
    #endif
    """
    bint HALF_SIMD "FASTBN_HALF_SIMD"
    void widen_half_run "fastbn_widen_half"(const void* src, float* dst, Py_ssize_t n) noexcept nogil
    void narrow_half_run "fastbn_narrow_half"(const float* src, void* dst, Py_ssize_t n) noexcept nogil


def half_simd():
    """Whether this build converts float16 with F16C instructions (else callers use numpy)."""
    return bool(HALF_SIMD)


cdef void convert_half(bint widen, void* src, void* dst, Py_ssize_t n, int n_threads) noexcept nogil:
    """Widen float16 src into float32 dst, or narrow float32 src into float16 dst: n values,
    in contiguous chunks of whole cache lines, one per thread."""
    cdef Py_ssize_t parts = max(1, min(<Py_ssize_t>n_threads, n // GRAIN)), chunk, k, start
    chunk = ((n + parts - 1) // parts + 31) // 32 * 32
    if parts == 1:
        if widen:
            widen_half_run(src, <float*>dst, n)
        else:
            narrow_half_run(<const float*>src, dst, n)
        return
    for k in prange(parts, num_threads=<int>parts, schedule="static"):
        start = k * chunk
        if start < n:
            if widen:
                widen_half_run(<unsigned short*>src + start, <float*>dst + start, min(chunk, n - start))
            else:
                narrow_half_run(<float*>src + start, <unsigned short*>dst + start, min(chunk, n - start))


def convert_float16(cnp.ndarray src not None, cnp.ndarray dst not None, int n_threads):
    """dst[...] = src between aligned, C-contiguous, native-order float16 and float32 arrays of
    the same size (either way round) that do not overlap, rounding to nearest even.  Only
    where half_simd() is True."""
    cdef Py_ssize_t n = cnp.PyArray_SIZE(src)
    cdef int s = cnp.PyArray_TYPE(src), d = cnp.PyArray_TYPE(dst)
    cdef bint widen = s == cnp.NPY_FLOAT16 and d == cnp.NPY_FLOAT32
    cdef char* sp = <char*>cnp.PyArray_DATA(src)
    cdef char* dp = <char*>cnp.PyArray_DATA(dst)
    if not HALF_SIMD:
        raise RuntimeError("convert_float16: this build has no F16C conversions (see half_simd)")
    if not (widen or (s == cnp.NPY_FLOAT32 and d == cnp.NPY_FLOAT16)):
        raise TypeError("convert_float16: expected float16 -> float32 or float32 -> float16")
    if not (cnp.PyArray_ISNOTSWAPPED(src) and cnp.PyArray_ISNOTSWAPPED(dst)):
        raise ValueError("convert_float16: expected arrays in the machine's byte order")
    if cnp.PyArray_SIZE(dst) != n or not (cnp.PyArray_IS_C_CONTIGUOUS(src) and cnp.PyArray_IS_C_CONTIGUOUS(dst)):
        raise ValueError("convert_float16: expected C-contiguous arrays of the same size")
    if not (cnp.PyArray_ISALIGNED(src) and cnp.PyArray_ISALIGNED(dst)):
        raise ValueError("convert_float16: expected aligned arrays")
    if not cnp.PyArray_ISWRITEABLE(dst):
        raise ValueError("convert_float16: dst is read-only")
    if n and sp < dp + cnp.PyArray_NBYTES(dst) and dp < sp + cnp.PyArray_NBYTES(src):
        raise ValueError("convert_float16: src and dst overlap")
    with nogil:
        convert_half(widen, sp, dp, n, n_threads)


# ---------------------------------------------------------------------------------------------
# The forwards on float16 data, without float32 copies of it.  Each work item of the
# statistics and elementwise passes is walked in blocks small enough for L1: widened into a
# float32 buffer on the thread's stack and handed to the float32 inner loops themselves
# (segment_moments, tile_moments_rows, affine_run, affine_row), whose results are narrowed
# into the output.  The items, their order and the arithmetic are the float32 path's, so the
# results are that path's, rounded, bit for bit; the memory traffic is the float16 bytes
# (read twice in training, written once) instead of four float32 passes more.
# ---------------------------------------------------------------------------------------------

cdef enum:
    # Values per staging block: two float32 buffers of this many values stay in L1.
    HALF_BLOCK = 2048
    # Rows of a column tile staged at once (a multiple of four: tile_moments_rows' sweep).
    HALF_ROWS = 16


cdef inline void segment_moments_half(const unsigned short* x, Py_ssize_t n, double* shift,
                                      double* offset, double* m2) noexcept nogil:
    cdef float xs[SEGMENT]  # planar segments are at most SEGMENT long (set_geometry)
    widen_half_run(x, xs, n)
    segment_moments(xs, n, shift, offset, m2)


cdef inline void tile_moments_half(const unsigned short* x, Py_ssize_t stride,
                                   Py_ssize_t nrows, Py_ssize_t width, double* shift_out,
                                   double* offset, double* m2) noexcept nogil:
    cdef float rows[HALF_ROWS * TILE]
    cdef double shift[TILE]
    cdef double s1[TILE]
    cdef double s2[TILE]
    cdef Py_ssize_t r = 0, i, m
    while r < nrows:
        m = min(<Py_ssize_t>HALF_ROWS, nrows - r)
        for i in range(m):
            widen_half_run(x + (r + i) * stride, rows + i * TILE, width)
        if r == 0:
            tile_moments_start(rows, width, shift, s1, s2)
        tile_moments_rows(rows, TILE, m, width, shift, s1, s2)
        r += m
    tile_moments_finish(nrows, width, shift, s1, s2, shift_out, offset, m2)


cdef inline void moments_item_half(const Geometry* g, const unsigned short* x, Py_ssize_t k,
                                   double* pshift, double* poffset, double* pm2) noexcept nogil:
    """moments_item on float16 data (the same items and partial slots)."""
    cdef Py_ssize_t off, length, ch, slot, nrows, width, col0
    if g.planar:
        off = planar_item(g, k, &length, &ch, &slot)
        segment_moments_half(x + off, length, pshift + slot, poffset + slot, pm2 + slot)
    else:
        off = columns_item(g, k, &nrows, &width, &col0)
        slot = columns_slot(g, k, col0)
        tile_moments_half(x + off, g.period, nrows, width, pshift + slot, poffset + slot, pm2 + slot)


cdef inline void affine_run_half(const activation* act, const unsigned short* x,
                                 unsigned short* y, Py_ssize_t n, float factor, float center,
                                 float scale, float shift) noexcept nogil:
    cdef float xs[HALF_BLOCK]
    cdef float ys[HALF_BLOCK]
    cdef Py_ssize_t j = 0, m
    while j < n:
        m = min(<Py_ssize_t>HALF_BLOCK, n - j)
        widen_half_run(x + j, xs, m)
        affine_run(act, xs, ys, m, factor, center, scale, shift)
        narrow_half_run(ys, y + j, m)
        j += m


cdef inline void affine_row_half(const activation* act, const unsigned short* x,
                                 unsigned short* y, Py_ssize_t n, const float* factor,
                                 const float* center, const float* scale,
                                 const float* shift) noexcept nogil:
    cdef float xs[HALF_BLOCK]
    cdef float ys[HALF_BLOCK]
    cdef Py_ssize_t j = 0, m
    while j < n:
        m = min(<Py_ssize_t>HALF_BLOCK, n - j)
        widen_half_run(x + j, xs, m)
        affine_row(act, xs, ys, m, factor + j, center + j, scale + j, shift + j)
        narrow_half_run(ys, y + j, m)
        j += m


cdef inline void affine_item_half(const activation* act, const Geometry* g,
                                  const unsigned short* x, unsigned short* y, Py_ssize_t k,
                                  const float* factor, const float* center, const float* scale,
                                  const float* shift) noexcept nogil:
    """affine_item on float16 data (the same items, spans and coefficients)."""
    cdef Py_ssize_t off, length, ch, slot
    if g.planar:
        off = planar_item(g, k, &length, &ch, &slot)
        affine_run_half(act, x + off, y + off, length, factor[ch], center[ch], scale[ch], shift[ch])
    elif not by_rows(g):
        off = k * g.c * g.s
        for ch in range(g.c):
            affine_run_half(act, x + off + ch * g.s, y + off + ch * g.s, g.s, factor[ch],
                            center[ch], scale[ch], shift[ch])
    else:
        off = k * g.period
        affine_row_half(act, x + off, y + off, row_length(g, k), factor, center, scale, shift)


cdef void check_half_arguments(str name, cnp.ndarray x, cnp.ndarray y, tuple per_channel) except *:
    """The forwards' contract for float16 data, checked: x and y aligned, C-contiguous float16 of
    one shape (N, C, ...) in the machine's byte order, y writable and x itself or apart from
    it, and the per-channel arrays None or C-contiguous float32 of C values."""
    if not HALF_SIMD:
        raise RuntimeError(f"{name}: this build has no F16C conversions (see half_simd)")
    for a in (x, y):
        if not (cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT16 and cnp.PyArray_ISNOTSWAPPED(a)
                and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISALIGNED(a)):
            raise ValueError(f"{name}: expected aligned, C-contiguous float16 arrays in the "
                             "machine's byte order")
    if (<object>x).shape != (<object>y).shape or cnp.PyArray_NDIM(x) < 2:
        raise ValueError(f"{name}: expected x and y of the same shape (N, C, ...)")
    if not cnp.PyArray_ISWRITEABLE(y):
        raise ValueError(f"{name}: y is read-only")
    cdef char* xp = <char*>cnp.PyArray_DATA(x)
    cdef char* yp = <char*>cnp.PyArray_DATA(y)
    if xp != yp and xp < yp + cnp.PyArray_NBYTES(y) and yp < xp + cnp.PyArray_NBYTES(x):
        raise ValueError(f"{name}: x and y overlap without being the same array")
    for a in per_channel:
        if a is not None and not (cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32
                                  and cnp.PyArray_SIZE(a) == x.shape[1]
                                  and cnp.PyArray_IS_C_CONTIGUOUS(a)):
            raise ValueError(f"{name}: expected float32 per-channel arrays")
