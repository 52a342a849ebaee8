"""BatchNorm1d, BatchNorm2d and BatchNorm3d: torch's modules, holding numpy arrays; and
BatchNorm, which takes any of their inputs, for layers whose kind a checkpoint does not say.

A module owns its state -- parameters ``weight`` and ``bias``, buffers ``running_mean``,
``running_var`` and ``num_batches_tracked`` (``None`` when switched off, so that names and
state_dict keys stay as torch's) -- validates its input and its own state at every call (they
are attributes anyone may assign), and runs the internal pipeline (:mod:`fastbn._pipeline`)
that the functional API also runs.
The subclasses differ only in the input dimensions they accept.

Unlike torch, a call that is rejected changes nothing: torch increments
``num_batches_tracked`` before it validates its input, fastbn validates first.
"""

import threading
from collections import OrderedDict, namedtuple

import numpy as np

from . import _pipeline as P
from . import _validation as V
from .fusion import bn_scale_shift
from ._openmp import effective_n_threads

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "IncompatibleKeys"]

#: What a module keeps after a forward that wrote over its own input (out=input).
_OVERWRITTEN = object()

#: What ``load_state_dict`` returns, as torch's ``_IncompatibleKeys``.
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

_PARAMETERS = ("weight", "bias")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _BatchNorm:
    r"""Batch normalisation over dimension 1 of an (N, C, \*) array.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Mean and variance are per channel over the batch and spatial dimensions.  In training mode
    they are the batch's, and the variance used to normalise is the biased one
    (``x.var(ddof=0)``), while ``running_var`` accumulates the unbiased one (``ddof=1``); in
    eval mode the running estimates are used.  With ``track_running_stats=False`` there are no
    running estimates and batch statistics are used in both modes.

    The running estimates follow ``new = (1 - momentum) * old + momentum * batch_value``; with
    ``momentum=None`` they are the cumulative average over the ``num_batches_tracked`` batches
    seen.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance for numerical stability (must be > 0 to train).
    momentum : float or None, default 0.1
        Update factor of the running estimates; None for a cumulative moving average.
    affine : bool, default True
        Learnable ``weight`` (gamma, ones) and ``bias`` (beta, zeros).
    track_running_stats : bool, default True
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked``.
    dtype : float32 or float64, default float32
        dtype of the parameters and buffers, and of the input the module accepts (plus float16
        and bfloat16 input for a float32 module, read and written as it is and computed in
        float32).
    bias : bool, default True (keyword only)
        With ``affine=True``, whether to learn the bias; ``bias=False`` keeps a weight only.
    activation : None or 'relu', default None (keyword only)
        Applied to the output in the same pass over memory (torch's ReLU), forward and
        backward: BatchNorm followed by ReLU for the cost of BatchNorm alone.  Not part of
        torch's BatchNorm; the ``repr`` shows it only when set, and it is not part of the
        state_dict.
    """

    _input_dims: "tuple[int, ...]" = ()  # the input ndims a subclass accepts

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, *, bias=True, activation=None):
        self.num_features = V.check_num_features(num_features)
        self.eps = V.check_eps(eps, training=False)
        self.momentum = V.check_momentum(momentum, allow_none=True)
        self.affine = V.check_flag(affine, "affine")
        self.track_running_stats = V.check_flag(track_running_stats, "track_running_stats")
        self.dtype = V.check_module_dtype(dtype)
        use_bias = V.check_flag(bias, "bias")
        self.activation = V.check_activation(activation)
        self.training = True
        c = self.num_features
        self.weight = np.empty(c, self.dtype) if self.affine else None
        self.bias = np.empty(c, self.dtype) if self.affine and use_bias else None
        if self.track_running_stats:
            self.running_mean = np.empty(c, self.dtype)
            self.running_var = np.empty(c, self.dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None  # the last forward's _pipeline.ForwardContext, for backward()
        self._eval_table = None  # the eval coefficients (_pipeline.EvalTable), made on demand
        # Held while the running statistics and the counter change (see forward).
        self._lock = threading.Lock()
        self.reset_parameters()

    # -- state --------------------------------------------------------------------------------

    def reset_running_stats(self):
        """running_mean = 0, running_var = 1, num_batches_tracked = 0 (in place)."""
        if self.track_running_stats:
            with self._lock:
                self.running_mean[...] = 0
                self.running_var[...] = 1
                self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        """Reset the running statistics, and weight = 1, bias = 0 (in place)."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    def train(self, mode=True):
        """Set training mode (``mode=False``: eval mode); returns self."""
        if not isinstance(mode, (bool, np.bool_)):
            raise ValueError("training mode is expected to be boolean")
        self.training = bool(mode)
        return self

    def eval(self):
        """Set eval mode; returns self."""
        return self.train(False)

    # -- computation --------------------------------------------------------------------------
    #
    # A forward is two steps: _prepare(input, out) validates everything the call reads or
    # writes except the per-channel arrays and returns the call -- (x, out, update, batch_stats,
    # eps, momentum): the input and out, whether it updates the running buffers (training with
    # track_running_stats), whether it uses batch statistics, its eps and its momentum (None:
    # the cumulative average; 0.0 when nothing is updated) -- and _run(*call) computes it
    # through fastbn._pipeline
    # (whose forward checks the parameters and buffers at every call: they are attributes
    # anyone may assign), updates the running buffers and the counter, and keeps the context
    # for backward().  A backward is _backward_inputs(grad_output), then the pipeline.  These,
    # _check_input, _check_state and _constructor_arguments are the interface subclasses use:
    # SyncBatchNorm checks everything before its ranks exchange statistics (so that a rank's
    # bad state fails every rank alike), then merges them between _prepare and _run.

    def _check_input(self, input):
        x = V.as_float_array(input, "input")
        V.check_input_ndim(x, self._input_dims)
        V.check_channels(x, self.num_features)
        compute = P.compute_dtype(x.dtype)
        if compute != self.dtype:
            V.check_input_dtype(x, compute, self.dtype, type(self).__name__)
        return x

    def _prepare(self, input, out):
        """A forward's validated call: input, out, what it does and its eps and momentum."""
        x = self._check_input(input)
        if out is not None:
            V.check_out(out, x.shape, x.dtype)
        update = self.training and self.track_running_stats
        # torch: batch statistics in training mode, and in eval mode without running estimates.
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Attributes a user may set, as the arrays: checked where they are used.
        eps = V.check_eps(self.eps, batch_stats)
        momentum = V.check_momentum(self.momentum, allow_none=True) if update else 0.0
        # (a plain tuple: a namedtuple's constructor and attribute reads cost 0.5 us of a 4 us
        # call)
        return x, out, update, batch_stats, eps, momentum

    def _check_state(self, x, update):
        """Raise what _run would raise for this module's parameters, buffers and counter, for
        input x (a subclass that must fail before any collective calls it; _run checks them
        anyway)."""
        P.per_channel_arrays(x.shape[1], P.compute_dtype(x.dtype), weight=self.weight,
                             bias=self.bias, running_mean=self.running_mean,
                             running_var=self.running_var,
                             update=update and self.running_mean is not None)
        if update and not P.counter_ok(self.num_batches_tracked):
            V.check_counter(self.num_batches_tracked)

    def forward(self, input, *, out=None):
        """Normalise ``input`` (N, C, ...); returns an array of input's shape, dtype and memory
        format (C-contiguous or channels-last), then the activation if one is set.

        In training mode (with ``track_running_stats``) the running estimates and
        ``num_batches_tracked`` are updated.  The input (and, with an activation, the output)
        and the statistics used are kept for :meth:`backward`; do not modify them in place
        before calling it.

        ``out`` (keyword only): an array of input's shape and dtype, C-contiguous or
        channels-last, to write the output into and return; ``out=input`` normalises in place,
        after which :meth:`backward` is unavailable (its input is gone).
        """
        x, out, update, batch_stats, eps, momentum = self._prepare(input, out)
        if batch_stats:
            V.check_batch_size(x.shape)
        return self._run(x, out, update, batch_stats, eps, momentum)[0]

    def _run(self, x, out, update, batch_stats, eps, momentum, stats=None):
        """Compute a call _prepare made: (output, the context kept for backward, or None when
        the output overwrote the input).  `stats`: a distributed batch's merged statistics
        (pipeline.forward's stats), used instead of the input's own in training."""
        relu = self.activation == "relu"
        n_threads = effective_n_threads()
        if update:
            # One training step at a time: the kernel updates the running statistics in place
            # with the GIL released, and momentum=None reads the counter, so that concurrent
            # calls from several threads would lose updates.  (Uncontended: ~0.1 us a call.)
            with self._lock:
                counter = self.num_batches_tracked
                # count: a Python int, whose increment the checks make fit the counter's dtype
                if P.counter_ok(counter):
                    count = counter.item()
                else:
                    V.check_counter(counter)
                    count = None if counter is None else int(np.asarray(counter).reshape(-1)[0])
                if momentum is None:  # cumulative moving average
                    momentum = 1.0 / float(count + 1) if counter is not None else 0.0
                y, _, _, context = P.forward(
                    x, weight=self.weight, bias=self.bias, running_mean=self.running_mean,
                    running_var=self.running_var, training=True, momentum=momentum, eps=eps,
                    relu=relu, out=out, n_threads=n_threads, stats=stats)
                if isinstance(counter, np.ndarray):
                    # only once the call has succeeded (a scalar store: a ufunc on a 0-d array
                    # costs a microsecond, a fifth of a small call)
                    counter[...] = count + 1
                elif counter is not None:  # a number a user assigned: counted all the same
                    self.num_batches_tracked = count + 1
        elif batch_stats:
            y, _, _, context = P.forward(
                x, weight=self.weight, bias=self.bias, running_mean=None, running_var=None,
                training=True, momentum=0.0, eps=eps, relu=relu, out=out, n_threads=n_threads,
                stats=stats)
        else:
            # Eval with the running statistics: their coefficients are computed once and kept
            # for as long as the parameters, buffers and eps keep the same bytes (checked at
            # every call, so nothing changed in place is ever served stale).
            table = self._eval_table = P.eval_table(
                self._eval_table, self.weight, self.bias, self.running_mean, self.running_var,
                eps, self.dtype, self.num_features)
            y, _, _, context = P.forward(
                x, weight=self.weight, bias=self.bias, running_mean=self.running_mean,
                running_var=self.running_var, training=False, momentum=0.0, eps=eps, relu=relu,
                out=out, n_threads=n_threads, table=table)
        overwritten = out is not None and np.may_share_memory(out, x)
        self._saved = _OVERWRITTEN if overwritten else context
        return y, (None if overwritten else context)

    __call__ = forward

    def _backward_inputs(self, grad_output):
        """(grad_output as an array, the last forward's context), validated against each other."""
        context = self._saved
        if context is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward(): there "
                               f"is no saved input to differentiate")
        if context is _OVERWRITTEN:
            raise RuntimeError(f"{type(self).__name__}.backward(): the last forward wrote its "
                               f"output over its input (out=), so there is no input left to "
                               f"differentiate")
        dy = V.as_float_array(grad_output, "grad_output")
        if dy.shape != context.shape or dy.dtype != context.dtype:
            V.check_grad_output(dy, context.shape, context.dtype)
        return dy, context

    def backward(self, grad_output):
        """Gradient with respect to the input of the last :meth:`forward`, for the given gradient
        with respect to its output.  Sets ``grad_weight`` and ``grad_bias`` (None without
        affine parameters); both are overwritten at each call, not accumulated.
        """
        dy, context = self._backward_inputs(grad_output)
        weight = self.weight
        dx, grad_weight, grad_bias = P.backward(dy, context, weight=weight,
                                                param_grads=weight is not None,
                                                n_threads=effective_n_threads())
        self.grad_weight = grad_weight if weight is not None else None
        self.grad_bias = grad_bias if self.bias is not None else None
        return dx

    def scale_shift(self, dtype=None):
        """The per-channel ``(scale, shift)`` this layer applies in eval mode,
        ``y = x * scale + shift`` (before any activation), for folding into a neighbouring
        layer; computed in float64, returned in ``dtype`` (default: the module's)."""
        if self.running_mean is None or self.running_var is None:
            raise ValueError(f"{type(self).__name__} has no running statistics "
                             f"(track_running_stats=False): in eval mode it normalises with each "
                             f"batch's own, so it is no fixed affine map")
        scale, shift = bn_scale_shift(self.running_mean, self.running_var, self.eps, self.weight,
                                      self.bias)
        dtype = self.dtype if dtype is None else V.check_module_dtype(dtype)
        return scale.astype(dtype), shift.astype(dtype)

    # -- checkpoints --------------------------------------------------------------------------

    def _entries(self):
        """(name, array) of the parameters and buffers that exist, in torch's order."""
        for name in _PARAMETERS + _BUFFERS:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        """The parameters and buffers by torch's names, as an OrderedDict of the module's own
        arrays (not copies, as in torch).  ``keep_vars`` is accepted for torch compatibility."""
        if destination is None:
            destination = OrderedDict()
        for name, value in self._entries():
            destination[prefix + name] = value
        return destination

    def load_state_dict(self, state_dict, strict=True):
        """Copy parameters and buffers from ``state_dict`` (numpy arrays, torch tensors, lists...).

        Keys are torch's.  ``num_batches_tracked`` may be absent (checkpoints from before torch
        added it), and is then left as it is.  Missing and unexpected keys are errors when
        ``strict``; wrong shapes and non-numeric values always are.  Nothing is modified unless
        every entry is valid.  Returns ``IncompatibleKeys(missing_keys, unexpected_keys)``.
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict).__name__}.")
        expected = dict(self._entries())
        # torch fills in num_batches_tracked for checkpoints of version < 2 or of no version
        # (a plain dict of arrays has none); a torch state_dict carries its version.
        version = (getattr(state_dict, "_metadata", None) or {}).get("", {}).get("version")
        optional = ("num_batches_tracked",) if version is None or version < 2 else ()
        missing = [k for k in expected if k not in state_dict and k not in optional]
        unexpected = [k for k in state_dict if k not in expected]
        problems = []
        updates = []
        for name, target in expected.items():
            if name not in state_dict:
                continue
            try:
                value = _checkpoint_value(name, state_dict[name], target)
            except (TypeError, ValueError) as exc:
                problems.append(str(exc))
                continue
            updates.append((target, value))
        if strict:
            if unexpected:
                problems.insert(0, "Unexpected key(s) in state_dict: "
                                + ", ".join(f'"{k}"' for k in unexpected) + ". ")
            if missing:
                problems.insert(0, "Missing key(s) in state_dict: "
                                + ", ".join(f'"{k}"' for k in missing) + ". ")
        if problems:
            raise ValueError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                             + "\n\t".join(problems))
        with self._lock:  # not in the middle of another thread's training step
            for target, value in updates:
                target[...] = value
        return IncompatibleKeys(missing, unexpected)

    @classmethod
    def from_state_dict(cls, state_dict, prefix="", *, eps=1e-5, momentum=0.1, dtype=None,
                        strict=True):
        """A module built from, and loaded with, the entries of ``state_dict`` under ``prefix``.

        Parameters
        ----------
        state_dict : mapping
            A whole model's state_dict (from :func:`fastbn.load_checkpoint`, or torch's
            ``model.state_dict()``), or a single module's.
        prefix : str, default ""
            The module's name in the model followed by a dot, as in its keys:
            ``"layer1.0.bn1."``.  The trailing dot may be left out.
        eps : float, default 1e-5
            Not stored in a state_dict: give the value the model was built with.
        momentum : float or None, default 0.1
            Not stored in a state_dict either.
        dtype : float32 or float64, optional
            The module's dtype.  By default float64 if any of the weight, bias and running
            statistics is float64, else float32.
        strict : bool, default True
            As in :meth:`load_state_dict`: with True, entries under the prefix that the module
            does not have are errors (a missing ``num_batches_tracked`` only where torch's
            ``_metadata`` says the checkpoint's module has one).

        Returns
        -------
        module : an instance of this class (``BatchNorm2d.from_state_dict`` builds a BatchNorm2d)

        Notes
        -----
        The structure is inferred from the keys present: ``num_features`` from the length of
        ``weight`` (or else ``running_mean``, ``bias``, ``running_var``), ``affine`` from
        ``weight``, ``bias`` from ``bias``, and ``track_running_stats`` from ``running_mean``
        or ``running_var``.  The module is in training mode, as a new one is; call
        :meth:`eval` to use the running statistics.

        Examples
        --------
        >>> sd = fastbn.load_checkpoint("resnet18.pth")                     # doctest: +SKIP
        >>> bn = fastbn.BatchNorm2d.from_state_dict(sd, "layer1.0.bn1").eval()  # doctest: +SKIP
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict).__name__}.")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if prefix and not prefix.endswith("."):
            prefix += "."  # "layer1.0.bn1" must not also take "layer1.0.bn10.weight"
        entries = OrderedDict((k[len(prefix):], state_dict[k]) for k in state_dict.keys()
                              if isinstance(k, str) and k.startswith(prefix))
        if not entries:
            raise ValueError(f'no entries under prefix "{prefix}" in the state_dict ({len(state_dict)} '
                             f"entries); {_norm_prefixes(state_dict)}")
        per_channel = OrderedDict()
        for name in ("weight", "running_mean", "bias", "running_var"):  # num_features from the first
            if name in entries:
                try:
                    array = np.asarray(entries[name])
                except Exception as exc:
                    raise TypeError(f'could not convert "{prefix}{name}" '
                                    f"({type(entries[name]).__name__}) to an array: {exc}") from None
                if array.ndim != 1:
                    raise ValueError(f'"{prefix}{name}" has shape {tuple(array.shape)}, but a '
                                     f"BatchNorm's {name} is 1-D (one value per channel): is "
                                     f'"{prefix}" the prefix of a BatchNorm layer? '
                                     f"{_norm_prefixes(state_dict)}")
                entries[name] = per_channel[name] = array
        if not per_channel:
            raise ValueError(f'nothing under prefix "{prefix}" gives num_features: expected a '
                             f"weight, bias, running_mean or running_var, found "
                             f"{list(entries)[:8]}")
        if dtype is None:
            wide = any(a.dtype == np.float64 for a in per_channel.values())
            dtype = np.float64 if wide else np.float32
        module = cls(len(next(iter(per_channel.values()))), eps=eps, momentum=momentum,
                     affine="weight" in entries,
                     track_running_stats="running_mean" in entries or "running_var" in entries,
                     dtype=dtype, bias="bias" in entries)
        # torch's _metadata is keyed by module path; the module's own entry is its version.
        metadata = getattr(state_dict, "_metadata", None)
        if isinstance(metadata, dict) and prefix[:-1] in metadata:
            entries._metadata = {"": metadata[prefix[:-1]]}
        try:
            module.load_state_dict(entries, strict=strict)
        except ValueError as exc:
            raise ValueError(f'{exc}\n(entries under prefix "{prefix}")') from None
        return module

    def _constructor_arguments(self):
        """The arguments that build a module of this one's configuration (its class's
        constructor's, but for those a subclass adds): what convert_sync_batchnorm passes on."""
        return dict(num_features=self.num_features, eps=self.eps, momentum=self.momentum,
                    affine=self.affine, track_running_stats=self.track_running_stats,
                    dtype=self.dtype, bias=self.bias is not None or not self.affine,
                    activation=self.activation)

    # -- representation -----------------------------------------------------------------------

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}"
                + (f", activation={self.activation!r}" if self.activation else ""))

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def __getstate__(self):
        # The last forward's input is scratch for backward() and the eval table a cache, not
        # state worth pickling; a lock cannot be pickled, and a copy gets its own.
        state = self.__dict__.copy()
        state["_saved"] = None
        state["_eval_table"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_eval_table", None)  # (pickled before there was one)
        self._lock = threading.Lock()


def _checkpoint_value(name, value, target):
    """A checkpoint entry as an array ready to copy into ``target``, or a torch-worded error.
    The target (the module's own attribute, which a user may have replaced) is checked too, so
    that load_state_dict writes nothing unless it can write everything."""
    if not isinstance(target, np.ndarray):
        raise TypeError(f"the module's {name} is a {type(target).__name__}, not an array: "
                        f"there is nothing to load it into")
    if not target.flags.writeable:
        raise ValueError(f"the module's {name} is read-only: cannot load into it")
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise TypeError(f'could not convert "{name}" ({type(value).__name__}) to an array: {exc}') from None
    if V.is_bfloat16(array.dtype):
        # ml_dtypes.bfloat16 (load_checkpoint(..., bfloat16="keep")), recognised without
        # importing ml_dtypes: its bits are the high half of the float32 of the same value,
        # so this widening is exact, and the checks below then see an ordinary float32.
        wide = array.view(np.uint16).astype(np.uint32)
        wide <<= 16
        array = wide.view(np.float32)
    if array.dtype.kind not in "biuf":
        raise TypeError(f'"{name}" has dtype {array.dtype}; expected real numbers')
    if target.ndim == 0 and array.shape == (1,):
        array = array.reshape(())  # torch accepts a 1-element tensor for a 0-d buffer
    if array.shape != target.shape:
        raise ValueError(f"size mismatch for {name}: copying a param with shape {tuple(array.shape)} "
                         f"from checkpoint, the shape in current model is {tuple(target.shape)}.")
    if target.dtype.kind == "i":
        if array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array))):
            raise ValueError(f'"{name}" must hold whole numbers, got {array!r}')
        # A count: non-negative, and within int64 (a cast would wrap or saturate silently).
        if np.any(array < 0) or np.any(array >= 2 ** 63):
            raise ValueError(f'"{name}" must be a count between 0 and 2**63 - 1, got {array!r}')
        array = array.astype(target.dtype)
    elif array.dtype.kind == "f" and array.dtype.itemsize > target.dtype.itemsize:
        # float64 values beyond float32's range would become inf: an error, not a silent inf.
        big = np.isfinite(array) & (np.abs(array) > np.finfo(target.dtype).max)
        if np.any(big):
            raise ValueError(f'"{name}" holds values outside the range of {target.dtype} (the '
                             f"module's dtype), e.g. {array[big][0]!r}: they would become inf")
    return array


def _norm_prefixes(state_dict, limit=6):
    """A hint naming the prefixes of a state_dict that look like normalisation layers': those
    with running statistics, or failing that a 1-D weight."""
    keys = [k for k in state_dict.keys() if isinstance(k, str)]
    found = [k[:-len(s)] for k in keys for s in ("running_mean",) if k.endswith(s)]
    if not found:
        found = [k[:-len("weight")] for k in keys
                 if k.endswith("weight") and getattr(state_dict[k], "ndim", None) == 1]
    if not found:
        return f"it has no BatchNorm-like entries (running_mean, or a 1-D weight); its keys: {keys[:limit]}"
    shown = ", ".join(f'"{p}"' for p in found[:limit])
    more = f", ... ({len(found)} in all)" if len(found) > limit else ""
    return f"BatchNorm-like prefixes in it: {shown}{more}"


class BatchNorm1d(_BatchNorm):
    __doc__ = ("Batch normalisation over a 2D (N, C) or 3D (N, C, L) input.\n"
               + (_BatchNorm.__doc__ or "\n").split("\n", 1)[1])  # None under python -OO
    _input_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    __doc__ = ("Batch normalisation over a 4D (N, C, H, W) input.\n"
               + (_BatchNorm.__doc__ or "\n").split("\n", 1)[1])  # None under python -OO
    _input_dims = (4,)


class BatchNorm3d(_BatchNorm):
    __doc__ = ("Batch normalisation over a 5D (N, C, D, H, W) input.\n"
               + (_BatchNorm.__doc__ or "\n").split("\n", 1)[1])  # None under python -OO
    _input_dims = (5,)


class BatchNorm(_BatchNorm):
    __doc__ = ("Batch normalisation over an input of 2 to 5 dimensions, (N, C, *spatial): any input\n"
               "of BatchNorm1d, BatchNorm2d or BatchNorm3d, computed as they compute it.  For layers\n"
               "whose kind a state_dict does not say (fastbn.load_batchnorms builds these).\n"
               + (_BatchNorm.__doc__ or "\n").split("\n", 1)[1])  # None under python -OO
    _input_dims = (2, 3, 4, 5)
