"""Adadelta (torch.optim.Adadelta)."""

from ..validation import check_bool, check_interval, check_lr, check_nonnegative, check_positive
from .base import Optimizer, constructor_defaults, l2_scalars


class Adadelta(Optimizer):
    r"""Adadelta, exactly torch.optim.Adadelta (lr = 1.0, rho = 0.9, eps = 1e-6 by default).

    .. math::
        v_t = \rho v_{t-1} + (1-\rho) g_t^2,\quad
        \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}} g_t,\quad
        u_t = \rho u_{t-1} + (1-\rho)\Delta_t^2,\quad \theta_t = \theta_{t-1} - \eta\Delta_t

    Reference: Zeiler, "ADADELTA: An Adaptive Learning Rate Method" (2012); Dive into Deep
    Learning ch. 12.9.
    """

    algorithm = "adadelta"

    def __init__(
        self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, maximize=False, **options
    ):
        super().__init__(params, constructor_defaults(locals()), **options)

    def _check(self, group):
        check_lr(group["lr"])
        check_interval("rho", group["rho"], 0.0, 1.0, hi_closed=True)
        check_positive("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_bool("maximize", group["maximize"])

    def _rule(self, group):
        return "adadelta"

    def _state_names(self, group):
        return ("square_avg", "acc_delta")

    def _scalars(self, group, state, step, lr):
        rho = group["rho"]
        return dict(
            lr=lr, **l2_scalars(group), rho=rho, one_minus_rho=1.0 - rho, eps=group["eps"]
        ), None
