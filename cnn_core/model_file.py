"""The cnn_core model file: a small, versioned, pickle-free binary format.

Layout (all integers and floats little-endian):

    offset  size        field
    0       8           magic: the bytes 89 43 4E 4E 4D 4C 50 0A ("\\x89CNNMLP\\n")
    8       4  uint32   format version (1)
    12      4  uint32   number of dense layers L (1 .. 32)
    16      4  uint32   hidden activation code (0 identity, 1 relu, 2 leaky_relu,
                        3 sigmoid, 4 tanh); the output layer is always softmax
    20      4  float32  leaky_relu slope
    24      8(L+1)      uint64 layer sizes n_0 .. n_L (inputs, hidden..., classes)
    ...     4P float32  parameters: for each layer l, W_l row-major (n_l, n_{l+1}),
                        then b_l (n_{l+1}); P = sum of n_l n_{l+1} + n_{l+1}
    end-4   4  uint32   CRC-32 (zlib polynomial) of every preceding byte

Files are written atomically and durably: the bytes go to an unnamed file in the target's
folder (``O_TMPFILE`` on Linux; elsewhere a named temporary file ``.NAME.PID.XXXX.tmp``),
are flushed to disk, then the file is linked and renamed over the target and the folder is
flushed, so a crash or kill never leaves a half-written model under the target's name.  A
named temporary file left behind by a killed process is removed by the next save to the
same path.  Reading checks the magic, version, layer count, activation code, slope,
sizes, exact length, checksum and that every parameter is finite before returning
anything; every way a file can be wrong raises :class:`ModelFileError`.
"""
import errno
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from .kernels import HIDDEN_ACTIVATIONS

MAGIC = b"\x89CNNMLP\n"
VERSION = 1
MAX_LAYERS = 32
_HEADER = struct.Struct("<8sIIIf")


class ModelFileError(ValueError):
    """A model file is truncated, corrupted, of another version, or not a model file."""


def parameter_count(sizes):
    """Number of float32 parameters of an MLP with these layer sizes."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def encode(sizes, activation, slope, params):
    """The bytes of a model file for these layer sizes, activation name, slope, params."""
    code = HIDDEN_ACTIVATIONS.index(activation)
    header = _HEADER.pack(MAGIC, VERSION, len(sizes) - 1, code, slope)
    body = header + struct.pack(f"<{len(sizes)}Q", *sizes)
    body += np.ascontiguousarray(params, dtype="<f4").tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


def decode(data, name="model file"):
    """(sizes, activation, slope, params) from the bytes of a model file, or ModelFileError."""
    if len(data) < _HEADER.size + 4 or not data.startswith(MAGIC):
        raise ModelFileError(f"{name} is not a cnn_core model file (bad magic or too short)")
    _, version, n_layers, code, slope = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ModelFileError(f"{name} has format version {version}; this cnn_core reads "
                             f"version {VERSION} (upgrade cnn_core to read it)")
    if not 1 <= n_layers <= MAX_LAYERS:
        raise ModelFileError(f"{name} has a corrupted header ({n_layers} layers; "
                             f"1 to {MAX_LAYERS} are possible)")
    if code >= len(HIDDEN_ACTIVATIONS):
        raise ModelFileError(f"{name} has a corrupted header (activation code {code}; "
                             f"0 to {len(HIDDEN_ACTIVATIONS) - 1} are defined)")
    if not 0.0 <= slope < 1.0:
        raise ModelFileError(f"{name} has a corrupted header (leaky_relu slope {slope} "
                             f"is outside [0, 1))")
    sizes_end = _HEADER.size + 8 * (n_layers + 1)
    if len(data) < sizes_end + 4:
        raise ModelFileError(f"{name} is truncated")
    sizes = struct.unpack_from(f"<{n_layers + 1}Q", data, _HEADER.size)
    if not all(1 <= s <= 1 << 24 for s in sizes):
        raise ModelFileError(f"{name} has a corrupted header (layer sizes {sizes})")
    expected = sizes_end + 4 * parameter_count(sizes) + 4
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "longer than its header says"
        raise ModelFileError(f"{name} is {kind}: {len(data)} bytes, expected {expected}")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if crc != zlib.crc32(memoryview(data)[:-4]):
        raise ModelFileError(f"{name} is corrupted (checksum mismatch)")
    params = np.frombuffer(data, dtype="<f4", offset=sizes_end,
                           count=parameter_count(sizes)).astype(np.float32)
    bad = np.count_nonzero(~np.isfinite(params))
    if bad:
        raise ModelFileError(f"{name} holds {bad} NaN or infinite parameters (checksum "
                             f"valid: the network was saved after diverging, or edited)")
    return list(sizes), HIDDEN_ACTIVATIONS[code], float(slope), params


_TMP_SUFFIX = ".tmp"


def _temporary_names(path):
    """Names of the named temporary files of saves to `path` (any process)."""
    prefix = f".{path.name}."
    try:
        entries = os.listdir(path.parent)
    except OSError:
        return []
    return [e for e in entries if e.startswith(prefix) and e.endswith(_TMP_SUFFIX)]


def _writer_is_gone(name, path):
    """True if the temporary file `name` belongs to a process that no longer runs."""
    pid = name[len(path.name) + 2:-len(_TMP_SUFFIX)].split(".")[0]
    if not pid.isdigit():
        return False
    if os.name != "posix":      # no harmless liveness probe: an open file cannot be
        return True             # removed there anyway, so trying is safe
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_orphans(path):
    """Remove the temporary files that killed saves to `path` left in its folder."""
    path = Path(path)
    for name in _temporary_names(path):
        if _writer_is_gone(name, path):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass


def _write_all(fd, data):
    """Write every byte of data to fd (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_USE_UNNAMED = True     # False forces the named-temporary fallback (tests use it)


def _open_unnamed(folder):
    """A file descriptor of a new unnamed file in folder (O_TMPFILE), or None."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not _USE_UNNAMED or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY | os.O_CLOEXEC, 0o666)
    except OSError:             # this filesystem or kernel has no O_TMPFILE
        return None


def _link_unnamed(fd, path):
    """A temporary name in path's folder for the unnamed file fd (linkat cannot replace
    a file, so the name is then renamed over path)."""
    fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{_TMP_SUFFIX}"
            try:    # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: gives fd a name
                os.link(str(fd), tmp, src_dir_fd=fds, follow_symlinks=True)
                return tmp
            except FileExistsError:
                continue
    finally:
        os.close(fds)


def _new_named(folder, path):
    """(fd, name) of a new named temporary file for a save to path, mode as the umask."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.{os.getpid()}.",
                               suffix=_TMP_SUFFIX)
    if hasattr(os, "umask"):    # mkstemp makes 0600 files
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
    return fd, Path(tmp)


def write_atomic(path, data):
    """Write bytes to path atomically and durably (see the module docstring).

    Raises FileNotFoundError if the folder does not exist, IsADirectoryError if path is a
    folder, and OSError naming path if writing fails (a full disk, a file size limit); the
    previous file at path, if any, is then left as it was and nothing else remains.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"cannot save to {path}: folder {folder} "
                                f"does not exist")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot save to {path}: it is a folder; "
                                f"give a file name inside it")
    remove_orphans(path)
    fd, tmp = None, None
    try:
        fd = _open_unnamed(folder)
        if fd is None:
            fd, tmp = _new_named(folder, path)
        _write_all(fd, data)
        os.fsync(fd)
        if tmp is None:
            tmp = _link_unnamed(fd, path)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException as e:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and e.errno is not None:
            raise type(e)(e.errno, f"cannot save to {path}: {e.strerror}") from e
        raise
    if hasattr(os, "O_DIRECTORY"):     # make the rename itself durable
        try:
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


def save(path, sizes, activation, slope, params):
    """Write a model file atomically; ValueError if a parameter is NaN or infinite (no
    reader would accept the file)."""
    bad = np.count_nonzero(~np.isfinite(params))
    if bad:
        raise ValueError(f"cannot save to {path}: {bad} parameters are NaN or infinite")
    write_atomic(path, encode(sizes, activation, slope, params))


def load(path):
    """(sizes, activation, slope, params) of a model file; ModelFileError if invalid."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    return decode(data, name=str(path))
