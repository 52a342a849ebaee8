"""Scale: tensors of more than 2**31 elements, in both kernel layouts (slow: not run by default).

    python -m pytest -m slow tests/test_scale.py        # ~1-2 minutes, ~8.6 GB of memory

Every offset the kernels compute is 64-bit (Py_ssize_t); an int32 somewhere would wrap at
2**31 and read, write or skip the wrong elements.  Each test builds a float32 tensor of
2**31 + 16 (planar layout) or 2**31 + 24 (columns layout) elements from np.zeros (calloc: only
what is written becomes resident) with constant regions placed where int32 arithmetic would
break -- at the start, across a plane or sample boundary near 2**30, and across 2**31 to the
very end -- so that the statistics have closed forms (exact, with fractions.Fraction).  Then:
statistics (batch_stats), the backward's sums (batch_norm_backward_reduce), the training
forward written in place (out=x) with its running statistics, the training backward's
elementwise pass run in place through the kernel entry point, and the eval forward in place;
every element of each output is checked, region by region, against the closed form.  Peak memory is about one copy of the
tensor (8.6 GB; the machine needs ~10 GB free).
"""

import resource
from fractions import Fraction

import numpy as np
import pytest

from fastbn import functional as F
from fastbn._dispatch import kernels
from fastbn._kernels import describe_layout
from fastbn._openmp import effective_n_threads

pytestmark = pytest.mark.slow

EPS = 1e-5
MOMENTUM = 0.25


def closed_form(pieces, c):
    """Per-channel exact count, mean, M2 and sum of (value, channel, count) pieces."""
    n = [0] * c
    s1 = [Fraction(0)] * c
    s2 = [Fraction(0)] * c
    for value, ch, count in pieces:
        v = Fraction(value)
        n[ch] += count
        s1[ch] += v * count
        s2[ch] += v * v * count
    mean = [s1[ch] / n[ch] for ch in range(c)]
    m2 = [s2[ch] - s1[ch] * s1[ch] / n[ch] for ch in range(c)]
    return n[0], np.array([float(m) for m in mean]), np.array([float(q) for q in m2]), np.array([float(s) for s in s1])


def check_pieces(y, pieces, expected_of, what, rtol=4e-6):
    """Every element of y, piece by piece.  A piece is (select, channels, values, count):
    select(y) is its elements, (count,) for one channel or (count, len(channels)) for several,
    and those of channels[k] must all be expected_of(values[k], channels[k]) (to rtol)."""
    for select, channels, values, count in pieces:
        piece = select(y)
        assert piece.shape[0] == count
        lo = np.atleast_1d(piece.min(axis=0)).astype(np.float64)
        hi = np.atleast_1d(piece.max(axis=0)).astype(np.float64)
        for k, (ch, value) in enumerate(zip(channels, values)):
            want = expected_of(value, ch)
            tol = rtol * max(1.0, abs(want))
            assert want - tol <= lo[k] and hi[k] <= want + tol, (
                f"{what}: {count} elements of channel {ch} with input {value} ({select.__doc__}) are in "
                f"[{lo[k]!r}, {hi[k]!r}], expected {want!r} +- {tol:.2g}")


def run_scale_checks(x, pieces_at, layout):
    """All the checks of the module docstring on x, whose pieces_at cover it (see check_pieces)."""
    c = x.shape[1]
    assert x.size > 2 ** 31
    assert describe_layout(x.shape)["layout"] == layout
    pieces = [(v, ch, count) for _, channels, values, count in pieces_at for ch, v in zip(channels, values)]
    assert sum(count for _, _, count in pieces) == x.size, "the pieces do not cover the tensor"
    count, mean, m2, total = closed_form(pieces, c)
    var = m2 / count
    invstd = 1.0 / np.sqrt(var + EPS)

    # statistics
    n, got_mean, got_m2 = F.batch_stats(x)
    assert n == count, f"count {n}, expected {count}"
    np.testing.assert_allclose(got_mean, mean, rtol=1e-12, atol=1e-15, err_msg="batch_stats mean")
    np.testing.assert_allclose(got_m2, m2, rtol=1e-10, err_msg="batch_stats M2")
    # the backward's sums, with dy = x: sum(x) and sum(x * (x - mean)) = M2
    sum_dy, sum_dy_xmu = F.batch_norm_backward_reduce(x, x, mean)
    np.testing.assert_allclose(sum_dy, total, rtol=1e-10, atol=1e-6, err_msg="sum(dy)")
    np.testing.assert_allclose(sum_dy_xmu, m2, rtol=1e-10, err_msg="sum(dy * (x - mean))")

    # training forward, in place, with running statistics, weight and bias
    weight = np.linspace(0.5, 2.0, c).astype(np.float32)
    bias = np.linspace(-1.0, 1.0, c).astype(np.float32)
    rm, rv = np.full(c, 0.5, np.float32), np.full(c, 2.0, np.float32)
    y, save_mean, save_invstd = F.batch_norm_forward(x, rm, rv, weight, bias, training=True,
                                                     momentum=MOMENTUM, eps=EPS, out=x)
    assert y is x
    np.testing.assert_allclose(save_mean, mean, rtol=1e-12, atol=1e-15, err_msg="save_mean")
    np.testing.assert_allclose(save_invstd, invstd, rtol=1e-10, err_msg="save_invstd")
    np.testing.assert_allclose(rm, (1 - MOMENTUM) * 0.5 + MOMENTUM * mean, rtol=1e-6, atol=1e-7, err_msg="running_mean")
    np.testing.assert_allclose(rv, (1 - MOMENTUM) * 2.0 + MOMENTUM * m2 / (count - 1), rtol=1e-6, err_msg="running_var")

    def normalised(value, ch):
        return (value - mean[ch]) * invstd[ch] * float(weight[ch]) + float(bias[ch])

    check_pieces(x, pieces_at, normalised, "training forward")

    # training backward's elementwise pass, in place (dy = x = dx, the forward's output),
    # through the kernel entry point (the functional API would allocate another 8.6 GB):
    #   dx = w * invstd * (dy - sum_dy / n - (x - mean) * invstd**2 * sum_dy_xmu / n)
    # with made-up statistics, so that dx is not a cancellation: mean 0, invstd 1, and sums
    # n / 2 and n / 4 give dx = w * (0.75 * y - 0.5).
    ones = np.ones(c)
    kernels.backward_from_sums(x, x, x, weight, 0 * ones, ones, 0.5 * count * ones, 0.25 * count * ones,
                               float(count), effective_n_threads(None))

    def gradient(value, ch):
        return float(weight[ch]) * (0.75 * normalised(value, ch) - 0.5)

    check_pieces(x, pieces_at, gradient, "training backward (grad_input)")

    # eval forward, in place, on what x now holds, with the running statistics
    F.batch_norm(x, rm, rv, weight, bias, training=False, eps=EPS, out=x)
    rm64, rv64 = rm.astype(np.float64), rv.astype(np.float64)

    def evaluated(value, ch):
        return (gradient(value, ch) - rm64[ch]) / np.sqrt(rv64[ch] + EPS) * float(weight[ch]) + float(bias[ch])

    check_pieces(x, pieces_at, evaluated, "eval forward")


def selector(key, flat):
    def select(y):
        return (y.reshape(-1) if flat else y)[key]
    select.__doc__ = f"{'flat ' if flat else ''}index {key}"
    return select


def planar_pieces(shape, regions):
    """Pieces covering a (N, C, S) tensor, from flat regions [(start, end, value)] over a zero
    background, cut at plane boundaries."""
    n, c, s = shape
    marks = sorted({0, n * c * s} | {p * s for p in range(n * c)} | {a for a, _, _ in regions} | {b for _, b, _ in regions})
    pieces = []
    for start, end in zip(marks, marks[1:]):
        value = next((v for a, b, v in regions if a <= start < b), 0.0)
        pieces.append((selector(slice(start, end), True), ((start // s) % c,), (value,), end - start))
    return pieces


def test_more_than_2_31_elements_planar():
    shape = (2, 2, 2 ** 29 + 4)  # planes of 2**29 + 4; the last one crosses 2**31
    total = int(np.prod(shape))
    plane = shape[2]
    regions = [(0, 2 ** 20, 1.0),                                   # the first plane's start
               (2 * plane - 2 ** 12, 2 * plane + 2 ** 12, 2.0),     # across planes 1|2 (~2**30)
               (2 ** 31 - 2 ** 12, total, -4.0)]                    # across 2**31 to the end
    x = np.zeros(shape, np.float32)
    flat = x.reshape(-1)
    for start, end, value in regions:
        flat[start:end] = value
    run_scale_checks(x, planar_pieces(shape, regions), "planar")
    report_peak(f"planar {shape}, {total} elements")


def test_more_than_2_31_elements_columns():
    c = 8
    rows = 2 ** 28 + 3  # 2**31 + 24 elements: rows of 16 samples, and a short last row of 3
    x = np.zeros((rows, c), np.float32)
    # sample regions; the value of channel ch is base * (ch + 1)
    regions = [(0, 2 ** 10, 1.0), (2 ** 27 - 2 ** 8, 2 ** 27 + 2 ** 8, 2.0), (2 ** 28 - 2 ** 10, rows, -4.0)]
    for start, end, base in regions:
        x[start:end] = base * np.arange(1, c + 1, dtype=np.float32)
    marks = sorted({0, rows} | {a for a, _, _ in regions} | {b for _, b, _ in regions})
    pieces = []
    for start, end in zip(marks, marks[1:]):
        base = next((v for a, b, v in regions if a <= start < b), 0.0)
        pieces.append((selector(slice(start, end), False), tuple(range(c)),
                       tuple(base * (ch + 1) for ch in range(c)), end - start))
    geometry = describe_layout(x.shape)
    assert geometry["tail"] > 0 and geometry["group"] > 1, geometry
    run_scale_checks(x, pieces, "columns")
    report_peak(f"columns {x.shape}, {x.size} elements")


def report_peak(what):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{what}: peak resident set of this process so far {peak / 2 ** 30:.1f} GiB")
    assert peak < 12 * 2 ** 30, f"{what}: peak resident set {peak / 2 ** 30:.1f} GiB"
