"""Adamax (torch.optim.Adamax)."""

from .adam import AdamBase
from .base import l2_scalars
from .hyperparameters import MAXIMIZE, adam_family


class Adamax(AdamBase):
    r"""Adamax, exactly torch.optim.Adamax (the infinity-norm variant of Adam).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon),
        \quad \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t} \frac{m_t}{u_t}

    Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, section 7.1.
    """

    algorithm = "adamax"

    hyperparameter_table = (*adam_family(2e-3), MAXIMIZE)

    def _rule(self, group):
        return "adamax"

    def _state_names(self, group):
        return ("exp_avg", "exp_inf")

    def _scalars(self, group, state, step, lr):
        beta1, beta2 = group["betas"]
        return dict(
            **l2_scalars(group),
            beta1=beta1,
            one_minus_beta1=1.0 - beta1,
            beta2=beta2,
            eps=group["eps"],
            clr=lr / (1 - beta1**step),
        ), None
