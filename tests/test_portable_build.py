"""The default build runs on every x86-64 CPU: the modules loaded before the CPU is asked what
it supports (the CPU probe, the OpenMP glue, the tuning switches, and the baseline kernels every
dispatch falls back to) hold no instruction beyond x86-64's baseline.  A -march=native (or any -mavx...) that
slipped into the default flags would put AVX and BMI instructions there, and a wheel built on
this machine would die with SIGILL on an older CPU.  (FASTBN_NATIVE=1 opts in, for local
builds; this test then fails, as it should.)"""

import platform
import re
import shutil
import subprocess

import pytest

from fastbn import _cpu, _kernels, _openmp, _tuning

# VEX/EVEX-encoded instructions (AVX and later: v-prefixed mnemonics, ymm/zmm/k registers)
# and the BMI/LZCNT/POPCNT ones that -march=native also enables on this machine.
BEYOND_BASELINE = re.compile(r"\t(v[a-z0-9]+|kmov[bwdq]|andn|bextr|blsi|blsr|blsmsk|bzhi|pdep|pext|"
                             r"rorx|sarx|shlx|shrx|lzcnt|tzcnt|popcnt|movbe)\s|%[yz]mm")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
@pytest.mark.parametrize("module", [_cpu, _openmp, _tuning, _kernels], ids=lambda m: m.__name__)
def test_baseline_modules_use_only_baseline_x86_64_instructions(module):
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", module.__file__],
                             capture_output=True, text=True, check=True).stdout
    found = sorted({m.group(0).strip() for m in BEYOND_BASELINE.finditer(listing)})
    assert not found, (f"{module.__file__} holds instructions beyond baseline x86-64 "
                       f"({', '.join(found[:10])}): was it built with -march=native?")
