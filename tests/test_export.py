"""cnn_core.export.export_c: the generated C99 is compiled with the system C compiler
(every warning an error), run on real MNIST rows and compared with the Network."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cnn_core
from cnn_core import Network, layers as L, model_file
from cnn_core.export import ExportReport, export_c

DOWNSTREAM = Path(__file__).resolve().parent / "downstream"
WARNINGS = ["-Wall", "-Wextra", "-pedantic", "-Werror", "-Wshadow", "-Wconversion"]


def compile_and_run(cc, report, X, folder):
    """(probs, labels) of the exported model's C code on float32 rows X."""
    name, macro = report.name, report.name.upper()
    exe = folder / f"run_{name}"
    cmd = [cc, "-std=c99", "-O2", *WARNINGS, f'-DMODEL_HEADER="{name}.h"',
           f"-DPREDICT={name}_predict", f"-DPREDICT_PROBA={name}_predict_proba",
           f"-DN_INPUTS={macro}_N_INPUTS", f"-DN_CLASSES={macro}_N_CLASSES",
           "-I", str(report.header.parent), str(DOWNSTREAM / "export" / "run_export.c"),
           str(report.source), "-lm", "-o", str(exe)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    inputs, probs, labels = folder / "X.f32", folder / "p.f32", folder / "l.i32"
    np.ascontiguousarray(X, dtype=np.float32).tofile(inputs)
    result = subprocess.run([str(exe), str(inputs), str(len(X)), str(probs), str(labels)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return (np.fromfile(probs, np.float32).reshape(len(X), -1),
            np.fromfile(labels, np.int32))


# ---- float32 export ----------------------------------------------------------------------

def test_float_export_predicts_like_the_network(cc, trained, mnist, tmp_path):
    X, y = mnist[2], mnist[3]
    report = export_c(trained, tmp_path, name="digits", X_check=X)
    assert isinstance(report, ExportReport)
    assert report.agreement == 1.0 and report.n_checked == len(X)
    probs, labels = compile_and_run(cc, report, X, tmp_path)
    np.testing.assert_array_equal(labels, trained.predict(X))
    np.testing.assert_allclose(probs, trained.predict_proba(X), rtol=0, atol=1e-5)
    assert (labels == y).mean() > 0.85


@pytest.mark.parametrize("activation", model_file.HIDDEN_ACTIVATIONS)
def test_float_export_every_activation(cc, mnist, tmp_path, activation):
    # three hidden layers: the ping-pong buffers are reused
    net = Network([784, 40, 30, 20, 10], activation, seed=5, leaky_slope=0.2)
    X = mnist[2][:300]
    report = export_c(net, tmp_path, name=f"net_{activation}")
    probs, labels = compile_and_run(cc, report, X, tmp_path)
    np.testing.assert_array_equal(labels, net.predict(X))
    np.testing.assert_allclose(probs, net.predict_proba(X), rtol=0, atol=1e-5)


def test_float_export_without_hidden_layers(cc, mnist, tmp_path):
    net = Network([784, 10], "tanh", seed=1)
    X = mnist[2][:200]
    report = export_c(net, tmp_path)
    assert report.name == "cnn_model" and report.header.name == "cnn_model.h"
    assert report.stack_bytes == 4 * 10
    probs, labels = compile_and_run(cc, report, X, tmp_path)
    np.testing.assert_array_equal(labels, net.predict(X))
    np.testing.assert_allclose(probs, net.predict_proba(X), rtol=0, atol=1e-5)


def test_a_file_in_place_of_the_folder_is_named(trained, tmp_path):
    (tmp_path / "model.py").write_text("x = 1\n")
    with pytest.raises(NotADirectoryError, match="model.py is a file"):
        export_c(trained, tmp_path / "model.py")
    assert (tmp_path / "model.py").read_text() == "x = 1\n"


def test_weights_are_written_exactly(trained, tmp_path):
    report = export_c(trained, tmp_path, name="exact")
    text = report.source.read_text()
    table = re.search(r"static const float W0\[(\d+)\] = \{(.*?)\};", text, re.S)
    assert int(table.group(1)) == trained.weights[0].size
    values = np.array([float(v.strip().rstrip("f")) for v in table.group(2).split(",")],
                      np.float32)
    np.testing.assert_array_equal(values, trained.weights[0].ravel())


# ---- int8 export -------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_export_agrees_with_the_network(cc, trained, mnist, tmp_path, per_channel):
    X = mnist[2]
    expected = trained.predict(X)
    report = export_c(trained, tmp_path, name="digits8", quantize="int8",
                      per_channel=per_channel, X_check=X)
    assert report.quantize == "int8" and report.per_channel == per_channel
    assert report.agreement >= 0.97, report
    probs, labels = compile_and_run(cc, report, X, tmp_path)
    c_agreement = (labels == expected).mean()
    assert c_agreement >= 0.97
    # the reported agreement is that of the compiled code, up to float rounding
    assert abs(c_agreement - report.agreement) <= 0.002
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(probs - trained.predict_proba(X)).mean() < 0.01
    source = report.source.read_text()
    assert "static const int8_t Q0[" in source and "static const float W0[" not in source


def test_int8_report(trained, mnist, tmp_path):
    X_uint8 = mnist[0][:500]
    f32 = export_c(trained, tmp_path / "f", name="m")
    q8 = export_c(trained, tmp_path / "q", name="m", quantize="int8", X_check=X_uint8)
    assert f32.agreement is None and f32.n_checked == 0 and f32.max_weight_error == 0.0
    n = sum(W.size + b.size for W, b in zip(trained.weights, trained.biases))
    assert f32.n_parameters == q8.n_parameters == n
    assert f32.table_bytes == 4 * n
    assert q8.table_bytes < f32.table_bytes / 3
    assert q8.n_checked == 500 and q8.agreement >= 0.97      # uint8 rows are scaled by 1/255
    # per-channel rounding error is at most half a step of the coarsest channel
    steps = [np.abs(W).max(axis=0) / 127 for W in trained.weights]
    assert 0 < q8.max_weight_error <= max(s.max() for s in steps) / 2 * 1.0001
    assert "agrees with the network" in str(q8)


# ---- convolutional networks --------------------------------------------------------------

def test_float_export_of_a_trained_cnn_predicts_like_the_network(cc, trained_cnn, mnist,
                                                                 tmp_path):
    X, y = mnist[2], mnist[3]
    report = export_c(trained_cnn, tmp_path, name="cnn", X_check=X.reshape(-1, 28, 28))
    assert report.agreement == 1.0 and report.n_checked == len(X)
    probs, labels = compile_and_run(cc, report, X, tmp_path)
    np.testing.assert_array_equal(labels, trained_cnn.predict(X))
    np.testing.assert_allclose(probs, trained_cnn.predict_proba(X), rtol=0, atol=1e-5)
    assert (labels == y).mean() > 0.6
    # the activations live in static buffers sized at export: the widest layer output
    # (12x12x8 floats after the first convolution), twice
    assert report.static_bytes == 2 * 4 * 12 * 12 * 8 and report.stack_bytes == 4 * 10
    source, header = report.source.read_text(), report.header.read_text()
    assert "static float act_a[1152], act_b[1152];" in source
    assert "#define CNN_STATIC_BYTES 9216" in header and "one thread at a time" in header


def every_option_cnn(seed):
    """Untrained, every layer option the export writes: non-square kernels, strides,
    both paddings, overlapping and plain pools, every activation, a dropout between
    dense layers and an activation on the last layer."""
    return Network([L.Input((28, 28, 1)),
                    L.Conv2D(5, (3, 2), stride=2, padding="same", activation="leaky_relu",
                             leaky_slope=0.1),
                    L.MaxPool2D(3, stride=1),
                    L.Conv2D(6, 3, stride=2, activation="sigmoid"),
                    L.Conv2D(4, 1, padding="same", activation="tanh"),
                    L.AvgPool2D(2),
                    L.Dropout(0.3), L.Flatten(),
                    L.Dense(12, activation="relu"), L.Dropout(0.5),
                    L.Dense(10, activation="tanh")], seed=seed)


def test_float_export_of_every_layer_option(cc, mnist, tmp_path):
    net = every_option_cnn(seed=7)
    X = mnist[2][:300]
    report = export_c(net, tmp_path, name="options")
    probs, labels = compile_and_run(cc, report, X, tmp_path)
    np.testing.assert_array_equal(labels, net.predict(X))
    np.testing.assert_allclose(probs, net.predict_proba(X), rtol=0, atol=1e-5)


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_export_of_a_trained_cnn_agrees_with_the_network(cc, trained_cnn, mnist,
                                                              tmp_path, per_channel):
    X = mnist[2]
    expected = trained_cnn.predict(X)
    report = export_c(trained_cnn, tmp_path, name="cnn8", quantize="int8",
                      per_channel=per_channel, X_check=X)
    source = report.source.read_text()
    assert "static const int8_t Q0[200] = {" in source      # 5x5x1x8 conv weights
    assert report.table_bytes < export_c(trained_cnn, tmp_path / "f").table_bytes / 2.5
    probs, labels = compile_and_run(cc, report, X, tmp_path)
    c_agreement = (labels == expected).mean()       # 99.9% / 99.55% when written
    assert c_agreement >= 0.97 and report.agreement >= 0.97
    assert abs(c_agreement - report.agreement) <= 0.002
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(probs - trained_cnn.predict_proba(X)).mean() < 0.01


def test_networks_of_dense_layers_keep_their_buffers_on_the_stack(cc, mnist, tmp_path):
    net = Network([L.Input((784,)), L.Dense(30, activation="relu"), L.Dropout(0.5),
                   L.Dense(20, activation="sigmoid"), L.Dense(10)], seed=2)
    report = export_c(net, tmp_path, name="mlp")
    assert report.static_bytes == 0 and report.stack_bytes == 4 * (2 * 30 + 10)
    assert "static float" not in report.source.read_text()
    assert "several threads at once" in report.header.read_text()
    X = mnist[2][:200]
    probs, labels = compile_and_run(cc, report, X, tmp_path)
    np.testing.assert_array_equal(labels, net.predict(X))
    np.testing.assert_allclose(probs, net.predict_proba(X), rtol=0, atol=1e-5)


def test_regression_networks_are_refused(tmp_path):
    net = Network([4, 3, 2], seed=0, loss="squared_error")
    with pytest.raises(ValueError, match="classifiers"):
        export_c(net, tmp_path)
    assert not any(tmp_path.iterdir())


# ---- the files ---------------------------------------------------------------------------

def test_generated_code_is_self_contained(trained, tmp_path):
    report = export_c(trained, tmp_path / "new" / "folder", name="m8", quantize="int8")
    source, header = report.source.read_text(), report.header.read_text()
    includes = set(re.findall(r"#include\s+(\S+)", source + header))
    assert includes == {"<math.h>", "<stddef.h>", "<stdint.h>", '"m8.h"'}
    for word in ("malloc", "calloc", "free(", "cnn_core.h", "static float"):
        assert word not in source
    assert "int m8_predict(const float *x);" in header
    assert "int m8_predict_proba(const float *x, float *probs);" in header
    assert "#define M8_N_INPUTS 784" in header and "#define M8_N_CLASSES 10" in header


def test_files_are_complete_and_replace_older_ones(trained, tmp_path):
    (tmp_path / "cnn_model.c").write_text("old")
    report = export_c(trained, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn_model.c", "cnn_model.h"]
    assert report.source.read_text().rstrip().endswith("}")
    umask = os.umask(0o022)
    os.umask(umask)
    assert report.source.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("name", ["", "2fast", "my-model", "int", "a b", None])
def test_bad_names_are_refused(trained, tmp_path, name):
    with pytest.raises(ValueError, match="C identifier"):
        export_c(trained, tmp_path, name=name)
    assert not any(tmp_path.iterdir())


def test_bad_arguments_are_refused(trained, tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        export_c(trained, tmp_path, quantize="int4")
    with pytest.raises(TypeError, match="Network"):
        export_c(object(), tmp_path)
    with pytest.raises(ValueError, match="shape"):
        export_c(trained, tmp_path, X_check=np.zeros((3, 5), np.float32))
    broken = Network([4, 3, 2], seed=0)
    broken.weights[0][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        export_c(broken, tmp_path)
    assert not any(tmp_path.iterdir())
