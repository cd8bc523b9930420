"""A bad-input battery, property-based (hypothesis): every public entry point, every kind
of argument a user can pass.

Each case either gives the right answer (the same as a call with a plain C-contiguous
float32 array) or raises the documented exception, whose message names the argument;
never a crash. Data are real MNIST rows, pooled to 7x7 to keep every example fast.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cnn_core import ModelFileError, Network, cli
from cnn_core.datasets import IDXFormatError, load_idx

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
N_FEATURES = 49


@pytest.fixture(scope="module")
def data(mnist_split):
    """(X float32 (200, 49) in [0, 1], y uint8 (200,)): real MNIST rows pooled to 7x7."""
    (X, y), _ = mnist_split
    X = X[:200].reshape(200, 7, 4, 7, 4).mean(axis=(2, 4)).reshape(200, N_FEATURES)
    return (X / 255).astype(np.float32), y[:200]


@pytest.fixture(scope="module")
def net(data):
    X, y = data
    net = Network([N_FEATURES, 12, 10], seed=0)
    net.fit(X, y, epochs=2, batch_size=32)
    return net


def raises_naming(exc_types, name, call):
    """Run call(); if it raises, the exception must be one of exc_types naming `name`."""
    try:
        return call(), None
    except exc_types as exc:
        assert name in str(exc), f"{type(exc).__name__} does not name {name!r}: {exc}"
        return None, exc


# ---- array layouts: the same answer as a plain array -------------------------------

def layouts(X, where):
    """Arrays holding X's values in other layouts, dtypes, byte orders and memory."""
    buf = bytearray(X.nbytes + 1)
    misaligned = np.frombuffer(buf, dtype=np.uint8)[1:].view(np.float32).reshape(X.shape)
    misaligned[...] = X
    readonly = X.copy()
    readonly.flags.writeable = False
    big = np.zeros((2 * X.shape[0], 2 * X.shape[1] + 1), np.float32)
    big[::2, 1::2][:, :X.shape[1]] = X
    path = os.path.join(where, "X.f32")
    mapped = np.memmap(path, dtype=np.float32, mode="w+", shape=X.shape)
    mapped[...] = X
    mapped.flush()
    return {
        "float64": X.astype(np.float64),
        "big-endian": X.astype(">f4"),
        "big-endian float64": X.astype(">f8"),
        "fortran": np.asfortranarray(X),
        "strided": big[::2, 1::2][:, :X.shape[1]],
        "misaligned": misaligned,
        "read-only": readonly,
        "memory-mapped": np.memmap(path, dtype=np.float32, mode="r", shape=X.shape),
        "list": X.tolist(),
    }


@given(rows=st.integers(1, 40), start=st.integers(0, 150))
@FAST
def test_every_layout_predicts_like_a_plain_array(net, data, rows, start, tmp_path_factory):
    X = np.ascontiguousarray(data[0][start:start + rows])
    y = data[1][start:start + rows]
    expected_p, expected_l = net.predict_proba(X), net.predict(X)
    expected_e = net.evaluate(X, y)
    for name, variant in layouts(X, tmp_path_factory.mktemp("mm")).items():
        assert np.array_equal(net.predict_proba(variant), expected_p), name
        assert np.array_equal(net.predict(variant), expected_l), name
        assert net.evaluate(variant, y) == expected_e, name


@given(rows=st.integers(1, 30), pixels=st.integers(0, 255))
@FAST
def test_uint8_pixels_are_scaled_by_1_over_255(net, rows, pixels):
    X = np.full((rows, N_FEATURES), pixels, np.uint8)
    X[:, ::3] = 255 - pixels
    floats = X.astype(np.float32) / np.float32(255)
    assert np.array_equal(net.predict(X), net.predict(floats))
    assert np.array_equal(net.predict(X[:, :]), net.predict(np.asfortranarray(X)))


# ---- bad arrays: the documented error, naming the argument --------------------------

BAD_DTYPES = [np.int32, np.int64, np.uint16, np.complex64, np.bool_, object, "U3", "M8[s]"]


@given(dtype=st.sampled_from(BAD_DTYPES), method=st.sampled_from(["predict", "predict_proba",
                                                                  "evaluate", "fit"]))
@FAST
def test_wrong_dtypes_are_refused_naming_X(net, data, dtype, method):
    X = np.zeros((3, N_FEATURES)).astype(dtype)
    y = np.zeros(3, np.int64)
    args = (X, y) if method in ("evaluate", "fit") else (X,)
    _, exc = raises_naming((TypeError,), "X", lambda: getattr(net, method)(*args, epochs=1)
                           if method == "fit" else getattr(net, method)(*args))
    assert exc is not None


@given(shape=st.sampled_from([(0, N_FEATURES), (N_FEATURES,), (3, N_FEATURES - 1),
                              (3, N_FEATURES + 1), (3, 7, 7), (1, 1, N_FEATURES), (), (0,)]))
@FAST
def test_wrong_shapes_are_refused_naming_X(net, shape):
    X = np.zeros(shape, np.float32)
    for call in (net.predict, net.predict_proba,
                 lambda X: net.evaluate(X, np.zeros(len(X) if X.ndim else 0, np.int64)),
                 lambda X: net.fit(X, np.zeros(len(X) if X.ndim else 0, np.int64), epochs=1)):
        _, exc = raises_naming((ValueError,), "X", lambda: call(X))
        assert exc is not None


@given(value=st.sampled_from([np.nan, np.inf, -np.inf]), row=st.integers(0, 9),
       col=st.integers(0, N_FEATURES - 1), dtype=st.sampled_from([np.float32, np.float64, ">f4"]))
@FAST
def test_nan_and_infinity_are_refused_naming_X(net, data, value, row, col, dtype):
    X = data[0][:10].astype(dtype)
    X[row, col] = value
    y = data[1][:10]
    for call in (lambda: net.predict(X), lambda: net.predict_proba(X),
                 lambda: net.evaluate(X, y), lambda: Network([N_FEATURES, 10]).fit(X, y, epochs=1)):
        _, exc = raises_naming((ValueError,), "X", call)
        assert exc is not None


def test_float64_overflowing_float32_is_refused_naming_X(net):
    X = np.zeros((2, N_FEATURES))
    X[1, 3] = 1e300
    with pytest.raises(ValueError, match="X holds values too large for float32"):
        net.predict(X)


# ---- labels ---------------------------------------------------------------------------

LABELS = st.one_of(
    st.lists(st.integers(-3, 12), min_size=1, max_size=12).map(
        lambda v: np.array(v, dtype=np.int64)),
    st.sampled_from([np.int8, np.int16, np.uint8, np.uint32, np.uint64, np.float32,
                     np.float64]).flatmap(lambda t: st.lists(
                         st.integers(0, 11), min_size=1, max_size=12).map(
                         lambda v: np.array(v).astype(t))),
    st.just(np.array([0.5, 1.0])), st.just(np.array([np.nan, 1.0])),
    st.just(np.array(["1", "2"])), st.just(np.array([True, False])),
    st.just(np.eye(10, dtype=np.int64)[:3]), st.just(np.zeros((2, 2), np.int64)))


@given(y=LABELS)
@FAST
def test_labels_are_right_or_refused_naming_y(net, data, y):
    X = data[0][:len(y)]
    assume(len(X) == len(y))
    valid = (y.ndim == 1 and y.dtype.kind in "iuf" and np.all(np.isfinite(y))
             and np.all(y == np.round(y)) and y.min() >= 0 and y.max() <= 9)
    result, exc = raises_naming((ValueError, TypeError), "y", lambda: net.evaluate(X, y))
    if valid:
        assert exc is None, exc
        expected = net.evaluate(X, np.asarray(y).astype(np.int64))
        assert result == expected
        fresh = Network([N_FEATURES, 10], seed=0)
        fresh.fit(X, y, epochs=1, batch_size=4)
        reference = Network([N_FEATURES, 10], seed=0)
        reference.fit(X, y.astype(np.int64), epochs=1, batch_size=4)
        assert all(np.array_equal(a, b) for a, b in zip(fresh.weights, reference.weights))
    else:
        assert exc is not None, f"labels {y!r} accepted"


@given(n=st.sampled_from([0, 1, 3]), shift=st.sampled_from([-1, 1]))
@FAST
def test_label_count_must_match_the_rows(net, data, n, shift):
    X = data[0][:max(n, 1)]
    y = np.zeros(max(len(X) + shift, 0), np.int64)
    for call in (lambda: net.evaluate(X, y), lambda: Network([N_FEATURES, 10]).fit(X, y)):
        _, exc = raises_naming((ValueError,), "y", call)
        assert exc is not None


def test_one_row_fit_and_predict(data):
    X, y = data[0][:1], data[1][:1]
    net = Network([N_FEATURES, 5, 10], seed=0)
    history = net.fit(X, y, epochs=3, batch_size=64)
    assert len(history) == 3 and np.isfinite(history["loss"]).all()
    assert net.predict(X).shape == (1,) and net.predict_proba(X).shape == (1, 10)


# ---- numeric arguments at and past their bounds --------------------------------------

def values(*good):
    """Good values plus the kinds of bad value every numeric argument must refuse."""
    return st.sampled_from(list(good) + [None, "1", True, [1], math.nan, math.inf, -math.inf,
                                         -1, -1e-300, 0, 1, 1.0 + 1e-12, 1e39, 2 ** 70])


FIT_ARGS = {
    "epochs": (1, 2, np.int32(1)),
    "batch_size": (1, 7, 10 ** 12, np.int64(3)),
    "learning_rate": (0.0, 1e-3, 0.05, 3.0e38, np.float32(0.01)),
    "momentum": (0.0, 0.5, 0.999, np.nextafter(1.0, 0)),
    "weight_decay": (0.0, 1e-4, 10.0),
    "beta1": (0.0, 0.9), "beta2": (0.0, 0.999),
    "eps": (1e-8, 1.2e-38, 1.0),
    "n_threads": (1, 2, 3, np.int8(2)),
}
FIT_BOUNDS = {  # (lowest valid, highest valid, highest is open, integer)
    "epochs": (1, math.inf, False, True), "batch_size": (1, math.inf, False, True),
    "learning_rate": (0, float(np.finfo(np.float32).max), False, False),
    "momentum": (0, 1, True, False), "weight_decay": (0, float(np.finfo(np.float32).max),
                                                      False, False),
    "beta1": (0, 1, True, False), "beta2": (0, 1, True, False),
    "eps": (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max), False, False),
    "n_threads": (1, 1024, False, True),
}


def valid(name, value):
    low, high, open_, integer = FIT_BOUNDS[name]
    if isinstance(value, (bool, str, list)) or value is None:
        return name in ("n_threads", "learning_rate") and value is None     # the defaults
    if integer and not isinstance(value, (int, np.integer)):
        return False
    if name == "epochs" and value > 2:      # valid, but the battery keeps fits short
        return None
    if not math.isfinite(value):
        return False
    return low <= value and (value < high if open_ else value <= high)


@given(name=st.sampled_from(sorted(FIT_ARGS)), data_=st.data(),
       optimizer=st.sampled_from(["sgd", "adam", "adamw"]))
@FAST
def test_fit_arguments_in_range_train_and_out_of_range_are_refused(data, name, data_,
                                                                    optimizer):
    value = data_.draw(values(*FIT_ARGS[name]))
    ok = valid(name, value)
    assume(ok is not None)
    if name == "momentum" and optimizer != "sgd":
        optimizer = "sgd"
    X, y = data[0][:20], data[1][:20]
    net = Network([N_FEATURES, 6, 10], seed=0)
    history, exc = raises_naming((TypeError, ValueError), name,
                                 lambda: net.fit(X, y, optimizer=optimizer,
                                                 **{"epochs": 1, name: value}))
    if ok:
        assert exc is None, f"{name}={value!r}: {exc}"
        assert len(history) == (value if name == "epochs" else 1)
    else:
        assert exc is not None, f"{name}={value!r} accepted"


@given(value=values(1, 2))
@FAST
def test_inference_n_threads(net, data, value):
    X = data[0][:9]
    ok = valid("n_threads", value)
    for call in (net.predict, net.predict_proba):
        result, exc = raises_naming((TypeError, ValueError), "n_threads",
                                    lambda: call(X, n_threads=value))
        assert (exc is None) == bool(ok), (value, exc)
        if ok:
            assert np.array_equal(result, call(X, n_threads=1))


@given(weights=st.one_of(
    st.lists(st.floats(0, 10), min_size=5, max_size=5).map(np.array),
    st.sampled_from([np.array([1, 2, 3, 4, 5]), np.array([-1.0, 1, 1, 1, 1]),
                     np.array([np.nan, 1, 1, 1, 1]), np.array([np.inf, 1, 1, 1, 1]),
                     np.array([1e39, 1, 1, 1, 1]), np.ones(4), np.ones((5, 1)),
                     np.array(["a"] * 5), np.ones(5, bool), np.ones(5, complex)])))
@FAST
def test_sample_weight(net, data, weights):
    X, y = data[0][:5], data[1][:5]
    ok = (weights.ndim == 1 and len(weights) == 5 and weights.dtype.kind in "iuf"
          and np.all(np.isfinite(weights.astype(np.float32))) and weights.min() >= 0)
    for call in (lambda: net.evaluate(X, y, sample_weight=weights),
                 lambda: Network([N_FEATURES, 10], seed=0).fit(X, y, epochs=1,
                                                               sample_weight=weights)):
        _, exc = raises_naming((TypeError, ValueError), "sample_weight", call)
        assert (exc is None) == bool(ok), (weights, exc)


@given(sizes=st.one_of(
    st.lists(st.integers(-2, 6), min_size=0, max_size=5),
    st.sampled_from([[3, 2.0], [3, "2"], [3, None], [True, 2], [np.int64(3), np.uint8(2)],
                     [3] * 34, [3] * 33, [1 << 24, 2], [(1 << 24) + 1, 2], "32", 7, None,
                     [3, 2, np.nan]])),
       activation=st.sampled_from(["relu", "tanh", "sigmoid", "leaky_relu", "identity",
                                   "softmax", "ReLU", None, 1]),
       slope=values(0.0, 0.01, 0.5, np.nextafter(1.0, 0)),
       seed=st.sampled_from([None, 0, 7, 2 ** 64, -1, 1.5, True, "0"]))
@FAST
def test_network_arguments(sizes, activation, slope, seed):
    def make():
        return Network(sizes, activation, seed=seed, leaky_slope=slope)
    try:
        net = make()
    except (TypeError, ValueError, MemoryError) as exc:
        names = ("layer_sizes", "layer size", "activation", "leaky_slope", "seed")
        assert any(n in str(exc) for n in names), exc
        return
    assert net.layer_sizes == [int(s) for s in sizes]
    assert all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1
               for s in sizes) and 2 <= len(sizes) <= 33
    assert activation in ("relu", "tanh", "sigmoid", "leaky_relu", "identity")
    assert isinstance(slope, (int, float, np.floating)) and not isinstance(slope, bool)
    assert 0 <= slope < 1
    assert seed is None or isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0
    P = net.predict_proba(np.zeros((2, net.n_features), np.float32))
    assert np.allclose(P.sum(axis=1), 1, atol=1e-5)


# ---- files: save, load, export_c, load_idx -------------------------------------------

@given(path_kind=st.sampled_from(["str", "path", "folder", "missing folder", "empty file",
                                  "not a model", "truncated"]))
@FAST
def test_save_and_load_paths(net, tmp_path_factory, path_kind):
    folder = tmp_path_factory.mktemp("files")
    good = folder / "good.cnn"
    net.save(str(good))
    data = good.read_bytes()
    path = {"str": str(folder / "a.cnn"), "path": folder / "a.cnn", "folder": folder,
            "missing folder": folder / "nope" / "a.cnn", "empty file": folder / "e.cnn",
            "not a model": folder / "n.cnn", "truncated": folder / "t.cnn"}[path_kind]
    if path_kind == "empty file":
        path.write_bytes(b"")
    elif path_kind == "not a model":
        path.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x02ab")
    elif path_kind == "truncated":
        path.write_bytes(data[:-9])
    if path_kind in ("str", "path"):
        net.save(path)
        loaded = Network.load(path)
        assert Path(path).read_bytes() == data
        assert np.array_equal(loaded.predict_proba(np.eye(3, N_FEATURES, dtype=np.float32)),
                              net.predict_proba(np.eye(3, N_FEATURES, dtype=np.float32)))
    elif path_kind in ("folder", "missing folder"):
        with pytest.raises(OSError, match=str(folder)):
            net.save(path)
        with pytest.raises(OSError):
            Network.load(path)
    else:
        with pytest.raises(ModelFileError, match=str(path)):
            Network.load(path)


@given(name=st.sampled_from(["cnn_model", "m", "_x9", "int", "9lives", "a-b", "", "é", None, 3]),
       quantize=st.sampled_from([None, "int8", "int4", 8, "INT8"]),
       check=st.sampled_from(["none", "floats", "pixels", "wrong shape", "nan", "strings"]))
@FAST
def test_export_c_arguments(net, data, tmp_path_factory, name, quantize, check):
    X = data[0][:10]
    X_check = {"none": None, "floats": X, "pixels": (X * 255).astype(np.uint8),
               "wrong shape": X[:, :-1], "nan": np.where(X > 0.5, np.nan, X),
               "strings": np.array([["a"] * N_FEATURES])}[check]
    folder = tmp_path_factory.mktemp("export")
    good_name = isinstance(name, str) and name.isidentifier() and name.isascii() \
        and name != "int"
    good = good_name and quantize in (None, "int8") and check in ("none", "floats", "pixels")
    try:
        report = net.export_c(folder, name=name, quantize=quantize, X_check=X_check)
    except (TypeError, ValueError) as exc:
        assert not good, exc
        bad = ["name"] * (not good_name) + ["quantize"] * (quantize not in (None, "int8"))
        bad += ["X_check"] * (check not in ("none", "floats", "pixels"))
        assert any(arg in str(exc) for arg in bad), exc
        return
    assert good, (name, quantize, check)
    assert report.header.is_file() and report.source.is_file()
    if check != "none":
        assert 0.8 <= report.agreement <= 1


@given(body=st.binary(max_size=64), gzipped=st.booleans(),
       code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07, 0x10]),
       dims=st.lists(st.integers(0, 5), min_size=0, max_size=3))
@FAST
def test_load_idx_gives_the_header_shape_or_idx_format_error(tmp_path_factory, body, gzipped,
                                                              code, dims):
    import gzip
    import struct
    raw = struct.pack(">HBB", 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + body
    path = tmp_path_factory.mktemp("idx") / "f.idx"
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    try:
        array = load_idx(path)
    except IDXFormatError as exc:
        assert str(path) in str(exc)
        return
    itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}[code]
    assert array.shape == tuple(dims) and len(body) == itemsize * math.prod(dims)
    assert array.flags.c_contiguous and array.flags.writeable and array.dtype.isnative
    assert array.tobytes() == np.frombuffer(body, array.dtype.newbyteorder(">")).astype(
        array.dtype).tobytes()


# ---- the command line ----------------------------------------------------------------

@pytest.fixture(scope="module")
def small_mnist(mnist_split, tmp_path_factory):
    """A folder of four small MNIST IDX files (real rows: 30 to train on, 20 to test)."""
    import struct
    (images, labels), (test_images, test_labels) = mnist_split
    small = tmp_path_factory.mktemp("small-mnist")
    for name, array in (("train-images-idx3-ubyte", images[:30].reshape(30, 28, 28)),
                        ("train-labels-idx1-ubyte", labels[:30]),
                        ("t10k-images-idx3-ubyte", test_images[:20].reshape(20, 28, 28)),
                        ("t10k-labels-idx1-ubyte", test_labels[:20])):
        header = struct.pack(">HBB", 0, 8, array.ndim)
        header += struct.pack(f">{array.ndim}I", *array.shape)
        (small / name).write_bytes(header + np.ascontiguousarray(array).tobytes())
    return small


def test_cli_subprocess_reports_bad_files(small_mnist, tmp_path):
    """The installed command: a damaged model file and a damaged IDX file end in exit
    status 2 with one line naming the file, no traceback."""
    model = tmp_path / "m.cnn"
    Network([784, 3, 10], seed=0).save(model)
    damaged = tmp_path / "damaged.cnn"
    damaged.write_bytes(model.read_bytes()[:-1] + b"x")
    bad_data = tmp_path / "data"
    bad_data.mkdir()
    for f in small_mnist.iterdir():
        (bad_data / f.name).write_bytes(f.read_bytes())
    images = bad_data / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    command = [sys.executable, "-P", "-m", "cnn_core"]
    for args, culprit in ((["evaluate", damaged, "--data", small_mnist], damaged),
                          (["evaluate", model, "--data", bad_data], images),
                          (["convert", damaged, tmp_path / "out.cnn"], damaged)):
        result = subprocess.run(command + [str(a) for a in args], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == cli.EXIT_ERROR, result
        assert str(culprit) in result.stderr and "Traceback" not in result.stderr, result

@given(argv=st.lists(st.sampled_from(
    ["train", "evaluate", "convert", "info", "--epochs", "0", "-1", "1", "x", "1e9", "nan",
     "--batch-size", "--learning-rate", "--momentum", "1.0", "--hidden", "0", "8,8",
     "--threads", "1025", "--train-samples", "--seed", "--no-save", "--data", "--output",
     "MODEL", "DATA", "FOLDER", "MISSING", "--activation", "relu", "softmax",
     "--weight-decay", "inf", "--optimizer", "adamw", "sgd2"]), max_size=7))
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_cli_ends_in_an_exit_status(argv, small_mnist, tmp_path_factory, capsys):
    folder = tmp_path_factory.mktemp("cli")
    small = small_mnist
    model = folder / "m.cnn"
    Network([784, 3, 10], seed=0).save(model)
    mapping = {"MODEL": str(model), "DATA": str(small), "FOLDER": str(folder),
               "MISSING": str(folder / "missing")}
    argv = [mapping.get(a, a) for a in argv]
    if argv and argv[0] == "train":
        argv += ["--data", str(small), "--epochs", "1", "--train-samples", "20",
                 "--no-save", "--hidden", "4"]
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status in (cli.EXIT_OK, cli.EXIT_ERROR), (argv, status, err)
    if status == cli.EXIT_ERROR:
        assert err.strip(), argv
