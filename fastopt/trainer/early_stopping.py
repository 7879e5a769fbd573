"""Which metric the Trainer watches, and early stopping on it (best epoch, patience, best weights);
:class:`SklearnStopping`, scikit-learn's MLP stopping rule, for :mod:`fastopt.sklearn`."""

import math

_MAXIMIZE = ("accuracy",)


def choose_monitor(monitor, has_val, is_classifier):
    """(metric name, ``"min"`` or ``"max"``): ``monitor``, or ``val_loss`` with validation data
    and ``loss`` without; ValueError for a metric this model does not log."""
    monitor = monitor or ("val_loss" if has_val else "loss")
    if monitor.startswith("val_") and not has_val:
        raise ValueError(f"monitor={monitor!r} needs validation data")
    base = monitor[4:] if monitor.startswith("val_") else monitor
    known = ["loss", "accuracy"] if is_classifier else ["loss", "mae", "rmse"]
    if base not in known:
        raise ValueError(
            f"unknown monitor {monitor!r}; this model logs {known} (and val_ versions)"
        )
    return monitor, ("max" if base in _MAXIMIZE else "min")


class EarlyStopping:
    """The best value of the monitored metric so far, its epoch, the epochs since
    (``wait``) and, with ``keep_best``, the model's state at the best epoch.

    An epoch improves when its value beats the best by more than ``min_delta`` (and is finite).
    :meth:`should_stop` once ``patience`` epochs passed without improvement (``patience`` None:
    never)."""

    def __init__(self, patience, min_delta, keep_best):
        self.patience = patience
        self.min_delta = min_delta
        self.keep_best = keep_best
        self.best = None
        self.best_epoch = None
        self.wait = 0
        self.best_state = None

    def update(self, value, mode, epoch, model):
        """Record epoch ``epoch``'s ``value``; returns whether it improved."""
        if self.best is None:
            improved = True
        elif mode == "min":
            improved = value < self.best - self.min_delta
        else:
            improved = value > self.best + self.min_delta
        if improved and math.isfinite(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.patience is not None and self.keep_best:
                self.best_state = model.state_dict()
            return True
        self.wait += 1
        return False

    def should_stop(self):
        return self.patience is not None and self.wait >= max(self.patience, 1)

    def restore_best(self, model, epoch):
        """Put the best epoch's state back into ``model`` unless ``epoch`` is the best one;
        returns the epoch restored, or None."""
        if self.patience is None or not self.keep_best or self.best_state is None:
            return None
        if self.best_epoch == epoch:
            return None
        model.load_state_dict(self.best_state)
        return self.best_epoch

    def state(self):
        """The JSON part of the state (for checkpoints; ``best_state`` is saved beside it)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load(self, state, best_state):
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")
        self.wait = int(state.get("wait", 0))
        self.best_state = best_state


class SklearnStopping:
    """scikit-learn's stopping rule of its MLPs, for :mod:`fastopt.sklearn` (the Trainer's own
    :class:`EarlyStopping` above is Keras's and stays so).

    It is ``BaseMultilayerPerceptron._update_no_improvement_count`` and the test that follows
    it in ``_fit_stochastic`` (sklearn/neural_network/_multilayer_perceptron.py, read in
    scikit-learn 1.9.1; earlier releases make the same comparisons), comparison for
    comparison. ``mode="max"`` (``early_stopping=True``: the validation score, best ``-inf``
    at first)::

        if score < best + tol: count += 1   else: count = 0
        if score > best: best = score            # and the weights are kept
        stop when count > n_iter_no_change

    ``mode="min"`` (the training loss, best ``+inf`` at first)::

        if loss > best - tol: count += 1    else: count = 0
        if loss < best: best = loss

    So training stops after ``n_iter_no_change + 1`` epochs in a row that do not beat the best
    so far by at least ``tol``; any strictly better value becomes the best (and with
    ``keep_best`` its weights are kept), even one that is better by less than ``tol``, which
    still counts as no improvement; the best it is compared with moves with it. With
    ``tol=0`` a tie resets the count but is not a new best. A NaN resets the count and never
    becomes the best (every comparison with NaN is false), as in scikit-learn.

    ``values``: every value seen; ``best_epoch``: the epoch of ``best`` (None before one);
    ``best_state``: the model's ``state_dict()`` at ``best_epoch`` (``keep_best``), or at the
    start for a new rule (scikit-learn restores the initial weights when no score ever was a
    best), or None: keep the current weights. :meth:`continued` (a ``warm_start`` refit)
    keeps the count, best and values and drops ``best_state``: scikit-learn's saved best
    weights are, after a fit, the very arrays that training goes on updating in place, so a
    refit without a new best ends with its last weights.
    """

    def __init__(self, n_iter_no_change, tol, mode, keep_best=False):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.mode = mode
        self.keep_best = keep_best
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch = None
        self.count = 0
        self.values = []
        self.best_state = None

    def continued(self, n_iter_no_change, tol, keep_best=False):
        """A copy for a refit that continues this one (``warm_start``), with the refit's
        settings; its ``best_state`` is None (see the class docstring)."""
        other = SklearnStopping(n_iter_no_change, tol, self.mode, keep_best)
        other.best, other.best_epoch, other.count = self.best, self.best_epoch, self.count
        other.values = list(self.values)
        return other

    def update(self, value, epoch=None, model=None):
        """Record epoch ``epoch``'s ``value``; returns whether it is a new best (then, with
        ``keep_best``, ``model.state_dict()`` is kept)."""
        self.values.append(value)
        if self.mode == "max":
            no_improvement = value < self.best + self.tol
            better = value > self.best
        else:
            no_improvement = value > self.best - self.tol
            better = value < self.best
        self.count = self.count + 1 if no_improvement else 0
        if better:
            self.best, self.best_epoch = value, epoch
            if self.keep_best and model is not None:
                self.best_state = model.state_dict()
        return bool(better)

    def should_stop(self):
        return self.count > self.n_iter_no_change
