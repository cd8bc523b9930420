"""Embedding the installed cnn_core in other projects.

- A Cython project (tests/downstream/cython) cimports cnn_core's C-level API and builds
  with no include or link flags at all; its results must agree with numpy.
- A plain C program (tests/downstream/c/predict.c) is compiled against the shipped
  header and static library only, loads a model saved by Network.save with
  cnn_model_load and must predict exactly what Network.predict does on real MNIST rows;
  every kind of damaged model file must be refused with CNN_ERR_FORMAT.
"""
import importlib
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import cnn_core
from cnn_core import Network, model_file

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


def openmp_flags():
    """-fopenmp when the shipped library was built with OpenMP (lib/openmp.txt holds 1)."""
    flag = Path(cnn_core.get_library_dir(), "openmp.txt").read_text().strip()
    assert flag in ("0", "1"), f"openmp.txt must hold 0 or 1, got {flag!r}"
    return ["-fopenmp"] if flag == "1" else []


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
           "-L", cnn_core.get_library_dir(), "-lcnn_core", "-lm", *openmp_flags(),
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


def damaged_files(good):
    """(name, bytes) of model files every reader must refuse, built from a valid one."""
    body = good[:-4]
    header = bytearray(body)
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
        patched = bytearray(header)
        struct.pack_into(fmt, patched, offset, value)
        return reseal(bytes(patched))
    cases += [
        ("version 2", with_field(8, "<I", 2)),
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
        ("infinite last bias", with_field(len(header) - 4, "<f", float("-inf"))),
        ("signalling NaN weight", with_field(24 + 8 * 3 + 40, "<I", 0x7F800001)),
    ]
    # a hostile header claiming 32 layers of 2^24 units: must be refused as truncated,
    # without first allocating the petabytes it claims
    huge = struct.pack("<8sIIIf", model_file.MAGIC, 1, 32, 1, 0.01)
    huge += struct.pack("<33Q", *([1 << 24] * 33)) + b"\0" * 64
    cases.append(("huge claimed sizes", reseal(huge)))
    return cases


def valid_model_bytes(tmp_path):
    net = Network([6, 5, 4], "tanh", seed=2)
    net.save(tmp_path / "good.cnn")
    return (tmp_path / "good.cnn").read_bytes()


def test_c_loader_refuses_damaged_files_like_python(predict_exe, tmp_path):
    good = valid_model_bytes(tmp_path)
    assert run([str(predict_exe), "info", str(tmp_path / "good.cnn")]).returncode == 0
    for name, data in damaged_files(good):
        path = tmp_path / "bad.cnn"
        path.write_bytes(data)
        with pytest.raises(model_file.ModelFileError, match=str(path)):
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


def test_c_loader_accepts_resealed_valid_variants(predict_exe, tmp_path):
    good = valid_model_bytes(tmp_path)
    patched = bytearray(good[:-4])
    struct.pack_into("<If", patched, 16, 2, 0.5)     # leaky_relu with slope 0.5
    path = tmp_path / "variant.cnn"
    path.write_bytes(reseal(bytes(patched)))
    net = Network.load(path)
    assert (net.activation, net.leaky_slope) == ("leaky_relu", 0.5)
    result = run([str(predict_exe), "info", str(path)])
    assert result.returncode == 0, result.stderr
    assert "activation 2\nslope 0.5\n" in result.stdout


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
    assert "-lcnn_core" in flags
    exe = tmp_path / "predict"
    build([cc, "-std=c99", "-O2", str(DOWNSTREAM / "c" / "predict.c"), *flags, "-o", str(exe)])
    path = tmp_path / "m.cnn"
    trained.save(path)
    X = mnist[2][:64]
    _, labels = c_predict(exe, path, X, tmp_path)
    np.testing.assert_array_equal(labels, trained.predict(X))
