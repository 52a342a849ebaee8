# The one dispatcher: a job, the storage type of the call's data and its activation select the
# specialisation that runs.  Adding a storage type is a branch in `dispatch` (with its member of
# the fused type in storage.pxi and its conversion there); adding an activation, a line in each
# branch (with its member of the fused type in loops.pxi).

cdef enum Job:
    MOMENTS             # per-channel mean and M2 (Stats.mean, .m2)
    NORMALIZE           # y from x with given statistics (Stats.mean, .invstd)
    FORWARD_TRAIN       # y, batch statistics, running buffers
    FORWARD_TRAIN_GIVEN # y and running buffers from given batch statistics (distributed)
    FORWARD_EVAL        # y with the running statistics
    EVAL_TABLE          # FORWARD_EVAL's coefficients into Call.table (and its statistics)
    APPLY_TABLE         # y from the coefficients in Call.table
    # the backward jobs, from here on (only they read the parameter gradients' rows)
    GRAD_SUMS           # per-channel gradient sums around Stats.mean
    BACKWARD_TRAIN      # dx and the parameter gradients, batch statistics
    BACKWARD_EVAL       # dx and the parameter gradients, fixed statistics
    BACKWARD_FROM_SUMS  # dx from gradient sums over Step.count values (distributed)


cdef enum Storage:
    FLOAT32
    FLOAT64
    FLOAT16
    BFLOAT16


cdef int run(Job job, Call* call, const activation* act, const storage* stored,
             const real* computed) noexcept nogil:
    """`job` on the call's data stored as `storage`, computed in `real`, with the activation
    (the last three are type tags: NULL pointers whose types select the specialisation)."""
    cdef const storage* x = <const storage*>call.x
    cdef storage* y = <storage*>call.y
    cdef const storage* dy = <const storage*>call.dy
    cdef const storage* out = <const storage*>call.out
    cdef storage* dx = <storage*>call.dx
    cdef Py_ssize_t i, c = call.g.c
    cdef int rc = -1, r, missing = 0
    cdef real* p[N_PARAMS]
    cdef real* fill = NULL
    if (storage is double and real is float) or (storage is not double and real is double):
        return -1  # not a pairing dispatch() makes: Cython then emits no code below for it
    if job == MOMENTS:
        return moments_pass(&call.g, x, &call.stats, call.n_threads)
    # Absent per-channel arrays point at fillers (see call.pxi): ones for the weight, zeros (and
    # scratch) for the rest.  Fillers are made only for the arrays that are absent and that
    # the job reads (the forwards never touch the parameter gradients): a module's forward
    # then needs none, where C can be thousands and the call a few microseconds.
    cdef int used = N_PARAMS if job >= GRAD_SUMS else (0 if job == APPLY_TABLE else GRAD_WEIGHT)
    for r in range(used):
        missing += call.params[r] == NULL
    if missing:
        fill = <real*>malloc(missing * max(c, <Py_ssize_t>1) * sizeof(real))
        if fill == NULL:
            return -1
    missing = 0
    for r in range(N_PARAMS):
        if call.params[r] != NULL or r >= used:
            p[r] = <real*>call.params[r]
        else:
            p[r] = fill + missing * c
            missing += 1
            for i in range(c):
                p[r][i] = 1 if r == WEIGHT else 0
    if job == NORMALIZE:
        rc = normalize(act, call, x, y, p)
    elif job == FORWARD_TRAIN:
        rc = train_forward(act, call, x, y, p)
    elif job == FORWARD_TRAIN_GIVEN:
        rc = train_forward_given(act, call, x, y, p)
    elif job == FORWARD_EVAL:
        rc = eval_forward(act, call, x, y, p)
    elif job == EVAL_TABLE or job == APPLY_TABLE:
        rc = table_job(job == APPLY_TABLE, act, call, x, y, p)
    elif job == GRAD_SUMS:
        rc = grad_sums_pass(act, call, dy, out, x, <real*>NULL, <storage*>NULL)
    elif job == BACKWARD_TRAIN:
        rc = train_backward(act, call, dy, out, x, dx, p)
    elif job == BACKWARD_EVAL:
        rc = eval_backward(act, call, dy, out, x, dx, p)
    elif job == BACKWARD_FROM_SUMS:
        rc = grad_input_from_sums(act, call, dy, out, x, dx, p)
    free(fill)
    return rc


cdef int dispatch(Job job, Call* call, Storage kind, bint relu) noexcept nogil:
    """Run `job` on data of storage type `kind`: float32, float16 and bfloat16 are computed in
    float32, float64 in float64.  -1 if out of memory.  (Each call names its types outright:
    Cython then emits just these specialisations, not every storage x compute pairing.)"""
    if kind == FLOAT32:
        if relu:
            return run(job, call, <ReLU*>NULL, <float*>NULL, <float*>NULL)
        return run(job, call, <Identity*>NULL, <float*>NULL, <float*>NULL)
    if kind == FLOAT64:
        if relu:
            return run(job, call, <ReLU*>NULL, <double*>NULL, <double*>NULL)
        return run(job, call, <Identity*>NULL, <double*>NULL, <double*>NULL)
    if kind == FLOAT16:
        if relu:
            return run(job, call, <ReLU*>NULL, <half*>NULL, <float*>NULL)
        return run(job, call, <Identity*>NULL, <half*>NULL, <float*>NULL)
    if relu:
        return run(job, call, <ReLU*>NULL, <bfloat*>NULL, <float*>NULL)
    return run(job, call, <Identity*>NULL, <bfloat*>NULL, <float*>NULL)
