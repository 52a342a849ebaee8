"""Write the checkpoint fixtures of tests/test_checkpoint.py, and the values they must load as.

Regenerate them (torch and safetensors needed; the tests themselves need neither) with

    python tests/data/make_checkpoints.py

which rewrites, beside this script:

* ``resnet_like.pt``: ``torch.save({"state_dict": sd, "epoch": 3})`` of a small ResNet-like
  model (a stem conv + BatchNorm2d, one basic block, a linear head), trained three steps so
  that the running statistics are not the initial ones;
* ``views.pt``: views of shared storages (transposed, strided, offset, expanded,
  permuted, channels-last), a 0-d and an empty tensor;
* ``dtypes.pt``: float16, bfloat16, float32, float64, the ints, uint8/16, bool, complex64, a
  lazily conjugated complex tensor and a Parameter that requires grad;
* ``legacy.pt``: the legacy (pre-zip) format, ``_use_new_zipfile_serialization=False``, of a
  state_dict and some of the above;
* ``dtypes.safetensors``: a safetensors file of the plain dtypes, bfloat16 included;
* ``expected.npz``: what every tensor in those files must load as, keyed
  ``"<file stem>|<key>|<key>..."`` (bfloat16 widened to float32, as fastbn returns it).

torch.save stamps each file with a random serialization id, so regenerated files differ in
bytes, not in what they hold.
"""

import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def resnet_like():
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(c)
            self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(4)
            self.layer1 = torch.nn.Sequential(Block(4))
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
            return self.fc(x.mean((2, 3)))

    net = Net()
    with torch.no_grad():  # affine parameters away from their initial ones and zeros
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        for _ in range(3):
            net(torch.randn(4, 3, 6, 6) * 2 + 1)
    return net.state_dict()


def views():
    torch.manual_seed(1)
    base = torch.randn(4, 6)
    shared = torch.arange(10, dtype=torch.float32)
    return {
        "base": base,
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "offset": base[1:, 2:],
        "shared_head": shared[:6],
        "shared_tail": shared[4:],
        "shared_every_other": shared[1::2],
        "expanded": torch.tensor([1.0, 2.0, 3.0]).expand(2, 3),
        "permuted": torch.randn(2, 3, 4).permute(2, 0, 1),
        "channels_last": torch.randn(2, 3, 2, 2).contiguous(memory_format=torch.channels_last),
        "scalar": torch.tensor(1.5),
        "empty": torch.empty(0, 3),
        "long_view": torch.arange(12).reshape(3, 4)[:, 1],
    }


def dtypes():
    torch.manual_seed(2)
    x = torch.randn(5) * 3
    return {
        "float16": x.half(),
        "bfloat16": x.bfloat16(),
        "float32": x,
        "float64": x.double() / 7,
        "int64": torch.tensor([-(2**62), -1, 0, 1, 2**62]),
        "int32": torch.tensor([-(2**31), -1, 0, 1, 2**31 - 1], dtype=torch.int32),
        "int16": torch.tensor([-(2**15), -1, 0, 1, 2**15 - 1], dtype=torch.int16),
        "int8": torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 1, 128, 255], dtype=torch.uint8),
        "uint16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "bool": torch.tensor([True, False, True]),
        "complex64": torch.tensor([1 + 2j, -3.5j], dtype=torch.complex64),
        "conjugated": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
        "parameter": torch.nn.Parameter(x[:3].clone()),
        "bfloat16_matrix_t": torch.randn(3, 2).bfloat16().t(),
    }


def expected_array(tensor):
    tensor = tensor.detach().resolve_conj()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()  # exact: fastbn widens bfloat16 the same way
    return np.array(tensor.numpy(), order="C")  # (ascontiguousarray would make 0-d 1-d)


def flatten(obj, path, out):
    if isinstance(obj, torch.Tensor):
        out["|".join(path)] = expected_array(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, path + [str(k)], out)


def main():
    state_dict = resnet_like()
    files = {
        "resnet_like.pt": ({"state_dict": state_dict, "epoch": 3}, {}),
        "views.pt": (views(), {}),
        "dtypes.pt": (dtypes(), {}),
        "legacy.pt": ({"state_dict": state_dict, "views": views(), "bfloat16": dtypes()["bfloat16"],
                       "epoch": 3}, {"_use_new_zipfile_serialization": False}),
    }
    expected = {}
    for name, (obj, kwargs) in files.items():
        torch.save(obj, os.path.join(HERE, name), **kwargs)
        flatten(obj, [name.split(".")[0]], expected)

    from safetensors.torch import save_file
    plain = {k: v.detach().contiguous() for k, v in dtypes().items()
             if k not in ("conjugated", "uint16")}  # safetensors stores neither lazily
    save_file(plain, os.path.join(HERE, "dtypes.safetensors"))
    flatten(plain, ["dtypes_safetensors"], expected)

    np.savez_compressed(os.path.join(HERE, "expected.npz"), **expected)
    total = sum(os.path.getsize(os.path.join(HERE, f)) for f in os.listdir(HERE))
    print(f"wrote {len(files) + 2} files, {len(expected)} expected arrays, {total} bytes in {HERE}")


if __name__ == "__main__":
    main()
