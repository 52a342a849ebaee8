# Forward normalisation: from statistics to coefficients (the per-channel epilogues), the
# elementwise pass that applies them, and the drivers of the eval and training forwards --
# unfused (statistics pass, epilogue, elementwise pass) or fused channel by channel (planar)
# or tile by tile (columns) while the data is in cache, with the same bits either way.

cdef real* coefficient_block(Py_ssize_t n, int rows, real** k) noexcept nogil:
    """One malloc'd block of rows * n values of the compute type, k[row] pointing at each row;
    NULL if out of memory (or n is 0).  Free the block."""
    cdef int r
    if n == 0:
        return NULL
    cdef real* block = <real*>malloc(rows * n * sizeof(real))
    if block != NULL:
        for r in range(rows):
            k[r] = block + r * n
    return block


cdef inline void expand(const Geometry* g, const real* per_channel, real* per_column) noexcept nogil:
    """per_column[j] = per_channel[channel of column j], for the `period` columns of a row."""
    cdef Py_ssize_t rep, ch, i, j = 0
    cdef real v
    for rep in range(g.group):
        for ch in range(g.c):
            v = per_channel[ch]
            for i in range(g.s):
                per_column[j] = v
                j += 1


cdef inline const real* channel_columns(const Geometry* g, const real* per_channel,
                                       real* work) noexcept nogil:
    """Values per column of a row of the columns layout: per_channel itself when a row's
    columns are the channels, else `work` (period entries) filled by expand()."""
    if g.group == 1 and g.s == 1:
        return per_channel
    expand(g, per_channel, work)
    return work


cdef real* per_column(const Geometry* g, real** k, int rows, real** columns) noexcept nogil:
    """Coefficient rows per column of a row of the columns layout, for passes that walk rows:
    columns[r] = k[r] itself when a row's columns are the channels, else an expansion into a
    malloc'd block (returned, to free; NULL when none was needed or out of memory -- then
    columns[0] is NULL)."""
    cdef int r
    cdef real* block = NULL
    if not needs_expansion(g):
        for r in range(rows):
            columns[r] = k[r]
        return NULL
    block = coefficient_block(g.period, rows, columns)
    if block != NULL:
        for r in range(rows):
            expand(g, k[r], columns[r])
    else:
        columns[0] = NULL
    return block


cdef inline void split_center(double mean_hi, double mean_lo, double scale, double shift,
                              real** k, Py_ssize_t ch) noexcept nogil:
    """Channel ch's coefficients of (x - mean) * scale + shift as the elementwise passes
    compute it, (x * FACTOR - CENTER) * SCALE + SHIFT.

    CENTER is the mean (mean_hi + mean_lo) rounded to the data's dtype and SHIFT folds the
    rest back in.  FACTOR is 1 -- the exact subtraction -- except in two corners of the
    dtype's range, where a power of two keeps every intermediate representable (all the
    scalings are exact):

    * x - center could overflow: that needs |center| within 2**-(mantissa bits + 2) of the
      largest value; factor = 1/2 halves x and center and doubles the scale;
    * the scale itself would overflow (var + eps below ~1/limit: denormal data with a tinier
      eps); factor = 2**64 scales x - center up and the scale down.
    """
    cdef double limit = FLT_MAX if real is float else DBL_MAX
    cdef double ulp = FLT_EPSILON if real is float else DBL_EPSILON
    cdef double big = 18446744073709551616.0  # 2**64
    cdef real c = <real>mean_hi
    cdef double rest = (mean_hi - <double>c) + mean_lo
    cdef bint huge_center = fabs(<double>c) >= limit * ulp * 0.25
    # (& rather than "and", which Cython compiles to a branch)
    cdef bint huge_scale = (not huge_center) & (fabs(scale) > limit * 0.25) & (fabs(scale) < limit * big * 0.25)
    cdef double p = 0.5 if huge_center else (big if huge_scale else 1.0)
    # (selects, not branches, so that loops over channels vectorise; a zero rest must not meet
    # an infinite scale, 0 * inf being NaN)
    k[SHIFT][ch] = <real>(shift - (rest * scale if rest != 0.0 else 0.0))
    k[CENTER][ch] = <real>(<double>c * p)
    k[SCALE][ch] = <real>(scale / p)
    k[FACTOR][ch] = <real>p


cdef inline bint unit_factors(const real* factor, Py_ssize_t c) noexcept nogil:
    """Whether every channel's FACTOR is 1 (split_center's corners are rare)."""
    cdef Py_ssize_t ch
    cdef bint unit = True
    for ch in range(c):
        unit = unit & (factor[ch] == 1)
    return unit


cdef inline void row_coefficients(real** k, int rows, Py_ssize_t ch0, Py_ssize_t n,
                                  real** row) noexcept nogil:
    """The first `rows` coefficient rows k (FACTOR among them) of a row pass over channels ch0
    to ch0 + n, FACTOR NULL where all of theirs are 1 (affine_row and grad_input_row then skip
    its stream: the same values)."""
    cdef int r
    for r in range(rows):
        row[r] = k[r]
    if unit_factors(k[FACTOR] + ch0, n):
        row[FACTOR] = NULL


cdef inline void affine_item(const activation* act, const Geometry* g, const storage* x,
                             storage* y, real** k, Py_ssize_t item, bint stream) noexcept nogil:
    """Work item `item` of the elementwise pass; `stream` (float32 only): its runs or rows are
    written with streaming stores (the same values; see affine_pass)."""
    cdef Py_ssize_t off, length, ch, slot
    if g.planar:
        off = planar_item(g, item, &length, &ch, &slot)
        if storage is float and stream:
            affine_stream(activation is ReLU, <const float*>x + off, <float*>y + off, length,
                          k[FACTOR][ch], k[CENTER][ch], k[SCALE][ch], k[SHIFT][ch])
        else:
            span_affine(act, x + off, y + off, length, k, ch, False)
    elif not by_rows(g):
        off = item * g.c * g.s
        for ch in range(g.c):
            span_affine(act, x + off + ch * g.s, y + off + ch * g.s, g.s, k, ch, False)
    elif storage is float and real is float and stream:
        stream_rows(activation is ReLU, g, <const float*>x, <float*>y, k, item)
    else:
        affine_rows(act, g, x, y, k, item)


cdef inline void stream_rows(bint relu, const Geometry* g, const float* x, float* y, float** k,
                             Py_ssize_t block) noexcept nogil:
    """Block `block` of ROW_BLOCK rows of the columns layout, each row written whole with
    streaming stores (an output too large for the caches: see affine_pass)."""
    cdef Py_ssize_t r, length, r0 = block * ROW_BLOCK
    for r in range(r0, min(r0 + ROW_BLOCK, n_rows(g))):
        length = row_length(g, r)
        if length > 0:
            affine_row_stream(relu, x + r * g.period, y + r * g.period, length, k[FACTOR],
                              k[CENTER], k[SCALE], k[SHIFT])


cdef inline void affine_rows(const activation* act, const Geometry* g, const storage* x,
                             storage* y, real** k, Py_ssize_t block) noexcept nogil:
    """Block `block` of ROW_BLOCK rows of the columns layout.  Where a row's per-column
    coefficients would not stay in L1 (3 x 8 KiB for C = 2048 in float32), the block goes a
    chunk of ROW_CHUNK columns at a time down its rows, so that the chunk's coefficients are
    loaded from L1 for every row after the first (eval (128, 2048) 51 -> 40 us); where they do,
    row by row, streaming (chunks of short pieces of rows are slower there: (4096, 1024))."""
    cdef Py_ssize_t r, col0 = 0, length, r0 = block * ROW_BLOCK
    cdef Py_ssize_t r1 = min(r0 + ROW_BLOCK, n_rows(g))
    cdef Py_ssize_t full = max(r0, min(r1, g.rows))  # (rows below it are whole)
    cdef Py_ssize_t chunk = g.period
    if 3 * g.period * <Py_ssize_t>sizeof(real) > ROW_COEFFICIENT_BYTES:
        chunk = ROW_CHUNK
    while col0 < g.period:
        rows_affine(act, x + r0 * g.period + col0, y + r0 * g.period + col0, g.period,
                    full - r0, min(g.period - col0, chunk), k, col0,
                    rows_by_four(g, sizeof(storage)))
        for r in range(full, r1):
            length = row_length(g, r) - col0
            if length > 0:
                span_affine(act, x + r * g.period + col0, y + r * g.period + col0,
                            min(length, chunk), k, col0, True)
        col0 += chunk


cdef int affine_pass(const activation* act, const Geometry* g, const storage* x, storage* y,
                     real** k, int n_threads) noexcept nogil:
    """y = activation((x * FACTOR - CENTER) * SCALE + SHIFT) with per-channel coefficients k;
    -1 if out of memory."""
    if g.total == 0:
        return 0
    cdef Py_ssize_t item, items = elementwise_items(g)
    if by_rows(g):
        items = ceil_div(items, ROW_BLOCK)  # (blocks of rows: see affine_rows)
    cdef int nt = threads_for(g, n_threads, items)
    cdef real* columns[N_COEFFICIENTS]
    cdef real* work = per_column(g, k, FACTOR + 1, columns)
    if columns[0] == NULL:
        return -1
    if by_rows(g) and unit_factors(k[FACTOR], g.c):
        columns[FACTOR] = NULL  # (see affine_row)
    # An output too large to stay in cache is written past it (_tuning.stream_min_bytes), where
    # it is walked in runs (the planar layout's) or in whole rows (the columns layout's, one
    # at a time, whose runs of single columns have none to stream; see affine_item).
    cdef bint stream = (storage is float and STREAM_AFFINE and (g.planar or by_rows(g))
                        and g.total * <Py_ssize_t>sizeof(float) >= stream_min_bytes())
    cdef int t
    if stream:
        note_streamed_pass()
        # Each thread takes one contiguous share of the items, as schedule="static" deals
        # them, and fences once after it (see fastbn_affine_stream).  The loops below pass a
        # constant False, so the compiler drops affine_item's streaming branch: one loop for
        # both, with the flag read per item, made (1, 512, 7, 7) eval 1.06x slower.
        for t in prange(nt, num_threads=nt, schedule="static"):
            for item in range(t * items // nt, (t + 1) * items // nt):
                affine_item(act, g, x, y, columns, item, True)
            stream_fence()
    elif nt == 1:
        for item in range(items):
            affine_item(act, g, x, y, columns, item, False)
    else:
        for item in prange(items, num_threads=nt, schedule="static"):
            affine_item(act, g, x, y, columns, item, False)
    free(work)
    return 0


cdef void given_coefficients(const Call* call, real** p, real** k) noexcept nogil:
    """The coefficients k of y = (x - mean) * invstd * weight + bias with the call's statistics
    (the mean given as mean + mean_lo, mean_lo possibly NULL)."""
    cdef Py_ssize_t ch
    cdef const Stats* st = &call.stats
    for ch in range(call.g.c):
        split_center(st.mean[ch], st.mean_lo[ch] if st.mean_lo != NULL else 0.0,
                     <double>p[WEIGHT][ch] * st.invstd[ch], <double>p[BIAS][ch], k, ch)


cdef int normalize(const activation* act, const Call* call, const storage* x, storage* y,
                   real** p) noexcept nogil:
    """y = (x - mean) * invstd * weight + bias with the call's statistics (the mean given as
    mean + mean_lo, mean_lo possibly NULL); -1 if out of memory."""
    cdef int rc
    cdef real* k[N_COEFFICIENTS]
    if call.g.total == 0:
        return 0  # (and no malloc(0), which may return NULL)
    cdef real* block = coefficient_block(call.g.c, FACTOR + 1, k)
    if block == NULL:
        return -1
    given_coefficients(call, p, k)
    rc = affine_pass(act, &call.g, x, y, k, call.n_threads)
    free(block)
    return rc


cdef inline void train_channel(const Call* call, real** p, real** k, Py_ssize_t ch) noexcept nogil:
    """Channel ch's epilogue of a training forward: invstd, the running buffers, and the
    coefficients of its normalisation."""
    cdef const Stats* st = &call.stats
    cdef double momentum = call.step.momentum, count = call.step.count
    cdef double invstd = 1.0 / sqrt(st.m2[ch] / count + call.step.eps)
    cdef double scale = invstd * <double>p[WEIGHT][ch]
    st.invstd[ch] = invstd
    p[RUNNING_MEAN][ch] = <real>(momentum * st.mean[ch] + (1.0 - momentum) * p[RUNNING_MEAN][ch])
    # running_var tracks the unbiased variance; normalisation uses the biased one.
    p[RUNNING_VAR][ch] = <real>(momentum * (st.m2[ch] / (count - 1.0))
                                + (1.0 - momentum) * p[RUNNING_VAR][ch])
    split_center(st.mean[ch], st.mean_lo[ch], scale, <double>p[BIAS][ch], k, ch)


cdef inline void train_planar_channel(const activation* act, const Call* call,
                                      MomentParts* parts, const storage* x, storage* y,
                                      real** p, real** k, Py_ssize_t ch) noexcept nogil:
    """The whole training forward of one planar channel: the same segments, merge and
    epilogue as the unfused passes (so the same bits), then its normalisation at once."""
    cdef const Geometry* g = &call.g
    cdef Py_ssize_t q, off, length, chan, slot
    for q in range(g.n * g.segs):
        off = planar_item(g, channel_segment(g, ch, q), &length, &chan, &slot)
        segment_moments(x + off, length, parts.shift + slot, parts.offset + slot, parts.m2 + slot)
    merge_planar_moments(g, parts, ch, &call.stats)
    train_channel(call, p, k, ch)
    for q in range(g.n * g.segs):
        off = planar_item(g, channel_segment(g, ch, q), &length, &chan, &slot)
        span_affine(act, x + off, y + off, length, k, ch, False)


cdef inline int train_columns_tile(const activation* act, const Call* call,
                                   MomentParts* parts, const storage* x, storage* y,
                                   real** p, real** k, Py_ssize_t t) noexcept nogil:
    """The whole training forward of the channels of one column tile, over all rows: the same
    items, merge and epilogue as the unfused passes (so the same bits), then their
    normalisation while the tile is in cache.  -1 if out of memory."""
    cdef const Geometry* g = &call.g
    cdef Py_ssize_t b, r, ch, off, col0, width, ch0, ch1
    cdef real* row[N_COEFFICIENTS]
    tile_channels(g, t, &col0, &width, &ch0, &ch1)
    for b in range(g.full_blocks):
        moments_item(g, x, b * g.tiles + t, parts)
    if merge_columns_moments(g, parts, &call.stats, ch0, ch1) != 0:
        return -1
    for ch in range(ch0, ch1):
        train_channel(call, p, k, ch)
    row_coefficients(k, FACTOR + 1, ch0, ch1 - ch0, row)  # (unit factors skipped, as in affine_pass)
    if g.s == 1:
        rows_affine(act, x + col0, y + col0, g.period, g.rows, width, row, ch0,
                    rows_by_four(g, sizeof(storage)))
    else:
        for r in range(g.rows):
            off = r * g.period
            for ch in range(ch0, ch1):
                span_affine(act, x + off + ch * g.s, y + off + ch * g.s, g.s, k, ch, False)
    return 0


cdef int train_forward(const activation* act, Call* call, const storage* x, storage* y,
                       real** p) noexcept nogil:
    """The training forward of x into y: batch statistics into call.stats (mean, invstd),
    running buffers updated, y normalised (then the activation)."""
    cdef const Geometry* g = &call.g
    cdef Py_ssize_t ch, t, c = g.c
    cdef int rc = 0
    cdef int nt = threads_for(g, call.n_threads, c)
    cdef int nt_tiles = threads_for(g, call.n_threads, g.tiles)
    cdef real* k[N_COEFFICIENTS]
    cdef MomentParts parts
    cdef double* work = <double*>malloc(2 * c * sizeof(double))
    cdef real* block = coefficient_block(c, FACTOR + 1, k)
    if work == NULL or block == NULL or alloc_moment_parts(g, &parts) != 0:
        free(work)
        free(block)
        free_moment_parts(&parts)
        return -1
    call.stats.m2 = work
    call.stats.mean_lo = work + c
    cdef int fused = fused_pass(g, sizeof(storage), call.n_threads)
    if fused == FUSED_CHANNELS:
        if nt == 1:
            for ch in range(c):
                train_planar_channel(act, call, &parts, x, y, p, k, ch)
        else:
            for ch in prange(c, num_threads=nt, schedule="static"):
                train_planar_channel(act, call, &parts, x, y, p, k, ch)
    elif fused == FUSED_TILES:
        if nt_tiles == 1:
            for t in range(g.tiles):
                if train_columns_tile(act, call, &parts, x, y, p, k, t) != 0:
                    rc = -1
        else:
            for t in prange(g.tiles, num_threads=nt_tiles, schedule="static"):
                if train_columns_tile(act, call, &parts, x, y, p, k, t) != 0:
                    rc = -1
    else:
        rc = moments_pass(g, x, &call.stats, call.n_threads)
        if rc == 0:
            for ch in range(c):
                train_channel(call, p, k, ch)
            rc = affine_pass(act, g, x, y, k, call.n_threads)
    free(work)
    free(block)
    free_moment_parts(&parts)
    call.stats.m2 = call.stats.mean_lo = NULL
    return rc


cdef int train_forward_given(const activation* act, Call* call, const storage* x, storage* y,
                             real** p) noexcept nogil:
    """The training forward with batch statistics given in call.stats (mean + mean_lo, m2
    over call.step.count values: a distributed batch's), the same epilogue and elementwise
    pass as train_forward's unfused path: invstd, running buffers (also when x is empty), y."""
    cdef Py_ssize_t ch
    cdef int rc
    cdef real* k[N_COEFFICIENTS]
    cdef real* block = coefficient_block(call.g.c, FACTOR + 1, k)
    if block == NULL and call.g.c > 0:
        return -1
    for ch in range(call.g.c):
        train_channel(call, p, k, ch)
    rc = affine_pass(act, &call.g, x, y, k, call.n_threads)
    free(block)
    return rc


cdef void running_statistics(Call* call, real** p) noexcept nogil:
    """The running statistics into call.stats: mean, and invstd = 1 / sqrt(running_var + eps)."""
    cdef Py_ssize_t ch
    cdef const real* running_mean = p[RUNNING_MEAN]
    cdef const real* running_var = p[RUNNING_VAR]
    for ch in range(call.g.c):
        call.stats.mean[ch] = running_mean[ch]
        call.stats.invstd[ch] = 1.0 / sqrt(<double>running_var[ch] + call.step.eps)


cdef int eval_forward(const activation* act, Call* call, const storage* x, storage* y,
                      real** p) noexcept nogil:
    """The eval forward: the running statistics into call.stats (mean, invstd), y normalised
    with them (then the activation)."""
    running_statistics(call, p)
    return normalize(act, call, x, y, p)


cdef int table_job(bint apply, const activation* act, Call* call, const storage* x,
                   storage* y, real** p) noexcept nogil:
    """The eval forward in two halves around a table of its coefficients (call.table: rows
    CENTER, SCALE, SHIFT, FACTOR of C values each), by the code of eval_forward, so with its
    bits: computing the table (and the statistics, as eval_forward gives them), or applying a
    table made earlier -- a module's, while its parameters and buffers are unchanged."""
    cdef real* k[N_COEFFICIENTS]
    cdef int r
    for r in range(FACTOR + 1):
        k[r] = <real*>call.table + r * call.g.c
    if not apply:
        running_statistics(call, p)
        given_coefficients(call, p, k)  # (normalize's, as eval_forward runs them)
        return 0
    return affine_pass(act, &call.g, x, y, k, call.n_threads)
