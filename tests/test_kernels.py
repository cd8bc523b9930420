"""The non-GEMM kernels against float64 numpy references, through cnn_core.kernels."""
import numpy as np
import pytest

from cnn_core import kernels

SHAPES = [(1, 1), (1, 7), (3, 1), (13, 17), (64, 10), (97, 129)]
ACTIVATIONS = ["identity", "relu", "leaky_relu", "sigmoid", "tanh"]


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def act_ref(x, name, alpha=0.01):
    x = x.astype(np.float64)
    if name == "identity":
        return x
    if name == "relu":
        return np.maximum(x, 0)
    if name == "leaky_relu":
        return np.where(x > 0, x, alpha * x)
    if name == "sigmoid":
        return 0.5 * (1 + np.tanh(0.5 * x))
    if name == "tanh":
        return np.tanh(x)
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ACTIVATIONS + ["softmax"])
def test_activation_forward(shape, name):
    rng = np.random.default_rng(0)
    X = rand(rng, *shape, scale=3.0)
    Y = kernels.activation_forward(X, name, alpha=0.1)
    np.testing.assert_allclose(Y, act_ref(X, name, 0.1), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "softmax"])
def test_activations_stable_for_large_inputs(name):
    X = np.array([[-1e4, -100.0, 0.0, 100.0, 1e4]], dtype=np.float32)
    Y = kernels.activation_forward(X, name)
    assert np.all(np.isfinite(Y))
    np.testing.assert_allclose(Y, act_ref(X, name), atol=1e-7)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_sigmoid_and_tanh_are_accurate_everywhere(name):
    """The vectorised sigmoid and tanh against float64 over a dense sweep, tiny and huge
    values, both zeros, infinities and NaN; the same bits in the GEMM epilogue."""
    sweep = np.linspace(-30, 30, 400_001, dtype=np.float32)
    tiny = np.float32(10.0) ** -np.arange(1, 46, dtype=np.float32)
    special = np.array([0.0, -0.0, 0.4999999, 0.5, 0.5000001, 9.0, 88.0, 1e30, np.inf,
                        -np.inf, 1e-45], np.float32)
    x = np.concatenate([sweep, tiny, -tiny, special, -special])[None, :]
    y = kernels.activation_forward(x, name)[0]
    x64 = x[0].astype(np.float64)
    with np.errstate(over="ignore"):
        ref = np.tanh(x64) if name == "tanh" else np.where(
            x64 >= 0, 1 / (1 + np.exp(-np.abs(x64))), np.exp(-np.abs(x64)) / (1 + np.exp(-np.abs(x64))))
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    # within 4 ulp, or below the smallest normal float (1.2e-38) where sigmoid gives 0
    assert np.all(np.abs(y - ref) <= 4 * ulp + 1.3e-38), np.max(np.abs(y - ref) / ulp)
    assert np.isnan(kernels.activation_forward(np.full((1, 3), np.nan, np.float32), name)).all()
    if name == "tanh":
        assert np.array_equal(np.signbit(y), np.signbit(x[0]))
    # the GEMM epilogue (identity weights) gives the same bits as the kernel
    eye = np.eye(64, dtype=np.float32)
    fused = kernels.dense_forward(x[0, :64 * 200].reshape(200, 64), eye, np.zeros(64, np.float32),
                                  activation=name)
    assert np.array_equal(fused, y[:64 * 200].reshape(200, 64))


def test_softmax_keeps_nan_and_gives_zero_to_minus_infinity():
    x = np.array([[np.nan, 1, 2], [-np.inf, 0, 1], [-1e30, 0, 1e30]], np.float32)
    y = kernels.activation_forward(x, "softmax")
    assert np.isnan(y[0]).all()
    np.testing.assert_allclose(y[1], [0, 1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-6)
    assert y[1, 0] == 0 and np.array_equal(y[2], [0, 0, 1])
    loss, _, _, _ = kernels.softmax_cross_entropy(x[1:2], np.array([2], np.int32))
    assert abs(loss - np.log1p(np.exp(-1))) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ACTIVATIONS + ["softmax"])
def test_activation_backward(shape, name):
    rng = np.random.default_rng(1)
    X = rand(rng, *shape)
    Y = kernels.activation_forward(X, name, alpha=0.2)
    dY = rand(rng, *shape)
    dX = kernels.activation_backward(dY, Y, name, alpha=0.2)
    # central differences of sum(dY * act(X)) in float64
    h = 1e-6
    x = X.astype(np.float64)
    if name == "softmax":
        expected = np.empty_like(x)
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                xp, xm = x.copy(), x.copy()
                xp[i, j] += h
                xm[i, j] -= h
                expected[i, j] = ((dY * act_ref(xp, name)).sum()
                                  - (dY * act_ref(xm, name)).sum()) / (2 * h)
    else:
        expected = dY * (act_ref(x + h, name, 0.2) - act_ref(x - h, name, 0.2)) / (2 * h)
    np.testing.assert_allclose(dX, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (5, 7), (64, 129)])
def test_bias_forward_and_backward(shape):
    rng = np.random.default_rng(2)
    X = rand(rng, *shape)
    b = rand(rng, shape[1])
    np.testing.assert_allclose(kernels.bias_forward(X, b), X + b, rtol=1e-6)
    np.testing.assert_allclose(kernels.bias_backward(X), X.astype(np.float64).sum(axis=0),
                               rtol=1e-5, atol=1e-5)


def ce_ref(Z, y, w=None):
    z = Z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    w = np.ones(len(y)) if w is None else w.astype(np.float64)
    loss = -(w * logp[np.arange(len(y)), y]).sum() / w.sum()
    p = np.exp(logp)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1
    return loss, p, (p - onehot) * (w / w.sum())[:, None]


@pytest.mark.parametrize("M,N", [(1, 1), (1, 10), (7, 3), (64, 10), (131, 17)])
@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_cross_entropy(M, N, weighted):
    rng = np.random.default_rng(3)
    Z = rand(rng, M, N, scale=4.0)
    y = rng.integers(0, N, M)
    w = rng.uniform(0.1, 2.0, M).astype(np.float32) if weighted else None
    loss, probs, dZ, correct = kernels.softmax_cross_entropy(Z, y, w)
    ref_loss, ref_p, ref_dZ = ce_ref(Z, y, w)
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(probs, ref_p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dZ, ref_dZ, rtol=1e-5, atol=1e-7)
    assert correct == int((Z.argmax(axis=1) == y).sum())


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    Z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, -1e4]], dtype=np.float32)
    y = np.array([1, 2, 0])
    loss, probs, dZ, correct = kernels.softmax_cross_entropy(Z, y)
    ref_loss, ref_p, ref_dZ = ce_ref(Z, y)
    assert np.isfinite(loss) and loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(probs, ref_p, atol=1e-7)
    np.testing.assert_allclose(dZ, ref_dZ, atol=1e-7)
    assert correct == 2  # ties go to the first maximum, as numpy.argmax


def test_softmax_cross_entropy_rejects_bad_labels():
    Z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="labels in"):
        kernels.softmax_cross_entropy(Z, [0, 3])
    with pytest.raises(ValueError, match="labels in"):
        kernels.softmax_cross_entropy(Z, [-1, 0])
    with pytest.raises(TypeError, match="integer"):
        kernels.softmax_cross_entropy(Z, [0.5, 1.0])


@pytest.mark.parametrize("M,N", [(0, 3), (1, 1), (7, 3), (64, 10), (131, 17)])
@pytest.mark.parametrize("weighted", [False, True])
def test_squared_error_matches_numpy_and_finite_differences(M, N, weighted):
    rng = np.random.default_rng(5)
    Z, T = rand(rng, M, N, scale=3.0), rand(rng, M, N, scale=3.0)
    w = rng.uniform(0.1, 2.0, M).astype(np.float32) if weighted else None
    loss, dZ = kernels.squared_error(Z, T, w)
    w64 = np.ones(M) if w is None else w.astype(np.float64)
    r = Z.astype(np.float64) - T
    ref = (w64 * 0.5 * (r ** 2).sum(axis=1)).sum() / w64.sum() if M else 0.0
    assert loss == pytest.approx(ref, rel=1e-6, abs=1e-12)
    np.testing.assert_allclose(dZ, r * (w64 / w64.sum())[:, None], rtol=1e-5, atol=1e-7)
    h = np.float32(2.0 ** -6)   # exact in float32: Z +- h moves one entry by exactly h
    for i, j in [(i, j) for i in range(min(M, 3)) for j in range(min(N, 3))]:
        Zp, Zm = Z.copy(), Z.copy()
        Zp[i, j] += h
        Zm[i, j] -= h
        numeric = (kernels.squared_error(Zp, T, w)[0] - kernels.squared_error(Zm, T, w)[0]) / (2 * h)
        assert dZ[i, j] == pytest.approx(numeric, rel=1e-3, abs=1e-5)


def test_squared_error_checks_its_arguments():
    Z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"T must have shape \(2, 3\)"):
        kernels.squared_error(Z, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        kernels.squared_error(Z, np.full((2, 3), np.nan))
    with pytest.raises(TypeError, match="numeric"):
        kernels.squared_error(Z, np.full((2, 3), "a"))
    loss, dZ = kernels.squared_error(Z, np.ones((2, 3)), np.zeros(2))
    assert loss == 0.0 and not dZ.any()


@pytest.mark.parametrize("B,n_in,n_out", [(0, 3, 2), (1, 1, 1), (5, 7, 3), (64, 784, 128),
                                          (37, 129, 65)])
@pytest.mark.parametrize("name", ACTIVATIONS + ["softmax"])
def test_dense_forward(B, n_in, n_out, name):
    rng = np.random.default_rng(4)
    X, W, b = rand(rng, B, n_in), rand(rng, n_in, n_out, scale=0.1), rand(rng, n_out)
    Y = kernels.dense_forward(X, W, b, name, alpha=0.05)
    ref = act_ref(X.astype(np.float64) @ W + b, name, 0.05) if B else np.zeros((0, n_out))
    np.testing.assert_allclose(Y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("B,n_in,n_out", [(0, 3, 2), (1, 1, 1), (5, 7, 3), (64, 784, 128),
                                          (37, 129, 65)])
def test_dense_backward(B, n_in, n_out):
    rng = np.random.default_rng(5)
    X, dY, W = rand(rng, B, n_in), rand(rng, B, n_out), rand(rng, n_in, n_out)
    dW, db, dX = kernels.dense_backward(X, dY, W)
    x, d, w = X.astype(np.float64), dY.astype(np.float64), W.astype(np.float64)
    scale = 1e-5 * (1 + max(B, n_in, n_out))
    np.testing.assert_allclose(dW, x.T @ d, atol=scale, rtol=1e-4)
    np.testing.assert_allclose(db, d.sum(axis=0), atol=scale, rtol=1e-4)
    np.testing.assert_allclose(dX, d @ w.T, atol=scale, rtol=1e-4)
    dW2, db2, none = kernels.dense_backward(X, dY, W, compute_dX=False)
    assert none is None and np.array_equal(dW, dW2) and np.array_equal(db, db2)


def sgd_ref(p, g, v, lr, mu, nesterov, wd):
    g = g + wd * p
    if mu == 0:
        return p - lr * g, v
    v = mu * v + g
    return (p - lr * (g + mu * v) if nesterov else p - lr * v), v


@pytest.mark.parametrize("mu,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0),
                                            (0.9, True, 0.0), (0.5, False, 1e-2),
                                            (0.9, True, 1e-3)])
def test_sgd_update(mu, nesterov, wd):
    rng = np.random.default_rng(6)
    n = 1031
    p, v = rand(rng, n), np.zeros(n, np.float32)
    rp, rv = p.astype(np.float64), v.astype(np.float64)
    for _ in range(3):
        g = rand(rng, n)
        kernels.optimizer_update(p, g, v, optimizer="sgd", learning_rate=0.1, momentum=mu,
                                 nesterov=nesterov, weight_decay=wd)
        rp, rv = sgd_ref(rp, g.astype(np.float64), rv, 0.1, mu, nesterov, wd)
    np.testing.assert_allclose(p, rp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_adam_update(kind):
    rng = np.random.default_rng(7)
    n, lr, b1, b2, eps, wd = 517, 1e-2, 0.9, 0.999, 1e-8, 0.05
    p = rand(rng, n)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    rp, rm, rv = p.astype(np.float64), np.zeros(n), np.zeros(n)
    step = 0
    for t in range(1, 5):
        g = rand(rng, n)
        step = kernels.optimizer_update(p, g, m, v, optimizer=kind, learning_rate=lr,
                                        beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                                        step=step)
        gr = g.astype(np.float64) + (wd * rp if kind == "adam" else 0)
        rm = b1 * rm + (1 - b1) * gr
        rv = b2 * rv + (1 - b2) * gr * gr
        upd = lr * (rm / (1 - b1 ** t)) / (np.sqrt(rv / (1 - b2 ** t)) + eps)
        rp = rp - upd - (lr * wd * rp if kind == "adamw" else 0)
    assert step == 4
    np.testing.assert_allclose(p, rp, rtol=1e-4, atol=1e-5)


def test_optimizer_rejects_bad_hyperparameters():
    p, g, v = (np.zeros(3, np.float32) for _ in range(3))
    with pytest.raises(ValueError, match="momentum"):
        kernels.optimizer_update(p, g, v, momentum=1.5)
    with pytest.raises(ValueError, match="nesterov"):
        kernels.optimizer_update(p, g, v, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="state2"):
        kernels.optimizer_update(p, g, v, optimizer="adam")
    with pytest.raises(ValueError, match="optimizer must be"):
        kernels.optimizer_update(p, g, v, optimizer="rmsprop")
    for step in (-5, 2 ** 63):
        with pytest.raises(ValueError, match="step"):
            kernels.optimizer_update(p, g, v, v.copy(), optimizer="adam", step=step)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_gather_rows(dtype):
    rng = np.random.default_rng(8)
    X = rng.integers(0, 256, (50, 13)).astype(dtype)
    index = np.array([49, 0, 7, 7, 3])
    out = kernels.gather_rows(X, index)
    expected = X[index].astype(np.float32)
    if dtype == np.uint8:
        expected = expected * np.float32(1 / 255)
    np.testing.assert_allclose(out, expected, rtol=1e-7)
    saved = kernels.get_kernel()
    try:
        for kernel in kernels.available_kernels():   # each build of the loop, same bits
            kernels.set_kernel(kernel)
            assert np.array_equal(kernels.gather_rows(X, index), out)
    finally:
        kernels.set_kernel(saved)
    assert kernels.gather_rows(X, []).shape == (0, 13)
    with pytest.raises(IndexError):
        kernels.gather_rows(X, [50])
    with pytest.raises(TypeError, match="integers"):
        kernels.gather_rows(X, np.array([0.5, 2.0]))     # not rounded to rows 0 and 2
    with pytest.raises(IndexError):
        kernels.gather_rows(X, [-1])



@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("n_cols", [1, 15, 17, 785])
def test_gather_rows_odd_shapes(dtype, n_cols):
    """Every count of rows around the gather's look-ahead (it asks for rows a few ahead
    of the copy), rows repeated and out of order, against numpy's fancy indexing."""
    rng = np.random.default_rng(n_cols)
    X = rng.integers(0, 256, (41, n_cols)).astype(dtype)
    scale = np.float32(1 / 255) if dtype == np.uint8 else np.float32(1)
    for n_index in (1, 2, 3, 4, 5, 6, 9, 40, 64):
        index = rng.integers(0, 41, n_index)
        out = kernels.gather_rows(X, index)
        assert out.shape == (n_index, n_cols)
        assert np.array_equal(out, X[index].astype(np.float32) * scale)


def test_gather_rows_copies_nonfinite_values_as_they_are():
    """The public gather copies NaN and infinities bit for bit (training's gather, which
    shares its loop, reports them instead)."""
    X = np.zeros((3, 21), np.float32)
    X[1, [0, 8, 20]] = [np.nan, np.inf, -np.inf]
    out = kernels.gather_rows(X, [1, 0, 1])
    assert np.array_equal(out.view(np.uint32), X[[1, 0, 1]].view(np.uint32))

BAD_ARRAYS = [
    ([[1.0, 2.0]], TypeError, "numpy.ndarray"),
    (np.zeros((2, 2), np.float64), TypeError, "float32"),
    (np.zeros(4, np.float32), ValueError, "2-D"),
    (np.zeros((4, 4), np.float32)[:, ::2], ValueError, "C-contiguous"),
]


@pytest.mark.parametrize("bad,exc,match", BAD_ARRAYS)
def test_wrappers_reject_bad_arrays(bad, exc, match):
    W = np.zeros((2, 3), np.float32)
    b = np.zeros(3, np.float32)
    with pytest.raises(exc, match=match):
        kernels.activation_forward(bad, "relu")
    with pytest.raises(exc, match=match):
        kernels.bias_backward(bad)
    if bad.__class__ is np.ndarray and bad.ndim == 2 and bad.dtype == np.float32:
        return
    with pytest.raises(exc, match=match):
        kernels.dense_forward(bad, W, b)


def test_wrappers_reject_mismatched_shapes_and_names():
    X = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="W must have 2 rows"):
        kernels.dense_forward(X, np.zeros((3, 3), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"b must have shape \(3,\)"):
        kernels.dense_forward(X, np.zeros((2, 3), np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.activation_forward(X, "swish")
    with pytest.raises(ValueError, match="same shape"):
        kernels.activation_backward(X, np.zeros((4, 3), np.float32), "relu")
    with pytest.raises(ValueError, match="n_threads"):
        kernels.dense_forward(X, np.zeros((2, 3), np.float32), np.zeros(3, np.float32),
                              n_threads=0)


def test_read_only_inputs_are_accepted_and_outputs_must_be_writable():
    rng = np.random.default_rng(9)
    A, B = rand(rng, 5, 4), rand(rng, 4, 3)
    A.flags.writeable = False
    B.flags.writeable = False
    np.testing.assert_allclose(kernels.gemm(A, B), A @ B, rtol=1e-5)
    C = np.zeros((5, 3), np.float32)
    C.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        kernels.gemm(A, B, C)


def test_runtime_information():
    import cnn_core
    info = cnn_core.info()
    assert info["kernel"] in info["available_kernels"]
    assert "generic" in info["available_kernels"]
    assert info["threads"] == kernels.max_threads() >= 1
    with pytest.raises(ValueError, match="kernel must be one of"):
        kernels.set_kernel("sse9")


@pytest.mark.parametrize("optimizer,options", [("sgd", {"momentum": 0.0}),
                                               ("sgd", {"momentum": 0.9}),
                                               ("sgd", {"momentum": 0.9, "nesterov": True}),
                                               ("adam", {}), ("adamw", {})])
def test_optimizer_gives_the_same_bits_for_every_kernel_and_thread_count(optimizer, options):
    rng = np.random.default_rng(10)
    n = 100003
    p0, g = rand(rng, n), rand(rng, n)
    results = []
    saved = kernels.get_kernel()
    try:
        for kernel in kernels.available_kernels():
            kernels.set_kernel(kernel)
            for n_threads in (1, 2, 3):
                p, s1, s2 = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
                for _ in range(2):
                    kernels.optimizer_update(p, g, s1, s2, optimizer=optimizer,
                                             learning_rate=0.01, weight_decay=1e-3,
                                             n_threads=n_threads, **options)
                results.append(p)
    finally:
        kernels.set_kernel(saved)
    assert not np.array_equal(results[0], p0)
    for other in results[1:]:
        assert np.array_equal(results[0], other)


def test_activation_names_come_from_the_c_table():
    # the codes of cnn_core.h, read from the C library; every other module imports them
    assert kernels.ACTIVATIONS == {"identity": 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3,
                                   "tanh": 4, "softmax": 5}
    assert kernels.HIDDEN_ACTIVATIONS == tuple(ACTIVATIONS)
