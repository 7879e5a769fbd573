"""scikit-learn estimators on :class:`fastopt.nn.MLP`: :class:`MLPClassifier`, :class:`MLPRegressor`.

::

    from fastopt.sklearn import MLPClassifier
    clf = MLPClassifier(random_state=0).fit(X_train, y_train)     # scikit-learn's defaults
    clf = MLPClassifier.tuned(random_state=0).fit(X_train, y_train)  # fastopt's tuned settings
    clf.predict(X_test); clf.predict_proba(X_test); clf.score(X_test, y_test)

They follow the argument names of ``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor``
where the two share a meaning (``hidden_layer_sizes``, ``activation``, ``solver``, ``alpha``,
``batch_size``, ``learning_rate_init``, ``max_iter``, ``tol``, ``early_stopping``,
``validation_fraction``, ``n_iter_no_change``, ``shuffle``, ``random_state``, ``verbose``) and
add fastopt's: any fastopt optimizer as ``solver``, ``batch_norm``, ``dropout``, ``init``,
``label_smoothing``, ``loss`` (regression: mse, l1, huber), ``standardize`` (inputs, fitted on
the training data) and ``dtype``. ``alpha`` is the L2 coefficient (the optimizer's
``weight_decay``, on the weights only, applied to the mean loss). The regressor trains on
standardized targets (``standardize_targets``) and maps predictions back.

Defaults are scikit-learn's, so that a drop-in replacement trains the same network:
``hidden_layer_sizes=(100,)``, ``alpha=1e-4``, ``batch_size="auto"`` = min(200, n_samples),
no label smoothing. fastopt's own additions default to off, except ``standardize=True``
(scikit-learn leaves the scaling to the caller). The settings tuned on digits (98.7 % test
accuracy; see the README) are :data:`TUNED_CLASSIFIER` / :data:`TUNED_REGRESSOR`, also
``MLPClassifier.tuned(**overrides)`` and ``MLPRegressor.tuned(**overrides)``:
``hidden_layer_sizes=(512,)``, ``alpha=1e-3``, ``batch_size=64`` and, for the classifier,
``label_smoothing=0.1``.

``solver="lbfgs"`` (:class:`fastopt.optim.LBFGS`), as scikit-learn's: full-batch, one
``step()`` of at most ``max_iter`` L-BFGS iterations and 15000 loss evaluations (``max_fun``),
stopping when ``max |grad| <= tol``; ``n_iter_`` counts the iterations, ``learning_rate_init``,
``batch_size``, ``shuffle`` and ``early_stopping`` do not apply and there is no ``partial_fit``.
The algorithm is torch's L-BFGS (strong-Wolfe line search, 10 curvature pairs, its
``tolerance_change=1e-9`` on loss and step), not scipy's L-BFGS-B that scikit-learn calls
(``gtol=tol``, relative ``ftol``, a More-Thuente line search), so the iterates differ; the L2 term
``alpha/2 |W|^2`` is part of the objective.

Stopping (solvers other than lbfgs) follows scikit-learn's ``MLPClassifier`` / ``MLPRegressor``
exactly (``_update_no_improvement_count`` and the test after it in ``_fit_stochastic``,
sklearn/neural_network/_multilayer_perceptron.py; the rule is
:class:`fastopt.trainer.early_stopping.SklearnStopping`, not the Trainer's Keras-like
``patience``). After every epoch a value is compared with the best so far:

- ``early_stopping=False``: the epoch's training loss; ``loss > best_loss_ - tol`` adds one
  to a count of epochs without improvement, anything else resets it to 0; a loss strictly
  below ``best_loss_`` becomes ``best_loss_``.
- ``early_stopping=True``: the validation score on a held-out ``validation_fraction`` (at
  least 2 samples; stratified for the classifier), the ACCURACY for the classifier and R^2
  for the regressor, as ``score()`` computes them (not the validation loss);
  ``score < best_validation_score_ + tol`` adds one to the count, anything else resets it; a
  score strictly above ``best_validation_score_`` becomes the best and its weights are kept.
  The scores are ``validation_scores_``; ``best_loss_`` is None, as in scikit-learn.

Training stops when the count exceeds ``n_iter_no_change``, i.e. after ``n_iter_no_change + 1``
epochs in a row that did not beat the best by at least ``tol`` (the best they are compared
with moves with every strictly better value, also one better by less than ``tol``; with
``tol=0`` a tie resets the count), or after ``max_iter`` epochs (with a ConvergenceWarning).
With ``early_stopping`` the weights of the best-scoring epoch are then put back (also after
``max_iter`` epochs; the initial weights if no score was ever a best, e.g. all NaN). A NaN
value resets the count and is never a best, as in scikit-learn. ``n_iter_`` counts the epochs
run by the last call, including those after the best one (1 after a ``partial_fit``), while
``loss_curve_`` and ``t_`` go on over ``warm_start`` fits and ``partial_fit`` calls, as in
scikit-learn. A ``warm_start`` fit continues the count, best and
``validation_scores_`` of the fit (or ``partial_fit`` calls) before it, as scikit-learn does;
like scikit-learn's (whose kept weights are the arrays that training then updates in place), it
ends with its last weights unless it finds a new best. Unlike scikit-learn, a
diverging loss (NaN or infinite) stops training with the last finite weights (see
:class:`~fastopt.trainer.Trainer`). ``loss_curve_`` is the mean training loss of each epoch
without the ``alpha`` L2 term (scikit-learn's includes it), so the same ``tol`` can stop at
another epoch than scikit-learn's would on the same weights.

``partial_fit`` runs one epoch on all of its data (a ``fit``'s ``early_stopping`` does not apply
to it; scikit-learn refuses ``partial_fit`` with ``early_stopping=True``), continuing the
optimizer's state, the epoch count and ``loss_curve_`` of the earlier calls, also after
pickling; its training loss updates the count and ``best_loss_`` (it never stops). The input
standardization is fitted on the data of its first call. ``t_`` counts the training samples
seen, as scikit-learn's.

scikit-learn is an optional dependency (``pip install fastopt[sklearn]``); importing this module
without it raises an ImportError saying so.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.utils.metaestimators import available_if
    from sklearn.utils.multiclass import check_classification_targets, unique_labels
    from sklearn.utils.validation import check_is_fitted, check_random_state, column_or_1d
except ImportError as exc:  # pragma: no cover - exercised without scikit-learn
    raise ImportError(
        "fastopt.sklearn needs scikit-learn: pip install 'fastopt[sklearn]' (scikit-learn>=1.3)"
    ) from exc

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn

    def _validate_data(estimator, X="no_validation", y="no_validation", **kw):
        return estimator._validate_data(X, y, **kw)


from .nn import ACTIVATIONS, LOSSES, MLP
from .optim import OPTIMIZERS, Optimizer
from .trainer import History, Trainer
from .trainer.data import split as _validation_split
from .trainer.early_stopping import SklearnStopping

__all__ = ["TUNED_CLASSIFIER", "TUNED_REGRESSOR", "MLPClassifier", "MLPRegressor"]

_SOLVER_DEFAULTS = {"sgd": {"momentum": 0.9, "nesterov": True}}
"""Optimizer arguments scikit-learn's solvers imply (its sgd: momentum 0.9, Nesterov)."""

AUTO_BATCH = 200
"""``batch_size="auto"`` is min(AUTO_BATCH, n_samples), as in scikit-learn."""

REGRESSION_LOSSES = tuple(name for name, loss in LOSSES.items() if not loss.classification)

_PARAMS = (
    # (name, default, estimators that take it: c classifier, r regressor); scikit-learn's
    # defaults where scikit-learn has the parameter. The order is the signature's.
    ("hidden_layer_sizes", (100,), "cr"),
    ("activation", "relu", "cr"),
    ("loss", "mse", "r"),
    ("huber_delta", 1.0, "r"),
    ("solver", "adam", "cr"),
    ("alpha", 1e-4, "cr"),
    ("batch_size", "auto", "cr"),
    ("learning_rate_init", 1e-3, "cr"),
    ("max_iter", 200, "cr"),
    ("tol", 1e-4, "cr"),
    ("n_iter_no_change", 10, "cr"),
    ("early_stopping", False, "cr"),
    ("validation_fraction", 0.1, "cr"),
    ("shuffle", True, "cr"),
    ("random_state", None, "cr"),
    ("batch_norm", False, "cr"),
    ("dropout", 0.0, "cr"),
    ("init", "auto", "cr"),
    ("label_smoothing", 0.0, "c"),
    ("standardize", True, "cr"),
    ("standardize_targets", True, "r"),
    ("dtype", "float32", "cr"),
    ("verbose", False, "cr"),
    ("warm_start", False, "cr"),
)
_POSITIONAL = ("hidden_layer_sizes", "activation")

TUNED_REGRESSOR = {"hidden_layer_sizes": (512,), "alpha": 1e-3, "batch_size": 64}
"""fastopt's tuned settings (a wider layer, stronger L2, smaller batches)."""
TUNED_CLASSIFIER = {**TUNED_REGRESSOR, "label_smoothing": 0.1}
"""The tuned settings plus label smoothing: 98.7 % on digits (README, bench/test_bench_mlp.py)."""


def _estimator_init(kind):
    """The ``__init__`` of the estimator ``kind`` ("c" or "r"): it takes the parameters of
    :data:`_PARAMS` marked ``kind`` and stores each unchanged as an attribute, as scikit-learn
    requires of an estimator (``get_params`` and ``clone`` read the signature)."""
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)]
    for name, default, kinds in _PARAMS:
        if kind in kinds:
            how = P.POSITIONAL_OR_KEYWORD if name in _POSITIONAL else P.KEYWORD_ONLY
            params.append(P(name, how, default=default))
    signature = inspect.Signature(params)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name, value in list(bound.arguments.items())[1:]:
            setattr(self, name, value)

    __init__.__signature__ = signature
    return __init__


LBFGS_MAX_FUN = 15000
"""Closure evaluations allowed to one ``fit`` with ``solver="lbfgs"``: scikit-learn's ``max_fun``
default."""


def _lbfgs_kwargs(max_iter, tol):
    """LBFGS settings of ``solver="lbfgs"``: ``max_iter`` L-BFGS iterations, at most
    :data:`LBFGS_MAX_FUN` evaluations, stop when ``max |grad| <= tol`` (scikit-learn passes
    ``gtol=tol`` to scipy), 10 curvature pairs (scipy's ``maxcor``), strong-Wolfe line search."""
    return {
        "max_iter": max_iter,
        "max_eval": max(LBFGS_MAX_FUN, max_iter),
        "tolerance_grad": tol,
        "history_size": 10,
        "line_search_fn": "strong_wolfe",
    }


def _stochastic_solver(estimator):
    """``partial_fit`` exists for minibatch solvers only, as in scikit-learn (not for lbfgs)."""
    if _optimizer_class(estimator.solver).requires_closure:
        raise AttributeError(
            f"partial_fit is only available for stochastic solvers; solver={estimator.solver!r} "
            "is full-batch (as scikit-learn's lbfgs)"
        )
    return True


_INPUT_ATTRS = ("n_features_in_", "feature_names_in_")
"""What scikit-learn's input validation sets on a first fit."""


def _carried(trainer, optimizer=True):
    """What a later ``partial_fit`` continues from ``trainer``, in picklable form (the Trainer is
    not: its optimizer holds views of the model's buffer): the optimizer's ``state_dict()``
    (None without ``optimizer`` or for a closure optimizer, which has no ``partial_fit``), the
    epoch and step counts, the history and the dropout generator."""
    opt = trainer.optimizer
    return {
        "optimizer": opt.state_dict() if optimizer and not opt.requires_closure else None,
        "epoch": trainer.epoch,
        "global_step": trainer.global_step,
        "history": trainer.history,
        "rng": trainer.rng,
    }


def _continue(trainer, prev):
    """Make the new ``trainer`` continue ``prev``: a Trainer, or :func:`_carried` of one (an
    unpickled estimator's). The optimizer's state carries over when the optimizer is of the
    same kind (a changed ``solver`` starts afresh); the counters, history and dropout generator
    always do."""
    if isinstance(prev, Trainer):
        if type(prev.optimizer) is type(trainer.optimizer):
            trainer.optimizer, trainer._grads = prev.optimizer, prev._grads
        prev = _carried(prev, optimizer=False)
    sd = prev["optimizer"]
    if sd is not None and sd.get("algorithm") == type(trainer.optimizer).__name__:
        try:
            trainer.optimizer.load_state_dict(sd)
        except ValueError:
            # other parameter groups (``alpha`` changed from or to 0 since): a fresh state;
            # load_state_dict changes nothing before its checks pass
            pass
    trainer.epoch, trainer.global_step = prev["epoch"], prev["global_step"]
    trainer.history, trainer.rng = prev["history"], prev["rng"]


def _optimizer_class(solver):
    if isinstance(solver, type) and issubclass(solver, Optimizer):
        return solver
    cls = OPTIMIZERS.get(str(solver).lower())
    if cls is None:
        raise ValueError(f"unknown solver {solver!r}; known: {sorted(OPTIMIZERS)}")
    return cls


def _float64(model):
    """``model`` for inference in float64: itself, or a float64 copy of a float32 one. A
    float32 matrix product rounds differently for different batch shapes; float64 makes
    predictions independent of how the samples are batched (to ~1e-16)."""
    return model if model.dtype == np.float64 else model.astype(np.float64)


class _StoppingCallback:
    """The Trainer callback of a stochastic ``fit``: scikit-learn's stopping rule
    (:class:`~fastopt.trainer.early_stopping.SklearnStopping` ``rule``) after every epoch, on
    ``score(model)`` (the validation score, ``early_stopping=True``) or on the epoch's training
    loss (``score`` None). It stops training when the rule says so and records the run in
    ``history.meta`` (``monitor``, ``best_epoch``, ``best``, ``stopped_early``...)."""

    def __init__(self, rule, score, monitor, verbose):
        self.rule, self.score, self.monitor, self.verbose = rule, score, monitor, verbose
        self.stopped = False

    def __call__(self, trainer, epoch, logs):
        model = trainer.model
        if self.score is None:
            value = float(logs["loss"])
        else:
            value = float(self.score(model))
            if self.verbose:
                print(f"Validation score: {value:f}", flush=True)  # as scikit-learn's
        rule = self.rule
        rule.update(value, epoch, model)
        meta = trainer.history.meta
        meta.update(monitor=self.monitor, best_epoch=rule.best_epoch, best=rule.best)
        if not rule.should_stop():
            return False
        self.stopped = True
        meta.update(stopped_early=True, stopped_epoch=epoch)
        if "stop_reason" not in meta:  # not a divergence at the same epoch
            meta.update(stop_reason="early_stopping", stop_epoch=epoch)
        return True

    def restore_best(self, trainer, start):
        """After the fit (``start``: its first epoch), with early stopping: put the best
        weights back (also when training ran to ``max_iter``), as scikit-learn does."""
        rule = self.rule
        state, rule.best_state = rule.best_state, None  # the estimator keeps no extra copy
        if self.score is None or state is None or rule.best_epoch == trainer.epoch:
            return
        trainer.model.load_state_dict(state)
        trainer.history.meta["restored_epoch"] = (
            start if rule.best_epoch is None else rule.best_epoch
        )


class _BaseMLP(BaseEstimator):
    _loss = "cross_entropy"
    TUNED = {}

    @classmethod
    def tuned(cls, **overrides):
        """An estimator with fastopt's tuned settings (``cls.TUNED``), ``overrides`` on top."""
        return cls(**{**cls.TUNED, **overrides})

    # ------------------------------------------------------------------ hooks
    def _encode_targets(self, y, first, classes=None):
        """(y encoded for the model, the target attributes a first fit sets, as a dict: empty
        unless ``first``), y checked against them; sets nothing."""
        raise NotImplementedError

    def _n_outputs(self, targets):
        """The model's number of outputs for the target attributes ``targets``."""
        raise NotImplementedError

    def _loss_name(self):
        return self._loss

    def _model_kwargs(self):
        return {}

    # ------------------------------------------------------------------ validation
    def _check_params(self):
        if not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1, got {self.max_iter!r}")
        if not isinstance(self.n_iter_no_change, numbers.Integral) or self.n_iter_no_change < 1:
            raise ValueError(f"n_iter_no_change must be an int >= 1, got {self.n_iter_no_change!r}")
        if not (isinstance(self.tol, numbers.Real) and self.tol >= 0):
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")
        if not (isinstance(self.alpha, numbers.Real) and self.alpha >= 0):
            raise ValueError(f"alpha must be a number >= 0, got {self.alpha!r}")
        if not (isinstance(self.learning_rate_init, numbers.Real) and self.learning_rate_init > 0):
            raise ValueError(
                f"learning_rate_init must be a number > 0, got {self.learning_rate_init!r}"
            )
        if self.early_stopping and not 0 < self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}"
            )
        if self.batch_size != "auto" and (
            not isinstance(self.batch_size, numbers.Integral) or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be 'auto' or an int >= 1, got {self.batch_size!r}")
        _optimizer_class(self.solver)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}"
            )
        self._hidden()
        self._loss_name()

    def _hidden(self):
        h = self.hidden_layer_sizes
        if isinstance(h, numbers.Integral):
            h = (h,)
        h = tuple(h)
        if not all(isinstance(v, numbers.Integral) and v >= 1 for v in h):
            raise ValueError(f"hidden_layer_sizes must hold positive ints, got {h!r}")
        return h

    def _batch_size(self, n):
        if self.batch_size == "auto":
            return min(AUTO_BATCH, n)
        if self.batch_size > n:
            warnings.warn(
                f"batch_size={self.batch_size} > {n} samples: using {n}",
                UserWarning,
                stacklevel=3,
            )
        return min(int(self.batch_size), n)

    # ------------------------------------------------------------------ building
    def _seeds(self):
        rs = check_random_state(self.random_state)
        return int(rs.randint(2**31 - 1)), int(rs.randint(2**31 - 1))

    def _checked_data(self, X, y, reset):
        """(X, y) checked and converted for training and, with ``reset``, the input attributes
        they give (``n_features_in_``, ``feature_names_in_``) as a dict, else None. Sets
        nothing on the estimator: a later check that fails leaves it as it was."""
        probe = clone(self) if reset else self  # validation with reset sets the attributes
        X, y = _validate_data(
            probe, X, y, dtype=[np.float64, np.float32], order="C", reset=reset, **self._xy_kwargs()
        )
        inputs = {k: getattr(probe, k) for k in _INPUT_ATTRS if hasattr(probe, k)}
        return X, y, inputs if reset else None

    def _build(self, X, n_outputs):
        """(a new model for X, with its input standardization fitted, the trainer's seed); the
        model's constructor checks the parameters it takes."""
        model_seed, trainer_seed = self._seeds()
        model = MLP(
            X.shape[1],
            self._hidden(),
            n_outputs,
            activation=self.activation,
            loss=self._loss_name(),
            init=self.init,
            batch_norm=self.batch_norm,
            dropout=self.dropout,
            dtype=self.dtype,
            seed=model_seed,
            **self._model_kwargs(),
        )
        if self.standardize:
            model.fit_standardizer(X)
        return model, trainer_seed

    def _make_trainer(self, model, seed, n, *, epochs, partial):
        """A Trainer of ``model`` for ``n`` samples: ``fit``'s, or with ``partial`` the one
        epoch of ``partial_fit`` on all the samples (no validation split, no patience)."""
        cls = _optimizer_class(self.solver)
        kwargs = dict(_SOLVER_DEFAULTS.get(cls.__name__.lower(), {}))
        full_batch = cls.requires_closure  # lbfgs: one full-batch step() of max_iter iterations
        if full_batch:
            kwargs = {**_lbfgs_kwargs(self.max_iter, self.tol), **kwargs}
        early = self.early_stopping and not partial and not full_batch
        return Trainer(
            model,
            cls,
            lr=1.0 if full_batch else self.learning_rate_init,
            weight_decay=self.alpha,
            optimizer_kwargs=kwargs,
            batch_size=n if full_batch else self._batch_size(n),
            epochs=epochs,
            shuffle=bool(self.shuffle) and not full_batch,
            validation_split=self.validation_fraction if early else 0.0,
            # no Trainer early stopping (Keras's rule): ``fit`` runs scikit-learn's
            # (:class:`_StoppingCallback`) and restores the best weights itself
            patience=None,
            restore_best_weights=False,
            progress=bool(self.verbose) and None,
            verbose=int(bool(self.verbose)),
            seed=seed,
            drop_last=False,
        )

    def _partial_trainer(self, n):
        """The current trainer when ``partial_fit`` can run its epoch with it as it is (one
        built by an earlier ``partial_fit`` for this solver and batch size), else a new partial
        trainer continuing it (see :func:`_continue`)."""
        prev = self._trainer
        if (
            isinstance(prev, Trainer)
            and not prev.validation_split
            and prev.patience is None
            and type(prev.optimizer) is _optimizer_class(self.solver)
            and prev.batch_size == self._batch_size(n)
        ):
            return prev
        trainer = self._make_trainer(self.model_, self._trainer_seed, n, epochs=1, partial=True)
        if prev is not None:
            _continue(trainer, prev)
        return trainer

    def _commit(self, inputs, targets, model, seed, trainer):
        """Set the state of a fit that succeeded: the input attributes (``inputs``, None to keep
        them), the target attributes, the model and its trainer."""
        if inputs is not None:
            for name in _INPUT_ATTRS:
                if name in inputs:
                    setattr(self, name, inputs[name])
                else:
                    self.__dict__.pop(name, None)
        for name, value in targets.items():
            setattr(self, name, value)
        self.model_ = model
        self._trainer_seed = seed
        self._trainer = trainer

    # ------------------------------------------------------------------ fit
    def fit(self, X, y):
        """Train from scratch (or, with ``warm_start``, from the current weights) for at most
        ``max_iter`` epochs. Everything is checked before anything is set: a fit that raises
        on bad input leaves the estimator as it was."""
        self._check_params()
        warm = self.warm_start and hasattr(self, "model_")
        X, y, inputs = self._checked_data(X, y, reset=not warm)
        t, targets = self._encode_targets(y, first=not warm)
        if warm:
            model, seed = self.model_, self._trainer_seed
        else:
            model, seed = self._build(X, self._n_outputs(targets))
        trainer = self._make_trainer(model, seed, X.shape[0], epochs=self.max_iter, partial=False)
        seen = 0
        if warm and getattr(self, "history_", None) is not None:  # epochs keep counting
            trainer.history = History(
                {k: list(v) for k, v in self.history_.items()}, meta=self.history_.meta
            )
            trainer.epoch = len(self.history_.get("loss", []))
            seen = getattr(self, "t_", 0)
        start = trainer.epoch
        full_batch = trainer.optimizer.requires_closure
        callback = None
        if not full_batch:
            early = bool(self.early_stopping)
            score = None
            if early:
                # the Trainer's own split (same rows: same targets, fraction and seed)
                _, val_rows = _validation_split(
                    t, X.shape[0], trainer.validation_split, trainer.seed
                )
                if val_rows.size < 2:  # as scikit-learn: a score needs 2 samples
                    raise ValueError(
                        f"The validation set is too small ({val_rows.size} sample of "
                        f"{X.shape[0]}): increase validation_fraction or the size of the data"
                    )
                score = self._validation_scorer(X[val_rows], y[val_rows], t[val_rows], targets)
            stopping = self._stopping_rule(early, warm, model)
            callback = _StoppingCallback(stopping, score, self._monitor_name(early), self.verbose)
            for key in ("stopped_early", "stopped_epoch", "restored_epoch"):
                trainer.history.meta.pop(key, None)  # of an earlier (warm-started) fit
            trainer.callbacks.append(callback)
        # a fresh model trains unseen by the estimator: the Trainer's own checks of the data
        # run before the first epoch and leave it as it was
        try:
            trainer.fit(X, t, epochs=start + (1 if full_batch else self.max_iter))
        finally:
            if callback is not None:  # a later partial_fit may train on with this trainer
                trainer.callbacks.remove(callback)
        if callback is not None:
            callback.restore_best(trainer, start)
        self._commit(inputs, targets, model, seed, trainer)
        self._record(start, seen, None if callback is None else callback.rule)
        if full_batch:
            self.n_iter_ = trainer.optimizer.state[0]["n_iter"] if trainer.optimizer.state else 0
            if self.n_iter_ >= self.max_iter:
                warnings.warn(
                    f"lbfgs failed to converge after {self.max_iter} iteration(s) "
                    "(max_iter reached)",
                    ConvergenceWarning,
                    stacklevel=2,
                )
        elif not callback.stopped and trainer.epoch >= start + self.max_iter:
            warnings.warn(
                f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                "optimization hasn't converged yet.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def _stopping_rule(self, early, warm, model):
        """The :class:`~fastopt.trainer.early_stopping.SklearnStopping` of a stochastic fit
        (``early``: on the validation score, else on the training loss). A ``warm`` fit
        continues the last one of the same kind, as scikit-learn keeps its
        ``_no_improvement_count``, ``best_loss_`` / ``best_validation_score_`` and
        ``validation_scores_`` over ``warm_start`` fits and ``partial_fit`` calls; a new one
        holds the initial weights as its best (scikit-learn's ``_best_coefs`` at first)."""
        mode = "max" if early else "min"
        prev = getattr(self, "_stopping", None) if warm else None
        if prev is not None and prev.mode == mode:
            return prev.continued(self.n_iter_no_change, self.tol, keep_best=early)
        rule = SklearnStopping(self.n_iter_no_change, self.tol, mode, keep_best=early)
        if early:
            rule.best_state = model.state_dict()
        return rule

    def _monitor_name(self, early):
        return self._score_name if early else "loss"

    def _partial_fit(self, X, y, classes=None):
        """One epoch on all of (X, y), continuing the optimizer's state, the epoch count and
        the loss curve of the earlier calls (a ``fit`` with ``early_stopping`` included: its
        validation split and patience do not apply here). The training loss goes into the
        stopping rule's count and ``best_loss_`` as in scikit-learn (which never stops a
        ``partial_fit``)."""
        self._check_params()
        first = not hasattr(self, "model_")
        X, y, inputs = self._checked_data(X, y, reset=first)
        t, targets = self._encode_targets(y, first=first, classes=classes)
        if first:
            model, seed = self._build(X, self._n_outputs(targets))
            trainer = self._make_trainer(model, seed, X.shape[0], epochs=1, partial=True)
        else:
            model, seed = self.model_, self._trainer_seed
            trainer = self._partial_trainer(X.shape[0])
        start, seen = trainer.epoch, 0 if first else getattr(self, "t_", 0)
        trainer.fit(X, t, epochs=start + 1)
        stopping = self._stopping_rule(False, not first, model)
        for epoch, loss in enumerate(trainer.history["loss"][start:], start + 1):
            stopping.update(loss, epoch)
        self._commit(inputs, targets, model, seed, trainer)
        self._record(start, seen, stopping)
        return self

    def _record(self, start, seen, stopping):
        """Set the fitted attributes from the trainer, which ran from epoch ``start`` on;
        ``seen``: the samples seen before (``t_`` counts the training samples of every epoch,
        as scikit-learn's); ``stopping``: the stochastic solvers' stopping rule (None for
        lbfgs). As in scikit-learn, ``best_loss_`` is the best training loss without early
        stopping and None with it; ``validation_scores_`` and ``best_validation_score_``
        are the validation scores and their best with early stopping, None without."""
        trainer = self._trainer
        history = trainer.history
        self.history_ = history
        self.n_iter_ = len(history.get("loss", [])) - start  # this call's epochs, as scikit-learn
        self.loss_curve_ = list(history.get("loss", []))
        self.loss_ = self.loss_curve_[-1] if self.loss_curve_ else float("nan")
        if "val_loss" in history:
            self.validation_loss_curve_ = list(history["val_loss"])
        self.validation_scores_ = self.best_validation_score_ = None
        if stopping is None:
            self.best_loss_ = min(self.loss_curve_) if self.loss_curve_ else float("nan")
        elif stopping.mode == "max":
            self.best_loss_ = None
            self.validation_scores_ = list(stopping.values)
            self.best_validation_score_ = stopping.best
        else:
            self.best_loss_ = stopping.best
        self._stopping = stopping
        self.t_ = seen + (trainer.epoch - start) * history.meta["n_train"]

    # ------------------------------------------------------------------ inspection
    @property
    def coefs_(self):
        """Weight matrices (fan_in, fan_out), layer by layer (copies)."""
        check_is_fitted(self, "model_")
        return [w.copy() for w in self.model_.weights]

    @property
    def intercepts_(self):
        """Bias vectors, layer by layer (copies; batch-norm layers report their shift)."""
        check_is_fitted(self, "model_")
        m = self.model_
        out = []
        for l, b in enumerate(m.biases):
            out.append(b.copy() if b is not None else m.params[f"layers.{l}.bn.bias"].copy())
        return out

    def _outputs(self, X):
        check_is_fitted(self, "model_")
        X = _validate_data(self, X, dtype=[np.float64, np.float32], order="C", reset=False)
        return _float64(self.model_).predict(X)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        if isinstance(state.get("_trainer"), Trainer):  # partial_fit continues from it
            state["_trainer"] = _carried(state["_trainer"])
        return state

    def __setstate__(self, state):
        if hasattr(super(), "__setstate__"):
            super().__setstate__(state)
        else:  # pragma: no cover
            self.__dict__.update(state)
        self.__dict__.setdefault("_trainer", None)  # pickled before the trainer state was kept

    def _more_tags(self):  # scikit-learn < 1.6
        return {"multioutput": self._multioutput}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = self._multioutput
        tags.target_tags.single_output = True
        tags.input_tags.allow_nan = False
        return tags


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multilayer-perceptron classifier: softmax output, cross-entropy loss (with
    ``label_smoothing``), trained by :class:`fastopt.trainer.Trainer` with any fastopt optimizer.
    Classes are any labels scikit-learn accepts (``classes_``); y must be 1-D."""

    _multioutput = False
    TUNED = TUNED_CLASSIFIER
    __init__ = _estimator_init("c")

    def _xy_kwargs(self):
        return {}

    def _model_kwargs(self):
        return {"label_smoothing": self.label_smoothing}

    def _n_outputs(self, targets):
        return max(2, len(targets["classes_"]))

    _score_name = "val_accuracy"

    def _validation_scorer(self, X, y, t, targets):
        """``score(model)``: early stopping's validation score on (X, y), encoded ``t``: the
        accuracy of the model's predictions, as scikit-learn's (``_score`` with
        ``accuracy_score``)."""

        def score(model):
            return accuracy_score(t, np.argmax(_float64(model).predict(X), axis=1))

        return score

    def _encode_targets(self, y, first, classes=None):
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if first:
            if classes is not None:
                known = unique_labels(classes)
                unknown = np.setdiff1d(unique_labels(y), known)
                if unknown.size:
                    raise ValueError(f"y holds labels {unknown.tolist()} not in classes={known}")
            else:
                known = unique_labels(y)
            if len(known) < 2:
                raise ValueError(
                    "MLPClassifier needs samples of at least 2 classes to train; "
                    f"y holds only one class ({known[0]!r})"
                )
            targets = {"classes_": known}
        else:
            known, targets = self.classes_, {}
            unknown = np.setdiff1d(unique_labels(y), known)
            if unknown.size:
                raise ValueError(
                    f"y holds labels {unknown.tolist()} unseen in the first fit; "
                    f"known classes: {known.tolist()}"
                )
        return np.searchsorted(known, y).astype(np.int64), targets

    def fit(self, X, y):
        """Fit the classifier on (X, y)."""
        return super().fit(X, y)

    @available_if(_stochastic_solver)
    def partial_fit(self, X, y, classes=None):
        """One epoch over (X, y). ``classes`` (every label that will ever appear) is required
        on the first call unless y of that call holds them all."""
        if not hasattr(self, "model_") and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit")
        return self._partial_fit(X, y, classes=classes)

    def predict_proba(self, X):
        """Class probabilities, shape (n_samples, n_classes), columns ordered as ``classes_``."""
        return self._outputs(X)

    def predict_log_proba(self, X):
        return np.log(np.clip(self.predict_proba(X), np.finfo(np.float64).tiny, None))

    def predict(self, X):
        """The most probable class of each sample."""
        check_is_fitted(self, "model_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def score(self, X, y, sample_weight=None):
        """Accuracy on (X, y); a ValueError names labels of y never seen in fit."""
        check_is_fitted(self, "model_")
        known = set(self.classes_.tolist())
        unknown = [c for c in unique_labels(column_or_1d(y, warn=True)).tolist() if c not in known]
        if unknown:
            raise ValueError(
                f"y holds labels {unknown} unseen in fit; known classes: {self.classes_.tolist()}"
            )
        return super().score(X, y, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multilayer-perceptron regressor: identity output, ``loss`` "mse" (default), "l1" or
    "huber" (``huber_delta``, in standardized-target units), one or several targets."""

    _multioutput = True
    TUNED = TUNED_REGRESSOR
    __init__ = _estimator_init("r")

    def _xy_kwargs(self):
        return {"multi_output": True, "y_numeric": True}

    def _loss_name(self):
        if self.loss not in REGRESSION_LOSSES:
            raise ValueError(
                f"loss must be one of {', '.join(REGRESSION_LOSSES)}, got {self.loss!r}"
            )
        return self.loss

    def _model_kwargs(self):
        return {"huber_delta": self.huber_delta}

    def _n_outputs(self, targets):
        return targets["n_outputs_"]

    _score_name = "val_r2"

    def _validation_scorer(self, X, y, t, targets):
        """``score(model)``: early stopping's validation score on (X, y): the R^2 of the
        model's predictions (as :meth:`predict` makes them), as scikit-learn's (``_score``
        with ``r2_score``; NaN when a prediction is not finite)."""
        scale = {k: getattr(self, k, None) for k in ("_y_mean", "_y_std", "_y_1d")}
        scale.update({k: targets[k] for k in scale if k in targets})
        mean, std, y_1d = scale["_y_mean"], scale["_y_std"], scale["_y_1d"]

        def score(model):
            out = _float64(model).predict(X) * std + mean
            if not np.isfinite(out).all():
                return math.nan
            return r2_score(y, out[:, 0] if y_1d else out)

        return score

    def _encode_targets(self, y, first, classes=None):
        y = np.asarray(y, dtype=np.float64)
        y2 = y.reshape(-1, 1) if y.ndim == 1 else y
        if first:
            if self.standardize_targets:
                mean = y2.mean(axis=0)
                std = y2.std(axis=0)
                std[std <= 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
            else:
                mean, std = np.zeros(y2.shape[1]), np.ones(y2.shape[1])
            targets = {
                "n_outputs_": y2.shape[1],
                "_y_1d": y.ndim == 1,
                "_y_mean": mean,
                "_y_std": std,
            }
        else:
            if y2.shape[1] != self.n_outputs_:
                raise ValueError(
                    f"y has {y2.shape[1]} targets, the model was fitted on {self.n_outputs_}"
                )
            mean, std, targets = self._y_mean, self._y_std, {}
        return (y2 - mean) / std, targets

    def fit(self, X, y):
        """Fit the regressor on (X, y); y of shape (n,) or (n, n_targets)."""
        return super().fit(X, y)

    @available_if(_stochastic_solver)
    def partial_fit(self, X, y):
        """One epoch over (X, y) (the target standardization is fitted on the first call)."""
        return self._partial_fit(X, y)

    def predict(self, X):
        """Predicted targets, shape (n,) or (n, n_targets) as y was in fit."""
        check_is_fitted(self, "model_")
        out = self._outputs(X) * self._y_std + self._y_mean
        return out[:, 0] if self._y_1d else out
