"""NovoGrad (no torch equivalent; follows the paper and optax.novograd)."""

from ..validation import check_betas, check_bool, check_lr, check_nonnegative
from .base import constructor_defaults, maximize_sign
from .segmented import SegmentedOptimizer, check_mask


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

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.25),
        eps=1e-6,
        weight_decay=0.0,
        *,
        eps_root=0.0,
        weight_decay_mask=True,
        maximize=False,
        **options,
    ):
        super().__init__(params, constructor_defaults(locals()), **options)

    def _check(self, group):
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("eps", group["eps"])
        check_nonnegative("eps_root", group["eps_root"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_mask("weight_decay_mask", group["weight_decay_mask"])
        check_bool("maximize", group["maximize"])

    def _masks(self, group):
        return group["weight_decay_mask"], True

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
