"""LARS (no torch equivalent; follows the paper and optax.lars)."""

from .base import maximize_sign
from .hyperparameters import MAXIMIZE, flag, lr, nonnegative, real, weight_decay
from .segmented import SegmentedOptimizer, mask


class LARS(SegmentedOptimizer):
    r"""LARS: SGD with momentum on the update scaled per tensor by a trust ratio.

    .. math::
        u_t = g_t + \lambda\theta_{t-1},\quad
        r = \frac{c\,\lVert\theta_{t-1}\rVert}{\lVert u_t\rVert + \epsilon}
        \text{ per tensor (1 if either norm is 0)},\quad s_t = \eta\,r\,u_t

        b_t = s_t + \mu b_{t-1},\quad
        \theta_t = \theta_{t-1} - b_t \;(\text{Nesterov: } - (s_t + \mu b_t))

    torch has no LARS. This follows You, Gitman & Ginsburg, "Large Batch Training of
    Convolutional Networks", 2017, as optax.lars composes it (add_decayed_weights, masked
    scale_by_trust_ratio, scale_by_learning_rate, trace) with its defaults: trust coefficient
    c = 0.001, eps = 0, momentum 0.9. ``weight_decay_mask`` and ``trust_ratio_mask`` (True,
    False or ``mask(name, shape) -> bool``) select the tensors decayed and adapted; param groups
    may set them too (e.g. ``{"params": biases, "trust_ratio_mask": False}``).
    """

    algorithm = "lars"

    hyperparameter_table = (
        lr(0.1),
        real("momentum", 0.9, lo=0.0, hi=1.0, hi_open=True),
        weight_decay(),
        real("trust_coefficient", 0.001, keyword_only=True, lo=0.0, lo_open=True),
        nonnegative("eps", 0.0, keyword_only=True),
        flag("nesterov", keyword_only=True),
        mask("weight_decay_mask"),
        mask("trust_ratio_mask"),
        MAXIMIZE,
    )

    def _state_names(self, group):
        return ("momentum_buffer",)

    def _scalars(self, group, state, step, lr):
        return dict(
            gsign=maximize_sign(group),
            weight_decay=group["weight_decay"],
            trust_coefficient=group["trust_coefficient"],
            eps=group["eps"],
            lr=lr,
            momentum=group["momentum"],
            nesterov=1.0 if group["nesterov"] else 0.0,
        ), None
