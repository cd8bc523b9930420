"""The layer-table engine (kernels._Net / _Trainer over cnn_net.c) against a float64 numpy
network written here from the layer definitions: inference, the gradient of a small CNN
with every layer kind (finite differences), the dropout masks' rule, squared error, and
bit-identical training for any thread count."""
import numpy as np
import pytest

from cnn_core import kernels, layers as L

ACT = {"identity": lambda z: z, "relu": lambda z: np.maximum(z, 0),
       "leaky_relu": lambda z: np.where(z > 0, z, 0.1 * z),
       "sigmoid": lambda z: 1 / (1 + np.exp(-z)), "tanh": np.tanh}

# Every layer kind, odd sizes, both paddings, a stride of 2, overlapping pool windows.
CNN = [L.Input((9, 7, 2)),
       L.Conv2D(3, 3, stride=2, padding="same", activation="tanh"),      # 5x4x3
       L.MaxPool2D(2, stride=1),                                          # 4x3x3
       L.Dropout(0.2),
       L.Conv2D(4, (2, 3), activation="leaky_relu", leaky_slope=0.1),     # 3x1x4
       L.AvgPool2D(1),                                                    # 3x1x4
       L.Flatten(),
       L.Dense(5, activation="sigmoid"),
       L.Dropout(0.3),
       L.Dense(3)]


def random_params(stack, seed):
    shapes = L.output_shapes(stack)
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal(int(np.prod(s))) * 0.5
             for layer, shape in zip(stack[1:], shapes[:-1])
             for s in layer.parameter_shapes(shape)]
    params = kernels._workspace(sum(p.size for p in parts))
    params[:] = np.concatenate(parts)
    return params


def mix64(seed, k):
    """splitmix64's output for counter k of seed (uint64 arrays, wrapping)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (k + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def dropout_mask(shape, rate, net_seed, layer, step, batch_size):
    """keep / (1 - rate) of the dropout at layer index `layer` (Input not counted) in
    minibatch `step`: the kernel's mask for seed mix(net_seed ^ (layer + 1) golden) and
    offset step * batch_size * values per sample."""
    with np.errstate(over="ignore"):
        golden = np.uint64(0x9E3779B97F4A7C15)
        z = np.uint64(net_seed) ^ (np.uint64(layer + 1) * golden)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        seed = int(z ^ (z >> np.uint64(31)))
    per_sample = int(np.prod(shape[1:]))
    offset = step * batch_size * per_sample
    mask = kernels.dropout_forward(np.ones(shape, np.float32), rate, seed, offset)
    k = np.arange(offset, offset + int(np.prod(shape)), dtype=np.uint64)
    keep = (mix64(seed, k) >> np.uint64(32)) >= np.uint64(int(rate * 2 ** 32))
    assert np.array_equal(mask.reshape(-1) != 0, keep)   # the rule, written out
    return mask.astype(np.float64)


def forward64(stack, params, X, masks=None):
    """float64 output of the last layer for X (n, features); masks {layer: array} turn
    dropout on (training), else it is the identity."""
    shapes = L.output_shapes(stack)
    a = X.astype(np.float64).reshape((len(X),) + shapes[0])
    offset = 0
    for i, layer in enumerate(stack[1:]):
        shape_in = shapes[i]
        sizes = [int(np.prod(s)) for s in layer.parameter_shapes(shape_in)]
        if sizes:
            W = params[offset:offset + sizes[0]].reshape(layer.parameter_shapes(shape_in)[0])
            b = params[offset + sizes[0]:offset + sizes[0] + sizes[1]]
            offset += sum(sizes)
        if layer.kind == "dense":
            a = ACT[layer.activation](a @ W + b)
        elif layer.kind == "conv2d":
            kh, kw = layer.kernel_size
            top, bottom, left, right = layer.padding_amounts(shape_in)
            P = np.pad(a, ((0, 0), (top, bottom), (left, right), (0, 0)))
            oh, ow, _ = shapes[i + 1]
            s = layer.stride
            z = np.zeros((len(a), oh, ow, layer.filters)) + b
            for u in range(kh):
                for v in range(kw):
                    z += P[:, u:u + (oh - 1) * s + 1:s, v:v + (ow - 1) * s + 1:s] @ W[u, v]
            a = ACT[layer.activation](z)
        elif layer.kind in ("maxpool2d", "avgpool2d"):
            oh, ow, _ = shapes[i + 1]
            s, k = layer.stride, layer.size
            win = np.stack([a[:, u:u + (oh - 1) * s + 1:s, v:v + (ow - 1) * s + 1:s]
                            for u in range(k) for v in range(k)])
            a = win.max(axis=0) if layer.kind == "maxpool2d" else win.mean(axis=0)
        elif layer.kind == "flatten":
            a = a.reshape(len(a), -1)
        elif layer.kind == "dropout" and masks is not None:
            a = a * masks[i]
    return a


def cross_entropy64(z, y):
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


def data(n, stack, seed, classes=3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, int(np.prod(stack[0].shape)))).astype(np.float32)
    return X, rng.integers(0, classes, n).astype(np.int32)


def one_step_gradient(net, X, y, step=0):
    """The engine's gradient for one minibatch of all of X (learning rate 0)."""
    trainer = kernels._Trainer(net, "sgd", 0.0, 0.0, False, 0.0, 0.9, 0.999, 1e-8, len(X), 1)
    trainer.batch_count = step
    loss, _ = trainer.train_batches(X, y, None, np.arange(len(X), dtype=np.int64), 0, 1)
    assert trainer.batch_count == step + 1
    return np.array(trainer.grads, dtype=np.float64), loss / len(X)


def test_inference_matches_float64():
    params = random_params(CNN, 1)
    net = kernels._Net(CNN, "cross_entropy", params)
    X, _ = data(13, CNN, 2)
    z = net.predict(X, True, 1)
    expected = forward64(CNN, params.astype(np.float64), X)
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-5)
    p = net.predict(X, False, 1)
    e = np.exp(expected - expected.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)
    assert np.array_equal(net.predict_labels(X, 2), z.argmax(axis=1))


# Pooling windows that tile relu and leaky_relu outputs: the vector max-pool backward,
# with relu' applied to the maxima it routes to.
TILED = [L.Input((8, 6, 3)),
         L.Conv2D(4, 3, padding="same", activation="relu"),                 # 8x6x4
         L.MaxPool2D(2),                                                    # 4x3x4
         L.Conv2D(5, 3, padding="same", activation="leaky_relu", leaky_slope=0.1),
         L.MaxPool2D(2),                                                    # 2x1x5
         L.Flatten(),
         L.Dense(3)]


# Image layers without parameters: the sliced forward pass alone.
POOL_FIRST = [L.Input((6, 5, 2)), L.AvgPool2D(2), L.Dropout(0.25), L.Flatten(),
              L.Dense(4, activation="tanh"), L.Dense(3)]


@pytest.mark.parametrize("stack", [CNN, TILED, POOL_FIRST],
                         ids=["every_kind", "tiled_pools", "pool_first"])
@pytest.mark.parametrize("step", [0, 7])
def test_cnn_gradient_matches_finite_differences(step, stack):
    params = random_params(stack, 3)
    net = kernels._Net(stack, "cross_entropy", params, 11)
    X, y = data(13, stack, 4)   # convolutions in slices of 8 images: one whole, one not
    grads, loss = one_step_gradient(net, X, y, step)
    shapes = L.output_shapes(stack)
    dropout_at = [i for i, layer in enumerate(stack[1:]) if layer.kind == "dropout"]
    masks = {i: dropout_mask((len(X),) + shapes[i + 1], stack[i + 1].rate, 11, i, step, len(X))
             for i in dropout_at}
    p64 = params.astype(np.float64)
    assert loss == pytest.approx(cross_entropy64(forward64(stack, p64, X, masks), y), rel=1e-4)
    h = 1e-6
    numeric = np.empty_like(p64)
    for i in range(len(p64)):
        up, down = p64.copy(), p64.copy()
        up[i] += h
        down[i] -= h
        numeric[i] = (cross_entropy64(forward64(stack, up, X, masks), y)
                      - cross_entropy64(forward64(stack, down, X, masks), y)) / (2 * h)
    assert np.count_nonzero(numeric) > len(numeric) // 2
    np.testing.assert_allclose(grads, numeric, rtol=2e-3, atol=2e-5)


def test_squared_error_gradient_and_raw_outputs():
    stack = [L.Input((4, 4, 1)), L.Conv2D(2, 3, padding="same", activation="tanh"),
             L.Flatten(), L.Dense(2)]
    params = random_params(stack, 5)
    net = kernels._Net(stack, "squared_error", params)
    X, _ = data(5, stack, 6)
    T = np.random.default_rng(7).standard_normal((5, 2)).astype(np.float32)
    p64 = params.astype(np.float64)
    out = net.predict(X, False, 1)          # raw outputs, no softmax
    np.testing.assert_allclose(out, forward64(stack, p64, X), rtol=1e-4, atol=1e-5)

    def loss64(p):
        return 0.5 * ((forward64(stack, p, X) - T) ** 2).sum(axis=1).mean()

    grads, loss = one_step_gradient(net, X, T)
    assert loss == pytest.approx(loss64(p64), rel=1e-4)
    h = 1e-6
    numeric = np.array([(loss64(p64 + h * e) - loss64(p64 - h * e)) / (2 * h)
                        for e in np.eye(len(p64))])
    np.testing.assert_allclose(grads, numeric, rtol=2e-3, atol=2e-5)


def test_training_is_bit_identical_for_any_thread_count(mnist):
    X_train, y_train = mnist[0][:600], mnist[1][:600].astype(np.int32)
    stack = [L.Input((28, 28, 1)), L.Conv2D(6, 5, padding="same", activation="relu"),
             L.MaxPool2D(2), L.Dropout(0.1), L.Conv2D(8, 3, activation="relu"),
             L.AvgPool2D(2), L.Flatten(), L.Dense(32, activation="relu"), L.Dropout(0.25),
             L.Dense(10)]
    results = []
    for threads in (1, 2, 3):
        params = random_params(stack, 8) * np.float32(0.3)
        net = kernels._Net(stack, "cross_entropy", params, 5)
        trainer = kernels._Trainer(net, "sgd", 0.05, 0.9, False, 0.0, 0.9, 0.999, 1e-8, 61,
                                   threads)
        order = np.random.default_rng(0).permutation(len(X_train)).astype(np.int64)
        loss, _ = trainer.train_batches(X_train, y_train, None, order, 0, 10)
        results.append((loss, params.copy(), net.predict(mnist[2][:300], False, threads)))
    for loss, params, probs in results[1:]:
        assert loss == results[0][0]
        assert np.array_equal(params, results[0][1])
        assert np.array_equal(probs, results[0][2])
    assert not np.array_equal(results[0][1], random_params(stack, 8) * np.float32(0.3))


def test_engine_refuses_stacks_it_cannot_build():
    params = kernels._workspace(10)
    with pytest.raises(ValueError, match="loss must be one of"):
        kernels._Net([L.Input((3,)), L.Dense(2)], "hinge", kernels._workspace(8))
    with pytest.raises(ValueError, match="params has 10 values"):
        kernels._Net([L.Input((3,)), L.Dense(2)], "cross_entropy", params)
    with pytest.raises(ValueError, match="cannot build"):     # window larger than input
        kernels._Net([L.Input((2, 2, 1)), L.MaxPool2D(3), L.Flatten(), L.Dense(2)],
                     "cross_entropy", params)
