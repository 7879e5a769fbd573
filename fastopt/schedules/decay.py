"""The schedules that are formulas of the step: decays, cosine annealing, 1cycle, piecewise,
cyclical, SWA.

Formulas follow ``torch.optim.lr_scheduler`` in closed form, or the textbook *Dive into Deep
Learning*, section 12.11 "Learning Rate Scheduling", where torch has no equivalent.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import InitVar, dataclass
from typing import Any

from ..validation import check_bool, check_choice, check_int
from .base import RATE, STEPS, Schedule, integer, real, set_field, steps

__all__ = [
    "Constant",
    "CosineAnnealing",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
    "CyclicMomentum",
    "ExponentialDecay",
    "InverseSqrt",
    "InverseTimeDecay",
    "MultiStepDecay",
    "OneCycle",
    "PiecewiseConstant",
    "PolynomialDecay",
    "SWALR",
    "StepDecay",
    "OneCycleMomentum",
]


@dataclass(frozen=True)
class Constant(Schedule):
    r"""Constant learning rate: :math:`\eta_k = \text{lr}`.

    torch: no scheduler (a plain float ``lr``).
    """

    multiplicative = True

    lr: float

    _checks = {"lr": RATE}

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

    multiplicative = True

    lr: float
    step_size: int
    gamma: float = 0.1

    _checks = {"lr": RATE, "step_size": STEPS, "gamma": RATE}

    def _value(self, k: int) -> float:
        return self.lr * self.gamma ** (k // self.step_size)

    def last_decay(self, k: int) -> int | None:
        """The last step ``<= k`` at which torch's ``StepLR`` multiplies the lr by ``gamma``."""
        return k - k % self.step_size if k >= self.step_size else None


@dataclass(frozen=True)
class MultiStepDecay(Schedule):
    r"""Multiply by ``gamma`` at each milestone.

    .. math:: \eta_k = \text{lr} \cdot \gamma^{\#\{m \in \text{milestones} : m \le k\}}

    torch: ``MultiStepLR(optimizer, milestones, gamma)`` (a repeated milestone decays twice, as in
    torch).  Milestones are stored sorted.
    """

    multiplicative = True

    lr: float
    milestones: tuple[int, ...]
    gamma: float = 0.1

    _checks = {"lr": RATE, "milestones": steps(nondecreasing=False), "gamma": RATE}

    def __post_init__(self) -> None:
        self._check_fields()
        set_field(self, "milestones", tuple(sorted(self.milestones)))

    def _value(self, k: int) -> float:
        return self.lr * self.gamma ** bisect_right(self.milestones, k)

    def last_decay(self, k: int) -> int | None:
        """The last step ``<= k`` at which torch's ``MultiStepLR`` multiplies the lr by
        ``gamma`` (the last milestone reached)."""
        i = bisect_right(self.milestones, k)
        return self.milestones[i - 1] if i else None


@dataclass(frozen=True)
class ExponentialDecay(Schedule):
    r"""Exponential decay, given either ``gamma`` or ``rate`` (exactly one).

    .. math:: \eta_k = \text{lr} \cdot \gamma^k \qquad\text{or}\qquad
              \eta_k = \text{lr} \cdot e^{-\text{rate} \cdot k}

    The ``gamma`` form is torch's ``ExponentialLR(optimizer, gamma)``; the ``rate`` form is
    D2L 12.11's exponential schedule :math:`\eta_0 e^{-\lambda t}` (``a·e^{-bk}`` with
    ``a = lr``, ``b = rate``).  ``gamma > 1`` / ``rate < 0`` grow the lr.
    """

    multiplicative = True

    lr: float
    gamma: float | None = None
    rate: float | None = None

    _checks = {"lr": RATE}

    def __post_init__(self) -> None:
        self._check_fields()
        if (self.gamma is None) == (self.rate is None):
            raise ValueError("ExponentialDecay needs exactly one of gamma or rate")
        if self.gamma is not None:
            set_field(self, "gamma", RATE("gamma", self.gamma))
        else:
            set_field(self, "rate", real()("rate", self.rate))

    def _value(self, k: int) -> float:
        if self.gamma is not None:
            return self.lr * self.gamma**k
        return self.lr * math.exp(-self.rate * k)  # type: ignore[operator]

    def last_decay(self, k: int) -> int | None:
        """The last step ``<= k`` at which torch's ``ExponentialLR`` multiplies the lr by
        ``gamma``: every step after the first."""
        return k if k >= 1 else None


@dataclass(frozen=True)
class PolynomialDecay(Schedule):
    r"""Polynomial decay to zero over ``total_iters`` steps, then zero.

    .. math:: \eta_k = \text{lr} \cdot \left(1 - \frac{\min(k, T)}{T}\right)^{\text{power}},
              \qquad T = \text{total\_iters}

    torch: ``PolynomialLR(optimizer, total_iters, power)``.
    """

    multiplicative = True

    lr: float
    total_iters: int = 5
    power: float = 1.0

    _checks = {"lr": RATE, "total_iters": STEPS, "power": RATE}

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

    _checks = {"lr": RATE, "rate": RATE, "power": RATE}

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

    _checks = {"lr": RATE, "timescale": real(gt=0.0)}

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

    multiplicative = True

    lr: float
    T_max: int
    eta_min: float = 0.0

    _checks = {"lr": RATE, "T_max": STEPS, "eta_min": RATE}

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

    _checks = {"lr": RATE, "T_0": STEPS, "T_mult": STEPS, "eta_min": RATE}

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

    _checks = {
        "max_lr": RATE,
        "pct_start": real(ge=0.0, le=1.0),
        "div_factor": real(gt=0.0),
        "final_div_factor": real(gt=0.0),
    }

    def __post_init__(self, epochs: int | None, steps_per_epoch: int | None) -> None:
        self._check_fields()
        if self.total_steps is not None:
            if epochs is not None or steps_per_epoch is not None:
                raise ValueError("give total_steps or (epochs and steps_per_epoch), not both")
            set_field(self, "total_steps", STEPS("total_steps", self.total_steps))
        elif epochs is not None and steps_per_epoch is not None:
            e = STEPS("epochs", epochs)
            s = STEPS("steps_per_epoch", steps_per_epoch)
            set_field(self, "total_steps", e * s)
        else:
            raise ValueError("total_steps is required (or both epochs and steps_per_epoch)")
        check_choice("anneal_strategy", self.anneal_strategy, ("cos", "linear"))
        check_bool("three_phase", self.three_phase)
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
        set_field(self, "_phases", phases)
        set_field(self, "_final", final)

    def anneal(self, k: int, ends: tuple[tuple[float, float], ...]) -> float:
        """The value at step ``k <= total_steps`` of a quantity annealed from ``ends[i][0]`` to
        ``ends[i][1]`` over phase ``i`` (``anneal_strategy``), as torch's OneCycleLR anneals the
        lr and the momentum."""
        phases = self._phases  # type: ignore[attr-defined]
        start = 0.0
        for i, ((end, _, _), (a, b)) in enumerate(zip(phases, ends)):
            if k <= end or i == len(phases) - 1:
                pct = (k - start) / (end - start)
                if self.anneal_strategy == "cos":
                    return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)
                return (b - a) * pct + a
            start = end
        raise AssertionError("unreachable")  # pragma: no cover

    def _value(self, k: int) -> float:
        if k > self.total_steps:
            return self._final  # type: ignore[attr-defined]
        return self.anneal(k, tuple((a, b) for _, a, b in self._phases))  # type: ignore[attr-defined]

    def momentum(self, base_momentum: float = 0.85, max_momentum: float = 0.95) -> OneCycleMomentum:
        """The momentum torch's ``OneCycleLR(..., cycle_momentum=True, base_momentum,
        max_momentum)`` sets alongside this lr (its defaults): a :class:`OneCycleMomentum`."""
        return OneCycleMomentum(self, base_momentum, max_momentum)


@dataclass(frozen=True)
class OneCycleMomentum(Schedule):
    r"""The momentum torch's ``OneCycleLR`` moves against the lr (``cycle_momentum=True``):
    from ``max_momentum`` down to ``base_momentum`` while the lr rises, back up while it falls
    (three-phase: up again in the second phase, then held at ``max_momentum``), annealed as
    ``one_cycle``'s lr is; ``max_momentum`` after ``total_steps``. Give it as an optimizer's
    ``momentum`` or first beta, as torch sets ``momentum`` or ``betas[0]``. Identical to torch.
    """

    one_cycle: OneCycle
    base_momentum: float = 0.85
    max_momentum: float = 0.95

    nested = True
    _checks = {"base_momentum": RATE, "max_momentum": RATE}

    def __post_init__(self) -> None:
        self._check_fields()
        if not isinstance(self.one_cycle, OneCycle):
            raise TypeError(f"one_cycle must be a OneCycle, got {self.one_cycle!r}")

    def _value(self, k: int) -> float:
        lo, hi = self.base_momentum, self.max_momentum
        if k > self.one_cycle.total_steps:  # type: ignore[operator]
            return hi
        if self.one_cycle.three_phase:
            return self.one_cycle.anneal(k, ((hi, lo), (lo, hi), (hi, hi)))
        return self.one_cycle.anneal(k, ((hi, lo), (lo, hi)))


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

    _checks = {"boundaries": steps(nondecreasing=True)}

    def __post_init__(self) -> None:
        self._check_fields()
        try:
            vals = list(self.values)
        except TypeError:
            raise TypeError(f"values must be a sequence of numbers, got {self.values!r}") from None
        set_field(self, "values", tuple(RATE(f"values[{i}]", v) for i, v in enumerate(vals)))
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(
                f"values must have len(boundaries) + 1 = {len(self.boundaries) + 1} entries, "
                f"got {len(self.values)}"
            )

    def _value(self, k: int) -> float:
        return self.values[bisect_right(self.boundaries, k)]


@dataclass(frozen=True)
class CyclicLR(Schedule):
    r"""Cyclical learning rate (Smith, "Cyclical Learning Rates for Training Neural Networks",
    WACV 2017): up from ``base_lr`` to ``max_lr`` in ``step_size_up`` steps, back down in
    ``step_size_down`` (default: the same), the height scaled per cycle or per step.

    .. math::
        c = \lfloor 1 + k / T \rfloor,\quad x = 1 + k/T - c,\quad
        s = \begin{cases} x / r & x \le r \\ (x - 1)/(r - 1) & \text{else}\end{cases},\quad
        \eta_k = \text{base\_lr} + (\text{max\_lr} - \text{base\_lr})\, s\, f(c \text{ or } k)

    with :math:`T` = up + down and :math:`r` = up / T; :math:`f` is 1 (``"triangular"``),
    :math:`2^{1-c}` (``"triangular2"``, per cycle), :math:`\gamma^k` (``"exp_range"``, per
    step), or ``scale_fn`` of the cycle or the step (``scale_mode``) when given, which then
    overrides ``mode``. torch: ``CyclicLR(optimizer, base_lr, max_lr, step_size_up,
    step_size_down, mode, gamma, scale_fn, scale_mode, cycle_momentum=False)``, identical
    (the same closed form). torch's default ``cycle_momentum=True`` also moves the momentum
    against the lr: pass :meth:`momentum` as the optimizer's ``momentum`` (or ``betas[0]``).
    """

    base_lr: float
    max_lr: float
    step_size_up: int = 2000
    step_size_down: int | None = None
    mode: str = "triangular"
    gamma: float = 1.0
    scale_fn: Any = None
    scale_mode: str = "cycle"

    _checks = {
        "base_lr": RATE,
        "max_lr": RATE,
        "step_size_up": STEPS,
        "gamma": RATE,
    }

    def __post_init__(self) -> None:
        self._check_fields()
        if self.step_size_down is not None:
            set_field(
                self, "step_size_down", check_int("step_size_down", self.step_size_down, lo=0)
            )
        check_choice("mode", self.mode, ("triangular", "triangular2", "exp_range"))
        check_choice("scale_mode", self.scale_mode, ("cycle", "iterations"))
        if self.scale_fn is not None and not callable(self.scale_fn):
            raise TypeError(f"scale_fn must be a callable or None, got {self.scale_fn!r}")

    def _scale(self, cycle: int, k: int) -> float:
        if self.scale_fn is not None:
            return self.scale_fn(cycle if self.scale_mode == "cycle" else k)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (cycle - 1))
        return self.gamma**k

    def shape(self, k: int) -> tuple[float, float]:
        """(position in the cycle's triangle in [0, 1], height scale) at step ``k``."""
        up = float(self.step_size_up)
        down = up if self.step_size_down is None else float(self.step_size_down)
        total = up + down
        ratio = up / total
        cycle = math.floor(1 + k / total)
        x = 1.0 + k / total - cycle
        factor = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
        return factor, self._scale(cycle, k)

    def _value(self, k: int) -> float:
        factor, scale = self.shape(k)
        return self.base_lr + (self.max_lr - self.base_lr) * factor * scale

    def momentum(self, base_momentum: float = 0.8, max_momentum: float = 0.9) -> CyclicMomentum:
        """The momentum that torch's ``CyclicLR(..., cycle_momentum=True, base_momentum,
        max_momentum)`` sets alongside this lr (its defaults): a :class:`CyclicMomentum`."""
        return CyclicMomentum(self, base_momentum, max_momentum)


@dataclass(frozen=True)
class CyclicMomentum(Schedule):
    r"""The momentum torch's ``CyclicLR`` cycles against the lr (``cycle_momentum=True``).

    .. math:: \mu_k = \text{max\_momentum} - (\text{max\_momentum} - \text{base\_momentum})\,
              s\, f(c \text{ or } k)

    with the triangle position :math:`s` and height scale :math:`f` of ``cyclic`` (a
    :class:`CyclicLR`) at step ``k``: the momentum is high where the lr is low. Give it as an
    optimizer's ``momentum`` (SGD, RMSprop) or first beta (``betas=(m, 0.999)``), as torch sets
    ``momentum`` or ``betas[0]``. Identical to torch (the same closed form).
    """

    cyclic: CyclicLR
    base_momentum: float = 0.8
    max_momentum: float = 0.9

    nested = True
    _checks = {"base_momentum": RATE, "max_momentum": RATE}

    def __post_init__(self) -> None:
        self._check_fields()
        if not isinstance(self.cyclic, CyclicLR):
            raise TypeError(f"cyclic must be a CyclicLR, got {self.cyclic!r}")

    def _value(self, k: int) -> float:
        factor, scale = self.cyclic.shape(k)
        return self.max_momentum - (self.max_momentum - self.base_momentum) * factor * scale


@dataclass(frozen=True)
class SWALR(Schedule):
    r"""The SWA learning rate (Izmailov et al., "Averaging Weights Leads to Wider Optima and
    Better Generalization", UAI 2018): from ``lr`` to ``swa_lr`` over ``anneal_epochs`` steps,
    then constant.

    .. math:: \eta_k = \alpha_k\,\text{swa\_lr} + (1 - \alpha_k)\,\text{lr},\quad
              \alpha_k = a\bigl(\min(1, k / \max(1, E))\bigr)

    with :math:`a(t) = (1 - \cos \pi t)/2` (``"cos"``) or :math:`t` (``"linear"``) and
    :math:`E` = ``anneal_epochs`` (:math:`E = 0`: ``swa_lr`` from the first step). torch:
    ``SWALR(optimizer, swa_lr, anneal_epochs, anneal_strategy)`` over an optimizer whose lr is
    ``lr`` when it is built (torch's recursion recovers ``lr`` each step; this is its closed
    form, equal to rounding). Count ``k`` in epochs with :class:`PerEpoch`, as torch steps it.
    """

    lr: float
    swa_lr: float
    anneal_epochs: int = 10
    anneal_strategy: str = "cos"

    _checks = {"lr": RATE, "swa_lr": RATE, "anneal_epochs": integer(ge=0)}

    def __post_init__(self) -> None:
        self._check_fields()
        check_choice("anneal_strategy", self.anneal_strategy, ("cos", "linear"))

    def _value(self, k: int) -> float:
        if self.anneal_epochs == 0:
            k = max(1, k)
        t = max(0, min(1, k / max(1, self.anneal_epochs)))
        alpha = (1 - math.cos(math.pi * t)) / 2 if self.anneal_strategy == "cos" else t
        return self.swa_lr * alpha + self.lr * (1 - alpha)
