"""``python -m fastbn bench``: fastbn against its peers and against the memory-bandwidth floor.

One registry of cases (operation x shape) drives this table and the pytest-benchmark suites in
``benchmarks/``.  Every implementation runs in the same process, on the same arrays, with the
same thread count, and times are medians of repeated calls (bottleneck's ``bn.bench()`` is the
model).  Nothing here asserts a timing.

The floor of an operation is the time of the fastest copy of the input's bytes at the same
thread count (an OpenMP memcpy of fastbn's own), times the passes over memory the operation
needs at least, over the copy's two.  The minima assume that a channel's data (or a column
tile of a flat tensor) fits in cache between its statistics and its normalisation, so that
the second read of it costs no memory traffic:

=================  ======  ==================================================================
operation          passes  memory traffic
=================  ======  ==================================================================
eval               2       read x, write y
train              2       read x (statistics, then normalisation from cache), write y
train+backward     5       the training forward, then read x and dy (sums, then grad_input
                           from cache), write dx
=================  ======  ==================================================================

Below a few hundred KiB nothing leaves the cache and a call costs its fixed overhead: the
floor column then says how far the call is from a copy of the same bytes, not from memory.

There are two copies, and so two floors.  An ordinary store reads each destination line before
writing it (read for ownership); a streaming store writes past the caches and skips that read.
fastbn writes float32 outputs too large for the caches with streaming stores (planar runs and
the columns layout's rows; ``fastbn._tuning.STREAM_MIN_BYTES``), so the table shows the time
over both floors, ``floor`` (a memcpy) and ``nt fl`` (every output written with streaming
stores, where the build has them), and marks with ``*`` the one the row is held to.  The
floor a row is held to (``floor_s`` in the JSON) counts a streaming copy for each output
fastbn wrote with streaming stores (as ``_tuning.streamed_passes`` counts them) and half an
ordinary copy for every other pass; where fastbn streams one output of two (the training
forward's, not the backward's), it lies between the two columns and neither is marked.

Variants of these operations time the features that change speed: ``+relu`` (the fused ReLU;
torch runs its BatchNorm then an in-place ReLU), ``:nhwc`` (channels-last input and output;
torch gets a channels_last tensor) and ``:fp16`` (float16 data into a float32 module, computed
in float32 by both).  Their floors count the bytes of the data as given (two per value for
float16).  ``dtype`` (``--dtype``) float16 or bfloat16 times every operation on half data into
a float32 module, against torch's BatchNorm on the same half dtype (its mixed-precision CPU
path); ONNX Runtime and plain numpy are timed on float32 and float64 data only.
"""

import json
import os
import platform
import sys
import time

import numpy as np

from . import __version__
from . import _tuning
from . import _validation as V
from ._dispatch import kernels, simd_level
from ._openmp import get_num_threads, openmp_version, set_num_threads
from ._cpu import supported_simd_levels
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

#: The suite: NCHW planes (issue #3), 1x1 planes, BatchNorm1d's (N, C) and (N, C, L), small
#: tensors and batch-1 inference (issue #12), from 96 bytes to 25 MiB of float32.
SHAPES = [(32, 64, 56, 56), (8, 256, 28, 28), (64, 32, 32, 32), (256, 512, 7, 7),
          (16, 3, 224, 224),                       # NCHW planes
          (128, 2048, 1, 1),                       # 1x1 planes (late stages, heads)
          (4096, 1024), (512, 256), (64, 128),     # BatchNorm1d (N, C): MLPs, tabular models
          (64, 256, 32), (16, 64, 50),             # BatchNorm1d (N, C, L): sequences
          (1, 64, 56, 56), (1, 512, 7, 7), (1, 2048, 1, 1),  # batch-1 inference
          (4, 64, 8, 8), (1, 2, 3, 4)]             # small tensors
QUICK_SHAPES = [(8, 256, 28, 28), (128, 2048, 1, 1), (512, 256), (16, 64, 50), (1, 512, 7, 7),
                (1, 2048, 1, 1), (4, 64, 8, 8), (1, 2, 3, 4), (4096, 1024)]
OPS = {"eval": 2, "train": 2, "train+backward": 5}
#: Feature variants (``python -m fastbn bench --ops ...``): the base operation, then options.
VARIANTS = {"eval+relu": ("eval", "relu"), "train+relu": ("train", "relu"),
            "train+backward+relu": ("train+backward", "relu"),
            "eval:nhwc": ("eval", "nhwc"), "train:nhwc": ("train", "nhwc"),
            "train+backward:nhwc": ("train+backward", "nhwc"),
            "eval:fp16": ("eval", "fp16"), "train:fp16": ("train", "fp16"),
            "train+backward:fp16": ("train+backward", "fp16")}
FEATURE_SHAPES = [(32, 64, 56, 56), (8, 256, 28, 28), (16, 3, 224, 224)]


def data_dtype(name):
    """The numpy dtype of a dtype name: float32, float64, float16 or bfloat16 (ml_dtypes')."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise SystemExit("--dtype bfloat16 needs ml_dtypes: pip install fastbn[bf16]") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def split_op(op):
    """(base operation, variant or None) of an operation name."""
    return VARIANTS.get(op, (op, None))


def passes(op):
    return OPS[split_op(op)[0]]


def variant_input(variant, x):
    """The benchmark's input for a variant: channels-last memory, float16, or x itself."""
    if variant == "nhwc":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    if variant == "fp16":
        return x.astype(np.float16)
    return x
PEERS = ("torch", "onnxruntime", "numpy")


# ---------------------------------------------------------------------------------------------
# Implementations: each prepares a zero-argument callable for (op, x, dy) outside the timing
# ---------------------------------------------------------------------------------------------

def fastbn_case(op, x, dy, threads):
    set_num_threads(threads)
    op, variant = split_op(op)
    dtype = np.float32 if V.is_half(x.dtype) else x.dtype
    module = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}[x.ndim]
    bn = module(x.shape[1], dtype=dtype, activation="relu" if variant == "relu" else None)
    if op == "eval":
        bn.eval()
        return lambda: bn(x)
    if op == "train":
        return lambda: bn(x)

    def forward_backward():
        bn(x)
        bn.backward(dy)
    return forward_backward


def numpy_case(op, x, dy, threads):
    """Plain numpy, the way one writes batch norm without a library (single-threaded)."""
    op, variant = split_op(op)
    if variant is not None or V.is_half(x.dtype):
        return None  # the plain-numpy baseline is timed on the base operations only
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    c = x.shape[1]
    weight, bias = np.ones(c, x.dtype), np.zeros(c, x.dtype)
    running_mean, running_var = np.zeros(c, x.dtype), np.ones(c, x.dtype)
    eps = 1e-5

    def forward(training):
        if training:
            mean, var = x.mean(axis=axes), x.var(axis=axes)
        else:
            mean, var = running_mean, running_var
        invstd = 1 / np.sqrt(var + eps)
        return (x - mean.reshape(shape)) * (invstd * weight).reshape(shape) + bias.reshape(shape), mean, invstd

    if op == "eval":
        return lambda: forward(False)
    if op == "train":
        return lambda: forward(True)

    def forward_backward():
        _, mean, invstd = forward(True)
        xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
        n = x.size // c
        grad_bias = dy.sum(axis=axes)
        grad_weight = (dy * xhat).sum(axis=axes)
        return (weight * invstd).reshape(shape) * (dy - (grad_bias / n).reshape(shape)
                                                  - xhat * (grad_weight / n).reshape(shape))
    return forward_backward


def torch_case(op, x, dy, threads):
    import torch
    torch.set_num_threads(threads)
    op, variant = split_op(op)
    # A float32 module for half data, as fastbn's: torch's mixed-precision CPU batch norm.
    dtype = {np.dtype(np.float64): torch.float64}.get(x.dtype, torch.float32)
    module = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
              5: torch.nn.BatchNorm3d}[x.ndim]
    bn = module(x.shape[1], dtype=dtype)
    tx, tdy = _torch_tensor(x), _torch_tensor(dy)
    if variant == "nhwc":
        tx = tx.contiguous(memory_format=torch.channels_last)
        tdy = tdy.contiguous(memory_format=torch.channels_last)
    relu = variant == "relu"
    if op in ("eval", "train"):
        bn.train(op == "train")

        def forward():
            with torch.no_grad():
                y = bn(tx)
                return y.relu_() if relu else y
        return forward
    txg = tx.clone().requires_grad_()

    def forward_backward():
        txg.grad = None
        bn.weight.grad = bn.bias.grad = None
        y = bn(txg)
        (torch.relu(y) if relu else y).backward(tdy)
    return forward_backward


def _torch_tensor(a):
    """A torch tensor with a's values and dtype (bfloat16 through its bits)."""
    import torch
    a = np.ascontiguousarray(a)
    if V.is_bfloat16(a.dtype):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def onnxruntime_case(op, x, dy, threads):
    """ONNX Runtime's BatchNormalization: an inference operator, so eval only."""
    if op != "eval" or V.is_half(x.dtype):
        return None
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    c = x.shape[1]
    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}[x.dtype]
    inits = [helper.make_tensor(name, elem, [c], values.astype(x.dtype).tolist())
             for name, values in (("scale", np.ones(c)), ("B", np.zeros(c)),
                                  ("mean", np.zeros(c)), ("var", np.ones(c)))]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"], epsilon=1e-5)
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info("X", elem, list(x.shape))],
                              [helper.make_tensor_value_info("Y", elem, list(x.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = min(model.ir_version, 9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"X": x}
    return lambda: session.run(None, feed)


IMPLEMENTATIONS = {"fastbn": fastbn_case, "torch": torch_case, "onnxruntime": onnxruntime_case,
                   "numpy": numpy_case}


def peer_version(name):
    """The installed version of a peer, or None when it cannot be used."""
    try:
        if name == "numpy":
            return np.__version__
        if name == "torch":
            import torch
            return torch.__version__
        if name == "onnxruntime":
            import onnx  # noqa: F401  (needed to build the model)
            import onnxruntime
            return onnxruntime.__version__
    except ImportError:
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

#: Rounds each case is timed in.  Within a round fastbn, its peers and the floor's copy each
#: run for a block of about budget / ROUNDS seconds, one after the other, the order reversed
#: every other round: a slow spell of a shared machine then falls on blocks close in time, and
#: each round gives every peer a ratio of its own, against fastbn's block of the same round
#: (torch's block is next to fastbn's, the others' a few blocks away).
ROUNDS = 15

#: The load average per logical CPU above which bench warns that the machine is busy.
BUSY_LOAD = 0.3

#: A ratio is reported as noisy, not as a result, when the middle half of its per-round
#: ratios spreads more than this much of their median (see spread).  The per-round ratios,
#: not the times, decide: a machine that is slower for a while slows both blocks of a round,
#: which moves the times but not their ratio.
NOISY_SPREAD = 0.15


def median_time(fn, budget=0.25, min_repeats=7, max_repeats=2000):
    """Median seconds per call of fn over repeats filling about `budget` seconds (after one
    warm-up call)."""
    return float(np.median(round_times({"fn": fn}, budget, rounds=1, min_repeats=min_repeats,
                                       max_repeats=max_repeats)["fn"]))


def round_times(fns, budget=0.25, rounds=ROUNDS, min_repeats=3, max_repeats=2000):
    """{name: [median seconds per call in each round]} of zero-argument callables, each round
    running every callable in turn for about budget / rounds seconds (after a warm-up call),
    in the given order in even rounds and in the reverse order in odd ones (so that neither
    side of a pair always runs first, in the caches the other left)."""
    repeats = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        repeats[name] = int(min(max_repeats, max(min_repeats, budget / rounds / once)))
    medians = {name: [] for name in fns}
    order = list(fns)
    for round_number in range(rounds):
        for name in (order if round_number % 2 == 0 else order[::-1]):
            fn = fns[name]
            samples = []
            for _ in range(repeats[name]):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            medians[name].append(float(np.median(samples)))
    return medians


def spread(values):
    """Interquartile range / median of a list of positive numbers: how far the middle half of
    its rounds disagree (the range would let one round that the machine interrupted decide)."""
    values = np.asarray(values, dtype=np.float64)
    q25, q75 = np.percentile(values, [25, 75])
    return float((q75 - q25) / np.median(values))


def copy_of(x, threads, streaming=False):
    """The floor's yardstick: fastbn's OpenMP memcpy of x's bytes with `threads` threads
    (with `streaming`, written with streaming stores)."""
    dst = np.empty_like(x)
    return lambda: kernels.parallel_copy(x, dst, threads, streaming)


def streamed_outputs(fn):
    """How many outputs one call of fn writes with streaming stores (fastbn's elementwise
    passes count them in _tuning.streamed_passes)."""
    before = _tuning.streamed_passes()
    fn()
    return _tuning.streamed_passes() - before


def held_floor(copy_s, stream_copy_s, n_passes, streamed):
    """The floor of an operation of n_passes passes whose `streamed` outputs are written with
    streaming stores: each such output's read-and-write pair costs a streaming copy, the
    other passes half an ordinary copy each."""
    if not streamed or stream_copy_s is None:
        return copy_s * n_passes / 2
    return (copy_s * (n_passes - 2 * streamed) + stream_copy_s * 2 * streamed) / 2


def machine_load():
    """The 1-minute load average per logical CPU, or None where the OS does not say."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return None


def run(shapes=None, ops=None, threads=(1, 2), against=PEERS, dtype=np.float32, quick=False,
        budget=None, progress=None):
    """Time every case; returns a list of records (dicts).

    Each record holds the median time of each implementation over ROUNDS rounds ("times"),
    how far its rounds disagree ("spreads", see spread), and for each peer the median of the
    per-round ratios peer / fastbn ("ratios": the speed-up printed), their spread and whether
    it is noisy ("ratio_spreads", "noisy")."""
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)
    ops = ops or list(OPS)
    budget = budget or (0.05 if quick else 0.25)
    peers = [p for p in against if peer_version(p) is not None]
    rng = np.random.default_rng(0)
    records = []
    saved_threads = get_num_threads()
    try:
        for shape in shapes:
            x = rng.standard_normal(shape).astype(np.float32).astype(dtype)
            dy = rng.standard_normal(shape).astype(np.float32).astype(dtype)
            for nthreads in threads:
                for op in ops:
                    base, variant = split_op(op)
                    if base != "eval" and V.values_per_channel(shape) < 2:
                        continue  # one value per channel (a batch-1 1x1 head): eval only
                    xv, dyv = variant_input(variant, x), variant_input(variant, dy)
                    fns = {name: IMPLEMENTATIONS[name](op, xv, dyv, nthreads)
                           for name in ["fastbn"] + peers}
                    fns = {name: fn for name, fn in fns.items() if fn is not None}
                    streamed = min(streamed_outputs(fns["fastbn"]), passes(op) // 2)
                    data = np.ascontiguousarray(xv)
                    fns["(copy)"] = copy_of(data, nthreads)
                    if kernels.stream_stores():
                        fns["(stream copy)"] = copy_of(data, nthreads, True)
                    rounds = round_times(fns, budget, min_repeats=1)
                    floor_copy = float(np.median(rounds.pop("(copy)")))
                    stream_copy = rounds.pop("(stream copy)", None)
                    stream_copy = None if stream_copy is None else float(np.median(stream_copy))
                    record = dict(shape=list(shape), op=op, dtype=xv.dtype.name,
                                  threads=nthreads, bytes=int(xv.nbytes), passes=passes(op),
                                  copy_s=floor_copy, stream_copy_s=stream_copy,
                                  streamed_outputs=streamed,
                                  floor_s=held_floor(floor_copy, stream_copy, passes(op), streamed),
                                  ordinary_floor_s=held_floor(floor_copy, stream_copy,
                                                              passes(op), 0),
                                  stream_floor_s=(None if stream_copy is None else held_floor(
                                      floor_copy, stream_copy, passes(op), passes(op) // 2)),
                                  times={name: float(np.median(r)) for name, r in rounds.items()},
                                  spreads={name: spread(r) for name, r in rounds.items()},
                                  ratios={}, ratio_spreads={}, noisy=[])
                    for peer in rounds:
                        if peer != "fastbn":
                            ratios = np.asarray(rounds[peer]) / np.asarray(rounds["fastbn"])
                            record["ratios"][peer] = float(np.median(ratios))
                            record["ratio_spreads"][peer] = spread(ratios)
                            if spread(ratios) > NOISY_SPREAD:
                                record["noisy"].append(peer)
                    records.append(record)
                    if progress:
                        progress(record)
    finally:
        set_num_threads(saved_threads)
    return records


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(against=PEERS):
    lines = [f"fastbn {__version__}  |  kernels: {simd_level} (CPU supports: {', '.join(supported_simd_levels())})"
             f"  |  OpenMP: {openmp_version() or 'off'}",
             f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs  |  Python {platform.python_version()}"
             f"  |  numpy {np.__version__}"]
    peers = [f"{p} {peer_version(p)}" for p in against if p != "numpy" and peer_version(p)]
    missing = [p for p in against if not peer_version(p)]
    lines.append("peers: " + (", ".join(peers) or "none")
                 + (f"  (not installed: {', '.join(missing)})" if missing else ""))
    return "\n".join(lines)


def floor_cells(record, t):
    """The time over the floor with ordinary stores and over the floor with every output
    written with streaming ones ('-' where the build has none); '*' marks the one the
    operation is held to: the second where fastbn writes all its outputs that way, neither
    where it streams some of them (its floor_s lies between; see held_floor)."""
    cells = []
    streamed = record.get("streamed_outputs", 0)
    for floor, held in ((record.get("ordinary_floor_s", record["floor_s"]), not streamed),
                        (record.get("stream_floor_s"), streamed == record["passes"] // 2)):
        cells.append(f"{'-':>7}" if floor is None else f"{t / floor:>6.2f}{'*' if held else ' '}")
    return cells


def speedup(record, peer):
    """fastbn's speed-up over a peer: the median of the per-round ratios (records written
    before bench kept them have only the ratio of the median times)."""
    ratio = record.get("ratios", {}).get(peer)
    return ratio if ratio is not None else record["times"][peer] / record["times"]["fastbn"]


def format_row(record, peers):
    t = record["times"]["fastbn"]
    mib = record["bytes"] / 2**20
    gbs = record["passes"] * record["bytes"] / t / 1e9
    own = record.get("spreads", {}).get("fastbn")
    cells = [f"{str(tuple(record['shape'])):>18}", f"{record['op']:>14}", f"{record['threads']:>2}",
             f"{mib:>7.2f}", f"{t * 1e6:>9.1f}", f"{'-' if own is None else f'{own * 100:.0f}%':>5}",
             f"{gbs:>6.1f}"] + floor_cells(record, t)
    for peer in peers:
        other = record["times"].get(peer)
        if not other:
            cells.append(f"{'-':>9}")
        elif peer in record.get("noisy", ()):
            cells.append(f"{'noisy':>9}")  # (its rounds disagree: not a result)
        else:
            cells.append(f"{speedup(record, peer):>8.2f}x")
    return " ".join(cells)


def table(records, against=PEERS):
    peers = [p for p in against if any(p in r["times"] for r in records)]
    head = (f"{'shape':>18} {'op':>14} {'th':>2} {'MiB':>7} {'fastbn us':>9} {'±':>5} {'GB/s':>6} "
            f"{'floor':>7} {'nt fl':>7} " + " ".join(f"{'vs ' + p[:5]:>9}" for p in peers))
    lines = [head, "-" * len(head)]
    lines += [format_row(r, peers) for r in records]
    ratios = sum(len([p for p in peers if p in r["times"]]) for r in records)
    noisy = sum(len(r.get("noisy", ())) for r in records)
    lines.append(f"th: the threads of fastbn, torch and onnxruntime (numpy runs on one); times are "
                 f"medians over {ROUNDS} rounds, ±: how far the middle half of fastbn's rounds "
                 f"disagree (interquartile range / median).")
    lines.append("floor: fastbn time / (OpenMP memcpy of the same bytes x passes / 2); nt fl: "
                 "the same with a copy written with streaming stores; * marks the floor a row is "
                 "held to (nt fl where fastbn writes its outputs with streaming stores: large "
                 "float32 outputs; neither where it streams one of two outputs, the training "
                 "forward's and not the backward's).")
    lines.append("'vs peer': peer time / fastbn time, the median of the rounds' ratios (higher is "
                 "better for fastbn).")
    if noisy:
        lines.append(f"noisy: {noisy} of {ratios} ratios, the middle half of whose rounds' ratios spread by "
                     f"more than {NOISY_SPREAD:.0%}, are not results: rerun on a quiet machine "
                     f"(README, Benchmarks).")
    return "\n".join(lines)


def plot(records, path):
    """A chart of fastbn's speed-up over each peer per shape and operation (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install fastbn[bench]") from None
    peers = [p for p in PEERS if any(p in r["times"] for r in records)]
    threads = sorted({r["threads"] for r in records})
    fig, axes = plt.subplots(len(threads), 1, figsize=(12, 4.5 * len(threads)), squeeze=False)
    for ax, nthreads in zip(axes[:, 0], threads):
        rows = [r for r in records if r["threads"] == nthreads]
        labels = [f"{r['op']}\n{'x'.join(map(str, r['shape']))}" for r in rows]
        width = 0.8 / max(1, len(peers))
        for i, peer in enumerate(peers):
            values = [speedup(r, peer) if peer in r["times"] else 0 for r in rows]
            # (the error bar: half the interquartile spread of the per-round ratios either side)
            errors = [v * r.get("ratio_spreads", {}).get(peer, 0) / 2 for v, r in zip(values, rows)]
            ax.bar(np.arange(len(rows)) + i * width, values, width, yerr=errors, capsize=1,
                   label=f"vs {peer}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speed-up of fastbn (x)")
        ax.set_title(f"fastbn speed-up per shape and operation, {nthreads} thread(s)")
        ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2)
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(threads=(1, 2), against=PEERS, quick=False, json_path=None, plot_path=None, shapes=None,
         ops=None, out=None, dtype="float32", budget=None):
    out = sys.stdout if out is None else out
    dtype = data_dtype(dtype)
    print(header(against), file=out)
    print(f"threads: {', '.join(map(str, threads))}  |  dtype: {dtype.name}  |  "
          f"{'quick run' if quick else 'full run'}"
          + (f"  |  budget: {budget:g} s per implementation and case" if budget else ""), file=out)
    load = machine_load()
    if load is not None and load > BUSY_LOAD:
        print(f"WARNING: this machine is busy (load average {load * (os.cpu_count() or 1):.1f} "
              f"on {os.cpu_count()} logical CPUs): timings will be noise where the other work "
              f"takes a core they need; ratios whose rounds disagree are marked 'noisy'.",
              file=out)
    records = run(shapes=shapes, ops=ops, threads=threads, against=against, quick=quick, dtype=dtype,
                  budget=budget, progress=lambda r: print(".", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    print(table(records, against), file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(header=header(against), records=records), f, indent=1)
    if plot_path:
        plot(records, plot_path)
    return records
