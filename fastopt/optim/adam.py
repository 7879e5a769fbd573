"""Adam, AdamW and AMSGrad (torch.optim.Adam / torch.optim.AdamW)."""

import math

from .base import Optimizer, maximize_sign
from .hyperparameters import MAXIMIZE, adam_family, flag, revise


def adam_weight_decay(group, lr):
    """(decay, l2): decoupled decay multiplies θ by 1 - ηλ; coupled adds λθ to the gradient."""
    wd = group["weight_decay"]
    if group.get("decoupled_weight_decay", False):
        return 1.0 - lr * wd, 0.0
    return 1.0, wd


def beta_scalars(group):
    """The fields ``beta1, one_minus_beta1, beta2, one_minus_beta2`` of two moving averages."""
    beta1, beta2 = group["betas"]
    return dict(beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2)


def adam_moment_scalars(group, lr):
    """The ``rules.ADAM_MOMENTS`` fields, shared by every rule built on ``rules.adam_moments``
    (one dict filled in place: merging two took 0.4 us more of every step)."""
    h = beta_scalars(group)
    h["decay"], h["weight_decay"] = adam_weight_decay(group, lr)
    h["gsign"] = maximize_sign(group)
    return h


class AdamBase(Optimizer):
    """State of the Adam family: the two moments (their rows: ``hyperparameters.adam_family``)."""

    def _state_names(self, group):
        return ("exp_avg", "exp_avg_sq")


class Adam(AdamBase):
    r"""Adam, exactly torch.optim.Adam (with ``amsgrad``, ``maximize``, ``decoupled_weight_decay``).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
        \quad \hat v_t = \max(\hat v_{t-1}, v_t)\;(\text{AMSGrad})

        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
        \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    ε is added outside the square root, after bias correction (torch's placement). Weight decay is
    the L2 term λθ added to g, or decoupled (θ ← θ(1 - ηλ) first) when ``decoupled_weight_decay``.
    References: Kingma & Ba, ICLR 2015; Reddi et al., "On the Convergence of Adam and Beyond",
    ICLR 2018 (AMSGrad); Dive into Deep Learning ch. 12.10.
    """

    algorithm = "adam"

    hyperparameter_table = (
        *adam_family(1e-3),
        flag("amsgrad"),
        MAXIMIZE,
        flag("decoupled_weight_decay", keyword_only=True),
    )

    def _rule(self, group):
        return "adam_amsgrad" if group["amsgrad"] else "adam"

    def _state_names(self, group):
        names = ("exp_avg", "exp_avg_sq")
        return names + ("max_exp_avg_sq",) if group["amsgrad"] else names

    def _scalars(self, group, state, step, lr):
        beta1, beta2 = group["betas"]
        h = adam_moment_scalars(group, lr)
        h.update(
            step_size=lr / (1 - beta1**step),
            bias_correction2_sqrt=math.sqrt(1 - beta2**step),
            eps=group["eps"],
        )
        return h, None


class AdamW(Adam):
    r"""AdamW, exactly torch.optim.AdamW: Adam with decoupled weight decay (default λ = 1e-2).

    .. math:: \theta \leftarrow \theta(1 - \eta\lambda), \text{ then the Adam step.}

    Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """

    hyperparameter_table = revise(
        Adam.hyperparameter_table, weight_decay=1e-2, fixed={"decoupled_weight_decay": True}
    )
