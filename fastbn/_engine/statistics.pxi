# Per-channel statistics: the moments of each work item into its partial slot, and the merge
# of a channel's partials in a fixed order (Chan's update), whichever thread computed them.

cdef struct Stats:
    # Per-channel float64 arrays of a call (NULL where a job does not use them)
    double* mean       # the batch mean rounded to float64, or the running mean
    double* mean_lo    # mean + mean_lo is the batch mean unrounded (TwoSum)
    double* m2         # sum of squared deviations from the mean
    double* invstd     # 1 / sqrt(var + eps)
    double* sum_dy     # backward: sum(g), g the gradient reaching the normalisation
    double* sum_dy_xc  # backward: sum(g * (x - mean))


cdef struct MomentParts:
    # The moments of every work item, one slot each (see planar_item, columns_item), and the
    # coefficients of their merge (merge_plan)
    double* shift
    double* offset
    double* m2
    double* plan


cdef struct SumParts:
    # The two gradient sums of every work item, one slot each, and the center of the second
    # (the mean; per channel in the planar layout, per column in the columns layout)
    double* a
    double* b
    const double* center


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


cdef int alloc_moment_parts(const Geometry* g, MomentParts* p) noexcept nogil:
    """The partials and plan of a moments reduction over g (free_moment_parts); -1 if out of memory."""
    p.shift = <double*>malloc(3 * g.partial_len * sizeof(double))
    p.plan = merge_plan(g)
    if p.shift == NULL or p.plan == NULL:
        free_moment_parts(p)
        return -1
    p.offset = p.shift + g.partial_len
    p.m2 = p.shift + 2 * g.partial_len
    return 0


cdef void free_moment_parts(MomentParts* p) noexcept nogil:
    free(p.shift)
    free(p.plan)
    p.shift = p.plan = NULL


cdef void merge_planar_moments(const Geometry* g, const MomentParts* p, Py_ssize_t ch,
                               const Stats* st) noexcept nogil:
    """Channel ch's mean and M2 from its plane segments' moments, by Chan's update in a fixed
    order (the same whichever thread runs it, and whether or not the channel was fused).

    Segment means are merged as offsets from one reference value, the channel's first shift
    (a data value), so that their rounding relative to the data's magnitude never enters; the
    mean is returned unrounded, as mean + mean_lo.
    """
    cdef Py_ssize_t q, i
    cdef double ref = p.shift[ch], mu = p.offset[ch], m2_acc = p.m2[ch], delta, rel
    for q in range(1, g.n * g.segs):
        i = q * g.c + ch
        rel = (p.shift[i] - ref) + p.offset[i]
        delta = difference(rel, mu)
        mu = merged_mean(mu, rel, p.plan[2 * q])
        m2_acc = m2_acc + (p.m2[i] + delta * delta * p.plan[2 * q + 1])
    two_sum(ref, mu, st.mean + ch, st.mean_lo + ch)
    st.m2[ch] = m2_acc


cdef inline void block_channel_moments(const Geometry* g, const MomentParts* p, Py_ssize_t b,
                                       Py_ssize_t ch, double ref, double* mean,
                                       double* m2) noexcept nogil:
    """Channel ch's moments over block b, from its columns' (all of them the same count):
    M2 = sum(M2_j) + rows * sum((mean_j - mean)**2), the means averaged relative to the first
    column so that equal means (a constant channel) merge exactly."""
    cdef Py_ssize_t grp, j, o, cs = g.c * g.s, base = b * g.period + ch * g.s
    cdef double inv_k = p.plan[2 * n_parts(g) + b]
    cdef double first = (p.shift[base] - ref) + p.offset[base], gm = 0.0, plain = 0.0
    cdef double sq = 0.0, own = 0.0, dev, rel
    for grp in range(block_groups(g, b)):
        o = base + grp * cs
        for j in range(g.s):
            rel = (p.shift[o + j] - ref) + p.offset[o + j]
            gm += difference(rel, first)
            plain += rel
    # (the plain mean where infinities make the relative one meaningless; see merged_mean)
    gm = first + gm * inv_k if finite(first) & finite(gm) else plain * inv_k
    for grp in range(block_groups(g, b)):
        o = base + grp * cs
        for j in range(g.s):
            dev = difference((p.shift[o + j] - ref) + p.offset[o + j], gm)
            sq += dev * dev
            own += p.m2[o + j]
    mean[0] = gm
    m2[0] = own + block_rows(g, b) * sq


cdef int merge_columns_moments(const Geometry* g, const MomentParts* p, const Stats* st,
                               Py_ssize_t ch0, Py_ssize_t ch1) noexcept nogil:
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
    cdef double* m2 = st.m2
    cdef double inv_k, rows, r, w, delta, dev, rel
    for ch in range(ch0, ch1):
        ref[ch - ch0] = p.shift[ch * g.s]
    for b in range(g.full_blocks + (g.tail > 0)):
        base = b * g.period
        inv_k = p.plan[2 * n_parts(g) + b]
        rows = <double>block_rows(g, b)
        if g.s > 1:
            for ch in range(ch0, ch1):
                i = ch - ch0
                block_channel_moments(g, p, b, ch, ref[i], gm + i, bq + i)
        else:
            # the same arithmetic as block_channel_moments, channels innermost
            for ch in range(ch0, ch1):
                first[ch - ch0] = (p.shift[base + ch] - ref[ch - ch0]) + p.offset[base + ch]
                gm[ch - ch0] = 0.0
                sq[ch - ch0] = 0.0   # (first the plain sum, for infinities; see merged_mean)
            for grp in range(block_groups(g, b)):
                o = base + grp * g.c
                for ch in range(ch0, ch1):
                    rel = (p.shift[o + ch] - ref[ch - ch0]) + p.offset[o + ch]
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
                    dev = difference((p.shift[o + ch] - ref[ch - ch0]) + p.offset[o + ch], gm[ch - ch0])
                    sq[ch - ch0] += dev * dev
                    bq[ch - ch0] += p.m2[o + ch]
            for i in range(c):
                bq[i] = bq[i] + rows * sq[i]
        if b == 0:
            for i in range(c):
                mu[i] = gm[i]
                m2[ch0 + i] = bq[i]
        else:
            r = p.plan[2 * b]
            w = p.plan[2 * b + 1]
            for i in range(c):
                delta = difference(gm[i], mu[i])
                mu[i] = merged_mean(mu[i], gm[i], r)
                m2[ch0 + i] = m2[ch0 + i] + (bq[i] + delta * delta * w)
    for i in range(c):
        two_sum(ref[i], mu[i], st.mean + ch0 + i, st.mean_lo + ch0 + i)
    free(work)
    return 0


cdef void merge_sums(const Geometry* g, const SumParts* p, const Stats* st, Py_ssize_t ch0,
                     Py_ssize_t ch1) noexcept nogil:
    """Channels ch0 to ch1's two gradient sums from their parts' sums, added part by part in a
    fixed order (a channel's sum does not depend on the range it is merged in)."""
    cdef Py_ssize_t q, b, grp, j, ch, o, c = g.c, s = g.s
    cdef double* sum_a = st.sum_dy
    cdef double* sum_b = st.sum_dy_xc
    cdef const double* pa = p.a
    cdef const double* pb = p.b
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


cdef inline void moments_item(const Geometry* g, const storage* x, Py_ssize_t k,
                              MomentParts* p) noexcept nogil:
    """The moments of work item k into its slot."""
    cdef Py_ssize_t off, length, ch, slot
    cdef Tile t
    if g.planar:
        off = planar_item(g, k, &length, &ch, &slot)
        segment_moments(x + off, length, p.shift + slot, p.offset + slot, p.m2 + slot)
    else:
        slot = columns_item(g, k, &t)
        tile_moments(&t, x + t.offset, p.shift + slot, p.offset + slot, p.m2 + slot)


cdef int moments_pass(const Geometry* g, const storage* x, Stats* st, int n_threads) noexcept nogil:
    """Per-channel mean (st.mean + st.mean_lo; mean_lo may be NULL) and M2 of x; -1 if out of
    memory."""
    if g.total == 0:
        return 0
    cdef Py_ssize_t k, ch
    cdef int rc = 0
    cdef int nt = threads_for(g, n_threads, g.items)
    cdef MomentParts p
    cdef Stats s = st[0]
    if s.mean_lo == NULL:
        s.mean_lo = <double*>malloc(g.c * sizeof(double))
    if alloc_moment_parts(g, &p) != 0 or s.mean_lo == NULL:
        free_moment_parts(&p)
        if st.mean_lo == NULL:
            free(s.mean_lo)
        return -1
    if nt == 1:
        for k in range(g.items):
            moments_item(g, x, k, &p)
    else:
        for k in prange(g.items, num_threads=nt, schedule="static"):
            moments_item(g, x, k, &p)
    if not g.planar:
        rc = merge_columns_moments(g, &p, &s, 0, g.c)
    elif nt == 1 or g.c < 2 * nt:
        for ch in range(g.c):
            merge_planar_moments(g, &p, ch, &s)
    else:
        for ch in prange(g.c, num_threads=nt, schedule="static"):
            merge_planar_moments(g, &p, ch, &s)
    free_moment_parts(&p)
    if st.mean_lo == NULL:
        free(s.mean_lo)
    return rc
