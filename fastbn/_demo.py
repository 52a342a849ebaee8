"""``python -m fastbn demo``: BatchNorm2d on a tiny input, with the first output recomputed by hand."""

import numpy as np

from .modules import BatchNorm2d


def run(seed=0, print_=print):
    """Normalise a random (1, 2, 3, 4) input with BatchNorm2d(2, affine=True) in training mode
    and show that output[0, 0, 0, 0] is (x - mean) / sqrt(var + eps) * gamma + beta, with the
    batch's mean and biased variance.  Returns True when the two agree."""
    np.set_printoptions(precision=4, suppress=True)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    bn = BatchNorm2d(2, affine=True)
    y = bn(x)

    print_(f"module: {bn}")
    print_(f"input x, shape {x.shape}:\n{x}")
    print_(f"weight (gamma): {bn.weight}")
    print_(f"bias (beta):    {bn.bias}")
    print_(f"output y, shape {y.shape}:\n{y}")

    channel = x[:, 0].astype(np.float64)
    mean = channel.mean()
    var = channel.var()  # biased (ddof=0): what training-mode normalisation divides by
    gamma, beta, eps = float(bn.weight[0]), float(bn.bias[0]), bn.eps
    by_hand = (float(x[0, 0, 0, 0]) - mean) / np.sqrt(var + eps) * gamma + beta
    print_(f"channel 0: mean = {mean:.6f}, biased variance = {var:.6f}, eps = {eps}")
    print_(f"by hand: (x[0,0,0,0] - mean) / sqrt(var + eps) * gamma + beta = "
           f"({x[0, 0, 0, 0]:.6f} - {mean:.6f}) / sqrt({var:.6f} + {eps}) * {gamma} + {beta} "
           f"= {by_hand:.6f}")
    agree = bool(np.isclose(by_hand, y[0, 0, 0, 0], rtol=1e-5, atol=1e-6))
    print_(f"output[0,0,0,0] = {y[0, 0, 0, 0]:.6f}: {'equal' if agree else 'DIFFERENT'} "
           f"to the hand computation")
    print_(f"running_mean = {bn.running_mean}, running_var (unbiased) = {bn.running_var}, "
           f"num_batches_tracked = {int(bn.num_batches_tracked)}")
    return agree
