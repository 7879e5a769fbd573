"""Argument checks for every public entry point, with one set of exception types.

A value of the wrong type raises ``TypeError`` (a string where a number belongs, a float where an
int belongs, a non-bool flag); a value of the right type outside its range raises ``ValueError``
(NaN, Inf, a negative learning rate, a beta of 1). Each message names the argument and the value.
The optimizers, schedules, nn, trainer, distributed and problems all use these.
"""

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


def check_real(name, value, *, lo=None, hi=None, lo_open=False, hi_open=False):
    """``value`` as a float: TypeError unless it is a real number (bools are not), ValueError
    unless it is finite and within the bounds given (``lo_open``/``hi_open`` exclude the bound)."""
    v = _real(name, value)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"invalid {name}: {value!r} (must be {'>' if lo_open else '>='} {lo})")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"invalid {name}: {value!r} (must be {'<' if hi_open else '<='} {hi})")
    return v


def check_int(name, value, *, lo=None, hi=None):
    """``value`` as an int: TypeError unless it is an integer (bools and floats are not, NumPy
    integers are), ValueError unless ``lo <= value <= hi`` for the bounds given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    v = int(value)
    if lo is not None and v < lo:
        raise ValueError(f"invalid {name}: {value!r} (must be >= {lo})")
    if hi is not None and v > hi:
        raise ValueError(f"invalid {name}: {value!r} (must be <= {hi})")
    return v


def check_choice(name, value, choices):
    """``value`` if it is one of ``choices``: TypeError for a non-string where strings are
    expected, ValueError listing the choices otherwise."""
    if all(isinstance(c, str) for c in choices) and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(map(str, choices))}")
    return value
