"""Adagrad (torch.optim.Adagrad)."""

from .base import Optimizer, l2_scalars
from .hyperparameters import MAXIMIZE, eps, lr, nonnegative, weight_decay


class Adagrad(Optimizer):
    r"""Adagrad, exactly torch.optim.Adagrad.

    .. math::
        \eta_t = \frac{\eta}{1 + (t-1)\delta},\quad s_t = s_{t-1} + g_t^2,\quad
        \theta_t = \theta_{t-1} - \eta_t \frac{g_t}{\sqrt{s_t} + \epsilon}

    with :math:`s_0` = ``initial_accumulator_value``. Reference: Duchi, Hazan & Singer, "Adaptive
    Subgradient Methods for Online Learning and Stochastic Optimization", JMLR 2011.
    """

    algorithm = "adagrad"

    hyperparameter_table = (
        lr(1e-2),
        nonnegative("lr_decay", 0.0),
        weight_decay(),
        nonnegative("initial_accumulator_value", 0.0),
        eps(1e-10),
        MAXIMIZE,
    )

    def _rule(self, group):
        return "adagrad"

    def _state_names(self, group):
        return ("sum",)

    def _initial_value(self, group, name, lr):
        return group["initial_accumulator_value"]

    def _scalars(self, group, state, step, lr):
        clr = lr / (1 + (step - 1) * group["lr_decay"])
        return dict(clr=clr, **l2_scalars(group), eps=group["eps"]), None
