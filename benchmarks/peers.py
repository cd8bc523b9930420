"""The workloads of the benchmark, one implementation per library.

Every training factory ``train_<peer>(X, y, sizes, batch_size, n_threads, seed)`` takes
uint8 pixels X (n, 784), integer labels y (n,) and the layer sizes, does its one-time
data preparation (e.g. float32 / 255) and returns ``epoch(rows) -> mean loss``: one
shuffled epoch of minibatch SGD (learning rate 0.01, momentum 0.9, no weight decay, relu
hidden layers, softmax cross-entropy) over the first ``rows`` samples.

Every prediction factory ``predict_<peer>(weights, n_threads)`` takes the same float32
weights [(W (n_in, n_out), b (n_out,)), ...] and returns ``(convert, {label: f})``:
``convert`` turns a float32 numpy array into that library's input once (outside the
timing), and each ``f(converted X)`` is one way that library predicts from Python.

Peers are imported lazily, inside the factories, so a missing one costs nothing.
"""
import importlib.util
import warnings

import numpy as np

LEARNING_RATE = 0.01
MOMENTUM = 0.9

# peer name -> the module that must be importable for it
PEER_MODULES = {"cnn_core": "cnn_core", "torch": "torch", "numpy": "numpy",
                "sklearn": "sklearn", "jax": "jax"}


def available(peer):
    """True if the library behind `peer` can be imported."""
    try:
        return importlib.util.find_spec(PEER_MODULES[peer]) is not None
    except (ImportError, ValueError):
        return False


def _same(X):
    return X


def mlp_weights(sizes, seed):
    """He-initialised float32 weights [(W (n_in, n_out), b (n_out,)), ...] for `sizes`."""
    rng = np.random.default_rng(seed)
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        W = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        layers.append((W, np.zeros(n_out, dtype=np.float32)))
    return layers


def scaled_float32(X):
    """X (uint8 pixels) as a new float32 array scaled to [0, 1], without float64 temporaries."""
    out = X.astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    return out


# ---- cnn_core ------------------------------------------------------------------------

def train_cnn_core(X, y, sizes, batch_size, n_threads, seed):
    """cnn_core.Network.fit(epochs=1) on the uint8 pixels as they are."""
    import cnn_core

    net = cnn_core.Network(sizes, activation="relu", seed=seed)

    def epoch(rows):
        history = net.fit(X[:rows], y[:rows], epochs=1, batch_size=batch_size,
                          optimizer="sgd", learning_rate=LEARNING_RATE, momentum=MOMENTUM,
                          shuffle=True, n_threads=n_threads)
        return history["loss"][-1]

    return epoch


def predict_cnn_core(weights, n_threads):
    """Network.predict / predict_proba with the given weights copied in."""
    import cnn_core

    sizes = [weights[0][0].shape[0]] + [W.shape[1] for W, _ in weights]
    net = cnn_core.Network(sizes, activation="relu", seed=0)
    for (W, b), W_net, b_net in zip(weights, net.weights, net.biases):
        W_net[...] = W
        b_net[...] = b
    return _same, {
        "cnn_core predict": lambda X: net.predict(X, n_threads=n_threads),
        "cnn_core predict_proba": lambda X: net.predict_proba(X, n_threads=n_threads),
        "cnn_core predict (n_threads=1)": lambda X: net.predict(X, n_threads=1),
    }


# ---- PyTorch -------------------------------------------------------------------------

def _torch_model(torch, sizes):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def train_torch(X, y, sizes, batch_size, n_threads, seed):
    """nn.Sequential + CrossEntropyLoss + optim.SGD; data converted to a float tensor once."""
    import torch

    torch.set_num_threads(n_threads)
    torch.manual_seed(seed)
    X_t = torch.from_numpy(X).float().div_(255.0)
    y_t = torch.from_numpy(y.astype(np.int64))
    model = _torch_model(torch, sizes)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()

    def epoch(rows):
        order = torch.randperm(rows)
        total = torch.zeros(())
        for start in range(0, rows, batch_size):
            idx = order[start:start + batch_size]
            xb, yb = X_t[idx], y_t[idx]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)
        return float(total) / rows

    return epoch


def predict_torch(weights, n_threads):
    """model(x) under torch.no_grad() and under torch.inference_mode()."""
    import torch

    torch.set_num_threads(n_threads)
    sizes = [weights[0][0].shape[0]] + [W.shape[1] for W, _ in weights]
    model = _torch_model(torch, sizes).eval()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for (W, b), lin in zip(weights, linears):
            lin.weight.copy_(torch.from_numpy(W.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))

    def no_grad(X):
        with torch.no_grad():
            return model(X)

    def inference_mode(X):
        with torch.inference_mode():
            return model(X)

    return torch.from_numpy, {"torch no_grad model(x)": no_grad,
                              "torch inference_mode model(x)": inference_mode}


# ---- numpy from scratch --------------------------------------------------------------

class NumpyMLP:
    """A float32 MLP in plain numpy: flat parameter/gradient/velocity vectors with
    per-layer views, and activation/delta buffers allocated once for `batch_size` rows."""

    def __init__(self, sizes, batch_size, seed):
        self.sizes = list(sizes)
        layers = mlp_weights(sizes, seed)
        n = sum(W.size + b.size for W, b in layers)
        self.params = np.empty(n, dtype=np.float32)
        self.grads = np.zeros(n, dtype=np.float32)
        self.velocity = np.zeros(n, dtype=np.float32)
        self.step_buf = np.empty(n, dtype=np.float32)
        self.W, self.b, self.dW, self.db = [], [], [], []
        offset = 0
        for W, b in layers:
            for arr, views, grads in ((W, self.W, self.dW), (b, self.b, self.db)):
                view = self.params[offset:offset + arr.size].reshape(arr.shape)
                view[...] = arr
                views.append(view)
                grads.append(self.grads[offset:offset + arr.size].reshape(arr.shape))
                offset += arr.size
        # acts[0] is the input batch, acts[l + 1] the output of layer l (logits last)
        self.acts = [np.empty((batch_size, s), dtype=np.float32) for s in sizes]
        self.deltas = [np.empty((batch_size, s), dtype=np.float32) for s in sizes[1:]]

    def forward(self, m):
        """Fill acts[1:] for the m rows held in acts[0][:m]; returns the logits (m, C)."""
        last = len(self.W) - 1
        for l, (W, b) in enumerate(zip(self.W, self.b)):
            Z = self.acts[l + 1][:m]
            np.matmul(self.acts[l][:m], W, out=Z)
            Z += b
            if l < last:
                np.maximum(Z, 0.0, out=Z)
        return self.acts[-1][:m]

    def train_batch(self, X, idx, y):
        """One SGD-momentum step on rows X[idx]; returns the batch's summed loss."""
        m = len(idx)
        np.take(X, idx, axis=0, out=self.acts[0][:m])
        P = self.forward(m)
        P -= P.max(axis=1, keepdims=True)
        np.exp(P, out=P)
        P /= P.sum(axis=1, keepdims=True)
        labels = y[idx]
        rows = np.arange(m)
        loss = -np.log(P[rows, labels] + 1e-30).sum()
        D = self.deltas[-1][:m]
        np.divide(P, m, out=D)
        D[rows, labels] -= 1.0 / m
        for l in range(len(self.W) - 1, -1, -1):
            np.matmul(self.acts[l][:m].T, D, out=self.dW[l])
            D.sum(axis=0, out=self.db[l])
            if l > 0:
                D_prev = self.deltas[l - 1][:m]
                np.matmul(D, self.W[l].T, out=D_prev)
                D_prev *= self.acts[l][:m] > 0
                D = D_prev
        self.velocity *= MOMENTUM
        self.velocity += self.grads
        np.multiply(self.velocity, LEARNING_RATE, out=self.step_buf)
        self.params -= self.step_buf
        return float(loss)


def train_numpy(X, y, sizes, batch_size, n_threads, seed):
    """NumpyMLP; pixels converted to float32 / 255 once; threads set by the caller's BLAS."""
    X_f = scaled_float32(X)
    labels = y.astype(np.intp)
    net = NumpyMLP(sizes, batch_size, seed)
    rng = np.random.default_rng(seed)

    def epoch(rows):
        order = rng.permutation(rows)
        total = 0.0
        for start in range(0, rows, batch_size):
            total += net.train_batch(X_f, order[start:start + batch_size], labels)
        return total / rows

    return epoch


def numpy_forward(weights, X):
    """Logits of the MLP `weights` on float32 X (n, n_in), relu hidden layers."""
    h = X
    for l, (W, b) in enumerate(weights):
        h = h @ W
        h += b
        if l < len(weights) - 1:
            np.maximum(h, 0.0, out=h)
    return h


def predict_numpy(weights, n_threads):
    """The numpy forward pass (threads set by the caller's BLAS)."""
    return _same, {"numpy forward (logits)": lambda X: numpy_forward(weights, X)}


# ---- scikit-learn --------------------------------------------------------------------

def train_sklearn(X, y, sizes, batch_size, n_threads, seed):
    """MLPClassifier(solver="sgd").partial_fit: one epoch per call, float32 kept."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X_f = scaled_float32(X)
    classes = np.arange(sizes[-1])
    clf = MLPClassifier(hidden_layer_sizes=tuple(sizes[1:-1]), activation="relu",
                        solver="sgd", alpha=0.0, batch_size=batch_size,
                        learning_rate="constant", learning_rate_init=LEARNING_RATE,
                        momentum=MOMENTUM, nesterovs_momentum=False, shuffle=True,
                        early_stopping=False, max_iter=1, random_state=seed)

    def epoch(rows):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.partial_fit(X_f[:rows], y[:rows], classes=classes)
        if clf.coefs_[0].dtype != np.float32:
            raise RuntimeError(f"scikit-learn trained in {clf.coefs_[0].dtype}, not float32")
        return float(clf.loss_)

    return epoch


# ---- JAX -----------------------------------------------------------------------------

def train_jax(X, y, sizes, batch_size, n_threads, seed):
    """A jitted epoch: jax.lax.scan over the shuffled minibatches, manual SGD momentum.

    Threads are set through XLA_FLAGS by the caller before jax is imported.  The last,
    short minibatch is one more step inside the same jitted function.  One compilation
    per distinct `rows`.
    """
    import jax
    import jax.numpy as jnp

    X_d = jax.device_put(scaled_float32(X))
    y_d = jax.device_put(y.astype(np.int32))
    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in mlp_weights(sizes, seed)]
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
    state = {"params": params, "velocity": velocity, "key": jax.random.PRNGKey(seed)}
    compiled = {}

    def loss_fn(params, xb, yb):
        h = xb
        for W, b in params[:-1]:
            h = jax.nn.relu(h @ W + b)
        W, b = params[-1]
        logp = jax.nn.log_softmax(h @ W + b)
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


TRAINERS = {"cnn_core": train_cnn_core, "torch": train_torch, "numpy": train_numpy,
            "sklearn": train_sklearn, "jax": train_jax}
PREDICTORS = {"cnn_core": predict_cnn_core, "torch": predict_torch, "numpy": predict_numpy}
