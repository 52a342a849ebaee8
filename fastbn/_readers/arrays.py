"""Arrays from storage bytes: the unpickled tree with each placeholder replaced by numpy data.

Each array is a copy that owns its data, so the arrays of a file can hold more bytes than its
storages: an expanded tensor (torch's ``expand``, a stride of 0) of one stored element, or a
storage viewed by many tensors.  The total is bounded (``ExpansionBudget``): at most
``max_expansion`` times the bytes of the storages read, plus ``EXPANSION_ALLOWANCE``.
"""

import collections
import math
from collections.abc import Mapping

import numpy as np

from .elements import STORED
from .errors import CheckpointError, shown, shown_dims
from .placeholders import Storage, StorageType, Tensor, TorchDtype

#: Bytes the arrays of a file may always take, whatever ``max_expansion`` says: a small file
#: may expand a few values into an array of some megabytes.
EXPANSION_ALLOWANCE = 64 * 2**20

#: The default of ``max_expansion``: enough for every array to be a copy of its storage
#: twice over (tied weights saved as two views of one storage, bfloat16 widened to float32).
DEFAULT_MAX_EXPANSION = 8


def _size_text(nbytes):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


class ExpansionBudget:
    """Counts the bytes of the storages read and of the arrays built from them, and refuses
    an array that would take the arrays past ``max_expansion`` times the storages (None: no
    bound) plus ``EXPANSION_ALLOWANCE``, before it is allocated."""

    def __init__(self, max_expansion):
        self.max_expansion = max_expansion
        self.stored = 0
        self.built = 0

    def add_storage(self, nbytes):
        self.stored += nbytes

    def charge(self, tensor, nbytes):
        self.built += nbytes
        if self.max_expansion is None:
            return
        allowed = self.max_expansion * self.stored + EXPANSION_ALLOWANCE
        if self.built > allowed:
            raise CheckpointError(
                f"the arrays would take more than {_size_text(self.built)} from "
                f"{_size_text(self.stored)} of stored data, beyond max_expansion="
                f"{self.max_expansion:g} times it plus {_size_text(EXPANSION_ALLOWANCE)}; the "
                f"tensor of size {shown_dims(tensor.size)} and stride {shown_dims(tensor.stride)} on storage "
                f"{shown(tensor.storage.key, 40)} takes {_size_text(nbytes)} (an expanded "
                f"tensor, or a storage viewed many times). Pass a larger max_expansion, or "
                f"None, to read it anyway")


def _array_bytes(tensor, bf16):
    """The bytes ``build_array`` allocates for ``tensor``'s array."""
    if tensor.element == "bfloat16":
        itemsize = 4 if bf16 is None else 2
    else:
        itemsize = np.dtype(STORED[tensor.element]).itemsize
    return math.prod(tensor.size) * itemsize


def finish(view, element, bf16=None):
    """A C-contiguous, native-endian copy of ``view`` as its dtype (bfloat16: as ``bf16``, or
    widened to float32 if None)."""
    if element == "bfloat16":
        if bf16 is not None:
            # The stored bits, reordered to native uint16, reinterpreted: never through a
            # float, which could quieten a signalling NaN or depend on ml_dtypes' rounding.
            return view.astype(np.uint16, order="C").view(bf16)
        # A bfloat16 is the high 16 bits of the float32 with the same value.
        wide = view.astype(np.uint32, order="C")
        wide <<= 16
        return wide.view(np.float32)
    if element == "bool":
        # Into an array of our own: on a 0-d view, != returns a numpy scalar, not an array.
        return np.not_equal(view, 0, out=np.empty(view.shape, dtype=bool))
    return view.astype(view.dtype.newbyteorder("="), order="C")


def build_array(tensor, raw, byteorder, bf16=None):
    """Build a tensor's array from its storage bytes.  ``checked_tensor`` checked the tensor against
    its storage record; it is checked here again against the bytes actually at hand, so that
    no view reaches past them whatever a reader of a format returned."""
    stored = np.dtype(STORED[tensor.element]).newbyteorder(byteorder)
    flat = np.frombuffer(raw, dtype=stored, count=len(raw) // stored.itemsize)
    if 0 in tensor.size:
        last = tensor.offset - 1
    else:
        last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if last >= flat.size:
        raise CheckpointError(f"tensor of size {shown_dims(tensor.size)} and stride {shown_dims(tensor.stride)} at "
                              f"offset {tensor.offset} reaches element {last} of storage "
                              f"{shown(tensor.storage.key, 40)}, which holds {flat.size}")
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset:], shape=tensor.size,
        strides=tuple(s * stored.itemsize for s in tensor.stride), writeable=False)
    array = finish(view, tensor.element, bf16)
    if tensor.conj and array.dtype.kind == "c":
        np.conjugate(array, out=array)
    if tensor.neg:
        if bf16 is not None and array.dtype == bf16:  # the sign bit itself, as torch flips it
            np.bitwise_xor(array.view(np.uint16), 0x8000, out=array.view(np.uint16))
        else:
            np.negative(array, out=array)
    return array


def materialise(tree, read_storage, byteorder, bf16=None, max_expansion=DEFAULT_MAX_EXPANSION):
    """The unpickled tree with each placeholder replaced by an array (bfloat16 ones as
    ``bf16``, or float32 if None).

    Containers are rebuilt (shared and self-referencing ones stay so); only the plain types
    pickle makes from opcodes and the allowed globals may appear.
    """
    memo = {}
    raw_of = {}
    budget = ExpansionBudget(max_expansion)

    def raw(storage):
        if storage.key not in raw_of:
            raw_of[storage.key] = read_storage(storage)
            budget.add_storage(len(raw_of[storage.key]))
        return raw_of[storage.key]

    def array(tensor):
        data = raw(tensor.storage)
        budget.charge(tensor, _array_bytes(tensor, bf16))
        return build_array(tensor, data, byteorder, bf16)

    def convert(obj):
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            return obj
        done = memo.get(id(obj))
        if done is not None:
            return done[1]
        if isinstance(obj, Tensor):
            result = array(obj)
        elif isinstance(obj, Storage):  # a storage saved on its own: its elements, flat
            result = array(Tensor(obj, 0, (obj.numel,), (1,), obj.element))
        elif isinstance(obj, (TorchDtype, StorageType)):
            result = repr(obj)  # "torch.float32"
        elif type(obj) in (dict, collections.OrderedDict):
            result = type(obj)()
            memo[id(obj)] = (obj, result)
            for k, v in obj.items():
                result[convert(k)] = convert(v)
            metadata = getattr(obj, "__dict__", {}).get("_metadata")
            if isinstance(metadata, Mapping):  # torch's per-module state_dict versions
                result._metadata = convert(metadata)
        elif type(obj) is list:
            result = []
            memo[id(obj)] = (obj, result)
            result.extend(convert(v) for v in obj)
        elif type(obj) is tuple:
            items = tuple(convert(v) for v in obj)
            if id(obj) in memo:  # built while converting its items (a cycle through a list)
                return memo[id(obj)][1]
            result = items
        elif type(obj) in (set, frozenset):
            result = type(obj)(convert(v) for v in obj)
        elif type(obj) is bytearray:
            result = bytearray(obj)
        else:
            raise CheckpointError(f"the checkpoint holds a {type(obj).__name__} object, which "
                                  f"is not data fastbn can return")
        memo[id(obj)] = (obj, result)  # obj kept alive so that its id stays unique
        return result

    try:
        return convert(tree)
    except RecursionError:
        raise CheckpointError("the checkpoint's objects are nested too deeply to convert") from None
