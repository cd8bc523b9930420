"""Conv2D, pooling and dropout kernels (NHWC) against float64 numpy references written
here from the definitions: odd shapes (height and width 1, 2, 5, 7, 28, 31; channels 1,
3, 6, 16, 17; kernels 1, 3, 5; strides 1 and 2; valid and same padding; batch 1 and odd
batches), every GEMM kernel family this CPU can run, the plain C references, thread-count
independence, the dropout mask, and argument checking."""
import math

import numpy as np
import pytest

from cnn_core import kernels

KERNELS = kernels.available_kernels()
SIZES = [1, 2, 5, 7, 28, 31]
CHANNELS = [1, 3, 6, 16, 17]
KSIZES = [1, 3, 5]
STRIDES = [1, 2]
BATCHES = [1, 3, 5]


def _conv_cases():
    """30 cases cycling through every listed value in every role (the cross product
    sampled, not enumerated); a kernel larger than a valid input switches to "same"."""
    cases = []
    for i in range(30):
        h, w = SIZES[i % 6], SIZES[(i * 5 + 2) % 6]
        k = KSIZES[i % 3]
        kw = KSIZES[(i + i // 3) % 3] if i % 4 == 3 else k     # a few non-square kernels
        padding = ["valid", "same"][(i // 2) % 2]
        if padding == "valid" and (k > h or kw > w):
            padding = "same"
        cases.append((BATCHES[i % 3], h, w, CHANNELS[i % 5], CHANNELS[(i + 2) % 5],
                      (k, kw), STRIDES[(i // 3) % 2], padding))
    return cases


CONV_CASES = _conv_cases()


@pytest.fixture(autouse=True)
def restore_kernel():
    """Leave the kernel selection as each test found it."""
    saved = kernels.get_kernel()
    yield
    kernels.set_kernel(saved)


# ---- float64 references --------------------------------------------------------------

def geometry(n, k, stride, padding):
    """(out, pad_before) of one axis, from the layer contract."""
    if padding == "valid":
        return (n - k) // stride + 1, 0
    out = -(-n // stride)
    return out, max((out - 1) * stride + k - n, 0) // 2


def padded(X, kh, kw, stride, padding):
    """X zero-padded as the convolution sees it, and (out_h, out_w)."""
    oh, pt = geometry(X.shape[1], kh, stride, padding)
    ow, pl = geometry(X.shape[2], kw, stride, padding)
    rows = max((oh - 1) * stride + kh, X.shape[1] + pt)
    cols = max((ow - 1) * stride + kw, X.shape[2] + pl)
    P = np.zeros((X.shape[0], rows, cols, X.shape[3]))
    P[:, pt:pt + X.shape[1], pl:pl + X.shape[2]] = X
    return P, oh, ow, pt, pl


def conv_forward64(X, W, b, stride, padding):
    """(Y, scale): float64 conv + b, and sum |x w| + |b| for the error bound."""
    kh, kw = W.shape[:2]
    P, oh, ow, _, _ = padded(X.astype(np.float64), kh, kw, stride, padding)
    W64 = W.astype(np.float64)
    Y = np.zeros((X.shape[0], oh, ow, W.shape[3])) + b
    scale = np.zeros_like(Y) + np.abs(b)
    for ky in range(kh):
        for kx in range(kw):
            win = P[:, ky:ky + (oh - 1) * stride + 1:stride, kx:kx + (ow - 1) * stride + 1:stride]
            Y += win @ W64[ky, kx]
            scale += np.abs(win) @ np.abs(W64[ky, kx])
    return Y, scale


def conv_backward64(X, W, dY, stride, padding):
    """float64 (dX, dW, db) and their error scales."""
    kh, kw = W.shape[:2]
    P, oh, ow, pt, pl = padded(X.astype(np.float64), kh, kw, stride, padding)
    W64, d = W.astype(np.float64), dY.astype(np.float64)
    dP, dPs = np.zeros_like(P), np.zeros_like(P)
    dW, dWs = np.zeros(W.shape), np.zeros(W.shape)
    for ky in range(kh):
        for kx in range(kw):
            sl = (slice(None), slice(ky, ky + (oh - 1) * stride + 1, stride),
                  slice(kx, kx + (ow - 1) * stride + 1, stride))
            win = P[sl]
            dW[ky, kx] = np.einsum("nhwc,nhwo->co", win, d)
            dWs[ky, kx] = np.einsum("nhwc,nhwo->co", np.abs(win), np.abs(d))
            dP[sl] += d @ W64[ky, kx].T
            dPs[sl] += np.abs(d) @ np.abs(W64[ky, kx]).T
    crop = (slice(None), slice(pt, pt + X.shape[1]), slice(pl, pl + X.shape[2]))
    db = d.sum(axis=(0, 1, 2))
    return (dP[crop], dW, db), (dPs[crop], dWs, np.abs(d).sum(axis=(0, 1, 2)))


def assert_close(got, expected, scale, name, rtol=1e-4):
    assert got.dtype == np.float32 and got.shape == expected.shape, name
    assert np.all(np.isfinite(got)), name
    err = np.abs(got.astype(np.float64) - expected)
    assert np.all(err <= rtol * scale + 1e-30), f"{name}: max error {err.max()}"


def operands(rng, batch, h, w, c_in, c_out, ksize, stride, padding):
    kh, kw = ksize
    X = rng.standard_normal((batch, h, w, c_in)).astype(np.float32)
    W = rng.standard_normal((kh, kw, c_in, c_out)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    oh, _ = geometry(h, kh, stride, padding)
    ow, _ = geometry(w, kw, stride, padding)
    dY = rng.standard_normal((batch, oh, ow, c_out)).astype(np.float32)
    return X, W, b, dY


def test_cases_cover_every_listed_value():
    """The sampled grid really contains each size, channel count, kernel, stride, padding
    and batch size of the specification."""
    for i, values in ((1, SIZES), (2, SIZES), (3, CHANNELS), (4, CHANNELS), (6, STRIDES),
                      (0, BATCHES)):
        assert {case[i] for case in CONV_CASES} >= set(values)
    assert {case[5][0] for case in CONV_CASES} >= set(KSIZES)
    assert {case[7] for case in CONV_CASES} == {"valid", "same"}
    assert any(case[5][0] != case[5][1] for case in CONV_CASES)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])) +
                         f"-k{c[5][0]}{c[5][1]}-s{c[6]}-{c[7]}")
def test_conv_against_float64(kernel, case):
    kernels.set_kernel(kernel)
    batch, h, w, c_in, c_out, ksize, stride, padding = case
    rng = np.random.default_rng(CONV_CASES.index(case))
    X, W, b, dY = operands(rng, *case)
    Y64, Ys = conv_forward64(X, W, b, stride, padding)
    grads64, scales = conv_backward64(X, W, dY, stride, padding)
    for reference in (False, True):
        Y = kernels.conv2d_forward(X, W, b, stride, padding, reference=reference)
        assert_close(Y, Y64, Ys, f"Y reference={reference}")
        got = kernels.conv2d_backward(X, W, dY, stride, padding, reference=reference)
        for g, e, sc, name in zip(got, grads64, scales, ("dX", "dW", "db")):
            assert_close(g, e, sc, f"{name} reference={reference}")
    dX, dW, db = kernels.conv2d_backward(X, W, dY, stride, padding, compute_dX=False)
    assert dX is None
    assert_close(dW, grads64[1], scales[1], "dW without dX")


# First layers on grey images (one input channel, stride 1, up to 8 filters) have their
# own forward and dW tiles along output rows (the dW ones over pairs of kernel rows, with
# the AVX-512 family): every tile width 1-8, rows of whole and partial vectors, each
# kernel width they take, odd and even kernel heights.
FIRST_LAYER_CASES = [(w, k, c_out, padding) for w in (1, 2, 7, 8, 9, 16, 28, 31)
                     for k, c_out, padding in ((3, 6, "same"), (5, 8, "same"),
                                               (5, 1, "valid"), (3, 3, "valid"), (1, 6, "same"))
                     if padding == "same" or k <= w]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", FIRST_LAYER_CASES, ids=lambda c: "w%d-k%d-o%d-%s" % c)
def test_first_layer_against_float64(kernel, case):
    kernels.set_kernel(kernel)
    w, k, c_out, padding = case
    X, W, b, dY = operands(np.random.default_rng(w * k), 3, 5, w, 1, c_out, (k, k), 1,
                           padding)
    assert_first_layer_close(X, W, b, dY, padding)


def assert_first_layer_close(X, W, b, dY, padding):
    """A stride-1 layer's Y, and its dW and db on one and two threads, against float64
    (a first layer: no dX)."""
    Y64, Ys = conv_forward64(X, W, b, 1, padding)
    assert_close(kernels.conv2d_forward(X, W, b, 1, padding), Y64, Ys, "Y")
    grads64, scales = conv_backward64(X, W, dY, 1, padding)
    for threads in (1, 2):
        _, dW, db = kernels.conv2d_backward(X, W, dY, 1, padding, compute_dX=False,
                                            n_threads=threads)
        assert_close(dW, grads64[1], scales[1], "dW")
        assert_close(db, grads64[2], scales[2], "db")


def sparse_images(rng, h, w):
    """Grey images whose nonzero values sit in different boxes: a block inside, one
    pixel in each corner, the first or last row or column only, a scattered few, all
    zeros, none zero, and signed zeros around a block."""
    X = np.zeros((10, h, w, 1), np.float32)
    X[0, h // 4:h // 4 + max(1, h // 3), w // 3:w // 3 + max(1, w // 4)] = 1.0
    X[1, 0, 0] = X[2, -1, -1] = X[3, 0, -1] = 1.0
    X[4, -1, :] = 1.0
    X[5, :, 0] = 1.0
    X[6][rng.random((h, w, 1)) < 0.05] = 1.0
    X[8] = 1.0
    X[9] = -0.0
    X[9, h // 2, w // 2] = 1.0
    return X * rng.standard_normal(X.shape).astype(np.float32)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("h,w,k,padding", [(28, 28, 5, "same"), (13, 11, 3, "same"),
                                           (9, 30, 5, "valid"), (6, 7, 3, "valid"),
                                           (2, 9, 5, "same")])
def test_first_layer_on_mostly_zero_images(kernel, h, w, k, padding):
    """A first layer skips the kernel rows and tiles whose windows see only an image's
    zeros (its nonzero box): every output and gradient must keep its float64 value,
    wherever the nonzeros are (edges, corners, nowhere)."""
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(h * w + k)
    X = sparse_images(rng, h, w)
    _, W, b, dY = operands(rng, len(X), h, w, 1, 6, (k, k), 1, padding)
    assert_first_layer_close(X, W, b, dY, padding)
    # image by image: each one's dW comes from its own box alone
    for i in (1, 2, 4, 7):
        _, dW, _ = kernels.conv2d_backward(X[i:i + 1], W, dY[i:i + 1], 1, padding,
                                           compute_dX=False)
        g64, sc = conv_backward64(X[i:i + 1], W, dY[i:i + 1], 1, padding)
        assert_close(dW, g64[1], sc[1], f"dW of image {i}")


def pooled_gradient(rng, shape, alive=0.6):
    """A dY as max pooling (2x2) and relu leave it: in each 2x2 block of each channel
    one entry, at a random place, is nonzero with probability `alive`; odd edges zero."""
    n, h, w, c = shape
    dY = np.zeros(shape, dtype=np.float32)
    for y in range(0, h - 1, 2):
        for x in range(0, w - 1, 2):
            pick = rng.integers(0, 4, size=(n, c))
            keep = rng.random((n, c)) < alive
            values = rng.standard_normal((n, c)).astype(np.float32) * keep
            for k in range(4):
                sel = pick == k
                dY[:, y + k // 2, x + k % 2][sel] = values[sel]
    return dY


# (batch, h, w, c_in, c_out, kernel, stride, padding): kernel rows of at least 16 floats
# (kernel_w in_c) take the sparse passes with the AVX2 and AVX-512 families, up to
# 7 kernel rows and 64 channels; the others (8 rows, 65 channels, rows of 5) stay dense
SPARSE_DY_CASES = [(3, 14, 14, 6, 16, (5, 5), 1, "valid"), (1, 12, 10, 6, 16, (5, 5), 1, "same"),
                   (5, 9, 11, 16, 1, (1, 1), 1, "valid"), (3, 7, 13, 3, 17, (7, 7), 1, "same"),
                   (3, 11, 8, 8, 64, (3, 3), 2, "same"), (1, 5, 6, 32, 33, (2, 1), 1, "valid"),
                   (3, 9, 9, 17, 6, (1, 1), 2, "valid"), (1, 10, 10, 4, 65, (4, 4), 1, "same"),
                   (3, 12, 12, 2, 6, (8, 8), 1, "same"), (3, 10, 9, 1, 6, (5, 5), 1, "same"),
                   (1, 8, 9, 7, 5, (5, 5), 1, "same"), (3, 9, 9, 17, 20, (3, 3), 1, "same"),
                   (1, 6, 7, 40, 3, (2, 2), 2, "valid")]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", SPARSE_DY_CASES, ids=lambda c: "x".join(map(str, c[:5])) +
                         f"-k{c[5][0]}{c[5][1]}-s{c[6]}-{c[7]}")
def test_backward_on_pooled_gradients(kernel, case):
    """dY that is mostly zeros (after max pooling and relu), where the backward passes
    take its nonzero entries only: dX and dW against float64, the same bits on 1, 2 and
    3 threads, and dY's NaN still reaching dX and dW."""
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(SPARSE_DY_CASES.index(case))
    X, W, _, dY = operands(rng, *case)
    stride, padding = case[6:]
    dY = pooled_gradient(rng, dY.shape)
    grads64, scales = conv_backward64(X, W, dY, stride, padding)
    runs = [kernels.conv2d_backward(X, W, dY, stride, padding, n_threads=n) for n in (1, 2, 3)]
    for g, e, sc, name in zip(runs[0], grads64, scales, ("dX", "dW", "db")):
        assert_close(g, e, sc, name)
    for run in runs[1:]:
        for a, r in zip(runs[0], run):
            assert np.array_equal(a, r)
    dY[0, 0, 0, 0] = np.nan
    dX, dW, _ = kernels.conv2d_backward(X, W, dY, stride, padding)
    assert np.isnan(dW[..., 0]).any() and np.isnan(dX[0]).any()


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_conv_activation_epilogue(activation):
    rng = np.random.default_rng(1)
    X, W, b, _ = operands(rng, 3, 7, 5, 3, 6, (3, 3), 1, "same")
    Z, _ = conv_forward64(X, W, b, 1, "same")
    expected = {"relu": lambda z: np.maximum(z, 0),
                "leaky_relu": lambda z: np.where(z > 0, z, 0.1 * z),
                "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
                "tanh": np.tanh}[activation](Z)
    for reference in (False, True):
        Y = kernels.conv2d_forward(X, W, b, 1, "same", activation, alpha=0.1,
                                   reference=reference)
        assert np.allclose(Y, expected, rtol=1e-5, atol=1e-5), activation


def test_conv_on_real_mnist_images(mnist):
    """LeNet-5's first two convolutions on real (mostly zero) images: the GEMM's sparse
    paths must give the reference values."""
    X_train = mnist[0]
    rng = np.random.default_rng(2)
    X = (X_train[:9].reshape(9, 28, 28, 1) / np.float32(255)).astype(np.float32)
    W = (0.2 * rng.standard_normal((5, 5, 1, 6))).astype(np.float32)
    b = np.zeros(6, np.float32)
    Y = kernels.conv2d_forward(X, W, b, 1, "same", "relu")
    Y64, Ys = conv_forward64(X, W, b, 1, "same")
    assert_close(Y, np.maximum(Y64, 0), Ys, "Y")
    dY = rng.standard_normal(Y.shape).astype(np.float32) * (Y > 0)
    grads64, scales = conv_backward64(X, W, dY, 1, "same")
    for g, e, sc, name in zip(kernels.conv2d_backward(X, W, dY, 1, "same"), grads64, scales,
                              ("dX", "dW", "db")):
        assert_close(g, e, sc, name)


def test_geometry_matches_the_contract():
    for n in SIZES:
        for k in KSIZES:
            for stride in STRIDES:
                for padding in ("valid", "same"):
                    if padding == "valid" and k > n:
                        with pytest.raises(ValueError, match="does not fit"):
                            kernels.conv2d_geometry(n, n, k, stride, padding)
                        continue
                    out, pad = geometry(n, k, stride, padding)
                    assert kernels.conv2d_geometry(n, n + 1, (k, 1), stride, padding)[::2] == \
                        (out, pad)


# ---- pooling ---------------------------------------------------------------------------

POOL_CASES = [(1, 1, 1, 1, 1, None), (3, 2, 5, 3, 2, None), (5, 7, 7, 6, 3, 2),
              (1, 28, 28, 6, 2, None), (3, 31, 5, 17, 5, 1), (1, 5, 31, 16, 3, 3),
              (3, 28, 31, 1, 2, 1), (5, 7, 2, 3, 2, 3)]


def windows(X, size, stride):
    """(batch, out_h, out_w, size * size, channels) view of the pooling windows."""
    oh = (X.shape[1] - size) // stride + 1
    ow = (X.shape[2] - size) // stride + 1
    out = np.empty((X.shape[0], oh, ow, size * size, X.shape[3]), X.dtype)
    for i in range(size):
        for j in range(size):
            out[:, :, :, i * size + j] = X[:, i:i + (oh - 1) * stride + 1:stride,
                                           j:j + (ow - 1) * stride + 1:stride]
    return out


def pool_backward64(dY, X, size, stride, average):
    """float64 dX: dY to each window's first maximum, or spread evenly."""
    dX = np.zeros(X.shape)
    first = windows(X, size, stride).argmax(axis=3)
    n, oh, ow, c = dY.shape
    for oy in range(oh):
        for ox in range(ow):
            for i in range(size):
                for j in range(size):
                    if average:
                        g = dY[:, oy, ox] / (size * size)
                    else:
                        g = np.where(first[:, oy, ox] == i * size + j, dY[:, oy, ox], 0.0)
                    dX[:, oy * stride + i, ox * stride + j] += g
    return dX


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "x".join(map(str, c)))
def test_pooling_against_float64(case):
    batch, h, w, ch, size, stride = case
    st = size if stride is None else stride
    rng = np.random.default_rng(sum(case[:5]))
    # few distinct values, so windows hold ties and the first maximum matters
    X = rng.integers(-3, 4, (batch, h, w, ch)).astype(np.float32)
    win = windows(X.astype(np.float64), size, st)
    dY = rng.standard_normal(win.shape[:3] + (ch,)).astype(np.float32)
    for reference in (False, True):
        assert np.array_equal(kernels.maxpool2d_forward(X, size, stride, reference=reference),
                              win.max(axis=3))
        assert np.allclose(kernels.avgpool2d_forward(X, size, stride, reference=reference),
                           win.mean(axis=3), rtol=1e-6, atol=1e-6)
        dX = kernels.maxpool2d_backward(dY, X, size, stride, reference=reference)
        assert np.allclose(dX, pool_backward64(dY, X, size, st, False), rtol=1e-6, atol=1e-6)
        dX = kernels.avgpool2d_backward(dY, X.shape, size, stride, reference=reference)
        assert np.allclose(dX, pool_backward64(dY, X, size, st, True), rtol=1e-6, atol=1e-6)


def test_pooling_fast_equals_reference_bitwise():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((5, 13, 11, 17)).astype(np.float32)
    dY = rng.standard_normal((5, 6, 5, 17)).astype(np.float32)
    for name in ("maxpool2d", "avgpool2d"):
        fwd = getattr(kernels, name + "_forward")
        assert np.array_equal(fwd(X, 3, 2), fwd(X, 3, 2, reference=True))
    assert np.array_equal(kernels.maxpool2d_backward(dY, X, 3, 2),
                          kernels.maxpool2d_backward(dY, X, 3, 2, reference=True))
    assert np.array_equal(kernels.avgpool2d_backward(dY, X.shape, 3, 2),
                          kernels.avgpool2d_backward(dY, X.shape, 3, 2, reference=True))


# Shapes whose windows tile the image (size == stride, sizes divisible), the vector
# path of max pooling, with a row of more than 32 windows; and some that do not.
TILING_POOL_CASES = [(1, 2, 2, 1, 2), (3, 28, 28, 6, 2), (2, 10, 10, 16, 2), (1, 6, 9, 17, 3),
                     (3, 4, 70, 3, 2), (1, 1, 5, 8, 1), (5, 14, 14, 64, 2), (1, 4, 4, 65, 2),
                     (2, 31, 31, 6, 2), (1, 7, 7, 1, 2)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", TILING_POOL_CASES, ids=lambda c: "x".join(map(str, c)))
def test_max_pooling_fast_paths_equal_reference(kernel, case):
    kernels.set_kernel(kernel)
    batch, h, w, ch, size = case
    rng = np.random.default_rng(h * w + ch)
    # few distinct values, so windows hold ties (the first maximum must win), and zeros
    X = rng.integers(-2, 3, (batch, h, w, ch)).astype(np.float32)
    X[0, 0, 0, 0] = np.nan
    oh, ow = (h - size) // size + 1, (w - size) // size + 1
    dY = rng.standard_normal((batch, oh, ow, ch)).astype(np.float32)
    dY[-1, -1, -1, -1] = -0.0
    Y = kernels.maxpool2d_forward(X, size)
    assert np.array_equal(Y, kernels.maxpool2d_forward(X, size, reference=True), equal_nan=True)
    dX = kernels.maxpool2d_backward(dY, X, size)
    assert np.array_equal(dX, kernels.maxpool2d_backward(dY, X, size, reference=True))
    assert np.allclose(dX, pool_backward64(dY, np.nan_to_num(X, nan=np.inf), size, size,
                                           False))


# ---- thread-count independence ---------------------------------------------------------

@pytest.mark.parametrize("kernel", KERNELS)
def test_thread_count_is_bit_identical(kernel):
    """LeNet-5 sized layers (large enough to run on several threads) give the same bits
    on 1, 2 and 3 threads."""
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(4)
    for case in ((9, 28, 28, 1, 6, (5, 5), 1, "same"), (9, 14, 14, 6, 16, (5, 5), 1, "valid"),
                 (9, 31, 28, 3, 17, (3, 3), 2, "same")):
        X, W, b, dY = operands(rng, *case)
        stride, padding = case[6:]
        runs = [(kernels.conv2d_forward(X, W, b, stride, padding, "relu", n_threads=n),) +
                kernels.conv2d_backward(X, W, dY, stride, padding, n_threads=n)
                for n in (1, 2, 3)]
        for run in runs[1:]:
            for a, r in zip(runs[0], run):
                assert np.array_equal(a, r)
    X = rng.standard_normal((9, 28, 28, 6)).astype(np.float32)
    dY = rng.standard_normal((9, 14, 14, 6)).astype(np.float32)
    runs = [(kernels.maxpool2d_forward(X, 2, n_threads=n),
             kernels.avgpool2d_forward(X, 2, n_threads=n),
             kernels.maxpool2d_backward(dY, X, 2, n_threads=n),
             kernels.avgpool2d_backward(dY, X.shape, 2, n_threads=n),
             kernels.dropout_forward(X, 0.3, 7, 5, n_threads=n)) for n in (1, 2, 3)]
    for run in runs[1:]:
        for a, r in zip(runs[0], run):
            assert np.array_equal(a, r)


# ---- dropout ---------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics(rate):
    n = 200_000
    X = np.random.default_rng(5).uniform(0.5, 1.5, n).astype(np.float32)
    Y = kernels.dropout_forward(X, rate, seed=123)
    kept = Y != 0
    sigma = math.sqrt(rate * (1 - rate) / n)
    assert abs((1 - kept.mean()) - rate) < 5 * sigma
    scale = np.float32(1) / (np.float32(1) - np.float32(rate))
    assert np.array_equal(Y[kept], X[kept] * scale)
    # neighbours are independent: P(both kept) = (1 - rate)^2
    both = (kept[1:] & kept[:-1]).mean()
    assert abs(both - (1 - rate) ** 2) < 5 * math.sqrt((1 - rate) ** 2 / n)
    # the kept fraction is the same in both halves and in even/odd positions
    for part in (kept[: n // 2], kept[n // 2:], kept[::2], kept[1::2]):
        assert abs((1 - part.mean()) - rate) < 5 * math.sqrt(2) * sigma


def test_dropout_seed_offset_and_backward():
    X = np.random.default_rng(6).standard_normal((7, 5, 9)).astype(np.float32)
    Y = kernels.dropout_forward(X, 0.4, seed=9)
    assert np.array_equal(Y, kernels.dropout_forward(X, 0.4, seed=9))
    assert np.array_equal(Y, kernels.dropout_forward(X, 0.4, seed=9, reference=True))
    assert not np.array_equal(Y, kernels.dropout_forward(X, 0.4, seed=10))
    # the mask of element i depends on offset + i only
    flat = X.reshape(-1)
    assert np.array_equal(kernels.dropout_forward(flat[100:], 0.4, seed=9, offset=100),
                          Y.reshape(-1)[100:])
    assert not np.array_equal(kernels.dropout_forward(X, 0.4, seed=9, offset=1), Y)
    # backward recomputes the forward mask
    dY = np.random.default_rng(7).standard_normal(X.shape).astype(np.float32)
    mask = kernels.dropout_forward(np.ones_like(X), 0.4, seed=9)
    assert np.array_equal(mask != 0, Y != 0)
    dX = kernels.dropout_backward(dY, 0.4, seed=9)
    assert np.array_equal(dX, dY * mask)
    assert np.array_equal(dX, kernels.dropout_backward(dY, 0.4, seed=9, reference=True))
    assert np.array_equal(kernels.dropout_forward(X, 0.0, seed=1), X)
    assert kernels.dropout_forward(np.empty((0, 3), np.float32), 0.5, 1).shape == (0, 3)


# ---- argument checking -----------------------------------------------------------------

def test_conv_rejects_bad_arguments():
    X = np.zeros((2, 5, 5, 3), np.float32)
    W = np.zeros((3, 3, 3, 4), np.float32)
    b = np.zeros(4, np.float32)
    dY = np.zeros((2, 3, 3, 4), np.float32)
    f = kernels.conv2d_forward
    with pytest.raises(TypeError, match="X"):
        f(X.astype(np.float64), W, b)
    with pytest.raises(TypeError, match="X"):
        f(X.tolist(), W, b)
    with pytest.raises(ValueError, match="X"):
        f(X[0], W, b)
    with pytest.raises(ValueError, match="C-contiguous"):
        f(X[:, ::2], W, b)
    with pytest.raises(ValueError, match="W"):
        f(X, np.zeros((3, 3, 2, 4), np.float32), b)
    with pytest.raises(ValueError, match="b"):
        f(X, W, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        f(X, np.zeros((7, 3, 3, 4), np.float32), b)
    with pytest.raises(ValueError, match="stride"):
        f(X, W, b, 0)
    with pytest.raises(TypeError, match="stride"):
        f(X, W, b, 1.5)
    with pytest.raises(TypeError, match="stride"):
        f(X, W, b, True)
    with pytest.raises(ValueError, match="stride"):
        f(X, W, b, 1 << 50)
    with pytest.raises(ValueError, match="padding"):
        f(X, W, b, 1, "full")
    with pytest.raises(ValueError, match="softmax"):
        f(X, W, b, 1, "valid", "softmax")
    with pytest.raises(ValueError, match="activation"):
        f(X, W, b, 1, "valid", "gelu")
    with pytest.raises(ValueError, match="n_threads"):
        f(X, W, b, n_threads=0)
    with pytest.raises(ValueError, match="height"):
        f(np.zeros((2, 0, 5, 3), np.float32), W, b)
    with pytest.raises(ValueError, match="W"):
        f(X, np.zeros((0, 3, 3, 4), np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="dY"):
        kernels.conv2d_backward(X, W, dY[:, :2])
    with pytest.raises(ValueError, match="dY"):
        kernels.conv2d_backward(X, W, dY, 1, "same")
    # an empty batch is fine
    Y = f(X[:0], W, b)
    assert Y.shape == (0, 3, 3, 4)
    dX, dW, db = kernels.conv2d_backward(X[:0], W, dY[:0])
    assert dX.shape == (0, 5, 5, 3) and not dW.any() and not db.any()


def test_pooling_and_dropout_reject_bad_arguments():
    X = np.zeros((2, 5, 5, 3), np.float32)
    dY = np.zeros((2, 2, 2, 3), np.float32)
    for f in (kernels.maxpool2d_forward, kernels.avgpool2d_forward):
        with pytest.raises(ValueError, match="size"):
            f(X, 0)
        with pytest.raises(ValueError, match="does not fit"):
            f(X, 6)
        with pytest.raises(ValueError, match="stride"):
            f(X, 2, -1)
        with pytest.raises(TypeError, match="X"):
            f(X.astype(np.float16), 2)
    with pytest.raises(ValueError, match="dY"):
        kernels.maxpool2d_backward(dY[:, :1], X, 2)
    with pytest.raises(ValueError, match="input_shape"):
        kernels.avgpool2d_backward(dY, (2, 5, 5), 2)
    with pytest.raises(ValueError, match="input_shape"):
        kernels.avgpool2d_backward(dY, (2, -5, 5, 3), 2)
    for rate in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="rate"):
            kernels.dropout_forward(X, rate, 0)
    with pytest.raises(TypeError, match="rate"):
        kernels.dropout_forward(X, "0.5", 0)
    with pytest.raises(ValueError, match="seed"):
        kernels.dropout_forward(X, 0.5, -1)
    with pytest.raises(ValueError, match="offset"):
        kernels.dropout_backward(X, 0.5, 0, 1 << 64)
    with pytest.raises(TypeError, match="dY"):
        kernels.dropout_backward(X.astype(np.float64), 0.5, 0)
