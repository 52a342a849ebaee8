"""The restricted unpickler: an allow-list of globals mapped to fastbn's stand-ins.

Why a file cannot run code, change the process, or make unpickling unbounded through it:

1. **Nothing is imported or looked up by name.**  Every global a pickle names (GLOBAL,
   STACK_GLOBAL, INST, and the EXT opcodes through copyreg's registry, in which fastbn
   registers nothing) goes through ``Unpickler.find_class``, which returns an entry of the
   fixed table ``_ALLOWED`` -- exact (module, name) pairs, no attribute paths -- or a fresh
   ``TorchDtype`` marker, and raises UnsafeCheckpointError for anything else, before any
   call.  So REDUCE, NEWOBJ and OBJ can only call what the table holds.
2. **What the table holds can only be called.**  Its entries are the built-in type complex,
   whose attributes no pickle can set, and instances of ``placeholders.Inert`` subclasses
   (``_Allowed`` around fastbn's stand-ins -- for OrderedDict, set and frozenset too --
   and ``StorageType``), which have no ``__dict__`` and refuse ``__setstate__``: BUILD on an allowed function, which once set its
   ``__defaults__`` and changed every later load in the process, is an error.  Nothing a
   pickle builds outlives the call except the arrays and plain containers returned.
3. **The stand-ins check before they build.**  They take torch's arguments, check each
   (types, counts, a tensor's every element inside its storage, a bytearray's codec) and
   return inert placeholders; numpy sees bytes only later (``arrays``), checked again
   against the bytes actually read.
4. **Work is bounded before the pickle machine runs.**  ``pickle_walk.check_structure``
   reads the opcodes once, in the order the C unpickler reads them (no opcode may cross the
   end of its FRAME), and refuses deep nesting (C stack), sharing that expands
   exponentially (hashing, comparing, printing), hashing beyond a budget over the whole
   pickle, keys whose hashes collide, containers grown after being placed, memo indices out
   of proportion and pickles it cannot parse to STOP; the set, frozenset and OrderedDict
   stand-ins bound collisions among what they are built from; ``persistent_load``
   bounds storage sizes; messages show values through ``errors.shown``, never a full repr.
5. **Failures are data.**  Whatever the pickle machine or a stand-in raises becomes a
   CheckpointError naming the file (``unpickle``); running out of memory or stack is not
   hidden here but left to the reader's error contract (``errors.as_checkpoint_error``).

What this rests on: CPython's C unpickler handling each opcode as documented, and the
allow-list holding nothing that can reach further.  It is not a sandbox.
"""

import collections
import pickle

from .elements import DTYPE_NAME, STORAGE_TYPES, STORED, element_size
from .errors import CheckpointError, UnsafeCheckpointError, excerpt, shown
from .pickle_walk import MAX_COLLISIONS, check_structure
from .placeholders import Inert, Storage, StorageType, Tensor, TorchDtype, checked_count, checked_shape, checked_tensor

# The functions the allowed torch globals stand for.  Each takes the arguments torch's
# function of the same name takes, positionally, as the pickle passes them.

def _rebuild_tensor(storage, storage_offset, size, stride):
    element = storage.element if isinstance(storage, Storage) else None
    return checked_tensor(storage, storage_offset, size, stride, element)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    # requires_grad and the (always empty) backward hooks mean nothing to an array.
    element = storage.element if isinstance(storage, Storage) else None
    return checked_tensor(storage, storage_offset, size, stride, element, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    # torch >= 2.3 writes tensors of its newer dtypes (uint16, float8...) as an untyped
    # (byte) storage plus the dtype; offset, size and stride count elements of that dtype.
    if not isinstance(dtype, TorchDtype):
        raise ValueError(f"_rebuild_tensor_v3 expects a torch dtype, got {type(dtype).__name__}")
    if dtype.name not in STORED:
        raise ValueError(f"tensors of dtype torch.{dtype.name} are not supported (supported: "
                         f"{', '.join(sorted(STORED))})")
    return checked_tensor(storage, storage_offset, size, stride, dtype.name, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, Tensor):
        raise ValueError(f"a Parameter must wrap a tensor, got {type(data).__name__}")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    # state holds Python attributes set on the Parameter; an array has no use for them.
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _torch_size(sizes=()):
    return checked_shape(sizes, "torch.Size")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise ValueError(f"torch.device({shown(kind, 40)}, {shown(index, 40)}) is not a device")
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
                             f"{', '.join(shown(e, 20) for e in encoding) or 'no encoding'}")
    elif encoding:
        raise ValueError("bytearray() of bytes takes no encoding")
    return bytearray(source, *encoding)


def _latin1_encode(text, encoding):
    # Pickle protocol 2 writes bytes as _codecs.encode(text, "latin1"); no other codec.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode is only allowed for latin1 text, got {shown(encoding, 40)}")
    return text.encode("latin1")


def _colliding(items):
    """How many of `items` share their hash with another of them: what makes building a set or
    dict of them quadratic (each such key is compared with the others on insertion)."""
    counts = collections.Counter(hash(item) for item in items)
    return sum(n - 1 for n in counts.values() if n > 1)


def _checked_keys(items, what):
    items = list(items) if isinstance(items, (list, tuple)) else None
    if items is None:
        raise ValueError(f"{what}() is only allowed from a list or tuple")
    keys = [pair[0] if isinstance(pair, tuple) and len(pair) == 2 else pair for pair in items] \
        if what == "OrderedDict" else items
    if _colliding(keys) > MAX_COLLISIONS:
        raise ValueError(f"{what}() of more than {MAX_COLLISIONS} items that share their hash "
                         f"with another (collisions make building it quadratic)")
    return items


def _set(items=()):
    return set(_checked_keys(items, "set"))


def _frozenset(items=()):
    return frozenset(_checked_keys(items, "frozenset"))


def _ordered_dict(items=()):
    return collections.OrderedDict(_checked_keys(items, "OrderedDict"))


class _Allowed(Inert):
    """One of fastbn's functions as a pickle may call it (REDUCE), and nothing else: pickle's
    BUILD opcode, which would set the attributes of what it is applied to -- a function's
    ``__defaults__`` or ``__code__`` among them, changing every later load in the process --
    meets Inert's refusal instead, and there is no ``__dict__`` to write into."""

    __slots__ = ("_function",)
    _what = "function"

    def __init__(self, function):
        self._function = function

    def __call__(self, *args):
        return self._function(*args)

    def __repr__(self):
        return f"<allowed {self._function.__name__}>"


def _allowed_globals():
    # Python functions only behind _Allowed; complex is a built-in type, whose attributes no
    # pickle can set.  OrderedDict, set and frozenset are built through stand-ins that bound
    # hash collisions among what they are built from (the walk bounds them in SETITEMS,
    # ADDITEMS and FROZENSET).
    allowed = {
        ("collections", "OrderedDict"): _Allowed(_ordered_dict),
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
        for name, value in (("set", _Allowed(_set)), ("frozenset", _Allowed(_frozenset)),
                            ("complex", complex), ("bytearray", _Allowed(_bytearray))):
            allowed[module, name] = value
    # torch.FloatStorage...; torch.cuda.FloatStorage in old legacy files saved from a GPU;
    # torch.storage.UntypedStorage as torch 2 writes it.
    for name, element in STORAGE_TYPES.items():
        for module in ("torch", "torch.cuda"):
            allowed[module, name] = StorageType(name, element)
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


class Unpickler(pickle.Unpickler):
    """pickle.Unpickler with an allow-list instead of imports.

    ``find_class`` is where pickle resolves every global it names (the GLOBAL, STACK_GLOBAL
    and INST opcodes, and the extension registry), so refusing there refuses ``os.system``,
    ``builtins.eval``, ``getattr`` chains and any class's ``__reduce__`` before it is called.
    ``persistent_load`` turns torch's storage records into :class:`Storage` placeholders.
    """

    def __init__(self, file, path, legacy=False):
        super().__init__(file)
        self.file = file
        self._path = path
        self._legacy = legacy
        self.storages = {}  # key -> Storage

    def find_class(self, module, name):
        # Only exact (module, name) pairs: no attribute paths, no Python 2 name mapping.
        found = _ALLOWED.get((module, name))
        if found is None and module == "torch" and DTYPE_NAME.fullmatch(name):
            found = TorchDtype(name)
        if found is not None:
            return found
        qualname = f"{module}.{name}"
        hint = next((f"; {why}" for start, why in _REFUSED_HINTS if qualname.startswith(start)), "")
        raise UnsafeCheckpointError(
            f"refusing to load global {shown(qualname, 120)} from {self._path}: fastbn only unpickles what "
            f"a tensor state_dict needs (torch's tensor and parameter rebuild functions, storage "
            f"types, dtypes, torch.Size, OrderedDict and plain containers){hint}. Nothing from "
            f"the checkpoint was run.")

    def persistent_load(self, pid):
        length = 6 if self._legacy else 5
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            if isinstance(pid, tuple) and pid and pid[0] == "module":
                raise ValueError("the checkpoint holds a pickled nn.Module class (a whole model "
                                 "saved with torch.save(model)); save model.state_dict() instead")
            raise ValueError(f"unknown persistent record {shown(pid, 80)} (expected a storage record)")
        if len(pid) != length:
            raise ValueError(f"a storage record has {len(pid)} fields, expected {length}: {shown(pid, 120)}")
        storage_type, key, _location, numel = pid[1:5]  # the device is irrelevant to numpy
        if not isinstance(storage_type, StorageType):
            raise ValueError(f"unknown storage type {shown(storage_type, 60)} in storage record {shown(key, 40)}")
        if storage_type.element is None:
            raise ValueError(f"storage type torch.{storage_type.name} is not supported (quantized "
                             f"storage); supported: " + ", ".join(
                                 f"torch.{n}" for n, e in STORAGE_TYPES.items() if e))
        if not isinstance(key, str) or not key:
            raise ValueError(f"a storage key must be a non-empty string, got {shown(key, 40)}")
        numel = checked_count(numel, f"the element count of storage {shown(key, 40)}")
        if numel * element_size(storage_type.element) >= 2**63:
            raise ValueError(f"storage {shown(key, 40)} of {numel} elements is too large to address")
        if self._legacy and pid[5] is not None:
            raise ValueError("the checkpoint uses storage views (written by torch < 0.4), which "
                             "fastbn does not read; re-save it with a recent torch")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = Storage(key, storage_type.element, numel)
        elif (storage.element, storage.numel) != (storage_type.element, numel):
            raise ValueError(f"storage {shown(key, 40)} is recorded both as {storage.numel} "
                             f"{storage.element} and as {numel} {storage_type.element} elements")
        return storage


def unpickle(unpickler, path, what):
    """Run the unpickler after the walk has bounded it; a failure of the pickle machine or of
    a stand-in's checks is a CheckpointError naming the file (a refused global stays an
    UnsafeCheckpointError, and running out of memory or stack is left to the caller)."""
    check_structure(unpickler.file, path, what)
    try:
        return unpickler.load()
    except (UnsafeCheckpointError, MemoryError, RecursionError):
        raise
    except Exception as exc:  # truncated or malformed pickle, failed checks in rebuild calls:
        # the pickle machine raises UnpicklingError, EOFError, TypeError, ... for them
        # (a stand-in's own check reads as it is; the pickle machine's errors with their class)
        problem = excerpt(exc) if type(exc) is not ValueError else excerpt(exc)[len("ValueError: "):]
        raise CheckpointError(f"{path}: could not read {what}: {problem}") from exc
