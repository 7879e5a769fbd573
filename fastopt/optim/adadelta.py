"""Adadelta (torch.optim.Adadelta)."""

from .base import Optimizer, l2_scalars
from .hyperparameters import MAXIMIZE, eps, lr, unit_interval, weight_decay


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

    hyperparameter_table = (lr(1.0), unit_interval("rho", 0.9), eps(1e-6), weight_decay(), MAXIMIZE)

    def _rule(self, group):
        return "adadelta"

    def _state_names(self, group):
        return ("square_avg", "acc_delta")

    def _scalars(self, group, state, step, lr):
        rho = group["rho"]
        return dict(
            lr=lr, **l2_scalars(group), rho=rho, one_minus_rho=1.0 - rho, eps=group["eps"]
        ), None
