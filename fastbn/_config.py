"""What this fastbn is and runs on: ``fastbn.config()``, ``fastbn.show_config()`` and
``python -m fastbn info``.

Everything a bug report needs in one place: versions, the CPU and the SIMD variant of the
kernels dispatched to on it, whether OpenMP was compiled in, which OpenMP runtime library the
kernels actually call, and how many threads they use.  Nothing here changes any state, and
nothing fails: a question that cannot be answered on this platform gets None.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from typing import Any, TextIO

import numpy as np

from . import _cpu, _dispatch, _openmp
from ._version import __version__

__all__ = ["config", "show_config"]

#: ``_OPENMP`` date-versions and the specification each stands for.
OPENMP_SPECS = {
    199810: "1.0", 200203: "2.0", 200505: "2.5", 200805: "3.0", 201107: "3.1", 201307: "4.0",
    201511: "4.5", 201811: "5.0", 202011: "5.1", 202111: "5.2", 202411: "6.0",
}


#: (implementer, part) of /proc/cpuinfo on Arm Linux -> the core's name, for the servers and
#: machines fastbn's users run (the kernel gives numbers only).
ARM_CORES = {
    (0x41, 0xd08): "Arm Cortex-A72", (0x41, 0xd0b): "Arm Cortex-A76", (0x41, 0xd0c): "Arm Neoverse-N1",
    (0x41, 0xd40): "Arm Neoverse-V1", (0x41, 0xd49): "Arm Neoverse-N2", (0x41, 0xd4f): "Arm Neoverse-V2",
    (0x41, 0xd8e): "Arm Neoverse-N3", (0x41, 0xd84): "Arm Neoverse-V3",
    (0xc0, 0xac3): "Ampere AmpereOne", (0x61, None): "Apple",
}


def _arm_core(fields: dict[str, str]) -> str | None:
    """The core named by /proc/cpuinfo's 'CPU implementer' and 'CPU part' on Arm Linux."""
    try:
        implementer = int(fields["CPU implementer"], 0)
        part = int(fields.get("CPU part", "-1"), 0)
    except (KeyError, ValueError):
        return None
    name = ARM_CORES.get((implementer, part)) or ARM_CORES.get((implementer, None))
    return name or f"Arm implementer {implementer:#x}, part {part:#x}"


def _cpu_model(machine: str | None = None, cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's name, where the OS tells it cheaply; None rather than another machine's.
    (machine and cpuinfo: platform.machine() and the file read on Linux, for the tests.)"""
    machine = (machine or platform.machine()).lower()
    arm = machine in ("aarch64", "arm64") or machine.startswith("arm")
    if sys.platform.startswith("linux"):
        try:
            fields: dict[str, str] = {}
            with open(cpuinfo, encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key.strip() and value.strip():
                        fields.setdefault(key.strip(), value.strip())
        except OSError:
            fields = {}
        if arm:
            # Arm kernels give the core's numbers ("CPU implementer", "CPU part"), some a
            # "Model" or "Hardware" line.  A "model name" there is the host's, where this
            # process runs under emulation (qemu-user reads the host's /proc/cpuinfo).
            return fields.get("Model") or fields.get("Hardware") or _arm_core(fields)
        if fields.get("model name"):
            return fields["model name"]
    elif sys.platform == "darwin":
        try:
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5, check=False).stdout.strip()
            if name:
                return name
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or None


def _usable_cpus() -> int | None:
    """CPUs this process may run on (its affinity mask), where the OS tells it."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return None


def _built_levels() -> list[str]:
    """SIMD variants of the kernels present in this build, found without importing them (a
    variant this CPU cannot run must not be imported)."""
    return [level for level, module in _dispatch.MODULE_OF_LEVEL.items()
            if importlib.util.find_spec(module) is not None]


def _threadpoolctl_openmp() -> dict[str, Any]:
    """The OpenMP runtimes threadpoolctl finds in this process, when it is installed."""
    try:
        import threadpoolctl
    except ImportError:
        return {"installed": False, "version": None, "runtimes": None}
    try:
        runtimes = [
            {"filepath": info.get("filepath"), "prefix": info.get("prefix"),
             "internal_api": info.get("internal_api"), "version": info.get("version"),
             "num_threads": info.get("num_threads")}
            for info in threadpoolctl.threadpool_info() if info.get("user_api") == "openmp"
        ]
    except Exception as exc:  # a diagnostic must not fail on a third party's error
        return {"installed": True, "version": threadpoolctl.__version__, "runtimes": None,
                "error": f"{type(exc).__name__}: {exc}"}
    return {"installed": True, "version": threadpoolctl.__version__, "runtimes": runtimes}


def config() -> dict[str, Any]:
    """fastbn's build and run-time configuration, as a dictionary.

    Returns
    -------
    dict
        Nested plain values (str, int, bool, list, None), ready for ``json.dumps``:

        * ``fastbn``: ``version``, ``location`` (the package's directory).
        * ``python``: ``version``, ``implementation``, ``executable``.
        * ``numpy``: ``version``.
        * ``platform``: ``system`` (``platform.platform()``), ``machine``, ``cpu`` (model
          name), ``cpu_count``, ``usable_cpus`` (the process's affinity mask, or None).
        * ``simd``: ``cpu_supports`` (levels this CPU and OS run, widest first), ``built``
          (kernel variants in this build), ``dispatched`` (the level the kernels run at),
          ``FASTBN_SIMD`` (the override in force when fastbn was imported, or None),
          ``float16_f16c`` (whether float16 data is converted with F16C instructions; the
          kernels convert it with exact integer arithmetic otherwise, slower, same bits).
        * ``openmp``: ``enabled`` (compiled in), ``version`` (``_OPENMP``, 0 without),
          ``spec`` (e.g. ``"4.5"``), ``library`` (path of the OpenMP runtime the kernels
          call, or None where it cannot be told), ``threadpoolctl`` (``installed``,
          ``version`` and the OpenMP ``runtimes`` it finds loaded in this process).
        * ``threads``: ``num_threads`` (:func:`fastbn.get_num_threads`), ``OMP_NUM_THREADS``
          (or None).

    See Also
    --------
    show_config : The same, printed.
    """
    openmp_version = _openmp.openmp_version()
    library = _openmp.openmp_library()
    return {
        "fastbn": {"version": __version__, "location": os.path.dirname(os.path.abspath(__file__))},
        "python": {"version": platform.python_version(),
                   "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "numpy": {"version": np.__version__},
        "platform": {"system": platform.platform(), "machine": platform.machine(),
                     "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": _usable_cpus()},
        "simd": {"cpu_supports": list(_cpu.supported_simd_levels()), "built": _built_levels(),
                 "dispatched": _dispatch.simd_level,
                 "FASTBN_SIMD": _dispatch.requested_level,
                 "float16_f16c": _dispatch.kernels.half_conversion() == "F16C",
                 "float16_conversion": _dispatch.kernels.half_conversion()},
        "openmp": {"enabled": _openmp.openmp_enabled(), "version": openmp_version,
                   "spec": OPENMP_SPECS.get(openmp_version),
                   "library": os.path.realpath(library) if library else None,
                   "threadpoolctl": _threadpoolctl_openmp()},
        "threads": {"num_threads": _openmp.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }


def _lines(info: dict[str, Any]) -> list[str]:
    """show_config's text, one (label, value) line at a time."""
    def both(a: object, b: object) -> str:
        return f"{a} ({b})" if b else str(a)

    plat, simd, omp, threads = info["platform"], info["simd"], info["openmp"], info["threads"]
    cpus = f"{plat['cpu_count']} CPUs"
    if plat["usable_cpus"] is not None and plat["usable_cpus"] != plat["cpu_count"]:
        cpus += f", {plat['usable_cpus']} usable by this process"
    if omp["enabled"]:
        compiled = f"yes, _OPENMP {omp['version']}" + (f" (OpenMP {omp['spec']})" if omp["spec"] else "")
    else:
        compiled = "no: serial kernels, one thread"
    rows = [
        ("fastbn", info["fastbn"]["version"]),
        ("  location", info["fastbn"]["location"]),
        ("python", f"{info['python']['version']} ({info['python']['implementation']}, "
                   f"{info['python']['executable']})"),
        ("numpy", info["numpy"]["version"]),
        ("platform", both(plat["system"], plat["machine"])),
        ("cpu", both(plat["cpu"] or "unknown", cpus)),
        ("simd", ""),
        ("  cpu supports", ", ".join(simd["cpu_supports"])),
        ("  built", ", ".join(simd["built"])),
        ("  dispatched to", simd["dispatched"] + (f" (forced by FASTBN_SIMD={simd['FASTBN_SIMD']})"
                                                  if simd["FASTBN_SIMD"] else "")),
        ("  half convert", "integer (float16, bfloat16)" if simd["float16_conversion"] == "integer"
                           else f"{simd['float16_conversion']} (float16), integer (bfloat16)"),
        ("openmp", ""),
        ("  compiled in", compiled),
    ]
    if omp["enabled"]:
        rows.append(("  runtime", omp["library"] or "unknown on this platform (install threadpoolctl)"))
    tpc = omp["threadpoolctl"]
    if not tpc["installed"]:
        rows.append(("  threadpoolctl", "not installed"))
    elif tpc["runtimes"] is None:
        rows.append(("  threadpoolctl", f"{tpc['version']}: {tpc.get('error')}"))
    else:
        rows.append(("  threadpoolctl", f"{tpc['version']}, {len(tpc['runtimes'])} OpenMP runtime(s) loaded"))
        ours = os.path.realpath(omp["library"]) if omp["library"] else None
        for rt in tpc["runtimes"]:
            mark = ", fastbn's" if ours and rt["filepath"] and os.path.realpath(rt["filepath"]) == ours else ""
            rows.append(("", f"{rt['filepath']} ({rt['internal_api']}, {rt['num_threads']} threads{mark})"))
    rows += [
        ("threads", ""),
        ("  get_num_threads()", str(threads["num_threads"])),
        ("  OMP_NUM_THREADS", threads["OMP_NUM_THREADS"] if threads["OMP_NUM_THREADS"] is not None else "not set"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    return [f"{label + ':' if label else '':<{width}}{value}".rstrip() for label, value in rows]


def show_config(file: TextIO | None = None) -> None:
    """Print fastbn's build and run-time configuration (what ``python -m fastbn info`` prints).

    Parameters
    ----------
    file : file-like, optional
        Where to write (default: ``sys.stdout``).

    See Also
    --------
    config : The same as a dictionary.

    Examples
    --------
    >>> import fastbn
    >>> fastbn.show_config()                     # doctest: +SKIP
    fastbn:              0.1.0
    ...
    """
    out = sys.stdout if file is None else file
    for line in _lines(config()):
        print(line, file=out)


def config_json() -> str:
    """:func:`config` as indented JSON (``python -m fastbn info --json``)."""
    return json.dumps(config(), indent=2)
