"""fastopt.sklearn stops when scikit-learn's MLPClassifier / MLPRegressor would and keeps the
same best weights: the same per-epoch values (scripted, or fastopt's own) are fed to
scikit-learn's own ``_update_no_improvement_count`` and its fit loop's stop test, and to
fastopt's estimators."""

import inspect
import math
import warnings

import numpy as np
import pytest
from oracle import import_or_skip

import_or_skip("sklearn")

from sklearn.datasets import make_classification, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.neural_network import MLPClassifier as SkMLPClassifier  # noqa: E402
from sklearn.neural_network import MLPRegressor as SkMLPRegressor  # noqa: E402

from fastopt.sklearn import MLPClassifier, MLPRegressor  # noqa: E402
from fastopt.trainer import Trainer  # noqa: E402
from fastopt.trainer.data import split  # noqa: E402

NAN = math.nan


class SklearnRule:
    """scikit-learn's own rule: an sklearn MLPClassifier's ``_update_no_improvement_count``,
    then the test of ``_fit_stochastic`` (``_no_improvement_count > n_iter_no_change``), fed
    one scripted value per epoch (the validation score with ``early``, else the training
    loss). The weights are a tag holding the epoch, so ``_best_coefs`` tells the best epoch.
    One instance is one estimator: a warm-started refit goes on feeding the same one."""

    def __init__(self, early, n_iter_no_change, tol):
        est = SkMLPClassifier(early_stopping=early, n_iter_no_change=n_iter_no_change, tol=tol)
        # what _initialize sets for a stochastic solver
        est.loss_curve_ = []
        est._no_improvement_count = 0
        if early:
            est.validation_scores_, est.best_validation_score_, est.best_loss_ = [], -np.inf, None
        else:
            est.best_loss_, est.validation_scores_, est.best_validation_score_ = np.inf, None, None
        est.coefs_ = [np.zeros(1)]
        est.intercepts_ = [np.zeros(1)]
        est._best_coefs = [np.zeros(1)]
        est._best_intercepts = [np.zeros(1)]
        self.est, self.early, self.epoch, self.loss_best_epoch = est, early, 0, None
        # (self, early_stopping, X_val, y_val[, sample_weight]): 3 or 4 arguments by version
        n_args = len(inspect.signature(est._update_no_improvement_count).parameters)
        self._args = (early, None, None, None)[:n_args]

    def step(self, value):
        """One epoch of ``value``; whether scikit-learn's fit stops after it."""
        est = self.est
        self.epoch += 1
        est.coefs_ = [np.array([float(self.epoch)])]
        est.loss_curve_.append(0.0 if self.early else value)
        est._score = lambda *args, **kwargs: value
        before = est.best_loss_
        est._update_no_improvement_count(*self._args)
        if not self.early and est.best_loss_ != before:
            self.loss_best_epoch = self.epoch
        return est._no_improvement_count > est.n_iter_no_change

    def fit(self, values, max_iter):
        """The epochs of one ``fit``: (epochs run, whether it stopped before max_iter's end)."""
        for n_iter in range(1, max_iter + 1):
            if self.step(values[n_iter - 1]):
                return n_iter, True
        return max_iter, False

    @property
    def best(self):
        return self.est.best_validation_score_ if self.early else self.est.best_loss_

    @property
    def best_epoch(self):
        if self.early:
            tag = int(self.est._best_coefs[0][0])
            return tag or None
        return self.loss_best_epoch


def _script_scores(monkeypatch, cls, scores):
    """Make ``cls``'s early stopping see ``scores`` as its validation scores, one per epoch;
    returns the list that receives the model's state at each of those epochs."""
    it = iter(scores)
    snapshots = []

    def scorer(self, X, y, t, targets):
        def score(model):
            snapshots.append(model.state_dict())
            return next(it)

        return score

    monkeypatch.setattr(cls, "_validation_scorer", scorer, raising=False)
    return snapshots


def _script_losses(monkeypatch, losses):
    """Make every epoch's training loss (its ``history["loss"]`` entry) the next of ``losses``."""
    it = iter(losses)
    run_epoch = Trainer._run_epoch

    def scripted(self, *args, **kwargs):
        run_epoch(self, *args, **kwargs)
        self.history["loss"][-1] = next(it)

    monkeypatch.setattr(Trainer, "_run_epoch", scripted)


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3))
    return X, (X[:, 0] > 0).astype(int)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _differ(a, b):
    return any(not np.array_equal(a[k], b[k]) for k in a)


# (values, n_iter_no_change, tol): validation scores (higher is better)
SCORE_CASES = {
    # a plateau of ties after the best: n_iter_no_change + 1 non-improving epochs stop it
    "ties": ([0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6], 2, 1e-4),
    # tol=0: a tie resets the count (not below best + 0) but is not a new best
    "ties_tol0": ([0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.5, 0.5, 0.5], 2, 0.0),
    # better by less than tol: counts as no improvement, yet becomes the best (weights kept)
    "below_tol": ([0.5, 0.504, 0.508, 0.512, 0.516, 0.52, 0.524], 2, 0.01),
    # steps below tol that add up to more: the best moves with each, no reset
    "creeping": ([0.5, 0.506, 0.512, 0.518, 0.524, 0.53, 0.536, 0.542], 3, 0.01),
    # exactly tol better (dyadic, exact in binary): resets the count
    "exactly_tol": ([0.25, 0.375, 0.5, 0.625, 0.625, 0.625, 0.625], 1, 0.125),
    "n_iter_no_change_1": ([0.5, 0.4, 0.4, 0.9, 0.3, 0.3], 1, 1e-4),
    # a new best by less than tol in the very epoch that stops training
    "best_at_stop": ([0.5, 0.4, 0.4, 0.50005, 0.4, 0.4, 0.4], 2, 1e-4),
    # NaN scores reset the count and are never the best
    "nan": ([0.5, NAN, NAN, NAN, NAN, 0.4, 0.4, 0.4, 0.4], 2, 1e-4),
    # runs to max_iter (ConvergenceWarning), best in the middle
    "max_iter": ([0.1, 0.2, 0.9, 0.3, 0.35, 0.4, 0.45], 2, 1e-4),
}

# training losses (lower is better), without early stopping
LOSS_CASES = {
    "ties": ([1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], 2, 1e-4),
    "ties_tol0": ([1.0, 0.9, 0.9, 0.9, 0.9, 0.95, 0.95, 0.95], 2, 0.0),
    "below_tol": ([1.0, 0.996, 0.992, 0.988, 0.984, 0.98], 2, 0.01),
    "creeping": ([1.0, 0.994, 0.988, 0.982, 0.976, 0.97, 0.964], 3, 0.01),
    "exactly_tol": ([1.0, 0.875, 0.75, 0.625, 0.625, 0.625], 1, 0.125),
    "n_iter_no_change_1": ([1.0, 1.1, 1.1, 0.5, 0.9, 0.9], 1, 1e-4),
    "max_iter": ([1.0, 0.9, 0.8, 0.7, 0.6], 2, 1e-4),
}


def test_rule_matches_sklearn_on_random_sequences():
    """SklearnStopping against scikit-learn's own code, epoch by epoch: count, stop, best."""
    from fastopt.trainer.early_stopping import SklearnStopping

    rng = np.random.default_rng(0)
    grid = np.arange(8) / 8  # dyadic values: ties and exactly-tol steps are exact
    for trial in range(400):
        early = bool(trial % 2)
        n_iter_no_change = int(rng.integers(1, 4))
        tol = float(rng.choice([0.0, 1 / 16, 1 / 8, 1 / 4, 1e-4]))
        values = rng.choice(grid, 25).tolist()
        if trial % 5 == 0:
            values[int(rng.integers(25))] = NAN
        if trial % 3 == 0:  # slow drifts: steps below tol
            values = (np.cumsum(rng.choice([-1, 1, 2], 25)) / 64).tolist()
        ref = SklearnRule(early, n_iter_no_change, tol)
        rule = SklearnStopping(n_iter_no_change, tol, "max" if early else "min")
        for epoch, v in enumerate(values, 1):
            stop = ref.step(v)
            rule.update(v, epoch)
            assert rule.count == ref.est._no_improvement_count, (trial, epoch)
            assert rule.should_stop() == stop, (trial, epoch)
            assert rule.best == ref.best and rule.best_epoch == ref.best_epoch, (trial, epoch)


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
@pytest.mark.parametrize("case", sorted(SCORE_CASES))
def test_early_stopping_on_scripted_scores_matches_sklearn(monkeypatch, cls, case):
    values, n_iter_no_change, tol = SCORE_CASES[case]
    ref = SklearnRule(True, n_iter_no_change, tol)
    n_iter, stopped = ref.fit(values, max_iter=len(values))
    snapshots = _script_scores(monkeypatch, cls, values)
    X, y = _data()
    est = cls(
        hidden_layer_sizes=(4,),
        early_stopping=True,
        validation_fraction=0.25,
        n_iter_no_change=n_iter_no_change,
        tol=tol,
        max_iter=len(values),
        random_state=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        est.fit(X, y)
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    assert est.n_iter_ == len(est.loss_curve_) == n_iter
    assert warned == (not stopped)
    assert est.history_.meta.get("stopped_early", False) == stopped
    np.testing.assert_array_equal(est.validation_scores_, values[:n_iter])
    assert est.best_validation_score_ == ref.best
    assert est.best_loss_ is None  # as scikit-learn's with early_stopping
    assert est.history_.meta["best_epoch"] == ref.best_epoch
    assert est.t_ == n_iter * est.history_.meta["n_train"]
    # the weights of scikit-learn's best epoch are the estimator's
    _assert_same_state(est.model_.state_dict(), snapshots[ref.best_epoch - 1])
    if ref.best_epoch != n_iter:  # (and they are not the last epoch's)
        assert _differ(snapshots[ref.best_epoch - 1], snapshots[-1])


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_stopping_on_scripted_training_loss_matches_sklearn(monkeypatch, case):
    values, n_iter_no_change, tol = LOSS_CASES[case]
    ref = SklearnRule(False, n_iter_no_change, tol)
    n_iter, stopped = ref.fit(values, max_iter=len(values))
    _script_losses(monkeypatch, values)
    X, y = _data()
    est = MLPClassifier(
        hidden_layer_sizes=(4,),
        n_iter_no_change=n_iter_no_change,
        tol=tol,
        max_iter=len(values),
        random_state=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        est.fit(X, y)
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    assert est.loss_curve_ == values[:n_iter] and est.n_iter_ == n_iter
    assert warned == (not stopped)
    assert est.best_loss_ == ref.best
    assert est.validation_scores_ is None and est.best_validation_score_ is None
    assert est.history_.meta["best_epoch"] == ref.best_epoch


def test_all_nan_scores_restore_the_initial_weights(monkeypatch):
    """scikit-learn's ``_best_coefs`` start as the initial weights: when no validation score
    is ever a best, those are the ones the fit ends with."""
    values = [NAN] * 4
    ref = SklearnRule(True, 2, 1e-4)
    assert ref.fit(values, max_iter=4) == (4, False) and ref.best_epoch is None
    start = {}
    run_epoch = Trainer._run_epoch

    def first(self, *args, **kwargs):
        start.setdefault("state", self.model.state_dict())
        run_epoch(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_run_epoch", first)
    _script_scores(monkeypatch, MLPClassifier, values)
    X, y = _data()
    est = MLPClassifier(
        hidden_layer_sizes=(4,),
        early_stopping=True,
        validation_fraction=0.25,
        n_iter_no_change=2,
        max_iter=4,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    assert est.n_iter_ == 4 and est.best_validation_score_ == -np.inf
    _assert_same_state(est.model_.state_dict(), start["state"])


def test_warm_start_continues_the_count_and_keeps_the_last_weights(monkeypatch):
    """A warm_start refit goes on with the count, best score and score list of the fit before
    it; without a new best it ends with its last weights, because scikit-learn's saved best
    weights are the arrays that the refit trains in place (checked on scikit-learn itself)."""
    rng = np.random.default_rng(0)
    Xs = rng.standard_normal((200, 3))
    ys = (Xs[:, 0] > 0).astype(int)  # separable: the validation accuracy reaches 1.0
    sk = SkMLPClassifier(
        hidden_layer_sizes=(16,),
        early_stopping=True,
        n_iter_no_change=2,
        warm_start=True,
        learning_rate_init=0.05,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.fit(Xs, ys)
        assert sk.validation_scores_ == [1.0] * 4 and sk._no_improvement_count == 3
        w = sk.coefs_[0].copy()
        sk.fit(Xs, ys)
    assert sk.n_iter_ == 1 and sk._no_improvement_count == 4 and len(sk.validation_scores_) == 5
    assert not np.array_equal(sk.coefs_[0], w)  # the last epoch's, not the first fit's best

    first, second = [0.5, 0.6, 0.6, 0.6, 0.6], [0.6, 0.6, 0.6]
    ref = SklearnRule(True, 2, 1e-4)
    assert ref.fit(first, max_iter=10) == (5, True) and ref.best_epoch == 2
    assert ref.fit(second, max_iter=10) == (1, True) and ref.best_epoch == 2
    X, y = _data()
    est = MLPClassifier(
        hidden_layer_sizes=(4,),
        early_stopping=True,
        validation_fraction=0.25,
        n_iter_no_change=2,
        max_iter=10,
        warm_start=True,
        random_state=0,
    )
    snapshots = _script_scores(monkeypatch, MLPClassifier, first)
    est.fit(X, y)
    best = snapshots[1]
    _assert_same_state(est.model_.state_dict(), best)  # epoch 2's
    snapshots = _script_scores(monkeypatch, MLPClassifier, second)
    est.fit(X, y)
    # n_iter_ counts this fit's epochs, as scikit-learn's
    assert len(snapshots) == 1 and est.n_iter_ == 1 and len(est.loss_curve_) == 5 + 1
    assert est.validation_scores_ == first + second[:1]
    assert est.best_validation_score_ == 0.6 and est.history_.meta["best_epoch"] == 2
    _assert_same_state(est.model_.state_dict(), snapshots[0])  # the refit's last weights
    assert _differ(snapshots[0], best)


def test_partial_fit_counts_and_a_warm_fit_continues(monkeypatch):
    """scikit-learn's partial_fit updates the count and best_loss_ (it never stops one); a
    warm_start fit after it continues that count."""
    losses = [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    ref = SklearnRule(False, 2, 1e-4)
    for v in losses[:3]:
        ref.step(v)
    n_iter, stopped = ref.fit(losses[3:], max_iter=5)
    assert (n_iter, stopped) == (1, True)
    _script_losses(monkeypatch, losses)
    X, y = _data()
    est = MLPClassifier(hidden_layer_sizes=(4,), n_iter_no_change=2, max_iter=5, warm_start=True)
    for _ in range(3):
        est.partial_fit(X, y, classes=[0, 1])
    assert est.best_loss_ == 1.0 and est.validation_scores_ is None
    est.fit(X, y)
    assert est.n_iter_ == n_iter and len(est.loss_curve_) == 3 + n_iter
    assert est.history_.meta["stopped_early"]
    assert est.best_loss_ == ref.best


def _replay(values, n_iter_no_change, tol, early, max_iter):
    ref = SklearnRule(early, n_iter_no_change, tol)
    return ref, ref.fit(values, max_iter)


def _validation_rows(est, t):
    meta = est.history_.meta
    train, val = split(t, len(t), est.validation_fraction, meta["seed"])
    assert val.size == meta["n_val"] and train.size == meta["n_train"]
    return val


def test_classifier_early_stopping_end_to_end():
    X, y = make_classification(300, 8, n_informative=5, random_state=0)
    clf = MLPClassifier(
        hidden_layer_sizes=(8,),
        early_stopping=True,
        n_iter_no_change=3,
        learning_rate_init=0.01,
        max_iter=300,
        random_state=0,
    ).fit(X, y)
    scores = clf.validation_scores_
    assert len(scores) == clf.n_iter_ == len(clf.loss_curve_) < clf.max_iter
    ref, (n_iter, stopped) = _replay(scores, 3, clf.tol, True, clf.max_iter)
    assert stopped and n_iter == clf.n_iter_
    assert clf.best_validation_score_ == ref.best == max(scores)
    assert clf.history_.meta["best_epoch"] == ref.best_epoch
    assert clf.best_loss_ is None
    assert clf.t_ == clf.n_iter_ * clf.history_.meta["n_train"]
    # the restored weights are the best epoch's: they score best_validation_score_
    val = _validation_rows(clf, np.searchsorted(clf.classes_, y))
    assert clf.score(X[val], y[val]) == clf.best_validation_score_


def test_regressor_early_stopping_end_to_end():
    X, y = make_regression(200, 5, noise=20.0, random_state=0)
    reg = MLPRegressor(
        hidden_layer_sizes=(16,),
        early_stopping=True,
        n_iter_no_change=3,
        learning_rate_init=0.01,
        max_iter=300,
        random_state=0,
    ).fit(X, y)
    scores = reg.validation_scores_
    assert len(scores) == reg.n_iter_ < reg.max_iter
    ref, (n_iter, stopped) = _replay(scores, 3, reg.tol, True, reg.max_iter)
    assert stopped and n_iter == reg.n_iter_
    assert reg.best_validation_score_ == ref.best == max(scores) and reg.best_loss_ is None
    val = _validation_rows(reg, y.reshape(-1, 1))
    assert reg.score(X[val], y[val]) == reg.best_validation_score_  # R^2, as scikit-learn's


def test_training_loss_stopping_end_to_end():
    X, y = make_classification(300, 8, n_informative=5, random_state=0)
    clf = MLPClassifier(
        hidden_layer_sizes=(8,), n_iter_no_change=3, tol=1e-3, max_iter=300, random_state=0
    ).fit(X, y)
    losses = clf.loss_curve_
    ref, (n_iter, stopped) = _replay(losses, 3, 1e-3, False, clf.max_iter)
    assert stopped and n_iter == clf.n_iter_ < clf.max_iter
    assert clf.best_loss_ == ref.best == min(losses)
    assert clf.validation_scores_ is None and clf.best_validation_score_ is None


def test_validation_set_of_one_sample_is_refused_as_in_sklearn():
    X, y = make_regression(10, 2, random_state=0)
    with pytest.raises(ValueError, match="validation set is too small"):
        SkMLPRegressor(early_stopping=True).fit(X, y)
    with pytest.raises(ValueError, match="validation set is too small"):
        MLPRegressor(early_stopping=True).fit(X, y)


@pytest.mark.parametrize("early", [False, True])
def test_epoch_counters_follow_sklearn_over_warm_fits_and_partial_fits(early):
    """n_iter_ counts the last call's epochs; loss_curve_, t_ and validation_scores_ go on over
    warm_start fits and partial_fit calls: the same call sequence through scikit-learn."""
    X, y = make_classification(n_samples=120, n_features=6, random_state=0)
    kw = {"hidden_layer_sizes": (4,), "warm_start": True, "random_state": 0, "tol": 0.0}
    kw["n_iter_no_change"] = 1000  # neither stops early: every epoch of max_iter runs
    calls = [("fit", 3), ("fit", 2), ("max", 4)] + ([] if early else [("partial", 0)] * 2)
    seen = []
    for cls in (SkMLPClassifier, MLPClassifier):
        est, row = cls(max_iter=3, early_stopping=early, **kw), []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for kind, max_iter in calls:
                if kind == "partial":
                    est.partial_fit(X, y)
                else:
                    est.set_params(max_iter=max_iter).fit(X, y)
                scores = est.validation_scores_
                row.append((est.n_iter_, len(est.loss_curve_), est.t_, scores and len(scores)))
        seen.append(row)
    assert seen[1] == seen[0]
    assert [r[0] for r in seen[1]] == [m if k != "partial" else 1 for k, m in calls]
