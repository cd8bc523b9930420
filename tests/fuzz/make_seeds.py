"""Write the seed corpora of the fuzz harnesses, from real saved models and MNIST files.

    python tests/fuzz/make_seeds.py [--data MNIST_FOLDER]

MNIST_FOLDER holds the four MNIST files (default: $CNN_CORE_DATA, else
../shared/data/mnist-t10k-split beside the repository, else load_mnist's download cache).
Writes tests/fuzz/corpus/ (not versioned):
    model/   model files saved by Network.save: MLPs trained briefly on MNIST (full
             28x28 and 7x7-pooled images), untrained ones of every hidden activation and
             depth, and CNNs of every layer kind when Network accepts a layer stack
    idx/     IDX inputs for fuzz_idx.py (first byte: 1 = gzip the rest, 0 = as it is):
             slices of the real MNIST files, raw and gzipped, and one file per type code
    cli/     inputs for fuzz_cli.py (first byte: the mode, see there)
    small-mnist/, small-mnist-model.cnn: the data folder and valid model fuzz_cli.py uses
"""
import argparse
import gzip
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

from cnn_core import Network
from cnn_core.datasets import load_idx, load_mnist

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
DEFAULT_DATA = HERE.parents[2] / "shared" / "data" / "mnist-t10k-split"
IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array, dtype):
    """The IDX file of `array` stored as `dtype` (big-endian as the format says)."""
    array = np.asarray(array).astype(dtype)
    header = struct.pack(">HBB", 0, IDX_CODES[np.dtype(dtype)], array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def mnist_file(folder, base):
    for name in (base, base + ".gz"):
        if (folder / name).is_file():
            return folder / name
    sys.exit(f"{folder} lacks {base}[.gz]: give the MNIST folder with --data")


def trained(sizes, X, y, activation="relu", epochs=2):
    net = Network(sizes, activation, seed=0)
    net.fit(X, y, epochs=epochs, batch_size=32, learning_rate=0.05)
    return net


def cnn_models(X, y):
    """CNNs with every layer kind, trained briefly; none if Network takes only sizes."""
    try:
        from cnn_core import layers
        stacks = [
            [layers.Input((28, 28, 1)), layers.Conv2D(2, 3, activation="relu"),
             layers.MaxPool2D(2), layers.Flatten(), layers.Dense(10)],
            [layers.Input((28, 28, 1)), layers.Conv2D(2, 5, stride=2, padding="same",
                                                      activation="tanh"),
             layers.AvgPool2D(2), layers.Flatten(), layers.Dropout(0.25),
             layers.Dense(8, activation="leaky_relu"), layers.Dense(10)],
        ]
        nets = [Network(stack, seed=0) for stack in stacks]
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        print(f"no CNN seeds: this Network takes no layer stack ({exc})")
        return []
    for net in nets:
        net.fit(X.reshape(-1, 28, 28, 1), y, epochs=1, batch_size=32, learning_rate=0.05)
    return nets


def write(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("CNN_CORE_DATA", DEFAULT_DATA)))
    data = parser.parse_args(argv).data
    if data.is_dir():
        images = load_idx(mnist_file(data, "train-images-idx3-ubyte"))
        labels = load_idx(mnist_file(data, "train-labels-idx1-ubyte"))
        test_images = load_idx(mnist_file(data, "t10k-images-idx3-ubyte"))
        test_labels = load_idx(mnist_file(data, "t10k-labels-idx1-ubyte"))
    else:   # no local copy: MNIST from cnn_core's verified download cache
        print(f"{data} not found: using load_mnist's cache (downloaded if missing)")
        (images, labels), (test_images, test_labels) = load_mnist(verbose=False)
        images, test_images = images.reshape(-1, 28, 28), test_images.reshape(-1, 28, 28)
    if CORPUS.exists():
        shutil.rmtree(CORPUS)

    # models: real ones trained on MNIST rows, small ones of every shape the format has
    X, y = images[:1000].reshape(1000, -1), labels[:1000]
    pooled = images[:1000].reshape(1000, 7, 4, 7, 4).mean(axis=(2, 4)).reshape(1000, 49)
    pooled = pooled.astype(np.float32) / 255
    models = {"mnist-784-16-10-relu": trained([784, 16, 10], X, y)}
    for activation in ("identity", "relu", "leaky_relu", "sigmoid", "tanh"):
        models[f"mnist7x7-49-8-10-{activation}"] = trained([49, 8, 10], pooled, y, activation)
    models["untrained-3-2"] = Network([3, 2], seed=1)
    models["untrained-5-4-3-2-tanh"] = Network([5, 4, 3, 2], "tanh", seed=2)
    models["untrained-2-1-1-leaky"] = Network([2, 1, 1], "leaky_relu", seed=3, leaky_slope=0.5)
    for i, net in enumerate(cnn_models(X, y)):
        models[f"mnist-cnn-{i}"] = net
    model_dir, cli_dir = CORPUS / "model", CORPUS / "cli"
    model_dir.mkdir(parents=True)
    for name, net in models.items():
        net.save(model_dir / f"{name}.cnn")
        data_bytes = (model_dir / f"{name}.cnn").read_bytes()
        mode = 0 if net.n_features == 784 else 1      # evaluate needs 784 inputs
        write(cli_dir, f"{mode}-{name}", bytes([mode]) + data_bytes)

    # the small MNIST folder and valid model fuzz_cli.py evaluates
    small = CORPUS / "small-mnist"
    parts = {"train-images-idx3-ubyte": images[:30], "train-labels-idx1-ubyte": labels[:30],
             "t10k-images-idx3-ubyte": test_images[:20],
             "t10k-labels-idx1-ubyte": test_labels[:20]}
    for name, array in parts.items():
        write(small, name, idx_bytes(array, np.uint8))
    shutil.copy(model_dir / "mnist-784-16-10-relu.cnn", CORPUS / "small-mnist-model.cnn")
    write(cli_dir, "2-test-images", b"\x02" + (small / "t10k-images-idx3-ubyte").read_bytes())
    write(cli_dir, "2-test-images-gz",
          b"\x02" + gzip.compress((small / "t10k-images-idx3-ubyte").read_bytes(), mtime=0))

    # IDX files: real MNIST slices raw, gzipped by the harness, and as gzip streams
    idx_dir = CORPUS / "idx"
    real = {"images-3": idx_bytes(images[:3], np.uint8),
            "labels-40": idx_bytes(labels[:40], np.uint8)}
    for name, raw in real.items():
        write(idx_dir, f"raw-{name}", b"\x00" + raw)
        write(idx_dir, f"gzip-{name}", b"\x01" + raw)
        write(idx_dir, f"stream-{name}", b"\x00" + gzip.compress(raw, mtime=0))
    write(idx_dir, "stream-mnist-test-labels",
          b"\x00" + gzip.compress(idx_bytes(test_labels, np.uint8), mtime=0))
    values = (np.arange(6).reshape(2, 3) - 2) * 3
    for dtype, code in IDX_CODES.items():
        write(idx_dir, f"raw-type-{code:02x}", b"\x00" + idx_bytes(values, dtype))
    write(idx_dir, "raw-3d-images", b"\x00" + idx_bytes(images[:1, :4, :5], np.uint8))
    for sub in ("model", "idx", "cli"):
        print(f"{CORPUS / sub}: {len(list((CORPUS / sub).iterdir()))} seeds")


if __name__ == "__main__":
    main()
