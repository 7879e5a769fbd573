"""Rprop (torch.optim.Rprop)."""

from ..validation import check_pair, check_positive
from .base import Optimizer, maximize_sign
from .hyperparameters import MAXIMIZE, Hyper, lr


def positive_pair(name, value):
    """``value`` as a pair ``(a, b)`` of floats > 0; ValueError naming ``name[0]``/``name[1]``."""
    a, b = check_pair(name, value)
    check_positive(f"{name}[0]", a)
    check_positive(f"{name}[1]", b)
    return a, b


def check_etas(name, value):
    """``(etaminus, etaplus)`` with 0 < etaminus < 1 < etaplus."""
    etaminus, etaplus = positive_pair(name, value)
    if not etaminus < 1.0 < etaplus:
        raise ValueError(f"invalid {name}: {value} (need 0 < etaminus < 1 < etaplus)")


def check_step_sizes(name, value):
    """``(min, max)`` step sizes, 0 < min <= max."""
    lo, hi = positive_pair(name, value)
    if lo > hi:
        raise ValueError(f"invalid {name}: {value} (min > max)")


class Rprop(Optimizer):
    r"""Rprop, exactly torch.optim.Rprop (the Rprop- variant, full-batch by design).

    .. math::
        s = \operatorname{sign}(g_t g_{t-1}):\quad
        \Delta_t = \operatorname{clip}(\Delta_{t-1}\cdot\{\eta_+, \eta_-, 1\}_s,
        \Delta_{\min}, \Delta_{\max}),\quad g_t \leftarrow 0 \text{ where } s < 0,\quad
        \theta_t = \theta_{t-1} - \operatorname{sign}(g_t)\Delta_t

    The step sizes start at ``lr``. Reference: Riedmiller & Braun, "A direct adaptive method for
    faster backpropagation learning: the RPROP algorithm", ICNN 1993.
    """

    algorithm = "rprop"

    hyperparameter_table = (
        lr(1e-2),
        Hyper("etas", (0.5, 1.2), check_etas),
        Hyper("step_sizes", (1e-6, 50.0), check_step_sizes),
        MAXIMIZE,
    )

    def _rule(self, group):
        return "rprop"

    def _state_names(self, group):
        return ("prev", "step_size")

    def _initial_value(self, group, name, lr):
        return lr if name == "step_size" else 0.0

    def _scalars(self, group, state, step, lr):
        etaminus, etaplus = group["etas"]
        lo, hi = group["step_sizes"]
        return dict(
            gsign=maximize_sign(group),
            etaminus=etaminus,
            etaplus=etaplus,
            step_size_min=lo,
            step_size_max=hi,
            zero=0.0,
        ), None
