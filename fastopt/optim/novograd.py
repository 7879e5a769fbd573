"""NovoGrad (no torch equivalent; follows the paper and optax.novograd)."""

from .base import maximize_sign
from .hyperparameters import revise
from .lamb import LAMB
from .segmented import SegmentedOptimizer


class NovoGrad(SegmentedOptimizer):
    r"""NovoGrad: a per-tensor second moment of the gradient norm, and momentum on the
    normalized gradient.

    .. math::
        \nu_t = \beta_2\nu_{t-1} + (1-\beta_2)\lVert g_t\rVert^2\;(\nu_1 = \lVert g_1\rVert^2)
        \text{ per tensor},\quad
        m_t = \beta_1 m_{t-1} + \frac{g_t}{\sqrt{\nu_t + \epsilon_{root}} + \epsilon}
        + \lambda\theta_{t-1}\;(m_1 \text{ without } \beta_1 m_0)

        \theta_t = \theta_{t-1} - \eta\,m_t

    torch has no NovoGrad. This follows Ginsburg et al., "Stochastic Gradient Methods with
    Layer-wise Adaptive Moments for Training of Deep Networks", 2019, as optax.novograd
    (scale_by_novograd, scale_by_learning_rate), with its defaults betas = (0.9, 0.25),
    eps = 1e-6, eps_root = 0. The per-tensor second moment is the state ``exp_avg_sq`` (one
    value per tensor); ``weight_decay_mask`` selects the tensors decayed.
    """

    algorithm = "novograd"
    segment_state = "exp_avg_sq"
    state_like_params = False
    tensor_state = ("exp_avg_sq",)

    @classmethod
    def tensor_state_shapes(cls, shape):
        """``exp_avg_sq``: one value per tensor, a 0-d share."""
        return {"exp_avg_sq": ()}

    hyperparameter_table = revise(LAMB.hyperparameter_table, betas=(0.9, 0.25))
    """LAMB's rows (optax.novograd takes the same arguments) with its betas (0.9, 0.25)."""

    def _state_names(self, group):
        return ("exp_avg",)

    def _scalars(self, group, state, step, lr):
        beta1, beta2 = group["betas"]
        return dict(
            gsign=maximize_sign(group),
            beta1=beta1,
            beta2=beta2,
            one_minus_beta2=1.0 - beta2,
            eps=group["eps"],
            eps_root=group["eps_root"],
            weight_decay=group["weight_decay"],
            lr=lr,
            first=1.0 if step == 1 else 0.0,
        ), None
