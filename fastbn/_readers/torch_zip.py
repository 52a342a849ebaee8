"""The zip format of torch.save (torch >= 1.6): ``<archive>/data.pkl``, the storages as
``<archive>/data/<key>`` and an optional ``<archive>/byteorder`` record."""

import io

from .arrays import materialise
from .errors import CheckpointError, shown
from .unpickler import Unpickler, unpickle

#: How many times a deflated data.pkl may inflate, beyond 1 MiB.  torch.save stores its
#: pickle uncompressed; an archive deflated again shrinks one a few times.
PICKLE_MAX_RATIO = 64

def read_torch_zip(members, prefix, bf16=None, max_expansion=None):
    """The saved object of the torch.save archive in ``members`` (a ZipMembers) whose
    pickle is ``<prefix>data.pkl``, with its tensors as arrays."""
    path = members.path
    names = members.names
    if prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names):
        raise CheckpointError(f"{path} is a TorchScript archive (torch.jit.save), not a torch.save "
                              f"checkpoint: load it with torch.jit.load and save its state_dict() "
                              f"with torch.save")
    byteorder = "<"
    if members.size(prefix + "byteorder") is not None:
        record = members.read(prefix + "byteorder", limit=16)
        if record not in (b"little", b"big"):
            raise CheckpointError(f"{path}: unknown byte order record {shown(record, 20)} "
                                  f"(expected b'little' or b'big')")
        byteorder = "<" if record == b"little" else ">"
    # (torch reads checkpoints without the record, written before it existed, as little-endian.)
    # (the walk and the unpickler take time in proportion to the pickle: a pickle deflated
    # a thousand times would cost minutes per kilobyte of file)
    pickle = members.read(prefix + "data.pkl", max_ratio=PICKLE_MAX_RATIO)
    unpickler = Unpickler(io.BytesIO(pickle), path)
    tree = unpickle(unpickler, path, f"{prefix}data.pkl")

    def read_storage(storage):
        name = f"{prefix}data/{storage.key}"
        size = members.size(name)
        if size is None:
            raise CheckpointError(f"{path}: storage {shown(storage.key, 40)} has no member "
                                  f"{shown(name, 80)} in the archive")
        if size != storage.nbytes:
            raise CheckpointError(f"{path}: member {shown(name, 80)} holds {size} bytes, but its "
                                  f"storage record says {storage.numel} {storage.element} "
                                  f"elements ({storage.nbytes} bytes)")
        return members.read(name)  # (exactly the header's size, or an error)

    return materialise(tree, read_storage, byteorder, bf16, max_expansion)
