"""The Network: a multilayer perceptron whose training and inference run in cnn_core's C
kernels.  Python here only validates arguments, owns the numpy arrays, shuffles, keeps
the history and reads and writes model files."""
import math
import os
import threading
import time
import warnings

import numpy as np

from . import kernels, layers, model_file, training
from ._progress import EpochProgress
from .model_file import ModelFileError

__all__ = ["Network", "History", "ModelFileError"]

_HIDDEN = kernels.HIDDEN_ACTIVATIONS
DEFAULT_LEARNING_RATE = {"sgd": 0.05, "adam": 0.001, "adamw": 0.001}
def _r2_score(predicted, target, weight):
    """Coefficient of determination, averaged over the columns (1 for a constant column
    predicted exactly, 0 for one predicted otherwise)."""
    p, t = predicted.astype(np.float64), target.astype(np.float64)
    w = np.ones(t.shape[0]) if weight is None else weight.astype(np.float64)
    if w.sum() <= 0:
        return float("nan")
    mean = (w[:, None] * t).sum(axis=0) / w.sum()
    residual = (w[:, None] * (t - p) ** 2).sum(axis=0)
    total = (w[:, None] * (t - mean) ** 2).sum(axis=0)
    scores = np.where(total > 0, 1 - residual / np.where(total > 0, total, 1),
                      np.where(residual > 0, 0.0, 1.0))
    return float(scores.mean())


class _Reader:
    """An inference call under way and the engine it reads (None until chosen)."""
    __slots__ = ("net",)

    def __init__(self):
        self.net = None


class History:
    """Per-epoch training records.

    ``history.records`` is a list of dicts with keys ``epoch``, ``loss``, ``accuracy``
    (classifiers), ``learning_rate``, ``seconds`` and, with validation data,
    ``val_loss`` and ``val_accuracy`` (classifiers) or ``val_r2`` (regressions, R^2
    averaged over the outputs); ``history["loss"]`` is the list of one key over
    the epochs.  ``best_epoch`` is the epoch whose weights early stopping kept (else
    None) and ``stopped_epoch`` the epoch after which early stopping or a callback
    ended training (else None).  A fit with ``reset=False`` appends to the history of
    the fit it continues.
    """

    def __init__(self):
        self.records = []
        self.best_epoch = None
        self.stopped_epoch = None

    def __getitem__(self, key):
        return [record[key] for record in self.records]

    def __len__(self):
        return len(self.records)

    def __repr__(self):
        last = self.records[-1] if self.records else {}
        return f"History(epochs={len(self.records)}, last={last})"

    def plot(self, path=None, *, title=None):
        """Loss (and accuracy) curves of training and validation over the epochs, with
        matplotlib (the optional extra ``cnn_core[plot]``); written to `path` (.png,
        .svg, .pdf) if given.  Returns the matplotlib Figure."""
        from .plotting import plot_history
        return plot_history(self, path, title=title)


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def _check_float(value, name, low, high=math.inf, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = low <= value and (value < high if high_open else value <= high)
    if not ok or math.isnan(value):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    if value > _FLOAT32_MAX:     # the kernels compute in float32
        raise ValueError(f"{name}={value:g} overflows float32, the precision training runs "
                         f"in (at most {_FLOAT32_MAX:.3g})")
    return value


def _memory_limit():
    """Bytes this process can hope to use: physical memory, capped by RLIMIT_AS (None if
    unknown)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, AttributeError, ValueError, OSError):
        pass
    return min(limits) if limits else None


def _check_memory(needed, what, largest, advice="use smaller layers"):
    """MemoryError before allocating `needed` bytes for `what` if it cannot fit; `largest`
    names the biggest part (e.g. the layer) and its bytes."""
    limit = _memory_limit()
    if limit is not None and needed > limit:
        raise MemoryError(f"{what} needs {needed / 1e9:.3g} GB ({largest}), more than the "
                          f"{limit / 1e9:.3g} GB of memory this process can use; {advice}")


def _largest_layer(stack, per_param):
    """(total bytes, description of the largest layer) at per_param bytes a parameter of
    the built layers ``stack``."""
    counts = [(layer.n_parameters, position, layer)
              for position, layer in enumerate(stack) if position]
    total = sum(count for count, _, _ in counts)
    count, position, layer = max(counts, key=lambda item: item[0])
    return (per_param * total,
            f"layer {position}, {layer!r} with weights "
            f"{' x '.join(map(str, layer.parameter_shapes()[0]))}, alone needs "
            f"{per_param * count / 1e9:.3g} GB")


def _mlp_form(stack):
    """(layer_sizes, activation, leaky_slope) when ``stack`` is what the MLP shorthand
    builds (flat Input, Dense layers sharing one activation, a last Dense of logits),
    else None."""
    if len(stack[0].shape) != 1 or not all(isinstance(l, layers.Dense) for l in stack[1:]):
        return None
    hidden = stack[1:-1]
    activation = hidden[0].activation if hidden else "relu"
    slope = hidden[0].leaky_slope if hidden else 0.01
    if stack[-1].activation != "identity" or any(
            (l.activation, l.leaky_slope) != (activation, slope) for l in hidden):
        return None
    return [stack[0].shape[0]] + [l.units for l in stack[1:]], activation, slope


def _build_stack(spec, activation, leaky_slope):
    """The built layers of ``Network(spec, activation, leaky_slope=...)``."""
    if isinstance(spec, (str, bytes)) or not hasattr(spec, "__iter__"):
        raise TypeError("layers must be a sequence of layer sizes like [784, 128, 10] or of "
                        f"cnn_core.layers layers, got {type(spec).__name__}")
    spec = list(spec)
    if spec and all(isinstance(item, layers.Layer) for item in spec):
        if activation is not None or leaky_slope is not None:
            raise ValueError("activation and leaky_slope apply to the layer-size shorthand; "
                             "give each layer of a stack its own, e.g. "
                             "layers.Dense(128, activation='relu')")
        if len(spec) - 1 > model_file.MAX_LAYERS:
            raise ValueError(f"a network has at most {model_file.MAX_LAYERS} layers after "
                             f"Input, got {len(spec) - 1}")
        return layers.build(spec)
    if any(isinstance(item, layers.Layer) for item in spec):
        raise TypeError("layers mixes layer sizes and cnn_core.layers layers; use one kind")
    if not 2 <= len(spec) <= model_file.MAX_LAYERS + 1:
        raise ValueError(f"layer_sizes needs 2 to {model_file.MAX_LAYERS + 1} entries "
                         f"(inputs, hidden layers, classes), got {len(spec)}")
    sizes = [_check_int(s, "every layer size", 1) for s in spec]
    if any(s > layers.MAX_DIMENSION for s in sizes):
        raise ValueError(f"layer sizes must be at most {layers.MAX_DIMENSION}, got {sizes}")
    activation = "relu" if activation is None else activation
    if activation not in _HIDDEN:
        raise ValueError(f"activation must be one of {list(_HIDDEN)}, got {activation!r}")
    slope = _check_float(0.01 if leaky_slope is None else leaky_slope, "leaky_slope", 0.0,
                         1.0, high_open=True)
    return layers.build(layers.mlp(sizes, activation, slope))


class Network:
    """A neural network whose training and inference run in cnn_core's C kernels.

    Parameters
    ----------
    layers : sequence of int, or of cnn_core.layers layers
        Either the multilayer-perceptron shorthand ``[n_features, hidden..., n_outputs]``,
        e.g. ``[784, 128, 10]`` (2 to 33 sizes: Dense layers with ``activation``, then a
        Dense layer of logits), or a stack of layers starting with ``layers.Input(shape)``
        and ending with a ``layers.Dense``, e.g. a convolutional network::

            Network([L.Input((28, 28, 1)), L.Conv2D(6, 5, activation="relu"),
                     L.MaxPool2D(2), L.Flatten(), L.Dense(10)])

    activation : str or None
        Hidden activation of the shorthand: "relu" (the default, also for None),
        "leaky_relu", "sigmoid", "tanh", "identity".  A stack gives each layer its own
        activation instead.
    seed : int or None
        Seeds the weight initialisation, the shuffling and the dropout masks: the same
        seed gives the same weights and the same training.
    leaky_slope : float
        Slope of leaky_relu for negative inputs in the shorthand (default 0.01).
    loss : str
        "cross_entropy" (default): the last layer gives the logits of a softmax
        classifier and ``y`` holds class labels.  "squared_error": the last layer's
        outputs are regression predictions and ``y`` holds float targets.

    Weights are He-initialised where a layer's input or output passes through the relu
    family, Glorot otherwise; biases start at zero.  ``weights[i]`` and ``biases[i]`` are
    float32 views of the parameters the kernels train, one pair per Dense or Conv2D
    layer: Dense weights are (inputs, units), Conv2D weights (kernel_h, kernel_w,
    in_channels, filters).  ``layers`` holds the built layers, Input first.
    """

    def __init__(self, layers, activation=None, *, seed=None, leaky_slope=None,
                 loss="cross_entropy"):
        self.layers = _build_stack(layers, activation, leaky_slope)
        if loss not in kernels.LOSSES:
            raise ValueError(f"loss must be one of {list(kernels.LOSSES)}, got {loss!r}")
        self.loss = loss
        if seed is not None:
            seed = _check_int(seed, "seed", 0)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.history_ = None
        self._optimizer_state = None        # what fit(reset=False) continues
        self._optimizer_lost = False        # dropped by an interruption within an epoch
        self._fitting = threading.Lock()    # held by fit
        self._snapshot = None               # the _Net predict uses while fit runs
        self._readers = []                  # inference calls under way
        params = self._initial_params()
        self._dropout_seed = int(self._rng.integers(1 << 63))
        self._set_params(params, adopt=True)

    # ---- parameters -------------------------------------------------------------------
    def _initial_params(self):
        """He or Glorot weights and zero biases, drawn in float32 straight into one aligned
        parameter vector (no float64 copy of the weights)."""
        needed, largest = _largest_layer(self.layers, 4)
        _check_memory(needed, f"Network({self._description()})", largest)
        params = kernels._workspace(needed // 4)
        offset, relu_before = 0, False
        for layer in self.layers[1:]:
            relu_here = getattr(layer, "activation", None) in ("relu", "leaky_relu")
            shapes = layer.parameter_shapes()
            if shapes:
                size = math.prod(shapes[0])
                W = params[offset:offset + size]
                fan_in, fan_out = layer._fans(layer.input_shape)
                if relu_here or relu_before:
                    self._rng.standard_normal(out=W, dtype=np.float32)
                    W *= np.float32(math.sqrt(2.0 / fan_in))
                else:
                    limit = np.float32(math.sqrt(6.0 / (fan_in + fan_out)))
                    self._rng.random(out=W, dtype=np.float32)
                    W *= 2 * limit
                    W -= limit
                offset += size
                params[offset:offset + shapes[1][0]] = 0
                offset += shapes[1][0]
            if hasattr(layer, "activation"):
                relu_before = relu_here
        return params

    def _set_params(self, params, adopt=False):
        """Adopt a flat float32 parameter vector (itself, with adopt, when it comes from
        kernels._workspace) and build the kernel view of it."""
        if adopt:
            self._params = params
        else:
            self._params = kernels._workspace(params.shape[0])
            self._params[:] = params
        self.weights, self.biases = [], []
        offset = 0
        for layer in self.layers[1:]:
            shapes = layer.parameter_shapes()
            if shapes:
                size = math.prod(shapes[0])
                self.weights.append(self._params[offset:offset + size].reshape(shapes[0]))
                offset += size
                self.biases.append(self._params[offset:offset + shapes[1][0]])
                offset += shapes[1][0]
        self._net = self._engine(self._params)

    def _engine(self, params):
        """The C view of this network over the parameter vector ``params``."""
        return kernels._Net(self.layers, self.loss, params, self._dropout_seed)

    def _copy_of_params(self):
        """An aligned copy of the parameter vector."""
        copy = kernels._workspace(self._params.shape[0])
        copy[:] = self._params
        return copy

    @property
    def input_shape(self):
        """The shape of one sample: (features,) or (height, width, channels)."""
        return self.layers[0].shape

    @property
    def n_features(self):
        """Values in one sample (the columns of a flat X)."""
        return math.prod(self.input_shape)

    @property
    def n_outputs(self):
        """Outputs of the last layer: classes, or regression targets."""
        return self.layers[-1].units

    @property
    def n_classes(self):
        """Classes of a classifier (None for loss="squared_error")."""
        return self.n_outputs if self.loss == "cross_entropy" else None

    @property
    def layer_sizes(self):
        """[n_features, units...] when the network is what the MLP shorthand builds, else
        None."""
        form = _mlp_form(self.layers)
        return form and form[0]

    @property
    def activation(self):
        """The hidden activation of an MLP-shorthand network, else None."""
        form = _mlp_form(self.layers)
        return form and form[1]

    @property
    def leaky_slope(self):
        """The leaky_relu slope of an MLP-shorthand network, else None."""
        form = _mlp_form(self.layers)
        return form and form[2]

    def _description(self):
        sizes = self.layer_sizes
        if sizes is not None:
            return f"{sizes}, activation={self.activation!r}"
        return "[" + ", ".join(map(repr, self.layers)) + "]"

    def __repr__(self):
        n = self._params.shape[0]
        loss = "" if self.loss == "cross_entropy" else f", loss={self.loss!r}"
        return f"Network({self._description()}, seed={self.seed}{loss}) with {n:,} parameters"

    def summary(self):
        """A table of the layers: kind and settings, output shape, parameter count."""
        rows = [(f"{i}  {layer!r}", "x".join(map(str, layer.output_shape())),
                 f"{layer.n_parameters:,}" if i else "")
                for i, layer in enumerate(self.layers)]
        width = [max(len(row[k]) for row in rows + [("layer", "output", "parameters")])
                 for k in range(3)]
        lines = [f"{'layer':<{width[0]}}  {'output':<{width[1]}}  {'parameters':>{width[2]}}"]
        lines += [f"{a:<{width[0]}}  {b:<{width[1]}}  {c:>{width[2]}}" for a, b, c in rows]
        lines.append(f"{self._params.shape[0]:,} parameters, loss {self.loss}")
        return "\n".join(lines)

    # ---- argument checks --------------------------------------------------------------
    def _flat(self, X):
        """X of images (n, height, width[, channels]) as (n, n_features), a view when it
        can be; other inputs unchanged."""
        shape = getattr(X, "shape", None)
        if shape is None or len(shape) < 3 or len(self.input_shape) != 3:
            return X
        h, w, c = self.input_shape
        if tuple(shape[1:]) not in ((h, w, c), (h, w)) or (len(shape) == 3 and c != 1):
            raise ValueError(f"X must have shape (n_samples, {self.n_features}), "
                             f"(n_samples, {h}, {w}, {c})"
                             + (f" or (n_samples, {h}, {w})" if c == 1 else "")
                             + f" for this network's input {self.input_shape}, got {shape}")
        return np.reshape(X, (shape[0], self.n_features))

    def _check_X(self, X, name="X", check_finite=True):
        """X as a C-contiguous uint8 or float32 (n, n_features) array with finite values
        (with check_finite false, inference kernels check finiteness on the fly)."""
        return kernels._as_input(self._flat(X), self.n_features, name, check_finite)

    def _check_y(self, y, n, name="y"):
        """Labels int32 (n,) for a classifier, targets float32 (n, n_outputs) for a
        regression."""
        if self.loss == "squared_error":
            return kernels._targets(y, n, self.n_outputs, name)
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[0] == n and y.shape[1] == self.n_classes:
            raise ValueError(f"{name} must be class labels of shape ({n},), got {y.shape}; "
                             f"for one-hot labels pass {name}.argmax(axis=1)")
        if y.dtype.kind == "f" and y.size and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        return kernels._labels(y, n, self.n_classes, name)

    # ---- training ---------------------------------------------------------------------
    def fit(self, X, y, *, epochs=10, batch_size=64, optimizer="sgd", learning_rate=None,
            momentum=0.9, nesterov=False, weight_decay=0.0, beta1=0.9, beta2=0.999,
            eps=1e-8, schedule=None, validation_data=None, validation_split=0.0,
            early_stopping=None, callbacks=None, shuffle=True, sample_weight=None,
            class_weight=None, reset=True, verbose=0, n_threads=None):
        """Train with minibatch gradient descent on the network's loss.

        X : (n, n_features) or images (n, height, width[, channels]), uint8 (scaled by
            1/255 as batches are gathered) or floating point (converted to float32 once).
        y : (n,) integer labels in [0, n_classes), or for loss="squared_error" float
            targets (n,) or (n, n_outputs).
        optimizer : "sgd" (with ``momentum``, ``nesterov``), "adam" or "adamw"
            (``beta1``, ``beta2``, ``eps``).  ``learning_rate`` defaults to 0.05 for SGD
            and 0.001 for Adam/AdamW.  ``weight_decay`` is L2 for SGD/Adam, decoupled
            for AdamW.
        schedule : the learning rate of each epoch from ``learning_rate``: a name
            ("constant", "step", "exponential", "cosine", "warmup", "plateau"), a pair
            (name, {parameters}), a cnn_core.training schedule or a callable f(epoch)
            giving the rate itself (see cnn_core.training).
        validation_data : optional (X_val, y_val), evaluated after every epoch; or
            validation_split : the fraction of rows (the last ones, before shuffling)
            held out for it.
        early_stopping : True or a cnn_core.training.EarlyStopping (monitor, patience,
            min_delta): stop when the monitored value stops improving.  The weights of
            the best epoch are restored however training ends.
        callbacks : callables f(network, record) called after every epoch with its
            record; one returning True ends training (e.g. training.Checkpoint).
        sample_weight : optional (n,) non-negative per-sample loss weights;
            class_weight : a dict {label: weight} or "balanced", multiplied into them.
        reset : False continues the previous fit: the optimizer's state (momentum,
            Adam's moments and step), the dropout masks' counter and the history, so two
            fits of 3 epochs give the weights of one fit of 6.
        verbose : 0 silent; 1 a live progress bar on a terminal and one line per epoch.
        n_threads : most threads for the kernels (default: OMP_NUM_THREADS /
            threadpoolctl); each step times itself and drops to one thread while more do
            not pay (a busy machine, a network too small to split).

        Ctrl-C ends training keeping the weights of the last complete epoch (and raises
        KeyboardInterrupt).  NaN or infinity in float X is found as the first epoch
        gathers its minibatches: ValueError, with the weights, history and (with
        reset=False) optimizer state as before the call.  Returns a :class:`History`,
        also kept as ``self.history_``.
        Training with the same seed gives bit-identical weights for any n_threads.
        """
        X = self._check_X(X, check_finite=False)    # checked as batches are gathered
        n = X.shape[0]
        y = self._check_y(y, n)
        w = kernels._sample_weight(sample_weight, n)
        if class_weight is not None:
            if self.loss != "cross_entropy":
                raise ValueError(f"class_weight needs a classifier (loss='cross_entropy'); "
                                 f"this network has loss={self.loss!r}: use sample_weight")
            cw = training.class_sample_weight(class_weight, y, self.n_classes)
            w = cw if w is None else w * cw
        epochs = _check_int(epochs, "epochs", 1)
        batch_size = _check_int(batch_size, "batch_size", 1)
        if optimizer not in kernels.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(kernels.OPTIMIZERS)}, "
                             f"got {optimizer!r}")
        if learning_rate is None:
            learning_rate = DEFAULT_LEARNING_RATE[optimizer]
        learning_rate = _check_float(learning_rate, "learning_rate", 0.0)
        momentum = _check_float(momentum, "momentum", 0.0, 1.0, high_open=True)
        if nesterov and (optimizer != "sgd" or momentum == 0.0):
            raise ValueError("nesterov=True needs optimizer='sgd' and momentum > 0")
        weight_decay = _check_float(weight_decay, "weight_decay", 0.0)
        beta1 = _check_float(beta1, "beta1", 0.0, 1.0, high_open=True)
        beta2 = _check_float(beta2, "beta2", 0.0, 1.0, high_open=True)
        eps = _check_float(eps, "eps", 0.0)
        if optimizer != "sgd" and eps < _FLOAT32_TINY:
            raise ValueError(f"eps must be at least {_FLOAT32_TINY:.3g} (the smallest normal "
                             f"float32; training runs in float32), got {eps:g}; the usual "
                             f"value is 1e-8")
        history_before, rng_before = self.history_, self._rng.bit_generator.state
        continued = self._continued_state(reset, optimizer)   # reset drops the old state
        keep_history = not reset and self.history_ is not None
        first_epoch = len(self.history_) + 1 if keep_history else 1
        schedule = training.make_schedule(schedule, first_epoch + epochs - 1)
        stopping = training.make_early_stopping(early_stopping)
        callbacks = training.check_callbacks(callbacks)
        validation_split = _check_float(validation_split, "validation_split", 0.0, 1.0,
                                        high_open=True)
        X_val = y_val = None
        if validation_data is not None:
            if validation_split:
                raise ValueError("pass validation_data or validation_split, not both")
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError(f"validation_data must be a pair (X_val, y_val), got "
                                 f"{type(validation_data).__name__}")
            X_val, y_val = validation_data
            X_val = self._check_X(X_val, "X_val")
            y_val = self._check_y(y_val, X_val.shape[0], "y_val")
        elif validation_split:
            n_val = int(round(n * validation_split))
            if not 1 <= n_val < n:
                raise ValueError(f"validation_split={validation_split} of {n} rows leaves "
                                 f"{n_val} for validation and {n - n_val} for training; "
                                 f"both need at least one")
            X, X_val = X[:n - n_val], X[n - n_val:]
            y, y_val = y[:n - n_val], y[n - n_val:]
            w = None if w is None else np.ascontiguousarray(w[:n - n_val])
            n -= n_val
        keys = ["loss"] + (["accuracy"] if self.loss == "cross_entropy" else [])
        if X_val is not None:
            keys += ["val_loss", self._validation_score()]
        training.check_monitors(keys + ["learning_rate"], [stopping, schedule] + callbacks)
        n_threads = kernels._threads(n_threads)

        batch_size = min(batch_size, n)
        floats = kernels._trainer_floats(self._net, optimizer, batch_size, n_threads)
        _, largest = _largest_layer(self.layers, 4 * (2 if optimizer == "sgd" else 3))
        # the weights at the start of each epoch (put back on Ctrl-C), and the best
        # epoch's with early stopping
        _check_memory(4 * floats + self._params.nbytes * (2 if stopping else 1),
                      f"fit(batch_size={batch_size}) of Network({self._description()}) for its "
                      f"gradients, optimizer state, workspace and epoch-start weights", largest,
                      "use smaller layers, a smaller batch_size or optimizer='sgd'")
        if not self._fitting.acquire(blocking=False):
            raise RuntimeError("this Network is already being trained by fit in another "
                               "thread; train copies in parallel, or wait for that fit")
        try:
            trainer = kernels._Trainer(self._net, optimizer, learning_rate, momentum,
                                       bool(nesterov), weight_decay, beta1, beta2, eps,
                                       batch_size, n_threads)
            if continued:
                trainer.state1[:] = continued["state1"]
                trainer.state2[:] = continued["state2"]
                trainer.step = continued["step"]
                trainer.batch_count = continued["batch_count"]
            if not keep_history:
                self.history_ = History()
            plan = {"optimizer": optimizer, "epochs": epochs, "learning_rate": learning_rate,
                    "schedule": schedule, "stopping": stopping, "callbacks": callbacks, "shuffle": shuffle,
                    "verbose": verbose, "n_threads": n_threads}
            epochs_before = len(self.history_)
            try:
                return self._fit(trainer, X, y, w, X_val, y_val, plan)
            except kernels.NonFiniteInputError:
                # Found in the first epoch, which reads every row: _fit has put the
                # weights back; the history, the generator and a continued optimizer
                # state go back too.
                if len(self.history_) == epochs_before:
                    self.history_ = history_before
                    self._rng.bit_generator.state = rng_before
                    self._optimizer_state = continued
                    self._optimizer_lost = False
                raise
        finally:
            self._snapshot = None
            self._fitting.release()

    def _validation_score(self):
        """The record key of the score on validation data."""
        return "val_accuracy" if self.loss == "cross_entropy" else "val_r2"

    def _continued_state(self, reset, optimizer):
        """The optimizer state a fit with reset=False continues (None to start anew)."""
        lost, self._optimizer_lost = getattr(self, "_optimizer_lost", False), False
        if reset:
            self._optimizer_state = None
            return None
        state = getattr(self, "_optimizer_state", None)
        if state is None:
            if lost:
                warnings.warn("fit(reset=False) after a fit interrupted within an epoch: "
                              "the network has the weights of the last complete epoch, but "
                              "the optimizer's state from then was not kept, so the "
                              "optimizer starts anew", RuntimeWarning, stacklevel=3)
            return None
        if state["optimizer"] != optimizer:
            raise ValueError(f"fit(reset=False) continues the {state['optimizer']!r} "
                             f"optimizer of the previous fit, got optimizer={optimizer!r}; "
                             f"pass the same optimizer, or reset=True to start anew")
        return state

    def _keep_optimizer_state(self, trainer, optimizer):
        self._optimizer_state = {"optimizer": optimizer, "state1": trainer.state1,
                                 "state2": trainer.state2, "step": trainer.step,
                                 "batch_count": trainer.batch_count}

    def _fit(self, trainer, X, y, w, X_val, y_val, plan):
        """The epochs of fit, on validated arguments, with self._fitting held.  While it
        runs, predict/predict_proba/evaluate from other threads use self._snapshot: the
        weights at the end of the last completed epoch."""
        n = X.shape[0]
        batch_size, n_threads = trainer.batch_size, plan["n_threads"]
        order = np.arange(n, dtype=np.int64)
        n_batches = -(-n // batch_size)
        weight_total = float(w.sum()) if w is not None else float(n)
        history = self.history_
        history.best_epoch = history.stopped_epoch = None
        first_epoch = len(history) + 1
        last_epoch = first_epoch + plan["epochs"] - 1
        tracker = plan["stopping"].tracker() if plan["stopping"] else None
        best = None         # a copy of the weights of the best epoch, with early stopping
        started = None      # the weights at the start of an epoch not yet recorded
        self._optimizer_state = None    # valid again once the fit ends
        try:
            for epoch in range(first_epoch, last_epoch + 1):
                rate = float(training.scheduled_rate(
                    plan["schedule"], epoch, plan["learning_rate"], history.records))
                trainer.learning_rate = rate    # as float32
                if plan["shuffle"]:     # a fresh permutation, so fits can be continued
                    order = self._rng.permutation(n).astype(np.int64, copy=False)
                start = time.perf_counter()
                progress = EpochProgress(epoch, last_epoch, n) if plan["verbose"] else None
                started = self._copy_of_params()
                self._snapshot = self._engine(started)
                while epoch == first_epoch and self._live_readers():  # see _begin_inference
                    time.sleep(1e-4)
                loss_sum, correct, done, chunk = 0.0, 0, 0, 1
                while done < n_batches:
                    chunk = min(chunk, n_batches - done)
                    t0 = time.perf_counter()
                    loss_sum, right = trainer.train_batches(X, y, w, order, done, chunk,
                                                            loss_sum)
                    elapsed = time.perf_counter() - t0
                    correct += right
                    done += chunk
                    if progress:
                        progress.update(min(done * batch_size, n),
                                        loss_sum / (done * batch_size))
                    # ~0.1 s per call: responsive progress and Ctrl-C, negligible overhead
                    chunk = max(1, min(chunk * 4, int(chunk * 0.1 / max(elapsed, 1e-6))))
                if not (math.isfinite(loss_sum) and np.isfinite(self._params).all()):
                    raise FloatingPointError(
                        f"training diverged in epoch {epoch} (loss is not finite); the "
                        f"weights from before that epoch were kept. Try a smaller "
                        f"learning_rate.")
                record = {"epoch": epoch, "loss": loss_sum / (weight_total or 1.0)}
                if self.loss == "cross_entropy":
                    record["accuracy"] = correct / n
                if X_val is not None:
                    record["val_loss"], record[self._validation_score()] = self._evaluate(
                        X_val, y_val, None, n_threads, self._net)
                record["learning_rate"] = rate
                record["seconds"] = time.perf_counter() - start
                history.records.append(record)
                started = None
                if progress:
                    progress.finish(record)
                if tracker is not None and tracker.update(record):
                    best = self._copy_of_params() if best is None else best
                    best[:] = self._params
                    history.best_epoch = epoch
                stop = tracker is not None and tracker.wait >= plan["stopping"].patience
                for callback in plan["callbacks"]:
                    stop = bool(callback(self, record)) or stop
                if stop:
                    history.stopped_epoch = epoch
                    break
            self._keep_optimizer_state(trainer, plan["optimizer"])
        except (KeyboardInterrupt, FloatingPointError, kernels.NonFiniteInputError):
            # Ctrl-C, divergence or NaN in X: back to the end of the last recorded epoch.
            # Between epochs (a callback) the optimizer's state matches those weights and
            # is kept; within one it has moved on, and keeping a copy from the epoch's
            # start would cost memory the size of the weights (twice for Adam) on every
            # fit, so it is dropped and a fit(reset=False) says so.
            if started is not None:
                self._params[:] = started
                self._optimizer_lost = True
            else:
                self._keep_optimizer_state(trainer, plan["optimizer"])
            raise
        finally:
            if best is not None:        # early stopping keeps the best epoch, always
                self._params[:] = best
        return history

    # ---- pickling (joblib, multiprocessing, copy.deepcopy) ----------------------------
    def __getstate__(self):
        """Everything but the locks, the kernel views and fit's inference snapshot."""
        if self._fitting.locked():
            raise RuntimeError("a Network cannot be pickled while fit is training it")
        state = dict(self.__dict__)
        for name in ("_fitting", "_snapshot", "_readers", "_net", "weights", "biases"):
            state.pop(name, None)
        state["_params"] = np.array(self._params)
        return state

    def __setstate__(self, state):
        params = state.pop("_params")
        self.__dict__.update(state)
        self._fitting = threading.Lock()
        self._snapshot = None
        self._readers = []
        self._set_params(params)

    # ---- inference --------------------------------------------------------------------
    # While fit runs, inference reads self._snapshot, the weights at the start of the
    # current epoch, never the live ones in mid-update.  A caller registers a _Reader in
    # self._readers (list.append and remove are atomic) before it looks at the snapshot,
    # and records there the engine it chose; after publishing its first snapshot, fit
    # waits only for the readers that are undecided or chose the live weights, so callers
    # that arrive later (and read the snapshot) never hold training up.
    def _begin_inference(self):
        """The _Reader whose ``net`` is the _Net to infer with; the caller passes it to
        self._readers.remove when done."""
        reader = _Reader()
        self._readers.append(reader)
        snapshot = self._snapshot
        reader.net = self._net if snapshot is None else snapshot
        return reader

    def _live_readers(self):
        """Whether an inference call may be reading the live weights."""
        live = self._net
        return any(r.net is None or r.net is live for r in list(self._readers))

    def predict_proba(self, X, *, n_threads=None):
        """Class probabilities, float32 (n, n_classes), for X (n, n_features) or images."""
        if self.loss != "cross_entropy":
            raise TypeError(f"predict_proba needs a classifier (loss='cross_entropy'); this "
                            f"network has loss={self.loss!r}: use predict")
        X = self._flat(X)
        reader = self._begin_inference()
        try:
            return reader.net.predict(X, False, kernels._threads(n_threads))
        finally:
            self._readers.remove(reader)

    def predict(self, X, *, n_threads=None):
        """Predicted class labels, int64 (n,), for X (n, n_features) or images; for
        loss="squared_error" the predictions, float32 (n, n_outputs)."""
        X = self._flat(X)
        reader = self._begin_inference()
        try:
            if self.loss != "cross_entropy":
                return reader.net.predict(X, True, kernels._threads(n_threads))
            return reader.net.predict_labels(X, kernels._threads(n_threads))
        finally:
            self._readers.remove(reader)

    def _evaluate(self, X, y, w, n_threads, engine=None):
        if engine is None:
            reader = self._begin_inference()
            try:
                return self._evaluate(X, y, w, n_threads, reader.net)
            finally:
                self._readers.remove(reader)
        outputs = engine.predict(X, True, n_threads)
        if self.loss == "squared_error":
            loss, _ = kernels.squared_error(outputs, y, w)
            return loss, _r2_score(outputs, y, w)
        loss, _, _, correct = kernels.softmax_cross_entropy(outputs, y, w)
        if w is None:
            return loss, correct / X.shape[0]
        right = outputs.argmax(axis=1) == y
        return loss, float((w * right).sum() / max(w.sum(), 1e-30))

    def evaluate(self, X, y, *, sample_weight=None, n_threads=None):
        """(mean loss, accuracy) on X and labels y (n,); for loss="squared_error"
        (mean loss, R^2 averaged over the outputs) on X and targets y."""
        X = self._check_X(X, check_finite=False)
        y = self._check_y(y, X.shape[0])
        w = kernels._sample_weight(sample_weight, X.shape[0])
        return self._evaluate(X, y, w, kernels._threads(n_threads))

    # ---- files ------------------------------------------------------------------------
    def export_c(self, folder, **options):
        """Write dependency-free C99 source of this network; see cnn_core.export.export_c."""
        from .export import export_c
        return export_c(self, folder, **options)

    def save(self, path):
        """Write the model to `path` atomically (see cnn_core.model_file for the format)."""
        model_file.save(path, self.layers, self.loss, self._params)

    @classmethod
    def load(cls, path):
        """Read a model saved by :meth:`save` (or a version-1 file of an older cnn_core);
        ModelFileError if the file is not valid."""
        stack, loss, params = model_file.load(path)
        net = cls(stack, seed=0, loss=loss)
        net._dropout_seed = 0
        net._set_params(params)
        net.seed = None
        return net

    # ---- other frameworks (cnn_core.interop) ------------------------------------------
    def to_onnx(self, path, *, classes=None):
        """Write this network as an ONNX file, atomically; see cnn_core.interop.to_onnx."""
        from .interop import to_onnx
        return to_onnx(self, path, classes)

    @classmethod
    def from_onnx(cls, path):
        """A network read from an ONNX file; see cnn_core.interop.from_onnx."""
        from .interop import from_onnx
        return from_onnx(path)

    @classmethod
    def from_sklearn(cls, mlp):
        """A network equal to a fitted scikit-learn MLPClassifier (labels in ``classes_``)
        or MLPRegressor (loss="squared_error"); see cnn_core.interop.from_sklearn."""
        from .interop import from_sklearn
        return from_sklearn(mlp)

    @classmethod
    def from_torch(cls, module, input_shape):
        """A network equal to a PyTorch nn.Sequential taking samples of `input_shape`;
        see cnn_core.interop.from_torch."""
        from .interop import from_torch
        return from_torch(module, input_shape)
