"""Schedules by name and as data: the registry lookups, ``to_dict``/``from_dict``, and turning a
number, a config dict or a callable into a schedule argument.

:data:`~fastopt.schedules.base.SCHEDULES` (class name -> class) is the one registry:
:func:`schedule_from_dict` rebuilds from it, :func:`schedule_class` resolves the names a
``--schedule`` spec uses (a class name in any case, or one of :data:`ALIASES`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .base import SCHEDULES, Schedule
from .decay import Constant

__all__ = [
    "ALIASES",
    "as_schedule",
    "schedule_arg",
    "schedule_class",
    "schedule_from_dict",
    "schedule_to_dict",
]

ALIASES = {
    "step": "StepDecay",
    "multistep": "MultiStepDecay",
    "exponential": "ExponentialDecay",
    "exp": "ExponentialDecay",
    "polynomial": "PolynomialDecay",
    "inversetime": "InverseTimeDecay",
    "rsqrt": "InverseSqrt",
    "cosine": "CosineAnnealing",
    "sgdr": "CosineAnnealingWarmRestarts",
    "onecycle": "OneCycle",
    "piecewise": "PiecewiseConstant",
    "cyclic": "CyclicLR",
    "swa": "SWALR",
}
"""Short names of schedule types (alias -> class name in :data:`SCHEDULES`)."""


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def schedule_class(name: str) -> type[Schedule]:
    """The schedule type named ``name``: a class name of :data:`SCHEDULES` in any case (``_``
    and ``-`` ignored) or an alias of :data:`ALIASES`. ValueError listing the names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"schedule name must be a string, got {name!r}")
    key = _key(name)
    for cls_name, cls in SCHEDULES.items():
        if _key(cls_name) == key:
            return cls
    if key in ALIASES:
        return SCHEDULES[ALIASES[key]]
    known = sorted(SCHEDULES) + sorted(ALIASES)
    raise ValueError(f"unknown schedule {name!r}; known: {', '.join(known)}")


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        return schedule_from_dict(v)
    if isinstance(v, list):
        return tuple(_decode(x) for x in v)
    return v


def schedule_from_dict(d: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_dict` output (nested schedules included)."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"schedule config must be a dict with a 'type' key, got {d!r}")
    name = d["type"]
    cls = SCHEDULES.get(name)
    if cls is None:
        raise ValueError(f"unknown schedule type {name!r}; known: {sorted(SCHEDULES)}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    extra = set(d) - names - {"type"}
    if extra:
        raise ValueError(f"unknown keys for {name}: {sorted(extra)}")
    return cls(**{key: _decode(val) for key, val in d.items() if key != "type"})


def schedule_to_dict(schedule: Schedule) -> dict[str, Any]:
    """``schedule.to_dict()``, with a clear TypeError for callables that cannot be serialised."""
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"cannot serialise {schedule!r}: only fastopt.schedules.Schedule objects have a config"
        )
    return schedule.to_dict()


def as_schedule(x: float | Callable[[int], float]) -> Callable[[int], float]:
    """Turn a number into :class:`Constant`; pass callables (schedules) through unchanged."""
    if callable(x):
        return x
    return Constant(x)


def schedule_arg(name: str, x: Any) -> Callable[[int], float]:
    """A combinator's schedule argument ``name``: a callable as it is, a config dict rebuilt, a
    number as :class:`Constant` (TypeError for anything else, ValueError for a bad number)."""
    if callable(x):
        return x
    if isinstance(x, dict):
        return schedule_from_dict(x)
    try:
        return Constant(x)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name} must be a schedule (callable) or a number, got {x!r}") from e
