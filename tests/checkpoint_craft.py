"""Hand-made torch.save archives for the checkpoint tests.

Pickles are written opcode by opcode (protocol 2, as torch.save writes them), so that a test
can build what torch writes without torch, and what torch never writes: out-of-range
storages, big-endian data, malicious globals.  ``dumps`` turns a tree of plain values and the
node classes below into pickle bytes; ``write_torch_zip`` packs them as torch.save does.
"""

import pickle
import struct
import zipfile


class Global:
    """A global named by the pickle (GLOBAL opcode): ``Global("os", "system")``."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Call:
    """``func(*args)`` (REDUCE opcode)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args


class Storage:
    """torch's storage record, ``('storage', torch.<type_name>, key, location, numel)``."""

    def __init__(self, type_name, key, numel, module="torch", location="cpu", extra=()):
        self.type = type_name if isinstance(type_name, (Global, Raw)) else Global(module, type_name)
        self.key, self.numel, self.location, self.extra = key, numel, location, extra


class Raw:
    """Opcodes inserted as they are."""

    def __init__(self, data):
        self.data = data


def tensor(storage, offset, size, stride, *, function="_rebuild_tensor_v2", dtype=None,
           metadata=None):
    """A call of torch's tensor rebuild function, as Tensor.__reduce_ex__ writes it."""
    hooks = Call(Global("collections", "OrderedDict"))
    if function == "_rebuild_tensor":
        args = (storage, offset, size, stride)
    elif function == "_rebuild_tensor_v3":
        args = (storage, offset, size, stride, False, hooks, Global("torch", dtype))
    else:
        args = (storage, offset, size, stride, False, hooks)
    if metadata is not None:
        args += (metadata,)
    return Call(Global("torch._utils", function), *args)


def _emit(obj, out):
    if isinstance(obj, Raw):
        out += obj.data
    elif obj is None:
        out += b"N"
    elif obj is True or obj is False:
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        if -(2**31) <= obj < 2**31:
            out += b"J" + struct.pack("<i", obj)
        else:
            encoded = pickle.encode_long(obj)
            out += b"\x8a" + bytes([len(encoded)]) + encoded
    elif isinstance(obj, float):
        out += b"G" + struct.pack(">d", obj)
    elif isinstance(obj, str):
        data = obj.encode()
        out += b"X" + struct.pack("<I", len(data)) + data
    elif isinstance(obj, tuple):
        out += b"("
        for item in obj:
            _emit(item, out)
        out += b"t"
    elif isinstance(obj, list):
        out += b"]("
        for item in obj:
            _emit(item, out)
        out += b"e"
    elif isinstance(obj, dict):
        out += b"}("
        for k, v in obj.items():
            _emit(k, out)
            _emit(v, out)
        out += b"u"
    elif isinstance(obj, Global):
        out += b"c" + obj.module.encode() + b"\n" + obj.name.encode() + b"\n"
    elif isinstance(obj, Call):
        _emit(obj.func, out)
        _emit(tuple(obj.args), out)
        out += b"R"
    elif isinstance(obj, Storage):
        _emit(("storage", obj.type, obj.key, obj.location, obj.numel) + tuple(obj.extra), out)
        out += b"Q"
    else:
        raise TypeError(f"cannot write {type(obj).__name__}")


def dumps(obj):
    """Protocol-2 pickle bytes of a tree of plain values, Global, Call, Storage and Raw."""
    out = bytearray(b"\x80\x02")
    _emit(obj, out)
    return bytes(out + b".")


def write_torch_zip(path, data_pkl, storages=(), *, byteorder=b"little", archive="archive",
                    extra=()):
    """A zip laid out as torch.save's: ``archive/data.pkl``, ``archive/byteorder`` (left out
    when None), ``archive/data/<key>`` for each (key, bytes) and any ``extra`` (name, bytes)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", data_pkl)
        if byteorder is not None:
            z.writestr(f"{archive}/byteorder", byteorder)
        for key, data in dict(storages).items():
            z.writestr(f"{archive}/data/{key}", data)
        for name, data in extra:
            z.writestr(f"{archive}/{name}", data)
        z.writestr(f"{archive}/version", b"3\n")
    return path


def rewrite_member(path, name, *, file_size=None, compress_size=None, method=None, flags=None):
    """Change what the zip at ``path`` says of member ``name`` -- its sizes, compression method
    or flag bits -- in both its local header and the central directory, leaving its bytes as
    they are: an archive that lies about a member, with the CRC of what the member holds."""
    data = bytearray(open(path, "rb").read())
    encoded = name.encode()
    # (signature, offset of the flags, the method, the compressed and the file size, of the
    # name's length, and of the name) in a local header and a central directory entry
    for signature, at_flags, at_method, at_compressed, at_size, at_length, at_name in (
            (b"PK\x03\x04", 6, 8, 18, 22, 26, 30), (b"PK\x01\x02", 8, 10, 20, 24, 28, 46)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            length = struct.unpack_from("<H", data, start + at_length)[0]
            if bytes(data[start + at_name:start + at_name + length]) == encoded:
                for value, at, fmt in ((flags, at_flags, "<H"), (method, at_method, "<H"),
                                       (compress_size, at_compressed, "<I"),
                                       (file_size, at_size, "<I")):
                    if value is not None:
                        struct.pack_into(fmt, data, start + at, value)
            start += 4
    open(path, "wb").write(bytes(data))
    return path
