"""The model file (cnn_core.model_file): version 2 holds any layer stack and round-trips
exactly, version 1 files of older releases still load, the bytes follow the documented
layout, and errors name the file and what is wrong.  Damaged files against both the
Python and the C reader are in test_embedding.py."""
import struct
import zlib

import numpy as np
import pytest

from cnn_core import Network, kernels, layers as L, model_file
from cnn_core.model_file import ModelFileError


def every_kind_stack():
    return [L.Input((12, 10, 2)),
            L.Conv2D(3, (3, 2), stride=2, padding="same", activation="leaky_relu",
                     leaky_slope=0.3),
            L.MaxPool2D(2, stride=1),
            L.Conv2D(4, 2, activation="sigmoid"),
            L.AvgPool2D(2),
            L.Flatten(),
            L.Dropout(0.4),
            L.Dense(7, activation="tanh"),
            L.Dense(5, activation="relu"),
            L.Dense(3)]


@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
def test_network_round_trip_of_every_layer_kind(tmp_path, loss):
    net = Network(every_kind_stack(), seed=3, loss=loss)
    path = tmp_path / "net.cnn"
    net.save(path)
    loaded = Network.load(path)
    assert loaded.layers == net.layers and loaded.loss == loss
    assert np.array_equal(loaded._params, net._params)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.weights, net.weights))
    X = np.random.default_rng(0).random((9, 12, 10, 2)).astype(np.float32)
    if loss == "cross_entropy":
        assert np.array_equal(loaded.predict_proba(X), net.predict_proba(X))
    assert np.array_equal(loaded.predict(X), net.predict(X))
    assert [p.name for p in tmp_path.iterdir()] == ["net.cnn"]


@pytest.mark.parametrize("kind", [str, bytes])
def test_paths_may_be_str_or_bytes(tmp_path, kind):
    net = Network([5, 3, 2], seed=1)
    path = str(tmp_path / "net.cnn")
    net.save(kind(path, "utf-8") if kind is bytes else path)
    loaded = Network.load(kind(path, "utf-8") if kind is bytes else path)
    for a, b in zip(loaded.weights + loaded.biases, net.weights + net.biases):
        np.testing.assert_array_equal(a, b)


def test_a_path_of_another_type_is_a_type_error(tmp_path):
    net = Network([5, 3, 2], seed=1)
    with pytest.raises(TypeError, match="str, bytes or os.PathLike"):
        net.save(3)
    with pytest.raises(TypeError, match="str, bytes or os.PathLike"):
        Network.load(None)


def test_bytes_follow_the_documented_layout(tmp_path):
    stack = every_kind_stack()
    net = Network(stack, seed=1)
    net.save(tmp_path / "m.cnn")
    data = (tmp_path / "m.cnn").read_bytes()
    magic, version, n_layers, loss, rank, h, w, c = struct.unpack_from("<8sIIII3Q", data)
    assert (magic, version, n_layers, loss, rank, (h, w, c)) == (
        b"\x89CNNMLP\n", 2, 9, 0, 3, (12, 10, 2))
    records = [struct.unpack_from("<IIddQQQQII", data, 48 + 64 * i) for i in range(9)]
    assert records[0] == (1, 2, 0.3, 0.0, 3, 3, 2, 2, 1, 0)      # conv2d, leaky_relu, same
    assert records[1] == (2, 0, 0.0, 0.0, 0, 2, 2, 1, 0, 0)      # maxpool2d
    assert records[3] == (3, 0, 0.0, 0.0, 0, 2, 2, 2, 0, 0)      # avgpool2d
    assert records[4] == (4,) + (0,) * 9                         # flatten
    assert records[5] == (5, 0, 0.0, 0.4, 0, 0, 0, 0, 0, 0)      # dropout
    assert records[6] == (0, 4, 0.01, 0.0, 7, 0, 0, 0, 0, 0)     # dense, tanh
    params = np.frombuffer(data, "<f4", offset=48 + 64 * 9, count=net._params.size)
    assert np.array_equal(params, net._params)
    assert len(data) == 48 + 64 * 9 + 4 * net._params.size + 4
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])


def version1_file(path, sizes, code, slope, params):
    body = struct.pack("<8sIIIf", model_file.MAGIC, 1, len(sizes) - 1, code, slope)
    body += struct.pack(f"<{len(sizes)}Q", *sizes) + params.astype("<f4").tobytes()
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))


@pytest.mark.parametrize("sizes", [[784, 40, 20, 10], [784, 10]])
def test_version1_files_load_as_dense_stacks(tmp_path, mnist, sizes):
    # version 1 stored the slope as float32
    reference = Network(sizes, "sigmoid", seed=4, leaky_slope=float(np.float32(0.01)))
    version1_file(tmp_path / "old.cnn", sizes, 3, 0.01, reference._params)
    loaded = Network.load(tmp_path / "old.cnn")
    assert loaded.loss == "cross_entropy"
    if len(sizes) > 2:
        assert loaded.layers == reference.layers
        assert (loaded.layer_sizes, loaded.activation) == (sizes, "sigmoid")
    X = mnist[2][:200]
    np.testing.assert_array_equal(loaded.predict_proba(X), reference.predict_proba(X))
    # saved again, it becomes a version-2 file of the same network
    loaded.save(tmp_path / "new.cnn")
    assert (tmp_path / "new.cnn").read_bytes()[8] == 2
    np.testing.assert_array_equal(Network.load(tmp_path / "new.cnn").predict_proba(X),
                                  reference.predict_proba(X))


def resealed(data, offset, fmt, value):
    body = bytearray(data[:-4])
    struct.pack_into(fmt, body, offset, value)
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


@pytest.mark.parametrize("offset, fmt, value, message", [
    (8, "<I", 7, "format version 7; this cnn_core reads versions 1 and 2"),
    (16, "<I", 9, r"corrupted header \(loss code 9"),
    (20, "<I", 2, r"corrupted header \(input of rank 2"),
    (48, "<I", 11, r"corrupted layer 1 \(kind code 11"),
    (48 + 4, "<I", 6, r"corrupted layer 1 \(activation code 6"),
    (48 + 8, "<d", 1.5, r"corrupted layer 1 \(leaky_relu slope 1.5 is outside \[0, 1\)\)"),
    (48 + 48, "<Q", 0, r"corrupted layer 1 \(conv2d stride 0"),
    (48 + 64 + 4, "<I", 1, r"corrupted layer 2 \(maxpool2d does not use activation"),
    (48 + 64 * 5 + 16, "<d", 1.0, r"corrupted layer 6 \(dropout rate 1.0"),
    (48 + 64 * 3 + 32, "<Q", 9, r"corrupted layer 4 \(avgpool2d windows are square, got 9x2"),
    (48 + 64 * 2 + 32, "<Q", 6, r"layer 3, Conv2D.*kernel 6x2 is larger than its input 5x4x3"),
    (48 + 64 * 4, "<I", 5, r"layer 7, Dense.*needs a flat input, got an image of 2x1x4"),
    (48 + 64 * 9, "<f", np.nan, "holds 1 NaN or infinite parameters"),
])
def test_errors_name_the_file_and_what_is_wrong(tmp_path, offset, fmt, value, message):
    path = tmp_path / "m.cnn"
    Network(every_kind_stack(), seed=0).save(path)
    path.write_bytes(resealed(path.read_bytes(), offset, fmt, value))
    with pytest.raises(ModelFileError, match=f"^{path}.*{message}"):
        Network.load(path)


def test_damage_with_a_wrong_checksum_says_so(tmp_path):
    path = tmp_path / "m.cnn"
    Network(every_kind_stack(), seed=0).save(path)
    data = bytearray(path.read_bytes())
    data[48 + 24] ^= 1                   # units of the first conv2d, checksum not updated
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum does not match either, so the file is more likely damaged"):
        Network.load(path)
    data[48 + 24] ^= 1
    data[-10] ^= 1                       # a parameter
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"corrupted \(checksum mismatch\)$"):
        Network.load(path)
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(ModelFileError, match="truncated"):
        Network.load(path)


def test_save_refuses_what_no_reader_would_accept(tmp_path):
    net = Network(every_kind_stack(), seed=0)
    path = tmp_path / "m.cnn"
    with pytest.raises(ValueError, match="loss must be one of"):
        model_file.save(path, net.layers, "hinge", net._params)
    with pytest.raises(ValueError, match=f"params must hold the {net._params.size} "):
        model_file.save(path, net.layers, "cross_entropy", net._params[:-1])
    with pytest.raises(L.LayerError, match="starts with Input"):
        model_file.save(path, net.layers[1:], "cross_entropy", net._params)
    net.weights[1][0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="1 parameters are NaN or infinite"):
        net.save(path)
    assert not path.exists()


def test_load_returns_built_layers_and_aligned_params(tmp_path):
    net = Network([L.Input((6,)), L.Dropout(0.1), L.Dense(4, "relu"), L.Dense(2)], seed=2,
                  loss="squared_error")
    net.save(tmp_path / "r.cnn")
    stack, loss, params = model_file.load(tmp_path / "r.cnn")
    assert loss == "squared_error" and stack == net.layers
    assert [layer.output_shape() for layer in stack] == [(6,), (6,), (4,), (2,)]
    assert params.dtype == np.float32 and params.ctypes.data % 64 == 0
    kernels._Net(stack, loss, params)     # ready for the engine as it is
