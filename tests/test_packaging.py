"""The installed package and the build configuration: package data, the single-sourced version,
imports under ``python -OO``, setup.py's OpenMP flags per platform, and the wheel-building
configuration.  The wheel itself is built, repaired and smoke-tested by .ci/wheel."""

import importlib.metadata
import importlib.resources
import importlib.util
import os
import subprocess
import sys

import pytest

import fastbn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    path = os.path.join(ROOT, "pyproject.toml")
    if not os.path.isfile(path):
        pytest.skip("needs the source tree")
    with open(path, "rb") as f:
        return tomllib.load(f)


def _setup_module(monkeypatch):
    """setup.py imported as a module (its setup() call runs only as __main__)."""
    path = os.path.join(ROOT, "setup.py")
    if not os.path.isfile(path):
        pytest.skip("needs the source tree")
    pytest.importorskip("setuptools")
    spec = importlib.util.spec_from_file_location("fastbn_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_package_ships_its_type_information():
    files = {entry.name for entry in importlib.resources.files("fastbn").iterdir()}
    assert "py.typed" in files
    for stub in ("_openmp.pyi", "_cpu.pyi", "_kernels.pyi", "_kernels_avx2.pyi", "_kernels_avx512.pyi"):
        assert stub in files, f"{stub} is missing from the package"


def test_version_is_single_sourced():
    from fastbn._version import __version__
    assert fastbn.__version__ == __version__
    try:
        installed = importlib.metadata.version("fastbn")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None:
        assert installed == __version__, "the installed metadata and fastbn._version disagree (reinstall?)"
    pyproject = _pyproject()
    assert pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastbn._version.__version__"}


def test_imports_without_docstrings():
    """python -OO strips docstrings; nothing at import time may depend on them."""
    code = "import fastbn, fastbn.functional; fastbn.config(); print(fastbn.BatchNorm2d(3))"
    result = subprocess.run([sys.executable, "-OO", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "BatchNorm2d(3," in result.stdout


@pytest.mark.parametrize("compiler,platform_name,prefix,expected", [
    ("unix", "linux", None, (["-fopenmp"], ["-fopenmp"])),
    ("msvc", "win32", None, (["/openmp"], [])),
    ("unix", "darwin", None, (["-Xpreprocessor", "-fopenmp"], ["-lomp"])),
    ("unix", "darwin", "/opt/homebrew/opt/libomp",
     (["-Xpreprocessor", "-fopenmp", "-I/opt/homebrew/opt/libomp/include"],
      ["-L/opt/homebrew/opt/libomp/lib", "-lomp"])),
])
def test_openmp_flags_per_platform(compiler, platform_name, prefix, expected, monkeypatch):
    setup = _setup_module(monkeypatch)
    assert setup._openmp_flags(compiler, platform_name, prefix) == expected


def test_libomp_prefix_comes_from_the_environment_first(tmp_path, monkeypatch):
    setup = _setup_module(monkeypatch)
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "omp.h").write_text("/* stand-in */\n")
    monkeypatch.setenv("FASTBN_LIBOMP_PREFIX", str(tmp_path))
    assert setup._libomp_prefix() == str(tmp_path)
    # A prefix without omp.h is not taken.
    monkeypatch.setenv("FASTBN_LIBOMP_PREFIX", str(tmp_path / "nowhere"))
    assert setup._libomp_prefix() != str(tmp_path / "nowhere")


@pytest.mark.parametrize("host_platform,x86", [
    ("macosx-10.9-x86_64", True), ("macosx-11.0-arm64", False), ("win-amd64", True), ("win-arm64", False),
])
def test_simd_variants_follow_the_target_architecture(host_platform, x86, monkeypatch):
    """A cross-compiling build (cibuildwheel's x86_64 wheels on Apple silicon) gets the
    target's SIMD variants, not the host's."""
    setup = _setup_module(monkeypatch)
    monkeypatch.setenv("_PYTHON_HOST_PLATFORM", host_platform)
    assert setup._is_x86_64() is x86


def test_cibuildwheel_configuration():
    cibw = _pyproject()["tool"]["cibuildwheel"]
    # (the versions are .ci/pythons': test_the_pythons_claimed_are_the_pythons_ci_tests)
    for source in cibw["test-sources"]:
        assert os.path.isfile(os.path.join(ROOT, source)), f"test-sources names a missing {source}"
    assert ".ci/smoke_test.py" in cibw["test-command"]
    assert cibw["linux"]["manylinux-x86_64-image"] == "manylinux_2_28"
    assert "libomp" in cibw["macos"]["before-all"]
    selects = {override["select"]: override for override in cibw["overrides"]}
    assert "MACOSX_DEPLOYMENT_TARGET" in selects["*-macosx_arm64"]["environment"]
    assert selects["*-macosx_x86_64"]["environment"] == {"FASTBN_DISABLE_OPENMP": "1"}


def test_extras():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(extras) >= {"test", "bench", "mpi", "io"}
    names = {extra: {req.split(";")[0].split(">")[0].split("=")[0].strip() for req in reqs}
             for extra, reqs in extras.items()}
    assert {"pytest", "threadpoolctl", "mypy"} <= names["test"]
    assert {"pytest-benchmark", "matplotlib"} <= names["bench"]
    assert "safetensors" in names["io"] and "mpi4py" in names["mpi"]


def _ci_pythons():
    path = os.path.join(ROOT, ".ci", "pythons")
    if not os.path.isfile(path):
        pytest.skip("needs the source tree")
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def test_the_pythons_claimed_are_the_pythons_ci_tests():
    # requires-python, the classifiers and the release wheels name exactly .ci/pythons, the
    # versions .ci/run builds and tests on.
    versions = _ci_pythons()
    project = _pyproject()["project"]
    assert versions == sorted(versions, key=lambda v: tuple(map(int, v.split(".")))), versions
    assert project["requires-python"] == f">={versions[0]}"
    claimed = [c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
               if c.startswith("Programming Language :: Python :: 3.")]
    assert claimed == versions
    wheels = _pyproject()["tool"]["cibuildwheel"]["build"]
    assert wheels == [f"cp{v.replace('.', '')}-*" for v in versions]
    running = "%d.%d" % sys.version_info[:2]
    assert running in versions, f"the tests run on Python {running}, which fastbn does not claim"


@pytest.mark.parametrize("header", ["bits.h", "convert.h", "affine.h", "reduce.h", "copy.h"])
def test_simd_headers_compile_without_warnings_for_every_variant(monkeypatch, tmp_path, header):
    # The hand-written C of _engine/simd/ is compiled for every variant setup.py builds, with
    # warnings as errors -- the AVX-512 code too on a machine that cannot run it, which the
    # build alone would not check as strictly (it compiles with Cython's warnings off).
    import shutil
    import sysconfig
    setup = _setup_module(monkeypatch)
    compiler = shutil.which(os.environ.get("CC", "cc").split()[0]) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    engine = os.path.join(ROOT, "fastbn", "_engine")
    source = tmp_path / "check.c"
    source.write_text(f'#include <Python.h>\n#include "simd/{header}"\n')
    variants = [("baseline", [])]
    if setup._is_x86_64():
        variants += [(suffix, flags) for suffix, flags, _msvc in setup.X86_VARIANTS]
    for name, flags in variants:
        result = subprocess.run(
            [compiler, "-x", "c", "-std=c99", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
             "-pedantic", *flags, f"-I{sysconfig.get_paths()['include']}", f"-I{engine}",
             str(source)], capture_output=True, text=True)
        assert result.returncode == 0, f"{header} ({name}): {result.stderr[-3000:]}"


def test_simd_headers_ship_with_the_sources():
    data = _pyproject()["tool"]["setuptools"]["package-data"]["fastbn"]
    assert "_engine/simd/*.h" in data
    headers = set(os.listdir(os.path.join(ROOT, "fastbn", "_engine", "simd")))
    assert headers == {"bits.h", "convert.h", "affine.h", "reduce.h", "copy.h"}


def test_a_build_without_a_compiler_says_so_first(monkeypatch):
    # The OpenMP and SIMD probes would otherwise fail first and blame themselves.
    setup = _setup_module(monkeypatch)

    class Compiler:
        compiler_type = "unix"
        compiler_so = ["/nonexistent/bin/gcc", "-O2"]

    build = setup.BuildExt.__new__(setup.BuildExt)
    build.compiler = Compiler()
    with pytest.raises(SystemExit, match=r"building from source needs a C compiler, and "
                                         r"'/nonexistent/bin/gcc' was not found"):
        build.build_extensions()
    Compiler.compiler_so = [sys.executable]  # (an executable that exists passes the check)
    build._check_compiler()
