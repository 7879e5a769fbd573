"""Yogi (no torch equivalent; the paper's update, or optax.yogi's with ``bias_correction=True``)."""

import math

from .adam import AdamBase
from .base import l2_scalars
from .hyperparameters import MAXIMIZE, betas, eps, flag, lr, nonnegative, weight_decay


class Yogi(AdamBase):
    r"""Yogi: Adam whose second moment moves additively, so it cannot blow up the step size.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = v_{t-1} - (1-\beta_2)\operatorname{sign}(v_{t-1} - g_t^2)\, g_t^2,\quad
        \theta_t = \theta_{t-1} - \eta\frac{m_t}{\sqrt{v_t} + \epsilon}

    torch has no Yogi. By default this is Algorithm 2 of Zaheer et al., "Adaptive Methods for
    Nonconvex Optimization", NeurIPS 2018 (defaults lr = 1e-2, eps = 1e-3): no bias correction.
    ``bias_correction=True`` gives ``optax.yogi`` (``scale_by_yogi``), which divides the moments
    by :math:`1-\beta_1^t` and :math:`1-\beta_2^t` as Adam does:
    :math:`\theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t}
    + \epsilon}` (equal to optax's :math:`\hat m / (\sqrt{\hat v} + \epsilon)` to rounding).
    Both moments start at ``initial_accumulator_value`` (1e-6, as optax). ``weight_decay`` adds the
    L2 term λθ to the gradient (torch style; 0 by default).
    """

    algorithm = "yogi"

    hyperparameter_table = (
        lr(1e-2),
        betas(),
        eps(1e-3),
        nonnegative("initial_accumulator_value", 1e-6),
        weight_decay(),
        MAXIMIZE,
        flag("bias_correction", keyword_only=True),
    )

    def _rule(self, group):
        return "yogi"

    def _initial_value(self, group, name, lr):
        return group["initial_accumulator_value"]

    def _scalars(self, group, state, step, lr):
        beta1, beta2 = group["betas"]
        corrected = group["bias_correction"]
        return dict(
            step_size=lr / (1.0 - beta1**step) if corrected else lr,
            bias_correction2_sqrt=math.sqrt(1.0 - beta2**step) if corrected else 1.0,
            **l2_scalars(group),
            beta1=beta1,
            one_minus_beta1=1.0 - beta1,
            one_minus_beta2=1.0 - beta2,
            eps=group["eps"],
        ), None
