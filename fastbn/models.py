"""Every BatchNorm of a model at once: found in its state_dict, built as modules ready for
inference, or folded into the convolutions and linear layers before them.

An ONNX model file names its BatchNormalization nodes and holds each one's epsilon and
momentum (read through the optional ``onnx`` package, imported only for ``.onnx`` files).

A state_dict names each layer's entries by the layer's path in the model
(``layer1.0.bn1.running_mean``) but does not say what the layer is.  A BatchNorm is recognised
by its running statistics: a prefix with both ``running_mean`` and ``running_var`` entries, 1-D
and of one length (a BatchNorm without running statistics cannot be told from other
normalisation layers, and is not found).  Its kind (1d, 2d, 3d) is not in the state_dict
either, so the modules are :class:`fastbn.BatchNorm`, which takes any of their inputs, and
``eps`` and ``momentum`` (not in a state_dict) are the caller's, per layer if need be.

Folding (eval mode) needs the layer before each BatchNorm: pass the pairs, or let the naming
convention of torchvision's and most hand-written models find them (:func:`conv_bn_pairs`).
"""

import os
import re
from collections import OrderedDict
from collections.abc import Mapping

from . import _validation as V
from .checkpoint import load_checkpoint
from .fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
from .modules import BatchNorm

__all__ = ["batchnorm_names", "load_batchnorms", "conv_bn_pairs", "fold_batchnorms"]


def _state_dict_of(source, key, bfloat16):
    if isinstance(source, Mapping):
        if key is not None:
            raise TypeError("key= selects the state_dict inside a checkpoint file; pass the "
                            "state_dict itself instead")
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_checkpoint(source, key=key, bfloat16=bfloat16)
    raise TypeError(f"source must be a checkpoint path or a state_dict (a mapping of names to "
                    f"arrays), got {type(source).__name__}")


def batchnorm_names(state_dict):
    """The names of the BatchNorm layers of a state_dict, in its order: each prefix (without
    its trailing dot; "" for a lone module's state_dict) that has both ``running_mean`` and
    ``running_var`` entries, 1-D arrays of one length."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    names = []
    for k in state_dict:
        if not (isinstance(k, str) and (k == "running_mean" or k.endswith(".running_mean"))):
            continue
        prefix = k[:-len("running_mean")]
        mean, var = state_dict[k], state_dict.get(prefix + "running_var")
        if (var is not None and getattr(mean, "ndim", None) == 1 and getattr(var, "ndim", None) == 1
                and mean.shape == var.shape):
            names.append(prefix[:-1])
    return names


def _per_layer(value, names, what, check, default):
    """{name: value} for every name, from one value or a mapping of some names to values (the
    others taking `default`, unchecked); a name the model does not have is an error."""
    if isinstance(value, Mapping):
        overrides = dict(value)
        unknown = [n for n in overrides if n not in names]
        if unknown:
            raise ValueError(f"{what} names layers the state_dict has no BatchNorm for: "
                             f"{unknown[:5]}; its BatchNorms: {names[:8]}"
                             f"{' ...' if len(names) > 8 else ''}")
        return {n: check(overrides[n]) if n in overrides else default for n in names}
    value = check(value)
    return {n: value for n in names}


def _eps(value):
    return V.check_eps(value, training=False)  # (torch's rule for a module's eps)


def _momentum(value):
    return V.check_momentum(value, allow_none=True)


def load_batchnorms(source, *, eps=None, momentum=None, key=None, dtype=None,
                    bfloat16="float32"):
    """Every BatchNorm of a model, as modules in eval mode, ready for inference.

    Parameters
    ----------
    source : str, os.PathLike or mapping
        A checkpoint file (anything :func:`fastbn.load_checkpoint` reads: torch.save files,
        safetensors, .npz), a state_dict, or an ONNX model file (``*.onnx``; needs the
        optional ``onnx`` package).
    eps : float or mapping of str to float, optional
        Not in a state_dict: the value the model was built with (default 1e-5), or a mapping
        from layer names to their own values (the others take the default).  An ONNX node's
        own epsilon is used unless given here.
    momentum : float or mapping of str to float or None, optional
        Likewise (default 0.1; only training uses it); torch's momentum=None (a cumulative
        average) through a mapping, ``{name: None}``.  An ONNX node's momentum m is torch's
        1 - m.
    key : str or sequence of str, optional
        Where the state_dict is in a nested checkpoint file, as for load_checkpoint.
    dtype : float32 or float64, optional
        The modules' dtype; by default each layer's own (float64 if its entries are).
    bfloat16 : {"float32", "keep"}
        As for load_checkpoint.

    Returns
    -------
    OrderedDict of str to fastbn.BatchNorm
        Each BatchNorm's name (its prefix in the state_dict without the trailing dot, e.g.
        ``"layer1.0.bn1"``) to a module loaded with its entries, in eval mode.  The modules
        take any input a BatchNorm1d, 2d or 3d takes, since a state_dict does not say which
        the layer was.

    Raises
    ------
    ValueError
        If the state_dict has no BatchNorm (the message lists what it has), or an entry of a
        layer is wrong (as ``from_state_dict`` says); and everything load_checkpoint raises.

    Examples
    --------
    >>> bns = fastbn.load_batchnorms("resnet18.pth")                    # doctest: +SKIP
    >>> y = bns["layer1.0.bn1"](x)                                       # doctest: +SKIP
    """
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".onnx"):
        if key is not None:
            raise TypeError("key= selects the state_dict inside a checkpoint file; an ONNX "
                            "model has none")
        layers, own_eps, own_momentum = _onnx_batchnorms(os.fspath(source))
        names = list(layers)
    else:
        layers, state_dict = None, _state_dict_of(source, key, bfloat16)
        names = batchnorm_names(state_dict)
        own_eps, own_momentum = dict.fromkeys(names, 1e-5), dict.fromkeys(names, 0.1)
    if not names and layers is not None:
        raise ValueError(f"{os.fspath(source)}: the ONNX model has no BatchNormalization node")
    if not names:
        from .modules import _norm_prefixes
        raise ValueError(f"found no BatchNorm layer (a prefix with running_mean and running_var) "
                         f"in the state_dict; {_norm_prefixes(state_dict)}")
    eps_of = _per_layer(eps, names, "eps", _eps, None) if eps is not None else {}
    momentum_of = (_per_layer(momentum, names, "momentum", _momentum, _UNSET)
                   if momentum is not None else {})
    modules = OrderedDict()
    for name in names:
        layer_eps = eps_of.get(name)
        layer_momentum = momentum_of.get(name, _UNSET)
        # (an ONNX node's own entries: node names may hold dots, and one prefix another's)
        entries, prefix = (layers[name], "") if layers is not None else (state_dict, name)
        modules[name] = BatchNorm.from_state_dict(
            entries, prefix, eps=own_eps[name] if layer_eps is None else layer_eps,
            momentum=own_momentum[name] if layer_momentum is _UNSET else layer_momentum,
            dtype=dtype).eval()
    return modules


_UNSET = object()


def _onnx_batchnorms(path):
    """({name: the node's state_dict}, {name: epsilon}, {name: torch momentum}) of the
    BatchNormalization nodes of an ONNX model, by node name (``BatchNormalization_<index>``
    for an unnamed node).  Their parameters must be initializers or Constant nodes."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError(f"reading {path} needs the optional 'onnx' package: pip install onnx") from None
    model = onnx.load(path)
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = attribute.t
    layers, eps, momentum = OrderedDict(), {}, {}
    for index, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization":
            continue
        name = node.name or f"BatchNormalization_{index}"
        if name in eps:
            raise ValueError(f"{path}: two BatchNormalization nodes are named {name!r}")
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layers[name] = OrderedDict()
        for entry, value_name in zip(("weight", "bias", "running_mean", "running_var"),
                                     node.input[1:5]):
            if value_name not in constants:
                raise ValueError(f"{path}: input {value_name!r} ({entry}) of BatchNormalization "
                                 f"node {name!r} is computed in the graph, not a constant of it")
            layers[name][entry] = numpy_helper.to_array(constants[value_name])
        eps[name] = float(attributes.get("epsilon", 1e-5))
        momentum[name] = 1.0 - float(attributes.get("momentum", 0.9))
    return layers, eps, momentum


# The naming convention for the layer before a BatchNorm: (pattern of the BatchNorm's last
# name part, how to name the layer's last part).
_CONVENTION = (
    (re.compile(r"bn(\d*)"), lambda m: f"conv{m.group(1)}"),         # resnet: conv1 -> bn1
    (re.compile(r"(\d+)"), lambda m: str(int(m.group(1)) - 1) if int(m.group(1)) else None),
    # Sequential children, mobilenet's and downsample's: 0 (conv) -> 1 (bn)
)


_BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _weight(state_dict, prefix):
    w = state_dict.get(f"{prefix}.weight" if prefix else "weight")
    return w if getattr(w, "ndim", 0) >= 2 else None


def conv_bn_pairs(state_dict):
    """{layer name: BatchNorm name} of the BatchNorms whose preceding convolution or linear
    layer the naming convention finds: for ``P.bnK`` the layer ``P.convK`` (``P.bn``:
    ``P.conv``), for a numbered child ``P.K`` of a Sequential the child ``P.K-1`` -- each only
    if that layer has a weight of 2 or more dimensions whose first (its outputs) has the
    BatchNorm's channel count.  Other BatchNorms are left out: densenet's ``normK``, which
    comes before its ``convK``, or a BatchNorm that follows an activation."""
    pairs = OrderedDict()
    for name in batchnorm_names(state_dict):
        parent, _, last = name.rpartition(".")
        channels = state_dict[f"{name}.running_mean" if name else "running_mean"].shape[0]
        for pattern, layer_of in _CONVENTION:
            match = pattern.fullmatch(last)
            layer = layer_of(match) if match else None
            if layer is None:
                continue
            layer = f"{parent}.{layer}" if parent else layer
            w = _weight(state_dict, layer)
            if w is not None and w.shape[0] == channels and layer not in pairs:
                pairs[layer] = name
            break
    return pairs


def fold_batchnorms(state_dict, pairs=None, *, eps=1e-5):
    """A state_dict in which each eval-mode BatchNorm is folded into the layer before it.

    Parameters
    ----------
    state_dict : mapping
        A model's state_dict (from load_checkpoint, or torch's ``model.state_dict()``).
    pairs : mapping of str to str, optional
        {convolution or linear layer name: name of the BatchNorm that follows it}; by default
        those :func:`conv_bn_pairs` finds by the naming convention.
    eps : float or mapping of str to float, default 1e-5
        The BatchNorms' eps (per BatchNorm name, as in :func:`load_batchnorms`).

    Returns
    -------
    OrderedDict
        The state_dict with each paired layer's ``weight`` and ``bias`` replaced by the
        folded ones (a ``bias`` entry added after the weight where the layer had none) and the
        folded BatchNorms' entries removed; everything else as it was, in its order.  A model
        built without those BatchNorms (and with biases on those layers) computes in eval mode
        what the original computed: ``fuse_conv_bn_weights``'s arithmetic, torch's
        ``fuse_conv_bn_eval``'s results.

    Examples
    --------
    >>> sd = fastbn.fold_batchnorms(fastbn.load_checkpoint("resnet18.pth"))  # doctest: +SKIP
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    names = batchnorm_names(state_dict)
    pairs = conv_bn_pairs(state_dict) if pairs is None else OrderedDict(pairs)
    eps_of = _per_layer(eps, names, "eps", _eps, 1e-5)
    folded, dropped = {}, set()
    for layer, bn in pairs.items():
        if bn not in eps_of:
            raise ValueError(f"{bn!r} is not a BatchNorm of the state_dict (no running_mean and "
                             f"running_var under it); its BatchNorms: {names[:8]}")
        w = _weight(state_dict, layer)
        if w is None:
            raise ValueError(f"{layer!r} has no weight of 2 or more dimensions in the state_dict "
                             f"to fold {bn!r} into")
        entry = lambda n: state_dict.get(f"{bn}.{n}" if bn else n)  # noqa: E731
        b = state_dict.get(f"{layer}.bias")
        fold = fuse_linear_bn_weights if w.ndim == 2 else fuse_conv_bn_weights
        try:
            folded[layer] = fold(w, b, entry("running_mean"), entry("running_var"), eps_of[bn],
                                 entry("weight"), entry("bias"))
        except ValueError as exc:
            raise ValueError(f"cannot fold {bn!r} into {layer!r}: {exc}") from None
        dropped.update(k for k in state_dict if isinstance(k, str) and k.rpartition(".")[0] == bn
                       and k.rpartition(".")[2] in _BN_ENTRIES)
    result = OrderedDict()
    for k, v in state_dict.items():
        if k in dropped:
            continue
        layer = k.rpartition(".")[0] if isinstance(k, str) else None
        if layer in folded and k == f"{layer}.weight":
            result[k] = folded[layer][0]
            result[f"{layer}.bias"] = folded[layer][1]
        elif layer in folded and k == f"{layer}.bias":
            continue  # (written after the weight)
        else:
            result[k] = v
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        result._metadata = metadata
    return result
