"""RAdam (torch.optim.RAdam)."""

import math

from .adam import AdamBase, adam_moment_scalars
from .hyperparameters import MAXIMIZE, adam_family, flag


class RAdam(AdamBase):
    r"""RAdam, exactly torch.optim.RAdam (optional decoupled weight decay).

    .. math::
        \rho_\infty = \frac{2}{1-\beta_2} - 1,\quad
        \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t},\quad \hat m_t = \frac{m_t}{1-\beta_1^t}

        \theta_t = \theta_{t-1} - \eta\,\hat m_t\,\frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t}+\epsilon}\,r_t
        \text{ if } \rho_t > 5, \text{ else } \theta_{t-1} - \eta\hat m_t,\quad
        r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

    Reference: Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020.
    """

    algorithm = "radam"

    hyperparameter_table = (*adam_family(1e-3), flag("decoupled_weight_decay"), MAXIMIZE)

    def _rule(self, group):
        return "radam"

    def _scalars(self, group, state, step, lr):
        beta1, beta2 = group["betas"]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        rectify = rho_t > 5.0
        rect = (
            math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            if rectify
            else 0.0
        )
        h = adam_moment_scalars(group, lr)
        h.update(
            bias_correction1=bias_correction1,
            lr=lr,
            rectify=float(rectify),
            rect=rect,
            bias_correction2_sqrt=math.sqrt(bias_correction2),
            eps=group["eps"],
        )
        return h, None
