"""Process-wide switches that tests and tuning set on the kernels: a forced layout, fusion, the
largest planar channel that is fused, and the smallest output written with streaming stores.

The kernels are compiled once per SIMD level (setup.py), but these switches live here, once,
so that every variant reads the same state and none holds mutable state of its own.  They are
not for production use: a switch affects every call in the process while it is set, and the
results must not depend on it (both layouts give the same results to rounding; fused and
unfused passes give the same bits).

The one default that depends on the machine is how large a planar channel may be and still be
processed whole (statistics, then normalisation from cache; see _engine/geometry.pxi).  It
was measured on two CPUs: on an Intel Xeon (2 MiB L2) channels of up to 1 MiB were faster
fused -- training forwards at 0.77-0.93 of the three-pass floor, which separate passes cannot
reach -- while on an AMD EPYC (Zen 4, 1 MiB L2) channels of 25 KB-1 MB went 1.1-2x slower fused
than streaming through separate passes, and only those of 1-16 KiB gained.  So Intel CPUs fuse
up to 1 MiB, others up to 16 KiB.  This module is compiled without ISA flags, like _cpu.

The elementwise pass writes a float32 planar output of at least STREAM_MIN_BYTES with
streaming stores (past the caches; _engine/simd/affine.h), the same values either way.
Measured on the AMD EPYC (Zen 4, 32 MiB L3), one thread: the affine map of a float32 array in
C, ordinary stores 59/52/33/22 GB/s at 4/8/16/64 MiB of output, streaming ones 51/50/47/34
GB/s -- ordinary stores win while input and output fit in the L3 together, streaming ones
beyond; fastbn's eval and training forward into a given `out`, ordinary/streaming, 0.97x and
1.08x at 12 MiB, 1.25x and 1.19x at 24.5 MiB, 1.51x and 1.22x at 98 MiB.  Hence 16 MiB.  (Into
a fresh output, as the modules return, the kernel's zeroing of the new pages costs the same
either way: 0.93-1.17x, within the noise at 98 MiB.)
"""

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

#: Largest planar channel (bytes per array) fused on CPUs where that was measured to pay, and
#: elsewhere (see the module's docstring).
LARGE_FUSED_CHANNEL_BYTES = 1024 * 1024
SMALL_FUSED_CHANNEL_BYTES = 16 * 1024

#: The smallest float32 output (bytes) the elementwise pass writes with streaming stores.
STREAM_MIN_BYTES = 16 * 1024 * 1024

# 0: choose the layout by shape, 1: planar, 2: columns.
cdef int forced_layout = 0
cdef bint fusion_enabled = True
cdef Py_ssize_t channel_bytes_limit = (LARGE_FUSED_CHANNEL_BYTES if fastbn_cpu_is_intel()
                                       else SMALL_FUSED_CHANNEL_BYTES)
cdef Py_ssize_t stream_bytes_limit = STREAM_MIN_BYTES
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


cdef Py_ssize_t fused_channel_bytes() noexcept nogil:
    """The largest planar channel (bytes per array) that is processed whole."""
    return channel_bytes_limit


cdef Py_ssize_t stream_min_bytes() noexcept nogil:
    """The smallest output (bytes) written with streaming stores."""
    return stream_bytes_limit


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


def default_fused_channel_bytes():
    """This CPU's default largest fused planar channel, in bytes per array."""
    return LARGE_FUSED_CHANNEL_BYTES if fastbn_cpu_is_intel() else SMALL_FUSED_CHANNEL_BYTES


def current_fused_channel_bytes():
    """The largest planar channel (bytes per array) now processed whole."""
    return channel_bytes_limit


def fusion_is_enabled():
    """Whether the channel- and tile-fused passes may run now (see set_fusion)."""
    return fusion_enabled


def set_fused_channel_bytes(nbytes):
    """Set the largest planar channel (bytes per array) that is processed whole; None restores
    this CPU's default."""
    global channel_bytes_limit
    if nbytes is None:
        nbytes = default_fused_channel_bytes()
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int or None, got {nbytes!r}")
    channel_bytes_limit = nbytes


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

