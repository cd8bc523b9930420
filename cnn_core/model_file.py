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

Files are written atomically: a temporary file in the same folder is written, flushed to
disk and renamed over the target, so a crash never leaves a half-written model.  Reading
checks the magic, version, sizes, exact length and checksum before returning anything.
"""
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

MAGIC = b"\x89CNNMLP\n"
VERSION = 1
MAX_LAYERS = 32
HIDDEN_ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh")
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
    if not 1 <= n_layers <= MAX_LAYERS or code >= len(HIDDEN_ACTIVATIONS):
        raise ModelFileError(f"{name} has a corrupted header")
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
    return list(sizes), HIDDEN_ACTIVATIONS[code], float(slope), params


def write_atomic(path, data):
    """Write bytes to path atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot save to {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "umask"):  # mkstemp makes 0600 files; follow the umask instead
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):
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
    """Write a model file atomically."""
    write_atomic(path, encode(sizes, activation, slope, params))


def load(path):
    """(sizes, activation, slope, params) of a model file; ModelFileError if invalid."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    return decode(data, name=str(path))
