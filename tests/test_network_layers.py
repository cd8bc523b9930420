"""Network over a stack of cnn_core.layers: the MLP shorthand is one case of it, image
inputs in every accepted shape, clear errors for bad stacks, a regression loss, the
README's convolutional network on real MNIST, and the CLI's --model cnn."""
import numpy as np
import pytest

from cnn_core import Network, cli, layers as L
from cnn_core.layers import LayerError


def small_cnn(dropout=0.0):
    return ([L.Input((28, 28, 1)), L.Conv2D(4, 5, stride=2, activation="relu"),
             L.MaxPool2D(2), L.Conv2D(6, 3, padding="same", activation="tanh"),
             L.AvgPool2D(2, stride=1), L.Flatten(), L.Dense(16, activation="leaky_relu")]
            + ([L.Dropout(dropout)] if dropout else []) + [L.Dense(10)])


def test_shorthand_is_a_stack_of_dense_layers(mnist):
    X, y = mnist[0][:600], mnist[1][:600]
    short = Network([784, 32, 16, 10], "tanh", seed=3)
    stack = Network(L.mlp([784, 32, 16, 10], "tanh"), seed=3)
    assert short.layers == stack.layers
    assert short.layer_sizes == stack.layer_sizes == [784, 32, 16, 10]
    assert short.activation == stack.activation == "tanh"
    for a, b in zip(short.weights + short.biases, stack.weights + stack.biases):
        np.testing.assert_array_equal(a, b)
    short.fit(X, y, epochs=1)
    stack.fit(X, y, epochs=1)
    np.testing.assert_array_equal(short.predict_proba(X), stack.predict_proba(X))


def test_stack_attributes_and_summary():
    net = Network(L.lenet5(), seed=0)
    assert net.input_shape == (28, 28, 1) and net.n_features == 784
    assert net.n_outputs == net.n_classes == 10
    assert net.layer_sizes is None and net.activation is None
    assert [w.shape for w in net.weights] == [(5, 5, 1, 6), (5, 5, 6, 16), (400, 120),
                                              (120, 84), (84, 10)]
    assert [b.shape for b in net.biases] == [(6,), (16,), (120,), (84,), (10,)]
    count = sum(w.size + b.size for w, b in zip(net.weights, net.biases))
    assert count == 61706 == net._params.shape[0]
    text = net.summary()
    for fragment in ("Conv2D(6, 5, padding='same', activation='relu')", "28x28x6",
                     "10x10x16", "5x5x16", "48,120", "61,706 parameters"):
        assert fragment in text
    assert "Dropout(0.25)" in repr(net) and "61,706 parameters" in repr(net)
    # weights are views of the trained vector
    net.weights[0][0, 0, 0, 0] = 7.0
    assert net._params[0] == 7.0


def test_every_image_shape_gives_the_same_predictions(mnist):
    X = mnist[0][:50]
    net = Network(small_cnn(), seed=1)
    expected = net.predict_proba(X)
    for shaped in (X.reshape(-1, 28, 28), X.reshape(-1, 28, 28, 1),
                   X.reshape(-1, 28, 28, 1).astype(np.float32) / 255):
        np.testing.assert_allclose(net.predict_proba(shaped), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(net.predict(X.reshape(-1, 28, 28)), net.predict(X))
    with pytest.raises(ValueError, match=r"\(n_samples, 28, 28, 1\)"):
        net.predict(X.reshape(-1, 28, 28, 1)[:, :27, :27])


@pytest.mark.parametrize("stack, fragment", [
    ([L.Input((5, 5, 1)), L.Conv2D(2, 7), L.Flatten(), L.Dense(3)],
     r"layer 1, Conv2D\(2, 7\): kernel 7x7 is larger than its input 5x5x1"),
    ([L.Input((28, 28, 1)), L.Dense(10)],
     r"layer 1, Dense\(10\): needs a flat input, got an image of 28x28x1; put Flatten"),
    ([L.Input((8, 8, 3)), L.MaxPool2D(3), L.MaxPool2D(3), L.Flatten(), L.Dense(2)],
     r"layer 2, MaxPool2D\(3\): window 3x3 is larger than its input 2x2x3"),
    ([L.Input((784,)), L.Conv2D(2, 3), L.Dense(2)], r"layer 1, Conv2D.*needs an image input"),
    ([L.Input((10,)), L.Dense(4), L.Flatten()], r"last layer .* must be Dense"),
])
def test_bad_stacks_name_the_layer_and_shapes(stack, fragment):
    with pytest.raises(LayerError, match=fragment):
        Network(stack)


def test_bad_arguments_are_refused_before_training(mnist):
    with pytest.raises(ValueError, match="Dropout rate must be a number in"):
        L.Dropout(-0.1)
    with pytest.raises(ValueError, match="activation and leaky_slope apply to the layer-size"):
        Network(small_cnn(), "tanh")
    with pytest.raises(TypeError, match="mixes layer sizes"):
        Network([L.Input((4,)), 3])
    with pytest.raises(ValueError, match="loss must be one of"):
        Network([4, 2], loss="hinge")
    net = Network(small_cnn(), seed=0)
    before = net._params.copy()
    with pytest.raises(ValueError, match=r"X must have shape \(n_samples, 784\)"):
        net.fit(np.zeros((10, 30, 30), np.uint8), np.zeros(10, np.int64))
    with pytest.raises(ValueError, match=r"X must have shape \(n_samples, 784\)"):
        net.fit(np.zeros((10, 100), np.uint8), np.zeros(10, np.int64))
    np.testing.assert_array_equal(net._params, before)


def test_dropout_acts_only_in_fit_and_does_not_depend_on_threads(mnist):
    X, y = mnist[0][:300], mnist[1][:300]
    with_dropout = Network(small_cnn(0.5), seed=2)
    without = Network(small_cnn(), seed=2)
    np.testing.assert_array_equal(with_dropout._params, without._params)
    # inference: dropout is the identity
    np.testing.assert_array_equal(with_dropout.predict_proba(X), without.predict_proba(X))
    runs = []
    for threads in (1, 2, 3):
        net = Network(small_cnn(0.5), seed=2)
        net.fit(X, y, epochs=2, batch_size=32, n_threads=threads)
        runs.append(net._params.copy())
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)
    plain = Network(small_cnn(), seed=2)
    plain.fit(X, y, epochs=2, batch_size=32)
    assert not np.array_equal(runs[0], plain._params)   # the masks did act in fit


def test_regression_loss_learns_a_real_target(mnist):
    """Predict the mean brightness of the image's top half from its pixels (a real,
    learnable target); R^2 on held-out rows is reported by evaluate."""
    X, _, X_test, _ = mnist
    X = X[:3000].astype(np.float32) / 255
    target = lambda A: np.stack([A[:, :392].mean(1), A[:, 392:].mean(1)], 1) * 4
    net = Network([784, 32, 2], loss="squared_error", seed=0)
    assert net.n_classes is None and net.n_outputs == 2
    history = net.fit(X, target(X), epochs=5, learning_rate=0.01)
    assert history["loss"][-1] < history["loss"][0]
    predicted = net.predict(X_test)
    assert predicted.shape == (len(X_test), 2) and predicted.dtype == np.float32
    loss, r2 = net.evaluate(X_test, target(X_test))
    assert r2 > 0.8, r2
    residual = ((predicted - target(X_test)) ** 2).sum(0)
    total = ((target(X_test) - target(X_test).mean(0)) ** 2).sum(0)
    assert abs(r2 - float(np.mean(1 - residual / total))) < 1e-5
    with pytest.raises(TypeError, match="predict_proba needs a classifier"):
        net.predict_proba(X_test)


def test_readme_cnn_reaches_98_percent_on_real_mnist(mnist_split):
    """The README's network and settings: lenet5() (dropout 0.25), SGD momentum 0.9,
    learning rate 0.02, batch 64, 10 epochs on the 8,000 training images; accuracy on the
    2,000 held-out images after the last epoch."""
    (X, y), (X_test, y_test) = mnist_split
    net = Network(L.lenet5(), seed=0)
    net.fit(X.reshape(-1, 28, 28), y, epochs=10, learning_rate=0.02)
    _, accuracy = net.evaluate(X_test.reshape(-1, 28, 28, 1), y_test)
    assert accuracy >= 0.98, accuracy


def test_cli_trains_the_cnn(mnist_split_dir, capsys):
    code = cli.main(["train", "--model", "cnn", "--data", str(mnist_split_dir), "--epochs",
                     "1", "--train-samples", "500", "--no-save", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Conv2D-MaxPool2D-Conv2D-MaxPool2D-Flatten-Dense-Dense-Dropout-Dense" in out
    assert "learning rate 0.02" in out
    code = cli.main(["train", "--model", "cnn", "--hidden", "64", "--data",
                     str(mnist_split_dir), "--no-save"])
    assert code == 2
    assert "--hidden and --activation describe the mlp" in capsys.readouterr().err


def test_cli_info_shows_a_models_layers(trained, tmp_path, capsys):
    trained.save(tmp_path / "m.cnn")
    assert cli.main(["info", str(tmp_path / "m.cnn")]) == 0
    out = capsys.readouterr().out
    assert "Dense(64, activation='relu')" in out and "50,890 parameters" in out
    assert cli.main(["info", str(tmp_path / "missing.cnn")]) == 2
    assert "does not exist" in capsys.readouterr().err
