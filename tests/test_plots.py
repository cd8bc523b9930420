"""Pictures (cnn_core.plotting, History.plot, cnn-core train/evaluate --plot): the file
is written as a real PNG of the expected size, and the figure has the axes, curves and
labels it should, from real MNIST training."""
import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")   # the optional extra cnn_core[plot]
from matplotlib.image import imread  # noqa: E402

from cnn_core import Network, cli  # noqa: E402
from cnn_core.plotting import confusion_matrix, plot_errors  # noqa: E402
from cnn_core.training import EarlyStopping  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def history(mnist):
    X, y, X_val, y_val = mnist
    net = Network([784, 32, 10], seed=0)
    return net.fit(X[:2000], y[:2000], epochs=6, learning_rate=0.6,
                   validation_data=(X_val[:500], y_val[:500]),
                   early_stopping=EarlyStopping(patience=100))


def test_history_plot(history, tmp_path):
    path = tmp_path / "curves.png"
    figure = history.plot(path, title="MNIST")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert imread(path).shape[:2] == (360, 1000)        # 10 x 3.6 inches at 100 dpi
    loss_ax, accuracy_ax = figure.axes
    assert (loss_ax.get_ylabel(), accuracy_ax.get_ylabel()) == ("loss", "accuracy")
    for ax, key in [(loss_ax, "loss"), (accuracy_ax, "accuracy")]:
        train, validation, best = ax.get_lines()
        np.testing.assert_array_equal(train.get_ydata(), history[key])
        np.testing.assert_array_equal(validation.get_ydata(), history["val_" + key])
        assert list(best.get_xdata()) == [history.best_epoch] * 2
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "train", "validation", f"best epoch ({history.best_epoch})"]


def test_history_plot_without_validation(mnist):
    X, y, _, _ = mnist
    history = Network([784, 8, 10], seed=0).fit(X[:500], y[:500], epochs=2)
    figure = history.plot()
    assert [len(ax.get_lines()) for ax in figure.axes] == [1, 1]


def test_regression_history_plot(mnist):
    X, y, X_val, y_val = mnist
    net = Network([784, 8, 1], seed=0, loss="squared_error")
    history = net.fit(X[:500], y[:500] / 9.0, epochs=3,
                      validation_data=(X_val[:100], y_val[:100] / 9.0))
    loss_ax, r2_ax = history.plot().axes
    assert r2_ax.get_ylabel() == "R\N{SUPERSCRIPT TWO}"
    assert [len(loss_ax.get_lines()), len(r2_ax.get_lines())] == [2, 1]
    np.testing.assert_array_equal(r2_ax.get_lines()[0].get_ydata(), history["val_r2"])


def test_errors_picture(trained, mnist, tmp_path):
    _, _, X_test, y_test = mnist
    X, y = X_test[:600], y_test[:600]
    path = tmp_path / "errors.png"
    figure = plot_errors(trained, X, y, path, n_images=9)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert imread(path).shape[:2] == (520, 1100)
    matrix_ax, *image_axes = figure.axes
    pred = trained.predict(X)
    expected = confusion_matrix(y, pred, 10)
    assert expected.sum() == 600 and np.trace(expected) == np.count_nonzero(pred == y)
    np.testing.assert_array_equal(matrix_ax.get_images()[0].get_array(), expected)
    assert (matrix_ax.get_xlabel(), matrix_ax.get_ylabel()) == ("predicted", "true")
    assert len(image_axes) == 9
    proba = trained.predict_proba(X)
    wrong = np.flatnonzero(pred != y)
    most_confident = wrong[np.argsort(-proba[wrong].max(axis=1), kind="stable")][:9]
    for ax, i in zip(image_axes, most_confident):
        assert ax.get_title().startswith(f"true {y[i]}, predicted {pred[i]}\n")
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), X[i].reshape(28, 28))


def test_errors_picture_of_an_estimator_names_its_classes(mnist, tmp_path):
    from cnn_core.sklearn import MLPClassifier
    X, y, X_test, y_test = mnist
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven",
                      "eight", "nine"])
    from sklearn.exceptions import ConvergenceWarning
    model = MLPClassifier((16,), max_iter=3, random_state=0)
    with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
        model.fit(X[:1000] / np.float32(255), names[y[:1000]])
    figure = plot_errors(model, X_test[:300], names[y_test[:300]], tmp_path / "e.png",
                         n_images=4)
    matrix_ax, *image_axes = figure.axes
    assert [t.get_text() for t in matrix_ax.get_xticklabels()] == sorted(names)
    pred = model.predict(X_test[:300])
    matrix = confusion_matrix(np.searchsorted(model.classes_, names[y_test[:300]]),
                              np.searchsorted(model.classes_, pred), 10)
    np.testing.assert_array_equal(matrix_ax.get_images()[0].get_array(), matrix)
    assert all(ax.get_title().split(",")[0].split()[1] in names for ax in image_axes)


def test_confusion_matrix_counts():
    matrix = confusion_matrix([0, 1, 1, 2, 2, 2], [0, 2, 1, 2, 0, 2], 3)
    np.testing.assert_array_equal(matrix, [[1, 0, 0], [0, 1, 1], [1, 0, 2]])


def test_errors_picture_refuses_non_square_rows(trained, mnist):
    _, _, X_test, y_test = mnist

    class Wide:
        def predict_proba(self, X):
            return trained.predict_proba(X[:, :784])

    with pytest.raises(ValueError, match="image_shape"):
        plot_errors(Wide(), np.hstack([X_test[:10], X_test[:10, :1]]), y_test[:10])


def test_cli_plots(mnist_split_dir, tmp_path, capsys):
    model, curves, errors = tmp_path / "m.cnn", tmp_path / "curves.png", tmp_path / "err.png"
    assert cli.main(["train", "--data", str(mnist_split_dir), "--hidden", "16",
                     "--epochs", "3", "--train-samples", "1000", "--schedule", "cosine",
                     "--validation-split", "0.2", "--early-stopping", "5",
                     "--plot", str(curves), "-o", str(model)]) == 0
    assert cli.main(["evaluate", str(model), "--data", str(mnist_split_dir),
                     "--plot", str(errors)]) == 0
    out = capsys.readouterr().out
    assert f"curves drawn to {curves}" in out and f"errors drawn to {errors}" in out
    assert imread(curves).shape[:2] == (360, 1000)
    assert imread(errors).shape[:2] == (520, 1100)
    # a picture that cannot be written is an error line, not a traceback
    assert cli.main(["evaluate", str(model), "--data", str(mnist_split_dir),
                     "--plot", str(tmp_path / "missing" / "e.png")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(mnist_split_dir), "--early-stopping", "3",
                     "--no-save"]) == 2
    assert "--early-stopping needs --validation-split" in capsys.readouterr().err
