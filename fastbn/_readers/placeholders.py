"""The inert objects the unpickler hands to a pickle in place of torch's, and the checks that
make a tensor's geometry safe to hand to numpy later."""

from .elements import element_size
from .errors import addressable, shown, shown_dims


class Inert:
    """Base of the objects the unpickler hands to the pickle.  Pickle's BUILD opcode would
    set attributes on them (slot state included); refusing it keeps them as validated."""

    __slots__ = ()
    placeholder = True  # errors.shown prints these with their (short, fixed) repr

    def __setstate__(self, state):
        raise ValueError(f"the pickle tries to set the state of a {self._what}")


class StorageType(Inert):
    """A torch storage class named by the pickle (``torch.FloatStorage``)."""

    __slots__ = ("name", "element")
    _what = "storage type"

    def __init__(self, name, element):
        self.name = name
        self.element = element

    def __repr__(self):
        return f"torch.{self.name}"


class TorchDtype(Inert):
    """A torch dtype object named by the pickle (``torch.float32``)."""

    __slots__ = ("name",)
    _what = "dtype"

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"torch.{self.name}"

    def __eq__(self, other):
        return isinstance(other, TorchDtype) and other.name == self.name

    def __hash__(self):
        return hash(("torch dtype", self.name))


class Storage(Inert):
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
        return self.numel * element_size(self.element)


class Tensor(Inert):
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


def checked_count(value, what):
    """A non-negative Python int (pickle gives ints; bool is refused as a count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {type(value).__name__} {shown(value, 60)}")
    if value < 0:
        raise ValueError(f"{what} must be non-negative, got {value}")
    return value


def checked_shape(value, what):
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{what} must be a tuple of ints, got {type(value).__name__} {shown(value, 60)}")
    return tuple(checked_count(v, what) for v in value)


def checked_tensor(storage, offset, size, stride, element, metadata=None):
    """Check a tensor's geometry against its storage and return its placeholder.

    Checked here, as the pickle is read, so that a crafted file cannot make numpy read outside
    the storage later: every element the tensor addresses, ``offset + sum(i_k * stride_k)``
    for ``0 <= i_k < size_k``, must lie in the storage.
    """
    if not isinstance(storage, Storage):
        raise ValueError(f"a tensor's storage must be a storage record, got {type(storage).__name__}")
    offset = checked_count(offset, "storage_offset")
    size = checked_shape(size, "size")
    stride = checked_shape(stride, "stride")
    if len(size) != len(stride):
        raise ValueError(f"size {shown_dims(size)} and stride {shown_dims(stride)} have different "
                         f"lengths ({len(size)} and {len(stride)})")
    if len(size) > 64:
        raise ValueError(f"a tensor of {len(size)} dimensions; numpy allows 64")
    itemsize = element_size(element)
    # (numpy's rule: the product of the sizes that are not 0; an empty tensor's huge other
    # sizes are refused too, as numpy would)
    if max(stride, default=0) * itemsize >= 2**63 or not addressable(size, itemsize):
        raise ValueError(f"tensor of size {shown_dims(size)} and stride {shown_dims(stride)} is "
                         f"too large to address")
    conj = neg = False
    if metadata:
        if not isinstance(metadata, dict) or set(metadata) - {"conj", "neg"}:
            raise ValueError(f"unsupported tensor metadata {shown(metadata, 80)} (fastbn knows 'conj' and 'neg')")
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
        raise ValueError(f"tensor of size {shown_dims(size)} and stride {shown_dims(stride)} at storage offset {offset} "
                         f"reaches element {last}, out of bounds of its storage '{storage.key}' "
                         f"of {capacity} {element} elements")
    return Tensor(storage, offset, size, stride, element, conj, neg)
