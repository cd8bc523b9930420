"""The workloads of the benchmark, one implementation per library.

Training factories ``train_<peer>(X, y, model, batch_size, n_threads, seed)`` take the
training rows X (n, 784): uint8 pixels, which every library scales by 1/255 (cnn_core as
it gathers a batch, the others once up front), or float32 features, used as they are;
integer labels y (n,); and the model: a list of layer sizes (an MLP with relu hidden
layers) or ``"lenet5"``.  Each does its one-time preparation and returns ``epoch(rows) ->
mean loss``: one shuffled epoch of minibatch SGD (learning rate 0.01, momentum 0.9, no
weight decay, softmax cross-entropy) over the first ``rows`` samples.

Prediction factories ``predict_<peer>(model, weights, n_threads)`` take the same float32
weights in every library and return ``(convert, {label: f})``: ``convert`` turns float32
rows (n, 784) into that library's input once (outside the timing), and each
``f(converted X)`` is one way that library predicts from Python.

Peers are imported lazily, inside the factories, so a missing one costs nothing.
"""
import importlib.util
import tempfile
from pathlib import Path

import numpy as np

LEARNING_RATE = 0.01
MOMENTUM = 0.9
LENET = "lenet5"

# peer name -> the module that must be importable for it
PEER_MODULES = {"cnn_core": "cnn_core", "torch": "torch", "jax": "jax", "numpy": "numpy",
                "onnxruntime": "onnxruntime"}


def available(peer):
    """True if the library behind `peer` can be imported."""
    try:
        return importlib.util.find_spec(PEER_MODULES[peer]) is not None
    except (ImportError, ValueError):
        return False


def _same(X):
    return X


def as_float32(X):
    """Training rows as float32: uint8 pixels scaled to [0, 1] (no float64 temporaries),
    float32 features as they are."""
    if X.dtype == np.uint8:
        out = X.astype(np.float32)
        out *= np.float32(1.0 / 255.0)
        return out
    return X


# ---- the models ------------------------------------------------------------------------

# LeNet-5 on 28x28x1 images, channels last: (kind, settings); conv kernels 5x5 with relu,
# max pooling 2x2, then dense layers with relu except the last.
LENET_LAYERS = [("conv", 6, "same"), ("pool",), ("conv", 16, "valid"), ("pool",),
                ("dense", 120), ("dense", 84), ("dense", 10)]


def mlp_weights(sizes, seed):
    """He-initialised float32 weights [(W (n_in, n_out), b (n_out,)), ...] for `sizes`."""
    rng = np.random.default_rng(seed)
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        W = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        layers.append((W, np.zeros(n_out, dtype=np.float32)))
    return layers


def lenet_weights(seed):
    """He-initialised float32 LeNet-5 weights, cnn_core's layout: conv (5, 5, in_c, out_c)
    (HWIO), dense (n_in, n_out) with the flattened input in HWC order."""
    rng = np.random.default_rng(seed)
    weights, channels = [], 1
    n_in = None
    for layer in LENET_LAYERS:
        if layer[0] == "conv":
            shape = (5, 5, channels, layer[1])
            channels = layer[1]
        elif layer[0] == "dense":
            n_in = n_in or 5 * 5 * channels
            shape = (n_in, layer[1])
            n_in = layer[1]
        else:
            continue
        fan_in = int(np.prod(shape[:-1]))
        W = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        weights.append((W, np.zeros(shape[-1], dtype=np.float32)))
    return weights


def model_weights(model, seed):
    return lenet_weights(seed) if model == LENET else mlp_weights(model, seed)


def model_name(model):
    return "LeNet-5" if model == LENET else "-".join(map(str, model))


# ---- cnn_core ------------------------------------------------------------------------

def cnn_core_network(model, seed, weights=None):
    """A cnn_core.Network for `model`, with `weights` copied in if given."""
    import cnn_core

    if model == LENET:
        net = cnn_core.Network(cnn_core.layers.lenet5(dropout=0), seed=seed)
    else:
        net = cnn_core.Network(model, activation="relu", seed=seed)
    if weights is not None:
        for (W, b), W_net, b_net in zip(weights, net.weights, net.biases):
            W_net[...] = W.reshape(W_net.shape)
            b_net[...] = b
    return net


def train_cnn_core(X, y, model, batch_size, n_threads, seed):
    """cnn_core.Network.fit(epochs=1) on X as it is (uint8 pixels or float32 features)."""
    net = cnn_core_network(model, seed)

    def epoch(rows):
        history = net.fit(X[:rows], y[:rows], epochs=1, batch_size=batch_size,
                          optimizer="sgd", learning_rate=LEARNING_RATE, momentum=MOMENTUM,
                          shuffle=True, n_threads=n_threads)
        return history["loss"][-1]

    return epoch


def predict_cnn_core(model, weights, n_threads):
    """Network.predict (and, for the MLP, predict_proba) with the given weights."""
    net = cnn_core_network(model, 0, weights)
    funcs = {"cnn_core predict": lambda X: net.predict(X, n_threads=n_threads)}
    if model != LENET:
        funcs["cnn_core predict_proba"] = lambda X: net.predict_proba(X, n_threads=n_threads)
    return _same, funcs


# ---- PyTorch -------------------------------------------------------------------------

def _torch_model(torch, model):
    nn = torch.nn
    if model == LENET:
        return nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    layers = []
    for i, (n_in, n_out) in enumerate(zip(model[:-1], model[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(model) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _torch_input(torch, model, X):
    """float32 rows (n, 784) as the tensor the model takes (NCHW images for LeNet-5)."""
    t = torch.from_numpy(np.ascontiguousarray(X))
    return t.reshape(-1, 1, 28, 28) if model == LENET else t


def channels_first(weights):
    """cnn_core-layout LeNet weights for a channels-first (NCHW) network: conv kernels
    HWIO -> OIHW, and the rows of the first dense layer after the convolutions from HWC
    order to CHW order (what flattening an NCHW tensor gives); dense stays (n_in, n_out)."""
    out = []
    for i, (W, b) in enumerate(weights):
        if W.ndim == 4:
            W = W.transpose(3, 2, 0, 1)
        elif i > 0 and weights[i - 1][0].ndim == 4:
            c = weights[i - 1][0].shape[3]
            side = int(round((W.shape[0] // c) ** 0.5))
            W = W.reshape(side, side, c, -1).transpose(2, 0, 1, 3).reshape(W.shape)
        out.append((np.ascontiguousarray(W), b))
    return out


def _torch_load(torch, net, weights):
    """Copy cnn_core-layout weights into the torch model (Linear keeps (out, in))."""
    params = [m for m in net if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        for (W, b), m in zip(channels_first(weights), params):
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(W if W.ndim == 4 else W.T)))
            m.bias.copy_(torch.from_numpy(b))


def train_torch(X, y, model, batch_size, n_threads, seed):
    """nn.Sequential + CrossEntropyLoss + optim.SGD (eager); data converted to a float32
    tensor once, batches gathered by index."""
    import torch

    torch.set_num_threads(n_threads)
    torch.manual_seed(seed)
    X_t = _torch_input(torch, model, as_float32(X))
    y_t = torch.from_numpy(y.astype(np.int64))
    net = _torch_model(torch, model)
    _torch_load(torch, net, model_weights(model, seed))
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()

    def epoch(rows):
        order = torch.randperm(rows)
        total = torch.zeros(())
        for start in range(0, rows, batch_size):
            idx = order[start:start + batch_size]
            xb, yb = X_t[idx], y_t[idx]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)
        return float(total) / rows

    return epoch


def predict_torch(model, weights, n_threads):
    """model(x) under torch.no_grad() and under torch.inference_mode()."""
    import torch

    torch.set_num_threads(n_threads)
    net = _torch_model(torch, model).eval()
    _torch_load(torch, net, weights)

    def no_grad(X):
        with torch.no_grad():
            return net(X)

    def inference_mode(X):
        with torch.inference_mode():
            return net(X)

    return (lambda X: _torch_input(torch, model, X),
            {"torch no_grad model(x)": no_grad, "torch inference_mode model(x)": inference_mode})


# ---- JAX -----------------------------------------------------------------------------

def _jax_logits(jax, jnp, model, params, x):
    """Logits of `model` for a batch x (m, 784): the MLP with cnn_core's weights, LeNet-5
    in NCHW with channels_first(weights) (XLA's CPU convolutions are faster in NCHW than
    in NHWC)."""
    if model != LENET:
        h = x
        for W, b in params[:-1]:
            h = jax.nn.relu(h @ W + b)
        W, b = params[-1]
        return h @ W + b
    h = x.reshape(-1, 1, 28, 28)
    it = iter(params)
    for layer in LENET_LAYERS:
        if layer[0] == "conv":
            W, b = next(it)
            h = jax.lax.conv_general_dilated(h, W, (1, 1), layer[2].upper(),
                                             dimension_numbers=("NCHW", "OIHW", "NCHW"))
            h = jax.nn.relu(h + b[None, :, None, None])
        elif layer[0] == "pool":
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2),
                                      "VALID")
        else:
            W, b = next(it)
            h = h.reshape(h.shape[0], -1) @ W + b
            if layer is not LENET_LAYERS[-1]:
                h = jax.nn.relu(h)
    return h


def train_jax(X, y, model, batch_size, n_threads, seed):
    """The whole epoch is one jax.jit function: a permutation, jax.lax.scan over the
    minibatches (the short last batch is one more step inside the same function), manual
    SGD momentum.  Threads are set through XLA_FLAGS (and CPU affinity) by the caller
    before jax is imported.  One compilation per distinct `rows`.
    """
    import jax
    import jax.numpy as jnp

    X_d = jax.device_put(as_float32(X))
    y_d = jax.device_put(y.astype(np.int32))
    weights = model_weights(model, seed)
    weights = channels_first(weights) if model == LENET else weights
    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in weights]
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
    state = {"params": params, "velocity": velocity, "key": jax.random.PRNGKey(seed)}
    compiled = {}

    def loss_fn(params, xb, yb):
        logp = jax.nn.log_softmax(_jax_logits(jax, jnp, model, params, xb))
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

    grad_fn = jax.value_and_grad(loss_fn)

    def make_epoch(rows):
        n_full, rest = divmod(rows, batch_size)

        def epoch_fn(params, velocity, X_all, y_all, key):
            order = jax.random.permutation(key, rows)

            def step(carry, idx):
                params, velocity, total = carry
                loss, grads = grad_fn(params, jnp.take(X_all, idx, axis=0),
                                      jnp.take(y_all, idx))
                velocity = jax.tree_util.tree_map(lambda v, g: MOMENTUM * v + g,
                                                  velocity, grads)
                params = jax.tree_util.tree_map(lambda p, v: p - LEARNING_RATE * v,
                                                params, velocity)
                return (params, velocity, total + loss * idx.shape[0]), None

            carry = (params, velocity, jnp.float32(0.0))
            if n_full:
                batches = order[:n_full * batch_size].reshape(n_full, batch_size)
                carry, _ = jax.lax.scan(step, carry, batches)
            if rest:
                carry, _ = step(carry, order[n_full * batch_size:])
            params, velocity, total = carry
            return params, velocity, total / rows

        return jax.jit(epoch_fn, donate_argnums=(0, 1))

    def epoch(rows):
        if rows not in compiled:
            compiled[rows] = make_epoch(rows)
        state["key"], key = jax.random.split(state["key"])
        params, velocity, loss = compiled[rows](state["params"], state["velocity"],
                                                X_d[:rows] if rows < len(X) else X_d,
                                                y_d[:rows] if rows < len(y) else y_d, key)
        state["params"], state["velocity"] = params, velocity
        return float(loss.block_until_ready())

    return epoch


# ---- numpy and ONNX Runtime (inference only) -----------------------------------------

def numpy_forward(weights, X):
    """Logits of the MLP `weights` on float32 X (n, n_in), relu hidden layers."""
    h = X
    for l, (W, b) in enumerate(weights):
        h = h @ W
        h += b
        if l < len(weights) - 1:
            np.maximum(h, 0.0, out=h)
    return h


def predict_numpy(model, weights, n_threads):
    """The numpy forward pass of the MLP (threads set by the caller's BLAS)."""
    if model == LENET:
        return _same, {}
    return _same, {"numpy forward (logits)": lambda X: numpy_forward(weights, X)}


def predict_onnxruntime(model, weights, n_threads):
    """An ONNX Runtime session (CPU, intra-op threads = n_threads, sequential) on the file
    written by cnn_core's Network.to_onnx; fetches the label output only, as predict."""
    import onnxruntime as ort

    if model == LENET:
        return _same, {}
    net = cnn_core_network(model, 0, weights)
    options = ort.SessionOptions()
    options.intra_op_num_threads = n_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    with tempfile.TemporaryDirectory() as folder:
        path = net.to_onnx(Path(folder) / "mlp.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _same, {"onnxruntime run (label)":
                   lambda X: session.run(["label"], {"input": X})[0]}


TRAINERS = {"cnn_core": train_cnn_core, "torch": train_torch, "jax": train_jax}
PREDICTORS = {"cnn_core": predict_cnn_core, "torch": predict_torch, "numpy": predict_numpy,
              "onnxruntime": predict_onnxruntime}
