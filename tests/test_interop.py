"""cnn_core.interop: networks exported to ONNX (multilayer perceptrons, CNNs, regression
networks) run in ONNX Runtime as they do in cnn_core; networks trained by scikit-learn and
PyTorch on real MNIST rows, imported, predict as their originals do, and go on through
the model file, the C API and export_c; what has no counterpart is refused by name."""
import importlib.util
import pickle
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier, MLPRegressor

from cnn_core import Network, kernels
from cnn_core import layers as L
from cnn_core.cli import main
from cnn_core.interop import IR_VERSION, OPSET, ConversionError


def _sibling(name):
    """A sibling test module, for its C build helpers (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_interop_{name}",
                                                  Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


embedding, export = _sibling("test_embedding"), _sibling("test_export")
c_compiler, predict_exe = embedding.c_compiler, embedding.predict_exe   # fixtures

# float32 rounding: different summation orders of the same float32 products
ATOL = 2e-6


def ort_session(path, n_threads=1):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = n_threads
    return onnxruntime.InferenceSession(str(path), options,
                                        providers=["CPUExecutionProvider"])


def ort_run(path, X, n_threads=1):
    """(labels, probabilities) of an ONNX file in ONNX Runtime."""
    labels, probs = ort_session(path, n_threads).run(["label", "probabilities"], {"input": X})
    return labels, probs


def assert_same_predictions(labels, probs, ref_labels, ref_probs):
    """Probabilities within float32 rounding; labels equal except on rows whose two best
    classes are within that rounding (a tie either side may break)."""
    np.testing.assert_allclose(probs, ref_probs, rtol=0, atol=ATOL)
    top2 = np.sort(ref_probs, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * ATOL
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(np.asarray(labels)[decided], np.asarray(ref_labels)[decided])


def short_fit(net, mnist, rows=2000):
    net.fit(mnist[0][:rows], mnist[1][:rows], epochs=1, batch_size=32, optimizer="adam",
            learning_rate=0.003)
    return net


# ---- ONNX export -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lenet(mnist):
    """layers.lenet5 (with Dropout) after one epoch on 1,000 real MNIST rows."""
    net = Network(L.lenet5(), seed=0)
    net.fit(mnist[0][:1000], mnist[1][:1000], epochs=1, batch_size=32, optimizer="adam",
            learning_rate=0.003)
    return net


def every_kind_cnn(seed=3):
    """A CNN with every layer kind and every activation: an even kernel with stride 2 and a
    rectangular kernel under 'same' padding (an extra row at the bottom), pooling with a
    stride other than its size, an activation on the logits."""
    return Network([L.Input((28, 28, 1)),
                    L.Conv2D(5, 4, stride=2, padding="same", activation="tanh"),
                    L.Conv2D(7, (4, 3), padding="same", activation="leaky_relu",
                             leaky_slope=0.2),
                    L.AvgPool2D(3, stride=2), L.Conv2D(4, 2, activation="sigmoid"),
                    L.MaxPool2D(2), L.Dropout(0.3), L.Flatten(),
                    L.Dense(20, activation="relu"), L.Dense(12),
                    L.Dense(10, activation="sigmoid")], seed=seed)


def without_dropout(stack):
    return [layer for layer in stack if not isinstance(layer, L.Dropout)]


def assert_same_network(net, back):
    """back has net's layers (Dropout left out: it does nothing at inference), parameters
    and predictions, bit for bit."""
    assert back.layers == without_dropout(net.layers) and back.loss == net.loss
    for W, W_back in zip(net.weights + net.biases, back.weights + back.biases):
        np.testing.assert_array_equal(W, W_back)


@pytest.mark.parametrize("activation", kernels.HIDDEN_ACTIVATIONS)
def test_onnx_runtime_predicts_like_the_network(mnist, tmp_path, activation):
    net = short_fit(Network([784, 48, 24, 10], activation, seed=4, leaky_slope=0.2), mnist)
    X = mnist[2]                                  # the 2,000 held-out rows, float32
    path = net.to_onnx(tmp_path / "net.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    labels, probs = ort_run(path, X)
    assert labels.dtype == np.int64 and probs.dtype == np.float32
    assert_same_predictions(labels, probs, net.predict(X), net.predict_proba(X))
    assert (labels == mnist[3]).mean() > 0.5      # it learned something


def test_onnx_runtime_predicts_like_a_cnn(lenet, mnist, tmp_path):
    X = mnist[2]
    path = lenet.to_onnx(tmp_path / "lenet.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    labels, probs = ort_run(path, X)
    assert_same_predictions(labels, probs, lenet.predict(X), lenet.predict_proba(X))
    assert (labels == mnist[3]).mean() > 0.7
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ["Reshape", "Transpose", "Conv", "Relu", "MaxPool", "Conv", "Relu",
                   "MaxPool", "Transpose", "Flatten", "Gemm", "Relu", "Gemm", "Relu", "Gemm",
                   "Softmax", "ArgMax"]


def test_onnx_cnn_of_every_layer_kind_and_activation(mnist, tmp_path):
    net = every_kind_cnn()
    X = mnist[2]
    path = net.to_onnx(tmp_path / "cnn.onnx")
    labels, probs = ort_run(path, X)
    assert_same_predictions(labels, probs, net.predict(X), net.predict_proba(X))
    pads = {n.name: list(n.attribute) for n in onnx.load(str(path)).graph.node
            if n.op_type == "Conv"}
    # (top, left, bottom, right): 4x4 stride 2 on 28 pads 1 all round; 4x3 on 14 pads the
    # extra row at the bottom
    assert [[a.ints for a in attrs if a.name == "pads"][0] for attrs in pads.values()] == \
        [[1, 1, 1, 1], [1, 1, 2, 1], [0, 0, 0, 0]]
    assert_same_network(net, Network.from_onnx(path))


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_onnx_batch_dimension_is_dynamic(trained, lenet, mnist, tmp_path, which):
    net = trained if which == "mlp" else lenet
    session = ort_session(net.to_onnx(tmp_path / "m.onnx"))
    for n in (1, 1000):
        X = mnist[2][:n]
        labels, probs = session.run(None, {"input": X})
        assert probs.shape == (n, 10) and labels.shape == (n,)
        assert_same_predictions(labels, probs, net.predict(X), net.predict_proba(X))


def test_onnx_graph_is_standard(trained, tmp_path):
    model = onnx.load(str(trained.to_onnx(tmp_path / "m.onnx")))
    assert model.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    [graph_input] = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "input" and dims[0].dim_param and dims[1].dim_value == 784
    assert [o.name for o in model.graph.output] == ["label", "probabilities"]
    assert {n.op_type for n in model.graph.node} == {"Gemm", "Relu", "Softmax", "ArgMax"}


@pytest.mark.parametrize("classes", [np.array([3, 1, 4, 15, 9, 26, 5, 35, 8, 97]),
                                     np.array(list("abcdefghij"))])
def test_onnx_label_output_maps_classes(trained, mnist, tmp_path, classes):
    X = mnist[2][:300]
    path = trained.to_onnx(tmp_path / "m.onnx", classes=classes)
    labels, _ = ort_run(path, X)
    np.testing.assert_array_equal(labels, classes[trained.predict(X)])
    back = Network.from_onnx(path)
    np.testing.assert_array_equal(back.classes_, classes)


def test_onnx_round_trip_gives_the_same_network(trained, lenet, mnist, tmp_path):
    back = Network.from_onnx(trained.to_onnx(tmp_path / "m.onnx"))
    assert back.layer_sizes == trained.layer_sizes and back.activation == trained.activation
    assert_same_network(trained, back)
    back = Network.from_onnx(lenet.to_onnx(tmp_path / "lenet.onnx"))
    assert_same_network(lenet, back)
    X = mnist[2][:500]
    np.testing.assert_array_equal(back.predict_proba(X), lenet.predict_proba(X))


def test_onnx_regression_network(mnist, tmp_path):
    """loss='squared_error' is written as a regressor: one output 'variable'."""
    net = Network([L.Input((28, 28, 1)), L.Conv2D(4, 3, stride=2, activation="relu"),
                   L.MaxPool2D(2), L.Flatten(), L.Dense(16, activation="tanh"), L.Dense(2)],
                  seed=5, loss="squared_error")
    targets = np.stack([mnist[1][:1000], mnist[0][:1000].mean(axis=1) / 255], axis=1)
    net.fit(mnist[0][:1000], targets, epochs=1, batch_size=32, optimizer="adam")
    path = net.to_onnx(tmp_path / "reg.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["variable"]
    X = mnist[2]
    [outputs] = ort_session(path).run(None, {"input": X})
    expected = net.predict(X)
    assert outputs.shape == (2000, 2)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    assert_same_network(net, Network.from_onnx(path))
    with pytest.raises(ValueError, match="classes label a classifier"):
        net.to_onnx(tmp_path / "c.onnx", classes=[1, 2])
    assert not (tmp_path / "c.onnx").exists()


def test_onnx_export_to_a_missing_folder(trained, lenet, tmp_path):
    for net in (trained, lenet):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            net.to_onnx(tmp_path / "absent" / "m.onnx")
    assert not (tmp_path / "absent").exists()


def test_onnx_export_refuses_classes_of_the_wrong_length(trained, tmp_path):
    with pytest.raises(ValueError, match="one label per class \\(10\\)"):
        trained.to_onnx(tmp_path / "m.onnx", classes=[0, 1])
    assert list(tmp_path.iterdir()) == []


# ---- ONNX import -------------------------------------------------------------------------

def save_graph(path, nodes, inits, inputs, outputs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(path))
    return path


def test_onnx_import_of_matmul_add_and_transposed_gemm(mnist, tmp_path):
    """The other common spellings of a dense layer: MatMul + Add (skl2onnx) and Gemm with
    transB=1 (torch.onnx), opening with a Flatten of (1, 28, 28) images."""
    rng = np.random.default_rng(0)
    W0, b0 = rng.standard_normal((784, 20)).astype(np.float32) * 0.05, rng.standard_normal(20)
    W1, b1 = rng.standard_normal((20, 10)).astype(np.float32), rng.standard_normal(10)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((W0, "W0"), (b0, "b0"), (W1.T.copy(), "W1t"), (b1, "b1"))]
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W0"], ["z0"]),
             helper.make_node("Add", ["z0", "b0"], ["a0"]),
             helper.make_node("Tanh", ["a0"], ["h0"]),
             helper.make_node("Gemm", ["h0", "W1t", "b1"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    path = save_graph(
        tmp_path / "foreign.onnx", nodes, inits,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 28, 28])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 10])])
    net = Network.from_onnx(path)
    assert net.layer_sizes == [784, 20, 10] and net.activation == "tanh"
    X = mnist[2][:500]
    [probs] = ort_session(path).run(None, {"x": X.reshape(-1, 1, 28, 28)})
    np.testing.assert_allclose(net.predict_proba(X), probs, rtol=0, atol=ATOL)


def foreign_cnn(conv_attributes=None, pool_attributes=None, rows_as=None):
    """The nodes and weights of a torch.onnx-style CNN on (batch, 1, 28, 28) images:
    Conv 5x5 pads 2, Relu, MaxPool 2, Conv 3x3 SAME_UPPER, LeakyRelu, Flatten of NCHW,
    Gemm transB=1, Softmax; with rows_as, the input is rows (batch, 784) reshaped to
    (batch, *rows_as)."""
    rng = np.random.default_rng(7)
    arrays = {"c0": rng.standard_normal((6, 1, 5, 5)) * 0.3, "cb0": rng.standard_normal(6),
              "c1": rng.standard_normal((3, 6, 3, 3)) * 0.2, "cb1": rng.standard_normal(3),
              "g": rng.standard_normal((10, 3 * 14 * 14)) * 0.1, "gb": rng.standard_normal(10)}
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "c0", "cb0"], ["y0"], name="conv0",
                              **(conv_attributes or {"pads": [2, 2, 2, 2]})),
             helper.make_node("Relu", ["y0"], ["r0"]),
             helper.make_node("MaxPool", ["r0"], ["p0"], name="pool",
                              **(pool_attributes or {"kernel_shape": [2, 2],
                                                     "strides": [2, 2]})),
             helper.make_node("Conv", ["p0", "c1", "cb1"], ["y1"], auto_pad="SAME_UPPER"),
             helper.make_node("LeakyRelu", ["y1"], ["r1"], alpha=0.3),
             helper.make_node("Flatten", ["r1"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "g", "gb"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph_input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])
    if rows_as:
        inits.append(numpy_helper.from_array(np.array([-1, *rows_as], np.int64), "shape"))
        nodes.insert(0, helper.make_node("Reshape", ["rows", "shape"], ["x"], name="reshape"))
        graph_input = helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", 784])
    return (nodes, inits, [graph_input],
            [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 10])])


@pytest.mark.parametrize("rows", [False, True])
def test_onnx_import_of_a_channels_first_cnn(mnist, tmp_path, rows):
    """An NCHW graph (taking images, or rows reshaped to one channel): the network takes
    the same images channels-last, and the Gemm after the Flatten of 3 channels has its
    rows reordered."""
    path = save_graph(tmp_path / "cnn.onnx", *foreign_cnn(rows_as=(1, 28, 28) if rows
                                                          else None))
    net = Network.from_onnx(path)
    assert net.layers == [L.Input((28, 28, 1)), L.Conv2D(6, 5, padding="same",
                                                         activation="relu"),
                          L.MaxPool2D(2), L.Conv2D(3, 3, padding="same",
                                                   activation="leaky_relu", leaky_slope=0.3),
                          L.Flatten(), L.Dense(10)]
    X = mnist[2]
    feed = {"rows": X} if rows else {"x": X.reshape(-1, 1, 28, 28)}
    [probs] = ort_session(path).run(None, feed)
    assert_same_predictions(net.predict(X), net.predict_proba(X), probs.argmax(axis=1), probs)


def test_onnx_import_refuses_rows_read_channels_first(tmp_path):
    """Rows reshaped to (4, 14, 14) hold the channels first; cnn_core's rows hold them
    last, so the network could not take the same rows."""
    nodes, inits, inputs, outputs = foreign_cnn(rows_as=(4, 14, 14))
    path = save_graph(tmp_path / "cnn.onnx", nodes, inits, inputs, outputs)
    with pytest.raises(ConversionError, match="read as 4 channels of 14x14"):
        Network.from_onnx(path)


@pytest.mark.parametrize("conv, pool, message", [
    ({"pads": [1, 1, 1, 1]}, None, r"'conv0' \(Conv\) pads .* \(1, 1, 1, 1\); .*'same', "
                                   r"\(2, 2, 2, 2\)"),
    ({"pads": [2, 2, 2, 2], "group": 1, "dilations": [2, 2]}, None, "dilations"),
    (None, {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1]},
     r"'pool' \(MaxPool\).*it pads its input"),
    (None, {"kernel_shape": [2, 3]}, "not square"),
    (None, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, "ceil_mode")])
def test_onnx_import_refuses_convolutions_it_cannot_express(tmp_path, conv, pool, message):
    path = save_graph(tmp_path / "cnn.onnx", *foreign_cnn(conv, pool))
    with pytest.raises(ConversionError, match=message):
        Network.from_onnx(path)


def test_onnx_import_refuses_unknown_nodes(tmp_path):
    path = save_graph(tmp_path / "abs.onnx",
                      [helper.make_node("Abs", ["x"], ["y"], name="magnitude")], [],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    with pytest.raises(ConversionError, match="'magnitude' \\(Abs\\).*no counterpart"):
        Network.from_onnx(path)


# ---- scikit-learn ------------------------------------------------------------------------

def fit_sklearn(X, y, estimator=MLPClassifier, **options):
    """A short fit (6 epochs), its convergence warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator(max_iter=6, learning_rate_init=0.005, random_state=0,
                         **options).fit(X, y)


def c_api_and_export_c_agree(net, X, tmp_path, exe, cc):
    """net saved, loaded back, run by the C API and by export_c's C: all predict as net."""
    path = tmp_path / "net.cnn"
    net.save(path)
    loaded = Network.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X), net.predict_proba(X))
    probs, labels = embedding.c_predict(exe, path, X, tmp_path)
    np.testing.assert_array_equal(labels, net.predict(X))
    np.testing.assert_array_equal(probs, net.predict_proba(X))
    report = net.export_c(tmp_path / "c", name="imported")
    probs, labels = export.compile_and_run(cc, report, X, tmp_path)
    assert_same_predictions(labels, probs, net.predict(X), net.predict_proba(X))


@pytest.fixture(scope="module")
def sklearn_mlps(mnist):
    """MLPClassifiers trained briefly on 1,500 real MNIST rows, one per activation."""
    X = (mnist[0][:1500] / np.float32(255)).astype(np.float32)
    return {activation: fit_sklearn(X, mnist[1][:1500], hidden_layer_sizes=(40, 20),
                                    activation=activation)
            for activation in ("relu", "logistic", "tanh", "identity")}


@pytest.mark.parametrize("activation", ["relu", "logistic", "tanh", "identity"])
def test_sklearn_classifier_imports_exactly(sklearn_mlps, mnist, activation):
    mlp = sklearn_mlps[activation]
    net = Network.from_sklearn(mlp)
    assert net.layer_sizes == [784, 40, 20, 10]
    X = mnist[2]
    assert_same_predictions(net.classes_[net.predict(X)], net.predict_proba(X),
                            mlp.predict(X), mlp.predict_proba(X))
    assert (mlp.predict(X) == mnist[3]).mean() > 0.6


def test_sklearn_import_runs_in_c(sklearn_mlps, mnist, tmp_path, predict_exe, c_compiler):
    c_api_and_export_c_agree(Network.from_sklearn(sklearn_mlps["tanh"]), mnist[2][:500],
                             tmp_path, predict_exe, c_compiler)


def test_sklearn_binary_classifier_with_string_labels(mnist, tmp_path, predict_exe,
                                                      c_compiler):
    X_all, y_all = mnist[0][:4000], mnist[1][:4000]
    keep = (y_all == 3) | (y_all == 8)
    names = np.where(y_all[keep] == 3, "three", "eight")
    mlp = fit_sklearn((X_all[keep] / np.float32(255)).astype(np.float32), names,
                      hidden_layer_sizes=(16,))
    assert mlp.out_activation_ == "logistic" and mlp.n_outputs_ == 1
    net = Network.from_sklearn(mlp)
    assert net.layer_sizes == [784, 16, 2]
    np.testing.assert_array_equal(net.classes_, ["eight", "three"])
    X = mnist[2]
    assert_same_predictions(net.classes_[net.predict(X)], net.predict_proba(X),
                            mlp.predict(X), mlp.predict_proba(X))
    labels, probs = ort_run(net.to_onnx(tmp_path / "b.onnx"), X)
    assert labels.dtype == object
    assert_same_predictions(labels, probs, mlp.predict(X), mlp.predict_proba(X))
    c_api_and_export_c_agree(net, X[:300], tmp_path, predict_exe, c_compiler)


def test_sklearn_regressor_imports_exactly(mnist, tmp_path):
    """An MLPRegressor (two targets: the digit and the ink) becomes a squared-error
    network, and goes on to ONNX as a regressor."""
    X = (mnist[0][:1500] / np.float32(255)).astype(np.float32)
    targets = np.stack([mnist[1][:1500], X.mean(axis=1) * 10], axis=1)
    mlp = fit_sklearn(X, targets, MLPRegressor, hidden_layer_sizes=(32, 16),
                      activation="tanh")
    net = Network.from_sklearn(mlp)
    assert net.loss == "squared_error" and net.layer_sizes == [784, 32, 16, 2]
    X_test = mnist[2]
    expected = mlp.predict(X_test)
    np.testing.assert_allclose(net.predict(X_test), expected, rtol=1e-5, atol=1e-5)
    [outputs] = ort_session(net.to_onnx(tmp_path / "reg.onnx")).run(None, {"input": X_test})
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def test_sklearn_refuses_what_it_cannot_convert(mnist):
    X, y = (mnist[0][:300] / np.float32(255)).astype(np.float32), mnist[1][:300]
    with pytest.raises(NotFittedError, match="MLPClassifier is not fitted yet"):
        Network.from_sklearn(MLPClassifier())
    with pytest.raises(NotFittedError, match="MLPRegressor is not fitted yet"):
        Network.from_sklearn(MLPRegressor())
    with pytest.raises(TypeError, match="MLPClassifier or MLPRegressor, got "
                                        ".*LogisticRegression"):
        Network.from_sklearn(LogisticRegression(max_iter=5).fit(X[:, :20], y))
    multilabel = np.stack([y % 2, y > 4], axis=1).astype(int)
    with pytest.raises(ConversionError, match="multilabel"):
        Network.from_sklearn(fit_sklearn(X, multilabel))


# ---- PyTorch -----------------------------------------------------------------------------

def train_torch(model, X, y, steps=150, learning_rate=1e-3):
    """A short Adam training of `model` on float32 rows X (n, ...) and labels y."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # small batches: a second thread only waits
    X_t, y_t = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    for step in range(steps):
        idx = torch.randint(0, len(X_t), (64,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(X_t[idx]), y_t[idx]).backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


def torch_predictions(model, X):
    with torch.no_grad():
        out = model(torch.from_numpy(X))
    probs = torch.softmax(out, dim=1).numpy()
    return probs.argmax(axis=1), probs


def test_torch_sequential_imports_exactly(mnist, tmp_path, predict_exe, c_compiler):
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Dropout(0.2),
                          nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10))
    X_train = (mnist[0][:4000] / np.float32(255)).astype(np.float32).reshape(-1, 1, 28, 28)
    train_torch(model, X_train, mnist[1][:4000])
    net = Network.from_torch(model, (1, 28, 28))
    assert net.layer_sizes == [784, 64, 32, 10] and net.activation == "relu"
    X = mnist[2]
    labels, probs = torch_predictions(model, X.reshape(-1, 1, 28, 28))
    assert_same_predictions(net.predict(X), net.predict_proba(X), labels, probs)
    assert (labels == mnist[3]).mean() > 0.8
    c_api_and_export_c_agree(net, X[:500], tmp_path, predict_exe, c_compiler)


@pytest.mark.parametrize("activation", [torch.nn.Tanh(), torch.nn.Sigmoid(),
                                        torch.nn.LeakyReLU(0.1), torch.nn.Identity()])
def test_torch_activations_and_a_final_softmax(mnist, activation):
    torch.manual_seed(1)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(784, 32), activation, nn.Linear(32, 10),
                          nn.LogSoftmax(dim=1)).eval()
    net = Network.from_torch(model, (784,))
    X = mnist[2]
    with torch.no_grad():
        probs = model(torch.from_numpy(X)).exp().numpy()
    assert_same_predictions(net.predict(X), net.predict_proba(X), probs.argmax(axis=1), probs)


def test_torch_mixed_activations_one_per_layer(mnist):
    """Each Linear keeps its own activation, the last one too (before the softmax)."""
    torch.manual_seed(4)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Dropout(0.5), nn.Identity(),
                          nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 16),
                          nn.Linear(16, 10), nn.Sigmoid()).eval()
    net = Network.from_torch(model, (784,))
    assert net.layers == [L.Input((784,)), L.Dense(32, "relu"), L.Dense(16, "tanh"),
                          L.Dense(16), L.Dense(10, "sigmoid")]
    X = mnist[2]
    labels, probs = torch_predictions(model, X)
    assert_same_predictions(net.predict(X), net.predict_proba(X), labels, probs)


def test_torch_cnn_imports_exactly(mnist, tmp_path):
    """A CNN of every module kind, trained briefly on real rows: 'same' padding given as a
    number and as 'same' with an even kernel (extra row and column at the bottom and
    right), activations after max pooling (moved before it), a Flatten of 8 channels
    (the next Linear's rows reordered); then on to ONNX Runtime."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
                          nn.Conv2d(6, 8, 4, padding="same"), nn.Tanh(), nn.AvgPool2d(2),
                          nn.Conv2d(8, 8, 3, stride=2), nn.MaxPool2d(2, stride=1),
                          nn.LeakyReLU(0.1), nn.Dropout(0.2), nn.Flatten(),
                          nn.Linear(8 * 2 * 2, 32), nn.Sigmoid(), nn.Linear(32, 10))
    X_train = (mnist[0][:4000] / np.float32(255)).astype(np.float32).reshape(-1, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # torch: 'same' with an even kernel
        train_torch(model, X_train, mnist[1][:4000], steps=100, learning_rate=5e-3)
        X = mnist[2]
        labels, probs = torch_predictions(model, X.reshape(-1, 1, 28, 28))
    net = Network.from_torch(model, (1, 28, 28))
    assert net.layers == [
        L.Input((28, 28, 1)), L.Conv2D(6, 5, padding="same", activation="relu"),
        L.MaxPool2D(2), L.Conv2D(8, 4, padding="same", activation="tanh"), L.AvgPool2D(2),
        L.Conv2D(8, 3, stride=2, activation="leaky_relu", leaky_slope=0.1),
        L.MaxPool2D(2, stride=1), L.Flatten(), L.Dense(32, "sigmoid"), L.Dense(10)]
    assert_same_predictions(net.predict(X), net.predict_proba(X), labels, probs)
    assert (labels == mnist[3]).mean() > 0.5
    onnx_labels, onnx_probs = ort_run(net.to_onnx(tmp_path / "cnn.onnx"), X)
    assert_same_predictions(onnx_labels, onnx_probs, labels, probs)


def test_torch_flatten_of_channels_first_samples(mnist):
    """torch flattens (C, H, W), cnn_core takes rows of (H, W, C): the first Linear's
    weights are reordered; real MNIST pixels read as 4 channels of 14x14."""
    torch.manual_seed(2)
    nn = torch.nn
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    net = Network.from_torch(model, (4, 14, 14))
    assert net.layer_sizes == [784, 10]
    X_nchw = mnist[2][:400].reshape(-1, 4, 14, 14)
    labels, probs = torch_predictions(model, X_nchw)
    X_nhwc = np.ascontiguousarray(X_nchw.transpose(0, 2, 3, 1)).reshape(len(X_nchw), -1)
    assert_same_predictions(net.predict(X_nhwc), net.predict_proba(X_nhwc), labels, probs)


@pytest.mark.parametrize("model, message", [
    (lambda nn: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)),
     r"module 1 \(BatchNorm1d.*no counterpart for BatchNorm1d"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(),
                              nn.Linear(200, 2)),
     r"module 1 \(BatchNorm2d.*no counterpart for BatchNorm2d"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), nn.Flatten(),
                              nn.Linear(128, 2)), r"module 0 \(Conv2d.*dilation=\(2, 2\)"),
    (lambda nn: nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(),
                              nn.Linear(200, 2)), r"module 0 .*groups=2"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 5, padding=1), nn.Flatten(),
                              nn.Linear(200, 2)),
     r"module 0 .*pads .* \(1, 1, 1, 1\); .*'same', \(2, 2, 2, 2\)"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Flatten(),
                              nn.Linear(72, 2)), r"\(0, 1, 0, 1\) on this 12x12 input"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
                              nn.Flatten(), nn.Linear(288, 2)), "padding_mode='reflect'"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, ceil_mode=True),
                              nn.Flatten(), nn.Linear(50, 2)), "ceil_mode=True"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2, padding=1),
                              nn.Flatten(), nn.Linear(72, 2)), "padding=1"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), nn.ReLU(),
                              nn.Flatten(), nn.Linear(50, 2)),
     r"module 2 \(ReLU\(\)\) applies relu after average pooling \(module 1"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Tanh(), nn.Flatten(),
                              nn.Linear(200, 2)),
     r"module 2 \(Tanh\(\)\) applies tanh after relu"),
    (lambda nn: nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(144, 2)),
     r"module 1 \(ReLU\(\)\) applies relu to the input"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(10, 2)),
     r"module 1 \(Linear.*needs a flat input.*Flatten"),
    (lambda nn: nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(200, 2)),
     r"module 0 .*takes 3 channels .* images of 12x12x1"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(100, 2)),
     "takes 100 features, but gets 200"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(-0.5), nn.Flatten(),
                              nn.Linear(200, 2)), "leaky_slope must be a number in"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()),
     r"Sequential of 2 modules has no dense \(linear\) layer"),
    (lambda nn: nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(2, 2)), "no counterpart for AdaptiveAvgPool2d")])
def test_torch_refuses_what_it_cannot_convert(model, message):
    with pytest.raises(ConversionError, match=message):
        Network.from_torch(model(torch.nn), (1, 12, 12))


def test_torch_refuses_what_it_is_not_given():
    nn = torch.nn
    with pytest.raises(TypeError, match="nn.Sequential, got torch.nn.modules.linear.Linear"):
        Network.from_torch(nn.Linear(4, 3), (4,))
    with pytest.raises(ConversionError, match="takes 5 features, but gets 4"):
        Network.from_torch(nn.Sequential(nn.Linear(5, 3)), (4,))
    with pytest.raises(ValueError, match="input_shape"):
        Network.from_torch(nn.Sequential(nn.Linear(4, 3)), (0,))


# ---- cnn-core convert --------------------------------------------------------------------

def test_cli_converts_model_files_and_onnx(trained, mnist, mnist_split_dir, tmp_path,
                                           capsys):
    trained.save(tmp_path / "m.cnn")
    assert main(["convert", str(tmp_path / "m.cnn"), str(tmp_path / "m.onnx")]) == 0
    assert main(["convert", str(tmp_path / "m.onnx"), str(tmp_path / "back.cnn")]) == 0
    assert "m.onnx" in capsys.readouterr().out
    X = mnist[2]
    labels, probs = ort_run(tmp_path / "m.onnx", X)
    assert_same_predictions(labels, probs, trained.predict(X), trained.predict_proba(X))
    assert (tmp_path / "back.cnn").read_bytes() == (tmp_path / "m.cnn").read_bytes()
    # evaluate and info read ONNX files too, with the same results as the model file
    for name in ("m.cnn", "m.onnx"):
        assert main(["info", str(tmp_path / name)]) == 0
        assert main(["evaluate", str(tmp_path / name), "--data", str(mnist_split_dir)]) == 0
    cnn_info, cnn_eval, onnx_info, onnx_eval = capsys.readouterr().out.split("model ")[1:]
    assert cnn_info.replace("m.cnn", "m.onnx") == onnx_info
    assert cnn_eval.replace("m.cnn", "m.onnx") == onnx_eval
    assert "test accuracy" in onnx_eval


def test_cli_converts_cnn_model_files_and_onnx(lenet, mnist, tmp_path, capsys):
    """A convolutional classifier and regression network: .cnn -> .onnx -> .cnn."""
    X = mnist[2]
    plain = Network(without_dropout(L.lenet5()), seed=1)
    regression = Network([L.Input((28, 28, 1)), L.Conv2D(3, 5, stride=2, padding="same",
                                                         activation="tanh"),
                          L.AvgPool2D(2), L.Flatten(), L.Dense(3)], seed=2,
                         loss="squared_error")
    for name, net in (("lenet", lenet), ("plain", plain), ("regression", regression)):
        net.save(tmp_path / f"{name}.cnn")
        assert main(["convert", str(tmp_path / f"{name}.cnn"),
                     str(tmp_path / f"{name}.onnx")]) == 0
        assert main(["convert", str(tmp_path / f"{name}.onnx"),
                     str(tmp_path / f"{name}_back.cnn")]) == 0
        back = Network.load(tmp_path / f"{name}_back.cnn")
        assert_same_network(net, back)
        if net.loss == "squared_error":
            [outputs] = ort_session(tmp_path / f"{name}.onnx").run(None, {"input": X})
            np.testing.assert_allclose(outputs, net.predict(X), rtol=1e-5, atol=1e-5)
        else:
            labels, probs = ort_run(tmp_path / f"{name}.onnx", X)
            assert_same_predictions(labels, probs, net.predict(X), net.predict_proba(X))
    out = capsys.readouterr().out
    assert "outputs 'label', 'probabilities'" in out and "outputs 'variable'" in out
    assert (tmp_path / "plain_back.cnn").read_bytes() == (tmp_path / "plain.cnn").read_bytes()


def test_cli_reads_sklearn_pickles_only_when_told(mnist, tmp_path, capsys):
    X, y = (mnist[0][:500] / np.float32(255)).astype(np.float32), mnist[1][:500]
    mlp = fit_sklearn(X, y, hidden_layer_sizes=(8,))
    source = tmp_path / "mlp.pkl"
    source.write_bytes(pickle.dumps(mlp))
    target = tmp_path / "mlp.cnn"
    assert main(["convert", str(source), str(target)]) == 2
    assert "--unsafe-pickle" in capsys.readouterr().err and not target.exists()
    assert main(["convert", "--unsafe-pickle", str(source), str(target)]) == 0
    np.testing.assert_array_equal(Network.load(target).predict(mnist[2]),
                                  Network.from_sklearn(mlp).predict(mnist[2]))


def test_cli_convert_errors(trained, tmp_path, capsys):
    trained.save(tmp_path / "m.cnn")
    cases = [([str(tmp_path / "m.cnn"), str(tmp_path / "absent" / "m.onnx")], "does not exist"),
             ([str(tmp_path / "none.cnn"), str(tmp_path / "m.onnx")], "does not exist"),
             ([str(tmp_path / "m.cnn"), str(tmp_path / "m.txt")], "m.txt")]
    for args, message in cases:
        assert main(["convert", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cnn-core: error:") and message in err, err
