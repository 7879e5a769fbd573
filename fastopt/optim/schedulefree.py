"""Schedule-free SGD and AdamW (the ``schedulefree`` package's SGDScheduleFree, AdamWScheduleFree)."""

import functools
from contextlib import contextmanager

from .. import reference
from ..validation import check_int, check_interval, check_positive
from .base import Optimizer
from .hyperparameters import Hyper, betas, eps, lr, nonnegative, real, weight_decay

SCHEDULE_FREE_ROWS = (
    weight_decay(),
    Hyper("warmup_steps", 0, functools.partial(check_int, lo=0)),
    real("r", 0.0),
    nonnegative("weight_lr_power", 2.0),
)
"""The rows both schedule-free optimizers end with, in the package's argument order."""


class ScheduleFree(Optimizer):
    r"""The y/z/x sequences of Defazio et al., "The Road Less Scheduled" (NeurIPS 2024), with
    the ``schedulefree`` package's semantics (version 1.4).

    The parameters hold the gradient point :math:`y` while training; the state holds
    :math:`z` (the base SGD / Adam iterate); the evaluation point :math:`x` (the weighted
    average of the :math:`z`) is never stored: with :math:`\beta` the momentum (``betas[0]``),
    :math:`y = (1-\beta) z + \beta x`, so :meth:`eval` turns the parameters into
    :math:`x = \mathrm{lerp}(y, z, 1 - 1/\beta)` and :meth:`train` back into
    :math:`y = \mathrm{lerp}(x, z, 1 - \beta)`, one fused kernel per array each.
    A step, at step :math:`k = 1, 2, \dots` with :math:`\gamma_k` = lr times the linear warmup
    :math:`\min(1, k / \text{warmup\_steps})`:

    .. math::
        \gamma_{\max} = \max_{i \le k}\gamma_i,\quad w_k = k^r\gamma_{\max}^{p},\quad
        c_k = w_k / \textstyle\sum_{i\le k} w_i \;(0 \text{ when the sum is } 0),

        d = \hat g + \lambda y,\quad y \leftarrow \mathrm{lerp}(y, z, c_k)
        + \gamma_k(\beta(1 - c_k) - 1)\, d,\quad z \leftarrow z - \gamma_k d

    where :math:`p` = ``weight_lr_power``, :math:`\lambda` = ``weight_decay`` (taken at
    :math:`y`) and :math:`\hat g` the gradient (SGD) or the gradient over
    :math:`\sqrt{v_k/(1-\beta_2^k)} + \epsilon` (AdamW, :math:`v` its second moment). The
    optimizer starts in train mode (the package starts in eval mode and refuses to step until
    ``train()``; before the first step both points are the same, so this only saves the call);
    ``step()`` in eval mode raises. ``weight_sum`` and ``lr_max`` are host state per
    parameter (the package keeps them per group; equal unless some parameters skip steps).
    """

    def __init__(self, params, defaults, **options):
        self.train_mode = True
        super().__init__(params, defaults, **options)

    def _momentum(self, group):
        """The interpolation constant beta of the y/x/z relation."""
        raise NotImplementedError

    def _initial_scalar_state(self, group):
        return {"weight_sum": 0.0, "lr_max": -1.0}

    def _allocate(self, group, unit, names, lr, stream=None):
        super()._allocate(group, unit, names, lr, stream)
        unit.backend.add(unit.state["z"], unit.param, stream)  # z starts at the parameters (0 + p)

    def _scalars(self, group, state, step, lr):
        warmup = group["warmup_steps"]
        lr = lr * (step / warmup if step <= warmup else 1.0)
        lr_max = max(lr, state["lr_max"])
        weight = (step ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = state["weight_sum"] + weight
        ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
        beta = self._momentum(group)
        h = dict(
            lr=lr,
            weight_decay=group["weight_decay"],
            ckp1=ckp1,
            one_minus_ckp1=1.0 - ckp1,
            y_step=lr * (beta * (1.0 - ckp1) - 1.0),
        )
        return h, {"weight_sum": weight_sum, "lr_max": lr_max}

    def step(self, grads=None, *, grad_scale=None):
        """One schedule-free step (see :meth:`Optimizer.step`); only in train mode."""
        if not self.train_mode:
            raise RuntimeError(
                f"{type(self).__name__}.step() in eval mode: the parameters hold the averaged "
                "point x; call train() first"
            )
        super().step(grads, grad_scale=grad_scale)

    def eval(self):
        """Put the evaluation point x into the parameters (no-op in eval mode)."""
        if self.train_mode:
            self._interpolate(lambda beta: 1.0 - 1.0 / beta)
            self.train_mode = False

    def train(self):
        """Put the gradient point y back into the parameters (no-op in train mode)."""
        if not self.train_mode:
            self._interpolate(lambda beta: 1.0 - beta)
            self.train_mode = True

    def _interpolate(self, weight_of):
        """p <- lerp(p, z, weight_of(beta)) for every parameter with state (the ``ema`` rule:
        the parameter in its average slot, z in its parameter slot; NumPy on the reference)."""
        for group, g_int in zip(self.param_groups, self._groups):
            w = weight_of(self._momentum(group))
            for u in g_int["units"]:
                if u.state and u.backend.name == "numpy":
                    reference.schedulefree_swap(u.param, u.state["z"], w)
                elif u.state:
                    st = u.scalar_type
                    h = (st(w), st(1.0 - w))
                    u.backend.update("ema", u.param, u.state["z"], [], h, (st(1.0), st(0.0)), None)

    def state_dict(self):
        """The optimizer state_dict with ``train_mode`` (which point the parameters hold)."""
        return dict(super().state_dict(), train_mode=self.train_mode)

    def load_state_dict(self, state_dict):
        """Restore a state_dict(); the parameters must hold the point its ``train_mode`` says."""
        mode = state_dict.get("train_mode", True) if hasattr(state_dict, "get") else True
        if not isinstance(mode, bool):
            raise TypeError(f"state_dict train_mode must be a bool, got {mode!r}")
        super().load_state_dict(state_dict)
        self.train_mode = mode


class SGDScheduleFree(ScheduleFree):
    r"""Schedule-free SGD, as ``schedulefree.SGDScheduleFree`` (defaults lr = 1, momentum 0.9).
    See :class:`ScheduleFree` for the update; :math:`\hat g` is the gradient and
    :math:`\beta` = ``momentum``, in (0, 1)."""

    algorithm = "sgd_schedulefree"

    hyperparameter_table = (
        lr(1.0),
        Hyper("momentum", 0.9, functools.partial(check_interval, lo=0.0, hi=1.0, lo_closed=False)),
        *SCHEDULE_FREE_ROWS,
    )

    def _momentum(self, group):
        return group["momentum"]

    def _rule(self, group):
        return "sf_sgd"

    def _state_names(self, group):
        return ("z",)


class AdamWScheduleFree(ScheduleFree):
    r"""Schedule-free AdamW, as ``schedulefree.AdamWScheduleFree`` (defaults lr = 0.0025,
    betas (0.9, 0.999), eps 1e-8). See :class:`ScheduleFree` for the update;
    :math:`v_k = \beta_2 v_{k-1} + (1-\beta_2) g_k^2` and
    :math:`\hat g = g_k / (\sqrt{v_k / (1-\beta_2^k)} + \epsilon)`; :math:`\beta` = ``betas[0]``,
    in (0, 1)."""

    algorithm = "adamw_schedulefree"

    hyperparameter_table = (lr(0.0025), betas(), eps(), *SCHEDULE_FREE_ROWS)

    def _momentum(self, group):
        return group["betas"][0]

    def _check_together(self, group):
        check_positive("betas[0]", group["betas"][0])

    def _rule(self, group):
        return "sf_adamw"

    def _state_names(self, group):
        return ("z", "exp_avg_sq")

    def _scalars(self, group, state, step, lr):
        h, updates = super()._scalars(group, state, step, lr)
        beta2 = group["betas"][1]
        h.update(
            beta2=beta2,
            one_minus_beta2=1.0 - beta2,
            bias_correction2=1.0 - beta2**step,
            eps=group["eps"],
        )
        return h, updates


@contextmanager
def evaluation_point(optimizer):
    """Within the block a schedule-free optimizer's parameters hold the averaged point x
    (:meth:`ScheduleFree.eval`), afterwards the point they held before; any other optimizer is
    left as it is. What the Trainer evaluates the validation set under."""
    swap = isinstance(optimizer, ScheduleFree) and optimizer.train_mode
    if swap:
        optimizer.eval()
    try:
        yield optimizer
    finally:
        if swap:
            optimizer.train()
