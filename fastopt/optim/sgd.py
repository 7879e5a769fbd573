"""SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD)."""

from .base import Optimizer, l2_scalars
from .hyperparameters import MAXIMIZE, flag, lr, nonnegative, unit_interval, weight_decay


class SGD(Optimizer):
    r"""Stochastic gradient descent, exactly torch.optim.SGD.

    .. math::
        g_t = \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1},\quad
        b_1 = g_1,\; b_t = \mu b_{t-1} + (1-\tau) g_t,\quad
        \theta_t = \theta_{t-1} - \eta\,(g_t + \mu b_t \text{ if nesterov else } b_t)

    Without momentum it is plain (minibatch) gradient descent. Reference: Sutskever et al., "On
    the importance of initialization and momentum in deep learning", ICML 2013; Dive into Deep
    Learning ch. 12.4-12.6.
    """

    algorithm = "sgd"

    hyperparameter_table = (
        lr(1e-3),
        nonnegative("momentum", 0.0),
        unit_interval("dampening", 0.0),
        weight_decay(),
        flag("nesterov"),
        MAXIMIZE,
    )

    def _check_together(self, group):
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")

    def _rule(self, group):
        return "sgd_momentum" if group["momentum"] != 0 else "sgd"

    def _state_names(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _scalars(self, group, state, step, lr):
        h = dict(lr=lr, **l2_scalars(group))
        if group["momentum"] != 0:
            h.update(
                momentum=group["momentum"],
                one_minus_dampening=1.0 - group["dampening"],
                nesterov=float(group["nesterov"]),
                first=float(step == 1),
            )
        return h, None
