"""Schedules built from other schedules: a linear warmup in front, schedules joined at
boundaries, a schedule advanced once per epoch, schedules chained (factors multiplied), a
scaled schedule (what ReduceLROnPlateau puts
in a param group whose lr is a schedule). Numbers are accepted as constant schedules, and dicts
as :meth:`Schedule.to_dict` configs."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .base import RATE, STEPS, Schedule, integer, real, set_field, steps
from .registry import schedule_arg

__all__ = ["ChainedScheduler", "Join", "PerEpoch", "Scaled", "Warmup", "join", "warmup"]


@dataclass(frozen=True)
class Warmup(Schedule):
    r"""Linear warmup in front of another schedule, which then restarts at its step 0.

    .. math:: \eta_k = \begin{cases}
        \text{lr}\,\big(s + (1 - s)\,k / w\big) & k < w \\
        \text{schedule}(k - w) & k \ge w \end{cases}

    with ``w = warmup_steps``, ``s = start_factor`` and ``lr`` defaulting to ``schedule(0)``.
    torch: ``SequentialLR(optimizer, [LinearLR(optimizer, s, 1.0, total_iters=w), other],
    milestones=[w])`` where ``other`` is the torch scheduler of ``schedule`` and ``lr`` is the
    optimizer's initial lr.  Unlike ``LinearLR``, ``start_factor = 0`` is allowed.
    D2L 12.11 "warmup".
    """

    schedule: Callable[[int], float]
    warmup_steps: int
    start_factor: float = 1.0 / 3
    lr: float | None = None

    nested = True
    _checks = {
        "schedule": schedule_arg,
        "warmup_steps": integer(ge=0),
        "start_factor": real(ge=0.0, le=1.0),
    }

    def __post_init__(self) -> None:
        self._check_fields()
        lr = self.schedule(0) if self.lr is None else self.lr
        set_field(self, "lr", RATE("lr", lr))

    def _value(self, k: int) -> float:
        w = self.warmup_steps
        if k < w:
            s = self.start_factor
            return self.lr * (s + (1.0 - s) * k / w)  # type: ignore[operator]
        return self.schedule(k - w)


def _schedule_tuple(schedules):
    """``schedules`` (a non-empty sequence of schedules or numbers) as a tuple of schedules:
    TypeError for a non-sequence (a string, a dict, a single callable), ValueError when empty."""
    if isinstance(schedules, (str, bytes, dict)) or callable(schedules):
        raise TypeError(f"schedules must be a sequence of schedules, got {schedules!r}")
    try:
        scheds = list(schedules)
    except TypeError:
        raise TypeError(f"schedules must be a sequence of schedules, got {schedules!r}") from None
    if not scheds:
        raise ValueError("schedules must not be empty")
    return tuple(schedule_arg(f"schedules[{i}]", s) for i, s in enumerate(scheds))


def warmup(
    schedule: float | Callable[[int], float],
    warmup_steps: int,
    start_factor: float = 1.0 / 3,
    lr: float | None = None,
) -> Warmup:
    """Linear warmup over ``warmup_steps`` steps in front of ``schedule``; see :class:`Warmup`."""
    return Warmup(schedule, warmup_steps, start_factor, lr)


@dataclass(frozen=True)
class Join(Schedule):
    r"""Run ``schedules[i]`` between ``boundaries[i-1]`` and ``boundaries[i]``.

    .. math:: \eta_k = \text{schedules}[i](k - b_{i-1}), \quad
              i = \#\{b \in \text{boundaries}: b \le k\}, \; b_{-1} = 0

    Each schedule sees the step relative to the boundary where it starts, as in
    ``optax.join_schedules``.  torch: ``SequentialLR`` (which restarts each scheduler at 0 at its
    milestone).  Numbers are accepted as constant schedules.
    """

    schedules: tuple[Callable[[int], float], ...]
    boundaries: tuple[int, ...]

    nested = True
    _checks = {"boundaries": steps(nondecreasing=True)}

    def __post_init__(self) -> None:
        set_field(self, "schedules", _schedule_tuple(self.schedules))
        self._check_fields()
        if len(self.boundaries) != len(self.schedules) - 1:
            raise ValueError(
                f"boundaries must have len(schedules) - 1 = {len(self.schedules) - 1} entries, "
                f"got {len(self.boundaries)}"
            )

    def _value(self, k: int) -> float:
        i = bisect_right(self.boundaries, k)
        return self.schedules[i](k - self.boundaries[i - 1] if i else k)


def join(schedules: Sequence[float | Callable[[int], float]], boundaries: Sequence[int]) -> Join:
    """Concatenate schedules at ``boundaries`` (as ``optax.join_schedules``); see :class:`Join`."""
    return Join(schedules, boundaries)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PerEpoch(Schedule):
    r"""Advance ``schedule`` once per epoch: :math:`\eta_k = s(\lfloor k / n \rfloor)`.

    ``n = steps_per_epoch``.  The optimizer counts steps; this makes any schedule count epochs,
    which is torch's usual "``scheduler.step()`` once per epoch" pattern.
    """

    schedule: Callable[[int], float]
    steps_per_epoch: int

    nested = True
    _checks = {"schedule": schedule_arg, "steps_per_epoch": STEPS}

    def _value(self, k: int) -> float:
        return self.schedule(k // self.steps_per_epoch)


@dataclass(frozen=True)
class Scaled(Schedule):
    r"""A schedule multiplied by ``factor``, never pushed below ``min_lr`` by the scaling.

    .. math:: \eta_k = \max\big(f\,s(k),\; \min(s(k), \text{min\_lr})\big)

    i.e. ``f·s(k)`` floored at ``min_lr``, except that where ``s(k)`` itself is below ``min_lr``
    it is left unchanged (the scaling never raises the lr).  With ``min_lr = 0`` it is simply
    ``f·s(k)``.  This is what :class:`ReduceLROnPlateau` puts in a param group whose lr is a
    schedule: each reduction multiplies ``factor`` and keeps the schedule's shape.
    """

    schedule: Callable[[int], float]
    factor: float
    min_lr: float = 0.0

    nested = True
    _checks = {"schedule": schedule_arg, "factor": RATE, "min_lr": RATE}

    def _value(self, k: int) -> float:
        v = self.schedule(k)
        return max(self.factor * v, min(v, self.min_lr))


@dataclass(frozen=True)
class ChainedScheduler(Schedule):
    r"""Several schedules stepped together, as torch's ``ChainedScheduler`` steps its schedulers
    in turn on one optimizer.

    A schedule whose torch scheduler scales the lr it finds by a factor (*multiplicative*:
    :class:`Constant`, :class:`StepDecay`, :class:`MultiStepDecay`, :class:`ExponentialDecay`,
    :class:`PolynomialDecay`, :class:`CosineAnnealing` with ``eta_min = 0``) contributes its
    factor; any other schedule *sets* the lr (as ``CyclicLR``, ``OneCycleLR``,
    ``CosineAnnealingWarmRestarts`` and ``LambdaLR`` do in torch), discarding what the schedules
    before it in the chain did. With no setter, until a factor first reaches 0:

    .. math:: \eta_k = \text{lr}\prod_i \frac{s_i(k)}{\text{lr}}

    with ``lr`` defaulting to ``schedules[0](0)`` (0 when ``lr`` is 0). With setters, the last
    one (index :math:`j`) gives the value and the multiplicative schedules after it apply their
    factor of this step:

    .. math:: \eta_k = s_j(k)\prod_{i > j} \rho_i(k),\quad
              \rho_i(k) = \frac{\hat s_i(k)}{\hat s_i(k - 1)},\ \rho_i(0) = \hat s_i(0)

    where :math:`\hat s_i` is :math:`s_i` with ``lr = 1`` (a ratio of 0/0, where the schedule has
    already reached 0, counts as 1, as torch's ``PolynomialLR`` leaves the lr alone then, but
    as 0 at each decay step of a ``gamma = 0`` decay, which torch's ``StepLR``,
    ``MultiStepLR`` and ``ExponentialLR`` multiply by 0 again).

    Past ``T_max`` torch's ``CosineAnnealingLR`` is not a factor at every step: it reaches 0 at
    ``T_max`` (and every ``2·T_max`` after), and the step after, :math:`r = T_{\max} + 1 +
    2mT_{\max}`, its recursion *adds* :math:`\text{lr}\,(1 - \cos(\pi/T_{\max}))/2` to the
    lr it finds (its base lr is the optimizer's initial lr: the chain's ``lr``) instead of
    scaling it. The chain does the same: at the steps :math:`r` that term is added at the
    cosine's place in the chain. Without a setter the product above then holds only up to the
    last step :math:`z \le k` at which some factor is 0 (torch's lr is 0 there, but for the
    terms added at :math:`z` itself); from there :math:`\eta_z` and :math:`\eta_{z+1}` are
    torch's step maps applied to 0, and for :math:`k > z + 1`,
    :math:`\eta_k = \eta_{z+1}\prod_i \hat s_i(k) / \hat s_i(z + 1)` (a ratio whose
    denominator is 0 counts as 1): a cosine restarts only the step after its own 0, so none
    restarts in :math:`(z + 1, k]`. As in torch, a :class:`CyclicLR` that is not first in the chain starts from ``lr``
    at step 0.
    torch: ``ChainedScheduler([...])`` over one optimizer whose initial lr is ``lr`` (equal to
    rounding). :class:`SWALR` is refused in a chain with other schedules: torch's ``SWALR``
    recovers its start lr from the lr it set the step before, which a chain changes, and so is
    :class:`CosineAnnealing` with ``eta_min != 0`` (torch's recursion then shifts the lr it
    finds, not only scales it). Numbers are
    accepted as constant schedules.
    """

    schedules: tuple[Callable[[int], float], ...]
    lr: float | None = None

    nested = True

    def __post_init__(self) -> None:
        scheds = _schedule_tuple(self.schedules)
        if len(scheds) > 1:
            for i, s in enumerate(scheds):
                if type(s).__name__ == "SWALR":
                    raise ValueError(
                        f"schedules[{i}]: SWALR cannot be chained with other schedules (torch's "
                        "SWALR recovers its start lr from the lr it set last step); use it alone"
                    )
                if type(s).__name__ == "CosineAnnealing" and s.eta_min != 0:
                    raise ValueError(
                        f"schedules[{i}]: CosineAnnealing with eta_min != 0 cannot be chained with "
                        "other schedules (torch's CosineAnnealingLR then shifts the lr it finds, "
                        "not only scales it)"
                    )
        set_field(self, "schedules", scheds)
        set_field(self, "lr", RATE("lr", scheds[0](0) if self.lr is None else self.lr))

    def _last_setter(self) -> int | None:
        for i in range(len(self.schedules) - 1, -1, -1):
            if not getattr(self.schedules[i], "multiplicative", False):
                return i
        return None

    def _value(self, k: int) -> float:
        j = self._last_setter()
        if j is None:
            zeros = [z for z in (_last_zero(s, k) for s in self.schedules) if z is not None]
            z = max(zeros, default=None)
            if z is None:
                lr = self.lr
                if lr == 0:
                    return 0.0
                out = lr
                for s in self.schedules:
                    out *= s(k) / lr
                return out
            # a factor of 0 at step z: torch's lr is 0 there but for the cosine terms added at
            # z, and from z + 1 on no cosine restarts before k (each restarts the step after
            # its own 0), so the factors of z + 2 ... k telescope
            out = self._step(z, 0.0)
            if k > z:
                out = self._step(z + 1, out)
            for s in self.schedules if k > z + 1 else ():
                unit = replace(s, lr=1.0)
                before = unit(z + 1)
                if before != 0:
                    out *= unit(k) / before
            return out
        setter = self.schedules[j]
        if k == 0 and j > 0 and type(setter).__name__ == "CyclicLR":
            # torch's CyclicLR computes its first value from the optimizer's initial_lr, which
            # the first scheduler built on the optimizer recorded: the chain's lr, not base_lr.
            out = self.lr
        else:
            out = setter(k)
        return self._step(k, out, self.schedules[j + 1 :])

    def _step(self, k: int, lr: float, schedules=None) -> float:
        """What torch's chained schedulers (multiplicative ones: ``schedules``, default all)
        make of ``lr`` at step ``k``: each scales it by its factor, a cosine restarting at
        ``k`` adds its term."""
        for s in self.schedules if schedules is None else schedules:
            add = _cosine_restart_term(s, k, self.lr)
            lr = lr * _step_factor(s, k) if add is None else lr + add
        return lr


def _zero_cosine(schedule):
    """Whether ``schedule`` is a :class:`CosineAnnealing` down to 0 (``eta_min = 0``)."""
    return type(schedule).__name__ == "CosineAnnealing" and schedule.eta_min == 0


def _cosine_restart_term(schedule, k, lr):
    """What torch's ``CosineAnnealingLR`` (``eta_min = 0``) over an optimizer whose initial lr
    is ``lr`` adds to the lr at step ``k`` when ``k`` is a step after one where it reached 0
    (``k = T_max + 1 + 2m·T_max``), else None."""
    if not _zero_cosine(schedule):
        return None
    t = schedule.T_max
    if k <= t or (k - 1 - t) % (2 * t):
        return None
    return lr * (1 - math.cos(math.pi / t)) / 2


def _zero_gamma(schedule):
    """Whether ``schedule`` decays by ``gamma = 0`` (:class:`StepDecay`, :class:`MultiStepDecay`,
    :class:`ExponentialDecay`): torch's scheduler then multiplies the lr by 0 at EVERY decay
    step, also after its own lr reached 0 (another scheduler in the chain may have set it)."""
    return hasattr(schedule, "last_decay") and getattr(schedule, "gamma", None) == 0


def _last_zero(schedule, k):
    """The last step ``z <= k`` where multiplicative ``schedule``'s factor is 0, or None. A
    cosine is 0 at ``T_max, 3·T_max, ...``; a ``gamma = 0`` decay at each of its decay steps;
    the other multiplicative schedules stay 0 once they reach it (their first 0, found by
    bisection)."""
    if _zero_cosine(schedule):
        t = schedule.T_max
        return None if k < t else t + (k - t) // (2 * t) * (2 * t)
    if _zero_gamma(schedule):
        return schedule.last_decay(k)
    unit = replace(schedule, lr=1.0)
    if unit(k) != 0:
        return None
    lo, hi = 0, k  # unit(hi) == 0: the first zero is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if unit(mid) == 0:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _step_factor(schedule, k):
    """The factor by which multiplicative ``schedule``'s torch scheduler scales the lr at step
    ``k``: the ratio of its consecutive values at ``lr = 1``; once that value is 0, 0 at each
    decay step of a ``gamma = 0`` decay and 1 otherwise (torch's ``PolynomialLR`` past
    ``total_iters``)."""
    unit = replace(schedule, lr=1.0)
    now = unit(k)
    if k == 0:
        return now
    before = unit(k - 1)
    if before == 0:
        return 0.0 if _zero_gamma(schedule) and schedule.last_decay(k) == k else 1.0
    return now / before
