"""The training toolkit on Network.fit (cnn_core.training), on real MNIST rows.

- continued training: two fits of 3 epochs with reset=False give the weights of one fit
  of 6 bit for bit (SGD with momentum, Nesterov, Adam, AdamW), while reset=True restarts
  the optimizer (and so differs);
- schedules give the documented rates, in the records and in the optimizer (a rate of 0
  leaves the weights alone), including by name, as pairs and as callables;
- early stopping restores the weights of the best epoch, whether it triggers or not, and
  after Ctrl-C; callbacks see every record and can stop training; Checkpoint keeps the
  best model on disk;
- class weights equal the sample weights they stand for; validation_split equals
  validation_data of the last rows.
"""
import math

import numpy as np
import pytest

from cnn_core import Network
from cnn_core import training
from cnn_core.training import (Checkpoint, CosineDecay, EarlyStopping, ExponentialDecay,
                               LinearWarmup, ReduceOnPlateau, StepDecay)


@pytest.fixture(scope="module")
def rows(mnist):
    X_train, y_train, X_test, y_test = mnist
    return X_train[:1500], y_train[:1500], X_test[:500], y_test[:500]


@pytest.mark.parametrize("options", [
    dict(optimizer="sgd", momentum=0.9),
    dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4),
    dict(optimizer="adam"),
    dict(optimizer="adamw", weight_decay=0.01),
], ids=["sgd", "nesterov", "adam", "adamw"])
def test_two_continued_fits_equal_one(rows, options):
    X, y, _, _ = rows
    once = Network([784, 24, 10], seed=5)
    once.fit(X, y, epochs=6, batch_size=50, **options)
    twice = Network([784, 24, 10], seed=5)
    twice.fit(X, y, epochs=3, batch_size=50, **options)
    twice.fit(X, y, epochs=3, batch_size=50, reset=False, **options)
    np.testing.assert_array_equal(twice._params, once._params)
    assert twice.history_["epoch"] == [1, 2, 3, 4, 5, 6]
    assert twice.history_["loss"] == once.history_["loss"]


def test_continued_fits_keep_the_dropout_masks_and_regressions(rows):
    X, y, _, _ = rows
    from cnn_core import layers as L

    def stack():
        return [L.Input((784,)), L.Dense(24, activation="relu"), L.Dropout(0.3), L.Dense(10)]

    once = Network(stack(), seed=5)
    once.fit(X, y, epochs=4, batch_size=50, optimizer="adam")
    twice = Network(stack(), seed=5)
    for _ in range(2):
        twice.fit(X, y, epochs=2, batch_size=50, optimizer="adam", reset=False)
    np.testing.assert_array_equal(twice._params, once._params)
    targets = np.column_stack([y / 9.0, X[:, 400] / 255.0])
    once = Network([784, 16, 2], seed=5, loss="squared_error")
    once.fit(X, targets, epochs=4, optimizer="adam")
    twice = Network([784, 16, 2], seed=5, loss="squared_error")
    for _ in range(2):
        twice.fit(X, targets, epochs=2, optimizer="adam", reset=False)
    np.testing.assert_array_equal(twice._params, once._params)


def test_reset_restarts_the_optimizer(rows):
    X, y, _, _ = rows
    once = Network([784, 24, 10], seed=5)
    once.fit(X, y, epochs=4, batch_size=50, optimizer="adam")
    restarted = Network([784, 24, 10], seed=5)
    restarted.fit(X, y, epochs=2, batch_size=50, optimizer="adam")
    restarted.fit(X, y, epochs=2, batch_size=50, optimizer="adam")
    assert not np.array_equal(restarted._params, once._params)
    assert restarted.history_["epoch"] == [1, 2]


def test_continuing_with_another_optimizer_is_refused(rows):
    X, y, _, _ = rows
    net = Network([784, 8, 10], seed=0)
    net.fit(X, y, epochs=1, optimizer="adam")
    with pytest.raises(ValueError, match="reset=True"):
        net.fit(X, y, epochs=1, optimizer="sgd", reset=False)


# ---- schedules ------------------------------------------------------------------------
def _rates(schedule, epochs, base=0.1, records=None):
    records = records or [{"epoch": e} for e in range(1, epochs + 1)]
    return [schedule.rate(e, base, records[:e - 1]) for e in range(1, epochs + 1)]


def test_schedule_formulas():
    assert _rates(StepDecay(step_size=2, gamma=0.5), 5) == [0.1, 0.1, 0.05, 0.05, 0.025]
    assert _rates(ExponentialDecay(gamma=0.5), 3) == [0.1, 0.05, 0.025]
    cosine = _rates(CosineDecay(epochs=4, min_rate=0.02), 6)
    expected = [0.02 + 0.08 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert cosine == pytest.approx(expected + [0.02, 0.02])
    assert _rates(LinearWarmup(epochs=4, then=("step", {"step_size": 1, "gamma": 0.5})),
                  6) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.05])
    # plateau: the monitored loss stops improving after epoch 2; patience 2 -> a cut
    # after epochs 4 and 6
    losses = [1.0, 0.5, 0.6, 0.55, 0.7, 0.5, 0.4]
    records = [{"epoch": e, "val_loss": v} for e, v in enumerate(losses, 1)]
    plateau = _rates(ReduceOnPlateau(factor=0.5, patience=2), 7, records=records)
    assert plateau == pytest.approx([0.1] * 4 + [0.05] * 2 + [0.025])


def test_history_records_the_rate_asked_for_not_its_float32(rows):
    X, y, _, _ = rows
    history = Network([784, 8, 10], seed=1).fit(X, y, epochs=2, learning_rate=0.05)
    assert history["learning_rate"] == [0.05, 0.05]       # not 0.05000000074505806


def test_schedules_set_the_rate_of_each_epoch(rows):
    X, y, X_val, y_val = rows
    cases = [(("step", {"step_size": 2}), 0.1 * np.array([1, 1, 0.5, 0.5, 0.25, 0.25])),
             (("exponential", {"gamma": 0.8}), 0.1 * 0.8 ** np.arange(6)),
             ("cosine", 0.1 * (1 + np.cos(np.pi * np.arange(6) / 6)) / 2),
             (lambda epoch: 0.01 * epoch, 0.01 * np.arange(1, 7))]
    for spec, expected in cases:
        net = Network([784, 8, 10], seed=1)
        history = net.fit(X, y, epochs=6, learning_rate=0.1, schedule=spec,
                          validation_data=(X_val, y_val))
        np.testing.assert_allclose(history["learning_rate"], expected, rtol=1e-6,
                                   err_msg=str(spec))


def test_a_zero_rate_leaves_the_weights_alone(rows):
    X, y, _, _ = rows
    net = Network([784, 8, 10], seed=1)
    before = net._params.copy()
    net.fit(X, y, epochs=2, schedule=lambda epoch: 0.0)
    np.testing.assert_array_equal(net._params, before)
    net.fit(X, y, epochs=2, schedule=lambda epoch: 0.0 if epoch == 1 else 0.05)
    assert not np.array_equal(net._params, before)


def test_schedules_continue_over_continued_fits(rows):
    X, y, _, _ = rows
    once = Network([784, 8, 10], seed=2)
    once.fit(X, y, epochs=4, schedule=("step", {"step_size": 1, "gamma": 0.5}))
    twice = Network([784, 8, 10], seed=2)
    for _ in range(2):
        twice.fit(X, y, epochs=2, schedule=("step", {"step_size": 1, "gamma": 0.5}),
                  reset=False)
    assert twice.history_["learning_rate"] == once.history_["learning_rate"]
    np.testing.assert_array_equal(twice._params, once._params)


@pytest.mark.parametrize("spec, error", [
    ("linear", ValueError), (("step", {"size": 2}), TypeError), (("step", 3), TypeError),
    (lambda epoch: -1.0, ValueError), (lambda epoch: float("nan"), ValueError), (0.5, TypeError),
])
def test_bad_schedules_are_named(rows, spec, error):
    X, y, _, _ = rows
    with pytest.raises(error, match="schedule|rate"):
        Network([784, 4, 10], seed=0).fit(X[:100], y[:100], epochs=1, schedule=spec)


# ---- early stopping, callbacks, Ctrl-C ------------------------------------------------
def _twin_predictions(rows, epochs):
    X, y, X_val, _ = rows
    twin = Network([784, 32, 10], seed=7)
    twin.fit(X, y, epochs=epochs, learning_rate=0.6)
    return twin.predict_proba(X_val)


def test_early_stopping_restores_the_best_epoch_always(rows):
    X, y, X_val, y_val = rows
    net = Network([784, 32, 10], seed=7)
    history = net.fit(X, y, epochs=8, learning_rate=0.6, validation_data=(X_val, y_val),
                      early_stopping=EarlyStopping("val_loss", patience=100))
    best = int(np.argmin(history["val_loss"])) + 1
    assert history.best_epoch == best and history.stopped_epoch is None
    assert best < 8, "the settings must give a best epoch before the last for this test"
    np.testing.assert_array_equal(net.predict_proba(X_val), _twin_predictions(rows, best))


def test_early_stopping_stops_after_patience(rows):
    X, y, X_val, y_val = rows
    net = Network([784, 32, 10], seed=7)
    history = net.fit(X, y, epochs=30, learning_rate=0.6, validation_data=(X_val, y_val),
                      early_stopping=EarlyStopping("val_accuracy", patience=2))
    accuracy = history["val_accuracy"]
    best = int(np.argmax(accuracy)) + 1
    assert history.best_epoch == best
    assert history.stopped_epoch == len(history) == best + 2 < 30
    np.testing.assert_array_equal(net.predict_proba(X_val), _twin_predictions(rows, best))


def test_monitoring_validation_without_data_is_explained(rows):
    X, y, _, _ = rows
    with pytest.raises(ValueError, match="validation_data or validation_split"):
        Network([784, 4, 10], seed=0).fit(X, y, epochs=1, early_stopping=True)


def test_callbacks_see_every_record_and_can_stop(rows):
    X, y, _, _ = rows
    seen = []

    def stop_at_three(network, record):
        seen.append((network, dict(record)))
        return record["epoch"] == 3

    net = Network([784, 8, 10], seed=3)
    history = net.fit(X, y, epochs=10, callbacks=[stop_at_three])
    assert [r["epoch"] for _, r in seen] == [1, 2, 3] and all(n is net for n, _ in seen)
    assert len(history) == 3 and history.stopped_epoch == 3
    assert [r for _, r in seen] == history.records


def test_ctrl_c_keeps_the_last_epoch_and_early_stopping_the_best(rows):
    X, y, X_val, y_val = rows

    def interrupt(network, record):
        if record["epoch"] == 5:
            raise KeyboardInterrupt

    net = Network([784, 32, 10], seed=7)
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, y, epochs=8, learning_rate=0.6, callbacks=[interrupt])
    assert len(net.history_) == 5
    np.testing.assert_array_equal(net.predict_proba(X_val), _twin_predictions(rows, 5))

    net = Network([784, 32, 10], seed=7)
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, y, epochs=8, learning_rate=0.6, validation_data=(X_val, y_val),
                early_stopping=EarlyStopping(patience=100), callbacks=[interrupt])
    best = int(np.argmin(net.history_["val_loss"])) + 1
    np.testing.assert_array_equal(net.predict_proba(X_val), _twin_predictions(rows, best))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_continuing_after_ctrl_c_in_a_callback_equals_one_fit(rows, optimizer):
    X, y, _, _ = rows

    def interrupt(network, record):
        if record["epoch"] == 3:
            raise KeyboardInterrupt

    once = Network([784, 16, 10], seed=2)
    once.fit(X, y, epochs=5, batch_size=50, optimizer=optimizer)
    net = Network([784, 16, 10], seed=2)
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, y, epochs=5, batch_size=50, optimizer=optimizer, callbacks=[interrupt])
    net.fit(X, y, epochs=2, batch_size=50, optimizer=optimizer, reset=False)
    np.testing.assert_array_equal(net._params, once._params)
    assert len(net.history_) == 5


def test_ctrl_c_within_an_epoch_keeps_its_start_and_warns_when_continued(rows,
                                                                         monkeypatch):
    X, y, _, _ = rows
    from cnn_core import network

    class InterruptedProgress(network.EpochProgress):
        epochs = 0

        def __init__(self, *args):
            InterruptedProgress.epochs += 1
            super().__init__(*args)

        def update(self, *args):
            if InterruptedProgress.epochs == 2:     # after the second epoch's first chunk
                raise KeyboardInterrupt
            super().update(*args)

    twin = Network([784, 16, 10], seed=2)
    twin.fit(X, y, epochs=1, batch_size=10)
    net = Network([784, 16, 10], seed=2)
    monkeypatch.setattr(network, "EpochProgress", InterruptedProgress)
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, y, epochs=3, batch_size=10, verbose=1)
    assert len(net.history_) == 1 and InterruptedProgress.epochs == 2
    np.testing.assert_array_equal(net._params, twin._params)
    monkeypatch.undo()
    with pytest.warns(RuntimeWarning, match="optimizer starts anew"):
        net.fit(X, y, epochs=1, batch_size=10, reset=False)
    assert len(net.history_) == 2


@pytest.mark.parametrize("options,who", [
    (dict(early_stopping=True), "EarlyStopping: monitor='val_loss'"),
    (dict(schedule="plateau"), "ReduceOnPlateau: monitor='val_loss'"),
    (dict(callbacks=[Checkpoint("never-written.cnn")]), "Checkpoint: monitor='val_loss'"),
    (dict(early_stopping=EarlyStopping("val_r2"), validation_split=0.2),
     "EarlyStopping: monitor='val_r2'"),
    (dict(schedule=LinearWarmup(2, then=ReduceOnPlateau("accuracy_top5"))),
     "ReduceOnPlateau: monitor='accuracy_top5'"),
])
def test_a_monitor_the_records_lack_fails_before_training(rows, options, who, tmp_path,
                                                          monkeypatch):
    X, y, _, _ = rows
    monkeypatch.chdir(tmp_path)
    net = Network([784, 8, 10], seed=0)
    before = net._params.copy()
    with pytest.raises(ValueError, match="is not in the epoch records") as info:
        net.fit(X, y, epochs=3, **options)
    assert str(info.value).startswith(who)
    np.testing.assert_array_equal(net._params, before)
    assert net.history_ is None and not list(tmp_path.iterdir())


def test_checkpoint_keeps_the_best_model(rows, tmp_path):
    X, y, X_val, y_val = rows
    path = tmp_path / "best.cnn"
    checkpoint = Checkpoint(path, monitor="val_loss")
    net = Network([784, 32, 10], seed=7)
    history = net.fit(X, y, epochs=8, learning_rate=0.6, validation_data=(X_val, y_val),
                      callbacks=[checkpoint])
    best = int(np.argmin(history["val_loss"])) + 1
    assert checkpoint.best_epoch == best < 8
    saved = Network.load(path)
    np.testing.assert_array_equal(saved.predict_proba(X_val), _twin_predictions(rows, best))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.cnn"]   # no leftovers


# ---- weights and validation splits ----------------------------------------------------
def test_class_weight_equals_its_sample_weights(rows):
    X, y, _, _ = rows
    counts = np.bincount(y, minlength=10)
    balanced = (len(y) / (10 * counts))[y]
    by_dict = {3: 2.0, 7: 0.5}
    as_dict = np.where(y == 3, 2.0, np.where(y == 7, 0.5, 1.0))
    for class_weight, sample_weight in [("balanced", balanced), (by_dict, as_dict)]:
        a = Network([784, 8, 10], seed=4)
        a.fit(X, y, epochs=2, class_weight=class_weight)
        b = Network([784, 8, 10], seed=4)
        b.fit(X, y, epochs=2, sample_weight=sample_weight.astype(np.float32))
        np.testing.assert_array_equal(a._params, b._params)
    with pytest.raises(ValueError, match="class_weight"):
        Network([784, 8, 10], seed=4).fit(X, y, epochs=1, class_weight={10: 1.0})


def test_validation_split_holds_out_the_last_rows(rows):
    X, y, _, _ = rows
    a = Network([784, 8, 10], seed=6)
    a.fit(X, y, epochs=2, validation_split=0.2)
    b = Network([784, 8, 10], seed=6)
    b.fit(X[:1200], y[:1200], epochs=2, validation_data=(X[1200:], y[1200:]))
    assert a.history_.records[-1]["val_loss"] == b.history_.records[-1]["val_loss"]
    np.testing.assert_array_equal(a._params, b._params)
    with pytest.raises(ValueError, match="validation_split"):
        a.fit(X[:3], y[:3], epochs=1, validation_split=0.1)


def test_make_schedule_by_name_has_every_documented_name():
    for name in training.SCHEDULES:
        assert isinstance(training.make_schedule(name, 10), training.Schedule)


def test_epoch_loss_does_not_depend_on_how_the_epoch_is_cut(rows, monkeypatch):
    """fit hands the kernels chunks of minibatches sized by a clock (for progress and
    Ctrl-C); the recorded loss must be the same however the chunks fall."""
    import time as real_time
    import cnn_core.network as network_module
    X, y, _, _ = rows
    steady = Network([784, 24, 10], seed=5)
    steady.fit(X, y, epochs=3, batch_size=20, optimizer="adam")

    class JumpyClock:       # every call a reading scaled at random: chunks of 1..many
        def __init__(self, seed):
            self.rng = np.random.default_rng(seed)

        def __getattr__(self, name):
            return getattr(real_time, name)

        def perf_counter(self):
            return real_time.perf_counter() * float(self.rng.choice([1e-3, 1.0, 1e3]))

    for seed in range(5):
        monkeypatch.setattr(network_module, "time", JumpyClock(seed))
        jumpy = Network([784, 24, 10], seed=5)
        jumpy.fit(X, y, epochs=3, batch_size=20, optimizer="adam")
        np.testing.assert_array_equal(jumpy._params, steady._params)
        assert jumpy.history_["loss"] == steady.history_["loss"]
