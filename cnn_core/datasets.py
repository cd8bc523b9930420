"""Reading IDX files and loading (and, if needed, downloading) MNIST.

MNIST is distributed as four IDX files: big-endian binary arrays with a short
header giving the element type and the dimensions.  :func:`load_idx` reads one
such file, gzipped or raw, and checks it strictly: a truncated, over-long or
malformed file raises :class:`IDXFormatError` instead of yielding a short or
garbled array.  :func:`load_mnist` finds the four files in a folder chosen by
the caller (``path=`` or the ``CNN_CORE_DATA`` environment variable), which is
treated as user data and only checked for structure, or else in a per-user
cache folder (:func:`default_data_dir`).  Files missing from the cache are
fetched by :func:`download_mnist` from the mirrors in :data:`MIRRORS`, each
verified against the official SHA-256 sums in :data:`SHA256` and written
atomically.  This module needs only the standard library and numpy.
"""

import gzip
import hashlib
import http.client
import math
import os
import struct
import sys
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "IDXFormatError",
    "DownloadError",
    "MIRRORS",
    "SHA256",
    "MNIST_FILES",
    "load_idx",
    "default_data_dir",
    "download_mnist",
    "load_mnist",
]


class IDXFormatError(ValueError):
    """A file is not a well-formed IDX file, or not the MNIST data expected.

    The message names the file and what is wrong with it.
    """


class DownloadError(OSError):
    """No mirror delivered a file with the expected SHA-256 checksum.

    The message names every URL tried with its error, and how to place the
    files by hand.
    """


#: Base URLs tried in order; a file's URL is the base followed by its name.
MIRRORS = [
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
]

#: Official SHA-256 sums of the four gzipped MNIST files.
SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

#: The four standard file names, without the ``.gz`` suffix.
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: Seconds a download may wait for the server before that mirror counts as failed.
TIMEOUT = 30.0

_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 16


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------


def load_idx(path):
    """Read one IDX file, gzipped or raw, into a numpy array.

    Gzip compression is detected from the content (magic bytes ``1f 8b``), not
    from the file name.  The header is two zero bytes, a type code, the number
    of dimensions ``ndim`` (>= 1), then ``ndim`` big-endian uint32 sizes; the
    payload must hold exactly ``prod(dims)`` big-endian elements of the type:
    0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.

    The file is read as a stream and never past the size its header declares
    (plus one byte, to detect trailing data): a small gzip file that inflates to
    gigabytes is rejected after decompressing only that much, and memory grows
    only as bytes actually arrive.

    Args:
        path: str or os.PathLike naming the file.

    Returns:
        A new, writable, C-contiguous numpy array of shape ``dims`` whose
        dtype is the type code's, in native byte order (e.g. an MNIST image
        file gives uint8 of shape (n, 28, 28), a label file uint8 of shape (n,)).

    Raises:
        IDXFormatError: the file is empty, has a bad magic number, an unknown
            type code, zero dimensions, dimensions no array can have, a
            truncated header or payload, bytes after the payload, or a corrupt
            gzip stream.
        OSError: the file cannot be read.
    """
    path = Path(os.fsdecode(path))

    def fail(what):
        return IDXFormatError(f"{path}: {what}")

    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        try:
            return _read_idx(stream, compressed, fail)
        except (OSError, EOFError, zlib.error) as e:
            if not compressed:
                raise
            raise fail(f"corrupt gzip stream ({e})") from None


def _read_up_to(stream, n):
    """Up to n bytes from stream (fewer only at its end), grown as they arrive."""
    data = bytearray()
    while len(data) < n:
        chunk = stream.read(min(n - len(data), 1 << 20))
        if not chunk:
            break
        data += chunk
    return data


def _read_idx(stream, compressed, fail):
    """The array of the IDX file read from stream (see load_idx)."""
    magic = _read_up_to(stream, 4)
    if not magic:
        raise fail("gzip stream holds no data, not an IDX file" if compressed
                   else "empty file, not an IDX file")
    if len(magic) < 4:
        raise fail(f"{len(magic)} bytes are too few for an IDX header (4 bytes of magic)")
    zero, code, ndim = struct.unpack(">HBB", magic)
    if zero != 0:
        raise fail(f"bad magic {magic.hex()}: an IDX file starts with two zero bytes")
    if code not in _IDX_TYPES:
        raise fail(f"unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise fail("IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    sizes = _read_up_to(stream, 4 * ndim)
    if len(sizes) < 4 * ndim:
        raise fail(f"truncated header: {ndim} dimensions need {header} bytes, "
                   f"file has {4 + len(sizes)}")
    dims = struct.unpack(f">{ndim}I", sizes)
    dtype = _IDX_TYPES[code]
    if math.prod(d for d in dims if d) * dtype.itemsize > np.iinfo(np.intp).max:
        raise fail(f"dimensions {dims} of {dtype.name} are too large for any array")
    expected = dtype.itemsize * math.prod(dims)
    payload = _read_up_to(stream, expected + 1)
    got = len(payload)
    if got < expected:
        raise fail(f"truncated payload: shape {dims} of {dtype.name} needs {expected} bytes, "
                   f"file has {got}")
    if got > expected:
        count = "" if compressed else f"{os.fstat(stream.fileno()).st_size - header - expected} "
        raise fail(f"{count}unexpected bytes after the payload of shape {dims} ({expected} bytes)")
    array = np.frombuffer(payload, dtype=dtype).reshape(dims)
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------


def default_data_dir():
    """Return the per-user cache folder for MNIST as a ``pathlib.Path``.

    ``$XDG_CACHE_HOME/cnn_core/mnist`` (default ``~/.cache/cnn_core/mnist``)
    on Linux and other POSIX systems, ``~/Library/Caches/cnn_core/mnist`` on
    macOS, ``%LOCALAPPDATA%\\cnn_core\\mnist`` on Windows.  The folder is not
    created here.
    """
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = xdg if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return Path(base) / "cnn_core" / "mnist"


def _manual_hint(folder):
    names = ", ".join(name + ".gz" for name in MNIST_FILES)
    return (
        f"To install MNIST by hand, download the four files {names} into {folder}, "
        "or point the CNN_CORE_DATA environment variable or load_mnist(path=...) "
        "at a folder holding them (gzipped or not)."
    )


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path, sha256):
    try:
        return path.is_file() and _sha256(path) == sha256
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------


def _size(n):
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


class _Progress:
    """Download progress on stderr: a live bar on a terminal, else one line per file."""

    def __init__(self, name, url, total, enabled):
        self.stream = sys.stderr
        self.enabled = enabled and self.stream is not None
        self.live = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.name, self.url, self.total = name, url, total
        self.shown = -1

    def update(self, done):
        if not self.live:
            return
        if self.total:
            step = done * 100 // self.total
            if step == self.shown:
                return
            filled = int(30 * min(done, self.total) // self.total)
            bar = "#" * filled + "-" * (30 - filled)
            text = f"{self.name} [{bar}] {done}/{self.total} bytes"
        else:
            step = done >> 20
            if step == self.shown:
                return
            text = f"{self.name} {done} bytes"
        self.shown = step
        self.stream.write("\r" + text)
        self.stream.flush()

    def done(self, size):
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\n")
        self.stream.write(f"Downloaded {self.name} ({_size(size)}) from {self.url}\n")
        self.stream.flush()

    def interrupted(self):
        if self.live and self.shown >= 0:
            self.stream.write("\n")
            self.stream.flush()


def _fetch(url, dest, sha256, timeout, verbose):
    """Download ``url`` into ``dest`` atomically; the temp file never outlives a failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    progress = None
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.strip().isdigit() else None
                progress = _Progress(dest.name, url, total, verbose)
                h = hashlib.sha256()
                size = 0
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
                    progress.update(size)
            if total is not None and size != total:
                raise DownloadError(f"truncated transfer: received {size} of {total} bytes")
            if h.hexdigest() != sha256:
                raise DownloadError(f"SHA-256 mismatch: got {h.hexdigest()}, expected {sha256}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if progress is not None:
            progress.interrupted()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    progress.done(size)


def download_mnist(folder=None, *, mirrors=None, checksums=None, timeout=None, verbose=True):
    """Make sure ``folder`` holds the four gzipped MNIST files, verified by SHA-256.

    A file already present with the right checksum is kept; a missing or
    corrupt one is downloaded from each mirror in turn until one delivers the
    whole file with the right checksum.  Each download goes to a temporary
    file in ``folder``, is flushed to disk and then renamed over the final
    name, so ``folder`` never holds a partial file under a final name.

    Args:
        folder: destination folder (created if needed); default
            :func:`default_data_dir`.
        mirrors: base URLs to try in order; default :data:`MIRRORS` (read at
            call time).
        checksums: dict mapping each ``<name>.gz`` to its hex SHA-256; default
            :data:`SHA256` (read at call time).
        timeout: seconds to wait on a server; default :data:`TIMEOUT`.
        verbose: report progress on stderr.

    Returns:
        dict mapping each of the four ``<name>.gz`` file names to its Path.

    Raises:
        DownloadError: every mirror failed for some file; the message lists
            each URL with its error and how to place the files by hand.
    """
    folder = Path(os.fsdecode(folder)) if folder is not None else default_data_dir()
    mirrors = list(MIRRORS if mirrors is None else mirrors)
    checksums = SHA256 if checksums is None else checksums
    timeout = TIMEOUT if timeout is None else timeout
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for base in MNIST_FILES:
        name = base + ".gz"
        dest = folder / name
        if not _verified(dest, checksums[name]):
            errors = []
            for mirror in mirrors:
                url = mirror if mirror.endswith("/") else mirror + "/"
                url += name
                try:
                    _fetch(url, dest, checksums[name], timeout, verbose)
                    break
                except (OSError, http.client.HTTPException, ValueError) as e:
                    errors.append(f"  {url}: {e}")
                    if verbose and sys.stderr is not None:
                        print(f"Could not download {name} from {url}: {e}", file=sys.stderr)
            else:
                tried = "\n".join(errors) if errors else "  (no mirrors configured)"
                raise DownloadError(
                    f"could not download {name}; mirrors tried:\n{tried}\n{_manual_hint(folder)}"
                )
        paths[name] = dest
    return paths


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------


def _find_user_files(folder):
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder {folder} does not exist or is not a folder")
    found, missing = {}, []
    for base in MNIST_FILES:
        for candidate in (folder / (base + ".gz"), folder / base):
            if candidate.is_file():
                found[base] = candidate
                break
        else:
            missing.append(f"{base}[.gz]")
    if missing:
        raise FileNotFoundError(f"MNIST folder {folder} lacks {', '.join(missing)}")
    return found


def _check_split(images_path, labels_path):
    images, labels = load_idx(images_path), load_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IDXFormatError(
            f"{images_path}: expected uint8 images of shape (n, 28, 28), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IDXFormatError(
            f"{labels_path}: expected uint8 labels of shape (n,), got {labels.dtype} of shape {labels.shape}"
        )
    if len(labels) != len(images):
        raise IDXFormatError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    if len(labels) and labels.max() > 9:
        raise IDXFormatError(f"{labels_path}: label {labels.max()} is outside 0..9")
    return np.ascontiguousarray(images.reshape(len(images), 28 * 28)), labels


def load_mnist(path=None, *, download=True, verbose=True):
    """Load MNIST as ``(X_train, y_train), (X_test, y_test)``.

    The folder holding the four standard files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each gzipped with a ``.gz`` suffix or raw) is
    ``path`` if given, else the ``CNN_CORE_DATA`` environment variable if set,
    else :func:`default_data_dir`.

    A folder given by ``path`` or ``CNN_CORE_DATA`` is user data: its files are
    checked for structure but not against the official checksums, and nothing
    is ever downloaded into it.  The cache folder holds the gzipped files only;
    they are verified against :data:`SHA256`, and missing or corrupt ones are
    downloaded with :func:`download_mnist` when ``download`` is true.

    Args:
        path: folder holding the files (str or os.PathLike), or None.
        download: allow downloading into the cache folder.
        verbose: report download progress on stderr.

    Returns:
        ``X_train``: uint8 array (n_train, 784), C-contiguous, pixels 0..255,
        each row a 28x28 image in row-major order; ``y_train``: uint8 array
        (n_train,) of digits 0..9 (uint8, as stored; cast as needed);
        ``X_test``, ``y_test`` likewise.  Full MNIST has n_train = 60000 and
        n_test = 10000.

    Raises:
        FileNotFoundError: the folder or some files are missing (or, with
            ``download=False``, not present with a valid checksum in the cache).
        IDXFormatError: a file is malformed or not MNIST-shaped (images
            (n, 28, 28) uint8, labels (n,) uint8 in 0..9, equal counts).
        DownloadError: the cache lacks a file and no mirror delivered it.
    """
    if path is None and os.environ.get("CNN_CORE_DATA"):
        path = os.environ["CNN_CORE_DATA"]
    if path is not None:
        files = _find_user_files(Path(os.fsdecode(path)))
    else:
        folder = default_data_dir()
        if download:
            download_mnist(folder, verbose=verbose)
        else:
            names = [base + ".gz" for base in MNIST_FILES]
            bad = [name for name in names if not _verified(folder / name, SHA256[name])]
            if bad:
                raise FileNotFoundError(
                    f"no verified copy of {', '.join(bad)} in the MNIST cache {folder} "
                    f"(download=False). {_manual_hint(folder)}"
                )
        files = {name: folder / (name + ".gz") for name in MNIST_FILES}
    train = _check_split(files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"])
    test = _check_split(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"])
    return train, test
