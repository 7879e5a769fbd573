"""Learning-rate schedules as pure functions of the step, and ReduceLROnPlateau.

A *schedule* is any callable ``schedule(k) -> float`` where ``k`` is the number of optimizer
steps already taken by the parameter group (``k = 0`` for the first step).  A param group's
``"lr"`` may be a float or a schedule.  ``schedule(k)`` equals what torch's
``optimizer.param_groups[i]["lr"]`` holds after ``k`` calls of the matching
``torch.optim.lr_scheduler`` scheduler's ``step()``, i.e. the lr used by the ``(k+1)``-th
optimizer step.

``k`` counts whatever unit the schedule is advanced in.  The optimizer advances it once per
optimizer step; to get torch's "one ``scheduler.step()`` per epoch" behaviour wrap a schedule in
:class:`PerEpoch` (``PerEpoch(StepDecay(0.1, 30), steps_per_epoch=len(loader))``).

The schedules here are small immutable (frozen dataclass) objects with a readable ``repr``,
equality, argument validation (``TypeError`` for an argument of the wrong type, ``ValueError``
for a value out of range, each naming the argument) and a JSON-able :meth:`Schedule.to_dict`;
:func:`schedule_from_dict` rebuilds an equal schedule, nested ones included.  Formulas follow
``torch.optim.lr_scheduler`` in closed form, or the textbook *Dive into Deep Learning*, section
12.11 "Learning Rate Scheduling", where torch has no equivalent.

Where torch's schedulers update the lr recursively (``StepLR``, ``ExponentialLR``,
``PolynomialLR``, ``CosineAnnealingLR``, ``LinearLR``), the closed forms here agree with them to
rounding (relative differences below ~1e-12 over thousands of steps).

Modules: :mod:`~fastopt.schedules.base` (the base class, :data:`SCHEDULES`, the argument
checks), :mod:`~fastopt.schedules.decay` (the formulas), :mod:`~fastopt.schedules.combinators`
(warmup, join, per epoch, chained, scaled), :mod:`~fastopt.schedules.registry` (lookups by name,
to/from dict), :mod:`~fastopt.schedules.plateau` (ReduceLROnPlateau).
"""

from .base import SCHEDULES, Schedule
from .combinators import ChainedScheduler, Join, PerEpoch, Scaled, Warmup, join, warmup
from .decay import (
    SWALR,
    Constant,
    CosineAnnealing,
    CosineAnnealingWarmRestarts,
    CyclicLR,
    CyclicMomentum,
    ExponentialDecay,
    InverseSqrt,
    InverseTimeDecay,
    MultiStepDecay,
    OneCycle,
    OneCycleMomentum,
    PiecewiseConstant,
    PolynomialDecay,
    StepDecay,
)
from .plateau import ReduceLROnPlateau
from .registry import (
    ALIASES,
    as_schedule,
    schedule_class,
    schedule_from_dict,
    schedule_to_dict,
)

__all__ = [
    "ALIASES",
    "SCHEDULES",
    "Schedule",
    "Constant",
    "StepDecay",
    "MultiStepDecay",
    "ExponentialDecay",
    "PolynomialDecay",
    "InverseTimeDecay",
    "InverseSqrt",
    "CosineAnnealing",
    "CosineAnnealingWarmRestarts",
    "OneCycle",
    "PiecewiseConstant",
    "CyclicLR",
    "CyclicMomentum",
    "OneCycleMomentum",
    "SWALR",
    "Warmup",
    "Join",
    "PerEpoch",
    "Scaled",
    "ChainedScheduler",
    "warmup",
    "join",
    "as_schedule",
    "schedule_class",
    "schedule_from_dict",
    "schedule_to_dict",
    "ReduceLROnPlateau",
]
