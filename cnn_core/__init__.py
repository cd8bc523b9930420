"""cnn_core: multilayer perceptrons trained by C kernels on the CPU.

The Python API is :class:`Network` and :func:`load_mnist`; the kernels are in
:mod:`cnn_core.kernels` (Python wrappers, and a ``cimport``-able C-level API); projects
that embed the C kernels find the headers with :func:`get_include` and the static
library with :func:`get_library_dir`.
"""
import os as _os
from pathlib import Path as _Path

try:
    from . import kernels
except ImportError as exc:
    from importlib.machinery import EXTENSION_SUFFIXES as _SUFFIXES
    _here = _Path(__file__).parent
    if not any((_here / f"kernels{suffix}").is_file() for suffix in _SUFFIXES):
        # the source checkout (whose cnn_core/ holds no compiled extension) shadowing
        # the installed package
        raise ImportError(
            f"{_here} is cnn_core's source folder, without the compiled kernels: run "
            f"Python from another folder (after pip install .), or build in place with "
            f"pip install -e .") from None
    raise ImportError(f"cnn_core's compiled kernels in {_here} could not be "
                      f"imported: {exc}") from exc
from .datasets import load_mnist
from .network import History, ModelFileError, Network

__version__ = "0.1.0"
__all__ = ["Network", "History", "ModelFileError", "load_mnist", "kernels", "info",
           "get_include", "get_library_dir", "__version__"]


def get_include():
    """Folder holding cnn_core's public C header (cnn_core.h)."""
    return str(_Path(__file__).parent / "include")


def get_library_dir():
    """Folder holding the static kernel library (libcnn_core.a, or cnn_core.lib on Windows)."""
    return str(_Path(__file__).parent / "lib")


def info():
    """Build and runtime facts: version, GEMM kernel in use, default thread count."""
    return {
        "version": __version__,
        "kernel": kernels.get_kernel(),
        "best_kernel": kernels.best_kernel(),
        "available_kernels": kernels.available_kernels(),
        "threads": kernels.max_threads(),
    }


def _select_kernel_from_environment():
    """Honour CNN_CORE_KERNEL=generic|avx2|avx512|neon, warning on unusable values."""
    name = _os.environ.get("CNN_CORE_KERNEL", "").strip().lower()
    if not name:
        return
    try:
        kernels.set_kernel(name)
    except ValueError as exc:
        import warnings
        warnings.warn(f"CNN_CORE_KERNEL ignored: {exc}", RuntimeWarning, stacklevel=2)


_select_kernel_from_environment()

from ._threadpool import register_with_threadpoolctl as _register_with_threadpoolctl  # noqa: E402

_register_with_threadpoolctl()
