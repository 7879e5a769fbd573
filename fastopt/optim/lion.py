"""Lion (no torch equivalent; follows the paper and optax.lion)."""

from .adam import beta_scalars
from .base import Optimizer, maximize_sign
from .hyperparameters import MAXIMIZE, betas, lr, weight_decay


class Lion(Optimizer):
    r"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

    .. math::
        c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        \theta_t = \theta_{t-1}(1 - \eta\lambda) - \eta\operatorname{sign}(c_t),\quad
        m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    torch has no Lion. This follows Chen et al., "Symbolic Discovery of Optimization Algorithms",
    NeurIPS 2023 (Algorithm 2) and optax.lion; defaults lr = 1e-4, betas = (0.9, 0.99); weight
    decay is decoupled as in the paper and 0 by default.
    """

    algorithm = "lion"

    hyperparameter_table = (lr(1e-4), betas((0.9, 0.99)), weight_decay(), MAXIMIZE)

    def _rule(self, group):
        return "lion"

    def _state_names(self, group):
        return ("exp_avg",)

    def _scalars(self, group, state, step, lr):
        return dict(
            decay=1.0 - lr * group["weight_decay"],
            lr=lr,
            gsign=maximize_sign(group),
            **beta_scalars(group),
        ), None
