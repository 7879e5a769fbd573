"""Which metric the Trainer watches, and early stopping on it (best epoch, patience, best weights)."""

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
