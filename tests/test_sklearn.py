"""cnn_core.sklearn: scikit-learn's estimator checks for both estimators (every check, the
expected failures named with their reason), arbitrary labels, pickling and cloning,
partial_fit and warm_start continuing exactly, Pipeline and GridSearchCV (loky
processes, and a dask.distributed cluster) on real MNIST rows, thread limits in the
workers, and a real regression (diabetes) against scikit-learn's MLPRegressor."""
import pickle
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")
import joblib  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import (  # noqa: E402
    _get_check_estimator_ids, estimator_checks_generator)

import cnn_core  # noqa: E402
from cnn_core.sklearn import EXPECTED_FAILED_CHECKS, MLPClassifier, MLPRegressor  # noqa: E402


def _estimator_checks():
    """scikit-learn's checks of both estimators, expected failures marked xfail.  The
    array API check is left out: the estimators take numpy arrays (and what converts to
    them) only and declare no array API support, so scikit-learn would only skip it."""
    for estimator in (MLPClassifier(), MLPRegressor()):
        for case in estimator_checks_generator(estimator, mark="xfail",
                                               expected_failed_checks=EXPECTED_FAILED_CHECKS):
            check = case.values[1] if hasattr(case, "values") else case[1]
            if getattr(check, "func", check).__name__ != "check_array_api_input":
                yield case


@pytest.mark.parametrize("estimator, check", list(_estimator_checks()),
                         ids=_get_check_estimator_ids)
def test_scikit_learn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


@pytest.fixture(scope="module")
def digits(mnist):
    """2,000 real MNIST training rows and 500 test rows, as floats in [0, 1]."""
    X_train, y_train, X_test, y_test = mnist
    return (X_train[:2000] / np.float32(255)), y_train[:2000], X_test[:500], y_test[:500]


def _classifier(**options):
    settings = dict(hidden_layer_sizes=(32,), max_iter=8, random_state=0,
                    learning_rate_init=0.002, n_iter_no_change=100)
    settings.update(options)
    return MLPClassifier(**settings)


@pytest.fixture(autouse=True)
def _quiet_convergence():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def test_classifier_learns_mnist(digits):
    X, y, X_test, y_test = digits
    model = _classifier().fit(X, y)
    assert model.score(X_test, y_test) > 0.8
    np.testing.assert_array_equal(model.classes_, np.arange(10))
    assert model.n_features_in_ == 784 and model.n_iter_ == 8 == len(model.loss_curve_)
    assert [w.shape for w in model.coefs_] == [(784, 32), (32, 10)]
    assert [b.shape for b in model.intercepts_] == [(32,), (10,)]
    assert model.best_loss_ == min(model.loss_curve_) and model.validation_scores_ is None
    proba = model.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.exp(model.predict_log_proba(X_test)), proba, rtol=1e-12)


@pytest.mark.parametrize("names", [
    [-5, -3, 0, 2, 7, 11, 100, 1000, 10**6, 10**9],
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
], ids=["sparse-negative-ints", "strings"])
def test_arbitrary_labels_round_trip(digits, names):
    X, y, X_test, y_test = digits
    names = np.array(names)
    plain = _classifier().fit(X, y)
    named = _classifier().fit(X, names[y])
    np.testing.assert_array_equal(named.classes_, np.sort(names))
    predicted = named.predict(X_test)
    assert predicted.dtype == names.dtype and set(predicted.tolist()) <= set(names.tolist())
    if np.all(np.diff(names) > 0) if names.dtype.kind == "i" else False:
        # labels in the digits' order: the same network, the labels mapped
        np.testing.assert_array_equal(predicted, names[plain.predict(X_test)])
    assert named.score(X_test, names[y_test]) == pytest.approx(
        plain.score(X_test, y_test), abs=0.03)


def test_binary_labels(digits):
    X, y, X_test, y_test = digits
    keep, keep_test = np.isin(y, [3, 8]), np.isin(y_test, [3, 8])
    labels = np.where(y[keep] == 3, "three", "eight")
    model = _classifier().fit(X[keep], labels)
    assert model.classes_.tolist() == ["eight", "three"]
    assert model.predict_proba(X_test[keep_test]).shape == (keep_test.sum(), 2)
    assert model.score(X_test[keep_test], np.where(y_test[keep_test] == 3, "three",
                                                   "eight")) > 0.9


def test_unknown_labels_in_partial_fit_are_refused(digits):
    X, y, _, _ = digits
    model = _classifier().partial_fit(X[:100], y[:100], classes=np.arange(10))
    with pytest.raises(ValueError, match="not in classes_"):
        model.partial_fit(X[:10], y[:10] + 20)
    with pytest.raises(ValueError, match="classes must be passed"):
        _classifier().partial_fit(X[:10], y[:10])


def test_pickle_and_clone_of_fitted_estimators(digits):
    X, y, X_test, y_test = digits
    for model, target in [(_classifier(), y), (MLPRegressor((16,), max_iter=5,
                                                            random_state=0), y / 9.0)]:
        model.fit(X[:1000], target[:1000])
        again = pickle.loads(pickle.dumps(model))
        np.testing.assert_array_equal(again.predict(X_test), model.predict(X_test))
        assert again.loss_curve_ == model.loss_curve_
        copy = clone(model)
        assert copy.get_params() == model.get_params()
        assert not hasattr(copy, "network_") and not hasattr(copy, "n_iter_")
        # a pickled model continues training as the original does
        model.partial_fit(X[1000:1500], target[1000:1500])
        again.partial_fit(X[1000:1500], target[1000:1500])
        np.testing.assert_array_equal(again.predict(X_test), model.predict(X_test))


def test_partial_fit_and_warm_start_continue_exactly(digits):
    X, y, X_test, _ = digits
    whole = _classifier(max_iter=6).fit(X, y)
    pieces = _classifier()
    for _ in range(6):
        pieces.partial_fit(X, y, classes=np.arange(10))
    np.testing.assert_array_equal(pieces.predict_proba(X_test), whole.predict_proba(X_test))
    assert pieces.n_iter_ == 6 and pieces.loss_curve_ == whole.loss_curve_
    warm = _classifier(max_iter=3, warm_start=True).fit(X, y)
    warm.fit(X, y)
    np.testing.assert_array_equal(warm.predict_proba(X_test), whole.predict_proba(X_test))
    cold = _classifier(max_iter=3).fit(X, y)
    cold.fit(X, y)
    assert not np.array_equal(cold.predict_proba(X_test), whole.predict_proba(X_test))


def test_continuing_with_changed_sizes_or_solver_is_refused(digits):
    X, y, _, _ = digits
    X, y = X[:300], y[:300]
    model = _classifier(max_iter=1, warm_start=True).fit(X, y)
    before = [w.copy() for w in model.coefs_]
    for change, match in [(dict(hidden_layer_sizes=(64,)), r"hidden_layer_sizes=\(64,\)"),
                          (dict(solver="sgd"), "solver='sgd'")]:
        model.set_params(**change)
        for call in (lambda: model.fit(X, y), lambda: model.partial_fit(X, y)):
            with pytest.raises(ValueError, match=match):
                call()
        model.set_params(hidden_layer_sizes=(32,), solver="adam")
    assert all(np.array_equal(a, b) for a, b in zip(model.coefs_, before))
    model.set_params(hidden_layer_sizes=(64,), warm_start=False).fit(X, y)
    assert model.coefs_[0].shape == (784, 64) and model.out_activation_ == "softmax"
    assert MLPRegressor(max_iter=1).fit(X, y.astype(float)).out_activation_ == "identity"


@pytest.mark.parametrize("name,value", [("alpha", float("nan")), ("momentum", 1.0),
                                        ("learning_rate_init", float("inf")),
                                        ("tol", float("nan"))])
def test_hyperparameters_are_checked_by_their_own_names(digits, name, value):
    X, y, _, _ = digits
    with pytest.raises(ValueError, match=f"^{name} must be"):
        _classifier(**{name: value}).fit(X[:100], y[:100])


def test_early_stopping_keeps_the_best_validation_epoch(digits):
    X, y, _, _ = digits
    model = _classifier(max_iter=40, early_stopping=True, n_iter_no_change=3,
                        learning_rate_init=0.01).fit(X, y)
    scores = model.validation_scores_
    assert model.n_iter_ == len(scores) < 40
    best = int(np.argmax(scores))
    assert model.best_validation_score_ == scores[best] and model.n_iter_ == best + 4
    # the validation rows are the stratified split scikit-learn would make
    _, X_val, _, y_val = train_test_split(X, y, test_size=0.1, random_state=model._seed,
                                          stratify=y)
    assert model.score(X_val, y_val) == pytest.approx(scores[best])


def test_class_weight(digits):
    X, y, X_test, y_test = digits
    heavy = _classifier(class_weight={7: 20.0}).fit(X, y)
    plain = _classifier().fit(X, y)
    assert (heavy.predict(X_test) == 7).sum() > (plain.predict(X_test) == 7).sum()
    counts = np.bincount(y)
    balanced = _classifier(class_weight="balanced").fit(X, y)
    by_hand = _classifier().fit(X, y, sample_weight=len(y) / (10 * counts[y]))
    np.testing.assert_array_equal(balanced.predict_proba(X_test), by_hand.predict_proba(X_test))
    with pytest.raises(ValueError, match="class_weight"):
        _classifier(class_weight={"x": 1.0}).fit(X, y)


def test_feature_names_from_a_dataframe(digits):
    pd = pytest.importorskip("pandas")
    X, y, X_test, _ = digits
    frame = pd.DataFrame(X[:300, :50], columns=[f"pixel{i}" for i in range(50)])
    model = _classifier().fit(frame, y[:300])
    assert model.feature_names_in_.tolist() == list(frame.columns)
    with pytest.warns(UserWarning, match="feature names"):
        model.predict(X_test[:5, :50])


def test_schedules_and_adaptive_learning_rate(digits):
    X, y, _, _ = digits
    model = _classifier(solver="sgd", learning_rate="invscaling", power_t=0.5,
                        learning_rate_init=0.5).fit(X, y)
    rates = model.network_.history_["learning_rate"]
    np.testing.assert_allclose(rates, [0.5 / (2000 * e + 1) ** 0.5 for e in range(8)],
                               rtol=1e-6)
    cosine = _classifier(learning_rate="cosine").fit(X, y)
    assert cosine.network_.history_["learning_rate"][-1] < 0.002 * 0.05
    with pytest.raises(ValueError, match="learning_rate"):
        _classifier(learning_rate="sometimes").fit(X, y)
    with pytest.raises(ValueError, match="lbfgs"):
        _classifier(solver="lbfgs").fit(X, y)


def test_pipeline_and_grid_search_in_processes(digits):
    X, y, X_test, y_test = digits
    pipeline = make_pipeline(StandardScaler(),
                             _classifier(max_iter=5, learning_rate_init=0.01))
    search = GridSearchCV(pipeline, {"mlpclassifier__alpha": [1e-4, 1.0],
                                     "mlpclassifier__hidden_layer_sizes": [(16,), (32,)]},
                          cv=2, n_jobs=2)
    search.fit(X[:1200], y[:1200])
    assert search.best_score_ > 0.8 and search.score(X_test, y_test) > 0.8
    assert len(search.cv_results_["mean_test_score"]) == 4
    # joblib's worker processes limit cnn_core's threads to their share of the CPUs
    cpus = joblib.cpu_count()
    threads = joblib.Parallel(n_jobs=2)(joblib.delayed(cnn_core.info)() for _ in range(2))
    assert [t["threads"] for t in threads] == [max(1, cpus // 2)] * 2


def test_grid_search_on_a_dask_cluster(digits):
    distributed = pytest.importorskip("distributed")
    X, y, X_test, y_test = digits
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        # every worker process runs cnn_core on one thread: no oversubscription
        assert sorted(info["threads"] for info in client.run(cnn_core.info).values()) == [1, 1]
        search = GridSearchCV(_classifier(max_iter=5, learning_rate_init=0.01),
                              {"alpha": [1e-4, 1e-2]}, cv=2,
                              n_jobs=-1)
        with joblib.parallel_backend("dask"):
            search.fit(X[:1000], y[:1000])
    assert search.best_score_ > 0.8 and search.score(X_test, y_test) > 0.8


# ---- the regressor --------------------------------------------------------------------
def test_regressor_outputs_and_sample_weight(digits):
    X, y, X_test, _ = digits
    # ink in the top and bottom halves of each image: functions a network can learn
    targets = np.column_stack([X[:, :392].mean(axis=1), X[:, 392:].mean(axis=1)]) * 10
    model = MLPRegressor((32,), max_iter=10, random_state=0, n_iter_no_change=100)
    model.fit(X, targets)
    assert model.predict(X_test).shape == (500, 2) and model.n_outputs_ == 2
    assert model.score(X, targets) > 0.8
    single = MLPRegressor((8,), max_iter=3, random_state=0).fit(X, y)
    assert single.predict(X_test).shape == (500,)
    weighted = MLPRegressor((8,), max_iter=3, random_state=0).fit(
        X, y, sample_weight=np.where(y > 4, 2.0, 1.0))
    assert not np.array_equal(weighted.predict(X_test), single.predict(X_test))
    early = MLPRegressor((32,), max_iter=50, random_state=0, early_stopping=True,
                         n_iter_no_change=3, tol=0.01).fit(X, targets)
    assert early.n_iter_ == len(early.validation_scores_) < 50
    assert early.best_validation_score_ == max(early.validation_scores_) > 0.8


def test_regression_on_diabetes_matches_scikit_learn():
    from sklearn.datasets import load_diabetes
    from sklearn.neural_network import MLPRegressor as SkRegressor
    X, y = load_diabetes(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(X_train)
    X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
    mean, std = y_train.mean(), y_train.std()
    y_train, y_test = (y_train - mean) / std, (y_test - mean) / std
    ours, theirs = [], []
    for seed in range(3):
        settings = dict(hidden_layer_sizes=(16,), learning_rate_init=0.001, max_iter=200,
                        batch_size=32, alpha=1.0, random_state=seed)
        ours.append(MLPRegressor(**settings).fit(X_train, y_train).score(X_test, y_test))
        theirs.append(SkRegressor(**settings).fit(X_train, y_train).score(X_test, y_test))
    assert np.mean(ours) > 0.3
    assert abs(np.mean(ours) - np.mean(theirs)) < 0.05, (ours, theirs)


def test_convergence_warning_points_at_the_callers_fit():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 3)), np.arange(40) % 2
    for model in (MLPClassifier((4,), max_iter=1, n_iter_no_change=5),
                  MLPRegressor((4,), max_iter=1, n_iter_no_change=5)):
        with pytest.warns(ConvergenceWarning) as caught:
            model.fit(X, y)
        assert [w.filename for w in caught] == [__file__]


def test_importing_without_scikit_learn_names_the_extra():
    import subprocess
    import sys
    import tempfile
    code = "import sys; sys.modules['sklearn'] = None; import cnn_core.sklearn"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tempfile.gettempdir())
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: cnn_core.sklearn needs scikit-learn: pip install 'cnn_core[sklearn]'")
