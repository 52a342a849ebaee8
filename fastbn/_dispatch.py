"""Pick the kernels compiled for the widest SIMD level this CPU runs.

The kernels are built once per level from one source (see setup.py).  At import, the widest
level that both the CPU supports and the build produced is loaded.  ``FASTBN_SIMD`` (one of
``avx512``, ``avx2``, ``baseline``) forces a level, for testing the paths against each other
or working around a problem; asking for one this CPU cannot run is an error, not a crash.
"""

import importlib
import os

from ._cpu import supported_simd_levels

MODULE_OF_LEVEL = {
    "avx512": "fastbn._kernels_avx512",
    "avx2": "fastbn._kernels_avx2",
    "baseline": "fastbn._kernels",
}


def _import(level):
    try:
        return importlib.import_module(MODULE_OF_LEVEL[level])
    except ImportError:
        return None


def available_levels():
    """Levels this CPU supports and this build has, widest first."""
    return tuple(level for level in supported_simd_levels() if _import(level) is not None)


def load(level=None):
    """(level, kernels module): the requested level, or the widest available one."""
    if level is None:
        level = os.environ.get("FASTBN_SIMD", "").strip().lower() or None
    if level is None:
        level = available_levels()[0]
    if level not in MODULE_OF_LEVEL:
        raise ValueError(f"unknown SIMD level {level!r}; expected one of {sorted(MODULE_OF_LEVEL)}")
    if level not in supported_simd_levels():
        raise RuntimeError(f"SIMD level {level!r} was requested (FASTBN_SIMD) but this CPU or OS "
                           f"does not support it; supported: {', '.join(supported_simd_levels())}")
    module = _import(level)
    if module is None:
        raise RuntimeError(f"SIMD level {level!r} was requested but this build of fastbn does not "
                           f"include it; built and supported: {', '.join(available_levels())}")
    return level, module


#: FASTBN_SIMD as it was when the kernels were chosen at import (None when unset).
requested_level = os.environ.get("FASTBN_SIMD", "").strip().lower() or None
simd_level, kernels = load(requested_level)
