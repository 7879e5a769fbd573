"""SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD)."""

from ..validation import check_bool, check_interval, check_lr, check_nonnegative
from .base import Optimizer, constructor_defaults, l2_scalars


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

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        *,
        maximize=False,
        **options,
    ):
        super().__init__(params, constructor_defaults(locals()), **options)

    def _check(self, group):
        check_lr(group["lr"])
        check_nonnegative("momentum", group["momentum"])
        check_interval("dampening", group["dampening"], 0.0, 1.0, hi_closed=True)
        check_nonnegative("weight_decay", group["weight_decay"])
        check_bool("nesterov", group["nesterov"])
        check_bool("maximize", group["maximize"])
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
