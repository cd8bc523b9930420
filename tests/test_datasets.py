"""Tests for cnn_core.datasets: IDX parsing, MNIST loading and the download path.

Real MNIST files are read from ../shared/data beside the repository (never copied
into it); downloads are exercised against a local HTTP server on 127.0.0.1.
"""

import gzip
import hashlib
import http.server
import io
import os
import socket
import struct
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from cnn_core import datasets
from cnn_core.datasets import (
    MNIST_FILES,
    DownloadError,
    IDXFormatError,
    default_data_dir,
    download_mnist,
    load_idx,
    load_mnist,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_DIR = DATA / "mnist"
SPLIT_DIR = DATA / "mnist-t10k-split"

needs_mnist = pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"real MNIST files not found at {MNIST_DIR}")
needs_split = pytest.mark.skipif(not SPLIT_DIR.is_dir(), reason=f"MNIST t10k split not found at {SPLIT_DIR}")

TYPE_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}
GZ_NAMES = [base + ".gz" for base in MNIST_FILES]


def idx_bytes(array):
    """Encode ``array`` as an IDX file (big-endian header and payload)."""
    array = np.asarray(array)
    code = TYPE_CODES[array.dtype.type]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def file_sha256(path):
    return sha256(Path(path).read_bytes())


def tiny_mnist(n_train=5, n_test=3, seed=0):
    """Small valid MNIST-shaped arrays, keyed by standard file name (without .gz)."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_mnist_dir(folder, arrays, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    for base, array in arrays.items():
        data = idx_bytes(array)
        if compress:
            (folder / (base + ".gz")).write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / base).write_bytes(data)
    return folder


def check_loaded(result, arrays):
    (X_train, y_train), (X_test, y_test) = result
    for X, y, split in ((X_train, y_train, "train"), (X_test, y_test, "t10k")):
        images = arrays[f"{split}-images-idx3-ubyte"]
        assert X.dtype == np.uint8 and y.dtype == np.uint8
        assert X.shape == (len(images), 784) and X.flags.c_contiguous
        np.testing.assert_array_equal(X, images.reshape(len(images), 784))
        np.testing.assert_array_equal(y, arrays[f"{split}-labels-idx1-ubyte"])


# ---------------------------------------------------------------------------
# load_idx on valid files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(TYPE_CODES))
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_load_idx_roundtrip(tmp_path, dtype, compress):
    rng = np.random.default_rng(1)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, (3, 4, 5), dtype=dtype, endpoint=True)
    else:
        array = rng.standard_normal((3, 4, 5)).astype(dtype)
    data = idx_bytes(array)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(data) if compress else data)

    out = load_idx(os.fsencode(path) if compress else path)   # a bytes path works too
    assert out.shape == (3, 4, 5)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("shape", [(7,), (2, 3), (0,), (2, 0, 4), (1, 1, 1, 1, 2)])
def test_load_idx_shapes(tmp_path, shape):
    array = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape) - 3
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(array))
    out = load_idx(str(path))
    assert out.shape == shape
    np.testing.assert_array_equal(out, array)


def test_load_idx_detects_gzip_by_content_not_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    gz_named_raw = tmp_path / "raw.gz"
    gz_named_raw.write_bytes(idx_bytes(array))
    raw_named_gz = tmp_path / "compressed-ubyte"
    raw_named_gz.write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(load_idx(gz_named_raw), array)
    np.testing.assert_array_equal(load_idx(raw_named_gz), array)


def test_load_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_idx(tmp_path / "nope")


@needs_mnist
def test_real_mnist_checksums():
    expected = {
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    }
    for name, digest in expected.items():
        assert file_sha256(MNIST_DIR / name) == digest, name
        assert datasets.SHA256[name] == digest, name
    assert datasets.SHA256["train-images-idx3-ubyte.gz"] == (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    )


@needs_split
def test_split_checksums():
    expected = {
        "train-images-idx3-ubyte.gz": "deb6c3a1888b2423a5d01b1661ba096f9520cc7c183e16cf8a18e3a79b98372d",
        "train-labels-idx1-ubyte.gz": "b8dc58f5efb725f845f118f06973c2b92d25bf89e5f4c6d9364fb31839f7c9af",
        "t10k-images-idx3-ubyte.gz": "b77fb3479627ef7833025f4f99520c04d6961b9bce5cea4a44c535d6a0c597e8",
        "t10k-labels-idx1-ubyte.gz": "2cca0dd44fa0495df4f2a36b11b8dc5c8908e902ff7813eaf91c0c786a488b1c",
    }
    for name, digest in expected.items():
        assert file_sha256(SPLIT_DIR / name) == digest, name


@needs_mnist
def test_load_idx_real_mnist():
    images = load_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = load_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    train_labels = load_idx(MNIST_DIR / "train-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert train_labels.shape == (60000,) and train_labels.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    assert set(np.unique(labels)) == set(range(10))
    assert set(np.unique(train_labels)) == set(range(10))
    # Well-known facts about the official files.
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(labels, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------------------
# load_idx on malformed files
# ---------------------------------------------------------------------------

GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
MALFORMED = {
    "empty": (b"", "empty"),
    "short-magic": (b"\x00\x00\x08", "too few"),
    "bad-magic": (b"\x01\x02" + GOOD[2:], "bad magic"),
    "unknown-type": (GOOD[:2] + b"\x0a" + GOOD[3:], "unknown IDX type code 0x0a"),
    "ndim-0": (b"\x00\x00\x08\x00" + b"\x05" * 8, "0 dimensions"),
    "truncated-header": (GOOD[:10], "truncated header"),
    "header-only": (GOOD[:16], "truncated payload"),
    "truncated-payload": (GOOD[:-1], "truncated payload"),
    "trailing-bytes": (GOOD + b"\x00", "unexpected bytes"),
    "huge-dims": (struct.pack(">HBB3I", 0, 0x0E, 3, 2**32 - 1, 2**32 - 1, 2**32 - 1), "too large"),
    "zero-beside-huge-dims": (bytes.fromhex("00000804 00000000 ffffffff ffffffff ffffffff"),
                              "too large for any array"),
    "gzip-trailing-bytes": (gzip.compress(GOOD + b"\x00"), "unexpected bytes"),
    "gzip-trailing-garbage": (gzip.compress(GOOD) + b"garbage", "gzip"),
    "gzip-truncated": (gzip.compress(GOOD)[:-10], "gzip"),
    "gzip-header-only": (gzip.compress(GOOD)[:10], "gzip"),
    "gzip-bad-crc": (gzip.compress(GOOD)[:-8] + b"\x00\x00\x00\x00" + gzip.compress(GOOD)[-4:], "gzip"),
    "gzip-empty": (gzip.compress(b""), "no data"),
    "gzip-of-truncated": (gzip.compress(GOOD[:-3]), "truncated payload"),
    "gzip-of-bad-magic": (gzip.compress(b"\xff" + GOOD[1:]), "bad magic"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_load_idx_malformed(tmp_path, case):
    data, what = MALFORMED[case]
    path = tmp_path / f"{case}-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(IDXFormatError) as info:
        load_idx(path)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert str(path) in message
    assert what in message


def test_load_idx_zero_dimension_gives_an_empty_array(tmp_path):
    path = tmp_path / "empty-idx2-ubyte"
    path.write_bytes(struct.pack(">HBB2I", 0, 0x0C, 2, 0, 7))
    array = load_idx(path)
    assert array.shape == (0, 7) and array.dtype == np.int32


def gzip_bomb(header, zeros_mib):
    """A gzip file holding `header` then `zeros_mib` MiB of zero bytes, built without
    compressing them (a fully flushed deflate block of zeros repeats byte for byte)."""
    zero = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = [deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)]
    block = deflate.compress(zero) + deflate.flush(zlib.Z_FULL_FLUSH)
    body += [block] * zeros_mib + [deflate.flush()]
    crc = zlib.crc32(header)
    for _ in range(zeros_mib):
        crc = zlib.crc32(zero, crc)
    size = (len(header) + (zeros_mib << 20)) & 0xFFFFFFFF
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + b"".join(body) + struct.pack("<II", crc, size)


def test_load_idx_stops_a_gzip_bomb_at_the_declared_size(tmp_path):
    # a 10-byte IDX file followed by 2 GiB of zeros, in 2 MB of gzip
    header = struct.pack(">HBB1I", 0, 0x08, 1, 2) + b"\x07\x09"
    path = tmp_path / "bomb-idx1-ubyte.gz"
    path.write_bytes(gzip_bomb(header, 2048))
    assert path.stat().st_size < 3 << 20
    tracemalloc.start()
    try:
        with pytest.raises(IDXFormatError, match="unexpected bytes after the payload"):
            load_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"load_idx held {peak} bytes for a 10-byte IDX file"
    # the same stream without the zeros is a valid file
    path.write_bytes(gzip_bomb(header, 0))
    np.testing.assert_array_equal(load_idx(path), [7, 9])


def test_load_idx_memory_grows_only_with_the_data(tmp_path):
    # a header claiming 4 GiB with 1 MiB behind it: refused as truncated, with memory
    # proportional to what was there, not to the claim
    path = tmp_path / "claim-idx1-ubyte.gz"
    path.write_bytes(gzip_bomb(struct.pack(">HBB1I", 0, 0x08, 1, 2**32 - 1), 1))
    tracemalloc.start()
    try:
        with pytest.raises(IDXFormatError, match="truncated payload"):
            load_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


# ---------------------------------------------------------------------------
# load_mnist from a user folder
# ---------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Make any download attempt fail loudly, and keep the real cache out of reach."""

    def forbidden(*args, **kwargs):
        raise AssertionError("load_mnist must not download here")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", forbidden)
    monkeypatch.delenv("CNN_CORE_DATA", raising=False)


def check_split_result(result):
    (X_train, y_train), (X_test, y_test) = result
    assert X_train.shape == (8000, 784) and y_train.shape == (8000,)
    assert X_test.shape == (2000, 784) and y_test.shape == (2000,)
    for X, y in ((X_train, y_train), (X_test, y_test)):
        assert X.dtype == np.uint8 and y.dtype == np.uint8
        assert X.flags.c_contiguous and y.flags.c_contiguous
        assert X.min() == 0 and X.max() == 255
        assert set(np.unique(y)) == set(range(10))
    assert y_train[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


@needs_split
def test_load_mnist_split_by_argument(no_network):
    result = load_mnist(SPLIT_DIR)
    check_split_result(result)
    assert load_mnist(str(SPLIT_DIR))[1][1].shape == (2000,)


@needs_split
def test_load_mnist_split_by_env(no_network, monkeypatch):
    monkeypatch.setenv("CNN_CORE_DATA", str(SPLIT_DIR))
    check_split_result(load_mnist())


@needs_split
@needs_mnist
def test_load_mnist_split_matches_official_test_set(no_network):
    (X_train, y_train), (X_test, y_test) = load_mnist(SPLIT_DIR)
    images = load_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz").reshape(10000, 784)
    labels = load_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(np.concatenate([X_train, X_test]), images)
    np.testing.assert_array_equal(np.concatenate([y_train, y_test]), labels)


def test_load_mnist_argument_overrides_env(tmp_path, no_network, monkeypatch):
    arrays = tiny_mnist()
    write_mnist_dir(tmp_path / "mine", arrays)
    monkeypatch.setenv("CNN_CORE_DATA", str(tmp_path / "elsewhere"))
    check_loaded(load_mnist(tmp_path / "mine"), arrays)


def test_load_mnist_raw_files(tmp_path, no_network):
    arrays = tiny_mnist()
    check_loaded(load_mnist(write_mnist_dir(tmp_path, arrays, compress=False)), arrays)


def test_load_mnist_user_folder_missing_files(tmp_path, no_network):
    arrays = tiny_mnist()
    del arrays["t10k-labels-idx1-ubyte"], arrays["train-images-idx3-ubyte"]
    write_mnist_dir(tmp_path, arrays)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message and "train-images-idx3-ubyte" in message
    assert "t10k-images-idx3-ubyte" not in message and str(tmp_path) in message
    assert sorted(os.listdir(tmp_path)) == before


def test_load_mnist_user_folder_absent(tmp_path, no_network, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "absent")
    monkeypatch.setenv("CNN_CORE_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist()
    assert not (tmp_path / "absent").exists()


BROKEN = {
    "label-count": ("train-labels-idx1-ubyte", {"train-labels-idx1-ubyte": np.zeros(4, np.uint8)}, "4 labels"),
    "label-range": ("t10k-labels-idx1-ubyte", {"t10k-labels-idx1-ubyte": np.array([1, 10, 2], np.uint8)}, "0..9"),
    "label-2d": ("t10k-labels-idx1-ubyte", {"t10k-labels-idx1-ubyte": np.zeros((3, 1), np.uint8)}, "labels"),
    "label-dtype": ("train-labels-idx1-ubyte", {"train-labels-idx1-ubyte": np.zeros(5, np.int32)}, "int32"),
    "image-size": ("train-images-idx3-ubyte", {"train-images-idx3-ubyte": np.zeros((5, 27, 28), np.uint8)}, "28"),
    "image-2d": ("t10k-images-idx3-ubyte", {"t10k-images-idx3-ubyte": np.zeros((3, 784), np.uint8)}, "28"),
    "image-dtype": ("t10k-images-idx3-ubyte", {"t10k-images-idx3-ubyte": np.zeros((3, 28, 28), np.float32)}, "float32"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_load_mnist_structurally_wrong(tmp_path, no_network, case):
    culprit, changes, what = BROKEN[case]
    write_mnist_dir(tmp_path, {**tiny_mnist(), **changes})
    with pytest.raises(IDXFormatError) as info:
        load_mnist(tmp_path)
    assert culprit in str(info.value) and what in str(info.value)


def test_load_mnist_user_folder_malformed_file(tmp_path, no_network):
    write_mnist_dir(tmp_path, tiny_mnist())
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(IDXFormatError, match="gzip"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------------------
# Cache folder
# ---------------------------------------------------------------------------


def test_default_data_dir_linux(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "cnn_core" / "mnist"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == tmp_path / "home" / ".cache" / "cnn_core" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_data_dir() == tmp_path / "home" / ".cache" / "cnn_core" / "mnist"


@pytest.mark.skipif(os.name != "posix", reason="HOME drives Path.home() only on POSIX")
def test_default_data_dir_macos(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "Library" / "Caches" / "cnn_core" / "mnist"


def test_default_data_dir_windows(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert default_data_dir() == tmp_path / "Local" / "cnn_core" / "mnist"


# ---------------------------------------------------------------------------
# Downloads against a local HTTP server
# ---------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests.append(self.path)
        kind, *args = server.routes.get(self.path, ("status", 404))
        if kind == "status":
            self.send_error(args[0])
            return
        body = args[0]
        claimed = args[1] if kind == "truncate" else len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(claimed))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 serving ``routes`` and recording requests."""

    def __init__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.routes = {}
        self.httpd.requests = []
        self.httpd.lock = threading.Lock()
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def url(self, prefix):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{prefix}/"

    def serve(self, prefix, name, kind, *args):
        self.httpd.routes[f"/{prefix}/{name}"] = (kind, *args)

    def serve_all(self, prefix, files):
        for name, data in files.items():
            self.serve(prefix, name, "ok", data)

    @property
    def requests(self):
        with self.httpd.lock:
            return list(self.httpd.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    srv = LocalServer()
    yield srv
    srv.close()


@pytest.fixture
def refused_url():
    """A URL on a local port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/closed/"


@pytest.fixture
def tiny(monkeypatch):
    """Tiny gzipped MNIST files; their checksums replace the official ones."""
    arrays = tiny_mnist()
    files = {base + ".gz": gzip.compress(idx_bytes(a), mtime=0) for base, a in arrays.items()}
    monkeypatch.setattr(datasets, "SHA256", {name: sha256(data) for name, data in files.items()})
    return arrays, files


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Point the per-user cache at tmp_path; return the MNIST cache folder."""
    monkeypatch.delenv("CNN_CORE_DATA", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "xdg" / "cnn_core" / "mnist"
    assert default_data_dir() == folder
    return folder


def use_mirrors(monkeypatch, *urls):
    monkeypatch.setattr(datasets, "MIRRORS", list(urls))


def assert_only_final_files(folder, files):
    assert sorted(os.listdir(folder)) == sorted(files)
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name


def test_download_success_and_cache_reuse(server, tiny, cache, monkeypatch, capsys):
    arrays, files = tiny
    server.serve_all("m1", files)
    use_mirrors(monkeypatch, server.url("m1"))

    check_loaded(load_mnist(), arrays)
    assert sorted(server.requests) == sorted(f"/m1/{name}" for name in files)
    assert_only_final_files(cache, files)
    err = capsys.readouterr().err
    for name in files:
        assert f"Downloaded {name}" in err

    check_loaded(load_mnist(), arrays)
    assert len(server.requests) == 4
    check_loaded(load_mnist(download=False), arrays)
    assert len(server.requests) == 4


def test_download_quiet(server, tiny, cache, monkeypatch, capsys):
    arrays, files = tiny
    server.serve_all("m1", files)
    use_mirrors(monkeypatch, server.url("m1").rstrip("/"))  # a base without a trailing slash
    check_loaded(load_mnist(verbose=False), arrays)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("status", [404, 500])
def test_download_mirror_fallback(server, tiny, cache, monkeypatch, status):
    arrays, files = tiny
    for name in files:
        server.serve("m1", name, "status", status)
    server.serve_all("m2", files)
    use_mirrors(monkeypatch, server.url("m1"), server.url("m2"))

    check_loaded(load_mnist(verbose=False), arrays)
    for name in files:
        assert server.requests.count(f"/m1/{name}") == 1
        assert server.requests.count(f"/m2/{name}") == 1
    assert_only_final_files(cache, files)


def test_download_connection_refused_fallback(server, tiny, cache, monkeypatch, refused_url):
    arrays, files = tiny
    server.serve_all("m2", files)
    use_mirrors(monkeypatch, refused_url, server.url("m2"))
    check_loaded(load_mnist(verbose=False), arrays)
    assert_only_final_files(cache, files)


def test_download_checksum_mismatch_fallback(server, tiny, cache, monkeypatch, capsys):
    arrays, files = tiny
    for name, data in files.items():
        server.serve("m1", name, "ok", data[:-1] + bytes([data[-1] ^ 1]))
    server.serve_all("m2", files)
    use_mirrors(monkeypatch, server.url("m1"), server.url("m2"))

    check_loaded(load_mnist(), arrays)
    assert len(server.requests) == 8
    assert_only_final_files(cache, files)
    assert "SHA-256 mismatch" in capsys.readouterr().err


def test_download_truncated_transfer_fallback(server, tiny, cache, monkeypatch):
    arrays, files = tiny
    for name, data in files.items():
        server.serve("m1", name, "truncate", data[: len(data) // 2], len(data))
    server.serve_all("m2", files)
    use_mirrors(monkeypatch, server.url("m1"), server.url("m2"))
    check_loaded(load_mnist(verbose=False), arrays)
    assert len(server.requests) == 8
    assert_only_final_files(cache, files)


def test_download_truncated_transfer_error(server, tiny, cache, monkeypatch):
    arrays, files = tiny
    name = "train-labels-idx1-ubyte.gz"
    server.serve_all("m1", files)
    server.serve("m1", name, "truncate", files[name][:-5], len(files[name]))
    use_mirrors(monkeypatch, server.url("m1"))
    with pytest.raises(DownloadError, match="truncated transfer"):
        load_mnist(verbose=False)
    assert_only_final_files(cache, {"train-images-idx3-ubyte.gz": files["train-images-idx3-ubyte.gz"]})


def test_download_all_mirrors_fail(server, tiny, cache, monkeypatch, refused_url):
    arrays, files = tiny
    name = "train-images-idx3-ubyte.gz"
    server.serve("m2", name, "status", 500)
    server.serve("m3", name, "ok", b"not mnist")
    server.serve("m4", name, "truncate", files[name][:7], len(files[name]))
    mirrors = [server.url("m1"), server.url("m2"), refused_url, server.url("m3"), server.url("m4")]
    use_mirrors(monkeypatch, *mirrors)

    with pytest.raises(DownloadError) as info:
        load_mnist(verbose=False)
    assert isinstance(info.value, OSError)
    message = str(info.value)
    for mirror in mirrors:
        assert mirror + name in message
    assert "404" in message and "500" in message and "SHA-256 mismatch" in message and "truncated" in message
    assert str(cache) in message and "CNN_CORE_DATA" in message and "path=" in message
    assert all(n in message for n in files)
    assert os.listdir(cache) == []


def test_download_no_mirrors(tiny, cache, monkeypatch):
    use_mirrors(monkeypatch)
    with pytest.raises(DownloadError, match="no mirrors"):
        load_mnist(verbose=False)


def test_download_disabled(server, tiny, cache, monkeypatch):
    arrays, files = tiny
    server.serve_all("m1", files)
    use_mirrors(monkeypatch, server.url("m1"))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(download=False)
    assert all(name in str(info.value) for name in files)
    assert server.requests == []
    assert not cache.exists() or os.listdir(cache) == []


def test_corrupt_cached_file_is_replaced(server, tiny, cache, monkeypatch):
    arrays, files = tiny
    server.serve_all("m1", files)
    use_mirrors(monkeypatch, server.url("m1"))
    load_mnist(verbose=False)
    assert len(server.requests) == 4

    name = "t10k-images-idx3-ubyte.gz"
    (cache / name).write_bytes(files[name][:-3])
    with pytest.raises(FileNotFoundError, match=name):
        load_mnist(download=False)
    check_loaded(load_mnist(verbose=False), arrays)
    assert server.requests[4:] == [f"/m1/{name}"]
    assert_only_final_files(cache, files)


def test_cache_without_trusted_checksum_is_not_used(server, tiny, cache, monkeypatch):
    """A cached file is used only if it matches the checksum table."""
    arrays, files = tiny
    write_mnist_dir(cache, tiny_mnist(seed=5))  # valid IDX files, wrong checksums
    server.serve_all("m1", files)
    use_mirrors(monkeypatch, server.url("m1"))
    check_loaded(load_mnist(verbose=False), arrays)
    assert len(server.requests) == 4


def test_user_folder_is_never_downloaded_into(server, tiny, tmp_path, monkeypatch):
    arrays, files = tiny
    server.serve_all("m1", files)
    use_mirrors(monkeypatch, server.url("m1"))
    monkeypatch.setenv("CNN_CORE_DATA", str(tmp_path / "user"))
    (tmp_path / "user").mkdir()
    with pytest.raises(FileNotFoundError):
        load_mnist()
    assert server.requests == [] and os.listdir(tmp_path / "user") == []

    # User data is structure-checked only: checksums that differ from the table are fine.
    check_loaded(load_mnist(write_mnist_dir(tmp_path / "other", tiny_mnist(seed=9))), tiny_mnist(seed=9))
    assert server.requests == []


def test_download_mnist_explicit_arguments(server, tmp_path):
    arrays = tiny_mnist(seed=3)
    files = {base + ".gz": gzip.compress(idx_bytes(a)) for base, a in arrays.items()}
    server.serve_all("x", files)
    checksums = {name: sha256(data) for name, data in files.items()}
    folder = tmp_path / "a" / "b"
    paths = download_mnist(folder, mirrors=[server.url("x")], checksums=checksums, timeout=5, verbose=False)
    assert paths == {name: folder / name for name in files}
    assert_only_final_files(folder, files)
    assert download_mnist(folder, mirrors=[], checksums=checksums, verbose=False) == paths
    check_loaded(load_mnist(folder), arrays)
    assert len(server.requests) == 4


def test_download_progress_bar_on_tty(server, tiny, cache, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    arrays, files = tiny
    server.serve_all("m1", files)
    use_mirrors(monkeypatch, server.url("m1"))
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    load_mnist()
    out = terminal.getvalue()
    for name, data in files.items():
        assert f"\r{name} [" in out
        assert f"{len(data)}/{len(data)} bytes" in out
        assert f"Downloaded {name}" in out


def test_failed_atomic_write_leaves_no_temp_file(server, tiny, cache, monkeypatch):
    arrays, files = tiny
    server.serve_all("m1", files)
    use_mirrors(monkeypatch, server.url("m1"))

    def broken_replace(src, dst):
        raise PermissionError(f"cannot rename {src}")

    monkeypatch.setattr(datasets.os, "replace", broken_replace)
    with pytest.raises(DownloadError, match="cannot rename"):
        load_mnist(verbose=False)
    assert os.listdir(cache) == []


@needs_mnist
def test_official_files_in_cache_pass_official_checksums(server, cache, monkeypatch):
    """Cached official files are verified against the real table and not fetched again."""
    cache.mkdir(parents=True)
    present = sorted(os.listdir(MNIST_DIR))
    for name in present:
        (cache / name).write_bytes((MNIST_DIR / name).read_bytes())
    use_mirrors(monkeypatch, server.url("m1"))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(download=False)
    message = str(info.value).split(" in the MNIST cache")[0]
    assert "train-images-idx3-ubyte.gz" in message
    assert not any(name in message for name in present)
    with pytest.raises(DownloadError) as info:
        load_mnist(verbose=False)
    assert server.requests == ["/m1/train-images-idx3-ubyte.gz"]
    assert "train-images-idx3-ubyte.gz: HTTP Error 404" in str(info.value)
    assert sorted(os.listdir(cache)) == present
