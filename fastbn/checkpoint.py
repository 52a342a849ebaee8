"""Loading PyTorch checkpoints without torch: ``torch.save`` files, safetensors and ``.npz``.

A ``torch.save`` file is a pickle that describes the saved object (dicts, tensors as calls to
torch's rebuild functions) and, beside it, the raw bytes of each tensor storage.  Unpickling
normally *imports and calls* whatever the pickle names, which is how a malicious checkpoint
runs code.  This reader never imports what the file names: its unpickler
(``fastbn/_readers/unpickler.py``, whose top states the safety argument) maps the few globals
a tensor state_dict needs to fastbn's own functions and refuses every other one with
:class:`UnsafeCheckpointError`, before anything is called.  The rebuild functions check
their arguments (storage offset, size and stride within the storage) and return inert
placeholders; arrays are built afterwards by numpy from the storage bytes.  The readers of
each format live in ``fastbn/_readers/``; this module recognises the format, keeps the error
contract (every failure is a :class:`CheckpointError`) and picks out the state_dict.

Formats, recognised by their content:

* the zip format of ``torch.save`` (torch >= 1.6): ``<archive>/data.pkl`` plus
  ``<archive>/data/<key>`` storages and an optional ``<archive>/byteorder`` record;
* the legacy format (``_use_new_zipfile_serialization=False``): a magic number, a protocol
  version and system information, the object pickle, the list of storage keys, then each
  storage as an int64 element count followed by its bytes;
* safetensors (through the optional ``safetensors`` package: ``pip install fastbn[io]``);
* ``.npz`` archives, parsed by fastbn (object arrays refused, as ``allow_pickle=False``).

Only numpy and the standard library are used; torch is never imported (nor ml_dtypes, unless
``bfloat16="keep"`` asks for ``ml_dtypes.bfloat16`` arrays rather than float32 ones).
"""

import collections
import numbers
import os
from collections.abc import Mapping

import numpy as np

from ._readers.arrays import DEFAULT_MAX_EXPANSION
from ._readers.elements import bfloat16_dtype
from ._readers.errors import CheckpointError, UnsafeCheckpointError, as_checkpoint_error, shown
from ._readers.legacy import read_legacy
from ._readers.npz import read_npz
from ._readers.safetensors_file import looks_like_safetensors, read_safetensors
from ._readers.torch_zip import read_torch_zip
from ._readers.zip_members import ZipMembers

__all__ = ["CheckpointError", "UnsafeCheckpointError", "load_checkpoint", "read_checkpoint",
           "STATE_DICT_KEYS"]

#: Entries that ``load_checkpoint`` looks in, in this order, for the state_dict of a nested
#: checkpoint (``{"state_dict": ..., "epoch": 3}``), before it takes the top level itself.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def read_checkpoint(path, *, bfloat16="float32", max_expansion=DEFAULT_MAX_EXPANSION):
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
    max_expansion : float or None, default 8
        How many times the bytes of a torch file's storages its arrays may take, plus
        64 MiB.  Each array is a copy, so an expanded tensor (torch's ``expand``: a stride of
        0) or a storage viewed by many tensors takes more than the file holds; beyond this
        bound the file is refused (CheckpointError) before the array is allocated.  Raise it,
        or pass None for no bound, for a trusted file that needs more.

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
    CheckpointError
        If the file is not a checkpoint, is truncated or corrupt, is inconsistent with
        itself, exceeds a bound (``max_expansion``, the pickle's nesting and sharing), or
        holds something fastbn does not read (quantized or sparse tensors, an unsupported
        dtype, an ``.npz`` object array, a member compressed other than by deflate).  A
        subclass of ValueError; the message starts with the path and says what was found.
        No other exception comes out of reading a file, whatever it holds.
    UnsafeCheckpointError
        If the pickle names a global outside the allow-list: a CheckpointError that is also
        a ``pickle.UnpicklingError``; nothing from the file has run.
    ImportError
        For a safetensors file, when the ``safetensors`` package is not installed; with
        ``bfloat16="keep"``, when ``ml_dtypes`` is not installed (before the file is read).
    ValueError
        If ``bfloat16`` is not ``"float32"`` or ``"keep"``, or ``max_expansion`` is not a
        number >= 1 or None (before the file is opened).

    Notes
    -----
    Every array of a torch file is a C-contiguous, native-endian copy that owns its data:
    views, transposes and tensors sharing a storage come out with their own values, as torch
    shows them.  ``.npz`` arrays come back as ``np.load`` returns them (C or Fortran order),
    in native byte order.
    bfloat16 tensors are widened to float32 (exactly), or kept (``bfloat16="keep"``); bool
    storage bytes other than 0 read as True.  The dtypes read are float16/32/64, bfloat16,
    int8/16/32/64, uint8/16/32/64, bool and complex64/128.  An ``.npz`` file cannot mark an
    array as bfloat16 (numpy saves ``ml_dtypes.bfloat16`` arrays as 2-byte void, ``'|V2'``),
    so its arrays come back as stored whatever ``bfloat16`` says.

    Safety: the pickle inside a torch file can name any Python callable, and unpickling calls
    it.  Here every name is checked against a fixed allow-list before anything is called, and
    only fastbn's own functions, which no pickle can alter, stand in for the allowed names;
    tensor offsets, sizes and strides are checked against their storage and against the
    bytes actually read before numpy reads them.  Memory is bounded by the file: zip members
    inflate at most as deflate can from the bytes the file holds, ``.npz`` headers are checked
    against the member's bytes before allocating, the pickle's structure is bounded before it
    is built, and arrays beyond their storages by ``max_expansion``.  See the README's Safety
    paragraph for the bounds.
    """
    bf16 = bfloat16_dtype(bfloat16)
    max_expansion = _checked_max_expansion(max_expansion)
    path = os.fspath(path)
    with open(path, "rb") as f:  # (a missing file is the caller's error: FileNotFoundError)
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    try:
        return _read(path, head, size, bf16, max_expansion)
    except ImportError:  # an optional package the format needs, which the message names
        raise
    except Exception as exc:  # the one place the error contract is kept: see _readers.errors
        error = as_checkpoint_error(exc, path)
        if error is exc:
            raise
        raise error from error.__cause__


def _checked_max_expansion(max_expansion):
    if max_expansion is None:
        return None
    if (isinstance(max_expansion, bool) or not isinstance(max_expansion, numbers.Real)
            or not max_expansion >= 1):
        raise ValueError(f"max_expansion must be a number >= 1 or None, got "
                         f"{shown(max_expansion, 40)}")
    return float(max_expansion)


def _read(path, head, size, bf16, max_expansion):
    """The saved object of the file at ``path``, by the format its first bytes say."""
    if not head:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _read_zip(path, size, bf16, max_expansion)
    if head.startswith(b"\x80"):  # a binary pickle: torch's legacy format
        with open(path, "rb") as f:
            data = f.read()
        return read_legacy(path, data, bf16, max_expansion)
    if looks_like_safetensors(head, size) or path.endswith(".safetensors"):
        return read_safetensors(path, bf16)
    if _looks_like_tar(path, size):
        raise CheckpointError(f"{path} is a tar archive: the tar format of torch.save from "
                              f"before torch 0.1.10 is not supported; load it with torch and "
                              f"save it again")
    raise CheckpointError(f"{path} is not a checkpoint: it starts with {head!r}, while fastbn "
                          f"reads torch.save files (a zip archive, or a pickle in the legacy "
                          f"format), safetensors files and .npz archives")


def _looks_like_tar(path, size):
    """Whether the file starts with a POSIX tar header ('ustar' at byte 257), read from the
    raw bytes: tarfile.is_tarfile would inflate a gzip, bz2 or xz stream to look, and read
    what a crafted header claims."""
    if size < 512:
        return False
    with open(path, "rb") as f:
        header = f.read(512)
    return header[257:262] == b"ustar"


def _read_zip(path, size, bf16, max_expansion):
    with ZipMembers(path, size) as members:
        names = members.names
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) == 1:
            return read_torch_zip(members, pickles[0][:-len("data.pkl")], bf16, max_expansion)
        if len(pickles) > 1:
            raise CheckpointError(f"{path}: a zip archive with several data.pkl "
                                  f"({', '.join(shown(n, 40) for n in pickles[:4])}); a "
                                  f"torch.save checkpoint has one")
        if names and all(n.endswith(".npy") for n in names):
            return read_npz(members)
    raise CheckpointError(f"{path} is a zip archive but not a checkpoint: no '<archive>/data.pkl' "
                          f"(torch.save) and not only .npy members (.npz); it holds "
                          f"[{', '.join(shown(n, 40) for n in names[:6])}"
                          f"{', ...' if len(names) > 6 else ''}]")


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
        parts.append(f"{shown(k, 80)} ({kind})")
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
                raise CheckpointError(f"{path}: {where} has a non-string key {shown(k, 40)} "
                                      f"({type(k).__name__}); a state_dict's keys are names")
            result[k] = v
    metadata = getattr(mapping, "_metadata", None)
    if metadata is not None:
        result._metadata = metadata
    return result


def load_checkpoint(path, *, key=None, bfloat16="float32", max_expansion=DEFAULT_MAX_EXPANSION):
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
    max_expansion : float or None, default 8
        The bound on arrays beyond the file's storages; see :func:`read_checkpoint`.

    Returns
    -------
    collections.OrderedDict of str to numpy.ndarray
        Parameter and buffer names to arrays, in the saved order.  Entries that are not
        tensors (an epoch counter, a module's extra state) are left out.  For torch
        checkpoints that have it, torch's ``_metadata`` (module versions) is kept as an
        attribute, as on torch's state_dict; ``load_state_dict`` uses it.

    Raises
    ------
    CheckpointError
        If ``key`` is not found (the message lists the keys there are), if no state_dict is
        found, and for everything :func:`read_checkpoint` raises it for.
    UnsafeCheckpointError, FileNotFoundError, ImportError, ValueError
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
    tree = read_checkpoint(path, bfloat16=bfloat16, max_expansion=max_expansion)
    if key is not None:
        node, trail = tree, "the checkpoint"
        for k in (key,) if isinstance(key, str) else key:
            if not isinstance(node, Mapping):
                raise CheckpointError(f"{path}: cannot look up {shown(k, 80)} in {trail}, which is a "
                                      f"{type(node).__name__}, not a mapping")
            if k not in node:
                raise CheckpointError(f"{path}: {trail} has no key {shown(k, 80)}; its keys: {_describe(node)}")
            node, trail = node[k], f"{trail}[{shown(k, 80)}]"
        if not _holds_arrays(node):
            kind = f"holds no arrays: {_describe(node)}" if isinstance(node, Mapping) else \
                f"is a {type(node).__name__}, not a mapping of arrays"
            raise CheckpointError(f"{path}: {trail} {kind}")
        return _state_dict(node, path, trail)
    if isinstance(tree, Mapping):
        # The conventional entries first: a training checkpoint often has a stray tensor at
        # the top too (torch's ImageNet example saves best_acc1 as one).
        for k in STATE_DICT_KEYS:
            if _holds_arrays(tree.get(k)):
                return _state_dict(tree[k], path, f"the checkpoint[{shown(k, 80)}]")
        if _holds_arrays(tree):
            return _state_dict(tree, path, "the checkpoint")
        if not tree:
            return collections.OrderedDict()  # an empty state_dict (a file with no tensors)
        raise CheckpointError(f"{path}: found no state_dict: the top level holds no arrays and none of "
                              f"{', '.join(map(repr, STATE_DICT_KEYS))} holds a mapping of arrays; "
                              f"its keys: {_describe(tree)}. Pass key= to say where the state_dict "
                              f"is, or use read_checkpoint() for the whole object")
    raise CheckpointError(f"{path}: the checkpoint is a {type(tree).__name__}, not a mapping: use "
                          f"read_checkpoint() to read it")
