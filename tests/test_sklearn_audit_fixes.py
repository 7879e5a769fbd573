"""fastopt.sklearn audit fixes: a fit that raises leaves a fitted estimator as it was;
partial_fit after fit(early_stopping=True) and after a pickle round trip; ``t_``."""

import pickle
import warnings

import numpy as np
import pytest
from oracle import import_or_skip

import_or_skip("sklearn")

from sklearn.exceptions import ConvergenceWarning  # noqa: E402

from fastopt.sklearn import MLPClassifier, MLPRegressor  # noqa: E402
from fastopt.trainer import Trainer  # noqa: E402

BAD_PARAMS = [
    {"init": "bogus"},
    {"hidden_layer_sizes": (0,)},
    {"dropout": 1.5},
    {"dtype": "float16"},
    {"batch_norm": "yes"},
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _data(n=60, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d))


def _state(est):
    return {
        k: (v.copy() if isinstance(v, np.ndarray) else v)
        for k, v in vars(est).items()
        if (k.endswith("_") or k.startswith("_")) and not k.startswith("__")
    }


def _assert_same_state(est, before):
    after = _state(est)
    assert set(after) == set(before)
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(after[k], v, err_msg=k)
        else:
            assert after[k] is v or after[k] == v, k


@pytest.mark.parametrize("bad", [{"loss": "bogus"}, *BAD_PARAMS], ids=str)
def test_failed_refit_leaves_regressor_as_it_was(bad):
    X = _data()
    y = X @ [1.0, 2.0, -1.0]
    reg = MLPRegressor(hidden_layer_sizes=(8,), max_iter=20, random_state=0).fit(X, y)
    before, pred, model = _state(reg), reg.predict(X), reg.model_
    X5 = _data(d=5, seed=1)
    with pytest.raises((ValueError, TypeError)):
        reg.set_params(**bad).fit(X5, np.c_[1000 * y + 5000, y])
    assert reg.model_ is model
    _assert_same_state(reg, before)
    np.testing.assert_array_equal(reg.predict(X), pred)


@pytest.mark.parametrize("bad", BAD_PARAMS, ids=str)
def test_failed_refit_leaves_classifier_as_it_was(bad):
    X = _data()
    y = np.array([0, 1, 2] * 20)
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=30, random_state=0).fit(X, y)
    before, pred, model = _state(clf), clf.predict(X), clf.model_
    with pytest.raises((ValueError, TypeError)):
        clf.set_params(**bad).fit(_data(d=4, seed=1), np.where(y == 0, "a", "b"))
    assert clf.model_ is model
    _assert_same_state(clf, before)
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2])
    np.testing.assert_array_equal(clf.predict(X), pred)


def test_failed_refit_in_the_trainer_leaves_regressor_as_it_was():
    """The Trainer's own check (a validation split of one sample leaves nothing to train on)
    runs before the new model is set on the estimator."""
    X = _data()
    y = X[:, 0]
    reg = MLPRegressor(hidden_layer_sizes=(8,), max_iter=5, random_state=0).fit(X, y)
    before, pred = _state(reg), reg.predict(X)
    with pytest.raises(ValueError, match="validation_split"):
        reg.set_params(early_stopping=True).fit(_data(n=1, d=2), [7.0])
    _assert_same_state(reg, before)
    np.testing.assert_array_equal(reg.predict(X), pred)


def test_failed_partial_fit_first_call_sets_nothing():
    est = MLPClassifier(hidden_layer_sizes=(4,), init="bogus")
    with pytest.raises(ValueError, match="init"):
        est.partial_fit(_data(), np.arange(60) % 2, classes=[0, 1])
    assert not [k for k in vars(est) if k.endswith("_")]


def test_warm_start_wrong_feature_count_keeps_n_features_in():
    X = _data(n=40)
    y = np.array([0, 1] * 20)
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=5, warm_start=True, random_state=0)
    clf.fit(X, y)
    pred = clf.predict(X)
    with pytest.raises(ValueError, match="5 features"):
        clf.fit(_data(n=40, d=5), y)
    assert clf.n_features_in_ == 3
    np.testing.assert_array_equal(clf.predict(X), pred)
    with pytest.raises(ValueError, match="unseen"):  # new labels in a warm fit: refused
        clf.fit(X, np.array([0, 7] * 20))
    np.testing.assert_array_equal(clf.classes_, [0, 1])


def test_partial_fit_after_early_stopping_fit_trains_one_epoch_on_all_data():
    X = _data(n=50)
    y = (X[:, 0] > 0).astype(int)
    clf = MLPClassifier(
        hidden_layer_sizes=(4,),
        max_iter=30,
        early_stopping=True,
        learning_rate_init=0.05,
        random_state=0,
    ).fit(X, y)
    n_iter, w0 = clf.n_iter_, clf.coefs_[0]
    steps = clf._trainer.optimizer.state_dict()["state"][0]["step"]
    clf.partial_fit(X, 1 - y)
    assert clf.history_.meta["n_train"] == 50
    assert not np.array_equal(w0, clf.coefs_[0])
    assert clf.n_iter_ == 1 and len(clf.loss_curve_) == n_iter + 1
    # the fit's optimizer state carries over: one more step (one batch of 50)
    assert clf._trainer.optimizer.state_dict()["state"][0]["step"] == steps + 1
    assert clf._trainer.patience is None and not clf._trainer.validation_split


def _partial_fitted(cls, dropout=0.0, fit_first=False):
    X = _data(n=40)
    y = (X[:, 0] > 0).astype(int)
    kw = {"classes": [0, 1]} if cls is MLPClassifier else {}
    est = cls(hidden_layer_sizes=(4,), random_state=0, learning_rate_init=0.01, dropout=dropout)
    if fit_first:
        est.set_params(max_iter=3).fit(X, y)
    for _ in range(3):
        est.partial_fit(X, y, **kw)
    return est, X, y


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("fit_first", [False, True])
def test_pickled_estimator_continues_partial_fit_exactly(cls, dropout, fit_first):
    a, X, y = _partial_fitted(cls, dropout, fit_first)
    data = pickle.dumps(a)
    b = pickle.loads(data)
    assert not isinstance(b._trainer, Trainer)  # the pickle holds a plain state, not the Trainer
    for _ in range(2):
        a.partial_fit(X, y)
        b.partial_fit(X, y)
    np.testing.assert_array_equal(a.coefs_[0], b.coefs_[0])
    np.testing.assert_array_equal(a.intercepts_[-1], b.intercepts_[-1])
    assert a.n_iter_ == b.n_iter_ == 1
    assert len(a.loss_curve_) == (3 if fit_first else 0) + 5
    assert a.loss_curve_ == b.loss_curve_ and a.t_ == b.t_
    sa, sb = a._trainer.optimizer.state_dict(), b._trainer.optimizer.state_dict()
    assert sa["state"][0]["step"] == sb["state"][0]["step"] == a._trainer.global_step
    np.testing.assert_array_equal(sa["state"][0]["exp_avg"], sb["state"][0]["exp_avg"])
    # a second round trip of the continued copy still matches
    c = pickle.loads(pickle.dumps(b))
    b.partial_fit(X, y)
    c.partial_fit(X, y)
    np.testing.assert_array_equal(b.coefs_[0], c.coefs_[0])


def test_pickle_of_unfitted_and_lbfgs_estimators():
    X = _data()
    y = X[:, 0]
    assert pickle.loads(pickle.dumps(MLPRegressor()))._trainer is None
    reg = MLPRegressor(hidden_layer_sizes=(4,), solver="lbfgs", max_iter=5, random_state=0)
    reg.fit(X, y)
    restored = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(restored.predict(X), reg.predict(X))
    # switched to a stochastic solver: partial_fit starts its optimizer afresh
    restored.set_params(solver="adam").partial_fit(X, y)
    assert restored._trainer.optimizer.state_dict()["state"][0]["step"] == 1


def test_t_counts_training_samples_seen():
    X = _data(n=50)
    y = X[:, 0]
    kw = {"hidden_layer_sizes": (4,), "batch_size": 40, "random_state": 0, "tol": 0}
    reg = MLPRegressor(max_iter=2, **kw).fit(X, y)
    assert reg.t_ == 2 * 50  # scikit-learn's: samples, not steps * batch_size
    reg.partial_fit(X[:45], y[:45])
    assert reg.t_ == 2 * 50 + 45
    es = MLPRegressor(max_iter=3, early_stopping=True, n_iter_no_change=50, **kw).fit(X, y)
    assert es.t_ == 3 * es.history_.meta["n_train"] == 3 * 45
    warm = MLPRegressor(max_iter=2, warm_start=True, **kw).fit(X, y)
    warm.fit(X, y)
    assert warm.n_iter_ == 2 and warm.t_ == 4 * 50
