"""The exceptions the checkpoint readers raise, and how values from a file are shown in them.

The contract: reading a file fails with :class:`CheckpointError` (malformed, truncated, or
holding what fastbn does not read) or its subclass :class:`UnsafeCheckpointError` (refused on
purpose), each naming the file -- never with another exception, whatever the file holds.
``fastbn.checkpoint.read_checkpoint`` enforces it at one place (``as_checkpoint_error``); a
failure that no reader foresaw comes out as :class:`UnforeseenCheckpointError`, so that the
fuzz harnesses (tests/fuzz/) can tell it from a refusal with a message of its own.
"""

import pickle

__all__ = ["CheckpointError", "UnsafeCheckpointError", "UnforeseenCheckpointError",
           "addressable", "as_checkpoint_error", "excerpt", "shown", "shown_dims"]


class CheckpointError(ValueError):
    """A file that fastbn cannot read as a checkpoint: not one of the formats it reads,
    truncated or corrupt, inconsistent with itself, beyond a documented bound, or holding
    something fastbn does not read (a quantized tensor, an ``.npz`` object array).

    A ValueError, so code written for the errors of earlier fastbn versions still catches it.
    The message starts with the file's path and says what was wrong.
    """


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint's pickle names a global that is not on the allow-list.

    The reader refuses it when the pickle names it, before calling anything, so nothing in
    the file has run.  The message names the global (``'posix.system'``).  Also a
    ``pickle.UnpicklingError``, as it was before :class:`CheckpointError` existed.
    """


class UnforeseenCheckpointError(CheckpointError):
    """A failure no reader check foresaw (a bug to report: the message and the chained
    exception say what it was), still a :class:`CheckpointError` for the caller."""


def as_checkpoint_error(exc, path):
    """``exc``, raised while reading ``path``, as the error the contract promises: a
    CheckpointError (or its subclass) whose message starts with the path.

    The readers raise CheckpointError for what they check, and the unpickler wraps what the
    pickle machine raises; anything else is unforeseen, and kept as the cause.
    """
    if isinstance(exc, CheckpointError):
        if str(exc).startswith(f"{path}"):
            return exc
        again = type(exc)(f"{path}: {exc}")  # (the checks below the formats lack the path)
        again.__cause__ = exc.__cause__
        return again
    what = "not enough memory" if isinstance(exc, MemoryError) else "unforeseen error"
    error = UnforeseenCheckpointError(f"{path}: could not be read ({what}: {excerpt(exc)})")
    error.__cause__ = exc
    return error


def excerpt(exc, limit=200):
    """``"TypeError: what it said"``, cut to ``limit`` characters: for an exception raised by
    a library (zipfile, zlib, numpy) on the file's bytes, quoted in a message of ours."""
    text = str(exc)
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def shown_dims(dims, limit=8):
    """A shape or strides from a file, for messages: its first `limit` entries, each shown."""
    text = ", ".join(shown(d) for d in dims[:limit])
    more = f", ... ({len(dims)} in all)" if len(dims) > limit else ("," if len(dims) == 1 else "")
    return f"({text}{more})"


def addressable(shape, itemsize):
    """Whether numpy can hold an array of `shape` (ints >= 0) and `itemsize`: as numpy counts,
    the product of the dimensions that are not 0, times the itemsize, below 2**63."""
    total = max(itemsize, 1)
    for d in shape:
        if d:
            total *= d
            if total >= 2**63:
                return False
    return True


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
