"""Fuzz load_idx on raw and gzipped IDX files.

The first byte of an input picks the form: odd, the rest is an IDX file that the harness
gzips (the gzip reader then feeds mutated IDX bytes to the parser); even, the rest is
written as it is (a raw IDX file, or a mutated gzip stream). Every input must either
load or raise IDXFormatError; a loaded array must be what load_idx promises (a new,
writable, C-contiguous array in native byte order, of the header's shape).

    python tests/fuzz/fuzz_idx.py CORPUS [libFuzzer options]
"""
import gzip
import sys

import atheris

from common import Scratch

with atheris.instrument_imports():
    import numpy as np
    from cnn_core.datasets import IDXFormatError, load_idx

scratch = Scratch()


def TestOneInput(data):
    if not data:
        return
    body = data[1:]
    if data[0] & 1:
        body = gzip.compress(body, compresslevel=1, mtime=0)
    path = scratch.write("data.idx", body)
    try:
        array = load_idx(path)
    except IDXFormatError:
        return
    assert array.flags.c_contiguous and array.flags.writeable, array.flags
    assert array.dtype.isnative and 1 <= array.ndim <= 255, (array.dtype, array.shape)
    np.sum(array, dtype=np.float64)     # every element readable


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
