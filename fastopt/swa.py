"""Stochastic weight averaging (torch.optim.swa_utils): averaged parameters, the SWA learning
rate, batch-norm statistics for the averaged weights, and a Trainer callback tying them together.

Reference: Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
UAI 2018. :class:`AveragedModel` reuses :class:`fastopt.EMA` (and its fused ``ema`` rule): the
equal-weight average is the same lerp with the per-update weight 1/(n+1).
"""

import numpy as np

from .arrays import array_module
from .ema import EMA
from .schedules import SWALR, Join, PerEpoch
from .validation import check_choice, check_int, check_positive

__all__ = ["SWA", "SWALR", "AveragedModel", "update_bn"]


class AveragedModel(EMA):
    r"""A running average of parameters, as ``torch.optim.swa_utils.AveragedModel``.

    .. math:: \bar\theta_1 = \theta,\qquad \bar\theta_{n+1} = \bar\theta_n + w_n(\theta - \bar\theta_n)

    with :math:`w_n = 1/(n+1)` (``decay=None``: the equal-weight SWA average of every
    :meth:`update_parameters`, torch's default ``get_swa_multi_avg_fn``) or :math:`w_n = 1 -`
    ``decay`` (an exponential average, torch's ``get_ema_multi_avg_fn(decay)``). One fused
    kernel per update over a ParamSet's flat buffer (or per array); torch's ``n_averaged`` is
    :attr:`n_averaged`. ``params`` as :class:`fastopt.EMA`: a ParamSet, an array or a
    list/tuple/dict of arrays; ``averages``, ``swapped()`` and ``copy_to_params()`` put the
    average to use. Buffers (batch-norm statistics) are not averaged: recompute them for the
    averaged weights with :func:`update_bn`, as torch's ``use_buffers=False`` expects.
    """

    def __init__(self, params, decay=None):
        self.equal_weights = decay is None
        super().__init__(params, 0.0 if decay is None else decay)

    @property
    def n_averaged(self):
        """How many parameter snapshots the average holds (torch's ``n_averaged``)."""
        return self.num_updates

    def update_parameters(self):
        """Fold the current parameters into the average (torch's name for :meth:`update`)."""
        self.update()

    def current_decay(self):
        """The decay the next update will use: n/(n+1) for the equal-weight average."""
        if self.equal_weights:
            return 1.0 - 1.0 / (self.num_updates + 1)
        return super().current_decay()

    def _lerp_weights(self):
        if self.equal_weights:
            w = 1.0 / (self.num_updates + 1)  # torch: lerp weight 1 / (n_averaged + 1)
            return w, 1.0 - w
        return super()._lerp_weights()

    def state_dict(self):
        return dict(super().state_dict(), equal_weights=self.equal_weights)

    def load_state_dict(self, state):
        equal = state.get("equal_weights", False)
        if equal is not self.equal_weights:
            raise ValueError(
                f"state is of an {'equal-weight' if equal else 'exponential'} average, this "
                f"AveragedModel is {'equal-weight' if self.equal_weights else 'exponential'}"
            )
        super().load_state_dict(state)


def update_bn(model, X, *, batch_size=256, rng=None):
    r"""Recompute the batch-norm running statistics of ``model`` (a :class:`fastopt.nn.MLP`)
    with one pass over the rows of ``X``, as ``torch.optim.swa_utils.update_bn``: the running
    mean and variance are reset (0 and 1), then become the cumulative average over the batches
    of the batch means and unbiased variances (torch's ``momentum=None``: batch :math:`t` enters
    with weight :math:`1/t`). Forward passes in training mode (dropout included, its masks from
    ``rng``, default the model's); the parameters are not touched. A model without batch norm
    is left as it is. Returns ``model``."""
    if not getattr(model, "batch_norm", False):
        return model
    batch_size = check_int("batch_size", batch_size, lo=1)
    X = model.check_X(X)
    n = X.shape[0]
    if n < 2:
        raise ValueError("update_bn needs at least 2 rows (batch norm's unbiased variance)")
    xp = array_module(model.device)[0]
    for name, buf in model.buffers.items():
        if name.endswith(".bn.running_mean"):
            buf[...] = 0
        elif name.endswith(".bn.running_var"):
            buf[...] = 1
    bounds = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:
        bounds[-2:] = [(bounds[-2][0], n)]  # a last batch of one row: fold it into the one before
    saved = model.bn_momentum
    try:
        for t, (lo, hi) in enumerate(bounds, start=1):
            model.bn_momentum = 1.0 / t
            idx = np.arange(lo, hi, dtype=np.int64)
            if xp is not np:
                idx = xp.asarray(idx)
            ws = model.workspace(hi - lo, True)
            model.load_batch(ws, X, None, idx)
            model._forward(ws, True, rng)  # forward only: the running statistics update
    finally:
        model.bn_momentum = saved
    return model


class SWA:
    """Stochastic weight averaging in the :class:`fastopt.trainer.Trainer` loop, as a callback:
    ``Trainer(model, ..., callbacks=[swa])``, then ``swa.finish(X)`` after ``fit``.

    After epoch ``swa_start`` (1-based epochs completed; at least 1) every epoch ends by folding
    the parameters into :attr:`averaged` (an :class:`AveragedModel`; ``decay`` None: equal
    weights, else an exponential average). With ``swa_lr``, the learning rate switches at that
    point to :class:`fastopt.schedules.SWALR` from the lr then in effect to ``swa_lr`` over
    ``anneal_epochs`` epochs (``anneal_strategy`` ``"cos"`` or ``"linear"``): epoch
    ``swa_start + j`` trains at ``SWALR(j - 1)``, as torch's ``SWALR`` stepped once per epoch
    from the switch. :meth:`finish` puts the average into the model and, when it has batch
    norm, recomputes the running statistics for it (:func:`update_bn`); evaluate and save the
    model afterwards. The average is not part of the Trainer's checkpoints: a resumed run
    averages the epochs after the resume only.
    """

    def __init__(
        self,
        model,
        swa_start,
        *,
        swa_lr=None,
        anneal_epochs=10,
        anneal_strategy="cos",
        decay=None,
        bn_batch_size=256,
    ):
        self.swa_start = check_int("swa_start", swa_start, lo=1)
        if swa_lr is not None:
            check_positive("swa_lr", swa_lr)
        self.swa_lr = swa_lr
        self.anneal_epochs = check_int("anneal_epochs", anneal_epochs, lo=0)
        self.anneal_strategy = check_choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        self.bn_batch_size = check_int("bn_batch_size", bn_batch_size, lo=1)
        self.model = model
        self.averaged = AveragedModel(model.params, decay)
        """The running average of the model's parameters."""
        self.first_epoch = None
        """The first epoch folded into the average (None before any)."""

    def __call__(self, trainer, epoch, logs):
        if epoch == self.swa_start and self.swa_lr is not None:
            self._switch_lr(trainer)
        if epoch > self.swa_start:
            if self.first_epoch is None:
                self.first_epoch = epoch
            self.averaged.update_parameters()
        return False

    def _switch_lr(self, trainer):
        """Every group's lr from here on: SWALR per epoch, from the lr now in effect."""
        k0 = trainer.global_step
        steps = trainer.history.meta["steps_per_epoch"]
        for group in trainer.optimizer.param_groups:
            old = group["lr"]
            lr0 = float(old(k0)) if callable(old) else float(old)
            swalr = SWALR(lr0, self.swa_lr, self.anneal_epochs, self.anneal_strategy)
            group["lr"] = Join([old, PerEpoch(swalr, steps)], [k0])  # a number: Constant

    def finish(self, X):
        """Put the averaged parameters into the model (and recompute its batch-norm statistics
        on ``X`` when it has batch norm). RuntimeError when no epoch was averaged (training
        ended at or before ``swa_start``)."""
        if self.averaged.n_averaged == 0:
            raise RuntimeError(
                f"SWA averaged no epoch: training ended at or before swa_start={self.swa_start}"
            )
        self.averaged.copy_to_params()
        update_bn(self.model, X, batch_size=self.bn_batch_size)
        return self.model
