"""Shared fixtures: the real MNIST files beside the repository (../shared/data)."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_SPLIT = SHARED_DATA / "mnist-t10k-split"


@pytest.fixture(scope="session")
def mnist_split():
    """((X_train, y_train), (X_test, y_test)) of the real 8,000 / 2,000 image split."""
    if not MNIST_SPLIT.is_dir():
        pytest.skip(f"real MNIST data not found at {MNIST_SPLIT}")
    from cnn_core.datasets import load_mnist
    return load_mnist(MNIST_SPLIT, download=False, verbose=False)
