"""Arrays from storage bytes: the unpickled tree with each placeholder replaced by numpy data."""

import collections
from collections.abc import Mapping

import numpy as np

from .elements import STORED
from .placeholders import Storage, StorageType, Tensor, TorchDtype

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
        raise ValueError(f"tensor of size {tensor.size} and stride {tensor.stride} at offset "
                         f"{tensor.offset} reaches element {last} of storage "
                         f"'{tensor.storage.key}', which holds {flat.size}")
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


def materialise(tree, read_storage, byteorder, bf16=None):
    """The unpickled tree with each placeholder replaced by an array (bfloat16 ones as
    ``bf16``, or float32 if None).

    Containers are rebuilt (shared and self-referencing ones stay so); only the plain types
    pickle makes from opcodes and the allowed globals may appear.
    """
    memo = {}
    raw_of = {}

    def raw(storage):
        if storage.key not in raw_of:
            raw_of[storage.key] = read_storage(storage)
        return raw_of[storage.key]

    def convert(obj):
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            return obj
        done = memo.get(id(obj))
        if done is not None:
            return done[1]
        if isinstance(obj, Tensor):
            result = build_array(obj, raw(obj.storage), byteorder, bf16)
        elif isinstance(obj, Storage):  # a storage saved on its own: its elements, flat
            whole = Tensor(obj, 0, (obj.numel,), (1,), obj.element)
            result = build_array(whole, raw(obj), byteorder, bf16)
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
            raise ValueError(f"the checkpoint holds a {type(obj).__name__} object, which is not "
                             f"data fastbn can return")
        memo[id(obj)] = (obj, result)  # obj kept alive so that its id stays unique
        return result

    try:
        return convert(tree)
    except RecursionError:
        raise ValueError("the checkpoint's objects are nested too deeply to convert") from None
