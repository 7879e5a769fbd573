"""Adagrad (torch.optim.Adagrad)."""

from ..validation import check_bool, check_lr, check_nonnegative, check_positive
from .base import Optimizer, constructor_defaults, l2_scalars


class Adagrad(Optimizer):
    r"""Adagrad, exactly torch.optim.Adagrad.

    .. math::
        \eta_t = \frac{\eta}{1 + (t-1)\delta},\quad s_t = s_{t-1} + g_t^2,\quad
        \theta_t = \theta_{t-1} - \eta_t \frac{g_t}{\sqrt{s_t} + \epsilon}

    with :math:`s_0` = ``initial_accumulator_value``. Reference: Duchi, Hazan & Singer, "Adaptive
    Subgradient Methods for Online Learning and Stochastic Optimization", JMLR 2011.
    """

    algorithm = "adagrad"

    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0.0,
        weight_decay=0.0,
        initial_accumulator_value=0.0,
        eps=1e-10,
        *,
        maximize=False,
        **options,
    ):
        super().__init__(params, constructor_defaults(locals()), **options)

    def _check(self, group):
        check_lr(group["lr"])
        check_nonnegative("lr_decay", group["lr_decay"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_nonnegative("initial_accumulator_value", group["initial_accumulator_value"])
        check_positive("eps", group["eps"])
        check_bool("maximize", group["maximize"])

    def _rule(self, group):
        return "adagrad"

    def _state_names(self, group):
        return ("sum",)

    def _initial_value(self, group, name, lr):
        return group["initial_accumulator_value"]

    def _scalars(self, group, state, step, lr):
        clr = lr / (1 + (step - 1) * group["lr_decay"])
        return dict(clr=clr, **l2_scalars(group), eps=group["eps"]), None
