"""Every BatchNorm of a model at once (fastbn.load_batchnorms, fold_batchnorms), against torch
on models defined here in the naming of the common architectures: resnet-like (convK -> bnK,
downsample.0 -> downsample.1), mobilenet-like (numbered Sequential children) and densenet-like
(norm0 after conv0, normK before convK).  (torchvision's wheel on this project's index is a CUDA
build that does not import beside torch's CPU one, so the models are written out.)"""

from collections import OrderedDict

import numpy as np
import pytest

import fastbn
from fastbn.models import batchnorm_names, conv_bn_pairs

torch = pytest.importorskip("torch")
nn = torch.nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
        self.fc = nn.Linear(16, 10)
        self.bn_head = nn.BatchNorm1d(10)  # (a bnK with no convK: left unpaired)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.bn_head(self.fc(x.mean((2, 3))))


class MobileNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),
            nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 12, 1, bias=True), nn.BatchNorm2d(12)))
        self.classifier = nn.Sequential(nn.Linear(12, 6), nn.BatchNorm1d(6))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class DenseNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, 8, 3, 1, 1, bias=False)), ("norm0", nn.BatchNorm2d(8)),
            ("norm1", nn.BatchNorm2d(8)), ("conv1", nn.Conv2d(8, 8, 1, bias=False))]))
        self.temporal = nn.Sequential(nn.Conv3d(8, 4, 1), nn.BatchNorm3d(4))

    def forward(self, x):
        f = self.features
        x = f.conv1(torch.relu(f.norm1(torch.relu(f.norm0(f.conv0(x))))))
        return self.temporal(x.unsqueeze(2))


MODELS = {"resnet": ResNetLike, "mobilenet": MobileNetLike, "densenet": DenseNetLike}
INPUT = {"resnet": (4, 3, 10, 10), "mobilenet": (4, 3, 12, 12), "densenet": (4, 3, 6, 6)}


def trained(name):
    """The model after a few training steps, so that its running statistics are its own."""
    torch.manual_seed(0)
    model = MODELS[name]()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    model.train()
    for _ in range(3):
        model(torch.randn(INPUT[name]) * 2 + 1)
    return model.eval()


def numpy_state_dict(model):
    sd = OrderedDict((k, v.detach().numpy().copy()) for k, v in model.state_dict().items())
    sd._metadata = model.state_dict()._metadata
    return sd


def torch_batchnorms(model):
    return OrderedDict((n, m) for n, m in model.named_modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm))


@pytest.mark.parametrize("name", MODELS)
def test_every_batchnorm_of_a_model_in_one_call_matches_torch(tmp_path, name):
    model = trained(name)
    bns = torch_batchnorms(model)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    eps = {n: m.eps for n, m in bns.items() if m.eps != 1e-5}
    for source in (path, numpy_state_dict(model)):
        loaded = fastbn.load_batchnorms(source, eps=eps)
        assert list(loaded) == list(bns)
        for n, bn in loaded.items():
            assert isinstance(bn, fastbn.BatchNorm) and not bn.training and bn.eps == bns[n].eps
            ndim = {nn.BatchNorm1d: 2, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}[type(bns[n])]
            x = torch.randn((3, bn.num_features) + (5,) * (ndim - 2)) * 3 + 1
            with torch.no_grad():
                want = bns[n](x).numpy()
            np.testing.assert_allclose(bn(x.numpy()), want, rtol=1e-5, atol=1e-5, err_msg=n)
            if ndim == 2:  # (kind unknown: any rank is taken, and computed as torch would)
                with torch.no_grad():
                    want3 = bns[n](x[:, :, None].expand(3, bn.num_features, 4).contiguous()).numpy()
                np.testing.assert_allclose(bn(np.ascontiguousarray(np.broadcast_to(
                    x.numpy()[:, :, None], (3, bn.num_features, 4)))), want3, rtol=1e-5, atol=1e-5)


def test_names_eps_and_momentum_per_layer():
    sd = numpy_state_dict(trained("resnet"))
    names = batchnorm_names(sd)
    assert names[:3] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    loaded = fastbn.load_batchnorms(sd, eps=0.5, momentum={"bn1": None})
    assert {bn.eps for bn in loaded.values()} == {0.5}
    assert loaded["bn1"].momentum is None and loaded["layer1.0.bn1"].momentum == 0.1
    with pytest.raises(ValueError, match=r"eps names layers the state_dict has no BatchNorm for: \['bn9'\]"):
        fastbn.load_batchnorms(sd, eps={"bn9": 1e-3})
    # (the modules' own rules, checked before any module is built: torch allows eps=0 in eval)
    for bad, error, match in ((-1.0, ValueError, "eps must be non-negative"),
                              (float("nan"), ValueError, "eps must be finite"),
                              ("1e-5", TypeError, "eps must be a real number"),
                              (True, TypeError, "eps must be a real number")):
        with pytest.raises(error, match=match):
            fastbn.load_batchnorms(sd, eps=bad)
    assert fastbn.load_batchnorms(sd, eps={"bn1": 0.0})["bn1"].eps == 0.0
    with pytest.raises(TypeError, match="momentum must be a real number or None"):
        fastbn.load_batchnorms(sd, momentum="0.1")
    with pytest.raises(ValueError, match="found no BatchNorm layer"):
        fastbn.load_batchnorms({"fc.weight": np.ones((2, 2)), "fc.bias": np.ones(2)})
    with pytest.raises(TypeError, match="source must be a checkpoint path or a state_dict"):
        fastbn.load_batchnorms(42)


def test_the_naming_convention_pairs_what_it_should():
    assert dict(conv_bn_pairs(numpy_state_dict(trained("resnet")))) == {
        "conv1": "bn1", "layer1.0.conv1": "layer1.0.bn1", "layer1.0.conv2": "layer1.0.bn2",
        "layer1.1.conv1": "layer1.1.bn1", "layer1.1.conv2": "layer1.1.bn2",
        "layer1.1.downsample.0": "layer1.1.downsample.1"}
    assert dict(conv_bn_pairs(numpy_state_dict(trained("mobilenet")))) == {
        "features.0.0": "features.0.1", "features.1.0": "features.1.1",
        "features.1.3": "features.1.4", "classifier.0": "classifier.1"}
    # densenet's normK: norm0 follows conv0 but is not named bnK; norm1 precedes conv1
    assert dict(conv_bn_pairs(numpy_state_dict(trained("densenet")))) == {"temporal.0": "temporal.1"}


@pytest.mark.parametrize("name", MODELS)
def test_folding_every_batchnorm_matches_torchs_fuse(name):
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
    model = trained(name)
    sd = numpy_state_dict(model)
    pairs = conv_bn_pairs(sd)
    if name == "densenet":
        pairs["features.conv0"] = "features.norm0"  # (passed by hand: not the convention's)
    eps = {n: m.eps for n, m in torch_batchnorms(model).items()}
    folded = fastbn.fold_batchnorms(sd, pairs, eps=eps)
    modules = dict(model.named_modules())
    for layer, bn in pairs.items():
        fuse = fuse_linear_bn_eval if isinstance(modules[layer], nn.Linear) else fuse_conv_bn_eval
        want = fuse(modules[layer], modules[bn])
        np.testing.assert_allclose(folded[f"{layer}.weight"], want.weight.detach().numpy(), rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(folded[f"{layer}.bias"], want.bias.detach().numpy(), rtol=2e-6, atol=1e-6)
        assert not any(k.startswith(bn + ".") for k in folded)
    unpaired = set(batchnorm_names(sd)) - set(pairs.values())
    for bn in unpaired:
        assert f"{bn}.running_mean" in folded
    assert [k for k in folded if k not in sd] == [f"{layer}.bias" for layer in pairs
                                                  if f"{layer}.bias" not in sd]


def test_fold_refuses_what_cannot_be_folded():
    sd = numpy_state_dict(trained("resnet"))
    with pytest.raises(ValueError, match="'fc' is not a BatchNorm of the state_dict"):
        fastbn.fold_batchnorms(sd, {"conv1": "fc"})
    with pytest.raises(ValueError, match="'layer9' has no weight"):
        fastbn.fold_batchnorms(sd, {"layer9": "bn1"})
    with pytest.raises(ValueError, match="cannot fold 'layer1.1.bn2' into 'conv1'"):
        fastbn.fold_batchnorms(sd, {"conv1": "layer1.1.bn2"})  # 8 outputs, 16 channels


def test_every_batchnorm_of_an_onnx_model_matches_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    c = 6
    inits, nodes = [], []
    # (node names hold dots as torch's exporter writes them, and one is another's prefix)
    for i, (name, eps, momentum) in enumerate([("stem.bn", 1e-3, 0.9), ("", 1e-5, 0.99),
                                               ("stem.bn.late", 1e-5, 0.9)]):
        for part, low, high in (("scale", 0.5, 1.5), ("bias", -1, 1), ("mean", -1, 1), ("var", 0.5, 2)):
            inits.append(numpy_helper.from_array(rng.uniform(low, high, c).astype(np.float32), f"{part}{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"x{i}", f"scale{i}", f"bias{i}", f"mean{i}", f"var{i}"],
                                      [f"x{i + 1}"], name=name, epsilon=eps, momentum=momentum))
    nodes.insert(1, helper.make_node("Relu", ["x1"], ["r1"]))
    nodes[2].input[0] = "r1"
    nodes[3].input[0] = "x0"  # (a third node, beside the others, read only for its name)
    nodes[3].output[0] = "x3"
    graph = helper.make_graph(nodes, "bns", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [2, c, 5, 5])],
                              [helper.make_tensor_value_info("x1", TensorProto.FLOAT, [2, c, 5, 5]),
                               helper.make_tensor_value_info("x2", TensorProto.FLOAT, [2, c, 5, 5])], inits)
    # (IR version 8, of opset 15's time: onnx writes its newest, which the onnxruntime wheels of
    # older Pythons -- 1.23 on 3.10 -- refuse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    onnx.checker.check_model(model)
    path = tmp_path / "bns.onnx"
    onnx.save(model, str(path))
    x = rng.standard_normal((2, c, 5, 5)).astype(np.float32) * 2 + 0.5
    y1, y2 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x0": x})
    bns = fastbn.load_batchnorms(path)
    assert list(bns) == ["stem.bn", "BatchNormalization_2", "stem.bn.late"]
    # (ONNX attributes are float32: eps is the float32 nearest 1e-3, as onnxruntime uses it)
    assert bns["stem.bn"].eps == float(np.float32(1e-3)) and bns["BatchNormalization_2"].eps == float(np.float32(1e-5))
    assert bns["stem.bn"].momentum == pytest.approx(0.1, rel=1e-6)
    assert bns["BatchNormalization_2"].momentum == pytest.approx(0.01, rel=1e-5)
    np.testing.assert_allclose(bns["stem.bn"](x), y1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bns["BatchNormalization_2"](np.maximum(y1, 0)), y2, rtol=1e-5, atol=1e-5)
    assert fastbn.load_batchnorms(path, eps={"stem.bn": 0.5})["stem.bn"].eps == 0.5
