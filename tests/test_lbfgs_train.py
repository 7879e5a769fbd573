"""LBFGS through the Trainer, the scikit-learn estimators (solver="lbfgs") and `fastopt train`."""

import inspect
import warnings

import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo

import_or_skip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from fastopt.nn import MLP  # noqa: E402
from fastopt.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

_KW = (
    {"expected_failed_checks": lambda est: {}}
    if "expected_failed_checks" in inspect.signature(parametrize_with_checks).parameters
    else {}
)


@parametrize_with_checks(
    [MLPClassifier(solver="lbfgs", max_iter=50), MLPRegressor(solver="lbfgs", max_iter=50)], **_KW
)
def test_lbfgs_estimators_pass_the_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def _digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


def test_lbfgs_classifier_on_digits():
    Xtr, Xte, ytr, yte = _digits()
    clf = MLPClassifier(solver="lbfgs", random_state=0).fit(Xtr, ytr)
    assert clf.score(Xte, yte) >= 0.97
    assert 1 <= clf.n_iter_ <= clf.max_iter


def test_lbfgs_max_iter_counts_iterations_and_warns():
    Xtr, _, ytr, _ = _digits()
    with pytest.warns(ConvergenceWarning, match="lbfgs failed to converge"):
        clf = MLPClassifier(solver="lbfgs", max_iter=3, random_state=0).fit(Xtr, ytr)
    assert clf.n_iter_ == 3


def test_lbfgs_tol_is_the_gradient_tolerance():
    Xtr, _, ytr, _ = _digits()
    loose = MLPClassifier(solver="lbfgs", tol=1e-1, random_state=0).fit(Xtr[:300], ytr[:300])
    tight = MLPClassifier(solver="lbfgs", tol=1e-6, random_state=0).fit(Xtr[:300], ytr[:300])
    assert loose.n_iter_ < tight.n_iter_


def test_lbfgs_has_no_partial_fit():
    Xtr, _, ytr, _ = _digits()
    clf = MLPClassifier(solver="lbfgs")
    assert not hasattr(clf, "partial_fit")  # as scikit-learn's MLP with lbfgs
    with pytest.raises(AttributeError, match="partial_fit"):
        clf.partial_fit(Xtr, ytr, classes=np.arange(10))
    assert hasattr(MLPClassifier(), "partial_fit")


def test_trainer_with_lbfgs_full_batch_decreases_the_regularised_loss():
    Xtr, _, ytr, _ = _digits()
    X = (Xtr / 16).astype(np.float32)
    model = MLP(64, (16,), 10, seed=0)
    kwargs = dict(max_iter=10, history_size=5, line_search_fn="strong_wolfe")
    trainer = fo.Trainer(
        model, fo.LBFGS, lr=1.0, weight_decay=1e-3, optimizer_kwargs=kwargs, batch_size=len(X),
        epochs=3, progress=False, verbose=0,
    )  # fmt: skip
    history = trainer.fit(X, ytr)
    assert history["loss"][-1] < history["loss"][0] * 0.2
    assert trainer.optimizer.state[0]["n_iter"] == 30


def test_trainer_refuses_lbfgs_with_clipping():
    model = MLP(4, (3,), 2, seed=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        fo.Trainer(model, fo.LBFGS, max_grad_norm=1.0)


def test_cli_train_with_lbfgs(tmp_path, capsys):
    from fastopt.cli import main

    out = tmp_path / "run"
    args = ["train", "digits", "--optimizer", "lbfgs:lr=1,history_size=10,max_iter=5"]
    assert main([*args, "--epochs", "2", "--batch-size", "512", "--out", str(out)]) == 0
    ckpt = fo.checkpoint.load(out / "model.ckpt")
    assert ckpt.algorithm == "LBFGS"
    assert len(ckpt.optimizer_state["state"][0]["old_dirs"]) == 10  # the history is saved
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    test_acc = [float(r[2]) for r in rows if len(r) == 3 and r[0] == "test"]
    assert test_acc and test_acc[0] >= 0.95


def test_cli_train_refuses_playground_methods(capsys):
    from fastopt.cli import main

    assert main(["train", "digits", "--optimizer", "newton", "--epochs", "1"]) != 0
    assert "playground method" in capsys.readouterr().err
