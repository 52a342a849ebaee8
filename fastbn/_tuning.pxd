# The kernels' process-wide tuning switches (fastbn/_tuning.pyx), read by every SIMD variant.
cdef int layout_override() noexcept nogil
cdef bint fusion_allowed() noexcept nogil
cdef Py_ssize_t fused_channel_bytes() noexcept nogil
cdef Py_ssize_t stream_min_bytes() noexcept nogil
cdef void note_streamed_pass() noexcept nogil
