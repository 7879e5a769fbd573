"""ReduceLROnPlateau: reduce the learning rate when a metric has stopped improving (torch's
``torch.optim.lr_scheduler.ReduceLROnPlateau``, plus schedules as param-group lrs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..validation import check_choice, check_int, check_real
from .combinators import Scaled

__all__ = ["ReduceLROnPlateau"]


def _enc_float(x: float) -> float | str:
    """Strict-JSON float: non-finite values become the strings 'inf', '-inf', 'nan'."""
    x = float(x)
    return x if math.isfinite(x) else repr(x)


class ReduceLROnPlateau:
    """Reduce the learning rate when a metric has stopped improving.

    Same arguments and semantics as ``torch.optim.lr_scheduler.ReduceLROnPlateau``: call
    :meth:`step` with the monitored metric (typically once per epoch, after validation).  A metric
    better than ``best`` by more than ``threshold`` (relative: ``best·(1∓threshold)``, absolute:
    ``best∓threshold``) resets the bad-epoch count; after more than ``patience`` bad epochs every
    group's lr is multiplied by ``factor`` (floored at ``min_lr``), then ``cooldown`` epochs are
    ignored. Values torch takes but that have no meaning there are refused: a negative
    ``factor``, ``threshold``, ``patience``, ``cooldown``, ``eps`` or ``min_lr`` (ValueError), a
    non-integer ``patience`` or ``cooldown`` (TypeError); torch checks only ``factor < 1``.

    ``optimizer`` is anything with a ``param_groups`` list of dicts having an ``"lr"`` key.

    * A **float** lr is replaced exactly as torch does: ``new = max(old·factor, min_lr)``, applied
      only if ``old - new > eps``.
    * A **callable** lr (a schedule) is replaced by ``Scaled(schedule, factor, min_lr)``
      (successive reductions multiply the factor of one ``Scaled``), so decaying composes with the
      schedule.  ``min_lr`` bounds the *effective* value at every step:
      ``max(f·s(k), min(s(k), min_lr))`` — the reduction never takes the lr below ``min_lr`` and
      never raises it above the schedule's own value.  ``eps`` is not applied to schedules (the
      step count is not known here); the floor makes repeated reductions harmless.

    ``state_dict()`` holds plain strict-JSON values (non-finite floats as strings).
    """

    def __init__(
        self,
        optimizer: Any,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float | Sequence[float] = 0,
        eps: float = 1e-8,
    ) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list) or not all(
            isinstance(g, dict) and "lr" in g for g in groups
        ):
            raise TypeError(
                f"{type(optimizer).__name__} has no param_groups list of dicts with an 'lr' key"
            )
        self.optimizer = optimizer
        self.factor = check_real("factor", factor, lo=0.0, hi=1.0, hi_open=True)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != len(groups):
                raise ValueError(f"min_lr: expected {len(groups)} values, got {len(min_lr)}")
            self.default_min_lr: float | None = None
            self.min_lrs = [check_real(f"min_lr[{i}]", m, lo=0.0) for i, m in enumerate(min_lr)]
        else:
            self.default_min_lr = check_real("min_lr", min_lr, lo=0.0)
            self.min_lrs = [self.default_min_lr] * len(groups)
        self.patience = check_int("patience", patience, lo=0)
        self.cooldown = check_int("cooldown", cooldown, lo=0)
        self.eps = check_real("eps", eps, lo=0.0)
        self.last_epoch = 0
        self._init_is_better(mode, threshold, threshold_mode)
        self._reset()

    def _init_is_better(self, mode: str, threshold: float, threshold_mode: str) -> None:
        check_choice("mode", mode, ("min", "max"))
        check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
        threshold = check_real("threshold", threshold, lo=0.0)
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.mode_worse = math.inf if mode == "min" else -math.inf

    def _reset(self) -> None:
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def is_better(self, a: float, best: float) -> bool:
        """Whether metric ``a`` counts as an improvement over ``best`` (torch's rule)."""
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def step(self, metric: float) -> None:
        """Record one epoch's metric and reduce the learning rates if it has plateaued."""
        current = float(metric)
        self.last_epoch += 1
        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs during cooldown are ignored
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0

    def _reduce_lr(self) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"the optimizer has {len(groups)} param groups but ReduceLROnPlateau was "
                    f"given {len(self.min_lrs)} min_lr values; set .min_lrs to match"
                )
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs, strict=True):
            lr = group["lr"]
            if callable(lr):
                if isinstance(lr, Scaled) and lr.min_lr == min_lr:
                    group["lr"] = Scaled(lr.schedule, lr.factor * self.factor, min_lr)
                else:
                    group["lr"] = Scaled(lr, self.factor, min_lr)
            else:
                old_lr = float(lr)
                new_lr = max(old_lr * self.factor, min_lr)
                if old_lr - new_lr > self.eps:
                    group["lr"] = new_lr

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state as plain strict-JSON values (the optimizer is not included)."""
        return {
            "mode": self.mode,
            "factor": self.factor,
            "patience": self.patience,
            "threshold": self.threshold,
            "threshold_mode": self.threshold_mode,
            "cooldown": self.cooldown,
            "min_lrs": list(self.min_lrs),
            "default_min_lr": self.default_min_lr,
            "eps": self.eps,
            "last_epoch": self.last_epoch,
            "best": _enc_float(self.best),
            "num_bad_epochs": self.num_bad_epochs,
            "cooldown_counter": self.cooldown_counter,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state produced by :meth:`state_dict` (validated before anything changes)."""
        sd = dict(state_dict)
        missing = set(self.state_dict()) - set(sd)
        if missing:
            raise ValueError(f"state_dict is missing keys: {sorted(missing)}")
        factor = check_real("factor", sd["factor"], lo=0.0, hi=1.0, hi_open=True)
        patience = check_int("patience", sd["patience"], lo=0)
        cooldown = check_int("cooldown", sd["cooldown"], lo=0)
        eps = check_real("eps", sd["eps"], lo=0.0)
        min_lrs = [check_real(f"min_lrs[{i}]", m, lo=0.0) for i, m in enumerate(sd["min_lrs"])]
        dm = sd["default_min_lr"]
        default_min_lr = None if dm is None else check_real("default_min_lr", dm, lo=0.0)
        last_epoch = check_int("last_epoch", sd["last_epoch"])
        best = float(sd["best"])
        num_bad = check_int("num_bad_epochs", sd["num_bad_epochs"], lo=0)
        counter = check_int("cooldown_counter", sd["cooldown_counter"], lo=0)
        self._init_is_better(sd["mode"], sd["threshold"], sd["threshold_mode"])
        self.factor, self.patience, self.cooldown, self.eps = factor, patience, cooldown, eps
        self.min_lrs, self.default_min_lr = min_lrs, default_min_lr
        self.last_epoch, self.best = last_epoch, best
        self.num_bad_epochs, self.cooldown_counter = num_bad, counter

    def __repr__(self) -> str:
        return (
            f"ReduceLROnPlateau(mode={self.mode!r}, factor={self.factor}, "
            f"patience={self.patience}, threshold={self.threshold}, "
            f"threshold_mode={self.threshold_mode!r}, cooldown={self.cooldown}, "
            f"min_lr={self.min_lrs if self.default_min_lr is None else self.default_min_lr}, "
            f"eps={self.eps}, best={self.best}, num_bad_epochs={self.num_bad_epochs})"
        )
