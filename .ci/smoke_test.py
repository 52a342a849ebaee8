"""Smoke test of an installed fastbn, run from outside the source tree.

Used by .ci/wheel (the repaired wheel in a fresh virtualenv), .ci/serial (a build without
OpenMP) and cibuildwheel's test-command.  Needs numpy and fastbn only; threadpoolctl is used
when installed.  Exits non-zero on the first failure.

    python smoke_test.py [--openmp {on,off,any}] [--vendored-runtime] [--show-config]

--openmp            whether the build must have OpenMP compiled in (default: any)
--vendored-runtime  the OpenMP runtime the kernels call must be one shipped inside the wheel
                    (fastbn.libs/ or fastbn/.dylibs/), not the system's
--show-config       also print fastbn.show_config()
"""

import argparse
import importlib.resources
import io
import os
import sys

import numpy as np


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def batch_norm_by_hand(x, weight, bias, eps, mean=None, var=None):
    """y, and what the backward needs, from plain numpy in float64."""
    axes = (0, 2, 3)
    shape = (1, -1, 1, 1)
    x = x.astype(np.float64)
    if mean is None:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    return xhat * weight.reshape(shape) + bias.reshape(shape), xhat, invstd


def check_training_step(fastbn, dtype, tol):
    rng = np.random.default_rng(0)
    n, c, h, w = 4, 3, 5, 6
    x = (rng.standard_normal((n, c, h, w)) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal((n, c, h, w)).astype(dtype)
    bn = fastbn.BatchNorm2d(c, dtype=dtype)
    bn.weight[...] = rng.uniform(0.5, 1.5, c)
    bn.bias[...] = rng.uniform(-1, 1, c)
    weight, bias = bn.weight.astype(np.float64), bn.bias.astype(np.float64)

    # Training forward: batch statistics (biased variance), running buffers updated with the
    # unbiased one.
    y = bn(x)
    expected, xhat, invstd = batch_norm_by_hand(x, weight, bias, bn.eps)
    check(y.dtype == dtype and y.shape == x.shape, f"{dtype.__name__}: output {y.dtype} {y.shape}")
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol, err_msg=f"{dtype.__name__} training forward")
    m = n * h * w
    batch_mean = x.astype(np.float64).mean(axis=(0, 2, 3))
    batch_var = x.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(bn.running_mean, 0.1 * batch_mean, rtol=tol, atol=tol, err_msg="running_mean")
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * batch_var, rtol=tol, atol=tol, err_msg="running_var")
    check(int(bn.num_batches_tracked) == 1, "num_batches_tracked")

    # Training backward.
    dx = bn.backward(dy)
    dy64 = dy.astype(np.float64)
    dbias = dy64.sum(axis=(0, 2, 3))
    dweight = (dy64 * xhat).sum(axis=(0, 2, 3))
    shape = (1, -1, 1, 1)
    dx_expected = (weight * invstd / m).reshape(shape) * (
        m * dy64 - dbias.reshape(shape) - xhat * dweight.reshape(shape))
    np.testing.assert_allclose(dx, dx_expected, rtol=tol, atol=tol, err_msg=f"{dtype.__name__} grad_input")
    np.testing.assert_allclose(bn.grad_weight, dweight, rtol=tol, atol=tol * m, err_msg="grad_weight")
    np.testing.assert_allclose(bn.grad_bias, dbias, rtol=tol, atol=tol * m, err_msg="grad_bias")

    # Eval forward and backward: running statistics, constants for the gradient.
    bn.eval()
    rm, rv = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
    y = bn(x)
    expected, _, invstd = batch_norm_by_hand(x, weight, bias, bn.eps, rm, rv)
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol, err_msg=f"{dtype.__name__} eval forward")
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, dy64 * (weight * invstd).reshape(shape), rtol=tol, atol=tol,
                               err_msg=f"{dtype.__name__} eval grad_input")


def check_installed_files(fastbn):
    package = os.path.dirname(os.path.abspath(fastbn.__file__))
    check(not os.path.exists(os.path.join(os.path.dirname(package), "setup.py")),
          f"fastbn was imported from a source tree ({package}), not from an installed package")
    files = {entry.name for entry in importlib.resources.files("fastbn").iterdir()}
    for name in ("py.typed", "_openmp.pyi", "_cpu.pyi", "_kernels.pyi"):
        check(name in files, f"the installed package lacks {name}")
    check(not any(name.endswith(".c") for name in files), "generated C files were installed")
    return package


def check_threads(fastbn, config, want_openmp, vendored, package):
    openmp = config["openmp"]
    if want_openmp != "any":
        check(openmp["enabled"] == (want_openmp == "on"),
              f"OpenMP compiled in: {openmp['enabled']}, expected {want_openmp}")
    default = fastbn.get_num_threads()
    check(default >= 1, f"get_num_threads() = {default}")
    if not openmp["enabled"]:
        fastbn.set_num_threads(3)
        check(fastbn.get_num_threads() == 1, "a serial build must report one thread")
        return
    fastbn.set_num_threads(1)
    check(fastbn.get_num_threads() == 1, "set_num_threads(1) did not take")
    fastbn.set_num_threads(default)
    library = openmp["library"]
    if vendored:
        check(library is not None, "the OpenMP runtime library could not be found")
        libs = (os.path.join(os.path.dirname(package), "fastbn.libs"), os.path.join(package, ".dylibs"))
        check(any(os.path.realpath(library).startswith(os.path.realpath(d) + os.sep) for d in libs),
              f"the kernels call {library}, not the runtime vendored in the wheel")
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        print("smoke test: threadpoolctl not installed; its checks skipped")
        return
    if library is not None:
        found = [info["filepath"] for info in threadpool_info() if info["user_api"] == "openmp"]
        check(os.path.realpath(library) in {os.path.realpath(p) for p in found},
              f"threadpoolctl does not list fastbn's OpenMP runtime {library}; it lists {found}")
    with threadpool_limits(1):
        check(fastbn.get_num_threads() == 1, "threadpool_limits(1) does not limit fastbn")
    check(fastbn.get_num_threads() == default, "threadpool_limits did not restore the thread count")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--openmp", choices=("on", "off", "any"), default="any")
    parser.add_argument("--vendored-runtime", action="store_true")
    parser.add_argument("--show-config", action="store_true")
    args = parser.parse_args(argv)

    import fastbn

    package = check_installed_files(fastbn)
    check_training_step(fastbn, np.float64, 1e-10)
    check_training_step(fastbn, np.float32, 2e-5)
    config = fastbn.config()
    check(fastbn.simd_level in fastbn._dispatch.MODULE_OF_LEVEL, f"simd_level {fastbn.simd_level!r}")
    check(config["simd"]["dispatched"] == fastbn.simd_level, "config() and simd_level disagree")
    check(config["fastbn"]["version"] == fastbn.__version__, "config() reports another version")
    check_threads(fastbn, config, args.openmp, args.vendored_runtime, package)
    text = io.StringIO()
    fastbn.show_config(file=text)
    for label in ("fastbn:", "numpy:", "dispatched to:", "compiled in:", "get_num_threads():"):
        check(label in text.getvalue(), f"show_config() lacks {label!r}:\n{text.getvalue()}")
    if args.show_config:
        print(text.getvalue(), end="")
    runtime = config["openmp"]["library"] if config["openmp"]["enabled"] else "off"
    print(f"smoke test passed: fastbn {fastbn.__version__} (numpy {np.__version__}) from {package}; "
          f"simd_level={fastbn.simd_level}; OpenMP: {runtime}; {fastbn.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
