"""RMSprop (torch.optim.RMSprop)."""

from .base import Optimizer, l2_scalars
from .hyperparameters import MAXIMIZE, eps, flag, lr, nonnegative, unit_interval, weight_decay


class RMSprop(Optimizer):
    r"""RMSprop, exactly torch.optim.RMSprop (plain, centered, with momentum).

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\quad
        \bar g_t = \bar g_{t-1} + (1-\alpha)(g_t - \bar g_{t-1}) \;(\text{centered}),\quad
        a_t = \sqrt{v_t - \bar g_t^2} + \epsilon

        b_t = \mu b_{t-1} + g_t / a_t,\; \theta_t = \theta_{t-1} - \eta b_t
        \quad(\text{or } \theta_t = \theta_{t-1} - \eta g_t / a_t \text{ without momentum})

    Reference: Hinton, Coursera lecture 6e (2012); Graves, "Generating Sequences With Recurrent
    Neural Networks" (2013) for the centered form; Dive into Deep Learning ch. 12.8.
    """

    algorithm = "rmsprop"

    hyperparameter_table = (
        lr(1e-2),
        unit_interval("alpha", 0.99),
        eps(1e-8),
        weight_decay(),
        nonnegative("momentum", 0.0),
        flag("centered"),
        MAXIMIZE,
    )

    def _rule(self, group):
        return (
            "rmsprop"
            + ("_centered" if group["centered"] else "")
            + ("_momentum" if group["momentum"] > 0 else "")
        )

    def _state_names(self, group):
        return (
            ("square_avg",)
            + (("momentum_buffer",) if group["momentum"] > 0 else ())
            + (("grad_avg",) if group["centered"] else ())
        )

    def _scalars(self, group, state, step, lr):
        alpha = group["alpha"]
        return dict(
            lr=lr,
            **l2_scalars(group),
            alpha=alpha,
            one_minus_alpha=1.0 - alpha,
            eps=group["eps"],
            momentum=group["momentum"],
        ), None
