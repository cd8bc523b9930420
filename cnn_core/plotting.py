"""Pictures of training and of errors, drawn with matplotlib (the optional extra
``pip install cnn_core[plot]``).

Figures are made with ``matplotlib.figure.Figure`` directly, never through pyplot, so
they need no display, keep no global state and are safe from any thread; each function
returns its Figure and writes it to `path` (the format from the suffix: .png, .svg,
.pdf) when one is given.
"""
import math

import numpy as np

__all__ = ["plot_history", "plot_errors", "confusion_matrix"]


def _figure(**options):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'cnn_core[plot]'") from None
    return Figure(**options)


def _save(figure, path):
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure


def plot_history(history, path=None, *, title=None):
    """Loss curves (and accuracy curves where the records have them) of training and
    validation over the epochs of a History (or a list of its records); the epoch that
    early stopping kept is marked."""
    records = history.records if hasattr(history, "records") else list(history)
    if not records:
        raise ValueError("the history has no epochs to plot")
    epochs = [r["epoch"] for r in records]
    panels = [("loss", "loss")]
    if "accuracy" in records[0]:
        panels.append(("accuracy", "accuracy"))
    elif "val_r2" in records[0]:
        panels.append(("r2", "R\N{SUPERSCRIPT TWO}"))
    figure = _figure(figsize=(5 * len(panels), 3.6), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    best = getattr(history, "best_epoch", None)
    for ax, (key, label) in zip(axes, panels):
        if key in records[0]:
            ax.plot(epochs, [r[key] for r in records], marker=".", label="train")
        if f"val_{key}" in records[0]:
            ax.plot(epochs, [r[f"val_{key}"] for r in records], marker=".",
                    label="validation")
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", label=f"best epoch ({best})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def confusion_matrix(y_true, y_pred, n_classes):
    """Counts (n_classes, n_classes): row = true class, column = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred,
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def plot_errors(model, X, y, path=None, *, n_images=16, image_shape=None, class_names=None,
                title=None):
    """The confusion matrix of `model` on (X, y) beside a grid of the `n_images` most
    confidently misclassified rows of X drawn as images, each titled with its true and
    predicted label and the predicted probability.

    model : anything with ``predict_proba(X)`` giving (n, n_classes) probabilities whose
        columns are the labels 0..n_classes-1 (a Network, or a cnn_core.sklearn
        classifier, whose ``classes_`` name the columns).
    image_shape : (height, width) of a row of X (default: square, as 28 x 28 for MNIST;
        an (h, w, c) row is shown through its first channel).
    class_names : names of the classes (default: the model's ``classes_``, or 0..C-1).
    """
    X = np.asarray(X)
    proba = np.asarray(model.predict_proba(X))
    n_classes = proba.shape[1]
    if class_names is None:
        class_names = getattr(model, "classes_", None)
    if class_names is None:
        class_names = list(range(n_classes))
    class_names = [str(c) for c in class_names]
    if len(class_names) != n_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {n_classes} classes")
    y = np.asarray(y)
    if hasattr(model, "classes_"):      # labels -> column indices
        index = {c: i for i, c in enumerate(np.asarray(model.classes_).tolist())}
        try:
            y = np.array([index[v] for v in y.tolist()], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"y has a label {exc.args[0]!r} the model does not know") from None
    y = y.astype(np.int64)
    if y.shape != (X.shape[0],) or (y.size and not 0 <= y.min() <= y.max() < n_classes):
        raise ValueError(f"y must be {X.shape[0]} labels in [0, {n_classes}), got shape "
                         f"{y.shape}")
    pred = proba.argmax(axis=1)
    matrix = confusion_matrix(y, pred, n_classes)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:n_images]
    if image_shape is None:
        side = math.isqrt(X[0].size)
        if side * side != X[0].size:
            raise ValueError(f"rows of {X[0].size} values are not square images; pass "
                             f"image_shape=(height, width)")
        image_shape = (side, side)
    image_shape = tuple(image_shape)

    cols = max(1, math.ceil(math.sqrt(max(len(wrong), 1))))
    rows = max(1, math.ceil(len(wrong) / cols))
    figure = _figure(figsize=(11, 5.2), layout="constrained")
    left, right = figure.subfigures(1, 2, width_ratios=[1, 1.05])
    ax = left.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n_classes), class_names, rotation=90 if n_classes > 12 else 0)
    ax.set_yticks(range(n_classes), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = float(np.trace(matrix)) / max(1, matrix.sum())
    ax.set_title(f"confusion matrix (accuracy {accuracy:.2%})")
    if n_classes <= 12:
        high = matrix.max() / 2 if matrix.size else 0
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > high else "black")
    grid = right.subplots(rows, cols, squeeze=False)
    for k, image_ax in enumerate(grid.ravel()):
        image_ax.set_xticks([])
        image_ax.set_yticks([])
        if k >= len(wrong):
            image_ax.axis("off")
            continue
        i = wrong[k]
        image = X[i].reshape(image_shape + (-1,))[..., 0] if len(image_shape) == 2 \
            else X[i].reshape(image_shape)[..., 0]
        image_ax.imshow(image, cmap="gray_r")
        image_ax.set_title(f"true {class_names[y[i]]}, predicted {class_names[pred[i]]}\n"
                           f"p={proba[i, pred[i]]:.2f}", fontsize=8)
    right.suptitle(f"most confident errors ({len(wrong)} of {np.count_nonzero(pred != y)})"
                   if len(wrong) else "no misclassified rows")
    if title:
        figure.suptitle(title)
    return _save(figure, path)
