"""The checkpoint reader's bounds and its error contract (issue #19).

Every failure to read a file is a CheckpointError (a ValueError) or an UnsafeCheckpointError,
with the file's path first in its message -- never another exception class -- and what a
file may make the reader allocate is bounded before it is allocated: zip members by what
deflate can produce from the bytes the file holds, .npy members by the bytes they hold, and
the arrays of expanded tensors by ``max_expansion``.  The files of each finding of the fuzz
campaigns live in tests/fuzz/regressions/ and are replayed by tests/test_fuzz_regressions.py.
"""

import math
import struct
import zipfile

import numpy as np
import pytest

import fastbn
from fastbn import CheckpointError, UnsafeCheckpointError, load_checkpoint, read_checkpoint
from fastbn._readers import errors as reader_errors
from fastbn._readers.arrays import DEFAULT_MAX_EXPANSION, EXPANSION_ALLOWANCE

from checkpoint_craft import Global, Storage, dumps, rewrite_member, tensor, write_torch_zip


def _float_archive(path, values, *, compression=zipfile.ZIP_STORED):
    data = np.asarray(values, np.float32)
    pkl = dumps({"w": tensor(Storage("FloatStorage", "0", data.size), 0, (data.size,), (1,))})
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", data.tobytes())
    return path


def _refused(path, match, **kwargs):
    """read_checkpoint(path) raises a CheckpointError that starts with the path, matches
    ``match`` and was foreseen (not the contract's catch-all)."""
    with pytest.raises(CheckpointError, match=match) as info:
        read_checkpoint(path, **kwargs)
    assert str(info.value).startswith(str(path))
    assert not isinstance(info.value, reader_errors.UnforeseenCheckpointError), info.value
    return info.value


# -- the error contract ------------------------------------------------------------------------

def test_the_error_classes():
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(UnsafeCheckpointError, CheckpointError)
    import pickle
    assert issubclass(UnsafeCheckpointError, pickle.UnpicklingError)  # (as before #19)
    assert fastbn.CheckpointError is CheckpointError
    assert "CheckpointError" in fastbn.__all__


def test_a_refused_global_is_a_checkpoint_error_too(tmp_path):
    path = write_torch_zip(tmp_path / "evil.pt", dumps(Global("os", "system")))
    with pytest.raises(CheckpointError, match="refusing to load global 'os.system'"):
        read_checkpoint(path)


@pytest.mark.parametrize("method, name", [(zipfile.ZIP_BZIP2, "bzip2"), (zipfile.ZIP_LZMA, "LZMA")])
def test_members_compressed_other_than_by_deflate_are_refused(tmp_path, method, name):
    # (bz2 and lzma raised OSError and LZMAError on damaged members, and can inflate far
    # beyond deflate's ratio; neither torch.save nor numpy writes them)
    path = _float_archive(tmp_path / "m.pt", [1.0, 2.0], compression=method)
    _refused(path, f"member 'archive/data.pkl' is compressed with {name}")


def test_a_deflated_checkpoint_still_loads(tmp_path):
    # (torch's reader takes deflated members; numpy's savez_compressed writes them)
    path = _float_archive(tmp_path / "deflated.pt", [1.0, 2.0, 3.0], compression=zipfile.ZIP_DEFLATED)
    np.testing.assert_array_equal(read_checkpoint(path)["w"], [1.0, 2.0, 3.0])


def test_an_encrypted_member_is_refused(tmp_path):
    # (zipfile raised RuntimeError: password required)
    path = rewrite_member(_float_archive(tmp_path / "e.pt", [1.0]), "archive/data.pkl", flags=1)
    _refused(path, "member 'archive/data.pkl' is encrypted")


def test_a_member_name_that_is_not_utf8_is_a_corrupt_archive(tmp_path):
    # (zipfile raised UnicodeDecodeError when the UTF-8 flag is set on other bytes)
    path = tmp_path / "name.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", dumps({}))
        z.writestr("archive/\xff", b"x")  # (written as UTF-8, c3 bf, with the UTF-8 flag)
    path.write_bytes(path.read_bytes().replace("archive/\xff".encode(), b"archive/\xff\xfe"))
    _refused(path, "corrupt or truncated zip archive: UnicodeDecodeError")


def test_a_central_directory_larger_than_the_file_is_a_corrupt_archive(tmp_path):
    # (zipfile seeked to a negative offset: OSError)
    path = _float_archive(tmp_path / "cd.pt", [1.0])
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", data, end + 12, 2**31)  # size of the central directory
    path.write_bytes(bytes(data))
    _refused(path, "corrupt or truncated zip archive")


def test_two_members_of_one_name_are_refused(tmp_path):
    path = tmp_path / "twice.pt"
    with pytest.warns(UserWarning, match="Duplicate name"):
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", dumps({}))
            z.writestr("archive/data.pkl", dumps({"a": 1}))
    _refused(path, "two members named 'archive/data.pkl'")


def test_a_deflated_member_cannot_claim_more_than_deflate_produces(tmp_path):
    path = _float_archive(tmp_path / "bomb.pt", [0.0] * 4, compression=zipfile.ZIP_DEFLATED)
    rewrite_member(path, "archive/data.pkl", file_size=2**32 - 1)
    _refused(path, "member 'archive/data.pkl' claims 4294967295 bytes from .* deflated bytes, more than deflate can produce")


def test_members_cannot_claim_more_compressed_bytes_than_the_file_holds(tmp_path):
    # Members that overlap inflate one stream many times; their compressed sizes then add up
    # to more than the file.
    path = _float_archive(tmp_path / "overlap.pt", [0.0] * 4, compression=zipfile.ZIP_DEFLATED)
    rewrite_member(path, "archive/data.pkl", compress_size=2**31, file_size=2**31)
    _refused(path, "members claim more compressed bytes than the file's .* \\(members overlap\\)")


def test_an_unforeseen_failure_is_still_a_checkpoint_error_with_its_cause(tmp_path, monkeypatch):
    from fastbn._readers import torch_zip

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr("fastbn.checkpoint.read_torch_zip", broken)
    path = _float_archive(tmp_path / "ok.pt", [1.0])
    with pytest.raises(reader_errors.UnforeseenCheckpointError,
                       match=r"ok.pt: could not be read \(unforeseen error: TypeError: a bug\)") as info:
        read_checkpoint(path)
    assert isinstance(info.value.__cause__, TypeError)
    assert torch_zip.read_torch_zip is not broken


def test_a_missing_optional_package_stays_an_import_error(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "safetensors", None)
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x02\0\0\0\0\0\0\0{}")
    with pytest.raises(ImportError, match="safetensors"):
        read_checkpoint(path)


# -- .npz members: the header is checked against the bytes before anything is allocated ------

def _npz(path, member, header, data=b"", version=1):
    text = repr(header).encode("latin-1") if isinstance(header, dict) else header
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    width = "<H" if version == 1 else "<I"
    npy = b"\x93NUMPY" + bytes([version, 0]) + struct.pack(width, len(text)) + text + data
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, npy)
    return path


def test_an_npz_header_asking_terabytes_is_refused_before_allocating(tmp_path):
    # (np.load allocated the header's array first: 7 TiB from 100 bytes, MemoryError)
    header = {"descr": "<f8", "fortran_order": False, "shape": (2**40, 1000)}
    path = _npz(tmp_path / "huge.npz", "x.npy", header)
    _refused(path, r"member 'x.npy': an array of shape \(1099511627776, 1000\) and dtype float64 "
                   r"takes 8796093022208000 bytes, but the member holds 0 after its header")


def test_an_npz_header_of_python_2_is_refused_with_a_message(tmp_path):
    # (numpy's fallback parser raised tokenize.TokenError on it)
    path = _npz(tmp_path / "py2.npz", "x.npy",
                b"{'descr': '<f8', 'fortran_order': False, 'shape': (3L,), }", b"\0" * 24)
    _refused(path, "member 'x.npy': unreadable .npy header")


@pytest.mark.parametrize("header, match", [
    ({"descr": "<f8", "fortran_order": False, "shape": (-1,)}, "not a tuple of at most 64 non-negative ints"),
    ({"descr": "<f8", "fortran_order": False, "shape": (1,) * 65}, "not a tuple of at most 64"),
    ({"descr": "<f8", "fortran_order": 1, "shape": (1,)}, "fortran_order 1 is not a bool"),
    ({"descr": "<f8", "shape": (1,)}, "a .npy header is a dict of"),
    ({"descr": "nonsense", "fortran_order": False, "shape": (1,)}, "dtype 'nonsense' is not one numpy reads"),
    ({"descr": "|O", "fortran_order": False, "shape": (1,)}, "object array, which would be unpickled"),
    ({"descr": [("a", "|O")], "fortran_order": False, "shape": (1,)}, "object array"),
    (b"{'descr': " + b"[" * 5000, "unreadable .npy header"),
])
def test_malformed_npz_headers_are_named(tmp_path, header, match):
    _refused(_npz(tmp_path / "bad.npz", "x.npy", header, b"\0" * 8), match)


def test_npz_header_longer_than_numpys_limit_is_refused(tmp_path):
    header = {"descr": "<f8", "fortran_order": False, "shape": (1,)}
    path = _npz(tmp_path / "long.npz", "x.npy", repr(header).encode() + b" " * 20_000, b"\0" * 8,
                version=2)
    _refused(path, "header of 20.* bytes \\(at most 10000 are read\\)")


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<i2", "|b1", "<c16", [("a", "<i4"), ("b", ">f2")]])
def test_npz_arrays_come_back_as_np_load_returns_them(tmp_path, order, dtype):
    value = np.asarray(np.arange(24).reshape(2, 3, 4) % 3, order=order).astype(dtype, order=order)
    path = tmp_path / "a.npz"
    np.savez(path, a=value, scalar=np.float64(2.5), empty=np.zeros((0, 3)))
    got = read_checkpoint(path)
    with np.load(path) as expected:
        for name in expected.files:
            want = expected[name]
            assert got[name].dtype == want.dtype.newbyteorder("=") or got[name].dtype == want.dtype
            assert got[name].shape == want.shape
            assert got[name].flags.f_contiguous == want.flags.f_contiguous
            assert got[name].flags.c_contiguous == want.flags.c_contiguous
            assert got[name].flags.writeable and got[name].flags.owndata
            np.testing.assert_array_equal(got[name], want)


# -- expanded tensors: bounded by max_expansion -----------------------------------------------

def _expanded(path, count, dtype="FloatStorage", element=b"\1\1\1\1"):
    """One stored element viewed as ``count`` elements with stride 0, as torch.save writes
    ``torch.ones(1).expand(count)``."""
    pkl = dumps({"x": tensor(Storage(dtype, "0", 1), 0, (count,), (0,))})
    return write_torch_zip(path, pkl, {"0": element})


def test_an_expanded_tensor_within_the_allowance_loads_as_torch_shows_it(tmp_path):
    got = read_checkpoint(_expanded(tmp_path / "e.pt", 1000))["x"]
    np.testing.assert_array_equal(got, np.full(1000, np.frombuffer(b"\1" * 4, np.float32)[0]))


def test_an_expanded_tensor_of_terabytes_is_refused_before_it_is_allocated(tmp_path):
    # (612 bytes asked for 4 TiB: numpy's MemoryError escaped; smaller ones took 1 GiB)
    error = _refused(_expanded(tmp_path / "tb.pt", 2**40),
                     r"the arrays would take more than 4096.0 GiB from 4 bytes of stored data, "
                     r"beyond max_expansion=8 times it plus 64.0 MiB.*stride \(0,\).*Pass a larger "
                     r"max_expansion, or None")
    assert DEFAULT_MAX_EXPANSION == 8 and EXPANSION_ALLOWANCE == 64 * 2**20
    assert "4096.0 GiB" in str(error)


def test_max_expansion_raises_or_lifts_the_bound(tmp_path):
    count = EXPANSION_ALLOWANCE + 100  # past the allowance and 8 times the byte stored
    path = _expanded(tmp_path / "big.pt", count, dtype="ByteStorage", element=b"\1")
    _refused(path, "beyond max_expansion=8 times it")
    assert read_checkpoint(path, max_expansion=None)["x"].shape == (count,)
    assert load_checkpoint(path, max_expansion=2 * count)["x"].shape == (count,)


def test_views_repeated_past_the_bound_are_refused(tmp_path):
    # Not only stride 0: a thousand whole views of one storage are a thousand copies.
    storage = Storage("ByteStorage", "0", 2**20)
    pkl = dumps({f"v{i}": tensor(storage, 0, (2**20,), (1,)) for i in range(100)})
    path = write_torch_zip(tmp_path / "views.pt", pkl, {"0": b"\0" * 2**20})
    _refused(path, "a storage viewed many times")
    assert len(read_checkpoint(path, max_expansion=100)) == 100


def test_tied_weights_saved_as_two_views_load_by_default(tmp_path):
    # torch's state_dict detaches each entry, so weights tied between two modules are saved
    # as two tensors of one storage: twice the bytes, bfloat16 widening doubles it again.
    storage = Storage("BFloat16Storage", "0", 2**22)
    pkl = dumps({"embed.weight": tensor(storage, 0, (2**11, 2**11), (2**11, 1)),
                 "head.weight": tensor(storage, 0, (2**11, 2**11), (2**11, 1))})
    path = write_torch_zip(tmp_path / "tied.pt", pkl, {"0": b"\0\x3f" * 2**22})
    sd = load_checkpoint(path)
    assert sd["embed.weight"].dtype == np.float32 and float(sd["head.weight"][0, 0]) == 0.5


@pytest.mark.parametrize("bad", [0, 0.5, -1, float("nan"), "8", True, [8]])
def test_max_expansion_is_checked_before_the_file_is_opened(bad):
    with pytest.raises(ValueError, match="max_expansion must be a number >= 1 or None"):
        read_checkpoint("/no/such/file.pt", max_expansion=bad)
    with pytest.raises(ValueError, match="max_expansion must be a number >= 1 or None"):
        load_checkpoint("/no/such/file.pt", max_expansion=bad)


def test_the_expansion_bound_counts_what_is_allocated(tmp_path):
    # bfloat16 is widened to float32 by default (4 bytes an element), kept as 2 with "keep"
    pytest.importorskip("ml_dtypes")
    count = EXPANSION_ALLOWANCE // 4 + 100
    path = _expanded(tmp_path / "bf.pt", count, dtype="BFloat16Storage", element=b"\0\x3f")
    _refused(path, "beyond max_expansion")
    assert read_checkpoint(path, bfloat16="keep")["x"].nbytes == 2 * count
    assert math.isclose(float(read_checkpoint(path, max_expansion=None)["x"][-1]), 0.5)


# -- what the walk of the pickle now bounds, and what it still lets through ------------------

@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_of_every_protocol_with_frames_sets_and_int_keys_load(tmp_path, protocol):
    # Protocols 4 and 5 write FRAMEs (each opcode inside its frame), sets as ADDITEMS and
    # frozensets as FROZENSET; protocol 2 writes both as calls of set and frozenset.
    import pickle
    value = {"steps": list(range(5000)), "tags": {"a", "b", (1, 2)}, "frozen": frozenset({1.5, 2}),
             "by_index": {i: str(i) for i in range(3000)}, "blob": b"\0" * 100_000}
    path = write_torch_zip(tmp_path / f"p{protocol}.pt", pickle.dumps(value, protocol=protocol))
    assert read_checkpoint(path) == value


def test_a_few_colliding_keys_are_data(tmp_path):
    # Equal hashes are refused only beyond MAX_COLLISIONS keys of one dict or set.
    import pickle
    from fastbn._readers.pickle_walk import MAX_COLLISIONS
    value = {k * (2**61 - 1): k for k in range(1, MAX_COLLISIONS + 1)}
    assert read_checkpoint(write_torch_zip(tmp_path / "few.pt", pickle.dumps(value, protocol=2))) == value
    value[0] = 0
    value[(MAX_COLLISIONS + 1) * (2**61 - 1)] = 1  # one more that collides
    with pytest.raises(CheckpointError, match="more than 64 keys of one dict or set share"):
        read_checkpoint(write_torch_zip(tmp_path / "many.pt", pickle.dumps(value, protocol=2)))
