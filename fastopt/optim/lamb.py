"""LAMB (no torch equivalent; follows the paper and optax.lamb)."""

from .adam import beta_scalars
from .base import maximize_sign
from .hyperparameters import MAXIMIZE, betas, lr, nonnegative, weight_decay
from .segmented import SegmentedOptimizer, mask


class LAMB(SegmentedOptimizer):
    r"""LAMB: the Adam direction plus decoupled weight decay, scaled per tensor by the trust ratio.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
        \quad u_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}
        + \lambda\theta_{t-1}

        \theta_t = \theta_{t-1} - \eta\,r\,u_t,\quad
        r = \lVert\theta_{t-1}\rVert / \lVert u_t\rVert \text{ per tensor (1 if either is 0)}

    torch has no LAMB. This follows You et al., "Large Batch Optimization for Deep Learning:
    Training BERT in 76 minutes", ICLR 2020, as optax.lamb composes it (scale_by_adam,
    add_decayed_weights, scale_by_trust_ratio, scale_by_learning_rate), with optax's defaults
    eps = 1e-6, eps_root = 0 and its eps placement. ``weight_decay_mask`` (True, False or
    ``mask(name, shape) -> bool``) selects the tensors that are decayed (optax's ``mask``).
    """

    algorithm = "lamb"

    hyperparameter_table = (
        lr(1e-3),
        betas(),
        nonnegative("eps", 1e-6),
        weight_decay(),
        nonnegative("eps_root", 0.0, keyword_only=True),
        mask("weight_decay_mask"),
        MAXIMIZE,
    )

    def _state_names(self, group):
        return ("exp_avg", "exp_avg_sq")

    def _scalars(self, group, state, step, lr):
        beta1, beta2 = group["betas"]
        return dict(
            gsign=maximize_sign(group),
            **beta_scalars(group),
            bias_correction1=1.0 - beta1**step,
            bias_correction2=1.0 - beta2**step,
            eps=group["eps"],
            eps_root=group["eps_root"],
            weight_decay=group["weight_decay"],
            lr=lr,
        ), None
