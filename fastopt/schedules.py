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
equality, argument validation (``ValueError`` naming the argument) and a JSON-able
:meth:`Schedule.to_dict`; :func:`schedule_from_dict` rebuilds an equal schedule, nested ones
included.  Formulas follow ``torch.optim.lr_scheduler`` in closed form, or the textbook
*Dive into Deep Learning*, section 12.11 "Learning Rate Scheduling", where torch has no equivalent.

Where torch's schedulers update the lr recursively (``StepLR``, ``ExponentialLR``,
``PolynomialLR``, ``CosineAnnealingLR``, ``LinearLR``), the closed forms here agree with them to
rounding (relative differences below ~1e-12 over thousands of steps).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass
from typing import Any, ClassVar

__all__ = [
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
    "Warmup",
    "Join",
    "PerEpoch",
    "Scaled",
    "warmup",
    "join",
    "as_schedule",
    "schedule_from_dict",
    "schedule_to_dict",
    "ReduceLROnPlateau",
]


# --------------------------------------------------------------------------- validation helpers


def _real(
    name: str,
    value: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> float:
    """Return ``value`` as a finite float, or raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if ge is not None and not v >= ge:
        raise ValueError(f"{name} must be >= {ge}, got {value!r}")
    if gt is not None and not v > gt:
        raise ValueError(f"{name} must be > {gt}, got {value!r}")
    if le is not None and not v <= le:
        raise ValueError(f"{name} must be <= {le}, got {value!r}")
    if lt is not None and not v < lt:
        raise ValueError(f"{name} must be < {lt}, got {value!r}")
    return v


def _int(name: str, value: Any, *, ge: int | None = None) -> int:
    """Return ``value`` as an int (numpy integers accepted, bools and floats not)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if ge is not None and v < ge:
        raise ValueError(f"{name} must be >= {ge}, got {value!r}")
    return v


def _int_seq(name: str, value: Any, *, nondecreasing: bool) -> tuple[int, ...]:
    if isinstance(value, (str, bytes, dict)):
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}")
    try:
        value = list(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}") from None
    out = tuple(_int(f"{name}[{i}]", v, ge=0) for i, v in enumerate(value))
    if nondecreasing and any(b < a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"{name} must be non-decreasing, got {list(out)!r}")
    return out


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses normalise in __post_init__


# --------------------------------------------------------------------------- base class

_REGISTRY: dict[str, type[Schedule]] = {}


class Schedule:
    """Base class: a learning rate as a pure function of the step count ``k >= 0``.

    Subclasses are frozen dataclasses implementing ``_value(k)``.  ``__call__`` checks ``k`` and
    returns a Python float.
    """

    __slots__ = ()
    _serializable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

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
            d[f.name] = _encode(getattr(self, f.name), f"{type(self).__name__}.{f.name}")
        return d


def _encode(v: Any, where: str) -> Any:
    if isinstance(v, Schedule):
        return v.to_dict()
    if isinstance(v, (tuple, list)):
        return [_encode(x, where) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"{where}: cannot serialise {v!r}; only fastopt.schedules objects can be")


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
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown schedule type {name!r}; known: {sorted(_REGISTRY)}")
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


def _schedule_arg(name: str, x: Any) -> Callable[[int], float]:
    if callable(x):
        return x
    if isinstance(x, dict):
        return schedule_from_dict(x)
    try:
        return Constant(x)
    except ValueError as e:
        raise ValueError(f"{name} must be a schedule (callable) or a number, got {x!r}") from e


# --------------------------------------------------------------------------- simple schedules


@dataclass(frozen=True)
class Constant(Schedule):
    r"""Constant learning rate: :math:`\eta_k = \text{lr}`.

    torch: no scheduler (a plain float ``lr``).
    """

    lr: float

    def __post_init__(self) -> None:
        _set(self, "lr", _real("lr", self.lr, ge=0.0))

    def _value(self, k: int) -> float:
        return self.lr


@dataclass(frozen=True)
class StepDecay(Schedule):
    r"""Staircase decay: multiply by ``gamma`` every ``step_size`` steps.

    .. math:: \eta_k = \text{lr} \cdot \gamma^{\lfloor k / \text{step\_size} \rfloor}

    torch: ``StepLR(optimizer, step_size, gamma)``.  "Divide the lr by a factor ``f`` every ``L``
    epochs" (D2L 12.11 factor / step schedules) is the same with ``gamma = 1/f`` and
    ``step_size = L``, counting ``k`` in epochs (wrap in :class:`PerEpoch`, or use
    ``step_size = L * steps_per_epoch``).
    """

    lr: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _set(self, "lr", _real("lr", self.lr, ge=0.0))
        _set(self, "step_size", _int("step_size", self.step_size, ge=1))
        _set(self, "gamma", _real("gamma", self.gamma, ge=0.0))

    def _value(self, k: int) -> float:
        return self.lr * self.gamma ** (k // self.step_size)


@dataclass(frozen=True)
class MultiStepDecay(Schedule):
    r"""Multiply by ``gamma`` at each milestone.

    .. math:: \eta_k = \text{lr} \cdot \gamma^{\#\{m \in \text{milestones} : m \le k\}}

    torch: ``MultiStepLR(optimizer, milestones, gamma)`` (a repeated milestone decays twice, as in
    torch).  Milestones are stored sorted.
    """

    lr: float
    milestones: tuple[int, ...]
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _set(self, "lr", _real("lr", self.lr, ge=0.0))
        _set(
            self,
            "milestones",
            tuple(sorted(_int_seq("milestones", self.milestones, nondecreasing=False))),
        )
        _set(self, "gamma", _real("gamma", self.gamma, ge=0.0))

    def _value(self, k: int) -> float:
        return self.lr * self.gamma ** bisect_right(self.milestones, k)


@dataclass(frozen=True)
class ExponentialDecay(Schedule):
    r"""Exponential decay, given either ``gamma`` or ``rate`` (exactly one).

    .. math:: \eta_k = \text{lr} \cdot \gamma^k \qquad\text{or}\qquad
              \eta_k = \text{lr} \cdot e^{-\text{rate} \cdot k}

    The ``gamma`` form is torch's ``ExponentialLR(optimizer, gamma)``; the ``rate`` form is
    D2L 12.11's exponential schedule :math:`\eta_0 e^{-\lambda t}` (``a·e^{-bk}`` with
    ``a = lr``, ``b = rate``).  ``gamma > 1`` / ``rate < 0`` grow the lr.
    """

    lr: float
    gamma: float | None = None
    rate: float | None = None

    def __post_init__(self) -> None:
        _set(self, "lr", _real("lr", self.lr, ge=0.0))
        if (self.gamma is None) == (self.rate is None):
            raise ValueError("ExponentialDecay needs exactly one of gamma or rate")
        if self.gamma is not None:
            _set(self, "gamma", _real("gamma", self.gamma, ge=0.0))
        else:
            _set(self, "rate", _real("rate", self.rate))

    def _value(self, k: int) -> float:
        if self.gamma is not None:
            return self.lr * self.gamma**k
        return self.lr * math.exp(-self.rate * k)  # type: ignore[operator]


@dataclass(frozen=True)
class PolynomialDecay(Schedule):
    r"""Polynomial decay to zero over ``total_iters`` steps, then zero.

    .. math:: \eta_k = \text{lr} \cdot \left(1 - \frac{\min(k, T)}{T}\right)^{\text{power}},
              \qquad T = \text{total\_iters}

    torch: ``PolynomialLR(optimizer, total_iters, power)``.
    """

    lr: float
    total_iters: int = 5
    power: float = 1.0

    def __post_init__(self) -> None:
        _set(self, "lr", _real("lr", self.lr, ge=0.0))
        _set(self, "total_iters", _int("total_iters", self.total_iters, ge=1))
        _set(self, "power", _real("power", self.power, ge=0.0))

    def _value(self, k: int) -> float:
        return self.lr * (1.0 - min(self.total_iters, k) / self.total_iters) ** self.power


@dataclass(frozen=True)
class InverseTimeDecay(Schedule):
    r"""Inverse-time (polynomial) decay.

    .. math:: \eta_k = \frac{\text{lr}}{(1 + \text{rate} \cdot k)^{\text{power}}}

    ``power = 1`` is the classic ``a / (1 + b k)`` (Keras ``InverseTimeDecay`` without staircase);
    general ``power`` is D2L 12.11's polynomial decay :math:`\eta_0 (\beta t + 1)^{-\alpha}`
    (``beta = rate``, ``alpha = power``).  torch has no equivalent.
    """

    lr: float
    rate: float
    power: float = 1.0

    def __post_init__(self) -> None:
        _set(self, "lr", _real("lr", self.lr, ge=0.0))
        _set(self, "rate", _real("rate", self.rate, ge=0.0))
        _set(self, "power", _real("power", self.power, ge=0.0))

    def _value(self, k: int) -> float:
        d = 1.0 + self.rate * k
        return self.lr / d if self.power == 1.0 else self.lr / d**self.power


@dataclass(frozen=True)
class InverseSqrt(Schedule):
    r"""Inverse square-root decay.

    .. math:: \eta_k = \text{lr} \sqrt{\frac{\tau}{k + \tau}}
              = \frac{\text{lr}}{\sqrt{1 + k/\tau}}, \qquad \tau = \text{timescale}

    Starts at ``lr`` (``k = 0``) and behaves like ``lr·sqrt(τ/k)`` for large ``k``.  With
    ``timescale = 1`` it is D2L 12.11's square-root scheduler ``lr·(k+1)^{-1/2}``; ``timescale``
    is big_vision's ``rsqrt`` timescale.  ``warmup(InverseSqrt(lr, timescale=w), w, 0.0)`` gives
    the Transformer ("Attention is all you need") shape: linear warmup to ``lr`` over ``w`` steps,
    then ``lr·sqrt(w/k)``.  torch has no equivalent.
    """

    lr: float
    timescale: float = 1.0

    def __post_init__(self) -> None:
        _set(self, "lr", _real("lr", self.lr, ge=0.0))
        _set(self, "timescale", _real("timescale", self.timescale, gt=0.0))

    def _value(self, k: int) -> float:
        return self.lr / math.sqrt(1.0 + k / self.timescale)


@dataclass(frozen=True)
class CosineAnnealing(Schedule):
    r"""Cosine annealing from ``lr`` to ``eta_min`` over ``T_max`` steps (SGDR without restarts).

    .. math:: \eta_k = \eta_{\min} + \tfrac12(\text{lr} - \eta_{\min})
              \left(1 + \cos\frac{\pi k}{T_{\max}}\right)

    torch: ``CosineAnnealingLR(optimizer, T_max, eta_min)`` (its closed form).  As in torch the
    cosine continues past ``T_max`` (the lr rises again, period ``2·T_max``); to hold ``eta_min``
    afterwards use ``join([CosineAnnealing(lr, T, m), Constant(m)], [T])``.  D2L 12.11 "cosine
    scheduler".
    """

    lr: float
    T_max: int
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        _set(self, "lr", _real("lr", self.lr, ge=0.0))
        _set(self, "T_max", _int("T_max", self.T_max, ge=1))
        _set(self, "eta_min", _real("eta_min", self.eta_min, ge=0.0))

    def _value(self, k: int) -> float:
        return (
            self.eta_min + (self.lr - self.eta_min) * (1 + math.cos(math.pi * k / self.T_max)) / 2
        )


@dataclass(frozen=True)
class CosineAnnealingWarmRestarts(Schedule):
    r"""Cosine annealing with warm restarts (SGDR).

    .. math:: \eta_k = \eta_{\min} + \tfrac12(\text{lr} - \eta_{\min})
              \left(1 + \cos\frac{\pi T_{cur}}{T_i}\right)

    where cycle ``i`` lasts :math:`T_i = T_0 \cdot T_{mult}^i` steps and :math:`T_{cur}` is the
    number of steps since the last restart.  torch: ``CosineAnnealingWarmRestarts(optimizer, T_0,
    T_mult, eta_min)`` stepped without an epoch argument (bit-identical).
    """

    lr: float
    T_0: int
    T_mult: int = 1
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        _set(self, "lr", _real("lr", self.lr, ge=0.0))
        _set(self, "T_0", _int("T_0", self.T_0, ge=1))
        _set(self, "T_mult", _int("T_mult", self.T_mult, ge=1))
        _set(self, "eta_min", _real("eta_min", self.eta_min, ge=0.0))

    def _cycle(self, k: int) -> tuple[Any, int]:
        if self.T_mult == 1:
            return k % self.T_0, self.T_0
        start, t_i = 0, self.T_0
        while k >= start + t_i:  # O(log k) cycles
            start += t_i
            t_i *= self.T_mult
        return k - start, t_i

    def _value(self, k: int) -> float:
        t_cur, t_i = self._cycle(k)
        return self.eta_min + (self.lr - self.eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


@dataclass(frozen=True)
class OneCycle(Schedule):
    r"""The 1cycle policy (Smith & Topin, "Super-Convergence"), learning-rate part.

    With :math:`\eta_0 = \text{max\_lr}/\text{div\_factor}` and
    :math:`\eta_{\min} = \eta_0/\text{final\_div\_factor}`, the lr anneals (``"cos"``:
    :math:`b + \tfrac12(a-b)(1+\cos\pi p)`, ``"linear"``: :math:`a + (b-a)p`, with ``p`` the
    fraction of the phase done) from :math:`\eta_0` up to ``max_lr`` over the first
    ``pct_start·total_steps - 1`` steps, then down to :math:`\eta_{\min}` at step
    ``total_steps - 1``.  With ``three_phase=True`` it goes ``η0 → max_lr → η0 → η_min`` (the
    first two phases symmetric).

    torch: ``OneCycleLR(optimizer, max_lr, total_steps, pct_start, anneal_strategy,
    div_factor=..., final_div_factor=..., three_phase=...)``, identical for ``0 <= k <=
    total_steps``.  Momentum cycling is not part of a schedule.  Where torch raises after
    ``total_steps`` steps, this holds :math:`\eta_{\min}` for ``k > total_steps``.
    ``total_steps`` may instead be given as ``epochs * steps_per_epoch`` (keyword-only).
    """

    max_lr: float
    total_steps: int | None = None
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    epochs: InitVar[int | None] = None
    steps_per_epoch: InitVar[int | None] = None

    def __post_init__(self, epochs: int | None, steps_per_epoch: int | None) -> None:
        _set(self, "max_lr", _real("max_lr", self.max_lr, ge=0.0))
        if self.total_steps is not None:
            if epochs is not None or steps_per_epoch is not None:
                raise ValueError("give total_steps or (epochs and steps_per_epoch), not both")
            _set(self, "total_steps", _int("total_steps", self.total_steps, ge=1))
        elif epochs is not None and steps_per_epoch is not None:
            e = _int("epochs", epochs, ge=1)
            s = _int("steps_per_epoch", steps_per_epoch, ge=1)
            _set(self, "total_steps", e * s)
        else:
            raise ValueError("total_steps is required (or both epochs and steps_per_epoch)")
        _set(self, "pct_start", _real("pct_start", self.pct_start, ge=0.0, le=1.0))
        if self.anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f"anneal_strategy must be 'cos' or 'linear', got {self.anneal_strategy!r}"
            )
        _set(self, "div_factor", _real("div_factor", self.div_factor, gt=0.0))
        _set(self, "final_div_factor", _real("final_div_factor", self.final_div_factor, gt=0.0))
        if not isinstance(self.three_phase, bool):
            raise ValueError(f"three_phase must be a bool, got {self.three_phase!r}")
        initial = self.max_lr / self.div_factor
        final = initial / self.final_div_factor
        n = self.total_steps
        end1 = float(self.pct_start * n) - 1
        if self.three_phase:
            phases = (
                (end1, initial, self.max_lr),
                (float(2 * self.pct_start * n) - 2, self.max_lr, initial),
                (n - 1, initial, final),
            )
        else:
            phases = ((end1, initial, self.max_lr), (n - 1, self.max_lr, final))
        start = 0.0
        for end, _, _ in phases:
            if end == start:  # torch would divide by zero here
                raise ValueError(
                    f"pct_start={self.pct_start} with total_steps={n} gives an empty phase"
                )
            start = end
        _set(self, "_phases", phases)
        _set(self, "_final", final)

    def _value(self, k: int) -> float:
        if k > self.total_steps:
            return self._final  # type: ignore[attr-defined]
        phases = self._phases  # type: ignore[attr-defined]
        start = 0.0
        for i, (end, a, b) in enumerate(phases):
            if k <= end or i == len(phases) - 1:
                pct = (k - start) / (end - start)
                if self.anneal_strategy == "cos":
                    return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)
                return (b - a) * pct + a
            start = end
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class PiecewiseConstant(Schedule):
    r"""Piecewise-constant lr: ``values[i]`` for ``boundaries[i-1] <= k < boundaries[i]``.

    .. math:: \eta_k = \text{values}[\#\{b \in \text{boundaries} : b \le k\}]

    ``len(values) == len(boundaries) + 1``; boundaries are non-decreasing step counts.  D2L 12.11
    piecewise-constant (multi-factor) schedule; like ``optax.piecewise_constant_schedule`` but with
    absolute values rather than scales.
    """

    boundaries: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        _set(self, "boundaries", _int_seq("boundaries", self.boundaries, nondecreasing=True))
        try:
            vals = list(self.values)
        except TypeError:
            raise ValueError(f"values must be a sequence of numbers, got {self.values!r}") from None
        _set(self, "values", tuple(_real(f"values[{i}]", v, ge=0.0) for i, v in enumerate(vals)))
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(
                f"values must have len(boundaries) + 1 = {len(self.boundaries) + 1} entries, "
                f"got {len(self.values)}"
            )

    def _value(self, k: int) -> float:
        return self.values[bisect_right(self.boundaries, k)]


# --------------------------------------------------------------------------- combinators


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

    def __post_init__(self) -> None:
        _set(self, "schedule", _schedule_arg("schedule", self.schedule))
        _set(self, "warmup_steps", _int("warmup_steps", self.warmup_steps, ge=0))
        _set(self, "start_factor", _real("start_factor", self.start_factor, ge=0.0, le=1.0))
        lr = self.schedule(0) if self.lr is None else self.lr
        _set(self, "lr", _real("lr", lr, ge=0.0))

    def _value(self, k: int) -> float:
        w = self.warmup_steps
        if k < w:
            s = self.start_factor
            return self.lr * (s + (1.0 - s) * k / w)  # type: ignore[operator]
        return self.schedule(k - w)


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

    def __post_init__(self) -> None:
        if isinstance(self.schedules, (str, bytes, dict)) or callable(self.schedules):
            raise ValueError(f"schedules must be a sequence of schedules, got {self.schedules!r}")
        try:
            scheds = list(self.schedules)
        except TypeError:
            raise ValueError(
                f"schedules must be a sequence of schedules, got {self.schedules!r}"
            ) from None
        if not scheds:
            raise ValueError("schedules must not be empty")
        _set(
            self,
            "schedules",
            tuple(_schedule_arg(f"schedules[{i}]", s) for i, s in enumerate(scheds)),
        )
        _set(self, "boundaries", _int_seq("boundaries", self.boundaries, nondecreasing=True))
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

    def __post_init__(self) -> None:
        _set(self, "schedule", _schedule_arg("schedule", self.schedule))
        _set(self, "steps_per_epoch", _int("steps_per_epoch", self.steps_per_epoch, ge=1))

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

    def __post_init__(self) -> None:
        _set(self, "schedule", _schedule_arg("schedule", self.schedule))
        _set(self, "factor", _real("factor", self.factor, ge=0.0))
        _set(self, "min_lr", _real("min_lr", self.min_lr, ge=0.0))

    def _value(self, k: int) -> float:
        v = self.schedule(k)
        return max(self.factor * v, min(v, self.min_lr))


# --------------------------------------------------------------------------- ReduceLROnPlateau


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
    ignored.

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
        self.factor = _real("factor", factor, ge=0.0, lt=1.0)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != len(groups):
                raise ValueError(f"min_lr: expected {len(groups)} values, got {len(min_lr)}")
            self.default_min_lr: float | None = None
            self.min_lrs = [_real(f"min_lr[{i}]", m, ge=0.0) for i, m in enumerate(min_lr)]
        else:
            self.default_min_lr = _real("min_lr", min_lr, ge=0.0)
            self.min_lrs = [self.default_min_lr] * len(groups)
        self.patience = _int("patience", patience, ge=0)
        self.cooldown = _int("cooldown", cooldown, ge=0)
        self.eps = _real("eps", eps, ge=0.0)
        self.last_epoch = 0
        self._init_is_better(mode, threshold, threshold_mode)
        self._reset()

    def _init_is_better(self, mode: str, threshold: float, threshold_mode: str) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        threshold = _real("threshold", threshold, ge=0.0)
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
        factor = _real("factor", sd["factor"], ge=0.0, lt=1.0)
        patience = _int("patience", sd["patience"], ge=0)
        cooldown = _int("cooldown", sd["cooldown"], ge=0)
        eps = _real("eps", sd["eps"], ge=0.0)
        min_lrs = [_real(f"min_lrs[{i}]", m, ge=0.0) for i, m in enumerate(sd["min_lrs"])]
        dm = sd["default_min_lr"]
        default_min_lr = None if dm is None else _real("default_min_lr", dm, ge=0.0)
        last_epoch = _int("last_epoch", sd["last_epoch"])
        best = float(sd["best"])
        num_bad = _int("num_bad_epochs", sd["num_bad_epochs"], ge=0)
        counter = _int("cooldown_counter", sd["cooldown_counter"], ge=0)
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
