"""Shared by the atheris harnesses: the checksum fix-up and a scratch file to load from."""
import os
import struct
import tempfile
import zlib
from pathlib import Path

# Structure-aware mode: with CNN_CORE_FUZZ_FIX_CRC=1 every input gets a valid CRC-32 in
# its last 4 bytes before it is loaded, so mutations get past the checksum and reach the
# checks behind it (exact length, layer sizes, finite parameters).
FIX_CRC = os.environ.get("CNN_CORE_FUZZ_FIX_CRC") == "1"


def with_valid_crc(data):
    """data with its last 4 bytes replaced by the CRC-32 of the bytes before them."""
    if len(data) < 4:
        return data
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def model_bytes(data):
    """The model file a fuzz input stands for (its CRC fixed in structure-aware mode)."""
    return with_valid_crc(data) if FIX_CRC else data


class Scratch:
    """Files in a private temporary folder (in memory where /dev/shm exists), rewritten
    for every input: the loaders under test read paths, as users call them."""

    def __init__(self):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.folder = Path(tempfile.mkdtemp(prefix="cnn_core_fuzz_", dir=base))

    def write(self, name, data):
        path = self.folder / name
        path.write_bytes(data)
        return path


def input_rows(net, n=3):
    """n deterministic float32 rows in [0, 1] that `net` takes."""
    import numpy as np
    shape = (n, net.n_features)
    return (np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 7) / np.float32(7)
