"""Build cnn_core: the C99 kernels in src/ become a static library (libcnn_core), which
is linked into the Cython extension cnn_core.kernels and also shipped, with its public
header, inside the package for projects that embed the kernels.

Environment:
    CNN_CORE_OPENMP=0|1   force OpenMP off or on (default: on when the compiler has it).
"""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_clib import build_clib
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
C_SOURCES = sorted(str(p.relative_to(ROOT)).replace(os.sep, "/") for p in (ROOT / "src").rglob("*.c"))
PUBLIC_HEADERS = ["src/cnn_core.h", "src/cnn_model.h"]
CYTHON_DIRECTIVES = dict(language_level=3, boundscheck=False, wraparound=False,
                         cdivision=True, initializedcheck=False, embedsignature=True)


def compiler_flags(compiler_type, openmp):
    """(compile flags for our C, flags for the extension, link flags) for a compiler."""
    if compiler_type == "msvc":
        omp = ["/openmp"] if openmp else []
        return ["/O2"] + omp, ["/O2"] + omp, []
    omp = ["-fopenmp"] if openmp else []
    return (["-O3", "-std=c99", "-Wall", "-Wextra"] + omp, ["-O3"] + omp, omp)


def compiler_has_openmp(compiler):
    """True if `compiler` compiles and links a tiny OpenMP program."""
    if compiler.compiler_type == "msvc":
        return True
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "omp_check.c")
        src.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n")
        try:
            objects = compiler.compile([str(src)], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objects, "omp_check", output_dir=tmp,
                                     extra_postargs=["-fopenmp"])
            return True
        except Exception:
            return False


def use_openmp(compiler):
    """Whether to build with OpenMP, honouring CNN_CORE_OPENMP."""
    setting = os.environ.get("CNN_CORE_OPENMP", "").strip()
    if setting not in ("", "0", "1"):
        sys.exit(f"CNN_CORE_OPENMP must be 0 or 1, got {setting!r}")
    if setting == "0":
        return False
    found = compiler_has_openmp(compiler)
    if setting == "1" and not found:
        sys.exit("CNN_CORE_OPENMP=1 but the C compiler cannot build OpenMP programs")
    print(f"cnn_core: building {'with' if found else 'without'} OpenMP")
    return found


class BuildKernels(build_clib):
    """Build libcnn_core from src/**/*.c with strict warnings and optional OpenMP."""

    def build_libraries(self, libraries):
        openmp = use_openmp(self.compiler)
        cflags, _, _ = compiler_flags(self.compiler.compiler_type, openmp)
        self.distribution.cnn_core_openmp = openmp
        libraries = [(name, dict(info, cflags=cflags)) for name, info in libraries]
        super().build_libraries(libraries)


class BuildExtension(build_ext):
    """Link the extension against libcnn_core and ship the library and headers."""

    def build_extensions(self):
        clib = self.get_finalized_command("build_clib")
        openmp = getattr(self.distribution, "cnn_core_openmp", False)
        _, cflags, ldflags = compiler_flags(self.compiler.compiler_type, openmp)
        for ext in self.extensions:
            ext.extra_compile_args = cflags
            ext.extra_link_args = ldflags
        super().build_extensions()
        package = Path(self.build_lib) / "cnn_core"
        if self.inplace:
            package = ROOT / "cnn_core"
        (package / "include").mkdir(parents=True, exist_ok=True)
        (package / "lib").mkdir(parents=True, exist_ok=True)
        for header in PUBLIC_HEADERS:
            shutil.copy2(ROOT / header, package / "include")
        library = self.compiler.library_filename("cnn_core")
        shutil.copy2(Path(clib.build_clib) / library, package / "lib" / library)
        (package / "lib" / "openmp.txt").write_text("1\n" if openmp else "0\n")
        pkg_config = (ROOT / "src" / "cnn_core.pc.in").read_text()
        pkg_config = pkg_config.replace("@VERSION@", self.distribution.get_version())
        pkg_config = pkg_config.replace("@OPENMP_LIBS@", " " + " ".join(ldflags) if ldflags else "")
        (package / "lib" / "cnn_core.pc").write_text(pkg_config)


C_HEADERS = sorted(str(p.relative_to(ROOT)).replace(os.sep, "/") for p in (ROOT / "src").rglob("*.h"))
extension = Extension("cnn_core.kernels", ["cnn_core/kernels.pyx"],
                      include_dirs=["src", numpy.get_include()],
                      define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                      depends=C_SOURCES + C_HEADERS)

setup(
    libraries=[("cnn_core", {"sources": C_SOURCES, "include_dirs": ["src"],
                             "obj_deps": {"": C_HEADERS}})],
    ext_modules=cythonize([extension], compiler_directives=CYTHON_DIRECTIVES),
    cmdclass={"build_clib": BuildKernels, "build_ext": BuildExtension},
)
