"""scikit-learn estimators over cnn_core's Network (needs the optional extra
``pip install cnn_core[sklearn]``).

``MLPClassifier`` and ``MLPRegressor`` take the arguments of scikit-learn's estimators of
the same names, so code written for ``sklearn.neural_network`` runs by changing its
import; training runs in cnn_core's C kernels.  They follow scikit-learn's conventions
(arguments only stored by the constructor, checked by fit; fitted attributes end in
``_``), so they work in Pipeline, GridSearchCV, clone and pickle, and they pass
``sklearn.utils.estimator_checks.check_estimator`` (see ``EXPECTED_FAILED_CHECKS``).

What differs from scikit-learn's estimators:

- ``solver``: "adam" (default), "sgd" or "adamw"; there is no "lbfgs".
- ``learning_rate``: "constant", "invscaling" (``learning_rate_init / (t + 1) **
  power_t`` with t the samples seen, set once per epoch as scikit-learn does) and
  "adaptive" (divided by 5 after two epochs without improvement), for every solver,
  and also any schedule of :mod:`cnn_core.training` (e.g. "cosine", ("step",
  {"step_size": 10}), a callable of the epoch).
- ``alpha`` is the same L2 penalty (``alpha / batch_size`` per update) but applies to
  biases too.
- A binary classifier has two softmax outputs (scikit-learn: one logistic output), so
  ``coefs_[-1]`` has two columns and ``out_activation_`` is "softmax".
- ``coefs_`` and ``intercepts_`` are views of the network's weights: change them in
  place (``clf.coefs_[0][:] = W``); they cannot be assigned.
- Training stops, as in scikit-learn, when the training loss (or with
  ``early_stopping`` the validation score: accuracy, or R^2 for the regressor) has not
  improved by ``tol`` for ``n_iter_no_change`` epochs; the weights of the best epoch are
  kept however training ends.
- ``class_weight`` (dict of label: weight, or "balanced") for the classifier;
  ``n_threads`` for the kernels (default: joblib's and threadpoolctl's limits,
  ``OMP_NUM_THREADS``, the CPUs this process may use).
- Inputs are converted to float32 (uint8 pixels are taken as numbers 0..255, not scaled).
"""
import math
import numbers
import warnings

import numpy as np

try:
    import sklearn  # noqa: F401
except ImportError:
    raise ImportError("cnn_core.sklearn needs scikit-learn: pip install "
                      "'cnn_core[sklearn]'") from None
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from . import training
from .network import Network

__all__ = ["MLPClassifier", "MLPRegressor", "EXPECTED_FAILED_CHECKS"]

# checks of sklearn.utils.estimator_checks these estimators cannot pass, and why
_WEIGHTS_ARE_NOT_REPEATS = (
    "minibatch gradient descent: a row weighted k falls in one minibatch, its k copies in "
    "several, so the trained weights differ (scikit-learn's MLPs pass only with lbfgs)")
EXPECTED_FAILED_CHECKS = {
    "check_sample_weight_equivalence_on_dense_data": _WEIGHTS_ARE_NOT_REPEATS,
}

_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "sigmoid": "sigmoid",
                "tanh": "tanh", "relu": "relu", "leaky_relu": "leaky_relu"}
_SOLVERS = ("adam", "sgd", "adamw")


class _BaseMLP(BaseEstimator):
    """What the classifier and the regressor share: hyper-parameters, fit, partial_fit."""

    _loss = None            # the Network's loss

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False,
                 validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 n_iter_no_change=10, n_threads=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.n_threads = n_threads

    # ---- hyper-parameters -------------------------------------------------------------
    def _hidden_sizes(self):
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral) and not isinstance(sizes, bool):
            sizes = [sizes]
        try:
            sizes = list(sizes)
        except TypeError:
            raise ValueError(f"hidden_layer_sizes must be an int or a sequence of ints, got "
                             f"{self.hidden_layer_sizes!r}") from None
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                   for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive ints, got {sizes}")
        return [int(s) for s in sizes]

    def _check_hyperparameters(self):
        def number(name, low, high=np.inf, low_open=False, high_open=False):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if (value < low or (low_open and value == low) or value > high
                    or (high_open and value == high)):
                raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, "
                                 f"{high}{')' if high_open else ']'}, got {value!r}")

        def count(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                    or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got "
                             f"{self.activation!r}")
        if self.solver not in _SOLVERS:
            extra = (" (cnn_core trains with minibatches; use 'adam')"
                     if self.solver == "lbfgs" else "")
            raise ValueError(f"solver must be one of {list(_SOLVERS)}, got "
                             f"{self.solver!r}{extra}")
        if not (self.batch_size == "auto" or (isinstance(self.batch_size, numbers.Integral)
                                              and not isinstance(self.batch_size, bool)
                                              and self.batch_size >= 1)):
            raise ValueError(f"batch_size must be 'auto' or an int >= 1, got "
                             f"{self.batch_size!r}")
        number("alpha", 0)
        number("learning_rate_init", 0, low_open=True)
        number("power_t", 0)
        count("max_iter", 1)
        number("tol", 0)
        number("momentum", 0, 1, high_open=True)   # at 1 the velocity never decays
        number("validation_fraction", 0, 1, low_open=True, high_open=True)
        number("beta_1", 0, 1, high_open=True)
        number("beta_2", 0, 1, high_open=True)
        number("epsilon", 0, low_open=True)
        count("n_iter_no_change", 1)
        self._hidden_sizes()

    def _schedule(self, n_samples):
        spec = self.learning_rate
        if spec == "constant":
            return None
        if spec == "invscaling":
            init, power = self.learning_rate_init, self.power_t
            return lambda epoch: init / ((epoch - 1) * n_samples + 1) ** power
        if spec == "adaptive":
            monitor = self._monitor() if self.early_stopping else "loss"
            return training.ReduceOnPlateau(monitor, factor=0.2, patience=2,
                                            min_delta=self.tol)
        try:
            return training.make_schedule(spec, self.max_iter)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"learning_rate must be 'constant', 'invscaling', 'adaptive' "
                             f"or a cnn_core.training schedule: {exc}") from None

    # ---- training ---------------------------------------------------------------------
    def fit(self, X, y, sample_weight=None):
        """Train for up to ``max_iter`` epochs (from new weights unless ``warm_start``)."""
        return self._fit(X, y, sample_weight, incremental=False)

    def _fit(self, X, y, sample_weight, incremental, classes=None):
        self._check_hyperparameters()
        first = not (hasattr(self, "network_") and (incremental or self.warm_start))
        X, y = validate_data(self, X, y, reset=first, dtype=np.float32,
                             multi_output=self._loss == "squared_error",
                             y_numeric=self._loss == "squared_error")
        sample_weight = (None if sample_weight is None else
                         _check_sample_weight(sample_weight, X, dtype=np.float32,
                                              ensure_non_negative=True))
        targets = self._targets(y, first, incremental, classes)
        if not first:
            state = self.network_._optimizer_state
            if state is not None and state["optimizer"] != self.solver:
                raise ValueError(
                    f"solver={self.solver!r} but the network being continued was trained "
                    f"with {state['optimizer']!r}, whose state it carries on; train a new "
                    f"network with warm_start=False (or a fresh estimator for partial_fit)")
            trained = [layer.units for layer in self.network_.layers[1:-1]]
            if trained != self._hidden_sizes():
                raise ValueError(
                    f"hidden_layer_sizes={self.hidden_layer_sizes!r} but the network being "
                    f"continued has hidden layers {tuple(trained)}; train a new network of "
                    f"the new sizes with warm_start=False (or a fresh estimator for "
                    f"partial_fit)")
        if first:
            random_state = check_random_state(self.random_state)
            self._seed = int(random_state.randint(np.iinfo(np.int32).max))
            self._samples_before = 0
            sizes = [X.shape[1], *self._hidden_sizes(), self._n_network_outputs(targets)]
            self.network_ = self._new_network(sizes)
        n = X.shape[0]
        batch_size = min(200 if self.batch_size == "auto" else int(self.batch_size), n)
        options = dict(
            epochs=1 if incremental else int(self.max_iter), batch_size=batch_size,
            optimizer=self.solver, learning_rate=float(self.learning_rate_init),
            momentum=float(self.momentum),
            nesterov=bool(self.nesterovs_momentum and self.solver == "sgd"
                          and self.momentum > 0),
            weight_decay=float(self.alpha) / batch_size, beta1=float(self.beta_1),
            beta2=float(self.beta_2), eps=float(self.epsilon), schedule=self._schedule(n),
            shuffle=bool(self.shuffle), reset=first, verbose=int(bool(self.verbose)),
            n_threads=self.n_threads)
        options.update(self._weights(targets, sample_weight))
        if not incremental:
            monitor = self._monitor() if self.early_stopping else "loss"
            options["early_stopping"] = training.EarlyStopping(
                monitor, patience=int(self.n_iter_no_change), min_delta=float(self.tol))
        if self.early_stopping and not incremental:
            X, targets, options = self._split_validation(X, targets, options)
        history = self.network_.fit(X, targets, **options)
        self._samples_before += X.shape[0] * (len(history) - self._epochs_before(first))
        self._record(history, incremental)
        return self

    def _epochs_before(self, first):
        """Epochs of the history before the fit that just ran."""
        return 0 if first else getattr(self, "n_iter_", 0)

    def _split_validation(self, X, targets, options):
        weight = options.get("sample_weight")
        parts = train_test_split(
            X, targets, *([] if weight is None else [weight]),
            test_size=self.validation_fraction, random_state=self._seed,
            stratify=self._stratify(targets))
        X, X_val, targets, t_val = parts[:4]
        if weight is not None:
            options["sample_weight"] = parts[4]
        if X_val.shape[0] < 1 or X.shape[0] < 1:
            raise ValueError(f"validation_fraction={self.validation_fraction} leaves no "
                             f"rows for training or validation")
        options["validation_data"] = (X_val, t_val)
        options["batch_size"] = min(options["batch_size"], X.shape[0])
        options["weight_decay"] = float(self.alpha) / options["batch_size"]
        return X, targets, options

    def _record(self, history, incremental):
        records = history.records
        self.n_iter_ = len(records)
        self.t_ = self._samples_before
        self.loss_curve_ = [r["loss"] for r in records]
        self.loss_ = self.loss_curve_[-1]
        if self.early_stopping:
            self.validation_scores_ = [self._validation_score(r) for r in records
                                       if "val_loss" in r]
            self.best_validation_score_ = (max(self.validation_scores_)
                                           if self.validation_scores_ else None)
            self.best_loss_ = None
        else:
            self.validation_scores_ = self.best_validation_score_ = None
            self.best_loss_ = min(self.loss_curve_)
        net = self.network_
        self.n_layers_ = len(net.layer_sizes)
        self.n_outputs_ = net.layer_sizes[-1]
        self.out_activation_ = "identity" if self._loss == "squared_error" else "softmax"
        if not incremental and history.stopped_epoch is None:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) "
                          f"reached and the optimization hasn't converged yet.",
                          ConvergenceWarning, stacklevel=4)   # the caller of fit

    @property
    def coefs_(self):
        """The weight matrices, (n_in, n_out) float32 per layer (views of the network)."""
        check_is_fitted(self, "network_")
        return list(self.network_.weights)

    @property
    def intercepts_(self):
        """The bias vectors, (n_out,) float32 per layer (views of the network)."""
        check_is_fitted(self, "network_")
        return list(self.network_.biases)

    def _input(self, X):
        check_is_fitted(self, "network_")
        return validate_data(self, X, reset=False, dtype=np.float32)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multilayer perceptron classifier with scikit-learn's interface (see the module
    documentation); labels may be any sortable values (strings, negative or sparse
    integers), mapped to the network's outputs through ``classes_``."""

    _loss = "cross_entropy"

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False,
                 validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 n_iter_no_change=10, class_weight=None, n_threads=None):
        super().__init__(
            hidden_layer_sizes, activation, solver=solver, alpha=alpha,
            batch_size=batch_size, learning_rate=learning_rate,
            learning_rate_init=learning_rate_init, power_t=power_t, max_iter=max_iter,
            shuffle=shuffle, random_state=random_state, tol=tol, verbose=verbose,
            warm_start=warm_start, momentum=momentum, nesterovs_momentum=nesterovs_momentum,
            early_stopping=early_stopping, validation_fraction=validation_fraction,
            beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, n_iter_no_change=n_iter_no_change,
            n_threads=n_threads)
        self.class_weight = class_weight

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One epoch over (X, y), continuing the previous call (the optimizer's state
        too).  ``classes``, every label there will be, is needed on the first call."""
        return self._fit(X, y, sample_weight, incremental=True, classes=classes)

    def _new_network(self, sizes):
        return Network(sizes, _ACTIVATIONS[self.activation], seed=self._seed)

    def _monitor(self):
        return "val_accuracy"

    def _stratify(self, codes):
        counts = np.bincount(codes)
        return codes if counts[counts > 0].min() >= 2 else None

    def _validation_score(self, record):
        return record["val_accuracy"]

    def _n_network_outputs(self, codes):
        return len(self.classes_)

    def _targets(self, y, first, incremental, classes):
        """Labels -> indices into classes_ (set on the first fit)."""
        check_classification_targets(y)
        if first:
            if incremental:
                if classes is None:
                    raise ValueError("classes must be passed on the first call to "
                                     "partial_fit (every label the data will have)")
                self.classes_ = unique_labels(np.asarray(classes))
            else:
                self.classes_ = unique_labels(y)
        elif classes is not None and not np.array_equal(unique_labels(np.asarray(classes)),
                                                        self.classes_):
            raise ValueError(f"classes={classes!r} is not the classes_ of the first call, "
                             f"{self.classes_!r}")
        codes = np.searchsorted(self.classes_, y)
        known = (codes < len(self.classes_))
        known[known] = self.classes_[codes[known]] == y[known]
        if not known.all():
            unknown = np.unique(y[~known])[:5]
            raise ValueError(f"y has labels {unknown.tolist()} not in classes_ "
                             f"{self.classes_.tolist()}; a warm start or partial_fit keeps "
                             f"the classes of the first fit")
        return codes.astype(np.int64)

    def _weights(self, codes, sample_weight):
        options = {"sample_weight": sample_weight}
        if self.class_weight is None:
            return options
        if isinstance(self.class_weight, dict):
            index = {label: i for i, label in enumerate(self.classes_.tolist())}
            unknown = [k for k in self.class_weight if k not in index]
            if unknown:
                raise ValueError(f"class_weight has labels {unknown} not in classes_ "
                                 f"{self.classes_.tolist()}")
            options["class_weight"] = {index[k]: w for k, w in self.class_weight.items()}
        elif self.class_weight == "balanced":
            options["class_weight"] = "balanced"
        else:
            raise ValueError(f"class_weight must be None, a dict or 'balanced', got "
                             f"{self.class_weight!r}")
        return options

    def predict_proba(self, X):
        """Probabilities (n, n_classes), float64, columns in the order of classes_."""
        X = self._input(X)
        proba = self.network_.predict_proba(X, n_threads=self.n_threads)
        proba = proba.astype(np.float64)
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def predict_log_proba(self, X):
        """The logarithm of predict_proba (-inf for probabilities that underflow)."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X):
        """The most probable label of each row (the first one on a tie)."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """A multilayer perceptron regressor with scikit-learn's interface (see the module
    documentation): squared-error loss, identity outputs, one or several targets."""

    _loss = "squared_error"

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y), continuing the previous call (the optimizer's state
        too)."""
        return self._fit(X, y, sample_weight, incremental=True)

    def _new_network(self, sizes):
        return Network(sizes, _ACTIVATIONS[self.activation], seed=self._seed,
                       loss="squared_error")

    def _monitor(self):
        return "val_r2"

    def _stratify(self, targets):
        return None

    def _validation_score(self, record):
        return record["val_r2"]

    def _n_network_outputs(self, targets):
        return targets.shape[1]

    def _targets(self, y, first, incremental, classes):
        y = np.asarray(y, dtype=np.float32)
        self._single_output = y.ndim == 1
        targets = np.ascontiguousarray(y.reshape(y.shape[0], -1))
        if not first and targets.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {targets.shape[1]} outputs, the fitted model "
                             f"{self.n_outputs_}")
        return targets

    def _weights(self, targets, sample_weight):
        return {"sample_weight": sample_weight}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.regressor_tags.poor_score = False
        return tags

    def predict(self, X):
        """Predicted targets: (n,) for one output, else (n, n_outputs), float64."""
        X = self._input(X)
        out = self.network_.predict(X, n_threads=self.n_threads)
        out = np.asarray(out, dtype=np.float64).reshape(out.shape[0], -1)
        return out.ravel() if out.shape[1] == 1 and self._single_output else out
