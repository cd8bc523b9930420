"""Fuzz the model-file decoder: Network.load on arbitrary bytes, then inference.

Every input must either load or raise ModelFileError (nothing else, no crash). A model
that loads must predict labels in range for its inputs, or raise FloatingPointError when
its (finite) weights are so large that the outputs overflow, and save back to exactly
the bytes it was read from (the format has one encoding per model).

    python tests/fuzz/fuzz_model.py CORPUS [libFuzzer options]

with CNN_CORE_FUZZ_FIX_CRC=1 for the structure-aware mode (see common.py).
"""
import sys

import atheris

from common import Scratch, input_rows, model_bytes

with atheris.instrument_imports():
    import numpy as np
    from cnn_core import ModelFileError, Network

scratch = Scratch()


def TestOneInput(data):
    data = model_bytes(data)
    path = scratch.write("model.cnn", data)
    try:
        net = Network.load(path)
    except ModelFileError:
        return
    X = input_rows(net)
    try:
        out = net.predict(X, n_threads=1)
        if out.ndim == 2:   # a regression network (loss="squared_error"): its outputs
            assert out.shape[0] == len(X) and out.dtype == np.float32, (out.shape, out.dtype)
            assert np.isfinite(out).all(), out
        else:
            assert out.shape == (len(X),), out.shape
            assert np.all((out >= 0) & (out < net.n_classes)), out
            probs = net.predict_proba(X, n_threads=1)
            assert probs.shape == (len(X), net.n_classes), probs.shape
            assert np.isfinite(probs).all(), probs
    except FloatingPointError as error:
        assert "overflows inside the network" in str(error), error
    copy = scratch.write("copy.cnn", b"")
    net.save(copy)
    if data[8:12] == b"\x02\x00\x00\x00":     # version 2, the version save writes
        assert copy.read_bytes() == data, "a loaded model saves to other bytes"
    else:                                         # version 1 comes back as version 2
        again = Network.load(copy)
        assert again.layers == net.layers and again.loss == net.loss
        assert np.array_equal(again._params, net._params, equal_nan=False), \
            "a version-1 model saves to other parameters"


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
