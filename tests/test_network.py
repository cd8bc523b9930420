"""The Network API: initialisation, gradients, training on real MNIST, determinism,
model files and argument validation."""
import os
import weakref

import numpy as np
import pytest

import cnn_core
from cnn_core import Network, ModelFileError, kernels, model_file

ACTIVATIONS = ["identity", "relu", "leaky_relu", "sigmoid", "tanh"]


def small_data(n=40, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, classes, n)


# ---- initialisation -------------------------------------------------------------------
def test_same_seed_same_weights_and_different_seed_different_weights():
    a, b, c = (Network([20, 7, 3], seed=s) for s in (1, 1, 2))
    for wa, wb, wc in zip(a.weights, b.weights, c.weights):
        assert np.array_equal(wa, wb) and not np.array_equal(wa, wc)
    assert all(np.all(bias == 0) for bias in a.biases)


@pytest.mark.parametrize("activation,expected_std", [
    ("relu", np.sqrt(2 / 784)), ("leaky_relu", np.sqrt(2 / 784)),
    ("tanh", np.sqrt(2 / (784 + 512))), ("sigmoid", np.sqrt(2 / (784 + 512)))])
def test_initialisation_scale(activation, expected_std):
    net = Network([784, 512, 10], activation, seed=0)
    assert net.weights[0].shape == (784, 512) and net.weights[0].dtype == np.float32
    assert net.weights[0].std() == pytest.approx(expected_std, rel=0.02)


def test_repr_and_properties():
    net = Network([784, 128, 10], seed=3)
    assert "Network([784, 128, 10]" in repr(net) and "101,770 parameters" in repr(net)
    assert net.n_features == 784 and net.n_classes == 10


# ---- gradients ------------------------------------------------------------------------
def loss_ref(params, sizes, activation, slope, X, y):
    """Mean softmax cross-entropy of the MLP in float64."""
    a, offset = X.astype(np.float64), 0
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = params[offset:offset + n_in * n_out].reshape(n_in, n_out)
        offset += n_in * n_out
        b = params[offset:offset + n_out]
        offset += n_out
        z = a @ W + b
        if l == len(sizes) - 2:
            break
        a = {"identity": z, "relu": np.maximum(z, 0), "leaky_relu": np.where(z > 0, z, slope * z),
             "sigmoid": 1 / (1 + np.exp(-z)), "tanh": np.tanh(z)}[activation]
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_matches_finite_differences(activation):
    sizes = [5, 7, 6, 3]
    X, y = small_data(n=11, d=5, classes=3, seed=1)
    net = Network(sizes, activation, seed=4, leaky_slope=0.1)
    params = net._params.astype(np.float64)
    trainer = kernels._Trainer(net._net, "sgd", 0.0, 0.0, False, 0.0, 0.9, 0.999, 1e-8,
                               len(y), 1)
    trainer.train_batches(X, y.astype(np.int32), None, np.arange(len(y), dtype=np.int64), 0, 1)
    grads = np.array(trainer.grads, dtype=np.float64)
    h = 1e-6
    numeric = np.empty_like(params)
    for i in range(len(params)):
        p, m = params.copy(), params.copy()
        p[i] += h
        m[i] -= h
        numeric[i] = (loss_ref(p, sizes, activation, 0.1, X, y)
                      - loss_ref(m, sizes, activation, 0.1, X, y)) / (2 * h)
    np.testing.assert_allclose(grads, numeric, rtol=1e-3, atol=2e-6)


def test_training_reduces_loss_and_history_has_every_field():
    X, y = small_data(n=200, d=8, classes=4)
    net = Network([8, 16, 4], seed=0)
    before = net.evaluate(X, y)[0]
    history = net.fit(X, y, epochs=5, batch_size=16, learning_rate=0.1,
                      validation_data=(X[:50], y[:50]))
    assert len(history) == 5 and history is net.history_
    assert set(history.records[0]) == {"epoch", "loss", "accuracy", "val_loss",
                                       "val_accuracy", "learning_rate", "seconds"}
    assert history["loss"][-1] < history["loss"][0]
    assert net.evaluate(X, y)[0] < before


@pytest.mark.parametrize("optimizer,lr,options", [
    ("sgd", 0.3, dict(momentum=0.0)),
    ("sgd", 0.05, dict(momentum=0.9, nesterov=True, weight_decay=1e-4)),
    ("adam", 0.01, {}), ("adamw", 0.01, dict(weight_decay=1e-2))])
def test_every_optimizer_learns(optimizer, lr, options):
    X, y = small_data(n=300, d=8, classes=3, seed=5)
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)  # a learnable rule
    net = Network([8, 16, 3], seed=1)
    net.fit(X, y, epochs=30, batch_size=32, optimizer=optimizer, learning_rate=lr, **options)
    assert net.evaluate(X, y)[1] > 0.85


# ---- real data ------------------------------------------------------------------------
def test_mnist_784_128_10_reaches_95_percent_within_10_epochs(mnist_split):
    (X, y), (X_test, y_test) = mnist_split
    net = Network([784, 128, 10], seed=0)
    history = net.fit(X, y, epochs=10, batch_size=64, learning_rate=0.05,
                      validation_data=(X_test, y_test))
    assert max(history["val_accuracy"]) >= 0.95
    loss, accuracy = net.evaluate(X_test, y_test)
    assert accuracy >= 0.95 and loss < 0.2
    assert np.mean(net.predict(X_test) == y_test) == pytest.approx(accuracy)


def test_uint8_and_scaled_float_inputs_train_identically(mnist_split):
    (X, y), _ = mnist_split
    X, y = X[:1000], y[:1000]
    a, b = Network([784, 32, 10], seed=7), Network([784, 32, 10], seed=7)
    a.fit(X, y, epochs=1, batch_size=50)
    b.fit(X.astype(np.float32) * np.float32(1 / 255), y, epochs=1, batch_size=50)
    assert np.array_equal(a._params, b._params)
    np.testing.assert_array_equal(a.predict(X), b.predict(X.astype(np.float64) / 255))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_is_bit_identical_for_one_and_two_threads(mnist_split, optimizer):
    (X, y), _ = mnist_split
    X, y = X[:2000], y[:2000]
    nets = []
    for n_threads in (1, 2):
        net = Network([784, 96, 33, 10], seed=11)
        net.fit(X, y, epochs=2, batch_size=64, optimizer=optimizer, n_threads=n_threads)
        nets.append(net)
    assert np.array_equal(nets[0]._params, nets[1]._params)
    assert np.array_equal(nets[0].predict_proba(X, n_threads=1),
                          nets[1].predict_proba(X, n_threads=2))


def test_predictions_do_not_depend_on_threads_chunks_or_batch(mnist_split):
    """Threads share a large predict by chunks of rows, a small one inside each GEMM, and
    one or two rows take the row path: every way must give the same values."""
    (X, y), (Xt, _) = mnist_split
    net = Network([784, 64, 10], seed=3)
    net.fit(X[:1000], y[:1000], epochs=1)
    X = Xt[:1001]                             # four chunks of rows, the last short
    for Xi in (X, X.astype(np.float32) / 255):
        expected = net.predict_proba(Xi, n_threads=1)
        for n_threads in (2, 3, 5):
            np.testing.assert_array_equal(net.predict_proba(Xi, n_threads=n_threads), expected)
            np.testing.assert_array_equal(net.predict(Xi, n_threads=n_threads),
                                          expected.argmax(axis=1))
        for i in range(0, len(Xi), 97):
            np.testing.assert_array_equal(net.predict_proba(Xi[i:i + 1], n_threads=2),
                                          expected[i:i + 1])
            np.testing.assert_array_equal(net.predict_proba(Xi[i:i + 2]), expected[i:i + 2])


def test_predict_proba_is_a_distribution_and_matches_numpy(mnist_split):
    _, (X, y) = mnist_split
    net = Network([784, 50, 10], activation="tanh", seed=2)
    probs = net.predict_proba(X)
    assert probs.shape == (len(X), 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    h = np.tanh(X / 255.0 @ net.weights[0] + net.biases[0])
    z = h @ net.weights[1] + net.biases[1]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), atol=1e-5)
    assert np.array_equal(net.predict(X), probs.argmax(axis=1))
    assert np.array_equal(net.predict(X[3:4]), probs[3:4].argmax(axis=1))


def test_sample_weight_of_ones_changes_nothing():
    X, y = small_data(n=100, d=5, classes=3)
    a, b = Network([5, 9, 3], seed=3), Network([5, 9, 3], seed=3)
    a.fit(X, y, epochs=2, batch_size=16)
    b.fit(X, y, epochs=2, batch_size=16, sample_weight=np.ones(100))
    assert np.array_equal(a._params, b._params)


# ---- model files ----------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    X, y = small_data(n=60, d=6, classes=4)
    net = Network([6, 10, 8, 4], activation="leaky_relu", leaky_slope=0.2, seed=5)
    net.fit(X, y, epochs=2, batch_size=8)
    path = tmp_path / "model.cnn"
    net.save(path)
    loaded = Network.load(path)
    assert loaded.layer_sizes == net.layer_sizes and loaded.activation == "leaky_relu"
    assert loaded.leaky_slope == pytest.approx(0.2)
    assert np.array_equal(loaded.predict_proba(X), net.predict_proba(X))
    assert all(np.array_equal(a, b) for a, b in zip(loaded.weights, net.weights))
    assert [p.name for p in tmp_path.iterdir()] == ["model.cnn"]  # no temporary files left


def saved_bytes(tmp_path):
    net = Network([4, 3, 2], seed=0)
    path = tmp_path / "m.cnn"
    net.save(path)
    return path, path.read_bytes()


def test_every_truncation_is_rejected(tmp_path):
    path, data = saved_bytes(tmp_path)
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(ModelFileError):
            Network.load(path)


def test_every_flipped_byte_is_rejected(tmp_path):
    path, data = saved_bytes(tmp_path)
    for i in range(len(data)):
        corrupt = bytearray(data)
        corrupt[i] ^= 0x40
        path.write_bytes(bytes(corrupt))
        with pytest.raises(ModelFileError):
            Network.load(path)


def test_foreign_and_future_files_are_rejected(tmp_path):
    path, data = saved_bytes(tmp_path)
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFileError, match="not a cnn_core model file"):
        Network.load(path)
    body = bytearray(data[:-4])
    body[8] = 3  # version 3
    import struct, zlib
    path.write_bytes(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))
    with pytest.raises(ModelFileError, match="version 3"):
        Network.load(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(ModelFileError, match="longer"):
        Network.load(path)
    with pytest.raises(FileNotFoundError):
        Network.load(tmp_path / "missing.cnn")


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path, data = saved_bytes(tmp_path)
    other = Network([4, 5, 2], seed=1)

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(model_file.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["m.cnn"]


def test_save_into_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Network([2, 2]).save(tmp_path / "nope" / "m.cnn")


# ---- validation -----------------------------------------------------------------------
@pytest.mark.parametrize("args,kwargs,exc,match", [
    (([784],), {}, ValueError, "2 to 33 entries"),
    (([784, 0, 10],), {}, ValueError, ">= 1"),
    (([784, 12.5, 10],), {}, TypeError, "int"),
    ((784,), {}, TypeError, "sequence"),
    (([4, 2], "softmax"), {}, ValueError, "activation must be"),
    (([4, 2],), {"seed": -1}, ValueError, "seed"),
    (([4, 2],), {"leaky_slope": 1.5}, ValueError, "leaky_slope"),
    (([4] * 40,), {}, ValueError, "2 to 33"),
])
def test_constructor_rejects_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Network(*args, **kwargs)


BAD_X = [
    (np.zeros((5, 3), np.float32), ValueError, r"shape \(n_samples, 4\)"),
    (np.zeros((5, 2, 2), np.float32), ValueError, "flatten"),
    (np.zeros((0, 4), np.float32), ValueError, "empty"),
    (np.full((5, 4), np.nan, np.float32), ValueError, "NaN"),
    (np.full((5, 4), np.inf), ValueError, "NaN or infinite"),
    (np.zeros((5, 4), np.int64), TypeError, "uint8"),
    (np.array([["a"] * 4] * 5), TypeError, "uint8"),
    ("not an array", TypeError, "uint8"),
]


@pytest.mark.parametrize("X,exc,match", BAD_X)
def test_bad_X_is_rejected_everywhere(X, exc, match):
    net = Network([4, 3, 2], seed=0)
    y = np.zeros(len(X) if hasattr(X, "__len__") and not isinstance(X, str) else 1, int)
    for call in (lambda: net.fit(X, y), lambda: net.predict(X), lambda: net.predict_proba(X),
                 lambda: net.evaluate(X, y)):
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.parametrize("y,exc,match", [
    (np.array([0, 1, 2, 0, 1]), ValueError, r"labels in \[0, 1\]"),
    (np.array([0, 1, -1, 0, 1]), ValueError, "labels in"),
    (np.array([0, 1, 0]), ValueError, r"shape \(5,\)"),
    (np.array([0.5, 1, 0, 0, 1]), TypeError, "integer"),
    (np.eye(2)[[0, 1, 0, 0, 1]], ValueError, "argmax"),
])
def test_bad_labels_are_rejected(y, exc, match):
    net = Network([4, 3, 2], seed=0)
    X = np.zeros((5, 4), np.float32)
    with pytest.raises(exc, match=match):
        net.fit(X, y)
    with pytest.raises(exc, match=match):
        net.evaluate(X, y)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"epochs": 0}, ValueError, "epochs"), ({"batch_size": 0}, ValueError, "batch_size"),
    ({"epochs": 1.5}, TypeError, "epochs"), ({"learning_rate": -1}, ValueError, "learning_rate"),
    ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
    ({"optimizer": "rmsprop"}, ValueError, "optimizer"),
    ({"momentum": 1.0}, ValueError, "momentum"),
    ({"momentum": 0.0, "nesterov": True}, ValueError, "nesterov"),
    ({"optimizer": "adam", "beta2": 1.0}, ValueError, "beta2"),
    ({"optimizer": "adam", "eps": 0.0}, ValueError, "eps"),
    ({"sample_weight": [1, 1]}, ValueError, "sample_weight"),
    ({"sample_weight": [1, 1, -1, 1, 1]}, ValueError, "non-negative"),
    ({"validation_data": np.zeros((5, 4))}, ValueError, "pair"),
    ({"validation_data": {"X": np.zeros((5, 3)), "y": np.zeros(5, int)}}, ValueError, "pair"),
    ({"validation_data": (np.zeros((5, 3)), np.zeros(5, int))}, ValueError, "X_val"),
    ({"n_threads": 0}, ValueError, "n_threads"),
])
def test_bad_fit_options_are_rejected_before_training(kwargs, exc, match):
    net = Network([4, 3, 2], seed=0)
    before = net._params.copy()
    with pytest.raises(exc, match=match):
        net.fit(np.zeros((5, 4), np.float32), np.zeros(5, int), **kwargs)
    assert np.array_equal(before, net._params)


def test_non_contiguous_read_only_and_float64_inputs_work():
    X, y = small_data(n=30, d=4, classes=2)
    net = Network([4, 5, 2], seed=0)
    wide = np.zeros((30, 8), np.float64)
    wide[:, ::2] = X
    view = wide[:, ::2]
    frozen = X.copy()
    frozen.flags.writeable = False
    expected = net.predict_proba(X)
    np.testing.assert_allclose(net.predict_proba(view), expected, rtol=1e-6)
    np.testing.assert_array_equal(net.predict_proba(frozen), expected)
    np.testing.assert_array_equal(net.predict_proba(X[::-1])[::-1], expected)
    net.fit(view, y, epochs=1)
    net.fit(frozen, y, epochs=1)


def test_every_memory_layout_predicts_like_a_plain_array():
    """Plain C-contiguous float32/uint8 arrays go straight to the kernels; every other
    layout (byte-swapped, misaligned, Fortran order, strided, a subclass) is converted
    first.  All must give the same predictions, one row or many."""
    rng = np.random.default_rng(5)
    X = rng.integers(0, 256, size=(7, 6)).astype(np.uint8)
    Xf = X.astype(np.float32) / 255
    net = Network([6, 9, 3], seed=1)
    raw = np.zeros(Xf.nbytes + 1, np.uint8)
    misaligned = raw[1:].view(np.float32).reshape(Xf.shape)
    misaligned[...] = Xf
    assert not misaligned.flags.aligned
    layouts = [Xf.astype(">f4"), misaligned, np.asfortranarray(Xf),
               np.repeat(Xf, 2, axis=0)[::2], Xf.view(np.matrix), Xf.astype(np.float16)]
    for rows in (slice(0, 1), slice(0, 7)):
        expected = net.predict_proba(Xf[rows])
        np.testing.assert_allclose(net.predict_proba(X[rows]), expected, rtol=1e-6)
        for layout in layouts[:-1]:
            np.testing.assert_array_equal(net.predict_proba(layout[rows]), expected)
            np.testing.assert_array_equal(net.predict(layout[rows]), expected.argmax(axis=1))
        np.testing.assert_allclose(net.predict_proba(layouts[-1][rows]), expected, atol=1e-3)


def test_divergence_is_reported_and_weights_kept():
    X, y = small_data(n=64, d=4, classes=2)
    X *= 1e18
    net = Network([4, 8, 2], seed=0)
    before = net._params.copy()
    with pytest.raises(FloatingPointError, match="diverged in epoch") as info:
        net.fit(X, y, epochs=3, learning_rate=10.0)
    assert np.isfinite(net._params).all()
    failed_epoch = int(str(info.value).split("epoch ")[1].split(" ")[0])
    assert len(net.history_) == failed_epoch - 1
    if failed_epoch == 1:
        assert np.array_equal(net._params, before)


def test_public_helpers():
    assert os.path.isfile(os.path.join(cnn_core.get_include(), "cnn_core.h"))
    assert os.path.isdir(cnn_core.get_library_dir())


def test_export_c_method_writes_source(tmp_path):
    report = Network([4, 3, 2], seed=0).export_c(tmp_path, name="tiny")
    assert (tmp_path / "tiny.c").is_file() and (tmp_path / "tiny.h").is_file()
    assert report.n_parameters == 4 * 3 + 3 + 3 * 2 + 2


def _fit_state(net):
    """Everything a failed fit must leave as it was."""
    history = None if net.history_ is None else [
        {k: v for k, v in r.items() if k != "seconds"} for r in net.history_.records]
    optimizer = getattr(net, "_optimizer_state", None)
    optimizer = None if optimizer is None else {
        k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in optimizer.items()}
    return net._params.copy(), history, optimizer, net._rng.bit_generator.state


def _same_fit_state(a, b):
    params_a, history_a, opt_a, rng_a = a
    params_b, history_b, opt_b, rng_b = b
    assert np.array_equal(params_a, params_b)
    assert history_a == history_b and rng_a == rng_b
    assert (opt_a is None) == (opt_b is None)
    if opt_a is not None:
        assert opt_a.keys() == opt_b.keys()
        for key in opt_a:
            assert np.array_equal(opt_a[key], opt_b[key])


@pytest.mark.parametrize("n_features,n_threads", [(6, 1), (784, 2)])  # serial, threaded gather
@pytest.mark.parametrize("row", [0, 137, 299])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fit_finds_nonfinite_X_as_it_gathers_and_leaves_the_network_as_it_was(
        n_features, n_threads, row, bad):
    """fit no longer scans float X before training: the gather finds NaN or infinity in
    the first epoch, fit raises ValueError and puts back the weights, the history, the
    shuffling generator and a continued optimizer state, so continuing afterwards
    retraces a network that never saw the failed call; a failed fit with reset=True
    drops the old optimizer state, as the fit would have."""
    X, y = small_data(300, n_features, seed=row)
    net, twin = (Network([n_features, 9, 3], seed=4) for _ in range(2))
    for network in (net, twin):
        network.fit(X, y, epochs=1, batch_size=64, n_threads=n_threads)
    bad_X = X.copy()
    bad_X[row, n_features // 2] = bad
    before = _fit_state(net)
    with pytest.raises(ValueError, match="NaN or infinite"):
        net.fit(bad_X, y, epochs=2, batch_size=64, reset=False, n_threads=n_threads)
    _same_fit_state(_fit_state(net), before)
    for network in (net, twin):
        network.fit(X, y, epochs=2, batch_size=64, reset=False, n_threads=n_threads)
    _same_fit_state(_fit_state(net), _fit_state(twin))
    before = _fit_state(net)
    with pytest.raises(ValueError, match="NaN or infinite"):
        net.fit(bad_X, y, epochs=2, batch_size=64, n_threads=n_threads)
    _same_fit_state(_fit_state(net), before[:2] + (None,) + before[3:])


@pytest.mark.parametrize("kernel", kernels.available_kernels())
def test_every_build_of_the_gather_finds_nonfinite_X(kernel):
    """The gather's loop is built twice (baseline and AVX2, picked by the GEMM family):
    each build flags a non-finite value anywhere in a row, and in a short last batch."""
    X, y = small_data(70, 33)
    saved = kernels.get_kernel()
    try:
        kernels.set_kernel(kernel)
        for row, col in [(0, 0), (31, 32), (69, 17)]:
            bad_X = X.copy()
            bad_X[row, col] = np.inf
            with pytest.raises(ValueError, match="NaN or infinite"):
                Network([33, 4, 3], seed=0).fit(bad_X, y, epochs=1, batch_size=32,
                                                shuffle=False, n_threads=1)
    finally:
        kernels.set_kernel(saved)


def test_a_reset_fit_holds_no_reference_to_the_old_optimizer_state():
    """fit(reset=True) lets the previous fit's optimizer state go before training (it
    would otherwise add a copy of the parameters to the peak memory of every fit)."""
    X, y = small_data(64, 6)
    net = Network([6, 5, 3], seed=0)
    net.fit(X, y, epochs=1, batch_size=16)
    old = weakref.ref(net._optimizer_state["state1"])
    alive = []
    net.fit(X, y, epochs=1, batch_size=16, callbacks=[lambda n, r: alive.append(old())])
    assert alive == [None]


def test_fit_finds_nonfinite_X_in_the_held_out_rows():
    """With validation_split the held-out rows are read by the evaluation after the first
    epoch; NaN there also leaves the network as it was."""
    X, y = small_data(100, 5)
    X[95, 1] = np.nan                   # in the last 20 rows: held out
    net = Network([5, 4, 3], seed=1)
    before = _fit_state(net)
    with pytest.raises(ValueError, match="NaN or infinite"):
        net.fit(X, y, epochs=3, batch_size=16, validation_split=0.2)
    _same_fit_state(_fit_state(net), before)
    assert net.history_ is None


@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
def test_inference_on_inputs_that_overflow_inside_the_network_is_an_error(loss):
    # finite inputs so large that float32 overflows in the first layer: the outputs are
    # inf or NaN, which no call may hand back as probabilities, labels or scores
    net = Network([4, 3, 2], seed=0, loss=loss)
    net.weights[0][:] = 1.0     # each hidden unit sums four inputs
    X = np.ones((600, 4), np.float32)
    X[[7, 300]] = 1e38
    y = np.zeros(600, int) if loss == "cross_entropy" else np.zeros((600, 2), np.float32)
    calls = [net.predict, lambda X: net.evaluate(X, y)]
    if loss == "cross_entropy":
        calls.append(net.predict_proba)
    for call in calls:
        with pytest.raises(FloatingPointError, match="2 of 600 rows .the first is row 7."):
            call(X)
    X[[7, 300]] = 1.0
    for call in calls:
        call(X)     # the same rows at a usual scale are fine


@pytest.mark.parametrize("row", [0, 255, 256, 599])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_is_caught_in_any_inference_chunk(row, bad):
    net = Network([4, 3, 2], seed=0)
    X = np.zeros((600, 4), np.float32)
    X[row, 2] = bad
    for call in (net.predict, net.predict_proba, lambda X: net.evaluate(X, np.zeros(600, int))):
        with pytest.raises(ValueError, match="NaN or infinite"):
            call(X)
