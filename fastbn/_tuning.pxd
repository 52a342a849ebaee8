# The kernels' process-wide tuning switches (fastbn/_tuning.pyx), read by every SIMD variant.
cdef int layout_override() noexcept nogil
cdef bint fusion_allowed() noexcept nogil

# Which training passes are fused, in bytes per array (see the module's docstring).
cdef struct FusionLimits:
    Py_ssize_t channel_bytes
    Py_ssize_t short_piece_bytes
    Py_ssize_t short_pieces_array_bytes
    Py_ssize_t tile_bytes
    Py_ssize_t serial_tile_bytes
    Py_ssize_t serial_tile_array_bytes

cdef const FusionLimits* fusion_limits() noexcept nogil
cdef Py_ssize_t fused_channel_bytes() noexcept nogil
cdef Py_ssize_t stream_min_bytes() noexcept nogil
cdef Py_ssize_t rows_by_four_max_bytes() noexcept nogil
cdef void note_streamed_pass() noexcept nogil
