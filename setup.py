"""Build fastbn's compiled extensions.

What is built
-------------
* ``fastbn._openmp``  -- thread-count helpers and the OpenMP shim.
* ``fastbn._cpu``     -- which SIMD level this CPU (and OS) supports.
* ``fastbn._tuning``  -- the kernels' process-wide tuning switches (one copy for every variant).
* ``fastbn._kernels`` -- the typed kernels (``_kernels.pyx`` and the ``_engine/*.pxi`` files it
  includes), compiled for the architecture's baseline, so it
  runs on any CPU of that architecture.  On x86-64 the same source is compiled twice more,
  as ``_kernels_avx2`` (AVX2 + FMA + F16C) and ``_kernels_avx512`` (AVX-512 F/BW/DQ/VL); fastbn picks
  the widest one this CPU supports at import time (``fastbn/_dispatch.py``).  No variant uses
  ``-march=native``, so a wheel built here runs on every x86-64 machine.

OpenMP is used where the compiler has it.  Where it does not, everything is built serially,
a message says so, and ``fastbn.show_config()`` reports it.

Environment variables
---------------------
FASTBN_DISABLE_OPENMP=1  build without OpenMP even where the compiler has it.
FASTBN_NATIVE=1          opt in to ``-march=native`` for every variant (a local build only:
                         such binaries crash with SIGILL on CPUs older than the build host).
FASTBN_NO_SIMD_VARIANTS=1  build only the baseline kernels (faster builds while developing).
FASTBN_LIBOMP_PREFIX=DIR  macOS: where libomp is (DIR/include/omp.h, DIR/lib/libomp.dylib);
                         by default Homebrew's (``brew --prefix libomp``) is looked for.
"""

import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

COMPILER_DIRECTIVES = {
    # The kernels index raw pointers and memory they have already validated; every other
    # module gets the same settings so that the generated C is uniform.
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "nonecheck": False,
    "embedsignature": True,
}

# SIMD variants of the kernels: (module suffix, gcc/clang flags, MSVC flags).
X86_VARIANTS = [
    ("avx2", ["-mavx2", "-mfma", "-mf16c"], ["/arch:AVX2"]),
    (
        "avx512",
        ["-mavx512f", "-mavx512cd", "-mavx512bw", "-mavx512dq", "-mavx512vl",
         "-mavx2", "-mfma", "-mf16c", "-mprefer-vector-width=512"],
        ["/arch:AVX512"],
    ),
]

OPENMP_TEST_PROGRAM = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
    """
)


def _target_machine():
    """The architecture the extensions are built for: the host's, unless a cross-compiling
    build (cibuildwheel's x86_64 wheels on Apple silicon) names another in
    _PYTHON_HOST_PLATFORM (e.g. "macosx-10.9-x86_64")."""
    host_platform = os.environ.get("_PYTHON_HOST_PLATFORM", "")
    if host_platform:
        return host_platform.rsplit("-", 1)[-1].lower()
    return platform.machine().lower()


def _is_x86_64():
    return _target_machine() in ("x86_64", "amd64", "x64")


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _libomp_prefix():
    """macOS: the prefix of an LLVM libomp install (Homebrew's is keg-only, so not on the
    compiler's search paths), or None.  FASTBN_LIBOMP_PREFIX wins, then ``brew --prefix
    libomp``, then Homebrew's usual locations."""
    candidates = []
    if os.environ.get("FASTBN_LIBOMP_PREFIX"):
        candidates.append(os.environ["FASTBN_LIBOMP_PREFIX"])
    brew = shutil.which("brew")
    if brew:
        try:
            found = subprocess.run([brew, "--prefix", "libomp"], capture_output=True, text=True,
                                   timeout=120, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found = ""
        if found:
            candidates.append(found)
    candidates += ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
    for prefix in candidates:
        if os.path.isfile(os.path.join(prefix, "include", "omp.h")):
            return prefix
    return None


def _openmp_flags(compiler_type, platform_name=None, libomp_prefix=None):
    """(compile flags, link flags) that switch OpenMP on for this compiler."""
    platform_name = sys.platform if platform_name is None else platform_name
    if compiler_type == "msvc":
        # MSVC's own runtime (vcomp140.dll); a Windows wheel's repair step vendors it.
        return ["/openmp"], []
    if platform_name == "darwin":
        # Apple clang has no -fopenmp driver flag: the preprocessor gets it, and LLVM's libomp
        # (e.g. Homebrew's) supplies omp.h and the runtime.
        compile_flags, link_flags = ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
        if libomp_prefix:
            compile_flags.append(f"-I{os.path.join(libomp_prefix, 'include')}")
            link_flags.insert(0, f"-L{os.path.join(libomp_prefix, 'lib')}")
        return compile_flags, link_flags
    return ["-fopenmp"], ["-fopenmp"]


class BuildExt(build_ext):
    """build_ext that probes the compiler for OpenMP and for each SIMD variant's flags."""

    def _compiles(self, source, compile_flags, link_flags=(), link=True):
        """True when this compiler builds (and, with link=True, links) ``source``."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "probe.c")
            with open(path, "w") as f:
                f.write(source)
            try:
                objects = self.compiler.compile([path], output_dir=tmp, extra_postargs=list(compile_flags))
                if link:
                    # Extensions are linked with LDFLAGS (setuptools adds it to the shared-object
                    # linker) but executables are not: pass it, so that the probe sees the same
                    # libraries as the build it stands for.
                    ldflags = os.environ.get("LDFLAGS", "") if self.compiler.compiler_type != "msvc" else ""
                    self.compiler.link_executable(objects, "probe", output_dir=tmp,
                                                  extra_preargs=shlex.split(ldflags),
                                                  extra_postargs=list(link_flags))
            except Exception:
                return False
        return True

    def _check_compiler(self):
        """Fail first, in one line, when there is no C compiler: the probes below would
        otherwise blame OpenMP and the SIMD flags for what is a missing compiler."""
        executable = (getattr(self.compiler, "compiler_so", None) or [None])[0]
        if self.compiler.compiler_type == "msvc" or executable is None:
            return  # (MSVC is found by setuptools itself, which says so when it is not)
        if shutil.which(executable) is None and not os.path.isfile(executable):
            raise SystemExit(
                f"fastbn: building from source needs a C compiler, and '{executable}' was not "
                f"found (install gcc or clang -- apt install gcc, dnf install gcc, xcode-select "
                f"--install -- or set CC; or install a fastbn wheel instead).")

    def build_extensions(self):
        self._check_compiler()
        compiler_type = self.compiler.compiler_type
        unix_like = compiler_type != "msvc"

        libomp = _libomp_prefix() if sys.platform == "darwin" and unix_like else None
        openmp_compile, openmp_link = _openmp_flags(compiler_type, libomp_prefix=libomp)
        if _env_flag("FASTBN_DISABLE_OPENMP"):
            use_openmp = False
            print("fastbn: OpenMP disabled by FASTBN_DISABLE_OPENMP; building serial kernels.")
        else:
            use_openmp = self._compiles(OPENMP_TEST_PROGRAM, openmp_compile, openmp_link)
            if not use_openmp:
                hint = (" On macOS, install libomp (brew install libomp) or point FASTBN_LIBOMP_PREFIX "
                        "at one." if sys.platform == "darwin" else "")
                print("fastbn: WARNING: this compiler cannot build OpenMP programs "
                      f"(tried {' '.join(openmp_compile + openmp_link)}); building serial kernels. "
                      "fastbn works, on one thread." + hint)
            else:
                print(f"fastbn: OpenMP enabled (compile: {' '.join(openmp_compile)}; link: {' '.join(openmp_link) or '-'}).")

        # -g0: no debug information in the binaries (Python's own CFLAGS ask for -g), which
        # would add about 1 MB per kernel variant to every wheel.
        # -Wno-unused-function: Cython emits some specialisations of fused functions that no
        # call reaches (the compiler drops them); the warnings would only be noise.
        base_flags = ["-O3", "-fno-math-errno", "-g0", "-Wno-unused-function"] if unix_like else ["/O2"]
        # -falign-loops=64: every loop starts on a 64-byte line, so that the kernels' short
        # hot loops do not straddle two (the CPU's instruction fetch and op cache work in such
        # lines).  Where a loop lands otherwise depends on all the code before it: one
        # unrelated change moved the elementwise loop across a line and made eval on
        # (8, 256, 28, 28) 1.3x slower at two threads on an AMD EPYC (Zen 3), with the very
        # same instructions.  Costs 3% of the kernels' size; changes no result.  Only where
        # the compiler takes it without a warning (clang before 13 ignores it, with one).
        if unix_like and self._compiles("int main(void) { return 0; }\n",
                                        ["-falign-loops=64", "-Werror"], link=False):
            base_flags.append("-falign-loops=64")
        if _env_flag("FASTBN_NATIVE") and unix_like:
            base_flags.append("-march=native")

        kept = []
        for ext in self.extensions:
            variant = SIMD_VARIANT_FLAGS.get(ext.name)
            flags = list(base_flags)
            if variant is not None:
                unix_flags, msvc_flags = variant
                variant_flags = unix_flags if unix_like else msvc_flags
                if not self._compiles("int main(void) { return 0; }\n", variant_flags, link=False):
                    print(f"fastbn: skipping {ext.name}: the compiler rejects {' '.join(variant_flags)}")
                    continue
                flags += variant_flags
            ext.extra_compile_args = flags + (openmp_compile if use_openmp else [])
            ext.extra_link_args = openmp_link if use_openmp else []
            kept.append(ext)
        self.extensions = kept
        super().build_extensions()


# Extension name -> (gcc/clang flags, MSVC flags) of the SIMD variants being built.
SIMD_VARIANT_FLAGS = {}


def _extension(name, source, libraries=()):
    import numpy  # build requirements, imported when building (the tests import this file)

    return Extension(
        name,
        [source],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        libraries=list(libraries),
    )


def extensions():
    from Cython.Build import cythonize

    exts = [
        # dladdr (which runtime is loaded) lives in libdl before glibc 2.34 (manylinux_2_28).
        _extension("fastbn._openmp", "fastbn/_openmp.pyx",
                   libraries=["dl"] if sys.platform.startswith("linux") else []),
        _extension("fastbn._cpu", "fastbn/_cpu.pyx"),
        _extension("fastbn._tuning", "fastbn/_tuning.pyx"),
        _extension("fastbn._kernels", "fastbn/_kernels.pyx"),
    ]
    if _is_x86_64() and not _env_flag("FASTBN_NO_SIMD_VARIANTS"):
        for suffix, unix_flags, msvc_flags in X86_VARIANTS:
            name = f"fastbn._kernels_{suffix}"
            SIMD_VARIANT_FLAGS[name] = (unix_flags, msvc_flags)
            exts.append(_extension(name, f"fastbn/_kernels_{suffix}.pyx"))
    return cythonize(exts, compiler_directives=COMPILER_DIRECTIVES, quiet=True)


if __name__ == "__main__":  # importable by the tests of the helpers above
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
