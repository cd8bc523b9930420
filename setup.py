"""Build cnn_core: the C99 kernels in src/ become a static library (libcnn_core), which
is linked into the Cython extension cnn_core.kernels and also shipped, with its public
header, inside the package for projects that embed the kernels.

The kernels' threads are cnn_core's own pool (src/runtime/cnn_threads.c, POSIX threads
or Win32 threads), so the only thread flag is -pthread; no OpenMP is used (a
CNN_CORE_OPENMP variable is ignored).

Environment:
    CC, CFLAGS, LDFLAGS   the usual compiler settings, honoured by every compile and link;
                          when they change, everything is rebuilt (no object of an older
                          build with other flags is reused).
"""
import hashlib
from concurrent.futures import ThreadPoolExecutor
import os
import shlex
import shutil
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


def environment_flags(*names):
    """The flags in environment variables `names` (e.g. CFLAGS, LDFLAGS), as a list."""
    return [flag for name in names for flag in shlex.split(os.environ.get(name, ""))]


def compiler_flags(compiler_type):
    """(compile flags for our C, flags for the extension, link flags) for a compiler."""
    if compiler_type == "msvc":
        return ["/O2"], ["/O2"], []
    # an optimisation level in $CFLAGS (e.g. -O1 for a sanitizer build) wins over ours
    opt = [] if any(f.startswith("-O") for f in environment_flags("CFLAGS")) else ["-O3"]
    return opt + ["-std=c99", "-Wall", "-Wextra", "-pthread"], opt + ["-pthread"], ["-pthread"]


def rebuild_if_flags_changed(command, kind, flags):
    """Make `command` rebuild everything if `flags` differ from those of its last build
    (objects compiled with other flags must not be linked with these), and record them.
    build_clib reuses any object newer than its sources whatever --force says, so the
    stale objects are deleted; build_ext honours force."""
    temp = Path(command.build_temp)
    stamp = temp / f"cnn_core_{kind}_flags.sha256"
    digest = hashlib.sha256("\0".join(flags).encode()).hexdigest()
    if not stamp.is_file() or stamp.read_text().strip() != digest:
        command.force = True
        if kind == "library" and temp.is_dir():
            for stale in [*temp.rglob("*.o"), *temp.rglob("*.obj"), *temp.glob("*.a"),
                          *temp.glob("*.lib")]:
                stale.unlink()
    temp.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")


def build_signature(compiler):
    """Everything that changes the objects: compiler commands, our flags, environment flags."""
    commands = [getattr(compiler, name, None) or [] for name in
                ("compiler_so", "linker_so", "linker_exe", "archiver")]
    ours = compiler_flags(compiler.compiler_type)
    return ([compiler.compiler_type] + [" ".join(c) for c in commands + list(ours)]
            + environment_flags("CC", "CFLAGS", "CPPFLAGS", "LDFLAGS"))


class BuildKernels(build_clib):
    """Build libcnn_core from src/**/*.c with strict warnings, one compiler process per
    core (build_clib itself compiles one file at a time)."""

    def build_libraries(self, libraries):
        cflags, _, _ = compiler_flags(self.compiler.compiler_type)
        signature = build_signature(self.compiler)
        rebuild_if_flags_changed(self, "library", signature)
        self.distribution.cnn_core_signature = signature
        for name, info in libraries:
            sources = sorted(info["sources"])
            objects = self.compiler.object_filenames(sources, output_dir=self.build_temp)
            newest_header = max(os.path.getmtime(h) for h in info["obj_deps"][""])
            stale = [src for src, obj in zip(sources, objects)
                     if self.force or not os.path.exists(obj)
                     or os.path.getmtime(obj) < max(os.path.getmtime(src), newest_header)]

            def compile_one(source, info=info):
                return self.compiler.compile([source], output_dir=self.build_temp,
                                             include_dirs=info["include_dirs"],
                                             extra_postargs=cflags, debug=self.debug)
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                list(pool.map(compile_one, stale))
            self.compiler.create_static_lib(objects, name, output_dir=self.build_clib,
                                            debug=self.debug)


class BuildExtension(build_ext):
    """Link the extension against libcnn_core and ship the library and headers (also
    into the source tree for in-place builds and editable installs, whose import of
    cnn_core finds get_include() and get_library_dir() there)."""

    def run(self):
        # setuptools clears self.inplace while build_extensions runs; remember it
        self.into_source = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extensions(self):
        clib = self.get_finalized_command("build_clib")
        signature = getattr(self.distribution, "cnn_core_signature", None)
        if signature is not None:
            rebuild_if_flags_changed(self, "extension", signature)
        _, cflags, ldflags = compiler_flags(self.compiler.compiler_type)
        for ext in self.extensions:
            ext.extra_compile_args = cflags
            ext.extra_link_args = ldflags
        super().build_extensions()
        packages = [Path(self.build_lib) / "cnn_core"]
        if getattr(self, "into_source", False):
            packages.append(ROOT / "cnn_core")
        for package in packages:
            self.ship(package, clib)

    def ship(self, package, clib):
        """Copy the public headers, the static library and its pkg-config file to package."""
        (package / "include").mkdir(parents=True, exist_ok=True)
        (package / "lib").mkdir(parents=True, exist_ok=True)
        for header in PUBLIC_HEADERS:
            shutil.copy2(ROOT / header, package / "include")
        library = self.compiler.library_filename("cnn_core")
        shutil.copy2(Path(clib.build_clib) / library, package / "lib" / library)
        pkg_config = (ROOT / "src" / "cnn_core.pc.in").read_text()
        pkg_config = pkg_config.replace("@VERSION@", self.distribution.get_version())
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
