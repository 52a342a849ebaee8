"""The legacy format of torch.save (``_use_new_zipfile_serialization=False``): a magic number,
a protocol version and system information, the object pickle, the list of storage keys, then
each storage as an int64 element count followed by its bytes."""

import io

from .arrays import materialise
from .errors import CheckpointError, shown
from .unpickler import Unpickler, unpickle

TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER, legacy format
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION


def read_legacy(path, data, bf16=None, max_expansion=None):
    """The pre-1.6 format: a sequence of pickles, then the storages' bytes."""
    stream = io.BytesIO(data)  # in memory: a crafted length can never over-read the file

    def header(what):
        return unpickle(Unpickler(stream, path), path, what)

    magic = header("the magic number")
    if magic != TORCH_MAGIC:
        raise CheckpointError(f"{path} is a pickle, but not a torch.save checkpoint (it does not start "
                              f"with torch's magic number); fastbn does not load arbitrary pickles")
    protocol = header("the protocol version")
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: legacy torch.save protocol version {shown(protocol, 40)}, expected "
                              f"{_LEGACY_PROTOCOL}")
    sys_info = header("the system information")
    little = sys_info.get("little_endian") if isinstance(sys_info, dict) else None
    if not isinstance(little, bool):
        raise CheckpointError(f"{path}: the system information record has no 'little_endian' flag")
    byteorder = "<" if little else ">"
    unpickler = Unpickler(stream, path, legacy=True)
    tree = unpickle(unpickler, path, "the checkpoint's pickle")
    keys = header("the list of storage keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"{path}: the list of storage keys is not a list of strings")
    view = memoryview(data)
    position = stream.tell()
    raw_of = {}
    for key in keys:
        storage = unpickler.storages.get(key)
        if storage is None:
            raise CheckpointError(f"{path}: storage {shown(key, 40)} is listed but no tensor uses it")
        count = int.from_bytes(view[position:position + 8], "little" if little else "big",
                               signed=True)
        position += 8
        if count != storage.numel:
            raise CheckpointError(f"{path}: storage {shown(key, 40)} holds {count} elements, but its record "
                              f"says {storage.numel}")
        if position + storage.nbytes > len(data):
            raise CheckpointError(f"{path}: truncated: storage {shown(key, 40)} needs {storage.nbytes} bytes at "
                              f"offset {position}, the file has {len(data)} bytes")
        raw_of[key] = view[position:position + storage.nbytes]
        position += storage.nbytes

    def read_storage(storage):
        if storage.key not in raw_of:
            raise CheckpointError(f"{path}: storage {shown(storage.key, 40)} is used but its data is missing")
        return raw_of[storage.key]

    return materialise(tree, read_storage, byteorder, bf16, max_expansion)
