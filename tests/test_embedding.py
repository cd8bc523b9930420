"""Embedding the installed cnn_core in other projects.

- A Cython project (tests/downstream/cython) cimports cnn_core's C-level API (GEMM,
  dense, convolution and pooling kernels) and builds with no include or link flags at
  all; its results must agree with numpy.
- A plain C program (tests/downstream/c/predict.c) is compiled against the shipped
  header and static library only, loads a model saved by Network.save with
  cnn_model_load and must predict exactly what Network.predict does on real MNIST rows,
  for MLPs and CNNs; every damaged model file of one shared table (versions 1 and 2)
  must be refused by both the C loader (CNN_ERR_FORMAT) and Network.load.
- Every library source compiles warning-free with the x86-64 SIMD paths left out, as on
  other architectures.
"""
import importlib
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import cnn_core
from cnn_core import Network, kernels, layers, model_file

DOWNSTREAM = Path(__file__).resolve().parent / "downstream"
CNN_ERR_IO = 3
CNN_ERR_FORMAT = 4
FORMAT_MESSAGE = "not a valid cnn_core model file"


@pytest.fixture(scope="module")
def c_compiler(cc):
    """The system C compiler for linking the shipped library, or skip."""
    if sys.platform == "win32":
        pytest.skip("the shipped cnn_core.lib is built by MSVC; linking it with cc/gcc/clang "
                    "is not supported")
    return cc


def run(cmd, **kw):
    """Run a command, returning the CompletedProcess (text output)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def build(cmd, **kw):
    """Run a build command; fail the test with its output if it fails."""
    result = run(cmd, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


# ---- Cython downstream ---------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_ops(tmp_path_factory, cc):
    """tests/downstream/cython built in a temporary folder and imported."""
    pytest.importorskip("Cython")
    folder = tmp_path_factory.mktemp("cython") / "project"
    shutil.copytree(DOWNSTREAM / "cython", folder)
    env = {k: v for k, v in os.environ.items() if k not in ("CFLAGS", "LDFLAGS", "PYTHONPATH")}
    build([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=folder, env=env)
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("dense_ops")
    finally:
        sys.path.remove(str(folder))
    assert Path(module.__file__).parent == folder
    return module


def test_cython_setup_uses_no_cnn_core_flags():
    setup = (DOWNSTREAM / "cython" / "setup.py").read_text()
    for word in ("include_dirs=", "library_dirs=", "libraries=", "get_include(",
                 "extra_compile_args=", "extra_link_args="):
        assert word not in setup


def test_cython_matmul_matches_numpy(dense_ops, mnist):
    X = mnist[2][:97]
    W = np.random.default_rng(0).standard_normal((784, 33)).astype(np.float32)
    expected = X.astype(np.float64) @ W
    np.testing.assert_allclose(dense_ops.matmul(X, W), expected, rtol=1e-4, atol=1e-4)


def numpy_activation(Z, code, alpha):
    if code == 0:
        return Z
    if code == 1:
        return np.maximum(Z, 0)
    if code == 2:
        return np.where(Z > 0, Z, alpha * Z)
    if code == 3:
        return 1 / (1 + np.exp(-Z))
    if code == 4:
        return np.tanh(Z)
    E = np.exp(Z - Z.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("code", range(6))
def test_cython_dense_forward_matches_numpy(dense_ops, mnist, code):
    rng = np.random.default_rng(code)
    X = mnist[2][:50]
    W = (rng.standard_normal((784, 20)) * 0.05).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    Y = dense_ops.dense_forward(X, W, b, code, 0.1)
    expected = numpy_activation(X.astype(np.float64) @ W + b, code, 0.1)
    np.testing.assert_allclose(Y, expected, rtol=1e-4, atol=1e-5)


def test_cython_dense_backward_matches_numpy(dense_ops, mnist):
    rng = np.random.default_rng(1)
    X = mnist[2][:40]
    W = rng.standard_normal((784, 16)).astype(np.float32)
    dY = rng.standard_normal((40, 16)).astype(np.float32)
    dW, db, dX = dense_ops.dense_backward(X, dY, W)
    X64, dY64 = X.astype(np.float64), dY.astype(np.float64)
    np.testing.assert_allclose(dW, X64.T @ dY64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, dY64.sum(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dX, dY64 @ W.T, rtol=1e-4, atol=1e-4)


def numpy_conv(X, W, b, stride, same):
    """float64 NHWC cross-correlation with TensorFlow's "same" zero padding."""
    kh, kw = W.shape[:2]
    if same:
        pads = []
        for size, k in zip(X.shape[1:3], (kh, kw)):
            out = -(-size // stride)
            total = max((out - 1) * stride + k - size, 0)
            pads.append((total // 2, total - total // 2))
        X = np.pad(X, [(0, 0), pads[0], pads[1], (0, 0)])
    out_h, out_w = (X.shape[1] - kh) // stride + 1, (X.shape[2] - kw) // stride + 1
    Y = np.empty((X.shape[0], out_h, out_w, W.shape[3]))
    for i in range(out_h):
        for j in range(out_w):
            window = X[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            Y[:, i, j] = np.tensordot(window, W, axes=3) + b
    return Y


@pytest.mark.parametrize("stride, same", [(1, False), (2, True), (3, True)])
def test_cython_conv2d_forward_matches_numpy(dense_ops, mnist, stride, same):
    rng = np.random.default_rng(stride)
    X = np.ascontiguousarray(mnist[2][:7].reshape(7, 28, 28, 1).repeat(2, axis=3))
    X[..., 1] = 1 - X[..., 1]                   # a second, different channel
    W = rng.standard_normal((5, 3, 2, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    Y = dense_ops.conv2d_forward(X, W, b, stride, same, 1)      # relu
    expected = np.maximum(numpy_conv(X.astype(np.float64), W, b, stride, same), 0)
    assert Y.shape == expected.shape
    np.testing.assert_allclose(Y, expected, rtol=1e-4, atol=1e-4)


def test_cython_maxpool2d_forward_matches_numpy(dense_ops, mnist):
    X = np.ascontiguousarray(mnist[2][:5].reshape(5, 28, 28, 1))
    Y = dense_ops.maxpool2d_forward(X, 3, 2)
    expected = np.empty((5, 13, 13, 1), np.float32)
    for i in range(13):
        for j in range(13):
            expected[:, i, j] = X[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
    np.testing.assert_array_equal(Y, expected)
    with pytest.raises(RuntimeError, match="cnn_pool2d_shape_init failed with cnn_core "
                                           "status 2"):
        dense_ops.maxpool2d_forward(X, 29, 1)


def test_cython_kernel_status_reaches_the_caller(dense_ops):
    X = np.ones((2, 3), np.float32)
    W = np.ones((3, 4), np.float32)
    with pytest.raises(RuntimeError, match="status 2"):
        dense_ops.dense_forward(X, W, np.zeros(4, np.float32), 9)


# ---- C downstream ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def predict_exe(tmp_path_factory, c_compiler):
    """tests/downstream/c/predict.c compiled with only cnn_core's include and library dirs,
    with every warning an error (the public headers must be clean C99)."""
    cc = c_compiler
    out = tmp_path_factory.mktemp("c") / "predict"
    build([cc, "-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror",
           str(DOWNSTREAM / "c" / "predict.c"), "-I", cnn_core.get_include(),
           "-L", cnn_core.get_library_dir(), "-lcnn_core", "-lm", "-pthread",
           "-o", str(out)])
    return out


def c_predict(exe, model_path, X, folder):
    """(probs, labels) computed by the C program for float32 rows X."""
    inputs, probs, labels = folder / "X.f32", folder / "probs.f32", folder / "labels.i32"
    np.ascontiguousarray(X, dtype=np.float32).tofile(inputs)
    result = run([str(exe), "run", str(model_path), str(inputs), str(len(X)), str(probs),
                  str(labels)])
    assert result.returncode == 0, result.stderr
    return np.fromfile(probs, dtype=np.float32).reshape(len(X), -1), \
        np.fromfile(labels, dtype=np.int32)


def test_c_predictions_equal_network_after_training(predict_exe, trained, mnist, tmp_path):
    X, y = mnist[2], mnist[3]
    path = tmp_path / "mnist.cnn"
    trained.save(path)
    probs, labels = c_predict(predict_exe, path, X, tmp_path)
    np.testing.assert_array_equal(labels, trained.predict(X))
    # same kernels, same batching: bit for bit, as cnn_model.h promises
    np.testing.assert_array_equal(probs, trained.predict_proba(X))
    assert (labels == y).mean() > 0.8          # it really learned something


@pytest.mark.parametrize("n_rows", [1, 257, 2000])
def test_c_predictions_equal_network_for_a_trained_cnn(predict_exe, trained_cnn, mnist,
                                                       tmp_path, n_rows):
    X, y = mnist[2][:n_rows], mnist[3][:n_rows]
    path = tmp_path / "cnn.cnn"
    trained_cnn.save(path)
    probs, labels = c_predict(predict_exe, path, X, tmp_path)
    np.testing.assert_array_equal(labels, trained_cnn.predict(X))
    np.testing.assert_array_equal(probs, trained_cnn.predict_proba(X))
    if n_rows == 2000:
        assert (labels == y).mean() > 0.6          # it learned something in one epoch


def test_c_predicts_regression_outputs(predict_exe, mnist, tmp_path):
    net = Network([layers.Input((28, 28, 1)), layers.Conv2D(2, 3, activation="relu"),
                   layers.MaxPool2D(3), layers.Flatten(), layers.Dense(3)], seed=1,
                  loss="squared_error")
    X = mnist[2][:100]
    net.save(tmp_path / "r.cnn")
    outputs, labels = c_predict(predict_exe, tmp_path / "r.cnn", X, tmp_path)
    np.testing.assert_array_equal(outputs, net.predict(X))
    np.testing.assert_array_equal(labels, net.predict(X).argmax(axis=1))


@pytest.mark.parametrize("activation", model_file.HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize("n_rows", [1, 300])
def test_c_predictions_equal_network_for_every_activation(predict_exe, mnist, tmp_path,
                                                          activation, n_rows):
    net = Network([784, 48, 24, 10], activation, seed=3, leaky_slope=0.2)
    X = mnist[2][:n_rows]
    path = tmp_path / "net.cnn"
    net.save(path)
    probs, labels = c_predict(predict_exe, path, X, tmp_path)
    np.testing.assert_array_equal(labels, net.predict(X))
    np.testing.assert_array_equal(probs, net.predict_proba(X))


@pytest.mark.parametrize("command", ["info", "info-memory"])
def test_c_model_accessors(predict_exe, tmp_path, command):
    net = Network([5, 7, 6, 3], "leaky_relu", seed=1, leaky_slope=0.25)
    net.save(tmp_path / "m.cnn")
    result = run([str(predict_exe), command, str(tmp_path / "m.cnn")])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == ["layers 3", "sizes 5 7 6 3", "activation 2",
                                             "slope 0.25"]


def reseal(body):
    """A model file's bytes with its CRC recomputed (body without the old CRC)."""
    return body + struct.pack("<I", zlib.crc32(body))


def version1_bytes(sizes, code, slope, seed=0):
    """A version-1 model file (an MLP, as cnn_core wrote before version 2), by hand."""
    n = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    params = np.random.default_rng(seed).standard_normal(n).astype("<f4")
    body = struct.pack("<8sIIIf", model_file.MAGIC, 1, len(sizes) - 1, code, slope)
    return reseal(body + struct.pack(f"<{len(sizes)}Q", *sizes) + params.tobytes())


def small_cnn_stack():
    """Every layer kind: 8x8x2 -> conv same 8x8x3 -> max 4x4x3 -> conv valid 3x3x4 ->
    avg 2x2x4 -> flatten 16 -> dropout -> dense 5 -> dense 3."""
    return [layers.Input((8, 8, 2)),
            layers.Conv2D(3, 3, padding="same", activation="relu"),
            layers.MaxPool2D(2),
            layers.Conv2D(4, 2, activation="tanh"),
            layers.AvgPool2D(2, stride=1),
            layers.Flatten(),
            layers.Dropout(0.25),
            layers.Dense(5, "leaky_relu", leaky_slope=0.2),
            layers.Dense(3)]


def random_params(stack, seed=0):
    """Parameters for a layer stack: small random weights and biases."""
    n = sum(layer.n_parameters for layer in layers.build(stack)[1:])
    return (np.random.default_rng(seed).standard_normal(n) * 0.3).astype(np.float32)


def version2_bytes(tmp_path, stack=None, loss="cross_entropy"):
    """A valid version-2 model file of small_cnn_stack() (or stack)."""
    stack = small_cnn_stack() if stack is None else stack
    path = tmp_path / "good2.cnn"
    model_file.save(path, stack, loss, random_params(stack))
    return path.read_bytes()


def patched(data, offset, fmt, value):
    """data (a model file) with one field changed and the CRC recomputed."""
    body = bytearray(data[:-4])
    struct.pack_into(fmt, body, offset, value)
    return reseal(bytes(body))


def damaged_version1_files(good):
    """(name, bytes) of version-1 model files every reader must refuse, from a valid one."""
    body = good[:-4]
    cases = [
        ("empty", b""),
        ("magic only", good[:8]),
        ("header only", good[:24]),
        ("truncated by one byte", good[:-1]),
        ("truncated in the parameters", good[:len(good) // 2]),
        ("one byte too long", good + b"\0"),
        ("bad checksum", body + bytes([good[-4] ^ 1]) + good[-3:]),
        ("flipped parameter bit", body[:100] + bytes([body[100] ^ 0x10]) + body[101:] + good[-4:]),
        ("bad magic", reseal(b"\x89CNNMLQ\n" + body[8:])),
        ("a model file of another project", b"PK\x03\x04" + good[4:]),
    ]
    def with_field(offset, fmt, value):
        return patched(good, offset, fmt, value)
    cases += [
        ("version 3", with_field(8, "<I", 3)),
        ("version 0", with_field(8, "<I", 0)),
        ("zero layers", with_field(12, "<I", 0)),
        ("33 layers", with_field(12, "<I", 33)),
        ("huge layer count", with_field(12, "<I", 0xFFFFFFFF)),
        ("unknown activation", with_field(16, "<I", 5)),
        ("negative activation", with_field(16, "<I", 0xFFFFFFFF)),
        ("NaN slope", with_field(20, "<f", float("nan"))),
        ("slope 1", with_field(20, "<f", 1.0)),
        ("negative slope", with_field(20, "<f", -0.5)),
        ("layer size 0", with_field(24, "<Q", 0)),
        ("layer size 2^24 + 1", with_field(32, "<Q", (1 << 24) + 1)),
        ("layer size 2^64 - 1", with_field(24, "<Q", (1 << 64) - 1)),
        ("layer size that overflows when multiplied", with_field(32, "<Q", 1 << 62)),
        ("infinite slope", with_field(20, "<f", float("inf"))),
        ("absurd slope", with_field(20, "<f", 3.0e38)),
        ("NaN first weight", with_field(24 + 8 * 3, "<f", float("nan"))),
        ("infinite last bias", with_field(len(body) - 4, "<f", float("-inf"))),
        ("signalling NaN weight", with_field(24 + 8 * 3 + 40, "<I", 0x7F800001)),
    ]
    # a hostile header claiming 32 layers of 2^24 units: must be refused as truncated,
    # without first allocating the petabytes it claims
    huge = struct.pack("<8sIIIf", model_file.MAGIC, 1, 32, 1, 0.01)
    huge += struct.pack("<33Q", *([1 << 24] * 33)) + b"\0" * 64
    cases.append(("huge claimed sizes", reseal(huge)))
    return cases


V2_HEADER, V2_RECORD = 48, 64
# offsets of the fields of a version-2 layer record
KIND, ACTIVATION, SLOPE, RATE, UNITS, KERNEL_H, KERNEL_W, STRIDE, PADDING, RESERVED = (
    0, 4, 8, 16, 24, 32, 40, 48, 56, 60)
# the layers of small_cnn_stack() (record index)
CONV_SAME, MAXPOOL, CONV_VALID, AVGPOOL, FLATTEN, DROPOUT, DENSE, LAST = range(8)


def damaged_version2_files(good):
    """(name, bytes) of version-2 files every reader must refuse, from small_cnn_stack()."""
    body = good[:-4]
    n_layers = 8
    params_start = V2_HEADER + V2_RECORD * n_layers

    def header(offset, fmt, value):
        return patched(good, offset, fmt, value)

    def record(layer, offset, fmt, value):
        return patched(good, V2_HEADER + V2_RECORD * layer + offset, fmt, value)

    def records(*changes):
        data = good
        for layer, offset, fmt, value in changes:
            data = patched(data, V2_HEADER + V2_RECORD * layer + offset, fmt, value)
        return data

    nan, inf = float("nan"), float("inf")
    return [
        ("v2 header only", good[:V2_HEADER]),
        ("v2 truncated in a layer record", good[:V2_HEADER + V2_RECORD * 3 + 17]),
        ("v2 truncated after the records", good[:params_start]),
        ("v2 truncated in the parameters", good[:params_start + 40]),
        ("v2 truncated by one byte", good[:-1]),
        ("v2 one byte too long", good + b"\0"),
        ("v2 bad checksum", body + good[-4:-1] + bytes([good[-1] ^ 0x80])),
        ("v2 flipped bit in a record", body[:V2_HEADER + 70] + bytes([body[V2_HEADER + 70] ^ 1])
         + body[V2_HEADER + 71:] + good[-4:]),
        ("v2 version 3", header(8, "<I", 3)),
        ("v2 zero layers", header(12, "<I", 0)),
        ("v2 33 layers", header(12, "<I", 33)),
        ("v2 one layer fewer", header(12, "<I", n_layers - 1)),
        ("v2 one layer more", header(12, "<I", n_layers + 1)),
        ("v2 unknown loss", header(16, "<I", 2)),
        ("v2 input rank 2", header(20, "<I", 2)),
        ("v2 input rank 0", header(20, "<I", 0)),
        ("v2 flat input that has a height", header(20, "<I", 1)),
        ("v2 input height 0", header(24, "<Q", 0)),
        ("v2 input width 2^64 - 1", header(32, "<Q", (1 << 64) - 1)),
        ("v2 input of more than 2^24 values", header(40, "<Q", 1 << 24)),
        ("v2 unknown layer kind", record(MAXPOOL, KIND, "<I", 6)),
        ("v2 layer kind 2^32 - 1", record(MAXPOOL, KIND, "<I", 0xFFFFFFFF)),
        ("v2 softmax as a hidden activation", record(CONV_SAME, ACTIVATION, "<I", 5)),
        ("v2 slope 1", record(DENSE, SLOPE, "<d", 1.0)),
        ("v2 slope that is 1 in float32", record(DENSE, SLOPE, "<d", 1 - 1e-12)),
        ("v2 NaN slope", record(CONV_SAME, SLOPE, "<d", nan)),
        ("v2 negative slope", record(DENSE, SLOPE, "<d", -0.25)),
        ("v2 infinite slope", record(DENSE, SLOPE, "<d", inf)),
        ("v2 zero filters", record(CONV_SAME, UNITS, "<Q", 0)),
        ("v2 2^24 + 1 units", record(DENSE, UNITS, "<Q", (1 << 24) + 1)),
        ("v2 units 2^63", record(DENSE, UNITS, "<Q", 1 << 63)),
        ("v2 zero stride", record(CONV_VALID, STRIDE, "<Q", 0)),
        ("v2 zero pool stride", record(MAXPOOL, STRIDE, "<Q", 0)),
        ("v2 stride 2^64 - 1", record(CONV_SAME, STRIDE, "<Q", (1 << 64) - 1)),
        ("v2 zero kernel height", record(CONV_SAME, KERNEL_H, "<Q", 0)),
        ("v2 kernel larger than its input", records((CONV_VALID, KERNEL_H, "<Q", 5),
                                                    (CONV_VALID, KERNEL_W, "<Q", 5))),
        ("v2 kernel of 2^24 with same padding", record(CONV_SAME, KERNEL_H, "<Q", 1 << 24)),
        ("v2 kernel of 2^24 + 1", record(CONV_SAME, KERNEL_W, "<Q", (1 << 24) + 1)),
        ("v2 pool window larger than its input", records((AVGPOOL, KERNEL_H, "<Q", 4),
                                                         (AVGPOOL, KERNEL_W, "<Q", 4))),
        ("v2 pool window that is not square", record(MAXPOOL, KERNEL_W, "<Q", 1)),
        ("v2 padding code 2", record(CONV_SAME, PADDING, "<I", 2)),
        ("v2 reserved field set", record(DENSE, RESERVED, "<I", 1)),
        ("v2 dropout rate 1", record(DROPOUT, RATE, "<d", 1.0)),
        ("v2 NaN dropout rate", record(DROPOUT, RATE, "<d", nan)),
        ("v2 negative dropout rate", record(DROPOUT, RATE, "<d", -0.1)),
        ("v2 dense with a kernel", record(DENSE, KERNEL_H, "<Q", 1)),
        ("v2 dense with a stride", record(LAST, STRIDE, "<Q", 1)),
        ("v2 flatten with units", record(FLATTEN, UNITS, "<Q", 16)),
        ("v2 pool with an activation", record(MAXPOOL, ACTIVATION, "<I", 1)),
        ("v2 pool with a padding", record(AVGPOOL, PADDING, "<I", 1)),
        ("v2 dropout with a slope of -0.0", record(DROPOUT, SLOPE, "<d", -0.0)),
        ("v2 conv with a dropout rate", record(CONV_VALID, RATE, "<d", 0.5)),
        ("v2 dense on an image (no flatten)", records((FLATTEN, KIND, "<I", 5))),
        ("v2 conv2d on flat data", records((DROPOUT, KIND, "<I", 1), (DROPOUT, RATE, "<d", 0.0),
                                           (DROPOUT, UNITS, "<Q", 16),
                                           (DROPOUT, KERNEL_H, "<Q", 1),
                                           (DROPOUT, KERNEL_W, "<Q", 1),
                                           (DROPOUT, STRIDE, "<Q", 1))),
        ("v2 pooling on flat data", records((DROPOUT, KIND, "<I", 2), (DROPOUT, RATE, "<d", 0.0),
                                            (DROPOUT, KERNEL_H, "<Q", 1),
                                            (DROPOUT, KERNEL_W, "<Q", 1),
                                            (DROPOUT, STRIDE, "<Q", 1))),
        ("v2 last layer not dense", records((LAST, KIND, "<I", 4), (LAST, UNITS, "<Q", 0),
                                            (LAST, SLOPE, "<d", 0.0))),
        ("v2 NaN first weight", header(params_start, "<f", nan)),
        ("v2 infinite last bias", header(len(body) - 4, "<f", inf)),
        ("v2 signalling NaN weight", header(params_start + 44, "<I", 0x7F800001)),
    ]


def valid_model_bytes(tmp_path):
    """A version-2 model file of a small MLP, as Network.save writes it."""
    net = Network([6, 5, 4], "tanh", seed=2)
    net.save(tmp_path / "good.cnn")
    return (tmp_path / "good.cnn").read_bytes()


def all_damaged_files(tmp_path):
    """The shared table: damaged version-1 and version-2 files, MLPs and CNNs."""
    good_v1 = version1_bytes([6, 5, 4], 4, 0.01)
    cases = [("v1 " + name, data) for name, data in damaged_version1_files(good_v1)]
    cases += [("v2 mlp " + name, data) for name, data in
              damaged_version1_files(valid_model_bytes(tmp_path))[:10]]
    return cases + damaged_version2_files(version2_bytes(tmp_path))


def test_every_damaged_file_is_really_damaged_only_where_named(tmp_path):
    # the table's bases are valid: both load, and every case differs from them
    good_v1, good_v2 = version1_bytes([6, 5, 4], 4, 0.01), version2_bytes(tmp_path)
    for good in (good_v1, good_v2):
        (tmp_path / "ok.cnn").write_bytes(good)
        model_file.load(tmp_path / "ok.cnn")
    cases = all_damaged_files(tmp_path)
    assert len({name for name, _ in cases}) == len(cases)
    assert all(data not in (good_v1, good_v2) for _, data in cases)


def test_c_loader_refuses_damaged_files_like_python(predict_exe, tmp_path):
    (tmp_path / "good.cnn").write_bytes(version2_bytes(tmp_path))
    assert run([str(predict_exe), "info", str(tmp_path / "good.cnn")]).returncode == 0
    for name, data in all_damaged_files(tmp_path):
        path = tmp_path / "bad.cnn"
        path.write_bytes(data)
        with pytest.raises(model_file.ModelFileError, match=re.escape(str(path))):
            Network.load(path)
        for command in ("info", "info-memory"):
            result = run([str(predict_exe), command, str(path)])
            assert result.returncode == CNN_ERR_FORMAT, (name, command, result.returncode,
                                                         result.stderr)
            assert FORMAT_MESSAGE in result.stderr, name
            assert result.stdout == "", name


def test_c_loader_reports_a_missing_file_as_io_error(predict_exe, tmp_path):
    result = run([str(predict_exe), "info", str(tmp_path / "absent.cnn")])
    assert result.returncode == CNN_ERR_IO
    assert "could not be read" in result.stderr


def expected_info(stack, loss):
    """The lines `predict info` must print after the first four for a layer stack."""
    built = layers.build(stack)
    lines = [f"loss {kernels.LOSSES[loss]}"]
    for i, layer in enumerate(built):
        shape = layer.output_shape()
        dims = shape + (1,) * (3 - len(shape))
        lines.append(f"shape {i} {len(shape)} {dims[0]} {dims[1]} {dims[2]}")
    for i, layer in enumerate(built[1:], 1):
        config = layer.config()
        has_activation = "activation" in config
        kernel = config.get("kernel_size", (config.get("size", 0),) * 2)
        fields = [kernels.LAYER_KINDS[layer.kind],
                  kernels.ACTIVATIONS[config["activation"]] if has_activation else 0,
                  f"{float(np.float32(config.get('leaky_slope', 0.0))):.9g}",
                  f"{float(np.float32(config.get('rate', 0.0))):.9g}",
                  config.get("units", config.get("filters", 0)), *kernel,
                  config.get("stride", 0), int(config.get("padding") == "same")]
        lines.append(f"layer {i} " + " ".join(str(f) for f in fields))
    return lines


def c_info(exe, path):
    result = run([str(exe), "info", str(path)])
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
def test_c_reads_every_layer_kind_as_python_does(predict_exe, tmp_path, loss):
    stack = small_cnn_stack()
    path = tmp_path / "cnn.cnn"
    model_file.save(path, stack, loss, random_params(stack))
    lines = c_info(predict_exe, path)
    sizes = [int(np.prod(layer.output_shape())) for layer in layers.build(stack)]
    assert lines[:4] == ["layers 8", "sizes " + " ".join(map(str, sizes)), "activation 1",
                         "slope 0.00999999978"]
    assert lines[4:] == expected_info(stack, loss)
    loaded, loaded_loss, _ = model_file.load(path)
    assert loaded == layers.build(stack) and loaded_loss == loss


def test_loaders_accept_resealed_valid_variants(predict_exe, tmp_path):
    # version 1: leaky_relu with slope 0.5
    body = bytearray(version1_bytes([6, 5, 4], 0, 0.01)[:-4])
    struct.pack_into("<If", body, 16, 2, 0.5)
    path = tmp_path / "variant.cnn"
    path.write_bytes(reseal(bytes(body)))
    stack, loss, _ = model_file.load(path)
    assert stack == layers.build(layers.mlp([6, 5, 4], "leaky_relu", 0.5))
    assert loss == "cross_entropy"
    assert "activation 2\nslope 0.5\n" in "\n".join(c_info(predict_exe, path)) + "\n"
    # version 2: other values in the used fields, -0.0 included (not shapes: they would
    # change the number of parameters)
    good = version2_bytes(tmp_path)
    variants = [(V2_HEADER + V2_RECORD * DENSE + SLOPE, "<d", 0.5),
                (V2_HEADER + V2_RECORD * DROPOUT + RATE, "<d", 0.99),
                (V2_HEADER + V2_RECORD * DROPOUT + RATE, "<d", -0.0),
                (V2_HEADER + V2_RECORD * CONV_SAME + SLOPE, "<d", -0.0),
                (V2_HEADER + V2_RECORD * CONV_SAME + ACTIVATION, "<I", 4),
                (16, "<I", 1)]           # squared_error
    for offset, fmt, value in variants:
        path.write_bytes(patched(good, offset, fmt, value))
        stack, loss, _ = model_file.load(path)
        assert c_info(predict_exe, path)[4:] == expected_info(stack, loss)


def test_c_rejects_input_of_the_wrong_size(predict_exe, trained, tmp_path):
    trained.save(tmp_path / "m.cnn")
    np.zeros(783, np.float32).tofile(tmp_path / "X.f32")
    result = run([str(predict_exe), "run", str(tmp_path / "m.cnn"), str(tmp_path / "X.f32"),
                  "1", str(tmp_path / "p"), str(tmp_path / "l")])
    assert result.returncode == 64
    assert "INPUTS must hold" in result.stderr


# ---- pkg-config -------------------------------------------------------------------------

def test_c_program_builds_with_pkg_config(tmp_path, trained, mnist, c_compiler):
    cc = c_compiler
    if not shutil.which("pkg-config"):
        pytest.skip("pkg-config is not installed")
    lib = Path(cnn_core.get_library_dir())
    assert (lib / "cnn_core.pc").is_file(), "the package must ship lib/cnn_core.pc"
    env = dict(os.environ, PKG_CONFIG_PATH=str(lib))
    flags = build(["pkg-config", "--cflags", "--libs", "cnn_core"], env=env).stdout.split()
    includes = [Path(f[2:]).resolve() for f in flags if f.startswith("-I")]
    assert Path(cnn_core.get_include()).resolve() in includes
    assert "-lcnn_core" in flags and "-pthread" in flags
    exe = tmp_path / "predict"
    build([cc, "-std=c99", "-O2", str(DOWNSTREAM / "c" / "predict.c"), *flags, "-o", str(exe)])
    path = tmp_path / "m.cnn"
    trained.save(path)
    X = mnist[2][:64]
    _, labels = c_predict(exe, path, X, tmp_path)
    np.testing.assert_array_equal(labels, trained.predict(X))


# ---- other architectures ------------------------------------------------------------------

SOURCES = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize("source", sorted(p.relative_to(SOURCES).as_posix()
                                          for p in SOURCES.glob("*/*.c")))
def test_library_compiles_without_the_x86_kernels(source, cc, tmp_path):
    """Every library source compiles warning-free with the x86-64 SIMD paths left out
    (CNN_PORTABLE_ONLY), as on aarch64 and other architectures, so code meant for one
    family cannot leak outside its #ifdef unnoticed on an x86 machine."""
    result = build([cc, "-std=c99", "-c", "-o", str(tmp_path / "source.o"), "-Wall",
                    "-Wextra", "-DCNN_PORTABLE_ONLY", f"-I{SOURCES}", str(SOURCES / source)])
    # no diagnostic about the sources (a wrapper's own flags may draw other warnings)
    assert str(SOURCES) not in result.stderr, result.stderr
