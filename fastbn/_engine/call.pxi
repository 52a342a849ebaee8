# What one kernel call carries: its geometry, its data and per-channel arrays, its statistics
# and scalars, in one struct that the entry points fill and the drivers read.

cdef enum:
    # Per-channel arrays of the compute type that a call may take.  Drivers get `real** p`
    # with none NULL that their job reads: an absent one points at a filler (ones for WEIGHT,
    # zeros elsewhere, the writable ones scratch), so that every per-channel loop is free of
    # branches, vectorises, and the fused and unfused paths run exactly the same arithmetic.
    # (The forward jobs never read GRAD_WEIGHT and GRAD_BIAS, and APPLY_TABLE reads none:
    # those stay as given, NULL included; see run() in dispatch.pxi.)
    WEIGHT, BIAS, RUNNING_MEAN, RUNNING_VAR, GRAD_WEIGHT, GRAD_BIAS, N_PARAMS


cdef struct Step:
    # The scalars of a training step
    double momentum, eps
    double count        # values per channel: N * S (or, for distributed sums, all ranks')


cdef struct Call:
    # One kernel call: its geometry, data (void*: the storage type, fixed by the dispatcher),
    # per-channel arrays, statistics and scalars.  The Python entry points fill it; the job
    # runner (dispatch.pxi) types its pointers; the drivers read it.
    Geometry g
    int n_threads
    const void* x
    void* y
    const void* dy
    const void* out       # the forward's output: the activation's mask in the backward
    void* dx
    void* params[N_PARAMS]  # compute type, NULL where absent (WEIGHT ... GRAD_BIAS above)
    bint param_grads      # whether GRAD_WEIGHT or GRAD_BIAS was given
    void* table           # eval coefficients (compute type): rows CENTER ... FACTOR, C each
    Stats stats
    Step step
