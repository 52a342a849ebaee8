"""fastbn.load_checkpoint against torch itself: files torch.save writes now, in every format
variant, read back bit for bit as tensor.numpy() shows them; modules built from a real
model's state_dict normalise as torch does.  Skipped without torch (test_checkpoint.py covers
the same reader on committed fixtures)."""

import pickle
import re
import warnings

import numpy as np
import pytest

import fastbn
from fastbn import _reference as ref
from fastbn.checkpoint import UnsafeCheckpointError

from conftest import assert_close

torch = pytest.importorskip("torch")

# How torch.save can write a file: the zip format, with pickle protocol 4, without the byte
# order record (files from torch < 1.13), and the legacy format.
VARIANTS = {
    "zip": {},
    "protocol4": {"pickle_protocol": 4},
    "no_byteorder": {"_disable_byteorder_record": True},
    "legacy": {"_use_new_zipfile_serialization": False},
}


def torch_save(obj, path, variant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation noise of the legacy writer
        torch.save(obj, path, **VARIANTS[variant])
    return path


def as_torch_shows_it(t):
    t = t.detach().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        t = t.float()  # fastbn widens bfloat16 to float32, exactly
    return np.array(t.numpy(), order="C")


def assert_bitwise(actual, t, what):
    want = as_torch_shows_it(t)
    assert isinstance(actual, np.ndarray), f"{what}: got {type(actual).__name__}"
    assert (actual.dtype, actual.shape) == (want.dtype, want.shape), \
        f"{what}: {actual.dtype}{actual.shape}, torch {want.dtype}{want.shape}"
    assert actual.tobytes() == want.tobytes(), f"{what}: values differ\n{actual}\ntorch\n{want}"


def random_tensor(dtype, shape, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
        return x.to(dtype)
    info = torch.iinfo(dtype)
    x = torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=gen,
                      dtype=torch.int64)
    return x.to(dtype)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
          torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_reads_bitwise(tmp_path, variant, dtype):
    gen = torch.Generator().manual_seed(len(str(dtype)))
    base = random_tensor(dtype, (4, 6), gen)
    obj = {"base": base, "t": base.t(), "view": base[1:, ::2], "scalar": base[2, 3].clone(),
           "special": None}
    if dtype.is_floating_point:  # NaN, infinities, signed zero and subnormals keep their bits
        obj["special"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40],
                                      dtype=torch.float64).to(dtype)
    sd = fastbn.load_checkpoint(torch_save(obj, tmp_path / "c.pt", variant))
    for k, t in obj.items():
        if t is not None:
            assert_bitwise(sd[k], t, f"{dtype} {k} ({variant})")


VIEWS = {
    "transpose": lambda b: b.t(),
    "slice_with_offset": lambda b: b[2:, 3:],
    "step": lambda b: b[::3, 1::2],
    "column": lambda b: b[:, 4],
    "expanded": lambda b: b[0].expand(3, 8),
    "permuted_4d": lambda b: b.reshape(2, 3, 2, 4).permute(3, 1, 0, 2),
    "channels_last": lambda b: b.reshape(1, 2, 3, 8).contiguous(memory_format=torch.channels_last),
    "diagonal": lambda b: b.diagonal(),
    "unfolded": lambda b: b.reshape(-1).unfold(0, 4, 3),
    "empty": lambda b: b[3:3],
    "zero_dim": lambda b: b[1, 1],
}


@pytest.mark.parametrize("variant", ["zip", "legacy"])
@pytest.mark.parametrize("view", list(VIEWS))
def test_views_of_a_shared_storage(tmp_path, variant, view):
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    t = VIEWS[view](base)
    obj = {"view": t, "base": base, "other_view": base[1:, 1:]}  # three tensors, one storage
    sd = fastbn.load_checkpoint(torch_save(obj, tmp_path / "c.pt", variant))
    for k, v in obj.items():
        assert_bitwise(sd[k], v, f"{view} {k} ({variant})")
    assert not np.shares_memory(sd["view"], sd["base"]), "arrays from one storage must not alias"


def test_tensor_saved_twice_is_one_array_as_in_torch(tmp_path):
    t = torch.arange(3.0)
    path = torch_save({"a": t, "b": t}, tmp_path / "c.pt", "zip")
    tree = fastbn.read_checkpoint(path)
    loaded = torch.load(path)
    assert loaded["a"] is loaded["b"], "torch.load gives one tensor"
    assert tree["a"] is tree["b"], "fastbn should give one array, as torch.load gives one tensor"


def test_parameters_conj_and_neg(tmp_path):
    p = torch.nn.Parameter(torch.randn(4))
    q = torch.nn.Parameter(torch.randn(3))
    q.tag = "with python state"  # saved by _rebuild_parameter_with_state
    c = torch.tensor([1 + 2j, -3j]).conj()
    n = torch.tensor([1 + 2j]).conj().imag
    assert c.is_conj() and n.is_neg()
    sd = fastbn.load_checkpoint(torch_save({"p": p, "q": q, "c": c, "n": n}, tmp_path / "c.pt", "zip"))
    for k, t in {"p": p, "q": q, "c": c, "n": n}.items():
        assert_bitwise(sd[k], t, k)


def model(dtype=torch.float32):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                            torch.nn.BatchNorm2d(6, momentum=None)).to(dtype)
    with torch.no_grad():
        for bn in (m[1], m[3]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        for _ in range(4):  # running statistics and counters away from their initial values
            m(torch.randn(8, 3, 9, 9, dtype=dtype) * 3 + 2)
    return m.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_module_from_a_real_checkpoint_matches_torch_and_the_reference(tmp_path, variant):
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 3, 9, 9)).sum().backward()
    opt.step()
    path = torch_save({"model_state_dict": m.state_dict(), "optimizer_state_dict": opt.state_dict(),
                       "epoch": 3}, tmp_path / "c.pt", variant)
    sd = fastbn.load_checkpoint(path)
    assert list(sd) == list(m.state_dict())
    x = torch.randn(4, 6, 7, 7, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    for index in (1, 3):
        bn = fastbn.BatchNorm2d.from_state_dict(sd, prefix=f"{index}.", momentum=m[index].momentum).eval()
        assert repr(bn) == repr(m[index]), f"{bn!r} != torch's {m[index]!r}"
        for k, v in m[index].state_dict().items():
            assert_bitwise(getattr(bn, k), v, f"{index}.{k}")
        with torch.no_grad():
            want_torch = m[index](x).numpy()
        got = bn(x.numpy())
        assert_close(got, want_torch, np.float32, f"BatchNorm2d {index} vs torch ({variant})")
        want_ref = ref.batch_norm(x.numpy(), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                  training=False, eps=bn.eps)
        assert_close(got, want_ref, np.float32, f"BatchNorm2d {index} vs the float64 reference")
    tree = fastbn.read_checkpoint(path)
    assert tree["epoch"] == 3
    momentum_buffers = tree["optimizer_state_dict"]["state"]
    for i, state in opt.state_dict()["state"].items():
        assert_bitwise(momentum_buffers[i]["momentum_buffer"], state["momentum_buffer"], f"SGD buffer {i}")
    assert tree["optimizer_state_dict"]["param_groups"][0]["lr"] == 0.1


@pytest.mark.parametrize("name,shape", [("BatchNorm1d", (5, 4)), ("BatchNorm1d", (5, 4, 3)),
                                        ("BatchNorm3d", (2, 4, 3, 2, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_other_dims_and_float64(tmp_path, name, shape, dtype):
    torch.manual_seed(1)
    m = torch.nn.Sequential(getattr(torch.nn, name)(4, affine=False, dtype=dtype))
    m(torch.randn(shape, dtype=dtype) + 3)
    m.eval()
    sd = fastbn.load_checkpoint(torch_save(m.state_dict(), tmp_path / "c.pt", "zip"))
    bn = getattr(fastbn, name).from_state_dict(sd, "0").eval()
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    assert bn.dtype == np_dtype and not bn.affine
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        assert_close(bn(x.numpy()), m(x).numpy(), np_dtype, f"{name} {dtype} vs torch")


def test_from_state_dict_takes_torchs_own_state_dict():
    m = model()
    bn = fastbn.BatchNorm2d.from_state_dict(m.state_dict(), "1").eval()  # torch tensors as values
    for k, v in m[1].state_dict().items():
        assert_bitwise(getattr(bn, k), v, f"1.{k} from torch tensors")
    x = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        assert_close(bn(x.numpy()), m[1](x).numpy(), np.float32, "from torch's state_dict")


def test_safetensors_written_by_torch(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {str(dtype): random_tensor(dtype, (3, 2), torch.Generator().manual_seed(5))
               for dtype in DTYPES if dtype not in (torch.complex128, torch.complex64)}
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    sd = fastbn.load_checkpoint(path)
    assert sorted(sd) == sorted(tensors)
    for k, t in tensors.items():
        assert_bitwise(sd[k], t, f"safetensors {k}")


# -- bfloat16="keep": ml_dtypes.bfloat16 arrays with torch's bits -------------------------------

def torch_bits(t):
    """The stored bits of a bfloat16 tensor, as torch shows them, C-contiguous uint16."""
    return np.array(t.detach().view(torch.int16).numpy(), order="C").view(np.uint16)


def assert_bitwise_bfloat16(actual, t, what):
    assert isinstance(actual, np.ndarray), f"{what}: got {type(actual).__name__}"
    assert actual.dtype.name == "bfloat16" and actual.shape == tuple(t.shape), \
        f"{what}: {actual.dtype}{actual.shape}, torch bfloat16{tuple(t.shape)}"
    assert actual.flags.c_contiguous and actual.flags.writeable, f"{what}: {actual.flags}"
    want = torch_bits(t)
    assert actual.view(np.uint16).tobytes() == want.tobytes(), \
        f"{what}: bits differ\n{actual.view(np.uint16)}\ntorch\n{want}"


def bfloat16_tensors(gen):
    """bfloat16 tensors over one storage and on their own, with bits a float detour would alter."""
    base = random_tensor(torch.bfloat16, (4, 6), gen)
    # signalling and payload NaNs, -0, infinities, the smallest subnormal, 1.5
    special = torch.tensor([0x7F81, -63, -32768, 0x7F80, -128, 1, 0x3FC0], dtype=torch.int16)
    return {"base": base, "t": base.t(), "view": base[1:, ::2], "scalar": base[2, 3].clone(),
            "special": special.view(torch.bfloat16), "param": torch.nn.Parameter(base[0].clone())}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bfloat16_keep_reads_torchs_bits(tmp_path, variant):
    pytest.importorskip("ml_dtypes")
    tensors = bfloat16_tensors(torch.Generator().manual_seed(7))
    others = {"float32": torch.randn(3), "float16": torch.randn(3).half(), "int64": torch.arange(3)}
    path = torch_save({**tensors, **others}, tmp_path / "c.pt", variant)
    kept = fastbn.read_checkpoint(path, bfloat16="keep")
    widened = fastbn.read_checkpoint(path)
    for k, t in tensors.items():
        assert_bitwise_bfloat16(kept[k], t, f"{k} ({variant})")
        assert_bitwise(widened[k], t, f"{k} widened by default ({variant})")
    for k, t in others.items():
        assert_bitwise(kept[k], t, f"{k}, not bfloat16, with bfloat16='keep' ({variant})")


def test_bfloat16_keep_from_safetensors_written_by_torch(tmp_path):
    pytest.importorskip("ml_dtypes")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {k: t.detach().contiguous() for k, t in bfloat16_tensors(torch.Generator().manual_seed(8)).items()
               if k != "t"}  # safetensors refuses tensors sharing a storage
    tensors["float32"] = torch.randn(2, 2)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: t.clone() for k, t in tensors.items()}, str(path))
    kept = fastbn.load_checkpoint(path, bfloat16="keep")
    for k, t in tensors.items():
        if t.dtype == torch.bfloat16:
            assert_bitwise_bfloat16(kept[k], t, f"safetensors {k}")
        else:
            assert_bitwise(kept[k], t, f"safetensors {k}")


@pytest.mark.parametrize("variant", [*VARIANTS, "safetensors"])
def test_module_from_a_bfloat16_checkpoint_kept_or_widened(tmp_path, variant):
    pytest.importorskip("ml_dtypes")
    m = model(torch.bfloat16)
    if variant == "safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        path = tmp_path / "m.safetensors"
        safetensors_torch.save_file(m.state_dict(), str(path))
    else:
        path = torch_save(m.state_dict(), tmp_path / "m.pt", variant)
    kept = fastbn.load_checkpoint(path, bfloat16="keep")
    widened = fastbn.load_checkpoint(path)
    assert kept["1.weight"].dtype.name == "bfloat16" and widened["1.weight"].dtype == np.float32
    x = torch.randn(3, 6, 4, 4, generator=torch.Generator().manual_seed(2))
    for index in (1, 3):
        bn = fastbn.BatchNorm2d.from_state_dict(kept, prefix=f"{index}.", momentum=m[index].momentum).eval()
        want = fastbn.BatchNorm2d.from_state_dict(widened, prefix=f"{index}.", momentum=m[index].momentum).eval()
        assert bn.dtype == want.dtype == np.float32
        for k, v in m[index].state_dict().items():
            assert_bitwise(getattr(bn, k), v, f"{index}.{k} ({variant})")
            assert_bitwise(getattr(want, k), v, f"{index}.{k} widened ({variant})")
        reference = torch.nn.BatchNorm2d(6).eval()
        reference.load_state_dict({k: v.float() if v.is_floating_point() else v
                                   for k, v in m[index].state_dict().items()})
        with torch.no_grad():
            assert_close(bn(x.numpy()), reference(x).numpy(), np.float32,
                         f"BatchNorm2d {index} from bfloat16 vs torch in float32 ({variant})")


def test_whole_pickled_model_is_refused_with_advice(tmp_path):
    path = torch_save(model(), tmp_path / "model.pt", "zip")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\..*save model\.state_dict\(\) instead"):
        fastbn.load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_archive_is_refused_with_advice(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.BatchNorm2d(3)), str(path))
    with pytest.raises(ValueError, match="TorchScript archive"):
        fastbn.load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.parametrize("make,error,match", [
    (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8), UnsafeCheckpointError,
     "quantized tensors are not supported"),
    (lambda: torch.eye(3).to_sparse(), UnsafeCheckpointError, "sparse tensors are not supported"),
    (lambda: torch.ones(2, dtype=torch.float8_e4m3fn), ValueError, r"torch\.float8_e4m3fn"),
])
def test_unsupported_tensors_are_named(tmp_path, make, error, match):
    path = torch_save({"t": make()}, tmp_path / "c.pt", "zip")
    with pytest.raises(error, match=match):
        fastbn.load_checkpoint(path)


def test_malicious_checkpoint_runs_under_torch_load_without_weights_only_but_not_here(tmp_path):
    """The threat: torch.load(weights_only=False) runs a file's payload; fastbn refuses it."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Payload()}, path)
    # pickle names open by its __module__: 'io' up to Python 3.11, '_io' from 3.12 on.
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"'{open.__module__}.open'")):
        fastbn.load_checkpoint(path)
    assert not marker.exists(), "fastbn ran the payload"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # torch's default (weights_only=True) refuses it too
    torch.load(path, weights_only=False)
    assert marker.exists(), "the payload should have run under torch.load(weights_only=False)"
