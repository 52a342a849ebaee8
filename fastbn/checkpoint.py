"""Loading PyTorch checkpoints without torch: ``torch.save`` files, safetensors and ``.npz``.

A ``torch.save`` file is a pickle that describes the saved object (dicts, tensors as calls to
torch's rebuild functions) and, beside it, the raw bytes of each tensor storage.  Unpickling
normally *imports and calls* whatever the pickle names, which is how a malicious checkpoint
runs code.  This reader never imports what the file names: :class:`_Unpickler` maps the few
globals a tensor state_dict needs to fastbn's own functions and refuses every other one with
:class:`UnsafeCheckpointError`, before anything is called.  The rebuild functions check
their arguments (storage offset, size and stride within the storage) and return inert
placeholders; arrays are built afterwards by numpy from the storage bytes.

Formats, recognised by their content:

* the zip format of ``torch.save`` (torch >= 1.6): ``<archive>/data.pkl`` plus
  ``<archive>/data/<key>`` storages and an optional ``<archive>/byteorder`` record;
* the legacy format (``_use_new_zipfile_serialization=False``): a magic number, a protocol
  version and system information, the object pickle, the list of storage keys, then each
  storage as an int64 element count followed by its bytes;
* safetensors (through the optional ``safetensors`` package: ``pip install fastbn[io]``);
* ``.npz`` archives, read with ``allow_pickle=False``.

Only numpy and the standard library are used; torch is never imported (nor ml_dtypes, unless
``bfloat16="keep"`` asks for ``ml_dtypes.bfloat16`` arrays rather than float32 ones).
"""

import collections
import io
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

from ._pickle_walk import check_structure

__all__ = ["UnsafeCheckpointError", "load_checkpoint", "read_checkpoint", "STATE_DICT_KEYS"]

#: Entries that ``load_checkpoint`` looks in, in this order, for the state_dict of a nested
#: checkpoint (``{"state_dict": ..., "epoch": 3}``), before it takes the top level itself.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER, legacy format
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's pickle names a global that is not on the allow-list.

    The reader refuses it when the pickle names it, before calling anything, so nothing in
    the file has run.  The message names the global (``'posix.system'``).
    """


# -- element types --------------------------------------------------------------------------

# How a torch dtype's elements are stored (before the archive's byte order is applied).
# bfloat16 has no numpy dtype: its 16 bits are the high half of a float32, and it is returned
# widened to float32 (exactly), or with bfloat16="keep" as ml_dtypes.bfloat16 over the same
# bits.  bool is stored as one byte, any non-zero byte reading True.
_STORED = {
    "float64": "f8", "float32": "f4", "float16": "f2", "bfloat16": "u2",
    "int64": "i8", "int32": "i4", "int16": "i2", "int8": "i1", "uint8": "u1", "bool": "u1",
    "uint16": "u2", "uint32": "u4", "uint64": "u8",
    "complex64": "c8", "complex128": "c16",
}

# torch's legacy typed-storage classes, as torch.save still names them, by element type.
# The quantized ones are known but not supported (the element is None).
_STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",  # bytes; _rebuild_tensor_v3 gives the tensor's dtype
    "QUInt8Storage": None, "QInt8Storage": None, "QInt32Storage": None,
    "QUInt4x2Storage": None, "QUInt2x4Storage": None,
}

# Names of torch dtype objects (torch.float32, torch.float8_e4m3fn, torch.quint8...).  They are
# only ever turned into a name marker, never resolved, so a loose pattern is safe here.
_DTYPE_NAME = re.compile(r"(bool|bfloat16|complex\d+|float\d+(_\w+)?|q?u?int\d+(x\d+)?|bits\d+(x\d+)?)")


def _itemsize(element):
    return np.dtype(_STORED[element]).itemsize


_BFLOAT16_CHOICES = ("float32", "keep")


def _bfloat16_dtype(bfloat16):
    """The dtype bfloat16 tensors are returned as for ``bfloat16=``: None (widen them to
    float32) or ``ml_dtypes.bfloat16`` (keep them).  Called before the file is opened, so that
    a bad value or a missing ml_dtypes fails first; ``import fastbn`` never imports ml_dtypes.
    """
    if not (isinstance(bfloat16, str) and bfloat16 in _BFLOAT16_CHOICES):
        raise ValueError(f"bfloat16 must be one of {', '.join(map(repr, _BFLOAT16_CHOICES))}, "
                         f"got {_shown(bfloat16, 60)}")
    if bfloat16 == "float32":
        return None
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("bfloat16='keep' needs the optional 'ml_dtypes' package (numpy's "
                          "bfloat16 dtype): pip install 'fastbn[bf16]' (or pip install "
                          "ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)


def _shown(value, limit=60):
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
    if isinstance(value, _Inert):
        return repr(value)  # (fastbn's placeholders print a fixed, short text)
    return f"<{type(value).__name__}>"


# -- placeholders the pickle builds ---------------------------------------------------------

class _Inert:
    """Base of the objects the unpickler hands to the pickle.  Pickle's BUILD opcode would
    set attributes on them (slot state included); refusing it keeps them as validated."""

    __slots__ = ()

    def __setstate__(self, state):
        raise ValueError(f"the pickle tries to set the state of a {self._what}")


class _StorageType(_Inert):
    """A torch storage class named by the pickle (``torch.FloatStorage``)."""

    __slots__ = ("name", "element")
    _what = "storage type"

    def __init__(self, name, element):
        self.name = name
        self.element = element

    def __repr__(self):
        return f"torch.{self.name}"


class _TorchDtype(_Inert):
    """A torch dtype object named by the pickle (``torch.float32``)."""

    __slots__ = ("name",)
    _what = "dtype"

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"torch.{self.name}"

    def __eq__(self, other):
        return isinstance(other, _TorchDtype) and other.name == self.name

    def __hash__(self):
        return hash(("torch dtype", self.name))


class _Storage(_Inert):
    """A storage record: ``numel`` elements of ``element`` in the archive's member ``key``."""

    __slots__ = ("key", "element", "numel")
    _what = "storage"
    __hash__ = None  # type: ignore[assignment]  # pickle must not put one in a set or use it as a dict key

    def __init__(self, key, element, numel):
        self.key = key
        self.element = element
        self.numel = numel

    @property
    def nbytes(self):
        return self.numel * _itemsize(self.element)


class _Tensor(_Inert):
    """A tensor to build: ``size`` and ``stride`` (in elements of ``element``) from element
    ``offset`` of ``storage``; ``conj``/``neg`` are torch's lazy conjugate and negative bits."""

    __slots__ = ("storage", "offset", "size", "stride", "element", "conj", "neg")
    _what = "tensor"
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, storage, offset, size, stride, element, conj=False, neg=False):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride
        self.element = element
        self.conj = conj
        self.neg = neg


def _count(value, what):
    """A non-negative Python int (pickle gives ints; bool is refused as a count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {type(value).__name__} {_shown(value, 60)}")
    if value < 0:
        raise ValueError(f"{what} must be non-negative, got {value}")
    return value


def _shape(value, what):
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{what} must be a tuple of ints, got {type(value).__name__} {_shown(value, 60)}")
    return tuple(_count(v, what) for v in value)


def _tensor(storage, offset, size, stride, element, metadata=None):
    """Check a tensor's geometry against its storage and return its placeholder.

    Checked here, as the pickle is read, so that a crafted file cannot make numpy read outside
    the storage later: every element the tensor addresses, ``offset + sum(i_k * stride_k)``
    for ``0 <= i_k < size_k``, must lie in the storage.
    """
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor's storage must be a storage record, got {type(storage).__name__}")
    offset = _count(offset, "storage_offset")
    size = _shape(size, "size")
    stride = _shape(stride, "stride")
    if len(size) != len(stride):
        raise ValueError(f"size {size} and stride {stride} have different lengths")
    if len(size) > 64:
        raise ValueError(f"a tensor of {len(size)} dimensions; numpy allows 64")
    itemsize = _itemsize(element)
    # (each size too: an empty tensor's product is 0 whatever its other sizes, and numpy
    # refuses a dimension of 2**63 bytes)
    if (max(stride, default=0) * itemsize >= 2**63 or max(size, default=0) * itemsize >= 2**63
            or np.prod(size, dtype=object) * itemsize >= 2**63):
        raise ValueError(f"tensor of size {size} and stride {stride} is too large to address")
    conj = neg = False
    if metadata:
        if not isinstance(metadata, dict) or set(metadata) - {"conj", "neg"}:
            raise ValueError(f"unsupported tensor metadata {_shown(metadata, 80)} (fastbn knows 'conj' and 'neg')")
        conj = metadata.get("conj", False) is True
        neg = metadata.get("neg", False) is True
        if neg and element == "bool":
            raise ValueError("a bool tensor with torch's negative bit set (torch never writes one)")
    capacity = storage.nbytes // itemsize  # whole elements of this dtype
    if 0 in size:
        last = offset - 1  # addresses nothing; the offset may point just past the end
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= capacity:
        raise ValueError(f"tensor of size {size} and stride {stride} at storage offset {offset} "
                         f"reaches element {last}, out of bounds of its storage '{storage.key}' "
                         f"of {capacity} {element} elements")
    return _Tensor(storage, offset, size, stride, element, conj, neg)


# The functions the allowed torch globals stand for.  Each takes the arguments torch's
# function of the same name takes, positionally, as the pickle passes them.

def _rebuild_tensor(storage, storage_offset, size, stride):
    element = storage.element if isinstance(storage, _Storage) else None
    return _tensor(storage, storage_offset, size, stride, element)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    # requires_grad and the (always empty) backward hooks mean nothing to an array.
    element = storage.element if isinstance(storage, _Storage) else None
    return _tensor(storage, storage_offset, size, stride, element, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    # torch >= 2.3 writes tensors of its newer dtypes (uint16, float8...) as an untyped
    # (byte) storage plus the dtype; offset, size and stride count elements of that dtype.
    if not isinstance(dtype, _TorchDtype):
        raise ValueError(f"_rebuild_tensor_v3 expects a torch dtype, got {type(dtype).__name__}")
    if dtype.name not in _STORED:
        raise ValueError(f"tensors of dtype torch.{dtype.name} are not supported (supported: "
                         f"{', '.join(sorted(_STORED))})")
    return _tensor(storage, storage_offset, size, stride, dtype.name, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, _Tensor):
        raise ValueError(f"a Parameter must wrap a tensor, got {type(data).__name__}")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    # state holds Python attributes set on the Parameter; an array has no use for them.
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _torch_size(sizes=()):
    return _shape(sizes, "torch.Size")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise ValueError(f"torch.device({_shown(kind, 40)}, {_shown(index, 40)}) is not a device")
    return kind if index is None or ":" in kind else f"{kind}:{index}"


def _bytearray(source=b"", *encoding):
    # bytearray(str, "latin-1") (protocol 2) or bytearray(bytes); never bytearray(n), which
    # would allocate n bytes on the file's say, and no other codec (some take time out of
    # proportion to their input: punycode).
    if not isinstance(source, (str, bytes, bytearray)):
        raise ValueError(f"bytearray() is only allowed from text or bytes, got {type(source).__name__}")
    if isinstance(source, str):
        if len(encoding) != 1 or encoding[0] not in ("latin1", "latin-1"):
            raise ValueError(f"bytearray() of text is only allowed with 'latin-1', got "
                             f"{', '.join(_shown(e, 20) for e in encoding) or 'no encoding'}")
    elif encoding:
        raise ValueError("bytearray() of bytes takes no encoding")
    return bytearray(source, *encoding)


def _latin1_encode(text, encoding):
    # Pickle protocol 2 writes bytes as _codecs.encode(text, "latin1"); no other codec.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode is only allowed for latin1 text, got {_shown(encoding, 40)}")
    return text.encode("latin1")


class _Allowed(_Inert):
    """One of fastbn's functions as a pickle may call it (REDUCE), and nothing else: pickle's
    BUILD opcode, which would set the attributes of what it is applied to -- a function's
    ``__defaults__`` or ``__code__`` among them, changing every later load in the process --
    meets _Inert's refusal instead, and there is no ``__dict__`` to write into."""

    __slots__ = ("_function",)
    _what = "function"

    def __init__(self, function):
        self._function = function

    def __call__(self, *args):
        return self._function(*args)

    def __repr__(self):
        return f"<allowed {self._function.__name__}>"


def _allowed_globals():
    # Python functions only behind _Allowed; the classes named (OrderedDict, set, frozenset,
    # complex) are built-in types, whose attributes no pickle can set.
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _Allowed(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _Allowed(_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): _Allowed(_rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _Allowed(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Allowed(_rebuild_parameter_with_state),
        ("torch", "Size"): _Allowed(_torch_size),
        ("torch", "device"): _Allowed(_torch_device),
        ("_codecs", "encode"): _Allowed(_latin1_encode),
    }
    # Containers pickle protocol 2 writes by reference; Python 2's module name too.
    for module in ("builtins", "__builtin__"):
        for name, value in (("set", set), ("frozenset", frozenset), ("complex", complex),
                            ("bytearray", _Allowed(_bytearray))):
            allowed[module, name] = value
    # torch.FloatStorage...; torch.cuda.FloatStorage in old legacy files saved from a GPU;
    # torch.storage.UntypedStorage as torch 2 writes it.
    for name, element in _STORAGE_TYPES.items():
        for module in ("torch", "torch.cuda"):
            allowed[module, name] = _StorageType(name, element)
    allowed["torch.storage", "UntypedStorage"] = allowed["torch", "UntypedStorage"]
    return allowed


_ALLOWED = _allowed_globals()

# Why a torch global that is refused is not loaded, for the message.
_REFUSED_HINTS = (
    ("torch._utils._rebuild_sparse", "sparse tensors are not supported"),
    ("torch._utils._rebuild_qtensor", "quantized tensors are not supported"),
    ("torch._utils._rebuild_nested", "nested tensors are not supported"),
    ("torch._utils._rebuild_wrapper_subclass", "tensor subclasses are not supported"),
    ("torch._tensor._rebuild_from_type", "tensor subclasses and tensors with Python attributes "
     "are not supported"),
    ("torch.nn.", "this looks like a whole pickled model (torch.save(model)): save "
     "model.state_dict() instead"),
    ("__main__.", "this looks like a pickled object of a user class: save tensors, dicts and "
     "plain Python values only"),
)


class _Unpickler(pickle.Unpickler):
    """pickle.Unpickler with an allow-list instead of imports.

    ``find_class`` is where pickle resolves every global it names (the GLOBAL, STACK_GLOBAL
    and INST opcodes, and the extension registry), so refusing there refuses ``os.system``,
    ``builtins.eval``, ``getattr`` chains and any class's ``__reduce__`` before it is called.
    ``persistent_load`` turns torch's storage records into :class:`_Storage` placeholders.
    """

    def __init__(self, file, path, legacy=False):
        super().__init__(file)
        self.file = file
        self._path = path
        self._legacy = legacy
        self.storages = {}  # key -> _Storage

    def find_class(self, module, name):
        # Only exact (module, name) pairs: no attribute paths, no Python 2 name mapping.
        found = _ALLOWED.get((module, name))
        if found is None and module == "torch" and _DTYPE_NAME.fullmatch(name):
            found = _TorchDtype(name)
        if found is not None:
            return found
        qualname = f"{module}.{name}"
        hint = next((f"; {why}" for start, why in _REFUSED_HINTS if qualname.startswith(start)), "")
        raise UnsafeCheckpointError(
            f"refusing to load global '{qualname}' from {self._path}: fastbn only unpickles what "
            f"a tensor state_dict needs (torch's tensor and parameter rebuild functions, storage "
            f"types, dtypes, torch.Size, OrderedDict and plain containers){hint}. Nothing from "
            f"the checkpoint was run.")

    def persistent_load(self, pid):
        length = 6 if self._legacy else 5
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            if isinstance(pid, tuple) and pid and pid[0] == "module":
                raise ValueError("the checkpoint holds a pickled nn.Module class (a whole model "
                                 "saved with torch.save(model)); save model.state_dict() instead")
            raise ValueError(f"unknown persistent record {_shown(pid, 80)} (expected a storage record)")
        if len(pid) != length:
            raise ValueError(f"a storage record has {len(pid)} fields, expected {length}: {_shown(pid, 120)}")
        storage_type, key, _location, numel = pid[1:5]  # the device is irrelevant to numpy
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"unknown storage type {_shown(storage_type, 60)} in storage record {_shown(key, 40)}")
        if storage_type.element is None:
            raise ValueError(f"storage type torch.{storage_type.name} is not supported (quantized "
                             f"storage); supported: " + ", ".join(
                                 f"torch.{n}" for n, e in _STORAGE_TYPES.items() if e))
        if not isinstance(key, str) or not key:
            raise ValueError(f"a storage key must be a non-empty string, got {_shown(key, 40)}")
        numel = _count(numel, f"the element count of storage '{key}'")
        if self._legacy and pid[5] is not None:
            raise ValueError("the checkpoint uses storage views (written by torch < 0.4), which "
                             "fastbn does not read; re-save it with a recent torch")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type.element, numel)
        elif (storage.element, storage.numel) != (storage_type.element, numel):
            raise ValueError(f"storage '{key}' is recorded both as {storage.numel} {storage.element} "
                             f"and as {numel} {storage_type.element} elements")
        return storage


def _unpickle(unpickler, path, what):
    """Run the unpickler; every failure but a refused global is a ValueError naming the file."""
    check_structure(unpickler.file, path, what)
    try:
        return unpickler.load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # truncated or malformed pickle, failed checks in rebuild calls
        raise ValueError(f"{path}: could not read {what}: {exc}") from exc


# -- building arrays ------------------------------------------------------------------------

def _finish(view, element, bf16=None):
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


def _array(tensor, raw, byteorder, bf16=None):
    """Build a tensor's array from its storage bytes.  ``_tensor`` checked the tensor against
    its storage record; it is checked here again against the bytes actually at hand, so that
    no view reaches past them whatever a reader of a format returned."""
    stored = np.dtype(_STORED[tensor.element]).newbyteorder(byteorder)
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
    array = _finish(view, tensor.element, bf16)
    if tensor.conj and array.dtype.kind == "c":
        np.conjugate(array, out=array)
    if tensor.neg:
        if bf16 is not None and array.dtype == bf16:  # the sign bit itself, as torch flips it
            np.bitwise_xor(array.view(np.uint16), 0x8000, out=array.view(np.uint16))
        else:
            np.negative(array, out=array)
    return array


def _materialise(tree, read_storage, byteorder, bf16=None):
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
        if isinstance(obj, _Tensor):
            result = _array(obj, raw(obj.storage), byteorder, bf16)
        elif isinstance(obj, _Storage):  # a storage saved on its own: its elements, flat
            whole = _Tensor(obj, 0, (obj.numel,), (1,), obj.element)
            result = _array(whole, raw(obj), byteorder, bf16)
        elif isinstance(obj, (_TorchDtype, _StorageType)):
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


# -- formats --------------------------------------------------------------------------------

def _read_torch_zip(archive, prefix, path, bf16=None):
    names = set(archive.namelist())
    if prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names):
        raise ValueError(f"{path} is a TorchScript archive (torch.jit.save), not a torch.save "
                         f"checkpoint: load it with torch.jit.load and save its state_dict() with "
                         f"torch.save")
    byteorder = "<"
    if prefix + "byteorder" in names:
        record = archive.read(prefix + "byteorder")
        if record not in (b"little", b"big"):
            raise ValueError(f"{path}: unknown byte order record {record[:20]!r} (expected "
                             f"b'little' or b'big')")
        byteorder = "<" if record == b"little" else ">"
    # (torch reads checkpoints without the record, written before it existed, as little-endian.)
    unpickler = _Unpickler(io.BytesIO(archive.read(prefix + "data.pkl")), path)
    tree = _unpickle(unpickler, path, f"{prefix}data.pkl")

    def read_storage(storage):
        name = f"{prefix}data/{storage.key}"
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise ValueError(f"{path}: storage '{storage.key}' has no member {name!r} in the "
                             f"archive") from None
        if info.file_size != storage.nbytes:
            raise ValueError(f"{path}: member {name!r} holds {info.file_size} bytes, but its "
                             f"storage record says {storage.numel} {storage.element} elements "
                             f"({storage.nbytes} bytes)")
        data = archive.read(info)
        # The bytes read, not the header's claim: a member may hold fewer than its header says
        # (with a CRC of what it holds), and zipfile then returns them short.
        if len(data) != storage.nbytes:
            raise ValueError(f"{path}: member {name!r} holds {len(data)} bytes although its "
                             f"header says {info.file_size}; its storage record says "
                             f"{storage.nbytes} bytes")
        return data

    return _materialise(tree, read_storage, byteorder, bf16)


def _read_legacy(path, data, bf16=None):
    """The pre-1.6 format: a sequence of pickles, then the storages' bytes."""
    stream = io.BytesIO(data)  # in memory: a crafted length can never over-read the file

    def header(what):
        return _unpickle(_Unpickler(stream, path), path, what)

    magic = header("the magic number")
    if magic != _TORCH_MAGIC:
        raise ValueError(f"{path} is a pickle, but not a torch.save checkpoint (it does not start "
                         f"with torch's magic number); fastbn does not load arbitrary pickles")
    protocol = header("the protocol version")
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: legacy torch.save protocol version {_shown(protocol, 40)}, expected "
                         f"{_LEGACY_PROTOCOL}")
    sys_info = header("the system information")
    little = sys_info.get("little_endian") if isinstance(sys_info, dict) else None
    if not isinstance(little, bool):
        raise ValueError(f"{path}: the system information record has no 'little_endian' flag")
    byteorder = "<" if little else ">"
    unpickler = _Unpickler(stream, path, legacy=True)
    tree = _unpickle(unpickler, path, "the checkpoint's pickle")
    keys = header("the list of storage keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{path}: the list of storage keys is not a list of strings")
    view = memoryview(data)
    position = stream.tell()
    raw_of = {}
    for key in keys:
        storage = unpickler.storages.get(key)
        if storage is None:
            raise ValueError(f"{path}: storage '{key}' is listed but no tensor uses it")
        count = int.from_bytes(view[position:position + 8], "little" if little else "big",
                               signed=True)
        position += 8
        if count != storage.numel:
            raise ValueError(f"{path}: storage '{key}' holds {count} elements, but its record "
                             f"says {storage.numel}")
        if position + storage.nbytes > len(data):
            raise ValueError(f"{path}: truncated: storage '{key}' needs {storage.nbytes} bytes at "
                             f"offset {position}, the file has {len(data)} bytes")
        raw_of[key] = view[position:position + storage.nbytes]
        position += storage.nbytes

    def read_storage(storage):
        if storage.key not in raw_of:
            raise ValueError(f"{path}: storage '{storage.key}' is used but its data is missing")
        return raw_of[storage.key]

    return _materialise(tree, read_storage, byteorder, bf16)


def _read_npz(path):
    # No bf16 argument: .npy has no bfloat16 type code (numpy writes an ml_dtypes.bfloat16
    # array as 2-byte void, '|V2'), so nothing in an .npz is known to be bfloat16.
    arrays = {}
    with np.load(path, allow_pickle=False) as npz:
        for name in npz.files:
            try:
                value = npz[name]
            except ValueError as exc:
                raise ValueError(f"{path}: cannot load member {name!r}: {exc} (fastbn never "
                                 f"unpickles .npz members)") from None
            if not isinstance(value, np.ndarray):
                raise ValueError(f"{path}: member {name!r} is not a .npy array")
            arrays[name] = value.astype(value.dtype.newbyteorder("="), copy=False)
    return arrays


# safetensors dtype codes, by the element type they are stored as (always little-endian).
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "C64": "complex64",
}


def _read_safetensors(path, bf16=None):
    try:
        import safetensors
    except ImportError:
        raise ImportError(f"reading {path} needs the optional 'safetensors' package: "
                          f"pip install 'fastbn[io]' (or pip install safetensors)") from None
    with open(path, "rb") as f:
        data = f.read()
    try:
        # The package's parser checks the header: offsets in order, inside the file, and
        # matching each tensor's shape and dtype.  The bytes are decoded here, so that
        # bfloat16 (which safetensors.numpy cannot return) is handled as in torch files.
        entries = safetensors.deserialize(data)
    except Exception as exc:
        raise ValueError(f"{path}: not a valid safetensors file: {exc}") from None
    arrays = {}
    for name, info in entries:
        code, shape, raw = info["dtype"], tuple(info["shape"]), info["data"]
        element = _SAFETENSORS_DTYPES.get(code)
        if element is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {code}, which fastbn does not "
                             f"read (supported: {', '.join(_SAFETENSORS_DTYPES)})")
        stored = np.dtype(_STORED[element]).newbyteorder("<")
        if len(raw) != stored.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: tensor {name!r} of shape {shape} and dtype {code} has "
                             f"{len(raw)} bytes of data")
        arrays[name] = _finish(np.frombuffer(raw, dtype=stored).reshape(shape), element, bf16)
    return arrays


def _looks_like_safetensors(head, size):
    """8-byte little-endian header length, then a JSON object that fits in the file."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= size - 8 and head[8:9] == b"{"


def read_checkpoint(path, *, bfloat16="float32"):
    """Read a checkpoint file into Python objects, with every tensor as a numpy array.

    The whole saved object is returned: for ``torch.save({"state_dict": sd, "epoch": 3}, f)``
    a dict with the state_dict (an OrderedDict of arrays) and the int 3.  Use
    :func:`load_checkpoint` to get just the state_dict.

    Parameters
    ----------
    path : str or os.PathLike
        A ``torch.save`` file (zip or legacy format), a ``.safetensors`` file or an ``.npz``
        archive.  The format is recognised from the content, not the name (except that a file
        named ``*.safetensors`` is read as one even if its header is damaged).
    bfloat16 : {"float32", "keep"}, default "float32"
        How bfloat16 tensors are returned.  ``"float32"``: widened to float32 arrays, which
        is exact (every bfloat16 value is a float32).  ``"keep"``: as ``ml_dtypes.bfloat16``
        arrays holding the stored bits unchanged, half the memory; this needs the optional
        ``ml_dtypes`` package (``pip install fastbn[bf16]``), imported only then.  Other
        dtypes are unaffected.

    Returns
    -------
    object
        For torch files, the saved object with tensors and parameters as numpy arrays,
        torch dtypes and storage types as their names (``"torch.float32"``), ``torch.Size``
        as a tuple and ``torch.device`` as a string.  For safetensors and ``.npz`` files,
        a dict of arrays.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    UnsafeCheckpointError
        If the pickle names a global outside the allow-list (a subclass of
        ``pickle.UnpicklingError``); nothing from the file has run.
    ImportError
        For a safetensors file, when the ``safetensors`` package is not installed; with
        ``bfloat16="keep"``, when ``ml_dtypes`` is not installed (before the file is read).
    ValueError
        If ``bfloat16`` is not ``"float32"`` or ``"keep"`` (before the file is read).  If the
        file is not a checkpoint, is truncated or corrupt, or holds something fastbn
        does not read (quantized or sparse tensors, an unsupported dtype, an ``.npz`` object
        array); the message names the file and what was found.

    Notes
    -----
    Every array is a C-contiguous, native-endian copy that owns its data: views, transposes
    and tensors sharing a storage come out with their own values, as torch shows them.
    bfloat16 tensors are widened to float32 (exactly), or kept (``bfloat16="keep"``); bool
    storage bytes other than 0 read as True.  The dtypes read are float16/32/64, bfloat16,
    int8/16/32/64, uint8/16/32/64, bool and complex64/128.  An ``.npz`` file cannot mark an
    array as bfloat16 (numpy saves ``ml_dtypes.bfloat16`` arrays as 2-byte void, ``'|V2'``),
    so its arrays come back as stored whatever ``bfloat16`` says.

    Safety: the pickle inside a torch file can name any Python callable, and unpickling calls
    it.  Here every name is checked against a fixed allow-list before anything is called, and
    only fastbn's own functions stand in for the allowed names; tensor offsets, sizes and
    strides are checked against their storage before numpy reads it.  The reader does not
    bound memory use: a crafted file can still ask for large allocations (an expanded tensor
    of many elements, a zip member that decompresses to a large size).
    """
    bf16 = _bfloat16_dtype(bfloat16)
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    if not head:
        raise ValueError(f"{path} is empty, not a checkpoint")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _read_zip(path, bf16)
    if head.startswith(b"\x80"):  # a binary pickle: torch's legacy format
        with open(path, "rb") as f:
            data = f.read()
        return _read_legacy(path, data, bf16)
    if _looks_like_safetensors(head, size) or path.endswith(".safetensors"):
        return _read_safetensors(path, bf16)
    import tarfile  # only for this message; not worth its import time on every import fastbn

    if size >= 512 and tarfile.is_tarfile(path):
        raise ValueError(f"{path} is a tar archive: the tar format of torch.save from before "
                         f"torch 0.1.10 is not supported; load it with torch and save it again")
    raise ValueError(f"{path} is not a checkpoint: it starts with {head!r}, while fastbn reads "
                     f"torch.save files (a zip archive, or a pickle in the legacy format), "
                     f"safetensors files and .npz archives")


def _read_zip(path, bf16=None):
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) == 1:
                return _read_torch_zip(archive, pickles[0][:-len("data.pkl")], path, bf16)
            if len(pickles) > 1:
                raise ValueError(f"{path}: a zip archive with several data.pkl ({pickles[:4]}); "
                                 f"a torch.save checkpoint has one")
            is_npz = bool(names) and all(n.endswith(".npy") for n in names)
        if is_npz:
            return _read_npz(path)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise ValueError(f"{path}: corrupt or truncated zip archive: {exc}") from None
    raise ValueError(f"{path} is a zip archive but not a checkpoint: no '<archive>/data.pkl' "
                     f"(torch.save) and not only .npy members (.npz); it holds "
                     f"{names[:6]}{' ...' if len(names) > 6 else ''}")


# -- picking the state_dict -----------------------------------------------------------------

def _describe(mapping, limit=10):
    """"'state_dict' (OrderedDict, 12 entries), 'epoch' (int)" for error messages."""
    parts = []
    for k, v in list(mapping.items())[:limit]:
        kind = type(v).__name__
        if isinstance(v, Mapping):
            kind += f", {len(v)} {'entry' if len(v) == 1 else 'entries'}"
        elif isinstance(v, np.ndarray):
            kind = f"array {v.dtype}{list(v.shape)}"
        parts.append(f"{_shown(k, 80)} ({kind})")
    more = f", ... ({len(mapping) - limit} more)" if len(mapping) > limit else ""
    return ", ".join(parts) + more if parts else "no keys"


def _holds_arrays(obj):
    return isinstance(obj, Mapping) and any(isinstance(v, np.ndarray) for v in obj.values())


def _state_dict(mapping, path, where):
    """The array entries of ``mapping``, in order, as an OrderedDict keeping torch's
    ``_metadata``; other entries (an epoch counter, a module's extra state) are left out."""
    result = collections.OrderedDict()
    for k, v in mapping.items():
        if isinstance(v, np.ndarray):
            if not isinstance(k, str):
                raise ValueError(f"{path}: {where} has a non-string key {_shown(k, 40)} "
                                 f"({type(k).__name__}); a state_dict's keys are names")
            result[k] = v
    metadata = getattr(mapping, "_metadata", None)
    if metadata is not None:
        result._metadata = metadata
    return result


def load_checkpoint(path, *, key=None, bfloat16="float32"):
    """Load the state_dict of a checkpoint as numpy arrays, without torch.

    Parameters
    ----------
    path : str or os.PathLike
        A ``torch.save`` file (``.pt``/``.pth``, zip or legacy format), a ``.safetensors``
        file (needs the optional ``safetensors`` package: ``pip install fastbn[io]``) or an
        ``.npz`` archive; see :func:`read_checkpoint`.
    key : str or sequence of str, optional
        Where the state_dict is in a nested checkpoint: ``key="ema"`` takes
        ``checkpoint["ema"]``, ``key=("model", "backbone")`` takes
        ``checkpoint["model"]["backbone"]``, and ``key=()`` the top level itself.
    bfloat16 : {"float32", "keep"}, default "float32"
        How bfloat16 tensors are returned.  ``"float32"``: widened to float32, exactly.
        ``"keep"``: as ``ml_dtypes.bfloat16`` arrays with the stored bits, half the memory
        (needs ``pip install fastbn[bf16]``, or ``pip install ml_dtypes``).
        ``load_state_dict`` and ``from_state_dict`` accept either; see :func:`read_checkpoint`.

    Returns
    -------
    collections.OrderedDict of str to numpy.ndarray
        Parameter and buffer names to arrays, in the saved order.  Entries that are not
        tensors (an epoch counter, a module's extra state) are left out.  For torch
        checkpoints that have it, torch's ``_metadata`` (module versions) is kept as an
        attribute, as on torch's state_dict; ``load_state_dict`` uses it.

    Raises
    ------
    ValueError
        If ``key`` is not found (the message lists the keys there are), if no state_dict is
        found, and for everything :func:`read_checkpoint` raises ValueError for (a
        ``bfloat16`` other than ``"float32"`` and ``"keep"`` included).
    UnsafeCheckpointError, FileNotFoundError, ImportError
        As :func:`read_checkpoint`.

    Notes
    -----
    Without ``key``, the state_dict is the first of the entries ``"state_dict"``,
    ``"model_state_dict"`` and ``"model"`` (:data:`STATE_DICT_KEYS`, in that order) whose
    value is a mapping holding arrays; if there is none, the top level itself if any of its
    values is an array.  (A flat state_dict has arrays, not mappings, as values, so it is
    never mistaken for a nested one.)  Anything else is an error that lists the top-level
    keys: pass ``key``, or use :func:`read_checkpoint` for the whole object.

    Examples
    --------
    >>> sd = fastbn.load_checkpoint("resnet.pth")                     # doctest: +SKIP
    >>> bn = fastbn.BatchNorm2d.from_state_dict(sd, prefix="layer1.0.bn1.")  # doctest: +SKIP
    """
    if key is not None and not isinstance(key, str):
        try:
            key = tuple(key)
        except TypeError:
            raise TypeError(f"key must be a string or a sequence of strings, got "
                            f"{type(key).__name__}") from None
    tree = read_checkpoint(path, bfloat16=bfloat16)
    if key is not None:
        node, trail = tree, "the checkpoint"
        for k in (key,) if isinstance(key, str) else key:
            if not isinstance(node, Mapping):
                raise ValueError(f"{path}: cannot look up {_shown(k, 80)} in {trail}, which is a "
                                 f"{type(node).__name__}, not a mapping")
            if k not in node:
                raise ValueError(f"{path}: {trail} has no key {_shown(k, 80)}; its keys: {_describe(node)}")
            node, trail = node[k], f"{trail}[{_shown(k, 80)}]"
        if not _holds_arrays(node):
            kind = f"holds no arrays: {_describe(node)}" if isinstance(node, Mapping) else \
                f"is a {type(node).__name__}, not a mapping of arrays"
            raise ValueError(f"{path}: {trail} {kind}")
        return _state_dict(node, path, trail)
    if isinstance(tree, Mapping):
        # The conventional entries first: a training checkpoint often has a stray tensor at
        # the top too (torch's ImageNet example saves best_acc1 as one).
        for k in STATE_DICT_KEYS:
            if _holds_arrays(tree.get(k)):
                return _state_dict(tree[k], path, f"the checkpoint[{_shown(k, 80)}]")
        if _holds_arrays(tree):
            return _state_dict(tree, path, "the checkpoint")
        if not tree:
            return collections.OrderedDict()  # an empty state_dict (a file with no tensors)
        raise ValueError(f"{path}: found no state_dict: the top level holds no arrays and none of "
                         f"{', '.join(map(repr, STATE_DICT_KEYS))} holds a mapping of arrays; "
                         f"its keys: {_describe(tree)}. Pass key= to say where the state_dict "
                         f"is, or use read_checkpoint() for the whole object")
    raise ValueError(f"{path}: the checkpoint is a {type(tree).__name__}, not a mapping: use "
                     f"read_checkpoint() to read it")
