"""Fuzz the model-file decoder: Network.load on arbitrary bytes, then inference.

Every input must either load or raise ModelFileError (nothing else, no crash). A model
that loads must predict labels in range for its inputs and save back to exactly the bytes
it was read from (the format has one encoding per model).

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
    labels = net.predict(X, n_threads=1)
    assert labels.shape == (len(X),), labels.shape
    assert np.all((labels >= 0) & (labels < net.n_classes)), labels
    probs = net.predict_proba(X, n_threads=1)
    assert probs.shape == (len(X), net.n_classes), probs.shape
    copy = scratch.write("copy.cnn", b"")
    net.save(copy)
    assert copy.read_bytes() == data, "a loaded model saves to other bytes"


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
