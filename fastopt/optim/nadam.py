"""NAdam (torch.optim.NAdam)."""

from .adam import AdamBase, adam_moment_scalars
from .hyperparameters import MAXIMIZE, adam_family, flag, nonnegative


class NAdam(AdamBase):
    r"""NAdam, exactly torch.optim.NAdam (momentum schedule, optional decoupled weight decay).

    .. math::
        \mu_t = \beta_1\bigl(1 - \tfrac12 0.96^{t\psi}\bigr),\quad \Pi_t = \prod_{i\le t}\mu_i,
        \quad d_t = \sqrt{v_t / (1-\beta_2^t)} + \epsilon

        \theta_t = \theta_{t-1} - \eta\frac{1-\mu_t}{1-\Pi_t}\frac{g_t}{d_t}
        - \eta\frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\frac{m_t}{d_t}

    The running product :math:`\Pi_t` is host state (``mu_product``) kept in float64.
    Reference: Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop.
    """

    algorithm = "nadam"

    hyperparameter_table = (
        *adam_family(2e-3),
        nonnegative("momentum_decay", 4e-3),
        flag("decoupled_weight_decay"),
        MAXIMIZE,
    )

    def _rule(self, group):
        return "nadam"

    def _initial_scalar_state(self, group):
        return {"mu_product": 1.0}

    def _scalars(self, group, state, step, lr):
        beta1, beta2 = group["betas"]
        psi = group["momentum_decay"]
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * psi))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
        mu_product = state["mu_product"] * mu
        c_grad = lr * (1.0 - mu) / (1.0 - mu_product)
        c_avg = lr * mu_next / (1.0 - mu_product * mu_next)
        h = adam_moment_scalars(group, lr)
        h.update(bias_correction2=1 - beta2**step, eps=group["eps"], c_grad=c_grad, c_avg=c_avg)
        return h, {"mu_product": mu_product}
