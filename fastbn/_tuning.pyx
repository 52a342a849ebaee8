"""Process-wide switches that tests and tuning set on the kernels: a forced layout and fusion.

The kernels are compiled once per SIMD level (setup.py), but these switches live here, once,
so that every variant reads the same state and none holds mutable state of its own.  They are
not for production use: a switch affects every call in the process while it is set, and the
results must not depend on it (both layouts give the same results to rounding; fused and
unfused passes give the same bits).
"""

# 0: choose the layout by shape, 1: planar, 2: columns.
cdef int forced_layout = 0
cdef bint fusion_enabled = True

LAYOUTS = {None: 0, "planar": 1, "columns": 2}


cdef int layout_override() noexcept nogil:
    """The forced layout (1 planar, 2 columns), or 0 to choose by shape."""
    return forced_layout


cdef bint fusion_allowed() noexcept nogil:
    """Whether the channel- and tile-fused passes may run."""
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

