"""cnn_core.sklearn against scikit-learn's own estimators, on the same data and settings.

    taskset -c 0 python benchmarks/estimators.py [--data DIR] [--epochs N] [--repeats R]

MLPClassifier on the MNIST folder (default ../shared/data/mnist-t10k-split beside the
checkout: 8,000 training and 2,000 test images, pixels scaled to [0, 1]) with one hidden
layer of 128 relu units, Adam, learning rate 0.001, batch 200, alpha 1e-4 and a fixed
number of epochs (no early stop); then MLPRegressor on scikit-learn's diabetes data
(standardised, 75/25 split) over three seeds.  Prints test accuracy and the best of
`repeats` fit times for each, and the R^2 of both regressors.  Run it pinned to one core
for a like-for-like comparison (cnn_core then uses one thread).
"""
import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as SkClassifier
from sklearn.neural_network import MLPRegressor as SkRegressor
from sklearn.preprocessing import StandardScaler

import cnn_core
from cnn_core.datasets import load_mnist
from cnn_core.sklearn import MLPClassifier, MLPRegressor

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k-split"


def best_fit(make, X, y, repeats):
    """(fitted model, best wall time of `repeats` fits)."""
    best = float("inf")
    for _ in range(repeats):
        model = make()
        start = time.perf_counter()
        model.fit(X, y)
        best = min(best, time.perf_counter() - start)
    return model, best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)
    print(f"cnn_core {cnn_core.__version__}, {cnn_core.info()['threads']} thread(s), "
          f"kernel {cnn_core.info()['kernel']}")

    (X, y), (X_test, y_test) = load_mnist(args.data, download=False, verbose=False)
    X = (X / np.float32(255)).astype(np.float32)
    X_test = (X_test / np.float32(255)).astype(np.float32)
    settings = dict(hidden_layer_sizes=(128,), solver="adam", learning_rate_init=0.001,
                    batch_size=200, alpha=1e-4, max_iter=args.epochs, tol=0.0,
                    n_iter_no_change=args.epochs + 1, random_state=0)
    print(f"MLPClassifier on {len(X)} MNIST images, {args.epochs} epochs, "
          f"tested on {len(X_test)}")
    for name, cls in [("cnn_core.sklearn", MLPClassifier),
                      ("sklearn.neural_network", SkClassifier)]:
        model, seconds = best_fit(lambda: cls(**settings), X, y, args.repeats)
        print(f"  {name:<24} accuracy {model.score(X_test, y_test):.4f}  "
              f"fit {seconds:6.2f} s  ({model.n_iter_} epochs)")

    Xd, yd = load_diabetes(return_X_y=True)
    Xd_train, Xd_test, yd_train, yd_test = train_test_split(Xd, yd, test_size=0.25,
                                                            random_state=0)
    scaler = StandardScaler().fit(Xd_train)
    Xd_train, Xd_test = scaler.transform(Xd_train), scaler.transform(Xd_test)
    mean, std = yd_train.mean(), yd_train.std()
    yd_train, yd_test = (yd_train - mean) / std, (yd_test - mean) / std
    print("MLPRegressor on diabetes (16 relu units, adam 0.001, batch 32, alpha 1, "
          "200 epochs at most), test R^2 over seeds 0, 1, 2")
    for name, cls in [("cnn_core.sklearn", MLPRegressor),
                      ("sklearn.neural_network", SkRegressor)]:
        scores = [cls(hidden_layer_sizes=(16,), learning_rate_init=0.001, max_iter=200,
                      batch_size=32, alpha=1.0, random_state=seed)
                  .fit(Xd_train, yd_train).score(Xd_test, yd_test) for seed in range(3)]
        print(f"  {name:<24} R^2 {np.mean(scores):.3f}  "
              f"({', '.join(f'{s:.3f}' for s in scores)})")


if __name__ == "__main__":
    main()
