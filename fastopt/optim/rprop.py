"""Rprop (torch.optim.Rprop)."""

from ..validation import check_bool, check_lr, check_pair, check_positive
from .base import Optimizer, constructor_defaults, maximize_sign


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

    def __init__(
        self,
        params,
        lr=1e-2,
        etas=(0.5, 1.2),
        step_sizes=(1e-6, 50.0),
        *,
        maximize=False,
        **options,
    ):
        super().__init__(params, constructor_defaults(locals()), **options)

    def _check(self, group):
        check_lr(group["lr"])
        etaminus, etaplus = check_pair("etas", group["etas"])
        check_positive("etas[0]", etaminus)
        check_positive("etas[1]", etaplus)
        if not etaminus < 1.0 < etaplus:
            raise ValueError(f"invalid etas: {group['etas']} (need 0 < etaminus < 1 < etaplus)")
        lo, hi = check_pair("step_sizes", group["step_sizes"])
        check_positive("step_sizes[0]", lo)
        check_positive("step_sizes[1]", hi)
        if lo > hi:
            raise ValueError(f"invalid step_sizes: {group['step_sizes']} (min > max)")
        check_bool("maximize", group["maximize"])

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
