"""The cnn_core model file: a small, versioned, pickle-free binary format.

Version 2 (written by :func:`save`) holds any layer stack of :mod:`cnn_core.layers`.
All integers and floats are little-endian:

    offset  size        field
    0       8           magic: the bytes 89 43 4E 4E 4D 4C 50 0A ("\\x89CNNMLP\\n")
    8       4  uint32   format version (2)
    12      4  uint32   number of layers L after the input (1 .. 32)
    16      4  uint32   loss: 0 cross_entropy (softmax outputs), 1 squared_error
    20      4  uint32   input rank: 1 for flat samples, 3 for images
    24      24 uint64   input height, width, channels; a flat sample of n features
                        is 1, 1, n
    48      64 L        one layer record per layer (below)
    48+64L  4P float32  parameters: for each Dense and Conv2D layer in order, W
                        row-major, then b; Dense W is (inputs, units), Conv2D W is
                        (kernel_h, kernel_w, in_channels, filters)
    end-4   4  uint32   CRC-32 (zlib polynomial) of every preceding byte

A layer record (64 bytes; a field the kind does not use must be 0, all bits):

    0   uint32   kind: 0 dense, 1 conv2d, 2 maxpool2d, 3 avgpool2d, 4 flatten, 5 dropout
    4   uint32   activation (dense, conv2d): 0 identity, 1 relu, 2 leaky_relu,
                 3 sigmoid, 4 tanh
    8   float64  leaky_relu slope in [0, 1) (dense, conv2d; the engine computes with
                 it rounded to float32, which must stay below 1)
    16  float64  dropout rate in [0, 1) (dropout; likewise)
    24  uint64   units (dense) or filters (conv2d)
    32  uint64   kernel height (conv2d) or window size (pools)
    40  uint64   kernel width (conv2d) or window size (pools)
    48  uint64   stride (conv2d, pools)
    56  uint32   padding (conv2d): 0 valid, 1 same
    60  uint32   reserved, 0

Every size is in [1, 2^24]; Dense takes flat inputs (Flatten first after images),
Conv2D and pooling take images, the last layer is Dense, and the shapes must chain as
:func:`cnn_core.layers.build` and the C engine (``cnn_net_check``) require.

Version 1 files (multilayer perceptrons, written by cnn_core before version 2) still
load, as a stack of Dense layers with the cross_entropy loss:

    0       8           magic, as above
    8       4  uint32   format version (1)
    12      4  uint32   number of dense layers L (1 .. 32)
    16      4  uint32   hidden activation code (as above); the last layer has none
    20      4  float32  leaky_relu slope
    24      8(L+1)      uint64 layer sizes n_0 .. n_L (inputs, hidden..., outputs)
    ...     4P float32  parameters: for each layer W (n_l, n_{l+1}), then b (n_{l+1})
    end-4   4  uint32   CRC-32 of every preceding byte

Reading checks the magic, version, counts, codes, slopes, rates, sizes, that the layers
fit together, the exact length, the checksum and that every parameter is finite before
returning anything; every way a file can be wrong raises :class:`ModelFileError`, which
names the file and what is wrong.  The C loader (``cnn_model.h``) accepts exactly the
same files.

Files are written atomically and durably: the bytes go to an unnamed file in the target's
folder (``O_TMPFILE`` on Linux; elsewhere a named temporary file ``.NAME.PID.XXXX.tmp``),
are flushed to disk, then the file is linked and renamed over the target and the folder is
flushed, so a crash or kill never leaves a half-written model under the target's name.  A
named temporary file left behind by a killed process is removed by the next save to the
same path.
"""
import errno
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from . import kernels, layers
from .kernels import HIDDEN_ACTIVATIONS

MAGIC = b"\x89CNNMLP\n"
VERSION = 2
MAX_LAYERS = 32
MAX_SIZE = layers.MAX_DIMENSION
_START = struct.Struct("<8sII")             # magic, version, L: shared by every version
_HEADER_V1 = struct.Struct("<8sIIIf")
_HEADER = struct.Struct("<8sIIII3Q")        # version 2
_RECORD = struct.Struct("<IIddQQQQII")
_FIELDS = ("kind", "activation", "slope", "rate", "units", "kernel_h", "kernel_w",
           "stride", "padding", "reserved")
# the record fields each kind uses (the others must be 0)
_USES = {"dense": {"activation", "slope", "units"},
         "conv2d": {"activation", "slope", "units", "kernel_h", "kernel_w", "stride",
                    "padding"},
         "maxpool2d": {"kernel_h", "kernel_w", "stride"},
         "avgpool2d": {"kernel_h", "kernel_w", "stride"},
         "flatten": set(),
         "dropout": {"rate"}}
_KIND_NAMES = {code: name for name, code in kernels.LAYER_KINDS.items()}
_LOSS_NAMES = {code: name for name, code in kernels.LOSSES.items()}
_PADDINGS = ("valid", "same")


class ModelFileError(ValueError):
    """A model file is truncated, corrupted, of another version, or not a model file."""


# ---- writing ---------------------------------------------------------------------------

def _record(layer):
    """The 64-byte record of a cnn_core.layers layer (not Input)."""
    config = layer.config()
    fields = dict.fromkeys(_FIELDS, 0)
    fields["kind"] = kernels.LAYER_KINDS[layer.kind]
    if "activation" in config:
        fields["activation"] = kernels.ACTIVATIONS[config["activation"]]
        fields["slope"] = config["leaky_slope"]
    if layer.kind == "dropout":
        fields["rate"] = config["rate"]
    fields["units"] = config.get("units", config.get("filters", 0))
    if layer.kind == "conv2d":
        fields["kernel_h"], fields["kernel_w"] = config["kernel_size"]
        fields["padding"] = _PADDINGS.index(config["padding"])
    if "size" in config:
        fields["kernel_h"] = fields["kernel_w"] = config["size"]
    if "stride" in config:
        fields["stride"] = config["stride"]
    return _RECORD.pack(*(fields[f] for f in _FIELDS))


def encode(stack, loss, params):
    """The bytes of a version-2 model file for a layer stack (Input first), a loss name
    of kernels.LOSSES and the flat float32 parameter vector."""
    shape = tuple(stack[0].shape)
    dims = (1, 1) + shape if len(shape) == 1 else shape
    body = _HEADER.pack(MAGIC, VERSION, len(stack) - 1, kernels.LOSSES[loss], len(shape),
                        *dims)
    body += b"".join(_record(layer) for layer in stack[1:])
    body += np.ascontiguousarray(params, dtype="<f4").tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


# ---- reading ---------------------------------------------------------------------------

def _layer(fields, position, name):
    """The cnn_core.layers layer of a decoded record (a dict of _FIELDS) at `position`
    in the stack (Input is 0)."""
    where = f"{name} has a corrupted layer {position}"
    kind = _KIND_NAMES.get(fields["kind"])
    if kind is None:
        raise ModelFileError(f"{where} (kind code {fields['kind']}; 0 to "
                             f"{len(_KIND_NAMES) - 1} are defined)")
    for field in _FIELDS[1:]:
        bits = fields[field]
        if isinstance(bits, float):
            bits = struct.unpack("<Q", struct.pack("<d", bits))[0]
        if field not in _USES[kind] and bits != 0:
            raise ModelFileError(f"{where} ({kind} does not use {field}, which must be "
                                 f"0, got {fields[field]})")
    for field in ("units", "kernel_h", "kernel_w", "stride"):
        if field in _USES[kind] and not 1 <= fields[field] <= MAX_SIZE:
            raise ModelFileError(f"{where} ({kind} {field} {fields[field]}; 1 to "
                                 f"{MAX_SIZE} are possible)")
    if "activation" in _USES[kind]:
        if fields["activation"] >= len(HIDDEN_ACTIVATIONS):
            raise ModelFileError(f"{where} (activation code {fields['activation']}; 0 to "
                                 f"{len(HIDDEN_ACTIVATIONS) - 1} are defined)")
        if not 0.0 <= fields["slope"] < 1.0:
            raise ModelFileError(f"{where} (leaky_relu slope {fields['slope']} is outside "
                                 f"[0, 1))")
    activation = HIDDEN_ACTIVATIONS[fields["activation"]]
    if kind == "dense":
        return layers.Dense(fields["units"], activation, fields["slope"])
    if kind == "conv2d":
        if fields["padding"] >= len(_PADDINGS):
            raise ModelFileError(f"{where} (padding code {fields['padding']}; 0 valid and "
                                 f"1 same are defined)")
        return layers.Conv2D(fields["units"], (fields["kernel_h"], fields["kernel_w"]),
                             fields["stride"], _PADDINGS[fields["padding"]], activation,
                             fields["slope"])
    if kind in ("maxpool2d", "avgpool2d"):
        if fields["kernel_h"] != fields["kernel_w"]:
            raise ModelFileError(f"{where} ({kind} windows are square, got "
                                 f"{fields['kernel_h']}x{fields['kernel_w']})")
        return layers.KINDS[kind](fields["kernel_h"], fields["stride"])
    if kind == "dropout":
        if not 0.0 <= fields["rate"] < 1.0:
            raise ModelFileError(f"{where} (dropout rate {fields['rate']} is outside "
                                 f"[0, 1))")
        return layers.Dropout(fields["rate"])
    return layers.Flatten()


def _decode_v2(data, name):
    """(stack, loss, params offset) of a version-2 file, its header checked."""
    if len(data) < _HEADER.size + 4:
        raise ModelFileError(f"{name} is truncated ({len(data)} bytes)")
    _, _, n_layers, loss, rank, *dims = _HEADER.unpack_from(data)
    if loss not in _LOSS_NAMES:
        raise ModelFileError(f"{name} has a corrupted header (loss code {loss}; 0 to "
                             f"{len(_LOSS_NAMES) - 1} are defined)")
    if rank not in (1, 3) or (rank == 1 and dims[:2] != [1, 1]) \
            or not all(1 <= d <= MAX_SIZE for d in dims) or math.prod(dims) > MAX_SIZE:
        raise ModelFileError(f"{name} has a corrupted header (input of rank {rank}, "
                             f"shape {tuple(dims)})")
    records_end = _HEADER.size + _RECORD.size * n_layers
    if len(data) < records_end + 4:
        raise ModelFileError(f"{name} is truncated ({len(data)} bytes)")
    stack = [layers.Input(tuple(dims[3 - rank:]))]
    for i in range(n_layers):
        fields = dict(zip(_FIELDS, _RECORD.unpack_from(data, _HEADER.size + _RECORD.size * i)))
        stack.append(_layer(fields, i + 1, name))
    try:
        stack = layers.build(stack)
    except layers.LayerError as error:
        raise ModelFileError(f"{name} holds layers that do not fit together: {error}") from None
    return stack, _LOSS_NAMES[loss], records_end


def _decode_v1(data, name):
    """(stack, loss, params offset) of a version-1 file, its header checked."""
    if len(data) < _HEADER_V1.size + 4:
        raise ModelFileError(f"{name} is truncated ({len(data)} bytes)")
    _, _, n_layers, code, slope = _HEADER_V1.unpack_from(data)
    if code >= len(HIDDEN_ACTIVATIONS):
        raise ModelFileError(f"{name} has a corrupted header (activation code {code}; "
                             f"0 to {len(HIDDEN_ACTIVATIONS) - 1} are defined)")
    if not 0.0 <= slope < 1.0:
        raise ModelFileError(f"{name} has a corrupted header (leaky_relu slope {slope} "
                             f"is outside [0, 1))")
    sizes_end = _HEADER_V1.size + 8 * (n_layers + 1)
    if len(data) < sizes_end + 4:
        raise ModelFileError(f"{name} is truncated ({len(data)} bytes)")
    sizes = struct.unpack_from(f"<{n_layers + 1}Q", data, _HEADER_V1.size)
    if not all(1 <= s <= MAX_SIZE for s in sizes):
        raise ModelFileError(f"{name} has a corrupted header (layer sizes {sizes})")
    return (layers.build(layers.mlp(sizes, HIDDEN_ACTIVATIONS[code], slope)),
            "cross_entropy", sizes_end)


def _structure(data, name):
    """(stack, loss, offset of the parameters, their number) of a model file whose magic
    is right, its header and length checked."""
    _, version, n_layers = _START.unpack_from(data)
    if version not in (1, VERSION):
        raise ModelFileError(f"{name} has format version {version}; this cnn_core reads "
                             f"versions 1 and {VERSION} (upgrade cnn_core to read it)")
    if not 1 <= n_layers <= MAX_LAYERS:
        raise ModelFileError(f"{name} has a corrupted header ({n_layers} layers; "
                             f"1 to {MAX_LAYERS} are possible)")
    stack, loss, start = (_decode_v1 if version == 1 else _decode_v2)(data, name)
    n_params = sum(layer.n_parameters for layer in stack[1:])
    expected = start + 4 * n_params + 4
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "longer than its header says"
        raise ModelFileError(f"{name} is {kind}: {len(data)} bytes, expected {expected}")
    return stack, loss, start, n_params


def decode(data, name="model file"):
    """(stack, loss, params) from the bytes of a model file (version 1 or 2): the built
    layers (Input first), the loss name and the float32 parameters; ModelFileError if
    anything is wrong."""
    if len(data) < _START.size or not data.startswith(MAGIC):
        raise ModelFileError(f"{name} is not a cnn_core model file (bad magic or too short)")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    checksum_ok = crc == zlib.crc32(memoryview(data)[:-4])
    try:
        stack, loss, start, n_params = _structure(data, name)
    except ModelFileError as error:
        if checksum_ok:
            raise
        raise ModelFileError(f"{error} -- but its checksum does not match either, so the "
                             f"file is more likely damaged") from None
    if not checksum_ok:
        raise ModelFileError(f"{name} is corrupted (checksum mismatch)")
    params = kernels._workspace(n_params)
    params[:] = np.frombuffer(data, dtype="<f4", offset=start, count=n_params)
    bad = np.count_nonzero(~np.isfinite(params))
    if bad:
        raise ModelFileError(f"{name} holds {bad} NaN or infinite parameters (checksum "
                             f"valid: the network was saved after diverging, or edited)")
    try:    # what the C engine refuses (cnn_net_check), e.g. padding it cannot do
        kernels._Net(stack, loss, params)
    except ValueError as error:
        raise ModelFileError(f"{name} holds a network the engine cannot run: {error}") from None
    return stack, loss, params


_TMP_SUFFIX = ".tmp"


def _temporary_names(path):
    """Names of the named temporary files of saves to `path` (any process)."""
    prefix = f".{path.name}."
    try:
        entries = os.listdir(path.parent)
    except OSError:
        return []
    return [e for e in entries if e.startswith(prefix) and e.endswith(_TMP_SUFFIX)]


def _writer_is_gone(name, path):
    """True if the temporary file `name` belongs to a process that no longer runs."""
    pid = name[len(path.name) + 2:-len(_TMP_SUFFIX)].split(".")[0]
    if not pid.isdigit():
        return False
    if os.name != "posix":      # no harmless liveness probe: an open file cannot be
        return True             # removed there anyway, so trying is safe
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_orphans(path):
    """Remove the temporary files that killed saves to `path` left in its folder."""
    path = Path(os.fsdecode(path))
    for name in _temporary_names(path):
        if _writer_is_gone(name, path):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass


def _write_all(fd, data):
    """Write every byte of data to fd (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_USE_UNNAMED = True     # False forces the named-temporary fallback (tests use it)


def _open_unnamed(folder):
    """A file descriptor of a new unnamed file in folder (O_TMPFILE), or None."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not _USE_UNNAMED or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY | os.O_CLOEXEC, 0o666)
    except OSError:             # this filesystem or kernel has no O_TMPFILE
        return None


def _link_unnamed(fd, path):
    """A temporary name in path's folder for the unnamed file fd (linkat cannot replace
    a file, so the name is then renamed over path)."""
    fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{_TMP_SUFFIX}"
            try:    # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: gives fd a name
                os.link(str(fd), tmp, src_dir_fd=fds, follow_symlinks=True)
                return tmp
            except FileExistsError:
                continue
    finally:
        os.close(fds)


def _new_named(folder, path):
    """(fd, name) of a new named temporary file for a save to path, mode as the umask."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.{os.getpid()}.",
                               suffix=_TMP_SUFFIX)
    if hasattr(os, "umask"):    # mkstemp makes 0600 files
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
    return fd, Path(tmp)


def write_atomic(path, data):
    """Write bytes to path atomically and durably (see the module docstring).

    Raises FileNotFoundError if the folder does not exist, IsADirectoryError if path is a
    folder, and OSError naming path if writing fails (a full disk, a file size limit); the
    previous file at path, if any, is then left as it was and nothing else remains.
    """
    path = Path(os.fsdecode(path))
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"cannot save to {path}: folder {folder} "
                                f"does not exist")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot save to {path}: it is a folder; "
                                f"give a file name inside it")
    remove_orphans(path)
    fd, tmp = None, None
    try:
        fd = _open_unnamed(folder)
        if fd is None:
            fd, tmp = _new_named(folder, path)
        _write_all(fd, data)
        os.fsync(fd)
        if tmp is None:
            tmp = _link_unnamed(fd, path)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException as e:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and e.errno is not None:
            raise type(e)(e.errno, f"cannot save to {path}: {e.strerror}") from e
        raise
    if hasattr(os, "O_DIRECTORY"):     # make the rename itself durable
        try:
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


def save(path, stack, loss, params):
    """Write a version-2 model file of a layer stack (cnn_core.layers, Input first), a
    loss name ("cross_entropy" or "squared_error") and the flat float32 parameter
    vector, atomically.  LayerError if the layers do not fit together, ValueError if
    the loss is unknown, params has the wrong length or holds NaN or infinity (no
    reader would accept the file)."""
    stack = layers.build(stack)
    if loss not in kernels.LOSSES:
        raise ValueError(f"loss must be one of {list(kernels.LOSSES)}, got {loss!r}")
    params = np.asarray(params)
    n_params = sum(layer.n_parameters for layer in stack[1:])
    if params.shape != (n_params,):
        raise ValueError(f"params must hold the {n_params} parameters of the layers, got "
                         f"shape {params.shape}")
    bad = np.count_nonzero(~np.isfinite(params))
    if bad:
        raise ValueError(f"cannot save to {path}: {bad} parameters are NaN or infinite")
    write_atomic(path, encode(stack, loss, params))


def load(path):
    """(stack, loss, params) of a model file: the built layers (cnn_core.layers, Input
    first), the loss name and the float32 parameters; ModelFileError if it is invalid."""
    path = Path(os.fsdecode(path))
    with open(path, "rb") as f:
        data = f.read()
    return decode(data, name=str(path))
