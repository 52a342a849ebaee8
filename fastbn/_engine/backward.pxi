# Backward: the gradient sums (sum(g), sum(g * (x - mean)) per channel), the per-channel
# epilogue that turns them into parameter gradients and the coefficients of grad_input, the
# elementwise pass that applies those, and the drivers of the training and eval backwards --
# unfused or fused by channel (planar) or tile (columns), with the same bits either way.
# g is the gradient reaching the normalisation: grad_output, gated by the activation.

cdef inline void grad_sums_item(const activation* act, const Call* call, SumParts* parts,
                                const storage* dy, const storage* out, const storage* x,
                                const real* scale, storage* dx, Py_ssize_t item) noexcept nogil:
    """Partial sums of work item `item` into its slot.  The centers (parts.center) and `scale`
    are per channel (planar) or per column (columns); dx, when not NULL, receives scale * g."""
    cdef const Geometry* g = &call.g
    cdef Py_ssize_t off, length, ch, slot
    cdef Tile t
    if g.planar:
        off = planar_item(g, item, &length, &ch, &slot)
        segment_grad_sums(act, dy + off, at(out, off), x + off, length, parts.center[ch],
                          scale[ch] if dx != NULL else <real>0, at(dx, off), parts.a + slot,
                          parts.b + slot)
    else:
        slot = columns_item(g, item, &t)
        tile_grad_sums(act, &t, dy + t.offset, at(out, t.offset), x + t.offset,
                       parts.center + t.col0, <const real*>NULL if dx == NULL else scale + t.col0,
                       at(dx, t.offset), parts.a + slot, parts.b + slot)


cdef int grad_sums_pass(const activation* act, const Call* call, const storage* dy,
                        const storage* out, const storage* x, const real* scale,
                        storage* dx) noexcept nogil:
    """Per-channel sum(g) and sum(g * (x - mean)) into call.stats (sum_dy, sum_dy_xc), g
    being dy gated by the activation of the output `out`; with dx, also dx = scale * g (scale
    per channel) in the same pass.  -1 if out of memory."""
    cdef const Geometry* g = &call.g
    if g.total == 0:
        return 0
    cdef Py_ssize_t item
    cdef int nt = threads_for(g, call.n_threads, g.items)
    cdef SumParts parts
    cdef double* sums = <double*>malloc(2 * g.partial_len * sizeof(double))
    cdef double* col_center = NULL
    cdef real* col_scale = NULL
    if sums == NULL:
        return -1
    parts.a = sums
    parts.b = sums + g.partial_len
    parts.center = call.stats.mean
    if not g.planar:
        # Tiles cut across channels: they take their coefficients per column.
        col_center = <double*>malloc(g.period * sizeof(double))
        col_scale = <real*>malloc(g.period * sizeof(real))
        if col_center == NULL or col_scale == NULL:
            free(sums); free(col_center); free(col_scale)
            return -1
        parts.center = channel_columns(g, call.stats.mean, col_center)
        if dx != NULL:
            scale = channel_columns(g, scale, col_scale)
    if nt == 1:
        for item in range(g.items):
            grad_sums_item(act, call, &parts, dy, out, x, scale, dx, item)
    else:
        for item in prange(g.items, num_threads=nt, schedule="static"):
            grad_sums_item(act, call, &parts, dy, out, x, scale, dx, item)
    merge_sums(g, &parts, &call.stats, 0, g.c)
    free(sums)
    free(col_center)
    free(col_scale)
    return 0


cdef inline void grad_input_item(const activation* act, const Call* call, const storage* dy,
                                 const storage* out, const storage* x, storage* dx, real** k,
                                 Py_ssize_t item) noexcept nogil:
    cdef const Geometry* g = &call.g
    cdef Py_ssize_t off, length, ch, slot, o, r, r0, r1, full
    if g.planar:
        off = planar_item(g, item, &length, &ch, &slot)
        span_grad_input(act, dy + off, at(out, off), x + off, dx + off, length, k, ch, False)
    elif not by_rows(g):
        off = item * g.c * g.s
        for ch in range(g.c):
            o = off + ch * g.s
            span_grad_input(act, dy + o, at(out, o), x + o, dx + o, g.s, k, ch, False)
    else:
        # block `item` of GRAD_ROW_BLOCK rows: the whole ones, then a short last row
        r0 = item * GRAD_ROW_BLOCK
        r1 = min(r0 + GRAD_ROW_BLOCK, n_rows(g))
        full = max(r0, min(r1, g.rows))
        off = r0 * g.period
        rows_grad_input(act, dy + off, at(out, off), x + off, dx + off, g.period, full - r0,
                        g.period, k, 0, rows_by_four(g, sizeof(storage)))
        for r in range(full, r1):
            off = r * g.period
            span_grad_input(act, dy + off, at(out, off), x + off, dx + off, row_length(g, r),
                            k, 0, True)


cdef int grad_input_pass(const activation* act, const Call* call, const storage* dy,
                         const storage* out, const storage* x, storage* dx,
                         real** k) noexcept nogil:
    """dx = GAIN * (g + (x * FACTOR - CENTER) * SCALE + SHIFT) with per-channel coefficients
    k, g being dy gated by the activation of the output `out`; -1 if out of memory."""
    cdef const Geometry* g = &call.g
    if g.total == 0:
        return 0
    cdef Py_ssize_t item, items = elementwise_items(g)
    if by_rows(g):
        items = ceil_div(items, GRAD_ROW_BLOCK)  # (blocks of rows: see grad_input_item)
    cdef int nt = threads_for(g, call.n_threads, items)
    cdef real* columns[N_COEFFICIENTS]
    cdef real* work = per_column(g, k, N_COEFFICIENTS, columns)
    if columns[0] == NULL:
        return -1
    if by_rows(g) and unit_factors(k[FACTOR], g.c):
        columns[FACTOR] = NULL  # (see grad_input_row)
    if nt == 1:
        for item in range(items):
            grad_input_item(act, call, dy, out, x, dx, columns, item)
    else:
        for item in prange(items, num_threads=nt, schedule="static"):
            grad_input_item(act, call, dy, out, x, dx, columns, item)
    free(work)
    return 0


cdef inline void backward_channel(const Call* call, real** p, real** k, Py_ssize_t ch) noexcept nogil:
    """Channel ch's epilogue of a training backward: the parameter gradients and the
    coefficients of dx = GAIN * (g + (x * FACTOR - CENTER) * SCALE + SHIFT).

    dx = w * invstd * (g - mean(g) - (x - mean) * invstd**2 * mean(g * (x - mean))); the
    gain w * invstd is applied last so that SCALE ~ invstd * |g| rather than invstd**3 * |g|
    stays representable when the data is huge (x ~ 1e38 in float32).
    """
    cdef const Stats* st = &call.stats
    cdef double count = call.step.count
    cdef double b = -st.invstd[ch] * st.invstd[ch] * st.sum_dy_xc[ch] / count
    p[GRAD_BIAS][ch] = <real>st.sum_dy[ch]
    p[GRAD_WEIGHT][ch] = <real>(st.sum_dy_xc[ch] * st.invstd[ch])
    k[GAIN][ch] = <real>(<double>p[WEIGHT][ch] * st.invstd[ch])
    split_center(st.mean[ch], 0.0, b, -st.sum_dy[ch] / count, k, ch)


cdef int grad_input_from_sums(const activation* act, const Call* call, const storage* dy,
                              const storage* out, const storage* x, storage* dx,
                              real** p) noexcept nogil:
    """Training-mode backward given the per-channel sums of g and g * (x - mean) over all
    call.step.count values of each channel (on one process, or gathered from several)."""
    cdef Py_ssize_t ch
    cdef int rc
    cdef real* k[N_COEFFICIENTS]
    cdef real* block = coefficient_block(call.g.c, N_COEFFICIENTS, k)
    if block == NULL:
        return -1
    for ch in range(call.g.c):
        backward_channel(call, p, k, ch)
    rc = grad_input_pass(act, call, dy, out, x, dx, k)
    free(block)
    return rc


cdef inline void backward_planar_channel(const activation* act, const Call* call,
                                         SumParts* parts, const storage* dy, const storage* out,
                                         const storage* x, storage* dx, real** p, real** k,
                                         Py_ssize_t ch) noexcept nogil:
    """The whole training backward of one planar channel: the same segment sums, added in the
    same order, and the same epilogue as the unfused passes, then its dx at once."""
    cdef const Geometry* g = &call.g
    cdef Py_ssize_t q, off, length, chan, slot
    cdef double ta = 0.0, tb = 0.0
    for q in range(g.n * g.segs):
        off = planar_item(g, channel_segment(g, ch, q), &length, &chan, &slot)
        segment_grad_sums(act, dy + off, at(out, off), x + off, length, call.stats.mean[ch],
                          <real>0, <storage*>NULL, parts.a + slot, parts.b + slot)
        ta += parts.a[slot]
        tb += parts.b[slot]
    call.stats.sum_dy[ch] = ta
    call.stats.sum_dy_xc[ch] = tb
    backward_channel(call, p, k, ch)
    for q in range(g.n * g.segs):
        off = planar_item(g, channel_segment(g, ch, q), &length, &chan, &slot)
        span_grad_input(act, dy + off, at(out, off), x + off, dx + off, length, k, ch, False)


cdef inline void backward_columns_tile(const activation* act, const Call* call,
                                       SumParts* parts, const storage* dy, const storage* out,
                                       const storage* x, storage* dx, real** p, real** k,
                                       Py_ssize_t t) noexcept nogil:
    """The whole training backward of the channels of one column tile, over all rows: the same
    items, sums and epilogue as the unfused passes, then their dx while the tile is in cache."""
    cdef const Geometry* g = &call.g
    cdef Py_ssize_t b, r, ch, off, o, col0, width, ch0, ch1
    cdef real* row[N_COEFFICIENTS]
    tile_channels(g, t, &col0, &width, &ch0, &ch1)
    for b in range(g.full_blocks):
        grad_sums_item(act, call, parts, dy, out, x, <real*>NULL, <storage*>NULL, b * g.tiles + t)
    merge_sums(g, parts, &call.stats, ch0, ch1)
    for ch in range(ch0, ch1):
        backward_channel(call, p, k, ch)
    row_coefficients(k, N_COEFFICIENTS, ch0, ch1 - ch0, row)  # (unit factors skipped, as in grad_input_pass)
    if g.s == 1:
        rows_grad_input(act, dy + col0, at(out, col0), x + col0, dx + col0, g.period, g.rows,
                        width, row, ch0, rows_by_four(g, sizeof(storage)))
    else:
        for r in range(g.rows):
            off = r * g.period
            for ch in range(ch0, ch1):
                o = off + ch * g.s
                span_grad_input(act, dy + o, at(out, o), x + o, dx + o, g.s, k, ch, False)


cdef int train_backward(const activation* act, Call* call, const storage* dy,
                        const storage* out, const storage* x, storage* dx,
                        real** p) noexcept nogil:
    """Backward of training-mode normalisation (the batch statistics depend on x)."""
    cdef const Geometry* g = &call.g
    cdef Py_ssize_t ch, t, c = g.c
    cdef int rc = 0
    cdef int nt = threads_for(g, call.n_threads, c)
    cdef int nt_tiles = threads_for(g, call.n_threads, g.tiles)
    cdef int fused = fused_pass(g, sizeof(storage), call.n_threads)
    cdef bint channels = fused == FUSED_CHANNELS
    cdef bint tiles = fused == FUSED_TILES
    cdef real* k[N_COEFFICIENTS]
    cdef real* block = NULL
    cdef double* center_work = NULL
    cdef SumParts parts
    # the per-channel sums, then (fused passes) the partial sums of every item
    cdef double* sums = <double*>malloc((2 * c + (2 * g.partial_len if channels or tiles else 0))
                                        * sizeof(double))
    if sums == NULL:
        return -1
    call.stats.sum_dy = sums
    call.stats.sum_dy_xc = sums + c
    if not channels and not tiles:
        rc = grad_sums_pass(act, call, dy, out, x, <real*>NULL, <storage*>NULL)
        if rc == 0:
            rc = grad_input_from_sums(act, call, dy, out, x, dx, p)
    else:
        parts.a = sums + 2 * c
        parts.b = sums + 2 * c + g.partial_len
        parts.center = call.stats.mean
        block = coefficient_block(c, N_COEFFICIENTS, k)
        if tiles:
            # the tiles' sums take the mean per column, as the unfused pass's do
            center_work = <double*>malloc(g.period * sizeof(double))
            if center_work != NULL:
                parts.center = channel_columns(g, call.stats.mean, center_work)
        if block == NULL or (tiles and center_work == NULL):
            rc = -1
        elif tiles and nt_tiles == 1:
            for t in range(g.tiles):
                backward_columns_tile(act, call, &parts, dy, out, x, dx, p, k, t)
        elif tiles:
            for t in prange(g.tiles, num_threads=nt_tiles, schedule="static"):
                backward_columns_tile(act, call, &parts, dy, out, x, dx, p, k, t)
        elif nt == 1:
            for ch in range(c):
                backward_planar_channel(act, call, &parts, dy, out, x, dx, p, k, ch)
        else:
            for ch in prange(c, num_threads=nt, schedule="static"):
                backward_planar_channel(act, call, &parts, dy, out, x, dx, p, k, ch)
    free(center_work)
    free(block)
    free(sums)
    call.stats.sum_dy = call.stats.sum_dy_xc = NULL
    return rc


cdef int eval_backward(const activation* act, Call* call, const storage* dy,
                       const storage* out, const storage* x, storage* dx,
                       real** p) noexcept nogil:
    """Backward of eval-mode normalisation (fixed statistics): dx = weight * invstd * g, in the
    same pass as the sums for the parameter gradients when those are wanted."""
    cdef Py_ssize_t ch, c = call.g.c
    cdef int rc
    cdef real* k[N_COEFFICIENTS]
    cdef double* sums = <double*>malloc(2 * c * sizeof(double))
    cdef real* block = coefficient_block(c, N_COEFFICIENTS, k)
    if sums == NULL or block == NULL:
        free(sums)
        free(block)
        return -1
    # dx = (dy * FACTOR 1 - CENTER 0) * SCALE + SHIFT 0, SCALE = weight * invstd; GAIN holds
    # the same scale for the sums pass, which applies it to the gated gradient.
    for ch in range(c):
        k[GAIN][ch] = <real>(<double>p[WEIGHT][ch] * call.stats.invstd[ch])
        k[CENTER][ch] = 0
        k[SCALE][ch] = k[GAIN][ch]
        k[SHIFT][ch] = 0
        k[FACTOR][ch] = 1
    if not call.param_grads and activation is Identity:
        # the normalisation pass applied to dy
        rc = affine_pass(act, &call.g, dy, dx, k, call.n_threads)
    else:
        # (with an activation, dy must be gated: the sums pass does that, and its sums are
        # the parameter gradients when those are wanted)
        call.stats.sum_dy = sums
        call.stats.sum_dy_xc = sums + c
        rc = grad_sums_pass(act, call, dy, out, x, k[GAIN], dx)
        if rc == 0:
            for ch in range(c):
                p[GRAD_BIAS][ch] = <real>sums[ch]
                p[GRAD_WEIGHT][ch] = <real>(sums[c + ch] * call.stats.invstd[ch])
        call.stats.sum_dy = call.stats.sum_dy_xc = NULL
    free(sums)
    free(block)
    return rc
