"""fastbn.load_checkpoint, read_checkpoint and BatchNorm*.from_state_dict, without torch.

The fixtures in tests/data/ were written by torch, and expected.npz holds what each of their
tensors must load as (tests/data/make_checkpoints.py regenerates both), so these tests run
without torch; test_checkpoint_torch.py compares with torch itself when it is installed.
Archives made by hand (checkpoint_craft.py) cover what torch never writes: malicious pickles,
storages out of range, big-endian data.
"""

import collections
import copyreg
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastbn
from fastbn import _reference as ref
from fastbn.checkpoint import (STATE_DICT_KEYS, CheckpointError, UnsafeCheckpointError, load_checkpoint,
                               read_checkpoint)

from checkpoint_craft import Call, Global, Raw, Storage, dumps, rewrite_member, tensor, write_torch_zip
from conftest import assert_close

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FIXTURES = {"resnet_like": "resnet_like.pt", "views": "views.pt", "dtypes": "dtypes.pt",
            "legacy": "legacy.pt", "dtypes_safetensors": "dtypes.safetensors"}
EXPECTED = np.load(os.path.join(DATA, "expected.npz"))
BN_PREFIXES = ("bn1.", "layer1.0.bn1.", "layer1.0.bn2.")


def fixture(name):
    return os.path.join(DATA, FIXTURES[name])


def expected_of(stem):
    """{key path: expected array} for one fixture file, in the saved order."""
    return {tuple(k.split("|")[1:]): EXPECTED[k] for k in EXPECTED.files if k.split("|")[0] == stem}


def assert_same_array(actual, expected, what):
    """Same dtype, shape and bytes, as a C-contiguous native array that owns its memory."""
    assert isinstance(actual, np.ndarray), f"{what}: got {type(actual).__name__}, not an array"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert actual.tobytes() == expected.tobytes(), f"{what}: values differ:\n{actual}\nexpected\n{expected}"
    assert actual.dtype.isnative and actual.flags.c_contiguous and actual.flags.writeable, \
        f"{what}: not a writeable native C-contiguous array ({actual.flags})"


def f32(*values):
    return np.array(values, dtype="<f4").tobytes()


def one_tensor_archive(path, size, stride, offset=0, numel=4, data=None, **storage_kw):
    """A torch.save-like archive holding {"t": tensor} over a float32 storage of `numel`."""
    storage = Storage("FloatStorage", "0", numel, **storage_kw)
    data = f32(*range(numel)) if data is None else data
    return write_torch_zip(path, dumps({"t": tensor(storage, offset, size, stride)}), {"0": data})


# -- the torch-written fixtures --------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"bfloat16": "float32"}], ids=["default", "bfloat16=float32"])
@pytest.mark.parametrize("stem", list(FIXTURES))
def test_fixture_tensors_load_exactly(stem, options):
    if stem.endswith("safetensors"):
        pytest.importorskip("safetensors")
    expected = expected_of(stem)
    assert expected, f"expected.npz has nothing for {stem}"
    tree = read_checkpoint(fixture(stem), **options)
    for path, want in expected.items():
        got = tree
        for k in path:
            got = got[k]
        assert_same_array(got, want, f"{FIXTURES[stem]}: {'/'.join(path)}")


def test_nested_checkpoint_gives_its_state_dict_in_order():
    sd = load_checkpoint(fixture("resnet_like"))
    want = [path[1] for path in expected_of("resnet_like")]
    assert isinstance(sd, collections.OrderedDict)
    assert list(sd) == want, f"keys {list(sd)} != the saved state_dict's {want}"
    assert "epoch" not in sd, "a non-tensor entry of the checkpoint leaked into the state_dict"
    assert int(sd["bn1.num_batches_tracked"]) == 3 and sd["bn1.num_batches_tracked"].shape == ()


def test_read_checkpoint_keeps_the_whole_object():
    tree = read_checkpoint(fixture("resnet_like"))
    assert set(tree) == {"state_dict", "epoch"}
    assert tree["epoch"] == 3 and type(tree["epoch"]) is int
    assert isinstance(tree["state_dict"], collections.OrderedDict)


def test_torch_metadata_is_kept_as_on_torchs_state_dict():
    sd = load_checkpoint(fixture("resnet_like"))
    assert sd._metadata["layer1.0.bn1"] == {"version": 2}, sd._metadata
    assert sd._metadata["conv1"] == {"version": 1}, sd._metadata


def test_legacy_format_loads_as_the_zip_format():
    zip_sd = load_checkpoint(fixture("resnet_like"))
    legacy_sd = load_checkpoint(fixture("legacy"))
    assert list(legacy_sd) == list(zip_sd)
    for k in zip_sd:
        assert_same_array(legacy_sd[k], zip_sd[k], f"legacy.pt {k}")
    assert legacy_sd._metadata == zip_sd._metadata
    assert read_checkpoint(fixture("legacy"))["epoch"] == 3


@pytest.mark.parametrize("key", ["state_dict", ("state_dict",), ["state_dict"]])
def test_key_selects_the_entry(key):
    sd = load_checkpoint(fixture("resnet_like"), key=key)
    assert list(sd) == list(load_checkpoint(fixture("resnet_like")))


def test_key_path_descends_several_levels():
    views = load_checkpoint(fixture("legacy"), key=("views",))
    assert_same_array(views["transposed"], EXPECTED["views|transposed"], "legacy views/transposed")


def test_missing_key_lists_the_keys():
    with pytest.raises(ValueError) as info:
        load_checkpoint(fixture("resnet_like"), key="ema")
    message = str(info.value)
    for part in ("'ema'", "'state_dict' (OrderedDict, 20 entries)", "'epoch' (int)", "resnet_like.pt"):
        assert part in message, f"{part!r} not in {message!r}"


def test_key_into_a_non_mapping_is_an_error():
    with pytest.raises(ValueError, match=r"\['epoch'\], which is a int, not a mapping"):
        load_checkpoint(fixture("resnet_like"), key=("epoch", "x"))
    with pytest.raises(ValueError, match=r"\['epoch'\] is a int, not a mapping of arrays"):
        load_checkpoint(fixture("resnet_like"), key="epoch")
    with pytest.raises(TypeError, match="key must be a string"):
        load_checkpoint(fixture("resnet_like"), key=3)


# -- the nested-checkpoint rule, on hand-made archives ---------------------------------------

def a_tensor(key="0", values=(1.0, 2.0)):
    return tensor(Storage("FloatStorage", key, len(values)), 0, (len(values),), (1,)), f32(*values)


@pytest.mark.parametrize("conventional", STATE_DICT_KEYS)
def test_conventional_entries_are_found(tmp_path, conventional):
    t, data = a_tensor()
    path = write_torch_zip(tmp_path / "c.pt", dumps({"epoch": 3, conventional: {"w": t}, "lr": 0.1}),
                           {"0": data})
    sd = load_checkpoint(path)
    assert list(sd) == ["w"], f"{conventional}: got {list(sd)}"
    np.testing.assert_array_equal(sd["w"], [1.0, 2.0])


def test_conventional_entries_are_tried_in_order(tmp_path):
    t0, d0 = a_tensor("0", (0.0,))
    t1, d1 = a_tensor("1", (1.0,))
    t2, d2 = a_tensor("2", (2.0,))
    obj = {"model": {"m": t2}, "model_state_dict": {"msd": t1}, "state_dict": {"sd": t0}}
    path = write_torch_zip(tmp_path / "c.pt", dumps(obj), {"0": d0, "1": d1, "2": d2})
    assert list(load_checkpoint(path)) == ["sd"], f"the order is {STATE_DICT_KEYS}"
    assert list(load_checkpoint(path, key="model")) == ["m"]


def test_conventional_entry_wins_over_stray_top_level_tensors(tmp_path):
    # torch's ImageNet example: {"epoch", "arch", "state_dict", "best_acc1" (a 0-d tensor), ...}
    t, data = a_tensor("0")
    acc = tensor(Storage("FloatStorage", "1", 1), 0, (), ())
    obj = {"epoch": 90, "arch": "resnet18", "state_dict": {"fc.weight": t}, "best_acc1": acc,
           "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    path = write_torch_zip(tmp_path / "c.pt", dumps(obj), {"0": data, "1": f32(76.1)})
    assert list(load_checkpoint(path)) == ["fc.weight"]
    assert list(load_checkpoint(path, key=())) == ["best_acc1"], "key=() is the top level itself"


def test_top_level_with_arrays_is_the_state_dict_without_its_other_entries(tmp_path):
    t, data = a_tensor()
    path = write_torch_zip(tmp_path / "c.pt", dumps({"w": t, "epoch": 3, "state_dict": {}}), {"0": data})
    assert list(load_checkpoint(path)) == ["w"]


def test_no_state_dict_found_lists_the_keys(tmp_path):
    t, data = a_tensor()
    path = write_torch_zip(tmp_path / "c.pt", dumps({"weights": {"w": t}, "epoch": 3}), {"0": data})
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    for part in ("found no state_dict", "'weights' (dict, 1 entry)", "'epoch' (int)", "key="):
        assert part in message, f"{part!r} not in {message!r}"
    assert list(load_checkpoint(path, key="weights")) == ["w"]


def test_a_list_is_read_but_is_no_state_dict(tmp_path):
    t, data = a_tensor()
    path = write_torch_zip(tmp_path / "c.pt", dumps([t, 3]), {"0": data})
    tree = read_checkpoint(path)
    assert isinstance(tree, list) and tree[1] == 3
    np.testing.assert_array_equal(tree[0], [1.0, 2.0])
    with pytest.raises(ValueError, match="is a list, not a mapping"):
        load_checkpoint(path)


def test_empty_checkpoint_is_an_empty_state_dict(tmp_path):
    path = write_torch_zip(tmp_path / "c.pt", dumps(Call(Global("collections", "OrderedDict"))))
    assert load_checkpoint(path) == {}


def test_plain_values_and_torch_objects_convert(tmp_path):
    t, data = a_tensor()
    obj = {
        "size": Call(Global("torch", "Size"), (2, 3)),
        "dtype": Global("torch", "bfloat16"),
        "device": Call(Global("torch", "device"), "cuda", 1),
        "set": Call(Global("__builtin__", "set"), [1, 2]),
        "bytes": Call(Global("_codecs", "encode"), "a\xff", "latin1"),
        "complex": Call(Global("builtins", "complex"), 1.0, 2.0),
        "nested": ({"t": t}, [None, True, 1.5, 2**70]),
        "same": a_tensor()[0],
    }
    tree = read_checkpoint(write_torch_zip(tmp_path / "c.pt", dumps(obj), {"0": data}))
    assert tree["size"] == (2, 3) and type(tree["size"]) is tuple
    assert tree["dtype"] == "torch.bfloat16"
    assert tree["device"] == "cuda:1"
    assert tree["set"] == {1, 2}
    assert tree["bytes"] == b"a\xff"
    assert tree["complex"] == 1 + 2j
    assert tree["nested"][1] == [None, True, 1.5, 2**70]
    np.testing.assert_array_equal(tree["nested"][0]["t"], [1.0, 2.0])
    np.testing.assert_array_equal(tree["same"], [1.0, 2.0])


def test_one_tensor_pickled_twice_is_one_array(tmp_path):
    # torch pickles a tensor referenced twice once, then refers to it (the memo): torch.load
    # gives one tensor, fastbn one array.
    t, data = a_tensor()
    body = dumps({"a": Raw(dumps(t)[2:-1] + b"q\x01"), "b": Raw(b"h\x01")})
    tree = read_checkpoint(write_torch_zip(tmp_path / "c.pt", body, {"0": data}))
    assert tree["a"] is tree["b"]


# -- byte order and element types ------------------------------------------------------------

@pytest.mark.parametrize("byteorder,prefix", [(b"little", "<"), (b"big", ">"), (None, "<")])
def test_byte_order_record(tmp_path, byteorder, prefix):
    values = np.array([1.5, -2.25, 3e30], dtype=np.float32)
    halves = np.array([0.5, -1.0], dtype=np.float16)
    bf16_bits = np.array([0x3FC0, 0xC040], dtype=np.uint16)  # bfloat16 1.5 and -3.0
    longs = np.array([-(2**40), 7], dtype=np.int64)
    obj = {"f": tensor(Storage("FloatStorage", "0", 3), 0, (3,), (1,)),
           "h": tensor(Storage("HalfStorage", "1", 2), 0, (2,), (1,)),
           "bf": tensor(Storage("BFloat16Storage", "2", 2), 0, (2,), (1,)),
           "l": tensor(Storage("LongStorage", "3", 2), 0, (2,), (1,))}
    storages = {"0": values.astype(prefix + "f4").tobytes(), "1": halves.astype(prefix + "f2").tobytes(),
                "2": bf16_bits.astype(prefix + "u2").tobytes(), "3": longs.astype(prefix + "i8").tobytes()}
    sd = load_checkpoint(write_torch_zip(tmp_path / "c.pt", dumps(obj), storages, byteorder=byteorder))
    assert_same_array(sd["f"], values, f"float32, byteorder {byteorder}")
    assert_same_array(sd["h"], halves, f"float16, byteorder {byteorder}")
    assert_same_array(sd["bf"], np.array([1.5, -3.0], np.float32), f"bfloat16, byteorder {byteorder}")
    assert_same_array(sd["l"], longs, f"int64, byteorder {byteorder}")


def test_unknown_byte_order_record_is_an_error(tmp_path):
    bad = write_torch_zip(tmp_path / "d.pt", dumps({}), byteorder=b"middle")
    with pytest.raises(ValueError, match="unknown byte order record b'middle'"):
        read_checkpoint(bad)


def test_bool_storage_bytes_other_than_zero_are_true(tmp_path):
    storage = Storage("BoolStorage", "0", 4)
    path = write_torch_zip(tmp_path / "c.pt", dumps({"b": tensor(storage, 0, (4,), (1,))}),
                           {"0": bytes([0, 1, 2, 255])})
    got = load_checkpoint(path)["b"]
    assert_same_array(got, np.array([False, True, True, True]), "bool storage")
    assert got.view(np.uint8).max() == 1, "bool array holds bytes other than 0 and 1"


@pytest.mark.parametrize("type_name,data,want", [
    ("BoolStorage", b"\x02", np.array(True)),
    ("BFloat16Storage", b"\xc0\x3f", np.array(1.5, np.float32)),
    ("HalfStorage", np.float16(-2).tobytes(), np.array(-2, np.float16)),
    ("ComplexFloatStorage", np.complex64(1 - 1j).tobytes(), np.array(1 - 1j, np.complex64)),
])
def test_zero_dim_tensors_are_arrays_not_scalars(tmp_path, type_name, data, want):
    t = tensor(Storage(type_name, "0", 1), 0, (), ())
    got = load_checkpoint(write_torch_zip(tmp_path / "c.pt", dumps({"t": t}), {"0": data}))
    assert_same_array(got["t"], want, f"0-d {type_name}")


@pytest.mark.parametrize("dtype,np_dtype", [("uint16", "<u2"), ("uint32", "<u4"), ("uint64", "<u8"),
                                            ("float32", "<f4"), ("int16", "<i2")])
def test_rebuild_tensor_v3_over_an_untyped_storage(tmp_path, dtype, np_dtype):
    values = np.arange(6, dtype=np_dtype) * 3
    storage = Storage("UntypedStorage", "0", values.nbytes, module="torch.storage")
    t = tensor(storage, 1, (2, 2), (1, 2), function="_rebuild_tensor_v3", dtype=dtype)
    got = load_checkpoint(write_torch_zip(tmp_path / "c.pt", dumps({"t": t}), {"0": values.tobytes()}))["t"]
    want = np.lib.stride_tricks.as_strided(values[1:], (2, 2), (values.itemsize, 2 * values.itemsize))
    assert_same_array(got, want.astype(np_dtype[1:]), f"v3 {dtype}")


def test_unsupported_dtype_names_it(tmp_path):
    storage = Storage("UntypedStorage", "0", 2, module="torch.storage")
    t = tensor(storage, 0, (2,), (1,), function="_rebuild_tensor_v3", dtype="float8_e4m3fn")
    path = write_torch_zip(tmp_path / "c.pt", dumps({"t": t}), {"0": b"\x00\x01"})
    with pytest.raises(ValueError, match=r"dtype torch\.float8_e4m3fn are not supported"):
        read_checkpoint(path)


@pytest.mark.parametrize("type_name,match", [
    (Global("torch", "QInt8Storage"), r"torch\.QInt8Storage is not supported"),
    (Global("collections", "OrderedDict"), "unknown storage type"),
    (Raw(dumps("nonsense")[2:-1]), "unknown storage type 'nonsense'"),
])
def test_unknown_storage_types_are_named(tmp_path, type_name, match):
    storage = Storage(type_name, "0", 1)
    path = write_torch_zip(tmp_path / "c.pt", dumps({"t": tensor(storage, 0, (1,), (1,))}), {"0": b"\0" * 4})
    with pytest.raises(ValueError, match=match):
        read_checkpoint(path)


def test_conj_and_neg_metadata_are_applied(tmp_path):
    values = np.array([1 + 2j, 3 - 4j], dtype=np.complex64)
    obj = {"conj": tensor(Storage("ComplexFloatStorage", "0", 2), 0, (2,), (1,), metadata={"conj": True}),
           "neg": tensor(Storage("FloatStorage", "1", 2), 0, (2,), (1,), metadata={"neg": True})}
    sd = load_checkpoint(write_torch_zip(tmp_path / "c.pt", dumps(obj),
                                         {"0": values.tobytes(), "1": f32(1.0, -2.0)}))
    assert_same_array(sd["conj"], values.conj(), "conj bit")
    assert_same_array(sd["neg"], np.array([-1.0, 2.0], np.float32), "neg bit")
    bad = tensor(Storage("FloatStorage", "1", 2), 0, (2,), (1,), metadata={"quantized": True})
    with pytest.raises(ValueError, match="unsupported tensor metadata"):
        read_checkpoint(write_torch_zip(tmp_path / "d.pt", dumps({"t": bad}), {"1": f32(1.0, 2.0)}))


def test_parameters_and_old_rebuild_function(tmp_path):
    storage = Storage("FloatStorage", "0", 4)
    obj = {"p": Call(Global("torch._utils", "_rebuild_parameter"),
                     tensor(storage, 0, (4,), (1,)), True, Call(Global("collections", "OrderedDict"))),
           "ps": Call(Global("torch._utils", "_rebuild_parameter_with_state"),
                      tensor(storage, 1, (2,), (1,)), True, Call(Global("collections", "OrderedDict")),
                      {"tag": "x"}),
           "v1": tensor(storage, 2, (2,), (1,), function="_rebuild_tensor")}
    sd = load_checkpoint(write_torch_zip(tmp_path / "c.pt", dumps(obj), {"0": f32(0, 1, 2, 3)}))
    assert_same_array(sd["p"], np.arange(4, dtype=np.float32), "_rebuild_parameter")
    assert_same_array(sd["ps"], np.array([1, 2], np.float32), "_rebuild_parameter_with_state")
    assert_same_array(sd["v1"], np.array([2, 3], np.float32), "_rebuild_tensor")


# -- storage geometry: every read stays inside the storage -----------------------------------

@pytest.mark.parametrize("numel,offset,size,stride,match", [
    (4, 0, (5,), (1,), "out of bounds"),
    (4, 4, (1,), (1,), "out of bounds"),
    (4, 1, (2, 2), (2, 1), "out of bounds"),  # last element 1 + 2 + 1 = 4
    (4, 0, (2,), (4,), "out of bounds"),
    (0, 0, (1,), (1,), "out of bounds"),
    (4, 5, (0,), (1,), "out of bounds"),  # even an empty tensor may not start past the end
    (4, -1, (2,), (1,), "storage_offset must be non-negative"),
    (4, 0, (2,), (-1,), "stride must be non-negative"),
    (4, 0, (-2,), (1,), "size must be non-negative"),
    (4, 0, (2.0,), (1,), "size must be an int, got float"),
    (4, True, (2,), (1,), "storage_offset must be an int, got bool"),
    (4, 0, (2, 2), (1,), "different lengths"),
    (4, 0, "ab", (1,), "size must be a tuple"),
    (4, 0, (2**62, 2**62), (0, 0), "too large"),
    (4, 0, (1,) * 65, (0,) * 65, "65 dimensions"),
])
def test_out_of_range_geometry_is_refused_not_read(tmp_path, numel, offset, size, stride, match):
    path = one_tensor_archive(tmp_path / "c.pt", size, stride, offset, numel=numel)
    with pytest.raises(ValueError, match=match):
        read_checkpoint(path)


@pytest.mark.parametrize("numel,offset,size,stride,want", [
    (4, 4, (0,), (1,), np.zeros(0, np.float32)),  # empty, just past the end: allowed
    (4, 3, (1,), (1,), np.float32([3])),
    (4, 0, (2, 2), (1, 2), np.float32([[0, 2], [1, 3]])),  # a transpose
    (4, 1, (3, 2), (0, 2), np.float32([[1, 3]] * 3)),  # an expanded view
    (4, 2, (), (), np.float32(2)),  # 0-d
])
def test_in_range_geometry_reads_the_right_elements(tmp_path, numel, offset, size, stride, want):
    got = load_checkpoint(one_tensor_archive(tmp_path / "c.pt", size, stride, offset, numel=numel))["t"]
    assert_same_array(got, np.asarray(want), f"offset {offset} size {size} stride {stride}")


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(0, 12), offset=st.integers(0, 14),
       dims=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6)), max_size=3))
def test_any_geometry_reads_storage_elements_or_is_refused(tmp_path_factory, numel, offset, dims):
    """Each element (i_0, i_1, ...) is storage[offset + sum(i_k * stride_k)], or the tensor
    addresses something outside the storage and loading it is a ValueError."""
    size = tuple(n for n, _ in dims)
    stride = tuple(s for _, s in dims)
    storage = np.arange(numel, dtype=np.float32) + 0.5
    path = one_tensor_archive(tmp_path_factory.mktemp("g") / "c.pt", size, stride, offset,
                              numel=numel, data=storage.tobytes())
    indices = list(np.ndindex(*size))
    flat = [offset + sum(i * s for i, s in zip(index, stride)) for index in indices]
    in_bounds = offset <= numel if not indices else max(flat) < numel
    if not in_bounds:
        with pytest.raises(ValueError, match="out of bounds"):
            read_checkpoint(path)
        return
    got = load_checkpoint(path)["t"]
    want = np.array([storage[j] for j in flat], dtype=np.float32).reshape(size)
    assert_same_array(got, want, f"offset {offset} size {size} stride {stride} storage {numel}")


@pytest.mark.parametrize("data,match", [
    (f32(1, 2, 3), r"holds 12 bytes, but its storage record says 4 float32 elements \(16 bytes\)"),
    (f32(1, 2, 3, 4, 5), "holds 20 bytes"),
])
def test_storage_member_of_the_wrong_size_is_an_error(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        read_checkpoint(one_tensor_archive(tmp_path / "c.pt", (2,), (1,), data=data))


def test_missing_storage_member_is_an_error(tmp_path):
    t = tensor(Storage("FloatStorage", "7", 2), 0, (2,), (1,))
    with pytest.raises(ValueError, match="storage '7' has no member 'archive/data/7'"):
        read_checkpoint(write_torch_zip(tmp_path / "c.pt", dumps({"t": t})))


def test_one_storage_recorded_two_ways_is_an_error(tmp_path):
    obj = {"a": tensor(Storage("FloatStorage", "0", 4), 0, (2,), (1,)),
           "b": tensor(Storage("FloatStorage", "0", 2), 0, (2,), (1,))}
    with pytest.raises(ValueError, match="storage '0' is recorded both as 4 float32 and as 2 float32"):
        read_checkpoint(write_torch_zip(tmp_path / "c.pt", dumps(obj), {"0": f32(1, 2, 3, 4)}))


@pytest.mark.parametrize("record,match", [
    (Raw(dumps(("module", "Net", "net.py", "class Net: ..."))[2:-1] + b"Q"),
     r"torch\.save\(model\)"),
    (Raw(dumps("just a string")[2:-1] + b"Q"), "unknown persistent record"),
    (Raw(dumps(("storage", Global("torch", "FloatStorage"), "0", "cpu"))[2:-1] + b"Q"),
     "a storage record has 4 fields, expected 5"),
    (Raw(dumps(("storage", Global("torch", "FloatStorage"), 0, "cpu", 1))[2:-1] + b"Q"),
     "a storage key must be a non-empty string"),
])
def test_malformed_persistent_records_are_errors(tmp_path, record, match):
    with pytest.raises(ValueError, match=match):
        read_checkpoint(write_torch_zip(tmp_path / "c.pt", dumps({"x": record})))


def test_build_cannot_alter_a_tensor_or_storage(tmp_path):
    # BUILD (pickle's setstate) on a validated tensor would let a file swap its geometry after
    # the bounds check; the placeholders refuse it.
    t = tensor(Storage("FloatStorage", "0", 2), 0, (2,), (1,))
    state = (None, {"size": (1000,), "stride": (1,)})
    body = dumps({"t": Raw(dumps(t)[2:-1] + dumps(state)[2:-1] + b"b")})
    with pytest.raises(ValueError, match="tries to set the state of a tensor"):
        read_checkpoint(write_torch_zip(tmp_path / "c.pt", body, {"0": f32(1, 2)}))


# -- unsafe pickles --------------------------------------------------------------------------

class _Touch:
    """Creates a file when constructed: the payload of a pickle that abuses __reduce__."""

    def __init__(self, path):
        open(path, "w").close()

    def __reduce__(self):
        return (_Touch, (self.path,))


class _Reduce:
    """Pickles as the call func(*args), whatever func is."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _touch_object(path):
    obj = _Touch.__new__(_Touch)
    obj.path = path
    return obj


def payloads(marker):
    """(name, pickle bytes, the global the message must name) of pickles that, unpickled by
    pickle.load, would create `marker`."""
    touch = f"touch {marker}"
    system = f"{os.system.__module__}.system"
    module = _Touch.__module__
    yield "os.system", pickle.dumps(_Reduce(os.system, touch), protocol=2), system
    yield "os.system, protocol 0", pickle.dumps(_Reduce(os.system, touch), protocol=0), system
    yield "os.system, protocol 4 (STACK_GLOBAL)", pickle.dumps(_Reduce(os.system, touch), protocol=4), system
    yield "os.system, protocol 5", pickle.dumps(_Reduce(os.system, touch), protocol=5), system
    # (protocols 0-2 write builtins under its Python 2 name, __builtin__: both are tried)
    yield "builtins.eval", pickle.dumps(_Reduce(eval, f"open({str(marker)!r}, 'w')"), protocol=4), "builtins.eval"
    yield "builtins.exec", pickle.dumps(_Reduce(exec, f"open({str(marker)!r}, 'w')"), protocol=4), "builtins.exec"
    yield "subprocess.Popen", pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]), protocol=4), \
        "subprocess.Popen"
    # Protocol 2 writes Popen under its Python 2 name, which pickle.load maps back to
    # subprocess.Popen; the allow-list applies no such mapping.
    yield "commands.Popen", pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]), protocol=2), \
        "commands.Popen"
    yield "a class's __reduce__", pickle.dumps(_touch_object(str(marker)), protocol=2), f"{module}._Touch"
    yield "Python 2 name __builtin__.eval", \
        dumps(Call(Global("__builtin__", "eval"), f"open({str(marker)!r}, 'w')")), "__builtin__.eval"
    getattr_chain = Call(Call(Global("builtins", "getattr"),
                              Call(Global("builtins", "__import__"), "os"), "system"), touch)
    yield "builtins.getattr chain", dumps(getattr_chain), "builtins.getattr"
    yield "importlib.import_module", \
        dumps(Call(Global("importlib", "import_module"), "antigravity")), "importlib.import_module"
    yield "INST opcode", f"(S'{touch}'\nios\nsystem\n.".encode(), "os.system"
    yield "copyreg._reconstructor", dumps(Call(Global("copyreg", "_reconstructor"),
                                               Global(module, "_Touch"), Global("builtins", "object"), None)), \
        "copyreg._reconstructor"
    yield "torch.storage._load_from_bytes (calls torch.load)", \
        dumps(Call(Global("torch.storage", "_load_from_bytes"), "payload")), "torch.storage._load_from_bytes"
    yield "an attribute path in the name", dumps(Call(Global("torch", "_utils.os.system"), touch)), \
        "torch._utils.os.system"
    t, _ = a_tensor()
    yield "after a valid tensor", dumps({"ok": t, "evil": Call(Global("os", "system"), touch)}), "os.system"
    yield "as a storage type", dumps({"t": tensor(Storage(Global("os", "system"), "0", 1), 0, (1,), (1,))}), \
        "os.system"


PAYLOAD_NAMES = [name for name, _, _ in payloads("x")]


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_malicious_pickle_in_a_torch_archive_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "pwned"
    data_pkl, refused = next((p, g) for n, p, g in payloads(marker) if n == name)
    path = write_torch_zip(tmp_path / "evil.pt", data_pkl, {"0": f32(1, 2)})
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert isinstance(info.value, pickle.UnpicklingError)
    message = str(info.value)
    assert f"refusing to load global '{refused}'" in message, message
    assert "Nothing from the checkpoint was run" in message
    assert not marker.exists(), f"{name}: the payload ran"


def test_the_payloads_do_run_under_plain_pickle(tmp_path):
    # The refusals above mean something only if the payloads work: one of them, unpickled by
    # pickle itself, creates its file.
    marker = tmp_path / "pwned"
    data_pkl = next(p for n, p, _ in payloads(marker) if n == "a class's __reduce__")
    pickle.loads(data_pkl)
    assert marker.exists(), "the payload did not run under pickle.loads: the test proves nothing"


def test_extension_registry_goes_through_the_allow_list(tmp_path):
    marker = tmp_path / "pwned"
    copyreg.add_extension("os", "system", 0xBEEF)
    try:
        data_pkl = (b"\x80\x02\x83" + struct.pack("<H", 0xBEEF)  # EXT2, the arguments, REDUCE
                    + dumps((f"touch {marker}",))[2:-1] + b"R.")
        with pytest.raises(UnsafeCheckpointError, match="'os.system'"):
            read_checkpoint(write_torch_zip(tmp_path / "evil.pt", data_pkl))
    finally:
        copyreg.remove_extension("os", "system", 0xBEEF)
    assert not marker.exists()


def test_malicious_raw_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_malicious_pickle_in_the_legacy_format_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    header = b"".join(pickle.dumps(v, protocol=2) for v in
                      (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}))
    path = tmp_path / "evil_legacy.pt"
    path.write_bytes(header + pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("refused,hint", [
    ("torch._utils._rebuild_qtensor", "quantized tensors are not supported"),
    ("torch._utils._rebuild_sparse_tensor", "sparse tensors are not supported"),
    ("torch._tensor._rebuild_from_type_v2", "tensors with Python attributes"),
    ("torch.nn.modules.conv.Conv2d", r"save model\.state_dict\(\) instead"),
    ("numpy._core.multiarray._reconstruct", "OrderedDict and plain containers"),
])
def test_refused_torch_globals_say_why(tmp_path, refused, hint):
    module, name = refused.rsplit(".", 1)
    path = write_torch_zip(tmp_path / "c.pt", dumps(Call(Global(module, name))))
    with pytest.raises(UnsafeCheckpointError, match=hint) as info:
        read_checkpoint(path)
    assert f"'{refused}'" in str(info.value)


@pytest.mark.parametrize("call,match", [
    (Call(Global("_codecs", "encode"), "x", "rot13"), "only allowed for latin1"),
    (Call(Global("builtins", "bytearray"), 10**12), "only allowed from text or bytes"),
    (Call(Global("torch", "device"), 3), "is not a device"),
    (Call(Global("torch._utils", "_rebuild_parameter"), "not a tensor", False, None), "must wrap a tensor"),
    (Call(Global("torch._utils", "_rebuild_tensor_v2"), "no storage", 0, (1,), (1,), False, None),
     "must be a storage record"),
    (Call(Global("torch._utils", "_rebuild_tensor_v3"), "s", 0, (1,), (1,), False, None, "float32"),
     "expects a torch dtype"),
])
def test_allowed_globals_refuse_misuse(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        read_checkpoint(write_torch_zip(tmp_path / "c.pt", dumps({"x": call})))


def test_deeply_nested_pickle_is_an_error_not_a_crash(tmp_path):
    body = b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."  # lists in lists
    with pytest.raises(ValueError, match="nested too deeply"):
        read_checkpoint(write_torch_zip(tmp_path / "c.pt", body))


# -- hostile files: findings of a fuzz campaign, each a regression test ----------------------

def _float_checkpoint(values):
    """A torch.save-style archive's (data.pkl, storages) holding {'w': float32 values}."""
    data = np.asarray(values, np.float32)
    pkl = dumps({"w": tensor(Storage("FloatStorage", "0", data.size), 0, (data.size,), (1,))})
    return pkl, {"0": data.tobytes()}


def test_a_member_shorter_than_its_header_is_an_error_not_an_out_of_bounds_read(tmp_path):
    # zipfile returns a member short, without error, when its header claims more bytes than
    # it holds and the CRC is that of what it holds; numpy then read past the buffer.
    from fastbn._readers import arrays, placeholders
    pkl, storages = _float_checkpoint(np.arange(60))
    short = {"0": storages["0"][:8]}  # 2 of the 60 values
    stored = rewrite_member(write_torch_zip(tmp_path / "stored.pt", pkl, short),
                            "archive/data/0", file_size=240)
    with pytest.raises(CheckpointError, match="stored uncompressed, but its header says it holds "
                                              "8 bytes and unpacks to 240"):
        read_checkpoint(stored)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", short["0"])
    rewrite_member(deflated, "archive/data/0", file_size=240)
    with pytest.raises(CheckpointError, match="holds 8 bytes although its header says 240"):
        read_checkpoint(deflated)
    # and, whatever a reader returns, no view reaches past the bytes at hand
    storage = placeholders.Storage("0", "float32", 60)
    view = placeholders.Tensor(storage, 0, (60,), (1,), "float32")
    with pytest.raises(ValueError, match="reaches element 59 of storage '0', which holds 2"):
        arrays.build_array(view, short["0"], "<")


def test_a_pickle_cannot_change_the_functions_it_is_allowed_to_call(tmp_path):
    # BUILD onto the allowed _rebuild_tensor_v2 once set its __defaults__ (metadata
    # {'neg': True}): every later load in the process came back negated.
    from fastbn._readers import unpickler
    out = bytearray(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n")
    for state in [(None, {"__defaults__": (False, None, {"neg": True})}),
                  {"__defaults__": (False, None, {"neg": True})}]:
        body = bytes(out) + dumps(state)[2:-1] + b"b0" + dumps({"x": 1})[2:]
        with pytest.raises(ValueError, match="tries to set the state of a function"):
            read_checkpoint(write_torch_zip(tmp_path / "evil.pt", body))
    pkl, storages = _float_checkpoint([1.0, 2.0])
    good = read_checkpoint(write_torch_zip(tmp_path / "good.pt", pkl, storages))
    np.testing.assert_array_equal(good["w"], [1.0, 2.0])
    assert unpickler._rebuild_tensor_v2.__defaults__ == (False, None, None)


def _read_in_a_subprocess(path, timeout):
    """read_checkpoint(path) in a fresh Python, printing a ValueError: a file that crashed or
    hung the reader fails the test that reads it, not the session."""
    code = ("import sys, fastbn\n"
            "try:\n    fastbn.read_checkpoint(sys.argv[1])\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=timeout)


def test_a_deeply_nested_tuple_as_a_dict_key_is_an_error_not_a_crash(tmp_path):
    # Hashing a tuple nested 300,000 deep recursed in C past the stack: a segfault.  Run in a
    # subprocess, so that a regression fails this test instead of the session.
    body = b"\x80\x02}" + b")" + b"\x85" * 300_000 + b"Ns."  # {((((...),),),): None}
    path = write_torch_zip(tmp_path / "deep.pt", body)
    result = _read_in_a_subprocess(path, timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert "nested too deeply" in result.stdout, result.stdout


def test_a_huge_memo_index_is_refused_before_it_is_allocated(tmp_path):
    # LONG_BINPUT 0xFFFFFFF0 made the unpickler allocate a memo table of 4 Gi entries.
    body = b"\x80\x02N" + b"r" + struct.pack("<I", 0xFFFFFFF0) + b"."
    with pytest.raises(ValueError, match="memo index 4294967280 out of proportion"):
        read_checkpoint(write_torch_zip(tmp_path / "memo.pt", body))


def _shared_lists(levels):
    """L0 = [], L(k+1) = [Lk, Lk], each memoized before it is filled, as picklers write lists:
    a few bytes a level, 2**levels objects when the sharing is followed (repr, comparison)."""
    index = [struct.pack("<I", k) for k in range(levels + 1)]
    body = bytearray(b"\x80\x02]r" + index[0])  # EMPTY_LIST, LONG_BINPUT
    for k in range(levels):  # EMPTY_LIST, LONG_BINPUT, MARK, LONG_BINGET twice, APPENDS
        body += b"]r" + index[k + 1] + b"(j" + index[k] + b"j" + index[k] + b"e"
    return bytes(body + b".")


def _shared_tuple_key(levels):
    """{T: None}, T0 = (), T(k+1) = (Tk, Tk): hashing T walks 2**levels tuples."""
    index = [struct.pack("<I", k) for k in range(levels + 1)]
    body = bytearray(b"\x80\x02})r" + index[0] + b"0")  # EMPTY_DICT; EMPTY_TUPLE, PUT, POP
    for k in range(levels):  # LONG_BINGET twice, TUPLE2, LONG_BINPUT, POP
        body += b"j" + index[k] + b"j" + index[k] + b"\x86r" + index[k + 1] + b"0"
    return bytes(body + b"j" + index[levels] + b"Ns.")  # the key, None, SETITEM


@pytest.mark.parametrize("make", [_shared_lists, _shared_tuple_key])
def test_shared_structures_are_refused_before_they_are_expanded(tmp_path, make):
    # 60 levels: 2**60 objects once the sharing is followed.  Before, printing such a list in
    # a message or hashing such a tuple as a dict key ran for ever (in a subprocess, so that a
    # regression fails this test by its timeout rather than hanging the session).
    small = read_checkpoint(write_torch_zip(tmp_path / "small.pt", make(8)))
    assert small is not None  # a little sharing is data
    path = write_torch_zip(tmp_path / "shared.pt", make(60))
    result = _read_in_a_subprocess(path, timeout=60)
    assert "shared references expand to more than" in result.stdout, (result.stdout,
                                                                       result.stderr[-2000:])


def test_a_pickle_the_walk_cannot_parse_is_refused_not_passed_on(tmp_path):
    # The unpickler reads INT '0x10' (strtol, base 0), pickletools does not: a walk that
    # stopped there quietly left what follows unchecked -- here a key nested a million deep,
    # which segfaulted.  (In a subprocess: a regression must fail the test, not the session.)
    body = b"\x80\x02}" + b"I0x10\n0" + b"N" + b"\x85" * 10**6 + b"Ns."
    path = write_torch_zip(tmp_path / "hex.pt", body)
    result = _read_in_a_subprocess(path, timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert "malformed pickle" in result.stdout, result.stdout


def test_pop_on_a_mark_is_walked_as_the_unpickler_runs_it(tmp_path):
    # MARK, x, MARK, POP, TUPLE builds (x,): POP removes the mark.  A walk that kept the mark
    # saw () at every level and let a key nested a million deep through (a segfault).
    level = b"q\x000(h\x00(0t"  # PUT 0, POP; MARK, GET 0, MARK, POP, TUPLE: T(k+1) = (Tk,)
    body = b"\x80\x02})" + level * 1_000_000 + b"Ns."  # {T: None}
    result = _read_in_a_subprocess(write_torch_zip(tmp_path / "pop.pt", body), timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert "nested too deeply" in result.stdout, result.stdout


def test_a_container_that_grows_after_it_was_placed_is_refused(tmp_path):
    # Lists placed in their parents empty and filled afterwards, deepest last, hid 2**60
    # objects from a count that was taken when they were placed.
    body = bytearray(b"\x80\x02")
    levels = 60
    for k in range(levels + 1):  # L0 ... L60, each EMPTY_LIST, LONG_BINPUT k
        body += b"]r" + struct.pack("<I", k)
    for k in range(levels, 0, -1):  # fill L60 first: two copies of L(k-1), still empty
        body += (b"j" + struct.pack("<I", k) + b"(j" + struct.pack("<I", k - 1)
                 + b"j" + struct.pack("<I", k - 1) + b"e0")  # GET Lk, MARK, 2 GETs, APPENDS, POP
    body += b"j" + struct.pack("<I", levels) + b"."
    with pytest.raises(ValueError, match="grows after it was placed in another"):
        read_checkpoint(write_torch_zip(tmp_path / "stale.pt", bytes(body)))


def test_fuzzed_tensor_geometries_are_value_errors(tmp_path):
    # Found by a mutation fuzz run: an empty tensor with a size of 2**63 elsewhere passed the
    # bounds checks and numpy raised OverflowError; the negative bit on a bool tensor made
    # np.negative raise TypeError.
    empty = dumps({"t": tensor(Storage("FloatStorage", "0", 1), 0, (0, 2**63), (1, 1))})
    with pytest.raises(ValueError, match="too large to address"):
        read_checkpoint(write_torch_zip(tmp_path / "empty.pt", empty, {"0": b"\0" * 4}))
    negated = dumps({"t": tensor(Storage("BoolStorage", "0", 2), 0, (2,), (1,),
                                 metadata={"neg": True})})
    with pytest.raises(ValueError, match="negative bit"):
        read_checkpoint(write_torch_zip(tmp_path / "neg.pt", negated, {"0": b"\1\0"}))


def test_many_objects_without_sharing_are_data(tmp_path, monkeypatch):
    # The expansion bound is on sharing, in proportion to the pickle: a list far longer than
    # MAX_EXPANSION (lowered here, so that the test stays small) is data.
    from fastbn._readers import pickle_walk
    monkeypatch.setattr(pickle_walk, "MAX_EXPANSION", 1000)
    body = dumps({"losses": list(range(50_000))})
    assert len(read_checkpoint(write_torch_zip(tmp_path / "long.pt", body))["losses"]) == 50_000
    with pytest.raises(ValueError, match="shared references expand"):
        read_checkpoint(write_torch_zip(tmp_path / "shared.pt", _shared_lists(30)))


def test_messages_never_expand_what_they_describe():
    from fastbn._readers.errors import shown
    nested = []
    for _ in range(200):
        nested = [nested, nested]  # 2**200 lists if printed
    assert shown(nested) == "<list of 2 items>"
    assert shown(10 ** 5000).startswith("<int of ")  # (str() of it would raise)
    assert shown("x" * 10 ** 6).endswith("... (1000000 long)")


def test_bytearray_takes_latin1_text_or_bytes_only(tmp_path):
    # Any codec was accepted: punycode decoding 16 KB took 17 s.
    def build(*args):
        return dumps({"b": Call(Global("__builtin__", "bytearray"), *args)})
    assert read_checkpoint(write_torch_zip(tmp_path / "ok.pt", build("\xff\x00", "latin-1")))["b"] \
        == bytearray(b"\xff\x00")
    for args in [("abc", "punycode"), ("abc", "utf-8"), ("abc",), ("abc", "latin-1", "strict")]:
        with pytest.raises(ValueError, match="only allowed with 'latin-1'"):
            read_checkpoint(write_torch_zip(tmp_path / "codec.pt", build(*args)))


# -- files that are not (good) checkpoints --------------------------------------------------

def test_missing_file():
    with pytest.raises(FileNotFoundError):
        load_checkpoint(os.path.join(DATA, "no_such_file.pt"))


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(ValueError, match=r"notes\.pt is not a checkpoint: it starts with b'these are not we'"):
        load_checkpoint(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_checkpoint(path)


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.99])
def test_truncated_zip_is_a_value_error(tmp_path, cut):
    data = open(fixture("resnet_like"), "rb").read()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ValueError, match="corrupt or truncated zip archive"):
        load_checkpoint(path)


def test_corrupt_storage_bytes_fail_the_crc(tmp_path):
    data = bytearray(open(fixture("resnet_like"), "rb").read())
    with zipfile.ZipFile(fixture("resnet_like")) as z:
        offset = z.getinfo("resnet_like/data/0").header_offset
    # The member's data follows its local header, whose extra field torch pads for alignment.
    name_length, extra_length = struct.unpack("<HH", data[offset + 26:offset + 30])
    start = offset + 30 + name_length + extra_length
    data[start:start + 4] = bytes(4 - i for i in range(4))
    path = tmp_path / "corrupt.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="member 'resnet_like/data/0' is corrupt: BadZipFile: Bad CRC-32"):
        load_checkpoint(path)


def test_truncated_legacy_file(tmp_path):
    data = open(fixture("legacy"), "rb").read()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated: storage"):
        load_checkpoint(path)
    path.write_bytes(data[:40])
    with pytest.raises(ValueError, match="could not read"):
        load_checkpoint(path)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "docs.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match=r"a zip archive but not a checkpoint.*\['readme.txt'\]"):
        load_checkpoint(path)


def test_torchscript_archive_is_named(tmp_path):
    path = write_torch_zip(tmp_path / "scripted.pt", dumps({}), extra=[("constants.pkl", dumps(()))])
    with pytest.raises(ValueError, match=r"TorchScript archive \(torch\.jit\.save\)"):
        load_checkpoint(path)


def test_plain_pickle_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match="is a pickle, but not a torch.save checkpoint"):
        load_checkpoint(path)


def test_pickled_numpy_array_is_refused(tmp_path):
    # Harmless in itself, but numpy's reconstruct functions are not on the allow-list.
    path = tmp_path / "array.pkl"
    path.write_bytes(pickle.dumps(np.arange(3), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load global 'numpy"):
        load_checkpoint(path)


def test_tar_archive_is_named(tmp_path):
    import tarfile
    source = tmp_path / "storages"
    source.write_bytes(b"\0" * 600)
    path = tmp_path / "old.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(source, arcname="storages")
    with pytest.raises(ValueError, match="tar archive"):
        load_checkpoint(path)


# -- .npz ------------------------------------------------------------------------------------

def test_npz_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"bn.weight": rng.random(4).astype(np.float32), "bn.running_var": rng.random(4),
              "bn.num_batches_tracked": np.array(5, dtype=np.int64), "big_endian": np.arange(3, dtype=">f4"),
              "flags": np.array([True, False])}
    path = tmp_path / "w.npz"
    np.savez(path, **arrays)
    sd = load_checkpoint(path)
    assert list(sd) == list(arrays)
    for k, v in arrays.items():
        assert_same_array(sd[k], v.astype(v.dtype.newbyteorder("=")), f"npz {k}")
    assert list(load_checkpoint(tmp_path / "w.npz")) == list(read_checkpoint(path))


def test_npz_compressed_and_named_anything(tmp_path):
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        np.savez_compressed(f, w=np.ones(3))
    assert_same_array(load_checkpoint(path)["w"], np.ones(3), "compressed npz")


def test_npz_object_array_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, ok=np.ones(2), bad=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"member 'bad.npy' is an object array.*never unpickles"):
        load_checkpoint(path)


# -- safetensors -----------------------------------------------------------------------------

def test_safetensors_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastbn\[io\]'"):
        load_checkpoint(fixture("dtypes_safetensors"))


def test_safetensors_is_recognised_by_content(tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "model.weights"
    path.write_bytes(open(fixture("dtypes_safetensors"), "rb").read())
    sd = load_checkpoint(path)
    assert_same_array(sd["bfloat16"], EXPECTED["dtypes_safetensors|bfloat16"], "bfloat16 from safetensors")


def test_corrupt_safetensors_is_a_value_error(tmp_path):
    pytest.importorskip("safetensors")
    data = open(fixture("dtypes_safetensors"), "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-8])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_checkpoint(path)
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,400]}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header + f32(1, 2))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_checkpoint(path)


# -- bfloat16="keep" -------------------------------------------------------------------------

# The fixtures' bfloat16 tensors, by file; expected.npz holds them widened to float32.
BFLOAT16_FIXTURE_KEYS = {"dtypes": {("bfloat16",), ("bfloat16_matrix_t",)}, "legacy": {("bfloat16",)},
                         "dtypes_safetensors": {("bfloat16",), ("bfloat16_matrix_t",)}}
BAD_BFLOAT16 = ["bfloat16", "float16", "Keep", "", None, True, np.float32, "float32 "]


def bf16_bits(widened):
    """The bfloat16 bits of a float32 array that holds widened bfloat16 values."""
    bits = widened.view(np.uint32)
    assert not np.any(bits & 0xFFFF), "not a widened bfloat16: the low 16 bits are not zero"
    return (bits >> 16).astype(np.uint16)


def assert_same_bfloat16(actual, bits, what):
    """An ml_dtypes.bfloat16 array holding exactly ``bits``, C-contiguous, native and writeable."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert isinstance(actual, np.ndarray), f"{what}: got {type(actual).__name__}, not an array"
    assert actual.dtype == ml_dtypes.bfloat16, f"{what}: dtype {actual.dtype}, expected bfloat16"
    assert actual.shape == bits.shape, f"{what}: shape {actual.shape}, expected {bits.shape}"
    assert actual.view(np.uint16).tobytes() == bits.tobytes(), \
        f"{what}: bits differ:\n{actual.view(np.uint16)}\nexpected\n{bits}"
    assert actual.flags.c_contiguous and actual.flags.writeable, \
        f"{what}: not a writeable C-contiguous array ({actual.flags})"


@pytest.mark.parametrize("stem", list(FIXTURES))
def test_bfloat16_keep_returns_the_stored_bits_and_changes_nothing_else(stem):
    pytest.importorskip("ml_dtypes")
    if stem.endswith("safetensors"):
        pytest.importorskip("safetensors")
    kept = read_checkpoint(fixture(stem), bfloat16="keep")
    found = set()
    for path, want in expected_of(stem).items():
        got = kept
        for k in path:
            got = got[k]
        what = f"{FIXTURES[stem]}: {'/'.join(path)}"
        if got.dtype.name == "bfloat16":
            found.add(path)
            assert_same_bfloat16(got, bf16_bits(want), what)
            assert_same_array(got.astype(np.float32), want, f"{what} widened by ml_dtypes")
        else:
            assert_same_array(got, want, what)
    assert found == BFLOAT16_FIXTURE_KEYS.get(stem, set()), f"{FIXTURES[stem]}: bfloat16 tensors {found}"


# bfloat16 bits that a detour through float32 and back would not all keep: a signalling and a
# payload NaN, -0, the infinities, the smallest subnormal, and ordinary values (1.5, -3.0).
BF16_SPECIAL_BITS = np.array([0x7F81, 0xFFC1, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x3FC0, 0xC040], np.uint16)


@pytest.mark.parametrize("byteorder,prefix", [(b"little", "<"), (b"big", ">"), (None, "<")])
def test_bfloat16_keep_in_either_byte_order(tmp_path, byteorder, prefix):
    pytest.importorskip("ml_dtypes")
    bits = BF16_SPECIAL_BITS
    storage = Storage("BFloat16Storage", "0", len(bits))
    obj = {"bf": tensor(storage, 0, (len(bits),), (1,)),
           "strided": tensor(storage, 1, (2, 2), (1, 3)),
           "scalar": tensor(storage, 6, (), ()),
           "neg": tensor(storage, 0, (len(bits),), (1,), metadata={"neg": True}),
           "alone": storage}
    path = write_torch_zip(tmp_path / "c.pt", dumps(obj), {"0": bits.astype(prefix + "u2").tobytes()},
                           byteorder=byteorder)
    sd = read_checkpoint(path, bfloat16="keep")
    assert_same_bfloat16(sd["bf"], bits, f"bfloat16, byteorder {byteorder}")
    assert_same_bfloat16(sd["alone"], bits, f"bare bfloat16 storage, byteorder {byteorder}")
    strided = np.lib.stride_tricks.as_strided(bits[1:], (2, 2), (2, 6))
    assert_same_bfloat16(sd["strided"], np.ascontiguousarray(strided), f"strided, byteorder {byteorder}")
    assert_same_bfloat16(sd["scalar"], bits[6].reshape(()), f"0-d, byteorder {byteorder}")
    assert_same_bfloat16(sd["neg"], bits ^ 0x8000, f"neg bit flips the sign bit, byteorder {byteorder}")
    widened = read_checkpoint(path)
    for k in sd:
        assert_same_array(sd[k].astype(np.float32), widened[k], f"{k}: keep then widen != the default")


@pytest.mark.parametrize("bad", BAD_BFLOAT16, ids=repr)
@pytest.mark.parametrize("reader", [load_checkpoint, read_checkpoint], ids=lambda f: f.__name__)
def test_bfloat16_bad_value_is_refused_before_reading(tmp_path, reader, bad):
    # The file does not exist: a ValueError, not FileNotFoundError, shows it was never opened.
    with pytest.raises(ValueError, match=r"bfloat16 must be one of 'float32', 'keep', got "):
        reader(tmp_path / "missing.pt", bfloat16=bad)


@pytest.mark.parametrize("reader", [load_checkpoint, read_checkpoint], ids=lambda f: f.__name__)
def test_bfloat16_keep_without_ml_dtypes_names_the_extra(monkeypatch, tmp_path, reader):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastbn\[bf16\]' \(or pip install ml_dtypes\)"):
        reader(tmp_path / "missing.pt", bfloat16="keep")  # before the file is looked for
    with pytest.raises(ImportError, match=r"fastbn\[bf16\]"):
        reader(fixture("dtypes"), bfloat16="keep")
    widened = reader(fixture("dtypes"))  # the default needs no ml_dtypes
    assert widened["bfloat16"].dtype == np.float32


def test_import_fastbn_and_loading_do_not_import_ml_dtypes():
    script = f"""
import sys
import fastbn
sd = fastbn.load_checkpoint({fixture("dtypes")!r})
assert sd["bfloat16"].dtype == "float32"
print("ml_dtypes" in sys.modules)
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__))))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"], f"ml_dtypes was imported: {result.stdout}"


@pytest.mark.parametrize("bfloat16", ["float32", "keep"])
def test_npz_arrays_come_back_as_stored_whatever_bfloat16_says(tmp_path, bfloat16):
    # .npy has no bfloat16 type: numpy saves ml_dtypes.bfloat16 as 2-byte void, which is left
    # alone (it cannot be told from any other '|V2'), as are the other arrays.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    arrays = {"w": np.arange(3, dtype=np.float32), "bits": BF16_SPECIAL_BITS,
              "bf": BF16_SPECIAL_BITS.view(ml_dtypes.bfloat16)}
    path = tmp_path / "w.npz"
    np.savez(path, **arrays)
    sd = load_checkpoint(path, bfloat16=bfloat16)
    assert_same_array(sd["w"], arrays["w"], "npz float32")
    assert_same_array(sd["bits"], arrays["bits"], "npz uint16")
    assert_same_array(sd["bf"], BF16_SPECIAL_BITS.view("V2"), "npz bfloat16, saved as void")


# -- from_state_dict -------------------------------------------------------------------------

def random_module(cls, affine, bias, track, dtype, rng, c=5):
    bn = cls(c, affine=affine, bias=bias, track_running_stats=track, dtype=dtype)
    for name, value in bn.state_dict().items():
        if name == "num_batches_tracked":
            value[...] = 7
        else:
            value[...] = rng.uniform(0.5, 2.0, c)
    return bn


@pytest.mark.parametrize("cls", [fastbn.BatchNorm1d, fastbn.BatchNorm2d, fastbn.BatchNorm3d])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_state_dict_infers_the_structure(rng, cls, affine, bias, track, dtype):
    original = random_module(cls, affine, bias, track, dtype, rng)
    if not affine and not track:  # a module without state has no entries to find
        with pytest.raises(ValueError, match='no entries under prefix "bn."'):
            cls.from_state_dict(original.state_dict(prefix="bn."), "bn")
        return
    sd = collections.OrderedDict(conv_weight_first=np.ones((5, 3, 3, 3)))
    sd["encoder.conv.weight"] = np.ones((5, 3, 3, 3), np.float32)
    original.state_dict(destination=sd, prefix="encoder.bn.")
    sd["encoder.bn2.weight"] = np.ones(9, np.float32)  # a sibling whose name extends the prefix
    for prefix in ("encoder.bn.", "encoder.bn"):
        built = cls.from_state_dict(sd, prefix)
        assert type(built) is cls
        assert repr(built) == repr(original), f"prefix {prefix!r}: {built!r} != {original!r}"
        assert built.dtype == np.dtype(dtype) and built.training
        for name, value in original.state_dict().items():
            got = built.state_dict()[name]
            assert_same_array(got, value, f"{cls.__name__} {name}")
            assert not np.shares_memory(got, sd["encoder.bn." + name]), "the module aliases the dict"


def test_from_state_dict_options_and_dtype(rng):
    sd = random_module(fastbn.BatchNorm2d, True, True, True, np.float32, rng).state_dict()
    bn = fastbn.BatchNorm2d.from_state_dict(sd, eps=1e-3, momentum=None, dtype=np.float64)
    assert (bn.eps, bn.momentum, bn.dtype) == (1e-3, None, np.float64)
    np.testing.assert_array_equal(bn.weight, sd["weight"].astype(np.float64))
    mixed = dict(sd, running_var=sd["running_var"].astype(np.float64))
    assert fastbn.BatchNorm2d.from_state_dict(mixed).dtype == np.float64, "any float64 entry -> float64"


def test_from_state_dict_unknown_prefix_lists_the_batchnorm_prefixes():
    sd = load_checkpoint(fixture("resnet_like"))
    with pytest.raises(ValueError) as info:
        fastbn.BatchNorm2d.from_state_dict(sd, prefix="layer2.0.bn1")
    message = str(info.value)
    assert 'no entries under prefix "layer2.0.bn1."' in message, message
    assert 'BatchNorm-like prefixes in it: "bn1.", "layer1.0.bn1.", "layer1.0.bn2."' in message, message


def test_from_state_dict_on_a_conv_prefix_says_so():
    sd = load_checkpoint(fixture("resnet_like"))
    with pytest.raises(ValueError, match=r'"conv1.weight" has shape \(4, 3, 3, 3\).*is "conv1." the prefix'):
        fastbn.BatchNorm2d.from_state_dict(sd, prefix="conv1")


def test_from_state_dict_needs_a_per_channel_entry():
    sd = {"bn.num_batches_tracked": np.array(3)}
    with pytest.raises(ValueError, match=r"nothing under prefix \"bn.\" gives num_features.*num_batches_tracked"):
        fastbn.BatchNorm1d.from_state_dict(sd, "bn")
    with pytest.raises(ValueError, match="it has no BatchNorm-like entries"):
        fastbn.BatchNorm1d.from_state_dict(sd, "other")


def test_from_state_dict_strict(rng):
    sd = random_module(fastbn.BatchNorm1d, True, True, True, np.float32, rng).state_dict(prefix="bn.")
    sd["bn.extra"] = np.zeros(5)
    with pytest.raises(ValueError, match=r'(?s)Unexpected key\(s\) in state_dict: "extra".*prefix "bn."'):
        fastbn.BatchNorm1d.from_state_dict(sd, "bn")
    bn = fastbn.BatchNorm1d.from_state_dict(sd, "bn", strict=False)
    np.testing.assert_array_equal(bn.weight, sd["bn.weight"])
    with pytest.raises(ValueError, match='size mismatch for bias'):
        fastbn.BatchNorm1d.from_state_dict(dict(sd, **{"bn.bias": np.zeros(3)}), "bn", strict=False)


def test_from_state_dict_follows_torchs_version_metadata():
    # A version-2 BatchNorm (torch >= 0.4.1) has num_batches_tracked, so strict loading
    # without it fails, as in torch; without _metadata the counter is optional.
    sd = load_checkpoint(fixture("resnet_like"))
    del sd["layer1.0.bn1.num_batches_tracked"]
    with pytest.raises(ValueError, match=r'Missing key\(s\) in state_dict: "num_batches_tracked"'):
        fastbn.BatchNorm2d.from_state_dict(sd, "layer1.0.bn1")
    plain = dict(sd)
    bn = fastbn.BatchNorm2d.from_state_dict(plain, "layer1.0.bn1")
    assert int(bn.num_batches_tracked) == 0


def test_from_state_dict_type_errors():
    with pytest.raises(TypeError, match="dict-like"):
        fastbn.BatchNorm2d.from_state_dict([("weight", np.ones(2))])
    with pytest.raises(TypeError, match="prefix must be a str"):
        fastbn.BatchNorm2d.from_state_dict({"weight": np.ones(2)}, prefix=1)


@pytest.mark.parametrize("prefix", BN_PREFIXES)
def test_fixture_modules_match_the_float64_reference(rng, prefix):
    """Every BatchNorm of the torch-written ResNet-like checkpoint, built by from_state_dict,
    normalises as the float64 reference does with the checkpoint's statistics."""
    sd = load_checkpoint(fixture("resnet_like"))
    bn = fastbn.BatchNorm2d.from_state_dict(sd, prefix).eval()
    assert bn.num_features == 4 and bn.dtype == np.float32 and int(bn.num_batches_tracked) == 3
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    want = ref.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"],
                          sd[prefix + "weight"], sd[prefix + "bias"], training=False, eps=1e-5)
    assert_close(bn(x), want, np.float32, f"{prefix} eval output")


def bf16_checkpoint(path, rng, c=5, extra=None):
    """A torch.save-like archive of one BatchNorm's state in bfloat16 (as ``model.bfloat16()``
    saves it: the counter stays int64), with the running variance positive."""
    # The high halves of float32 values: bfloat16 values rounded towards zero.
    bits = {name: (rng.uniform(0.25, 2.0, c).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            for name in ("weight", "bias", "running_mean", "running_var")}
    obj, storages = {}, {}
    for i, (name, b) in enumerate(bits.items()):
        obj[f"bn.{name}"] = tensor(Storage("BFloat16Storage", str(i), c), 0, (c,), (1,))
        storages[str(i)] = b.astype("<u2").tobytes()
    obj["bn.num_batches_tracked"] = tensor(Storage("LongStorage", "n", 1), 0, (), ())
    storages["n"] = np.array(7, "<i8").tobytes()
    for name, (type_name, data) in (extra or {}).items():
        obj[f"bn.{name}"] = tensor(Storage(type_name, name, c), 0, (c,), (1,))
        storages[name] = data
    return write_torch_zip(path, dumps(obj), storages)


@pytest.mark.parametrize("dtype", [None, np.float32, np.float64])
def test_from_state_dict_takes_bfloat16_kept_as_the_widened_load(tmp_path, rng, dtype):
    pytest.importorskip("ml_dtypes")
    path = bf16_checkpoint(tmp_path / "bn.pt", rng)
    kept = load_checkpoint(path, bfloat16="keep")
    assert kept["bn.weight"].dtype.name == "bfloat16"
    bn = fastbn.BatchNorm2d.from_state_dict(kept, "bn", dtype=dtype)
    want = fastbn.BatchNorm2d.from_state_dict(load_checkpoint(path), "bn", dtype=dtype)
    assert bn.dtype == want.dtype == (dtype or np.float32), f"dtype {bn.dtype}, from float32 {want.dtype}"
    for k, v in want.state_dict().items():
        assert_same_array(getattr(bn, k), v, f"{k} from bfloat16 kept, module dtype {dtype}")
    x = rng.standard_normal((2, 5, 3, 3)).astype(bn.dtype)
    assert_same_array(bn.eval()(x), want.eval()(x), "eval output")
    fresh = fastbn.BatchNorm2d(5, dtype=dtype or np.float32)
    fresh.load_state_dict({k[3:]: v for k, v in kept.items()})
    for k, v in want.state_dict().items():
        assert_same_array(getattr(fresh, k), v, f"{k} by load_state_dict")


def test_from_state_dict_dtype_with_bfloat16_entries(tmp_path, rng):
    pytest.importorskip("ml_dtypes")
    wide = np.full(5, 0.1)  # a float64 entry beside the bfloat16 ones makes the module float64
    path = bf16_checkpoint(tmp_path / "bn.pt", rng, extra={"running_var": ("DoubleStorage", wide.tobytes())})
    bn = fastbn.BatchNorm2d.from_state_dict(load_checkpoint(path, bfloat16="keep"), "bn")
    assert bn.dtype == np.float64
    assert_same_array(bn.running_var, wide, "float64 entry")
    assert_same_array(bn.weight, load_checkpoint(path)["bn.weight"].astype(np.float64), "bfloat16 entry")


@pytest.mark.parametrize("name,value,match", [
    ("num_batches_tracked", "bfloat16 2.5", "must hold whole numbers"),
    ("num_batches_tracked", "bfloat16 -1", "must be a count"),
    ("weight", "bfloat16 shape (4,)", "size mismatch for weight"),
    ("weight", "void 2 bytes", r"has dtype \|V2; expected real numbers"),  # not taken for bfloat16
])
def test_load_state_dict_checks_bfloat16_entries_as_float32_ones(name, value, match):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bn = fastbn.BatchNorm1d(3)
    sd = bn.state_dict().copy()
    sd[name] = {"bfloat16 2.5": np.array(2.5, ml_dtypes.bfloat16),
                "bfloat16 -1": np.array(-1, ml_dtypes.bfloat16),
                "bfloat16 shape (4,)": np.ones(4, ml_dtypes.bfloat16),
                "void 2 bytes": np.zeros(3, "V2")}[value]
    with pytest.raises(ValueError, match=match):
        bn.load_state_dict(sd)


# -- no torch needed -------------------------------------------------------------------------

def test_reading_needs_no_torch():
    """In a process where importing torch fails, every fixture still loads exactly."""
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import numpy as np, fastbn
expected = np.load({os.path.join(DATA, "expected.npz")!r})
checked = 0
for key in expected.files:
    stem, *path = key.split("|")
    if stem == "dtypes_safetensors":
        continue  # needs the safetensors package, not torch
    obj = fastbn.read_checkpoint({DATA!r} + "/" + stem + ".pt")
    for k in path:
        obj = obj[k]
    assert obj.tobytes() == expected[key].tobytes() and obj.dtype == expected[key].dtype, key
    checked += 1
bn = fastbn.BatchNorm2d.from_state_dict(fastbn.load_checkpoint({fixture("resnet_like")!r}), "bn1")
print(checked, "torch" in sys.modules and sys.modules["torch"] is not None)
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__))))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    checked, torch_imported = result.stdout.split()
    assert int(checked) >= 80 and torch_imported == "False", result.stdout
