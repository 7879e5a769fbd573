"""fastopt for PyTorch: drop-in ``torch.optim`` optimizers running fastopt's fused kernels.

::

    import fastopt.torch as fot
    opt = fot.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)   # was torch.optim.AdamW
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=1000)

Every algorithm of :data:`fastopt.optim.OPTIMIZERS` that steps with gradients (``SGD``,
``Adagrad``, ``RMSprop``, ``Adadelta``, ``Adam``, ``AdamW``, ``Adamax``, ``NAdam``, ``RAdam``,
``Rprop``, ``ASGD``, ``Yogi``, ``Lion``, ``LAMB``, ``LARS``, ``NovoGrad``, ``Adafactor``,
``Muon``, the schedule-free pair) is a ``torch.optim.Optimizer`` subclass here, generated from the fastopt class: same
hyperparameters and defaults, plus fastopt's options as keywords, plus the implementation
keywords of its ``torch.optim`` namesake (``foreach``, ``fused``: accepted, fastopt always runs
its fused kernels; ``capturable=True``, ``differentiable=True``: refused;
:mod:`fastopt.torch.dropin`). ``lr`` may be a one-element tensor, as in torch. Each param
group's trainable parameters are rebound to views of one flat buffer per dtype
(:mod:`fastopt.torch.flat`), so a step is one kernel call per group; state_dicts are torch's and
load both ways.
``SGDScheduleFree`` and ``AdamWScheduleFree`` also have ``train()`` / ``eval()``, which swap
the parameters between the gradient point and the averaged one
(:mod:`fastopt.torch.schedule_free`).

torch is an optional dependency (``pip install fastopt[torch]``); ``import fastopt`` never
imports it.
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "fastopt.torch needs PyTorch: pip install fastopt[torch] (or install torch)"
    ) from exc

from ..optim import OPTIMIZERS
from . import dropin
from .flat import FlatBuffer, flatten_
from .lbfgs import LBFGS
from .offload import CPUOffload
from .optimizer import FastoptOptimizer, split_arguments
from .schedule_free import ScheduleFreeModes, is_schedule_free


def _adapter_class(core_class):
    """The ``torch.optim.Optimizer`` subclass running ``core_class`` (one of OPTIMIZERS)."""
    import inspect

    sig = inspect.signature(core_class.__init__)
    params = [p for name, p in sig.parameters.items() if name != "self"]
    flags = dropin.torch_flags(core_class.__name__)  # torch's foreach=, fused=, ... if it has X
    flags = {f: v for f, v in flags.items() if f not in sig.parameters}  # Adafactor: foreach=
    var = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p not in var] + dropin.keyword_parameters(flags) + var
    doc = (
        f"``torch.optim``-compatible {core_class.__name__} running fastopt's kernels "
        f"(:class:`fastopt.optim.{core_class.__name__}`; see :class:`FastoptOptimizer`).\n\n"
        + (core_class.__doc__ or "")
    )
    bases = (FastoptOptimizer,)
    if is_schedule_free(core_class):  # train() / eval() swap the parameters to x and back
        bases = (ScheduleFreeModes, FastoptOptimizer)
    return type(
        core_class.__name__,
        bases,
        {
            "core_class": core_class,
            "torch_flags": tuple(flags),
            "torch_defaults": {
                k: v
                for k, v in dropin.torch_defaults(core_class.__name__).items()
                if k not in sig.parameters
            },
            "__doc__": doc,
            "__module__": __name__,
            "__qualname__": core_class.__name__,
            "__signature__": sig.replace(parameters=params),
        },
    )


OPTIMIZER_CLASSES = {
    name: _adapter_class(cls) for name, cls in OPTIMIZERS.items() if not cls.requires_closure
}
"""Lowercase name -> adapter class, one per entry of :data:`fastopt.optim.OPTIMIZERS` that steps
with gradients (L-BFGS steps with a closure: :class:`fastopt.torch.LBFGS`). State that is not one value per element (Adafactor's row and column
factors, NovoGrad's per-tensor moment) keeps a flat buffer of its own, each parameter's share
back to back (:class:`fastopt.torch.optimizer.StateLayout`), in torch's shapes in
``state_dict()``."""

globals().update({cls.__name__: cls for cls in OPTIMIZER_CLASSES.values()})

__all__ = [
    "OPTIMIZER_CLASSES",
    "CPUOffload",
    "FastoptOptimizer",
    "FlatBuffer",
    "LBFGS",
    "flatten_",
    "split_arguments",
    *(cls.__name__ for cls in OPTIMIZER_CLASSES.values()),
]
