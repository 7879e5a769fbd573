"""Learning-rate schedules from specs (``cosine:lr=0.1,warmup=10``), their labels and values."""

import dataclasses
import inspect
import numbers

import numpy as np

from .. import schedules as _schedules
from .specs import parse_spec

SCHEDULE_NAMES = {
    name.lower(): name for name, cls in _schedules.SCHEDULES.items() if not cls.nested
}
"""Schedules a ``--schedule`` spec can name (lowercase name -> class name of
:mod:`fastopt.schedules`): the registry's schedules that produce an lr on their own (the wrappers
around another schedule, Warmup, Join, PerEpoch, ..., are built from the spec's keys instead)."""
SCHEDULE_ALIASES = _schedules.ALIASES
"""Short names (``cosine``, ``step``, ...): :data:`fastopt.schedules.ALIASES`."""


WARMUP_START_FACTOR = 1.0 / 3
"""The lr a warmup starts at, as a fraction of the lr it ramps up to: torch's ``LinearLR``
default, as :func:`fastopt.schedules.warmup`'s."""


def parse_schedule(text, steps=100, strict=False):
    """A schedule from ``NAME:k=v,...`` (class name of :mod:`fastopt.schedules`, any case, or an
    alias such as ``cosine``, ``step``, ``onecycle``, ``sgdr``). Three extra keys: ``warmup=W``
    puts a linear warmup of W steps in front (:func:`fastopt.schedules.warmup`), starting at
    ``warmup_start_factor=F`` times the lr (default 1/3, torch's ``LinearLR``), ``per_epoch=E``
    advances it once per E steps. Required step counts default from ``steps`` (``T_max``,
    ``total_steps``, ``total_iters``), less the warmup: warmup and schedule together take
    ``steps`` steps, as with ``fastopt train --warmup`` and the gallery's warmup + cosine. With
    ``strict`` a warmup that is not shorter than ``steps`` is refused (without it, the step counts
    then default from ``steps``). A JSON object (``{"type": "Warmup", ...}``, as
    ``Schedule.to_dict`` writes) is accepted too. ValueError with a readable message
    otherwise."""
    text = str(text).strip()
    if text.startswith("{"):
        import json

        try:
            return _schedules.schedule_from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"schedule {text!r}: not valid JSON ({exc.msg})") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"schedule {text!r}: {exc}") from None
    name, kwargs = parse_spec(text, "schedule")
    key = name.lower().replace("_", "").replace("-", "")
    cls_name = SCHEDULE_NAMES.get(key) or SCHEDULE_ALIASES.get(key)
    if cls_name is None:
        known = sorted(set(SCHEDULE_NAMES.values())) + sorted(SCHEDULE_ALIASES)
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(known)}")
    cls = getattr(_schedules, cls_name)
    warm = kwargs.pop("warmup", None)
    start_factor = kwargs.pop("warmup_start_factor", WARMUP_START_FACTOR)
    per_epoch = kwargs.pop("per_epoch", None)
    fields = {f.name for f in dataclasses.fields(cls)} | {
        n for n, p in inspect.signature(cls).parameters.items()
    }
    for k in kwargs:
        if k not in fields:
            raise ValueError(
                f"schedule {cls_name} has no argument {k!r}; its arguments: "
                f"{', '.join(sorted(fields))}, warmup, warmup_start_factor, per_epoch"
            )
    if _is_count(warm) and warm >= steps and strict:
        raise ValueError(f"schedule {text!r}: warmup={warm} is not shorter than the {steps} steps")
    if _is_count(warm) and 0 < warm < steps:
        steps -= warm  # the schedule after the warmup
    defaults = {"T_max": steps, "total_steps": steps, "total_iters": steps}
    if cls is _schedules.StepDecay:
        defaults["step_size"] = max(1, steps // 4)
    if cls is _schedules.CosineAnnealingWarmRestarts:
        defaults["T_0"] = max(1, steps // 4)
    if cls is _schedules.MultiStepDecay:
        defaults["milestones"] = (steps // 2, 3 * steps // 4)
    if cls is _schedules.InverseTimeDecay:
        defaults["rate"] = 10.0 / max(1, steps)
    if cls is _schedules.ExponentialDecay and "rate" not in kwargs:
        defaults["gamma"] = 0.01 ** (1.0 / max(1, steps))
    for k, v in defaults.items():
        if k in fields and k not in kwargs and k not in ("epochs", "steps_per_epoch"):
            kwargs[k] = v
    if "lr" in fields and "lr" not in kwargs:
        kwargs["lr"] = 0.1
    if "max_lr" in fields and "max_lr" not in kwargs:
        kwargs["max_lr"] = 0.1
    try:
        sched = cls(**kwargs)
        if warm is not None:
            sched = _schedules.warmup(sched, warm, start_factor)
        if per_epoch is not None:
            sched = _schedules.PerEpoch(sched, per_epoch)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"schedule {text!r}: {exc}") from None
    return sched


def _is_count(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def default_schedules(steps=100):
    """The gallery of ``fastopt playground --schedules``: (label, schedule) pairs over
    ``steps`` steps, lr 0.1."""
    n = max(int(steps), 8)
    s = _schedules
    return [
        ("Constant(0.1)", s.Constant(0.1)),
        (f"StepDecay(step_size={n // 4}, gamma=0.5)", s.StepDecay(0.1, n // 4, 0.5)),
        (
            f"MultiStepDecay(milestones=({n // 2}, {3 * n // 4}))",
            s.MultiStepDecay(0.1, (n // 2, 3 * n // 4)),
        ),
        (f"ExponentialDecay(rate={4 / n:g})", s.ExponentialDecay(0.1, rate=4.0 / n)),
        ("PolynomialDecay(power=2)", s.PolynomialDecay(0.1, total_iters=n, power=2.0)),
        (f"InverseSqrt(timescale={max(1, n // 20)})", s.InverseSqrt(0.1, max(1, n // 20))),
        (f"CosineAnnealing(T_max={n})", s.CosineAnnealing(0.1, n)),
        (
            f"CosineAnnealingWarmRestarts(T_0={max(1, n // 7)}, T_mult=2)",
            s.CosineAnnealingWarmRestarts(0.1, max(1, n // 7), 2),
        ),
        (f"OneCycle(total_steps={n})", s.OneCycle(0.1, total_steps=n)),
        (
            f"warmup({n // 10}) + CosineAnnealing",
            s.warmup(s.CosineAnnealing(0.1, n - n // 10), n // 10, 0.0),
        ),
        (
            "PiecewiseConstant",
            s.PiecewiseConstant((n // 3, 2 * n // 3), (0.1, 0.05, 0.01)),
        ),
        (
            f"InverseTimeDecay(rate={10 / n:g})",
            s.InverseTimeDecay(0.1, 10.0 / n),
        ),
    ]


def schedule_label(sched):
    """A short readable label: the class name and its arguments (nested schedules abbreviated)."""
    if not dataclasses.is_dataclass(sched):
        return repr(sched)
    args = []
    for f in dataclasses.fields(sched):
        v = getattr(sched, f.name)
        if isinstance(v, _schedules.Schedule):
            v = type(v).__name__
        elif isinstance(v, float):
            v = f"{v:g}"
        elif isinstance(v, tuple):
            v = "(" + ", ".join(type(x).__name__ if callable(x) else f"{x:g}" for x in v) + ")"
        args.append(f"{f.name}={v}")
    text = f"{type(sched).__name__}({', '.join(args)})"
    return text if len(text) <= 60 else text[:57] + "..."


def schedule_values(sched, steps):
    return np.array([sched(k) for k in range(int(steps))], dtype=np.float64)
