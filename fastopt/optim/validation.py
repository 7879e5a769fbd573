"""Hyperparameter and array checks shared by the optimizer classes. Each raises naming the culprit."""

import math
import numbers


def check_lr(lr, name="lr"):
    """``lr`` is a finite float >= 0 or a callable schedule ``k -> lr``."""
    if callable(lr):
        return
    check_nonnegative(name, lr)


def check_scheduled_lr(value, k):
    """The value a schedule returned at step ``k``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"the lr schedule returned {value!r} at step {k}; expected a float")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"the lr schedule returned lr={value!r} at step {k}; expected a finite value >= 0"
        )
    return float(value)


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"invalid {name}: {value} (must be finite)")
    return value


def check_nonnegative(name, value):
    if _real(name, value) < 0:
        raise ValueError(f"invalid {name}: {value} (must be >= 0)")


def check_positive(name, value):
    if _real(name, value) <= 0:
        raise ValueError(f"invalid {name}: {value} (must be > 0)")


def check_interval(name, value, lo, hi, *, hi_closed=False, lo_closed=True):
    v = _real(name, value)
    ok_lo = v >= lo if lo_closed else v > lo
    ok_hi = v <= hi if hi_closed else v < hi
    if not (ok_lo and ok_hi):
        left, right = "[" if lo_closed else "(", "]" if hi_closed else ")"
        raise ValueError(f"invalid {name}: {value} (must be in {left}{lo}, {hi}{right})")


def check_pair(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"invalid {name}: {value!r} (must be a pair of floats)")
    return value


def check_betas(betas, name="betas"):
    b1, b2 = check_pair(name, betas)
    check_interval(f"{name}[0]", b1, 0.0, 1.0)
    check_interval(f"{name}[1]", b2, 0.0, 1.0)


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
