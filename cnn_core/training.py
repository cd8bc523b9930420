"""The training toolkit of :meth:`cnn_core.Network.fit`: learning-rate schedules, early
stopping, per-epoch callbacks and checkpoints, class weights.

Epochs are counted from 1, as in ``History.records``, and keep counting over fits that
continue training (``fit(..., reset=False)``), so a schedule sees the same epochs whether
training ran in one fit or several.

Schedules
---------
A schedule gives the learning rate of each epoch from the rate passed to ``fit``
(``base``).  ``fit(schedule=...)`` takes a name with default parameters (``"constant"``,
``"step"``, ``"exponential"``, ``"cosine"``, ``"warmup"``, ``"plateau"``), a pair
``(name, {parameters})``, one of the classes below, or a callable ``f(epoch)`` returning
the rate of that epoch itself.

========================================  ==============================================
``Constant()``                            ``base``
``StepDecay(step_size=10, gamma=0.5)``    ``base * gamma ** ((epoch - 1) // step_size)``
``ExponentialDecay(gamma=0.95)``          ``base * gamma ** (epoch - 1)``
``CosineDecay(epochs=None, min_rate=0)``  ``min_rate + (base - min_rate) * (1 + cos(pi *
                                          (epoch - 1) / epochs)) / 2``, then ``min_rate``
``LinearWarmup(epochs=5, then=...)``      ``base * epoch / epochs`` for the first epochs,
                                          then ``then`` counted from its own epoch 1
``ReduceOnPlateau(monitor="val_loss",     ``base * factor ** k``, where k is the number of
factor=0.1, patience=5, min_delta=0,      times the monitored value went ``patience``
min_rate=0)``                             epochs without improving by ``min_delta``
========================================  ==============================================

``CosineDecay(epochs=None)`` decays over the epochs of the fit it is given to.
"""
import math
import os

import numpy as np

__all__ = ["Constant", "StepDecay", "ExponentialDecay", "CosineDecay", "LinearWarmup",
           "ReduceOnPlateau", "EpochRate", "make_schedule", "EarlyStopping", "Checkpoint",
           "class_sample_weight"]


def _positive(value, name, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, "
                         f"got {value}")
    return value


def _count(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _lower_is_better(monitor):
    """Losses improve downwards, accuracies and scores upwards."""
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f"monitor must be the name of a record key like 'val_loss', "
                        f"got {monitor!r}")
    return "loss" in monitor or "error" in monitor


def _missing_monitor(who, monitor, keys):
    """The message for `who` watching a record key `monitor` that is not among `keys`."""
    have = ", ".join(k for k in keys if k not in ("epoch", "seconds"))
    hint = (" (pass validation_data or validation_split to fit)"
            if monitor.startswith("val_") else "")
    return f"{who}monitor={monitor!r} is not in the epoch records, which have {have}{hint}"


def check_monitors(keys, watchers):
    """ValueError, before any training, if early stopping, a schedule (or the schedule a
    warm-up hands over to) or a callback monitors a record key not among `keys`."""
    for watcher in watchers:
        while watcher is not None:
            monitor = getattr(watcher, "monitor", None)
            if isinstance(monitor, str) and monitor not in keys:
                raise ValueError(_missing_monitor(f"{type(watcher).__name__}: ", monitor,
                                                  keys))
            watcher = getattr(watcher, "then", None)


class _Tracker:
    """The best value of one record key so far, with `min_delta` needed to improve."""

    def __init__(self, monitor, min_delta):
        self.monitor = monitor
        self.lower = _lower_is_better(monitor)
        self.min_delta = _positive(min_delta, "min_delta", allow_zero=True)
        self.best = None
        self.best_epoch = None
        self.wait = 0

    def value(self, record):
        if self.monitor not in record:
            raise ValueError(_missing_monitor("", self.monitor, record))
        return record[self.monitor]

    def update(self, record):
        """True if this record improves on the best by more than min_delta."""
        value = self.value(record)
        if not math.isfinite(value):
            better = False
        elif self.best is None:
            better = True
        elif self.lower:
            better = value < self.best - self.min_delta
        else:
            better = value > self.best + self.min_delta
        if better:
            self.best, self.best_epoch, self.wait = value, record["epoch"], 0
        else:
            self.wait += 1
        return better


# ---- learning-rate schedules ----------------------------------------------------------
class Schedule:
    """A learning-rate schedule: ``rate(epoch, base, records)`` is the rate of `epoch`
    (from 1) given the rate passed to fit and the records of the epochs before it."""

    def rate(self, epoch, base, records):
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    def rate(self, epoch, base, records):
        return base


class StepDecay(Schedule):
    def __init__(self, step_size=10, gamma=0.5):
        self.step_size = _count(step_size, "step_size")
        self.gamma = _positive(gamma, "gamma")

    def rate(self, epoch, base, records):
        return base * self.gamma ** ((epoch - 1) // self.step_size)


class ExponentialDecay(Schedule):
    def __init__(self, gamma=0.95):
        self.gamma = _positive(gamma, "gamma")

    def rate(self, epoch, base, records):
        return base * self.gamma ** (epoch - 1)


class CosineDecay(Schedule):
    def __init__(self, epochs=None, min_rate=0.0):
        self.epochs = None if epochs is None else _count(epochs, "epochs")
        self.min_rate = _positive(min_rate, "min_rate", allow_zero=True)

    def rate(self, epoch, base, records):
        if self.epochs is None:
            raise ValueError("CosineDecay(epochs=None) needs the number of epochs; pass it "
                             "to fit by name ('cosine') or give epochs=")
        if epoch > self.epochs:
            return self.min_rate
        cosine = (1 + math.cos(math.pi * (epoch - 1) / self.epochs)) / 2
        return self.min_rate + (base - self.min_rate) * cosine


class LinearWarmup(Schedule):
    def __init__(self, epochs=5, then="constant"):
        self.epochs = _count(epochs, "epochs")
        self.then = make_schedule(then)

    def rate(self, epoch, base, records):
        if epoch <= self.epochs:
            return base * epoch / self.epochs
        return self.then.rate(epoch - self.epochs, base, records[self.epochs:])


class ReduceOnPlateau(Schedule):
    def __init__(self, monitor="val_loss", factor=0.1, patience=5, min_delta=0.0,
                 min_rate=0.0):
        _lower_is_better(monitor)
        self.monitor = monitor
        self.factor = _positive(factor, "factor")
        if self.factor >= 1:
            raise ValueError(f"factor must be below 1, got {factor}")
        self.patience = _count(patience, "patience")
        self.min_delta = _positive(min_delta, "min_delta", allow_zero=True)
        self.min_rate = _positive(min_rate, "min_rate", allow_zero=True)

    def rate(self, epoch, base, records):
        # a function of the records alone, so continued fits need no hidden state
        tracker = _Tracker(self.monitor, self.min_delta)
        reductions = 0
        for record in records:
            if not tracker.update(record) and tracker.wait >= self.patience:
                reductions += 1
                tracker.wait = 0
        return max(base * self.factor ** reductions, min(self.min_rate, base))


class EpochRate(Schedule):
    """A callable ``f(epoch)`` giving the rate of each epoch itself."""

    def __init__(self, function):
        if not callable(function):
            raise TypeError(f"a schedule function must be callable, got {function!r}")
        self.function = function

    def rate(self, epoch, base, records):
        return self.function(epoch)


SCHEDULES = {"constant": Constant, "step": StepDecay, "exponential": ExponentialDecay,
             "cosine": CosineDecay, "warmup": LinearWarmup, "plateau": ReduceOnPlateau}


def make_schedule(spec, epochs=None):
    """A Schedule from a name, a pair (name, {parameters}), a Schedule or a callable of the
    epoch; `epochs` (the last epoch of the fit) completes a cosine decay given by name."""
    if spec is None:
        return Constant()
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str) or (isinstance(spec, tuple) and len(spec) == 2
                                 and isinstance(spec[0], str)):
        name, params = (spec, {}) if isinstance(spec, str) else spec
        if name not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, a pair (name, "
                             f"{{parameters}}), a Schedule or a callable of the epoch; got "
                             f"{name!r}")
        if not isinstance(params, dict):
            raise TypeError(f"the parameters of schedule {name!r} must be a dict, got "
                            f"{type(params).__name__}")
        if name == "cosine" and params.get("epochs") is None and epochs is not None:
            params = dict(params, epochs=epochs)
        try:
            return SCHEDULES[name](**params)
        except TypeError as exc:
            raise TypeError(f"schedule {name!r}: {exc}") from None
    if callable(spec):
        return EpochRate(spec)
    raise TypeError(f"schedule must be a name like 'cosine', a pair (name, {{parameters}}), "
                    f"a Schedule or a callable of the epoch; got {spec!r}")


def scheduled_rate(schedule, epoch, base, records):
    """The rate of `epoch`, checked to be a finite non-negative number."""
    rate = schedule.rate(epoch, base, records)
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.number)) \
            or not math.isfinite(rate) or rate < 0:
        raise ValueError(f"the learning-rate schedule {schedule!r} gave {rate!r} for epoch "
                         f"{epoch}; it must give a finite number >= 0")
    return float(rate)


# ---- early stopping and callbacks -----------------------------------------------------
class EarlyStopping:
    """Stop when `monitor` ("val_loss", "val_accuracy", "loss", "accuracy") has not
    improved by more than `min_delta` for `patience` epochs.  However training ends
    (stopped early, all epochs run, a callback or Ctrl-C), the network is left with the
    weights of its best epoch, named in ``history.best_epoch``."""

    def __init__(self, monitor="val_loss", patience=10, min_delta=0.0):
        _lower_is_better(monitor)
        self.monitor = monitor
        self.patience = _count(patience, "patience")
        self.min_delta = _positive(min_delta, "min_delta", allow_zero=True)

    def tracker(self):
        return _Tracker(self.monitor, self.min_delta)

    def __repr__(self):
        return (f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience}, "
                f"min_delta={self.min_delta})")


def make_early_stopping(spec):
    if spec is None or spec is False:
        return None
    if spec is True:
        return EarlyStopping()
    if isinstance(spec, EarlyStopping):
        return spec
    raise TypeError(f"early_stopping must be True, False/None or an EarlyStopping, got "
                    f"{spec!r}")


class Checkpoint:
    """A callback that saves the network to `path` (atomically, with Network.save) after
    every epoch whose `monitor` value is the best so far; the file always holds the best
    model seen, even if training is interrupted."""

    def __init__(self, path, monitor="val_loss", min_delta=0.0):
        self.path = os.fspath(path)
        _lower_is_better(monitor)
        self.monitor = monitor
        self.min_delta = min_delta
        self._tracker = _Tracker(monitor, min_delta)
        self.best_epoch = None

    def __call__(self, network, record):
        if record["epoch"] == 1:         # a new fit starts a new search for the best
            self._tracker = _Tracker(self.monitor, self.min_delta)
        if self._tracker.update(record):
            network.save(self.path)
            self.best_epoch = record["epoch"]
        return False


def check_callbacks(callbacks):
    if callbacks is None:
        return []
    if callable(callbacks):
        callbacks = [callbacks]
    try:
        callbacks = list(callbacks)
    except TypeError:
        raise TypeError("callbacks must be a list of callables f(network, record)") from None
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"every callback must be callable as f(network, record), got "
                            f"{cb!r}")
    return callbacks


# ---- class weights --------------------------------------------------------------------
def class_sample_weight(class_weight, y, n_classes):
    """Per-sample weights (float32 (n,)) from class_weight: a dict {class index: weight}
    or "balanced" (n / (n_classes_present * count of the class)), for labels y in
    [0, n_classes)."""
    counts = np.bincount(y, minlength=n_classes)
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"class_weight must be a dict or 'balanced', got "
                             f"{class_weight!r}")
        present = np.count_nonzero(counts)
        per_class = np.where(counts > 0, len(y) / (present * np.maximum(counts, 1)), 0.0)
    elif isinstance(class_weight, dict):
        per_class = np.ones(n_classes)
        for label, weight in class_weight.items():
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) \
                    or not 0 <= label < n_classes:
                raise ValueError(f"class_weight keys must be class indices in [0, "
                                 f"{n_classes}), got {label!r}")
            per_class[label] = _positive(weight, f"class_weight[{label}]", allow_zero=True)
    else:
        raise TypeError(f"class_weight must be a dict or 'balanced', got "
                        f"{type(class_weight).__name__}")
    return per_class[y].astype(np.float32)
