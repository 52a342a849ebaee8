"""The zip format of torch.save (torch >= 1.6): ``<archive>/data.pkl``, the storages as
``<archive>/data/<key>`` and an optional ``<archive>/byteorder`` record."""

import io

from .arrays import materialise
from .unpickler import Unpickler, unpickle

def read_torch_zip(archive, prefix, path, bf16=None):
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
    unpickler = Unpickler(io.BytesIO(archive.read(prefix + "data.pkl")), path)
    tree = unpickle(unpickler, path, f"{prefix}data.pkl")

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

    return materialise(tree, read_storage, byteorder, bf16)
