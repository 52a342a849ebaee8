"""Type information: mypy is clean on the package, and the compiled modules' stubs (.pyi)
match what the modules really define (mypy's stubtest).  Run on a source checkout with mypy
installed (the test extra has it)."""

import os
import subprocess
import sys

import pytest

import fastbn
from fastbn import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "fastbn")

pytestmark = [
    pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "pyproject.toml")), reason="needs the source tree"),
    pytest.mark.skipif(os.path.dirname(os.path.abspath(fastbn.__file__)) != PACKAGE,
                       reason="fastbn is not imported from this source tree"),
]


def _mypy(*args):
    pytest.importorskip("mypy")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mypy_is_clean():
    result = _mypy("mypy")  # the files and settings are pyproject.toml's [tool.mypy]
    assert result.returncode == 0, result.stdout + result.stderr


def test_compiled_module_stubs_match_the_modules():
    # Only the kernel variants this CPU runs can be imported (the others may use instructions
    # it lacks); their stubs re-export _kernels.pyi, which is checked on every machine.
    modules = ["fastbn._openmp", "fastbn._cpu", "fastbn._tuning"] + [_dispatch.MODULE_OF_LEVEL[level]
                                                   for level in _dispatch.available_levels()]
    result = _mypy("mypy.stubtest", "--mypy-config-file", "pyproject.toml",
                   "--allowlist", os.path.join("tests", "stubtest_allowlist.txt"), *modules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_compiled_module_has_a_stub():
    compiled = {name.split(".")[0] for name in os.listdir(PACKAGE) if name.endswith((".so", ".pyd"))}
    stubs = {name[:-4] for name in os.listdir(PACKAGE) if name.endswith(".pyi")}
    assert compiled <= stubs, f"compiled modules without a stub: {sorted(compiled - stubs)}"
    assert os.path.isfile(os.path.join(PACKAGE, "py.typed"))
