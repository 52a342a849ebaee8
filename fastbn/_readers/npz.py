"""``.npz`` archives: a zip of ``.npy`` members, parsed here rather than by ``np.load``.

np.load trusts a member's header: it allocates the array the header describes before reading
a byte (7 TiB from a header of 100 bytes), and its parser of old headers raises errors of
its own (tokenize.TokenError).  Here the header is parsed with ``ast.literal_eval`` after its
length is bounded, the array's bytes must be exactly what the member holds, and only then is
anything allocated; object arrays are refused (fastbn never unpickles), as np.load's
``allow_pickle=False`` does.  The arrays come back as np.load returns them (C or Fortran
order, each owning its data), in native byte order.
"""

import ast
import math

import numpy as np

from .errors import CheckpointError, addressable, excerpt, shown, shown_dims

_MAGIC = b"\x93NUMPY"

#: The longest header read, as np.load's default ``max_header_size``.
MAX_HEADER_SIZE = 10_000

# The bytes that give the header's length, by format version; versions 1 and 2 are latin-1
# text, version 3 UTF-8 (numpy writes it for field names outside latin-1).
_LENGTH_BYTES = {1: 2, 2: 4, 3: 4}


def _header(data, where):
    """(dtype, shape, fortran_order, offset of the array's bytes) of a .npy member."""
    if data[:6] != _MAGIC or len(data) < 8:
        raise CheckpointError(f"{where} is not a .npy array (it does not start with numpy's "
                              f"magic string)")
    major = data[6]
    if major not in _LENGTH_BYTES:
        raise CheckpointError(f"{where}: .npy format version {major}.{data[7]} is not one numpy "
                              f"writes (1.0, 2.0, 3.0)")
    width = _LENGTH_BYTES[major]
    length = int.from_bytes(data[8:8 + width], "little")
    start = 8 + width
    if length > MAX_HEADER_SIZE:
        raise CheckpointError(f"{where}: .npy header of {length} bytes (at most "
                              f"{MAX_HEADER_SIZE} are read)")
    if start + length > len(data):
        raise CheckpointError(f"{where}: truncated .npy header")
    raw = data[start:start + length]
    try:
        header = ast.literal_eval(raw.decode("utf-8" if major == 3 else "latin-1"))
    except Exception as exc:  # UnicodeDecodeError, SyntaxError, ValueError, MemoryError, ...
        raise CheckpointError(f"{where}: unreadable .npy header {shown(raw, 80)}: "
                              f"{excerpt(exc)}") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise CheckpointError(f"{where}: a .npy header is a dict of 'descr', 'fortran_order' and "
                              f"'shape', not {shown(header, 80)}")
    shape, fortran = header["shape"], header["fortran_order"]
    if (not isinstance(shape, tuple) or len(shape) > 64
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise CheckpointError(f"{where}: shape {shown(shape, 80)} is not a tuple of at most 64 "
                              f"non-negative ints")
    if not isinstance(fortran, bool):
        raise CheckpointError(f"{where}: fortran_order {shown(fortran, 20)} is not a bool")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except Exception as exc:
        raise CheckpointError(f"{where}: dtype {shown(header['descr'], 80)} is not one numpy "
                              f"reads: {excerpt(exc)}") from None
    if dtype.hasobject:
        raise CheckpointError(f"{where} is an object array, which would be unpickled: fastbn "
                              f"never unpickles .npz members")
    if dtype.itemsize == 0 or dtype.subdtype is not None:
        # (numpy widens zero-size items, 'S0' to 'S1', and moves a subarray dtype's shape
        # into the array's: an array of other bytes than the header says)
        raise CheckpointError(f"{where}: dtype {shown(header['descr'], 80)} has "
                              f"{'zero-size items' if dtype.itemsize == 0 else 'a subarray shape'}, "
                              f"which fastbn does not read")
    if not addressable(shape, dtype.itemsize):
        raise CheckpointError(f"{where}: an array of shape {shown_dims(shape)} is too large to "
                              f"address")
    return dtype, shape, fortran, start + length


def _array(data, where):
    dtype, shape, fortran, offset = _header(data, where)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if offset + nbytes != len(data):
        raise CheckpointError(f"{where}: an array of shape {shown_dims(shape)} and dtype {dtype} takes "
                              f"{nbytes} bytes, but the member holds {len(data) - offset} after "
                              f"its header")
    native = dtype.newbyteorder("=") if dtype.byteorder not in "|=" else dtype
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    view = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    return view.astype(native, order="K")  # (a copy of its own, writable, as np.load's)


def read_npz(members):
    """The arrays of the ``.npz`` archive in ``members`` (a ZipMembers whose names all end
    in ``.npy``), by name without the suffix, in the archive's order.

    No bfloat16 choice: .npy has no bfloat16 type code (numpy writes an ml_dtypes.bfloat16
    array as 2-byte void, '|V2'), so nothing in an .npz is known to be bfloat16.
    """
    arrays = {}
    for name in members.names:
        where = f"{members.path}: member {shown(name, 80)}"
        arrays[name[:-len(".npy")]] = _array(members.read(name), where)
    return arrays
