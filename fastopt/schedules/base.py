"""The :class:`Schedule` base class, the registry of schedule types and the argument checks.

Every subclass registers itself in :data:`SCHEDULES` under its class name (that is how
:func:`~fastopt.schedules.schedule_from_dict` finds it) and declares how each of its fields is
checked in ``_checks`` (field name -> check); the base ``__post_init__`` runs them and stores the
normalised values, so a schedule class holds its formula and nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from ..validation import check_int, check_real

__all__ = ["SCHEDULES", "Schedule"]

SCHEDULES: dict[str, type[Schedule]] = {}
"""Every schedule type by class name (filled as the classes are defined): what
:func:`~fastopt.schedules.schedule_from_dict` rebuilds from, what a ``--schedule`` spec names."""


# --------------------------------------------------------------------------- argument checks


def real(*, ge=None, gt=None, le=None, lt=None) -> Callable[[str, Any], float]:
    """A check for a finite float within the bounds given (TypeError for a non-number,
    ValueError for a value out of range; :func:`fastopt.validation.check_real`)."""
    lo = ge if gt is None else gt
    hi = le if lt is None else lt

    def check(name: str, value: Any) -> float:
        return check_real(name, value, lo=lo, hi=hi, lo_open=gt is not None, hi_open=lt is not None)

    return check


def integer(*, ge=None) -> Callable[[str, Any], int]:
    """A check for an int (NumPy integers accepted, bools and floats not) ``>= ge``."""

    def check(name: str, value: Any) -> int:
        return check_int(name, value, lo=ge)

    return check


RATE = real(ge=0.0)
"""A learning rate or factor: a finite float >= 0."""
STEPS = integer(ge=1)
"""A positive step count."""


def int_seq(name: str, value: Any, *, nondecreasing: bool) -> tuple[int, ...]:
    """``value`` as a tuple of step counts >= 0 (non-decreasing when asked)."""
    if isinstance(value, (str, bytes, dict)):
        raise TypeError(f"{name} must be a sequence of integers, got {value!r}")
    try:
        value = list(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of integers, got {value!r}") from None
    out = tuple(check_int(f"{name}[{i}]", v, lo=0) for i, v in enumerate(value))
    if nondecreasing and any(b < a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"{name} must be non-decreasing, got {list(out)!r}")
    return out


def steps(*, nondecreasing: bool) -> Callable[[str, Any], tuple[int, ...]]:
    """A check for a sequence of step counts (see :func:`int_seq`)."""
    return lambda name, value: int_seq(name, value, nondecreasing=nondecreasing)


def set_field(obj: Any, name: str, value: Any) -> None:
    """Store a normalised field value on a frozen dataclass (in ``__post_init__``)."""
    object.__setattr__(obj, name, value)


# --------------------------------------------------------------------------- base class


class Schedule:
    """Base class: a learning rate as a pure function of the step count ``k >= 0``.

    Subclasses are frozen dataclasses implementing ``_value(k)`` and listing their field checks
    in ``_checks``.  ``__call__`` checks ``k`` and returns a Python float.  ``nested`` marks the
    combinators, whose arguments are other schedules.
    """

    __slots__ = ()
    _serializable: ClassVar[bool] = True
    _checks: ClassVar[dict[str, Callable[[str, Any], Any]]] = {}
    nested: ClassVar[bool] = False
    multiplicative: ClassVar[bool] = False
    """True when torch's scheduler of this schedule scales the lr it finds by a factor
    (chainable), so that :class:`ChainedScheduler` multiplies it in rather than letting it
    set the lr."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SCHEDULES[cls.__name__] = cls

    def __post_init__(self) -> None:
        self._check_fields()

    def _check_fields(self) -> None:
        for name, check in self._checks.items():
            set_field(self, name, check(name, getattr(self, name)))

    def __call__(self, k: int) -> float:
        if k < 0:
            raise ValueError(f"step k must be >= 0, got {k!r}")
        return float(self._value(k))

    def _value(self, k: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-able config ``{"type": <class name>, <constructor arguments>...}``.

        Nested schedules become nested dicts, tuples become lists.  Raises TypeError when the
        schedule contains a callable that is not a :class:`Schedule` (e.g. a lambda).
        """
        d: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            d[f.name] = encode(getattr(self, f.name), f"{type(self).__name__}.{f.name}")
        return d


def encode(v: Any, where: str) -> Any:
    """A field value as JSON-able data (schedules as their dicts, tuples as lists)."""
    if isinstance(v, Schedule):
        return v.to_dict()
    if isinstance(v, (tuple, list)):
        return [encode(x, where) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"{where}: cannot serialise {v!r}; only fastopt.schedules objects can be")
