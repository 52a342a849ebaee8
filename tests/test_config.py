"""fastbn.config(), fastbn.show_config() and ``python -m fastbn info``."""

import io
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn import _cpu, _dispatch, _openmp
from fastbn.__main__ import main

SECTIONS = {
    "fastbn": {"version", "location"},
    "python": {"version", "implementation", "executable"},
    "numpy": {"version"},
    "platform": {"system", "machine", "cpu", "cpu_count", "usable_cpus"},
    "simd": {"cpu_supports", "built", "dispatched", "FASTBN_SIMD", "float16_f16c", "float16_conversion"},
    "openmp": {"enabled", "version", "spec", "library", "threadpoolctl"},
    "threads": {"num_threads", "OMP_NUM_THREADS"},
}


def test_config_has_every_section_and_is_json():
    info = fastbn.config()
    assert {k: set(v) for k, v in info.items()} == SECTIONS
    assert json.loads(json.dumps(info)) == info


def test_config_reports_this_process():
    info = fastbn.config()
    assert info["fastbn"]["version"] == fastbn.__version__
    assert info["fastbn"]["location"] == os.path.dirname(os.path.abspath(fastbn.__file__))
    assert info["python"]["version"] == platform.python_version()
    assert info["numpy"]["version"] == np.__version__
    assert info["platform"]["machine"] == platform.machine()
    assert info["platform"]["cpu_count"] == os.cpu_count()


def test_config_simd_section_matches_the_dispatcher():
    simd = fastbn.config()["simd"]
    assert simd["dispatched"] == fastbn.simd_level
    assert simd["cpu_supports"] == list(_cpu.supported_simd_levels())
    assert simd["cpu_supports"][-1] == "baseline"
    assert "baseline" in simd["built"]
    assert fastbn.simd_level in simd["built"] and fastbn.simd_level in simd["cpu_supports"]
    conversion = _dispatch.kernels.half_conversion()
    assert simd["float16_conversion"] == conversion
    assert simd["float16_f16c"] is (conversion == "F16C")
    # an instruction converts float16 exactly where the build says it has one for it
    assert (conversion != "integer") is _dispatch.kernels.half_simd()
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        assert conversion == "AArch64 FCVT"
    elif machine not in ("x86_64", "amd64"):
        assert conversion == "integer"
    # Every level this CPU runs and the build has can be dispatched to.
    assert set(_dispatch.available_levels()) == set(simd["built"]) & set(simd["cpu_supports"])
    assert simd["FASTBN_SIMD"] == _dispatch.requested_level


def test_config_openmp_and_threads_sections():
    info = fastbn.config()
    omp = info["openmp"]
    assert omp["enabled"] is _openmp.openmp_enabled()
    assert omp["version"] == _openmp.openmp_version()
    assert info["threads"]["num_threads"] == fastbn.get_num_threads()
    if omp["enabled"]:
        assert omp["version"] >= 199810 and omp["spec"] is not None
        if sys.platform.startswith("linux") or sys.platform == "darwin":
            assert omp["library"] is not None and os.path.isfile(omp["library"])
            assert "omp" in os.path.basename(omp["library"]).lower()
    else:
        assert omp["version"] == 0 and omp["library"] is None
        assert info["threads"]["num_threads"] == 1


def test_config_follows_omp_num_threads_and_set_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    saved = fastbn.get_num_threads()
    try:
        fastbn.set_num_threads(1)
        threads = fastbn.config()["threads"]
    finally:
        fastbn.set_num_threads(saved)
    assert threads == {"num_threads": 1, "OMP_NUM_THREADS": "3"}


def test_config_reports_threadpoolctls_view():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    tpc = fastbn.config()["openmp"]["threadpoolctl"]
    assert tpc["installed"] and tpc["version"] == threadpoolctl.__version__
    library = _openmp.openmp_library()
    if library is not None:
        paths = {os.path.realpath(rt["filepath"]) for rt in tpc["runtimes"]}
        assert os.path.realpath(library) in paths


def test_config_without_threadpoolctl(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    tpc = fastbn.config()["openmp"]["threadpoolctl"]
    assert tpc == {"installed": False, "version": None, "runtimes": None}
    text = io.StringIO()
    fastbn.show_config(file=text)
    assert "threadpoolctl:     not installed" in text.getvalue()


def test_show_config_prints_every_fact():
    text = io.StringIO()
    assert fastbn.show_config(file=text) is None
    out = text.getvalue()
    info = fastbn.config()
    for fact in (f"fastbn:              {fastbn.__version__}", f"numpy:               {np.__version__}",
                 f"dispatched to:     {fastbn.simd_level}", "cpu supports:      " + ", ".join(info["simd"]["cpu_supports"]),
                 f"get_num_threads(): {fastbn.get_num_threads()}", "OMP_NUM_THREADS:"):
        assert fact in out, f"show_config() lacks {fact!r}:\n{out}"
    assert ("compiled in:       yes, _OPENMP" in out) == _openmp.openmp_enabled(), out


def test_show_config_defaults_to_stdout(capsys):
    fastbn.show_config()
    assert "dispatched to:" in capsys.readouterr().out


def test_info_command_prints_show_config(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    text = io.StringIO()
    fastbn.show_config(file=text)
    assert out == text.getvalue()


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == set(SECTIONS) and info["simd"]["dispatched"] == fastbn.simd_level


def test_info_reports_a_forced_simd_level():
    env = dict(os.environ, FASTBN_SIMD="baseline", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "fastbn", "info"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "dispatched to:     baseline (forced by FASTBN_SIMD=baseline)" in result.stdout, result.stdout
    assert "OMP_NUM_THREADS:   1" in result.stdout
    if _openmp.openmp_enabled():
        assert "get_num_threads(): 1" in result.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a /proc/cpuinfo file")
@pytest.mark.parametrize("machine, text, name", [
    ("x86_64", "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n", "AMD EPYC 9R14"),
    ("aarch64", "processor\t: 0\nBogoMIPS\t: 243.75\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
                "CPU variant\t: 0x1\nCPU part\t: 0xd4f\n", "Arm Neoverse-V2"),
    ("aarch64", "CPU implementer\t: 0x51\nCPU part\t: 0x801\n", "Arm implementer 0x51, part 0x801"),
    ("aarch64", "processor\t: 0\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4 Model B Rev 1.4\n",
     "Raspberry Pi 4 Model B Rev 1.4"),
    # qemu-user shows an emulated arm64 process the host's /proc/cpuinfo: not this CPU's name
    ("aarch64", "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n", None),
])
def test_cpu_model_names_the_cpu_or_nothing(tmp_path, machine, text, name):
    from fastbn._config import _cpu_model
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert _cpu_model(machine, str(cpuinfo)) == (name or (platform.processor() or None))
