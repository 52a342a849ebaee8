# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Typed batch-norm kernels over C-contiguous (N, C, *spatial) memory.

Their caller is fastbn._pipeline, and each entry point checks its contract, raising instead of
reading or writing out of bounds: arrays are C-contiguous, aligned and in the machine's byte
order; data is float32, float64, float16 or bfloat16 (ml_dtypes.bfloat16); per-channel
parameters and buffers have the compute dtype (float64 for float64 data, float32 otherwise);
saved statistics and per-channel sums are float64 arrays of length C; what is written is
writable.  Every kernel releases the GIL and splits its
work over OpenMP threads.  Half data (float16, bfloat16) is read and written as it is.

Map of the engine (each file says its job; a layer calls only the ones above it)
--------------------------------------------------------------------------------
_engine/geometry.pxi    layouts (planar, columns), work items, threads, tuning constants
_engine/storage.pxi     storage types (float32, float64, float16, bfloat16) and conversion
_engine/loops.pxi       inner loops on runs and rows of the compute type; the activation
_engine/staging.pxi     those loops over stored data: half data converted in registers
                        (simd/) or widened in blocks on the stack
_engine/statistics.pxi  moments of work items and their merge in a fixed order
_engine/call.pxi        what one call carries: data, per-channel arrays, statistics, scalars
_engine/forward.pxi     coefficients, the normalisation pass, eval and training forwards
_engine/backward.pxi    gradient sums, grad_input, eval and training backwards
_engine/dispatch.pxi    (job, storage, activation) -> the specialisation that runs
_engine/simd/*.h        the C written by hand, by job: convert.h (half <-> float32), affine.h
                        (elementwise maps of half runs and rows, float32 rows four at a time,
                        streaming stores), reduce.h (lane
                        sums in registers, of float32 and half runs), bits.h
                        (prefetch, masking), copy.h (the bench's streaming-store copy); each
                        names the Cython loop whose bits it gives
this file               the Python entry points: validate the contract, fill a Call, dispatch

The tuning switches (a forced layout and fusion off, which tests set, and the largest planar
channel that is fused, a per-CPU default) live in fastbn._tuning, shared by every SIMD
variant of this module.

Layouts
-------
An input of shape (N, C, *spatial) is walked as (N, C, S), S being the product of the spatial
sizes, in one of two ways chosen from the shape alone:

* planar (S large enough; see PLANAR_MIN_S): each plane x[n, c, :] is long and contiguous.
  Reductions cut planes into fixed segments of at most SEGMENT elements; elementwise passes use
  one set of per-channel coefficients per segment.
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
* Half data is computed in float32, converted in registers or through small blocks
  (staging.pxi): every half result is the float32 result on the widened data, rounded to
  nearest even.
"""

from cython.parallel cimport prange
from libc.float cimport DBL_EPSILON, DBL_MAX, FLT_EPSILON, FLT_MAX
from libc.math cimport fabs, sqrt
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset

cimport numpy as cnp

from fastbn._tuning cimport (FusionLimits, fusion_allowed, fusion_limits, layout_override,
                             note_streamed_pass, rows_by_four_max_bytes, stream_min_bytes)
from fastbn import _tuning

cnp.import_array()

include "_engine/geometry.pxi"
include "_engine/storage.pxi"
include "_engine/loops.pxi"
include "_engine/staging.pxi"
include "_engine/statistics.pxi"
include "_engine/call.pxi"
include "_engine/forward.pxi"
include "_engine/backward.pxi"
include "_engine/dispatch.pxi"


# ---------------------------------------------------------------------------------------------
# Python entry points.  x decides the storage type; the other data arrays share it, and every
# pointer is taken while the GIL is held.
# ---------------------------------------------------------------------------------------------

cdef inline void* ptr(object a):
    """The data pointer of an ndarray, NULL for None."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef Storage storage_of(cnp.ndarray a) except *:
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT32:
        return FLOAT32
    if t == cnp.NPY_FLOAT64:
        return FLOAT64
    if t == cnp.NPY_FLOAT16:
        return FLOAT16
    # ml_dtypes' bfloat16, recognised without importing ml_dtypes
    if (<object>a).dtype.name == "bfloat16" and cnp.PyArray_ITEMSIZE(a) == 2:
        return BFLOAT16
    raise TypeError(f"fastbn kernels: unsupported dtype {(<object>a).dtype}")


cdef Storage prepare(Call* call, cnp.ndarray x, int n_threads) except *:
    """A Call for data x (its geometry, storage type and thread count), everything else unset;
    x must be at least 2-D (N, C, ...)."""
    if cnp.PyArray_NDIM(x) < 2:
        raise ValueError("fastbn kernels: expected data of shape (N, C, ...)")
    memset(call, 0, sizeof(Call))
    set_geometry(&call.g, cnp.PyArray_DIMS(x), cnp.PyArray_NDIM(x))
    call.n_threads = n_threads
    call.x = cnp.PyArray_DATA(x)
    return storage_of(x)


cdef void set_params(Call* call, weight=None, bias=None, running_mean=None, running_var=None,
                     grad_weight=None, grad_bias=None):
    call.params[WEIGHT] = ptr(weight)
    call.params[BIAS] = ptr(bias)
    call.params[RUNNING_MEAN] = ptr(running_mean)
    call.params[RUNNING_VAR] = ptr(running_var)
    call.params[GRAD_WEIGHT] = ptr(grad_weight)
    call.params[GRAD_BIAS] = ptr(grad_bias)
    call.param_grads = grad_weight is not None or grad_bias is not None


cdef void run_job(Job job, Call* call, Storage kind, bint relu) except *:
    cdef int rc
    with nogil:
        rc = dispatch(job, call, kind, relu)
    if rc != 0:
        raise MemoryError("fastbn: could not allocate the kernel's work space")


# ---------------------------------------------------------------------------------------------
# The entry points' contract, checked at every call (a few tens of nanoseconds per array): no
# caller, public or private, can make a kernel read or write out of bounds, through a pointer
# of another type, or into an array that is read-only.  The Python layer checks the same
# things first, with messages in torch's words; these are the last line.
# ---------------------------------------------------------------------------------------------

cdef tuple STORAGE_NAMES = ("float32", "float64", "float16", "bfloat16")


cdef inline int compute_type(Storage kind) noexcept:
    """The numpy type of the per-channel parameters and buffers for data of this storage."""
    return cnp.NPY_FLOAT64 if kind == FLOAT64 else cnp.NPY_FLOAT32


cdef int check_datum_fully(str name, Storage kind, cnp.ndarray first, object item,
                           bint written) except -1:
    """check_datum's whole test, which names what is wrong."""
    cdef cnp.ndarray a
    if not cnp.PyArray_Check(item):
        raise TypeError(f"{name}: expected numpy arrays, got {type(item).__name__}")
    a = <cnp.ndarray>item
    if not (cnp.PyArray_ISNOTSWAPPED(a) and cnp.PyArray_IS_C_CONTIGUOUS(a)
            and cnp.PyArray_ISALIGNED(a) and storage_of(a) == kind):
        raise ValueError(f"{name}: expected aligned, C-contiguous {STORAGE_NAMES[kind]} arrays "
                         "in the machine's byte order")
    if cnp.PyArray_NDIM(a) < 2 or not cnp.PyArray_SAMESHAPE(a, first):
        raise ValueError(f"{name}: expected data arrays of the same shape (N, C, ...)")
    if written and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: an output array is read-only")
    return 0


cdef int check_datum(str name, Storage kind, cnp.ndarray first, object item,
                     bint written) except -1:
    """A data array's contract (None where optional): an ndarray of x's storage type and shape
    (N, C, ...), C-contiguous, aligned and in the machine's byte order; writable if written.
    `first` is x, whose storage type is `kind`.  A float32/float64/float16 array is passed by
    one test of its flags; any other goes through the whole test."""
    cdef int need = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED
    if item is None:
        return 0
    if written:
        need |= cnp.NPY_ARRAY_WRITEABLE
    if (cnp.PyArray_Check(item)
            and cnp.PyArray_FLAGS(<cnp.ndarray>item) & need == need
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>item)
            and cnp.PyArray_TYPE(<cnp.ndarray>item) != cnp.NPY_VOID
            and cnp.PyArray_TYPE(<cnp.ndarray>item) == cnp.PyArray_TYPE(first)
            and cnp.PyArray_NDIM(first) >= 2
            and (item is first or cnp.PyArray_SAMESHAPE(<cnp.ndarray>item, first))):
        return 0
    return check_datum_fully(name, kind, first, item, written)


cdef int check_apart(str name, object written, object read) except -1:
    """A written data array is the read one itself or apart from it."""
    if read is None or read is written:
        return 0
    if _overlap(read, written) and cnp.PyArray_DATA(read) != cnp.PyArray_DATA(written):
        raise ValueError(f"{name}: x and y overlap without being the same array")
    return 0


cdef int refuse_channels(str name, object item, int type_num, Py_ssize_t c,
                         bint written) except -1:
    """Raise what is wrong with a per-channel array check_channels refused."""
    if type(item) is not cnp.ndarray:
        raise TypeError(f"{name}: expected numpy arrays (not subclasses) or None per channel, "
                        f"got {type(item).__name__}")
    if written and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>item):
        raise ValueError(f"{name}: a per-channel array it writes is read-only")
    raise ValueError(f"{name}: expected C-contiguous "
                     f"{'float32' if type_num == cnp.NPY_FLOAT32 else 'float64'} per-channel "
                     f"arrays of shape ({c},), got {(<object>item).dtype} of shape "
                     f"{(<object>item).shape}")


cdef int check_channels(str name, object item, int type_num, Py_ssize_t c,
                        bint written) except -1:
    """A per-channel array's contract (None where optional): an ndarray (not a subclass, which
    may give its values other meanings: masks) of one type (float32 or float64) and shape (C,),
    C-contiguous, aligned, in the machine's byte order; writable if written."""
    cdef int need = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED
    if item is None:
        return 0
    if written:
        need |= cnp.NPY_ARRAY_WRITEABLE
    if (type(item) is cnp.ndarray
            and cnp.PyArray_TYPE(<cnp.ndarray>item) == type_num
            and cnp.PyArray_NDIM(<cnp.ndarray>item) == 1
            and cnp.PyArray_DIMS(<cnp.ndarray>item)[0] == c
            and cnp.PyArray_FLAGS(<cnp.ndarray>item) & need == need
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>item)):
        return 0
    return refuse_channels(name, item, type_num, c, written)


cdef int check_parameters(str name, Storage kind, Py_ssize_t c, object weight, object bias,
                          object running_mean, object running_var, bint update) except -1:
    """The affine parameters and running buffers of a forward: each None or of the compute
    type and shape (C,), the buffers both or neither, and writable when it updates them."""
    cdef int t = compute_type(kind)
    check_channels(name, weight, t, c, False)
    check_channels(name, bias, t, c, False)
    check_channels(name, running_mean, t, c, update)
    check_channels(name, running_var, t, c, update)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: expected running_mean and running_var both or neither")
    return 0


cdef int check_io(str name, Storage kind, cnp.ndarray x, cnp.ndarray y) except -1:
    """x and the y written from it: the data contract, and y either x or apart from it."""
    check_datum(name, kind, x, x, False)
    check_datum(name, kind, x, y, True)
    check_apart(name, y, x)
    return 0


cdef int check_gradient_data(str name, Storage kind, cnp.ndarray x, cnp.ndarray dy,
                             object output, cnp.ndarray dx) except -1:
    """A backward's data: x, dy and the forward's output (or None) read, dx written apart from
    them (or as one of them)."""
    check_datum(name, kind, x, x, False)
    check_datum(name, kind, x, dy, False)
    check_datum(name, kind, x, output, False)
    check_datum(name, kind, x, dx, True)
    check_apart(name, dx, x)
    check_apart(name, dx, dy)
    check_apart(name, dx, output)
    return 0


def counter_ok(object counter):
    """Whether num_batches_tracked is the everyday counter a training step increments in
    place: a writable, aligned, native 0-d int64 ndarray holding a value in [0, 2**63 - 1), so
    that the increment cannot overflow (the Python layer checks anything else)."""
    cdef cnp.npy_int64 value
    if not (type(counter) is cnp.ndarray and cnp.PyArray_NDIM(<cnp.ndarray>counter) == 0
            and cnp.PyArray_TYPE(<cnp.ndarray>counter) == cnp.NPY_INT64
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>counter)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>counter)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>counter)):
        return False
    value = (<cnp.npy_int64*>cnp.PyArray_DATA(<cnp.ndarray>counter))[0]
    return 0 <= value < 0x7FFFFFFFFFFFFFFF


cdef bint _overlap(cnp.ndarray a, cnp.ndarray b):
    cdef char* ap = <char*>cnp.PyArray_DATA(a)
    cdef char* bp = <char*>cnp.PyArray_DATA(b)
    return ap < bp + cnp.PyArray_NBYTES(b) and bp < ap + cnp.PyArray_NBYTES(a)


cdef inline bint is_half(object a):
    return a is not None and cnp.PyArray_TYPE(<cnp.ndarray>a) != cnp.NPY_FLOAT32 \
        and cnp.PyArray_TYPE(<cnp.ndarray>a) != cnp.NPY_FLOAT64


def _force_layout(name):
    """Force the 'planar' or 'columns' layout for every shape, or None to choose by shape.
    For tests and tuning only: both layouts must give the same results to rounding.  The
    switch is process-wide, shared by every SIMD variant (fastbn._tuning)."""
    _tuning.force_layout(name)


def _set_fusion(enabled):
    """Allow (True) or forbid (False) the fused passes.  For tests and tuning only: fused and
    unfused passes must give the same bits.  Process-wide (fastbn._tuning)."""
    _tuning.set_fusion(enabled)


def describe_layout(shape, int itemsize=4, int threads=1):
    """How the kernels walk an input of this shape: a dict of the geometry (for tests and
    bench), with `fused`: how a training pass on values of `itemsize` bytes and up to
    `threads` threads goes over memory ('channels', 'tiles', or None for separate passes),
    under the fusion switches now in force (fastbn._tuning), and `rows_by_four`: whether the
    row passes (the columns layout's, per-column coefficients: the forward's normalisation,
    the training backward's grad_input) take float32 rows four at a time in this build (where
    there are four whole rows)."""
    cdef Geometry g
    cdef cnp.npy_intp dims[32]
    cdef int i, ndim = len(shape)
    if not 2 <= ndim <= 32:
        raise ValueError(f"describe_layout: expected a shape (N, C, ...) of 2 to 32 sizes, got {shape!r}")
    for i in range(ndim):
        if shape[i] < 0:
            raise ValueError(f"describe_layout: expected sizes of at least 0, got {shape!r}")
        dims[i] = shape[i]
    if itemsize not in (2, 4, 8) or threads < 1:
        raise ValueError(f"describe_layout: expected an itemsize of 2, 4 or 8 and threads of at "
                         f"least 1, got {itemsize!r} and {threads!r}")
    set_geometry(&g, dims, ndim)
    fused = fused_pass(&g, itemsize, threads) if g.total else NOT_FUSED
    return dict(layout="planar" if g.planar else "columns", n=g.n, c=g.c, s=g.s,
                segments=g.segs, segment_length=g.seg_len, group=g.group, period=g.period,
                rows=g.rows, tail=g.tail, tile=g.tile, block=g.block, tiles=g.tiles, items=g.items,
                fused={FUSED_CHANNELS: "channels", FUSED_TILES: "tiles"}.get(fused),
                rows_by_four=bool(g.total and itemsize == 4 and ROWS_AFFINE and by_rows(&g)
                                  and g.rows >= 4 and rows_by_four(&g, itemsize)))


def moments(cnp.ndarray x not None, cnp.ndarray mean not None, cnp.ndarray m2 not None,
            int n_threads, object mean_lo=None):
    """Per-channel mean and M2 = sum((x - mean)**2) of x (N, C, ...), into float64 arrays; with
    mean_lo, the mean unrounded as mean + mean_lo."""
    cdef Call call
    cdef Storage kind = prepare(&call, x, n_threads)
    check_datum("moments", kind, x, x, False)
    check_channels("moments", mean, cnp.NPY_FLOAT64, call.g.c, True)
    check_channels("moments", m2, cnp.NPY_FLOAT64, call.g.c, True)
    check_channels("moments", mean_lo, cnp.NPY_FLOAT64, call.g.c, True)
    if call.g.total == 0:
        return
    call.stats.mean = <double*>ptr(mean)
    call.stats.mean_lo = <double*>ptr(mean_lo)
    call.stats.m2 = <double*>ptr(m2)
    run_job(MOMENTS, &call, kind, False)


def normalize_given(cnp.ndarray x not None, cnp.ndarray y not None, object weight, object bias,
                    cnp.ndarray mean not None, cnp.ndarray invstd not None, int n_threads,
                    bint relu=False):
    """y = (x - mean) * invstd * weight + bias with given float64 statistics (then ReLU)."""
    cdef Call call
    cdef Storage kind = prepare(&call, x, n_threads)
    check_io("normalize_given", kind, x, y)
    check_channels("normalize_given", weight, compute_type(kind), call.g.c, False)
    check_channels("normalize_given", bias, compute_type(kind), call.g.c, False)
    check_channels("normalize_given", mean, cnp.NPY_FLOAT64, call.g.c, False)
    check_channels("normalize_given", invstd, cnp.NPY_FLOAT64, call.g.c, False)
    if call.g.total == 0:
        return
    call.y = ptr(y)
    set_params(&call, weight, bias)
    call.stats.mean = <double*>ptr(mean)
    call.stats.invstd = <double*>ptr(invstd)
    run_job(NORMALIZE, &call, kind, relu)


def forward_train(cnp.ndarray x not None, cnp.ndarray y not None, object weight, object bias,
                  object running_mean, object running_var, double momentum, double eps,
                  cnp.ndarray save_mean not None, cnp.ndarray save_invstd not None, int n_threads,
                  bint relu=False):
    """Training-mode forward: batch statistics into save_mean/save_invstd (float64), running
    buffers (when not None) updated in place, y written (then ReLU).  Needs N * S >= 2.  Half
    x and y (float16, bfloat16) take float32 parameters and buffers."""
    cdef Call call
    cdef Storage kind = prepare(&call, x, n_threads)
    check_io("forward_train", kind, x, y)
    check_parameters("forward_train", kind, call.g.c, weight, bias, running_mean, running_var,
                     True)
    check_channels("forward_train", save_mean, cnp.NPY_FLOAT64, call.g.c, True)
    check_channels("forward_train", save_invstd, cnp.NPY_FLOAT64, call.g.c, True)
    if call.g.total == 0:
        return
    call.y = ptr(y)
    set_params(&call, weight, bias, running_mean, running_var)
    call.stats.mean = <double*>ptr(save_mean)
    call.stats.invstd = <double*>ptr(save_invstd)
    call.step.momentum = momentum
    call.step.eps = eps
    call.step.count = <double>(call.g.n * call.g.s)
    run_job(FORWARD_TRAIN, &call, kind, relu)


def forward_train_with_stats(cnp.ndarray x not None, cnp.ndarray y not None, object weight,
                             object bias, object running_mean, object running_var,
                             double momentum, double eps, double count,
                             cnp.ndarray mean not None, cnp.ndarray mean_lo not None,
                             cnp.ndarray m2 not None, cnp.ndarray save_invstd not None,
                             int n_threads, bint relu=False):
    """Training-mode forward with given batch statistics (float64: the mean as mean + mean_lo,
    M2 over `count` values per channel, e.g. merged over several processes): save_invstd
    written, running buffers (when not None) updated -- also when x is empty --, y written
    (then ReLU), by the same code as forward_train's."""
    cdef Call call
    cdef Storage kind = prepare(&call, x, n_threads)
    check_io("forward_train_with_stats", kind, x, y)
    check_parameters("forward_train_with_stats", kind, call.g.c, weight, bias, running_mean,
                     running_var, True)
    check_channels("forward_train_with_stats", mean, cnp.NPY_FLOAT64, call.g.c, False)
    check_channels("forward_train_with_stats", mean_lo, cnp.NPY_FLOAT64, call.g.c, False)
    check_channels("forward_train_with_stats", m2, cnp.NPY_FLOAT64, call.g.c, False)
    check_channels("forward_train_with_stats", save_invstd, cnp.NPY_FLOAT64, call.g.c, True)
    if not count >= 0:
        raise ValueError("forward_train_with_stats: expected a count of at least 0")
    call.y = ptr(y)
    set_params(&call, weight, bias, running_mean, running_var)
    call.stats.mean = <double*>ptr(mean)
    call.stats.mean_lo = <double*>ptr(mean_lo)
    call.stats.m2 = <double*>ptr(m2)
    call.stats.invstd = <double*>ptr(save_invstd)
    call.step.momentum = momentum
    call.step.eps = eps
    call.step.count = count
    run_job(FORWARD_TRAIN_GIVEN, &call, kind, relu)


def forward_eval(cnp.ndarray x not None, cnp.ndarray y not None, object weight, object bias,
                 cnp.ndarray running_mean not None, cnp.ndarray running_var not None, double eps,
                 cnp.ndarray save_mean not None, cnp.ndarray save_invstd not None, int n_threads,
                 bint relu=False):
    """Eval-mode forward with running statistics (then ReLU); save_mean/save_invstd (float64)
    receive the statistics used: running_mean and 1 / sqrt(running_var + eps).  Half x and y
    as forward_train takes them."""
    cdef Call call
    cdef Storage kind = prepare(&call, x, n_threads)
    check_io("forward_eval", kind, x, y)
    check_parameters("forward_eval", kind, call.g.c, weight, bias, running_mean, running_var,
                     False)
    check_channels("forward_eval", save_mean, cnp.NPY_FLOAT64, call.g.c, True)
    check_channels("forward_eval", save_invstd, cnp.NPY_FLOAT64, call.g.c, True)
    call.y = ptr(y)
    set_params(&call, weight, bias, running_mean, running_var)
    call.stats.mean = <double*>ptr(save_mean)
    call.stats.invstd = <double*>ptr(save_invstd)
    call.step.eps = eps
    run_job(FORWARD_EVAL, &call, kind, relu)


def eval_table(object weight, object bias, cnp.ndarray running_mean not None,
               cnp.ndarray running_var not None, double eps, cnp.ndarray table not None,
               cnp.ndarray save_mean not None, cnp.ndarray save_invstd not None):
    """forward_eval's per-channel coefficients into table, a C-contiguous (4, C) array of the
    compute dtype (float32 or float64, the parameters' and buffers'), and its statistics into
    save_mean/save_invstd (float64), by forward_eval's code: apply_table then writes forward_eval's
    output, bit for bit, for as long as the parameters, buffers and eps are unchanged."""
    cdef Call call
    cdef cnp.npy_intp dims[2]
    cdef int t = cnp.PyArray_TYPE(running_mean)
    dims[0] = 1
    dims[1] = cnp.PyArray_SIZE(running_mean)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        raise ValueError("eval_table: expected float32 or float64 parameters and buffers")
    check_channels("eval_table", weight, t, dims[1], False)
    check_channels("eval_table", bias, t, dims[1], False)
    check_channels("eval_table", running_mean, t, dims[1], False)
    check_channels("eval_table", running_var, t, dims[1], False)
    check_channels("eval_table", save_mean, cnp.NPY_FLOAT64, dims[1], True)
    check_channels("eval_table", save_invstd, cnp.NPY_FLOAT64, dims[1], True)
    if not (cnp.PyArray_IS_C_CONTIGUOUS(table) and cnp.PyArray_SIZE(table) == 4 * dims[1]
            and cnp.PyArray_TYPE(table) == t and cnp.PyArray_ISWRITEABLE(table)
            and cnp.PyArray_ISALIGNED(table) and cnp.PyArray_ISNOTSWAPPED(table)):
        raise ValueError("eval_table: expected a writable, C-contiguous table of 4 * C values "
                         "of the buffers' dtype")
    memset(&call, 0, sizeof(Call))
    set_geometry(&call.g, dims, 2)
    call.n_threads = 1
    call.table = cnp.PyArray_DATA(table)
    set_params(&call, weight, bias, running_mean, running_var)
    call.stats.mean = <double*>ptr(save_mean)
    call.stats.invstd = <double*>ptr(save_invstd)
    call.step.eps = eps
    run_job(EVAL_TABLE, &call, storage_of(table), False)


def apply_table(cnp.ndarray x not None, cnp.ndarray y not None, cnp.ndarray table not None,
                int n_threads, bint relu=False):
    """forward_eval's output from a table eval_table made: y = the affine map of x (then ReLU),
    x and y C-contiguous arrays of one shape and storage type, computed in the table's dtype."""
    cdef Call call
    cdef Storage kind = prepare(&call, x, n_threads)
    if cnp.PyArray_SIZE(table) != 4 * call.g.c or not cnp.PyArray_IS_C_CONTIGUOUS(table) or (
            not cnp.PyArray_ISALIGNED(table)) or not cnp.PyArray_ISNOTSWAPPED(table) or (
            cnp.PyArray_TYPE(table) != (cnp.NPY_FLOAT64 if kind == FLOAT64 else cnp.NPY_FLOAT32)):
        raise ValueError("apply_table: expected a C-contiguous table of 4 * C values of the "
                         "compute dtype")
    if kind >= FLOAT16 or is_half(y):
        check_io("apply_table", kind, x, y)
    elif not (cnp.PyArray_TYPE(y) == cnp.PyArray_TYPE(x) and cnp.PyArray_SAMESHAPE(x, y)
              and cnp.PyArray_IS_C_CONTIGUOUS(x) and cnp.PyArray_IS_C_CONTIGUOUS(y)
              and cnp.PyArray_ISALIGNED(x) and cnp.PyArray_ISALIGNED(y)
              and cnp.PyArray_ISNOTSWAPPED(x) and cnp.PyArray_ISNOTSWAPPED(y)
              and cnp.PyArray_ISWRITEABLE(y)):
        raise ValueError("apply_table: expected C-contiguous x and y of one shape and dtype, "
                         "y writable")
    elif _overlap(x, y) and cnp.PyArray_DATA(x) != cnp.PyArray_DATA(y):
        raise ValueError("apply_table: x and y overlap without being the same array")
    if call.g.total == 0:
        return
    call.y = ptr(y)
    call.table = cnp.PyArray_DATA(table)
    run_job(APPLY_TABLE, &call, kind, relu)


def same_values(cnp.ndarray snapshot not None, tuple arrays):
    """Whether `arrays` (four per-channel arrays or None: weight, bias, running_mean,
    running_var) are exactly what `snapshot` holds: a (5, C) array whose rows 0-3 are their
    values and whose last row's first value is, as a bit mask, which of them were present.
    Compared by memcmp (bits: any change of a value, NaN payloads and signed zeros included,
    counts), with each array's presence, dtype, size and contiguity: the test of a cached
    table's freshness."""
    cdef Py_ssize_t c = cnp.PyArray_DIMS(snapshot)[1] if cnp.PyArray_NDIM(snapshot) == 2 else -1
    cdef Py_ssize_t row_bytes = c * cnp.PyArray_ITEMSIZE(snapshot)
    cdef char* rows = <char*>cnp.PyArray_DATA(snapshot)
    cdef int type_num = cnp.PyArray_TYPE(snapshot), present = 0, i = 0
    cdef cnp.ndarray a
    if c < 0 or cnp.PyArray_DIMS(snapshot)[0] != 5 or not cnp.PyArray_IS_C_CONTIGUOUS(snapshot):
        raise ValueError("same_values: expected a C-contiguous (5, C) snapshot")
    if len(arrays) != 4:
        raise ValueError("same_values: expected four arrays or None")
    for item in arrays:
        if item is not None:
            if type(item) is not cnp.ndarray:
                return False  # (the table is then made anew, and its checks name the problem)
            a = item
            if (cnp.PyArray_TYPE(a) != type_num or cnp.PyArray_NDIM(a) != 1
                    or cnp.PyArray_DIMS(a)[0] != c or not cnp.PyArray_ISNOTSWAPPED(a)
                    or not cnp.PyArray_ISALIGNED(a) or not cnp.PyArray_IS_C_CONTIGUOUS(a)
                    or memcmp(rows + i * row_bytes, cnp.PyArray_DATA(a), row_bytes) != 0):
                return False
            present |= 1 << i
        i += 1
    if c == 0:
        return True  # (nothing is computed with no channels)
    if type_num == cnp.NPY_FLOAT32:
        return (<float*>(rows + 4 * row_bytes))[0] == present
    return type_num == cnp.NPY_FLOAT64 and (<double*>(rows + 4 * row_bytes))[0] == present


def grad_sums(cnp.ndarray dy not None, cnp.ndarray x not None, cnp.ndarray center not None,
              cnp.ndarray sum_dy not None, cnp.ndarray sum_dy_xc not None, int n_threads,
              object output=None):
    """Per-channel sum(g) and sum(g * (x - center)) into float64 arrays, g being dy, or, when
    the forward's output is given, dy gated by its ReLU (dy where output > 0)."""
    cdef Call call
    cdef Storage kind = prepare(&call, x, n_threads)
    check_datum("grad_sums", kind, x, x, False)
    check_datum("grad_sums", kind, x, dy, False)
    check_datum("grad_sums", kind, x, output, False)
    check_channels("grad_sums", center, cnp.NPY_FLOAT64, call.g.c, False)
    check_channels("grad_sums", sum_dy, cnp.NPY_FLOAT64, call.g.c, True)
    check_channels("grad_sums", sum_dy_xc, cnp.NPY_FLOAT64, call.g.c, True)
    if call.g.total == 0:
        return
    call.dy = ptr(dy)
    call.out = ptr(output)
    call.stats.mean = <double*>ptr(center)
    call.stats.sum_dy = <double*>ptr(sum_dy)
    call.stats.sum_dy_xc = <double*>ptr(sum_dy_xc)
    run_job(GRAD_SUMS, &call, kind, output is not None)


def backward(cnp.ndarray dy not None, cnp.ndarray x not None, cnp.ndarray dx not None,
             object weight, cnp.ndarray mean not None, cnp.ndarray invstd not None,
             object grad_weight, object grad_bias, bint training, int n_threads,
             object output=None):
    """dx (and grad_weight/grad_bias when not None) of y = (x - mean) * invstd * weight + bias,
    or of ReLU(y) when the forward's output is given (it supplies the ReLU's mask).

    training=True: mean and invstd are the batch statistics of x (so depend on it);
    training=False: they are constants (running statistics).
    """
    cdef Call call
    cdef Storage kind = prepare(&call, x, n_threads)
    check_gradient_data("backward", kind, x, dy, output, dx)
    check_channels("backward", weight, compute_type(kind), call.g.c, False)
    check_channels("backward", grad_weight, compute_type(kind), call.g.c, True)
    check_channels("backward", grad_bias, compute_type(kind), call.g.c, True)
    check_channels("backward", mean, cnp.NPY_FLOAT64, call.g.c, False)
    check_channels("backward", invstd, cnp.NPY_FLOAT64, call.g.c, False)
    if call.g.total == 0:
        return
    call.dy = ptr(dy)
    call.out = ptr(output)
    call.dx = ptr(dx)
    set_params(&call, weight, None, None, None, grad_weight, grad_bias)
    call.stats.mean = <double*>ptr(mean)
    call.stats.invstd = <double*>ptr(invstd)
    call.step.count = <double>(call.g.n * call.g.s)
    run_job(BACKWARD_TRAIN if training else BACKWARD_EVAL, &call, kind, output is not None)


def backward_from_sums(cnp.ndarray dy not None, cnp.ndarray x not None,
                       cnp.ndarray dx not None, object weight, cnp.ndarray mean not None,
                       cnp.ndarray invstd not None, cnp.ndarray sum_dy not None,
                       cnp.ndarray sum_dy_xc not None, double count, int n_threads,
                       object output=None):
    """Training-mode dx given per-channel sums of g and g * (x - mean) over `count` values per
    channel, which may span several processes (distributed batch norm); g is dy, or dy gated
    by the ReLU of the forward's output when that is given."""
    cdef Call call
    cdef Storage kind = prepare(&call, x, n_threads)
    check_gradient_data("backward_from_sums", kind, x, dy, output, dx)
    check_channels("backward_from_sums", weight, compute_type(kind), call.g.c, False)
    check_channels("backward_from_sums", mean, cnp.NPY_FLOAT64, call.g.c, False)
    check_channels("backward_from_sums", invstd, cnp.NPY_FLOAT64, call.g.c, False)
    check_channels("backward_from_sums", sum_dy, cnp.NPY_FLOAT64, call.g.c, False)
    check_channels("backward_from_sums", sum_dy_xc, cnp.NPY_FLOAT64, call.g.c, False)
    if call.g.total == 0:
        return
    call.dy = ptr(dy)
    call.out = ptr(output)
    call.dx = ptr(dx)
    set_params(&call, weight)
    call.stats.mean = <double*>ptr(mean)
    call.stats.invstd = <double*>ptr(invstd)
    call.stats.sum_dy = <double*>ptr(sum_dy)
    call.stats.sum_dy_xc = <double*>ptr(sum_dy_xc)
    call.step.count = count
    run_job(BACKWARD_FROM_SUMS, &call, kind, output is not None)


cdef extern from "_engine/simd/copy.h":
    # (built where STREAM_AFFINE is)
    void copy_stream "fastbn_copy_stream"(const char* src, char* dst, Py_ssize_t n) noexcept nogil


def stream_stores():
    """Whether this build writes large float32 outputs with streaming stores (past the caches;
    _tuning.stream_min_bytes), and parallel_copy can copy that way."""
    return bool(STREAM_AFFINE)


def rows_by_four_built():
    """Whether this build can map float32 rows of the columns layout four at a time
    (fastbn_affine_rows4, fastbn_grad_input_rows4: compilers that contract the loops into
    fused multiply-adds, in the AVX2 and AVX-512 builds; describe_layout says where)."""
    return bool(ROWS_AFFINE)


cdef inline void copy_part(const char* s, char* d, Py_ssize_t n, bint streaming) noexcept nogil:
    if streaming:
        copy_stream(s, d, n)
    else:
        memcpy(d, s, n)


def parallel_copy(cnp.ndarray src not None, cnp.ndarray dst not None, int n_threads,
                  bint streaming=False):
    """dst[...] = src for C-contiguous arrays of the same size, on up to n_threads threads.

    The bandwidth yardstick of the benchmarks: the fastest way to move these bytes with this
    many threads, which a kernel that reads and writes each byte once cannot beat.  With
    `streaming`, the destination is written with streaming stores (where stream_stores()),
    as fastbn's large float32 outputs are: the yardstick of those passes.
    """
    cdef char* s = <char*>cnp.PyArray_DATA(src)
    cdef char* d = <char*>cnp.PyArray_DATA(dst)
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(src), chunk, k, parts
    if cnp.PyArray_NBYTES(dst) != nbytes:
        raise ValueError("parallel_copy: src and dst sizes differ")
    if not (cnp.PyArray_IS_C_CONTIGUOUS(src) and cnp.PyArray_IS_C_CONTIGUOUS(dst)
            and cnp.PyArray_ISWRITEABLE(dst)):
        raise ValueError("parallel_copy: expected C-contiguous arrays, dst writable")
    if streaming and not STREAM_AFFINE:
        raise ValueError("parallel_copy: this build has no streaming stores (see stream_stores())")
    parts = max(1, min(<Py_ssize_t>n_threads, nbytes // (GRAIN * 4)))
    chunk = ((nbytes + parts - 1) // parts + 63) // 64 * 64
    with nogil:
        if parts == 1:
            copy_part(s, d, nbytes, streaming)
        else:
            for k in prange(parts, num_threads=<int>parts, schedule="static"):
                if k * chunk < nbytes:
                    copy_part(s + k * chunk, d + k * chunk, min(chunk, nbytes - k * chunk),
                              streaming)


def half_simd():
    """Whether this build converts float16 with instructions (F16C on x86-64, FCVT on AArch64;
    else with exact integer arithmetic, which gives the same bits more slowly)."""
    return bool(HALF_SIMD)


def half_conversion():
    """How this build converts float16: 'F16C', 'AArch64 FCVT' or 'integer'."""
    return HALF_CONVERT.decode("ascii")


cdef void convert_checked(str name, Storage half_kind, cnp.ndarray src, cnp.ndarray dst,
                          int n_threads) except *:
    cdef Py_ssize_t n = cnp.PyArray_SIZE(src)
    cdef Storage s = storage_of(src) if cnp.PyArray_TYPE(src) != cnp.NPY_FLOAT64 else FLOAT64
    cdef Storage d = storage_of(dst) if cnp.PyArray_TYPE(dst) != cnp.NPY_FLOAT64 else FLOAT64
    cdef bint widening = s == half_kind and d == FLOAT32
    cdef char* sp = <char*>cnp.PyArray_DATA(src)
    cdef char* dp = <char*>cnp.PyArray_DATA(dst)
    cdef str half_name = "float16" if half_kind == FLOAT16 else "bfloat16"
    if not (widening or (s == FLOAT32 and d == half_kind)):
        raise TypeError(f"{name}: expected {half_name} -> float32 or float32 -> {half_name}")
    if not (cnp.PyArray_ISNOTSWAPPED(src) and cnp.PyArray_ISNOTSWAPPED(dst)):
        raise ValueError(f"{name}: expected arrays in the machine's byte order")
    if cnp.PyArray_SIZE(dst) != n or not (cnp.PyArray_IS_C_CONTIGUOUS(src) and cnp.PyArray_IS_C_CONTIGUOUS(dst)):
        raise ValueError(f"{name}: expected C-contiguous arrays of the same size")
    if not (cnp.PyArray_ISALIGNED(src) and cnp.PyArray_ISALIGNED(dst)):
        raise ValueError(f"{name}: expected aligned arrays")
    if not cnp.PyArray_ISWRITEABLE(dst):
        raise ValueError(f"{name}: dst is read-only")
    if n and _overlap(src, dst):
        raise ValueError(f"{name}: src and dst overlap")
    cdef int kind = (0 if half_kind == FLOAT16 else 2) + (0 if widening else 1)
    with nogil:
        convert(kind, sp, dp, n, n_threads)


def convert_float16(cnp.ndarray src not None, cnp.ndarray dst not None, int n_threads):
    """dst[...] = src between aligned, C-contiguous, native-order float16 and float32 arrays of
    the same size (either way round) that do not overlap, rounding to nearest even."""
    convert_checked("convert_float16", FLOAT16, src, dst, n_threads)


def convert_bfloat16(cnp.ndarray src not None, cnp.ndarray dst not None, int n_threads):
    """dst[...] = src between aligned, C-contiguous bfloat16 (ml_dtypes.bfloat16) and float32
    arrays of the same size (either way round) that do not overlap, rounding to nearest even."""
    convert_checked("convert_bfloat16", BFLOAT16, src, dst, n_threads)
