# Geometry and work split: how an (N, C, *spatial) tensor is walked, cut into work items, and
# how many threads a pass starts.  Everything here depends on the shape alone (and the tuning
# switches of fastbn._tuning), never on the thread count, so results do not either.

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
    # The elementwise pass of short planes (per-column coefficients) goes through blocks of
    # ROW_BLOCK rows, ROW_CHUNK columns at a time where a row's coefficients take more than
    # ROW_COEFFICIENT_BYTES, so that a chunk's stay in L1 (see affine_rows).
    ROW_BLOCK = 16
    ROW_CHUNK = 512
    ROW_COEFFICIENT_BYTES = 16 * 1024
    # The backward's row pass (whole rows, never chunked) goes through blocks of
    # GRAD_ROW_BLOCK rows: four, the rows fastbn_grad_input_rows4 takes at once, and no more,
    # so that few rows still spread over the threads.
    GRAD_ROW_BLOCK = 4
    # Column reductions cut the rows into blocks so as to have at least this many work items.
    ITEMS_TARGET = 32
    BLOCK_MIN_ROWS = 64
    # Elements per thread under which another thread costs more (fork/join) than it saves.
    GRAIN = 32768
    # Planar channels of at least FUSE_CHANNEL_MIN_BYTES, and within fastbn._tuning's fusion
    # limits for this CPU (their size, their samples' pieces' size), are processed one by
    # one, statistics then the elementwise pass while the channel is still in cache: two
    # passes over memory instead of three in the forward, three instead of five in the
    # backward.  Below 1 KiB a channel's fixed costs dominate, and the separate passes, whose
    # per-channel epilogue is one vectorised loop, win (1.15x on (1, 512, 7, 7)).
    # Column tiles within the limits' tile sizes (all rows) are fused likewise, where a row's
    # columns are its channels (S = 1: BatchNorm1d's (N, C), 1x1 planes).  Tiles of channel
    # runs (S > 1) went 1.2-1.5x slower on (256, 512, 7, 7): each of their rows is a short
    # piece far from the next, where the separate passes stream.
    FUSE_CHANNEL_MIN_BYTES = 1024


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


cdef struct Tile:
    # A column tile of the columns layout: `nrows` rows `stride` elements apart, `width`
    # columns from column `col0` of a row, its first element at `offset`.
    Py_ssize_t offset, stride, nrows, width, col0


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef void set_geometry(Geometry* g, const cnp.npy_intp* shape, int ndim) noexcept nogil:
    cdef Py_ssize_t i, cs
    cdef int forced = layout_override()
    g.n = shape[0]
    g.c = shape[1]
    g.s = 1
    for i in range(2, ndim):
        g.s *= shape[i]
    g.total = g.n * g.c * g.s
    g.planar = g.s >= max(<Py_ssize_t>RUN_MIN_S, min(<Py_ssize_t>PLANAR_MIN_S, PLANAR_PER_SAMPLE * g.n))
    if forced:
        g.planar = forced == 1
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
# (columns); an elementwise item is a plane segment (planar), a sample (runs of planes in the
# columns layout) or a row -- which the row passes take in blocks (ROW_BLOCK rows forward,
# GRAD_ROW_BLOCK backward).
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


cdef inline Py_ssize_t channel_segment(const Geometry* g, Py_ssize_t ch, Py_ssize_t q) noexcept nogil:
    """The planar work item of channel ch's q-th part (sample q // segs, segment q % segs)."""
    return ((q // g.segs) * g.c + ch) * g.segs + q % g.segs


cdef inline Py_ssize_t columns_item(const Geometry* g, Py_ssize_t k, Tile* t) noexcept nogil:
    """Column tile k (its rows, columns and first element in t); returns its partial slot:
    its block's row of partials, at its first column."""
    cdef Py_ssize_t b, i, row0, row_width
    if k < g.full_blocks * g.tiles:
        b = k // g.tiles
        i = k - b * g.tiles
        row0 = b * g.block
        t.nrows = min(g.block, g.rows - row0)
        row_width = g.period
    else:
        b = g.full_blocks
        i = k - g.full_blocks * g.tiles
        row0 = g.rows
        t.nrows = 1
        row_width = g.tail * g.c * g.s
    t.stride = g.period
    t.col0 = i * g.tile
    t.width = min(g.tile, row_width - t.col0)
    t.offset = row0 * g.period + t.col0
    return b * g.period + t.col0


cdef inline Py_ssize_t row_length(const Geometry* g, Py_ssize_t r) noexcept nogil:
    """Elements in row r of the columns layout (the last, short row holds `tail` samples)."""
    return g.period if r < g.rows else g.tail * g.c * g.s


cdef inline Py_ssize_t n_rows(const Geometry* g) noexcept nogil:
    return g.rows + (g.tail > 0)


cdef inline bint by_rows(const Geometry* g) noexcept nogil:
    """Whether elementwise passes walk rows with per-column coefficients (short planes of the
    columns layout) rather than runs of planes with per-channel ones."""
    return not g.planar and g.s < RUN_MIN_S


cdef inline bint rows_by_four(const Geometry* g, Py_ssize_t itemsize) noexcept nogil:
    """Whether a row pass over g (the forward's or the backward's) goes four rows at a time
    (fastbn_affine_rows4, fastbn_grad_input_rows4) where the build can: float32
    arrays of up to _tuning.rows_by_four_max_bytes (at 16 MiB four rows lost on (8192, 512),
    likely because they interleave four streams within a page for the hardware prefetcher),
    whose rows are not a multiple of 4 KiB long.  Rows that are (C = 1024, 2048, ...) all sit
    at one address modulo 4 KiB, and where the coefficients sit near it too, the loads of a
    step wait on the four stores before them (4K aliasing, which the walk's direction cannot
    avoid for the coefficients): in C, (128, 2048) went 1.3x slower four rows at a time with
    its coefficients there, and rows of 4 KiB gained nothing even with them 2 KiB away."""
    return (g.total * itemsize <= rows_by_four_max_bytes()
            and (g.period * itemsize) % 4096 != 0)


cdef inline bint needs_expansion(const Geometry* g) noexcept nogil:
    return by_rows(g) and not (g.group == 1 and g.s == 1)


cdef inline Py_ssize_t elementwise_items(const Geometry* g) noexcept nogil:
    """Work items of an elementwise pass: plane segments (planar), samples (runs of planes in
    the columns layout) or rows (which the row passes then group into blocks)."""
    if g.planar:
        return g.items
    return g.n if g.s >= RUN_MIN_S else n_rows(g)


cdef inline bint fuse_channels(const Geometry* g, Py_ssize_t bytes_per_value, int nt) noexcept nogil:
    """Whether a pass on nt threads goes channel by channel with its channels in cache: planar
    layout, channels of FUSE_CHANNEL_MIN_BYTES up to the limits' channel_bytes, enough of them
    to keep every thread busy, and short pieces (several samples' runs under short_piece_bytes)
    only on two threads or more in an array under short_pieces_array_bytes (fastbn._tuning)."""
    cdef const FusionLimits* lim = fusion_limits()
    cdef Py_ssize_t channel_bytes = g.n * g.s * bytes_per_value
    cdef bint short_pieces = g.n > 1 and g.s * bytes_per_value < lim.short_piece_bytes
    return (fusion_allowed() and g.planar and FUSE_CHANNEL_MIN_BYTES <= channel_bytes
            and channel_bytes <= lim.channel_bytes
            and (not short_pieces
                 or (nt > 1 and g.total * bytes_per_value < lim.short_pieces_array_bytes))
            and (nt == 1 or g.c >= 4 * nt))


cdef inline bint fuse_tiles(const Geometry* g, Py_ssize_t bytes_per_value, int nt,
                            int n_threads) noexcept nogil:
    """Whether a columns-layout pass goes tile by tile over all rows with each tile in cache:
    rows must be one sample's channels (S = 1, so that a tile holds whole channels), tiles up
    to the limits' tile_bytes (on one thread, a tile among several over serial_tile_bytes
    only in an array of serial_tile_array_bytes or more; fastbn._tuning) and numerous enough
    to keep every thread busy, and the pass (nt threads) must get as many threads as its
    unfused passes would have of n_threads (one tile on one thread is no gain over two
    threads streaming)."""
    cdef const FusionLimits* lim = fusion_limits()
    cdef Py_ssize_t tile_bytes = g.n * g.tile * bytes_per_value
    return (fusion_allowed() and not g.planar and g.group == 1 and g.s == 1
            and tile_bytes <= lim.tile_bytes
            and (nt > 1 or g.tiles == 1 or tile_bytes <= lim.serial_tile_bytes
                 or g.total * bytes_per_value >= lim.serial_tile_array_bytes)
            and nt >= threads_for(g, n_threads, g.items)
            and (nt == 1 or g.tiles >= 4 * nt))


cdef enum:
    # How a training pass (forward or backward) goes over memory: see fused_pass.
    NOT_FUSED = 0
    FUSED_CHANNELS = 1
    FUSED_TILES = 2


cdef inline int fused_pass(const Geometry* g, Py_ssize_t bytes_per_value,
                           int n_threads) noexcept nogil:
    """Whether a training pass on up to n_threads threads goes channel by channel
    (FUSED_CHANNELS), tile by tile (FUSED_TILES) or in separate passes (NOT_FUSED): the one
    decision the forward and the backward share."""
    if fuse_channels(g, bytes_per_value, threads_for(g, n_threads, g.c)):
        return FUSED_CHANNELS
    if fuse_tiles(g, bytes_per_value, threads_for(g, n_threads, g.tiles), n_threads):
        return FUSED_TILES
    return NOT_FUSED


cdef inline void tile_channels(const Geometry* g, Py_ssize_t t, Py_ssize_t* col0,
                               Py_ssize_t* width, Py_ssize_t* ch0, Py_ssize_t* ch1) noexcept nogil:
    """Columns and (whole) channels of tile t when tiles hold whole channels."""
    col0[0] = t * g.tile
    width[0] = min(g.tile, g.period - col0[0])
    ch0[0] = col0[0] // g.s
    ch1[0] = ch0[0] + width[0] // g.s
