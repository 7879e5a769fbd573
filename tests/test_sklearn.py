"""fastopt.sklearn: scikit-learn's own estimator checks, real data (digits, iris, diabetes),
Pipeline / GridSearchCV, partial_fit, bad input."""

import importlib
import inspect
import pickle
import sys
import warnings

import numpy as np
import pytest
from oracle import import_or_skip

sklearn = import_or_skip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_diabetes, load_digits, load_iris  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier as SkMLPClassifier  # noqa: E402
from sklearn.neural_network import MLPRegressor as SkMLPRegressor  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from fastopt.sklearn import (  # noqa: E402
    TUNED_CLASSIFIER,
    TUNED_REGRESSOR,
    MLPClassifier,
    MLPRegressor,
)


def _expected_failed_checks(estimator):
    # Every applicable check passes (scikit-learn 1.9). Two are skipped by scikit-learn itself
    # when their optional dependencies are missing (pandas: column-name checks; SCIPY_ARRAY_API:
    # array-API input); none are expected to fail, so nothing is listed here. Estimators are
    # checked with their defaults.
    return {}


# expected_failed_checks exists from scikit-learn 1.6 on
_KW = (
    {"expected_failed_checks": _expected_failed_checks}
    if "expected_failed_checks" in inspect.signature(parametrize_with_checks).parameters
    else {}
)


@parametrize_with_checks([MLPClassifier(), MLPRegressor()], **_KW)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def _split(loader, stratify=True, seed=0):
    X, y = loader(return_X_y=True)
    return train_test_split(
        X, y, test_size=0.25, stratify=y if stratify else None, random_state=seed
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (MLPClassifier, SkMLPClassifier),
        (MLPRegressor, SkMLPRegressor),
    ],
)
def test_defaults_are_scikit_learns(ours, theirs):
    """A drop-in replacement trains what scikit-learn would: every parameter the two share has
    scikit-learn's default, and fastopt's additions (but input standardization) are off."""
    mine = inspect.signature(ours).parameters
    ref = inspect.signature(theirs).parameters
    # scikit-learn >= 1.7's regressor names its loss "squared_error"; fastopt's is "mse"
    shared = sorted(set(mine) & set(ref) - {"loss"})
    assert len(shared) >= 15
    assert {n: mine[n].default for n in shared} == {n: ref[n].default for n in shared}
    assert [n for n, p in mine.items() if p.kind != p.KEYWORD_ONLY] == [
        "hidden_layer_sizes",
        "activation",
    ]
    defaults = ours().get_params()
    assert defaults["dropout"] == 0.0 and defaults["batch_norm"] is False
    assert defaults.get("label_smoothing", 0.0) == 0.0
    X, y = load_iris(return_X_y=True)
    # batch_size="auto": min(200, n_samples) as in scikit-learn (one 150-sample batch an epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = ours(max_iter=2, random_state=0).fit(X, y)
    assert est.t_ == 2 * 150 and est._trainer.batch_size == 150
    assert est.model_.hidden_sizes == (100,) and est.model_.label_smoothing == 0.0


def test_tuned_settings():
    assert TUNED_CLASSIFIER == {
        "hidden_layer_sizes": (512,),
        "alpha": 1e-3,
        "batch_size": 64,
        "label_smoothing": 0.1,
    }
    assert TUNED_REGRESSOR == {"hidden_layer_sizes": (512,), "alpha": 1e-3, "batch_size": 64}
    clf = MLPClassifier.tuned(random_state=3, alpha=0.5)
    assert (
        clf.get_params()
        == MLPClassifier(
            hidden_layer_sizes=(512,), alpha=0.5, batch_size=64, label_smoothing=0.1, random_state=3
        ).get_params()
    )
    assert MLPRegressor.tuned().get_params()["hidden_layer_sizes"] == (512,)
    assert "label_smoothing" not in MLPRegressor.tuned().get_params()
    with pytest.raises(TypeError, match="label_smoothing"):
        MLPRegressor(label_smoothing=0.1)
    with pytest.raises(TypeError):
        MLPClassifier((8,), "relu", "adam")  # the rest is keyword-only, as in scikit-learn


def test_digits_tuned_settings_reach_98_percent():
    """The README's digits result (and bench/test_bench_mlp.py's goal) with the tuned settings."""
    Xtr, Xte, ytr, yte = _split(load_digits)
    clf = MLPClassifier.tuned(random_state=0).fit(Xtr, ytr)
    assert clf.score(Xte, yte) >= 0.98
    assert clf.n_iter_ < clf.max_iter  # stopped by tol, as scikit-learn does
    proba = clf.predict_proba(Xte)
    assert proba.shape == (len(Xte), 10) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)


def test_iris():
    Xtr, Xte, ytr, yte = _split(load_iris)
    names = np.array(["setosa", "versicolor", "virginica"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # scikit-learn's batch_size="auto" makes an epoch of these 112 samples one step
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=400, random_state=0)
        clf.fit(Xtr, names[ytr])
    assert clf.classes_.tolist() == names.tolist()
    assert clf.score(Xte, names[yte]) >= 0.9
    assert set(clf.predict(Xte)) <= set(names)


def test_diabetes_regression():
    Xtr, Xte, ytr, yte = _split(load_diabetes, stratify=False)
    reg = MLPRegressor(hidden_layer_sizes=(32,), alpha=0.1, random_state=0).fit(Xtr, ytr)
    assert reg.score(Xte, yte) > 0.3  # ridge regression gets 0.36 on this split
    pred = reg.predict(Xte)
    assert pred.shape == (len(Xte),) and 50 < pred.mean() < 250  # targets mapped back
    Y = np.column_stack([ytr, -2 * ytr])
    multi = MLPRegressor(hidden_layer_sizes=(32,), alpha=0.1, loss="huber", random_state=0)
    multi.fit(Xtr, Y)
    assert multi.predict(Xte).shape == (len(Xte), 2)
    assert multi.score(Xte, np.column_stack([yte, -2 * yte])) > 0.25


def test_pipeline_and_grid_search():
    X, y = load_iris(return_X_y=True)
    pipe = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=1e-2, random_state=0),
    )
    grid = GridSearchCV(
        pipe,
        {"mlpclassifier__alpha": [1e-4, 1e-2], "mlpclassifier__activation": ["relu", "tanh"]},
        cv=3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        grid.fit(X, y)
    assert grid.best_score_ > 0.85
    assert set(grid.best_params_) == {"mlpclassifier__alpha", "mlpclassifier__activation"}
    assert grid.predict(X[:5]).shape == (5,)


def test_params_clone_and_reproducibility():
    X, y = load_iris(return_X_y=True)
    clf = MLPClassifier(hidden_layer_sizes=(8, 4), solver="sgd", dropout=0.1, batch_norm=True)
    clf.set_params(max_iter=15, random_state=3)
    params = clf.get_params()
    assert params["hidden_layer_sizes"] == (8, 4) and params["solver"] == "sgd"
    other = clone(clf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = clf.fit(X, y).predict_proba(X)
        b = other.fit(X, y).predict_proba(X)
        c = clone(clf).set_params(random_state=4).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(clf.coefs_) == 3 and clf.coefs_[0].shape == (4, 8)
    assert [b.shape for b in clf.intercepts_] == [(8,), (4,), (3,)]


def test_partial_fit_and_warm_start():
    Xtr, Xte, ytr, yte = _split(load_digits)
    clf = MLPClassifier(hidden_layer_sizes=(64,), learning_rate_init=1e-2, random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(Xtr[:50], ytr[:50])
    scores = []
    for _ in range(4):
        for lo in range(0, len(Xtr), 400):
            clf.partial_fit(Xtr[lo : lo + 400], ytr[lo : lo + 400], classes=np.arange(10))
        scores.append(clf.score(Xte, yte))
    assert scores[-1] > 0.9 and scores[-1] >= scores[0]
    assert clf.n_iter_ == 1 and len(clf.loss_curve_) == 4 * 4  # n_iter_: the last call's
    with pytest.raises(ValueError, match=r"unseen in the first fit"):
        clf.partial_fit(Xtr[:10], np.full(10, 11))
    with pytest.raises(ValueError, match="features"):
        clf.partial_fit(Xtr[:10, :5], ytr[:10])
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict_proba(Xte), clf.predict_proba(Xte))
    restored.partial_fit(Xtr, ytr)  # keeps training after unpickling
    warm = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, warm_start=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warm.fit(Xtr, ytr)
        first = warm.coefs_[0]
        warm.fit(Xtr, ytr)
    assert (
        warm.n_iter_ == 3
        and len(warm.loss_curve_) == 6
        and not np.array_equal(first, warm.coefs_[0])
    )


def test_early_stopping_and_convergence_warning():
    Xtr, Xte, ytr, yte = _split(load_digits)
    clf = MLPClassifier(
        hidden_layer_sizes=(64,), early_stopping=True, n_iter_no_change=3, random_state=0
    )
    clf.fit(Xtr, ytr)
    assert len(clf.validation_loss_curve_) == clf.n_iter_ < clf.max_iter
    assert clf.history_.meta["n_val"] == int(np.ceil(0.1 * len(Xtr)))
    with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
        MLPClassifier(hidden_layer_sizes=(8,), max_iter=2).fit(Xtr, ytr)


def test_bad_inputs():
    X, y = load_iris(return_X_y=True)
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        clf.fit(X, y[:-1])
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        clf.fit(Xn, y)
    with pytest.raises(ValueError, match="Unknown label type"):
        clf.fit(X, y + 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    with pytest.raises(ValueError, match="X has 3 features, but MLPClassifier is expecting 4"):
        clf.predict(X[:, :3])
    with pytest.raises(ValueError, match=r"labels \[7\] unseen in fit"):
        clf.score(X[:5], [0, 1, 2, 7, 0])
    with pytest.raises(ValueError, match="NaN"):
        clf.predict(Xn)
    with pytest.raises(ValueError, match="only one class"):
        MLPClassifier().fit(X[:10], np.zeros(10))
    for bad, match in [
        (dict(solver="newton"), "unknown solver"),
        (dict(max_iter=0), "max_iter"),
        (dict(alpha=-1), "alpha"),
        (dict(batch_size=0), "batch_size"),
        (dict(activation="swish"), "unknown activation"),
    ]:
        with pytest.raises(ValueError, match=match):
            MLPClassifier(**bad).fit(X, y)
    with pytest.raises(ValueError, match="loss"):
        MLPRegressor(loss="hinge").fit(X, y)


def test_import_error_without_sklearn(monkeypatch):
    monkeypatch.delitem(sys.modules, "fastopt.sklearn", raising=False)
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'fastopt\[sklearn\]'"):
        importlib.import_module("fastopt.sklearn")
