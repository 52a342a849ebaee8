"""The exceptions the checkpoint readers raise, and how values from a file are shown in them."""

import pickle

__all__ = ["UnsafeCheckpointError", "shown"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's pickle names a global that is not on the allow-list.

    The reader refuses it when the pickle names it, before calling anything, so nothing in
    the file has run.  The message names the global (``'posix.system'``).
    """


def shown(value, limit=60):
    """A short, bounded description of a value taken from a file, for messages: strings and
    bytes are cut before repr, numbers too long to print and containers are described, never
    expanded (repr of a shared, nested structure can take exponential time and memory)."""
    if isinstance(value, (str, bytes, bytearray)):
        text = repr(value[:limit])
        return text if len(value) <= limit else f"{text}... ({len(value)} long)"
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, (tuple, list, dict, set, frozenset)):
        return f"<{type(value).__name__} of {len(value)} items>"
    if getattr(type(value), "placeholder", False):
        return repr(value)  # (the placeholders of .placeholders print a fixed, short text)
    return f"<{type(value).__name__}>"
