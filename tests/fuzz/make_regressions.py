"""Write the crafted files of tests/fuzz/regressions/ -- one per finding of issue #19's attack --
and the small crafted seeds of tests/fuzz/seeds/ (what tests/data, written by torch, lacks).

    python tests/fuzz/make_regressions.py

Each file is what an attacker would hand a user, as small as the finding allows (deflated
where its point is size); tests/fuzz/regressions/EXPECTED.txt says how each must now be
refused, and tests/test_fuzz_regressions.py replays them all.  Files the fuzzers found are
added as they were found (fuzz-*), not written here.
"""

import io
import os
import struct
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from checkpoint_craft import Call, Global, Storage, dumps, rewrite_member, tensor, write_torch_zip  # noqa: E402

OUT = os.path.join(HERE, "regressions")
SEEDS = os.path.join(HERE, "seeds")


def _deflated_torch_zip(path, body, storages=()):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", body)
        for key, data in storages:
            z.writestr(f"archive/data/{key}", data)
    return path


def _npy(header, data=b"", version=1):
    text = repr(header).encode("latin-1") if isinstance(header, dict) else header
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    width = "<H" if version == 1 else "<I"
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack(width, len(text)) + text + data


def _npz(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members:
            z.writestr(name, data)
    return path


def _float(values):
    data = struct.pack(f"<{len(values)}f", *values)
    pkl = dumps({"w": tensor(Storage("FloatStorage", "0", len(values)), 0, (len(values),), (1,))})
    return pkl, data


def main():
    os.makedirs(OUT, exist_ok=True)
    at = lambda name: os.path.join(OUT, name)  # noqa: E731

    # 1. out-of-bounds read: a member shorter than its header, with the CRC of what it holds
    pkl, data = _float(list(range(60)))
    rewrite_member(write_torch_zip(at("short-stored-member.pt"), pkl, {"0": data[:8]}),
                   "archive/data/0", file_size=240)
    rewrite_member(_deflated_torch_zip(at("short-deflated-member.pt"), pkl, [("0", data[:8])]),
                   "archive/data/0", file_size=240)

    # 2. BUILD onto an allowed function: its __defaults__ negated every later load
    evil = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"
            + dumps((None, {"__defaults__": (False, None, {"neg": True})}))[2:-1]
            + b"b0" + dumps({"x": 1})[2:])
    write_torch_zip(at("build-onto-allowed-function.pt"), evil)

    # 3. a tuple nested 300,000 deep as a dict key: a C stack overflow when hashed
    deep = b"\x80\x02}" + b")" + b"\x85" * 300_000 + b"Ns."
    _deflated_torch_zip(at("nested-tuple-key.pt"), deep)

    # 4. exponential time and memory from small files
    index = [struct.pack("<I", k) for k in range(61)]
    lists = bytearray(b"\x80\x02]r" + index[0])
    for k in range(60):
        lists += b"]r" + index[k + 1] + b"(j" + index[k] + b"j" + index[k] + b"e"
    write_torch_zip(at("shared-lists-in-a-message.pt"), bytes(lists + b"."))
    key = bytearray(b"\x80\x02})r" + index[0] + b"0")
    for k in range(60):
        key += b"j" + index[k] + b"j" + index[k] + b"\x86r" + index[k + 1] + b"0"
    write_torch_zip(at("shared-tuple-key.pt"), bytes(key + b"j" + index[60] + b"Ns."))
    puny = dumps({"b": Call(Global("__builtin__", "bytearray"), "\u00e9" * 16_000, "punycode")})
    _deflated_torch_zip(at("bytearray-punycode.pt"), puny)
    write_torch_zip(at("memo-index-4GiB.pt"), b"\x80\x02N" + b"r" + struct.pack("<I", 0xFFFFFFF0) + b".")
    expanded = dumps({"x": tensor(Storage("FloatStorage", "0", 1), 0, (2**40,), (0,))})
    write_torch_zip(at("expanded-tensor-4TiB.pt"), expanded, {"0": b"\0" * 4})
    _npz(at("npz-header-7TiB.npz"),
         [("x.npy", _npy({"descr": "<f8", "fortran_order": False, "shape": (2**40, 7)}))])

    # 5. exceptions outside the documented ones
    _npz(at("npz-python2-header.npz"),
         [("x.npy", _npy(b"{'descr': '<f8', 'fortran_order': False, 'shape': (3L,), }", b"\0" * 24))])
    pkl, data = _float([1.0, 2.0])
    rewrite_member(write_torch_zip(at("encrypted-member.pt"), pkl, {"0": data}),
                   "archive/data.pkl", flags=1)
    for name, method in (("bz2-member.pt", zipfile.ZIP_BZIP2), ("lzma-member.pt", zipfile.ZIP_LZMA)):
        with zipfile.ZipFile(at(name), "w", method) as z:
            z.writestr("archive/data.pkl", pkl)
            z.writestr("archive/data/0", data)
    raw = bytearray(open(write_torch_zip(at("central-directory-past-the-start.pt"), pkl,
                                         {"0": data}), "rb").read())
    struct.pack_into("<I", raw, raw.rfind(b"PK\x05\x06") + 12, 2**31)
    open(at("central-directory-past-the-start.pt"), "wb").write(bytes(raw))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/\xff", b"")
    open(at("member-name-not-utf8.pt"), "wb").write(
        buffer.getvalue().replace("archive/\xff".encode(), b"archive/\xff\xfe"))
    shapes = dumps({"x": tensor(Storage("FloatStorage", "0", 1), 0, (2**64, 0), (1, 1))})
    write_torch_zip(at("empty-tensor-huge-size.pt"), shapes, {"0": b"\0" * 4})
    negated = dumps({"x": tensor(Storage("BoolStorage", "0", 2), 0, (2,), (1,),
                                 metadata={"neg": True})})
    write_torch_zip(at("bool-tensor-negative-bit.pt"), negated, {"0": b"\1\0"})
    _npz(at("npz-shape-beyond-int64.npz"),
         [("x.npy", _npy({"descr": "<f4", "fortran_order": False, "shape": (2**30, 2**64)}))])


def review():
    """The findings of a reviewer's attack on the hardened reader (after the issue's own)."""
    import bz2
    import json
    import pickle
    import tarfile
    at = lambda name: os.path.join(OUT, name)  # noqa: E731

    # A FRAME whose last opcode's argument runs past its end: the C unpickler skips the rest
    # of the frame and reads on after it, so the walk vetted other bytes than it runs -- here
    # a dict key nested a million deep behind a harmless 'N.' (a segfault), deflated.
    def desync(hidden):
        return (b"\x80\x04\x95" + struct.pack("<Q", 3) + b"J\x00\x00" + b"\x00\x00"
                + b"C\x08" + b"B" + struct.pack("<I", 5) + b"..." + b"N." + hidden)
    _deflated_torch_zip(at("frame-desync-nested-key.pt"), desync(b"})" + b"\x85" * 1_000_000 + b"Ns."))
    write_torch_zip(at("frame-desync-memo.pt"), desync(b"Nr" + struct.pack("<I", 2**26) + b"0}."))

    # tarfile.is_tarfile, used to name an old tar checkpoint, inflated bz2 and read what a GNU
    # long-name header claims: 2 GB from 859 bytes.
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 1 << 30
    packer = bz2.BZ2Compressor(9)
    data = packer.compress(info.tobuf(format=tarfile.GNU_FORMAT))
    data += b"".join(packer.compress(b"\0" * (1 << 20)) for _ in range(1025)) + packer.flush()
    open(at("bz2-tar-long-name.pt"), "wb").write(data)

    # One shared tuple of 2**21 nodes, hashed again as the key of each of a thousand dicts
    # thrown away (POP): within the per-structure bound, 20 s of hashing.
    shared = bytearray(b"\x80\x02K\x00q\x00")
    for i in range(21):
        shared += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])
    write_torch_zip(at("shared-key-hashed-again.pt"), bytes(shared + b"0" + b"}h\x15Ns0" * 1000 + b"}."))

    # Keys whose hashes collide: k * (2**61 - 1) all hash to 0 -- in a dict (SETITEMS), and in
    # a frozenset built by REDUCE from a list.
    def long(v):
        e = pickle.encode_long(v)
        return b"\x8a" + bytes([len(e)]) + e
    P = 2**61 - 1
    write_torch_zip(at("colliding-dict-keys.pt"),
                    b"\x80\x02}(" + b"".join(long(k * P) + b"N" for k in range(1, 200)) + b"u.")
    write_torch_zip(at("colliding-frozenset-items.pt"),
                    b"\x80\x02c__builtin__\nfrozenset\n](" + b"".join(long(k * P) for k in range(1, 200))
                    + b"e\x85R.")

    # A size of a thousand references to a 4,300-digit int, in a message: 13 s and 441 MB
    # for 100 KB.
    big = pickle.encode_long(10**4299)
    msg = bytearray(b"\x80\x02ctorch._utils\n_rebuild_tensor\n(")
    msg += b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ"
    msg += b"K\x00" + b"\x8b" + struct.pack("<i", len(big)) + big + b"q\x010"
    msg += b"(" + b"h\x01" * 1000 + b"t" + b"(K\x01t" + b"tR."
    write_torch_zip(at("huge-size-in-a-message.pt"), bytes(msg), {"0": b"\0" * 4})

    # Empty arrays whose other sizes numpy cannot address ("array is too big"), each format.
    empty = tensor(Storage("FloatStorage", "0", 1), 0, (0, 2**60, 2**60), (1, 1, 1))
    write_torch_zip(at("empty-tensor-unaddressable.pt"), dumps({"w": empty}), {"0": b"\0" * 4})
    _npz(at("npz-empty-unaddressable.npz"),
         [("a.npy", _npy({"descr": "<f4", "fortran_order": False, "shape": (0, 2**40, 2**40)}))])
    header = json.dumps({"a": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}).encode()
    open(at("safetensors-empty-unaddressable.safetensors"), "wb").write(struct.pack("<Q", len(header)) + header)

    # A pickle deflated a thousand times: the walk took 10 s for a 10 KB file.
    _deflated_torch_zip(at("pickle-deflated-1000-times.pt"), b"\x80\x02" + b"N0" * 5_000_000 + b"N.")

    # .npy dtypes numpy reshapes: zero-size items ('S0' widened to 'S1': 4 GiB from 185
    # bytes) and a subarray dtype (the array's shape grows).
    _npz(at("npz-zero-size-items.npz"),
         [("a.npy", _npy({"descr": "|S0", "fortran_order": False, "shape": (2**32,)}))])
    _npz(at("npz-subarray-dtype.npz"),
         [("a.npy", _npy({"descr": "(2,)<f4", "fortran_order": False, "shape": (3,)},
                         b"\0" * 24))])


def seeds():
    """Valid files of the shapes the fuzzers should start from, beyond tests/data's."""
    os.makedirs(SEEDS, exist_ok=True)
    at = lambda name: os.path.join(SEEDS, name)  # noqa: E731
    values = struct.pack(">4f", 1.0, -2.0, 3.5, 0.25)
    storage = Storage("FloatStorage", "0", 4)
    tree = {"w": tensor(storage, 0, (2, 2), (1, 2)), "e": tensor(storage, 1, (3, 2), (0, 1)),
            "n": tensor(storage, 0, (4,), (1,), metadata={"neg": True})}
    write_torch_zip(at("big-endian-views.pt"), dumps(tree), {"0": values}, byteorder=b"big")
    pkl, data = _float([1.0, 2.0, 3.0])
    _deflated_torch_zip(at("deflated.pt"), pkl, [("0", data)])
    import numpy as np
    buffer = io.BytesIO()
    np.savez_compressed(buffer, f=np.asfortranarray(np.arange(6, dtype=">f8").reshape(2, 3)),
                        s=np.zeros(2, dtype=[("a", "<i4"), ("b", "<f2")]), z=np.zeros((0, 3)))
    open(at("compressed.npz"), "wb").write(buffer.getvalue())


if __name__ == "__main__":
    zipfile.time.time = lambda: 315_576_000.0  # (1980-01-01: the same bytes at every run)
    main()
    review()
    seeds()
