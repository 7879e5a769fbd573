"""``train()`` / ``eval()`` of ``fastopt.torch.SGDScheduleFree`` and ``AdamWScheduleFree``.

A schedule-free optimizer's parameters hold the gradient point y while training; ``eval()`` puts
the averaged point x into them and ``train()`` puts y back, as
:class:`fastopt.optim.schedulefree.ScheduleFree` (and the ``schedulefree`` package's
optimizers) do. The swap runs the fastopt core's own ``eval()`` / ``train()`` over the flat
buffers (the same kernel, so the same bits as the core over the same values); the mode is kept
in the ``state_dict`` as the core keeps it, under ``"train_mode"``.
"""

import torch

from ..optim.schedulefree import ScheduleFree

HOST_SCALARS = ("weight_sum", "lr_max")
"""The schedule-free core's scalar state per parameter, 0-d tensors in ``state_dict()`` as
``"step"`` is; :func:`scalars_as_floats` hands them to the loader as floats."""


def is_schedule_free(core_class):
    """Whether ``core_class`` (a fastopt optimizer class) is one of the schedule-free ones."""
    return issubclass(core_class, ScheduleFree)


class ScheduleFreeModes:
    """Mixin of the schedule-free :class:`fastopt.torch.FastoptOptimizer` classes: the train
    and eval modes of :class:`fastopt.optim.schedulefree.ScheduleFree`.

    ``train_mode`` says which point the parameters hold (True: y, where gradients are taken;
    False: x, for evaluation). The optimizer starts in train mode, as the fastopt core does
    (the ``schedulefree`` package starts in eval mode and needs ``train()`` before the first
    step; before it both points are the same). ``step()`` in eval mode raises. Parameters
    without state (never stepped) hold both points and stay as they are.
    """

    def __init__(self, params, *args, **kwargs):
        self.train_mode = True
        super().__init__(params, *args, **kwargs)

    def step(self, closure=None):
        """One schedule-free step (``FastoptOptimizer.step``); only in train mode, before the
        closure runs."""
        if not self.train_mode:
            raise RuntimeError(
                f"{type(self).__name__}.step() in eval mode: the parameters hold the averaged "
                "point x; call train() first"
            )
        return super().step(closure)

    step.hooked = True  # torch.optim.Optimizer then leaves it unwrapped (FastoptOptimizer.step)

    def eval(self):
        """Put the evaluation point x into the parameters (no-op in eval mode)."""
        if self.train_mode:
            self._swap(to_train=False)

    def train(self):
        """Put the gradient point y back into the parameters (no-op in train mode)."""
        if not self.train_mode:
            self._swap(to_train=True)

    def _swap(self, to_train):
        """The core's ``train()`` / ``eval()`` over every run of parameters with state, with
        the torch groups' momentum (``betas[0]`` or ``momentum``) as of now. An edited
        ``opt.state`` is taken first, as a step takes it (a parameter whose state was cleared
        has no z to swap with, as in the ``schedulefree`` package)."""
        if self.state is not self._state_seen or self._edits.edited:
            self._reconcile_state()
        key = self._stateful_key()
        if key:
            core, units = self._bound_core(key)
            for u in units:  # a core not stepped yet (after load_state_dict) picks it now
                core._ensure_backend(u)
            core.train_mode = self.train_mode
            if to_train:
                core.train()
            else:
                core.eval()
        self.train_mode = to_train

    def state_dict(self):
        """The torch-format state_dict with ``"train_mode"`` (which point the parameters hold),
        as :meth:`fastopt.optim.schedulefree.ScheduleFree.state_dict` keeps it."""
        return dict(super().state_dict(), train_mode=self.train_mode)

    def load_state_dict(self, state_dict):
        """Load a state_dict and its ``"train_mode"`` (True when absent); the parameters must
        hold the point it says (nothing moves them). A ``"train_mode"`` that is not a bool
        raises TypeError before anything changes."""
        mode = state_dict.get("train_mode", True) if hasattr(state_dict, "get") else True
        if not isinstance(mode, bool):
            raise TypeError(f"state_dict train_mode must be a bool, got {mode!r}")
        super().load_state_dict(scalars_as_floats(state_dict))
        self.train_mode = mode


def scalars_as_floats(state_dict):
    """``state_dict`` with each one-element tensor of :data:`HOST_SCALARS` as a float: torch's
    loader would cast it to the parameter's dtype (rounding it for 16-bit parameters) and
    :mod:`fastopt.torch.state` takes the 0-d tensors it does not name for state arrays.
    Anything else (a malformed state_dict included) passes unchanged, for the loaders to check."""
    state = state_dict.get("state") if hasattr(state_dict, "get") else None
    if not isinstance(state, dict):
        return state_dict
    out = {}
    for index, entry in state.items():
        if isinstance(entry, dict):
            entry = {n: _as_float(v) if n in HOST_SCALARS else v for n, v in entry.items()}
        out[index] = entry
    return {**state_dict, "state": out}


def _as_float(v):
    return float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
