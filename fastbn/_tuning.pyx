"""Process-wide switches that tests and tuning set on the kernels: a forced layout, fusion and
its limits per CPU, the smallest output written with streaming stores, and the largest array
whose row pass goes four rows at a time.

The kernels are compiled once per SIMD level (setup.py), but these switches live here, once,
so that every variant reads the same state and none holds mutable state of its own.  They are
not for production use: a switch affects every call in the process while it is set, and the
results must not depend on it (both layouts give the same results to rounding; fused and
unfused passes give the same bits).

The defaults that depend on the machine say which training passes are fused: processed piece
by piece, statistics then normalisation (or gradient sums then grad_input) while the piece is
in cache (_engine/geometry.pxi).  The limits, all in bytes per array (FusionLimits):

* channel_bytes: the largest planar channel fused (from FUSE_CHANNEL_MIN_BYTES, 1 KiB);
* short_piece_bytes, short_pieces_array_bytes: a channel of several samples whose pieces (one
  per sample, far apart) are shorter than short_piece_bytes is fused only on two threads or
  more, and only in an array smaller than short_pieces_array_bytes;
* tile_bytes: the largest column tile fused (all its rows; the columns layout's (N, C));
* serial_tile_bytes, serial_tile_array_bytes: on one thread, a tile among several (its rows
  then pieces of rows, far apart) larger than serial_tile_bytes is fused only in an array of
  at least serial_tile_array_bytes.

They live in INTEL_FUSION and OTHER_FUSION below, measured with benchmarks/fusion_grid.py and
benchmarks/compare_builds.py (benchmarks/RESULTS.md has the tables):

* Intel Xeon (2 MiB L2): planar channels of up to 1 MiB were faster fused -- training forwards
  at 0.77-0.93 of the three-pass floor, which separate passes cannot reach.  Its tiles keep
  the 1 MiB first set on a Zen 4 from (128, 2048, 1, 1) alone; neither was measured there by
  pieces, array sizes or thread counts, so nothing is held back by them.
* AMD EPYC, Zen 4 (1 MiB L2, 32 MiB L3): channels of 25 KB-1 MB went 1.1-2x slower fused.
  Channels of pieces under 2 KiB were faster unfused on one thread (1.02-1.18x on 0.3-2 MiB
  arrays, one backward at 0.93; 1.1-1.8x on 4.5-48 MiB ones) and on two threads in arrays of
  4.5 MiB or more (1.1-1.7x); on two threads in smaller arrays both went either way (the
  fused forward, one parallel region instead of two, 0.92-1.26x against unfused, the
  backward 0.87-1.11), so they stay fused there, as before.  Channels of one sample, or of
  pieces of 2 KiB or more, mostly gained fused in float32 (0.88-1.23x) and went either way
  in float16 (0.84-1.08); they stay fused, as before.  Column tiles
  of up to 128 KiB mostly gained fused (0.96-2.1x at 3 MiB; at 24 MiB the forwards 1.2-3.5x,
  the backwards of 8-16 KiB half tiles 0.69-0.94); on one thread, larger tiles among several
  lost in arrays under 8 MiB (0.72-0.95 on (256, 1024) to (1024, 1024) and (256, 8192)) and
  gained from 8 MiB of half data or 24 MiB of float32 (1.02-1.3x), 16 MiB of float32 being
  even.  Its L3 feeds these compute-bound loops about as fast as its L2, so a
  second pass over an array that stays in L3 costs little and the fused passes' own costs (a
  channel's pieces, a tile's rows far apart) show; beyond the L3 fusion pays again.

The elementwise pass writes a float32 output of at least STREAM_MIN_BYTES with streaming
stores (past the caches; _engine/simd/affine.h), planar runs and the columns layout's rows
alike, the same values either way.
Measured on the AMD EPYC (Zen 4, 32 MiB L3), one thread: the affine map of a float32 array in
C, ordinary stores 59/52/33/22 GB/s at 4/8/16/64 MiB of output, streaming ones 51/50/47/34
GB/s -- ordinary stores win while input and output fit in the L3 together, streaming ones
beyond; fastbn's eval and training forward into a given `out`, ordinary/streaming, 0.97x and
1.08x at 12 MiB, 1.25x and 1.19x at 24.5 MiB, 1.51x and 1.22x at 98 MiB.  Hence 16 MiB.  (Into
a fresh output, as the modules return, the kernel's zeroing of the new pages costs the same
either way: 0.93-1.17x, within the noise at 98 MiB.)  The rows of the columns layout, one
row at a time in C at 16 MiB ((4096, 1024), (8192, 512)): ordinary 1.75-2.1 ms, streaming
1.04-1.66 ms; in the kernels, eval 1.2-1.8x faster at 16 MiB.

The row passes of the columns layout (rows whose columns have coefficients of their own:
BatchNorm1d's (N, C), 1x1 planes) take float32 rows four at a time, each column's
coefficients loaded once for the four (fastbn_affine_rows4 forward, fastbn_grad_input_rows4
in the training backward; the same bits), in arrays of up to ROWS_BY_FOUR_MAX_BYTES.
Measured on the AMD EPYC (Zen 4), eval forwards against one row at a time, alternating, one
thread, with y at several distances from x modulo 4 KiB: (512, 256) 1.1-1.4x, (256, 512)
1.3-1.6x, (2048, 256) (2 MiB) 1.2-1.4x faster; at 4 MiB (4096, 256) 0.9-1.4x; at 16 MiB
(8192, 512) 0.68-0.79x slower, and 0.77-0.9x in C (benchmarks/column_loops.c) wherever its
coefficients lay -- likely because four rows interleave four streams within each page of x
and of y where one row is one, unverified: (4096, 1024), rows of a page each, went faster
four at a time in C.  Hence 2 MiB, which the backward, measured only below it, shares.  Rows
a multiple of 4 KiB long stay one at a time whatever the size (_engine/geometry.pxi,
rows_by_four).
"""

from collections.abc import Mapping
from types import MappingProxyType

cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    static int fastbn_cpu_is_intel(void) {
        __builtin_cpu_init();
        return __builtin_cpu_is("intel");
    }
    #elif defined(_MSC_VER) && defined(_M_X64)
    #include <intrin.h>
    static int fastbn_cpu_is_intel(void) {
        int r[4];
        __cpuid(r, 0);  /* vendor "GenuineIntel" in EBX, EDX, ECX */
        return r[1] == 0x756e6547 && r[3] == 0x49656e69 && r[2] == 0x6c65746e;
    }
    #else
    static int fastbn_cpu_is_intel(void) { return 0; }
    #endif
    """
    int fastbn_cpu_is_intel() noexcept nogil

#: The fusion limits of each CPU family (see the module's docstring), the one place they live;
#: every one in bytes per array.
#: (Read-only: set_fusion_limits changes the limits in force.)
INTEL_FUSION = MappingProxyType({
    "channel_bytes": 1 << 20, "short_piece_bytes": 0, "short_pieces_array_bytes": 0,
    "tile_bytes": 1 << 20, "serial_tile_bytes": 1 << 20, "serial_tile_array_bytes": 0})
OTHER_FUSION = MappingProxyType({
    "channel_bytes": 16 << 10, "short_piece_bytes": 2 << 10, "short_pieces_array_bytes": 4 << 20,
    "tile_bytes": 1 << 20, "serial_tile_bytes": 128 << 10, "serial_tile_array_bytes": 8 << 20})

#: The smallest float32 output (bytes) the elementwise pass writes with streaming stores.
STREAM_MIN_BYTES = 16 * 1024 * 1024

#: The largest float32 array (bytes) whose row pass maps four rows at a time.
ROWS_BY_FOUR_MAX_BYTES = 2 * 1024 * 1024

# 0: choose the layout by shape, 1: planar, 2: columns.
cdef int forced_layout = 0
cdef bint fusion_enabled = True
# The fusion limits now in force (set_fusion_limits), this CPU's defaults from import on.
cdef FusionLimits limits_now
cdef Py_ssize_t stream_bytes_limit = STREAM_MIN_BYTES
cdef Py_ssize_t rows_by_four_limit = ROWS_BY_FOUR_MAX_BYTES
# Elementwise passes that wrote their output with streaming stores, for bench to tell which
# floor a pass is held to (a count, not a switch: the kernels only add to it).
cdef Py_ssize_t streamed_count = 0

LAYOUTS = {None: 0, "planar": 1, "columns": 2}


cdef int layout_override() noexcept nogil:
    """The forced layout (1 planar, 2 columns), or 0 to choose by shape."""
    return forced_layout


cdef bint fusion_allowed() noexcept nogil:
    """Whether the channel- and tile-fused passes may run."""
    return fusion_enabled


cdef const FusionLimits* fusion_limits() noexcept nogil:
    """The fusion limits now in force."""
    return &limits_now


cdef Py_ssize_t fused_channel_bytes() noexcept nogil:
    """The largest planar channel (bytes per array) that is processed whole.  (The kernels
    of older builds read this one: benchmarks/compare_builds.py loads them beside these.)"""
    return limits_now.channel_bytes


cdef Py_ssize_t stream_min_bytes() noexcept nogil:
    """The smallest output (bytes) written with streaming stores."""
    return stream_bytes_limit


cdef Py_ssize_t rows_by_four_max_bytes() noexcept nogil:
    """The largest float32 array (bytes) whose row pass maps four rows at a time."""
    return rows_by_four_limit


cdef void note_streamed_pass() noexcept nogil:
    """Count an elementwise pass written with streaming stores (see streamed_passes)."""
    global streamed_count
    streamed_count += 1


def streamed_passes():
    """How many elementwise passes have written their output with streaming stores in this
    process: bench runs a case once and looks whether the count moved.  Calls on several
    threads at once may miss counts; it is a diagnostic, never a switch."""
    return streamed_count


def set_stream_min_bytes(nbytes):
    """Set the smallest output (bytes) the elementwise pass writes with streaming stores (0:
    every one); None restores the default, STREAM_MIN_BYTES."""
    global stream_bytes_limit
    if nbytes is None:
        nbytes = STREAM_MIN_BYTES
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int or None, got {nbytes!r}")
    stream_bytes_limit = nbytes


def set_rows_by_four_max_bytes(nbytes):
    """Set the largest float32 array (bytes) whose row pass maps four rows at a time (0:
    none, one row at a time everywhere: the same bits); None restores the default,
    ROWS_BY_FOUR_MAX_BYTES."""
    global rows_by_four_limit
    if nbytes is None:
        nbytes = ROWS_BY_FOUR_MAX_BYTES
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes < 2 ** 62:
        raise ValueError(f"nbytes must be an int of at least 0 and below 2**62, or None, got {nbytes!r}")
    rows_by_four_limit = nbytes


def default_fusion_limits():
    """This CPU's fusion limits (a new dict: see INTEL_FUSION and the module's docstring)."""
    return dict(INTEL_FUSION if fastbn_cpu_is_intel() else OTHER_FUSION)


def current_fusion_limits():
    """The fusion limits now in force, as a dict like default_fusion_limits()'s."""
    return dict(limits_now)


def set_fusion_limits(limits=None):
    """Set the fusion limits: a mapping with some or all of default_fusion_limits()'s keys
    (the others keep their current values), or None for this CPU's defaults.  Checked whole
    before any of them changes."""
    global limits_now
    merged = current_fusion_limits() if limits is not None else default_fusion_limits()
    if limits is not None:
        if not isinstance(limits, Mapping):
            raise TypeError(f"limits must be a mapping or None, got {type(limits).__name__}")
        unknown = sorted(set(limits) - set(merged))
        if unknown:
            raise ValueError(f"unknown fusion limits {unknown}; known: {sorted(merged)}")
        merged.update(limits)
    for key, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 62:
            raise ValueError(f"{key} must be an int of at least 0 and below 2**62, got {value!r}")
    limits_now = merged


set_fusion_limits(None)


def fusion_is_enabled():
    """Whether the channel- and tile-fused passes may run now (see set_fusion)."""
    return fusion_enabled


def force_layout(name):
    """Force the 'planar' or 'columns' layout for every shape, or None to choose by shape."""
    global forced_layout
    if name not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS, key=str)}, got {name!r}")
    forced_layout = LAYOUTS[name]


def set_fusion(enabled):
    """Allow (True) or forbid (False) the fused passes."""
    global fusion_enabled
    fusion_enabled = bool(enabled)

