"""ASGD: averaged stochastic gradient descent (torch.optim.ASGD)."""

from .base import Optimizer, l2_scalars
from .hyperparameters import MAXIMIZE, lr, nonnegative, real, weight_decay


class ASGD(Optimizer):
    r"""Averaged SGD, exactly torch.optim.ASGD (its single-tensor path).

    .. math::
        g_t = \pm\nabla f(\theta_{t-1}) + \lambda_{wd}\theta_{t-1},\quad
        \theta_t = \theta_{t-1}(1 - \lambda\eta_{t-1}) - \eta_{t-1} g_t,

        \bar\theta_t = \theta_t \text{ if } \mu_{t-1} = 1 \text{ else }
        \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1}),

        \eta_t = \frac{\eta}{(1 + \lambda\eta t)^{\alpha}},\quad \mu_t = \frac{1}{\max(1, t - t_0)}

    with :math:`\eta_0` = lr and :math:`\mu_0 = 1`: the averaged parameters :math:`\bar\theta`
    (``ax`` in the state) are the running mean of the iterates from step :math:`t_0` on, until
    then a copy of them. ``eta`` and ``mu`` are host state in float64 (torch keeps them as tensors
    of its default dtype, float32 unless ``torch.set_default_dtype(torch.float64)``).
    Reference: Polyak & Juditsky, "Acceleration of stochastic approximation by averaging",
    SIAM J. Control Optim. 1992.
    """

    algorithm = "asgd"

    hyperparameter_table = (
        lr(1e-2),
        nonnegative("lambd", 1e-4),
        nonnegative("alpha", 0.75),
        real("t0", 1e6),
        weight_decay(),
        MAXIMIZE,
    )

    def _rule(self, group):
        return "asgd"

    def _state_names(self, group):
        return ("ax",)

    def _initial_scalar_state(self, group):
        return {"eta": 0.0, "mu": 1.0}  # eta is set to the lr at allocation

    def _allocate(self, group, unit, names, lr, stream=None):
        super()._allocate(group, unit, names, lr, stream)
        unit.state["eta"] = lr

    def _scalars(self, group, state, step, lr):
        lambd, eta, mu = group["lambd"], state["eta"], state["mu"]
        h = dict(
            decay=1.0 - lambd * eta,
            eta=eta,
            **l2_scalars(group),
            mu=mu,
            average=float(mu != 1.0),
        )
        updates = {
            "eta": lr / ((1.0 + lambd * lr * step) ** group["alpha"]),
            "mu": 1.0 / max(1.0, step - group["t0"]),
        }
        return h, updates
