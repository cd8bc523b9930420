"""Shared fixtures: the real MNIST files beside the repository (../shared/data)."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_SPLIT = SHARED_DATA / "mnist-t10k-split"


@pytest.fixture(scope="session")
def mnist_split_dir():
    """The folder of the real 8,000 / 2,000 image split (four gzipped IDX files)."""
    if not MNIST_SPLIT.is_dir():
        pytest.skip(f"real MNIST data not found at {MNIST_SPLIT}")
    return MNIST_SPLIT


@pytest.fixture(scope="session")
def mnist_split():
    """((X_train, y_train), (X_test, y_test)) of the real 8,000 / 2,000 image split."""
    if not MNIST_SPLIT.is_dir():
        pytest.skip(f"real MNIST data not found at {MNIST_SPLIT}")
    from cnn_core.datasets import load_mnist
    return load_mnist(MNIST_SPLIT, download=False, verbose=False)


@pytest.fixture(scope="session")
def mnist(mnist_split):
    """Real MNIST rows: (X_train uint8, y_train, X_test float32 in [0, 1], y_test)."""
    (X_train, y_train), (X_test, y_test) = mnist_split
    return X_train, y_train, (X_test / np.float32(255)).astype(np.float32), y_test


@pytest.fixture(scope="session")
def trained(mnist):
    """A [784, 64, 10] relu network after two short epochs on real data."""
    from cnn_core import Network
    X_train, y_train, _, _ = mnist
    net = Network([784, 64, 10], seed=0)
    net.fit(X_train, y_train, epochs=2, batch_size=64, learning_rate=0.05)
    return net


@pytest.fixture(scope="session")
def trained_cnn(mnist):
    """A small CNN of every layer kind (28x28x1 -> conv 5x5/2 relu -> max 2 -> conv 3x3
    same tanh -> avg 2 -> flatten -> dropout -> dense 10) after one epoch on 1,000 real
    images (about 80% test accuracy): enough to compare implementations, in a second."""
    from cnn_core import Network, layers as L
    X_train, y_train, _, _ = mnist
    net = Network([L.Input((28, 28, 1)), L.Conv2D(8, 5, stride=2, activation="relu"),
                   L.MaxPool2D(2), L.Conv2D(8, 3, padding="same", activation="tanh"),
                   L.AvgPool2D(2), L.Flatten(), L.Dropout(0.2), L.Dense(10)], seed=0)
    net.fit(X_train[:1000], y_train[:1000], epochs=1, batch_size=16, optimizer="adam",
            learning_rate=0.01)
    return net


@pytest.fixture(scope="session")
def cc():
    """Path of the system C compiler ($CC, cc, gcc or clang), or skip the test."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip("no C compiler (cc, gcc or clang) on PATH")
