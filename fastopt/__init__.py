"""fastopt: compiled-kernel optimizers for NumPy and CUDA arrays with torch.optim semantics.

``import fastopt`` loads the optimizer core only (optimizers, ParamSet, clipping, EMA, gradient
accumulation, the backend registry). The model, training loop, schedules, checkpoints, the
scikit-learn estimators and the command line load on first use of one of their names
(``fastopt.MLP``, ``fastopt.Trainer``, ``fastopt.save``, ...; PEP 562), so importing the core
never pays for them.
"""

import importlib

from .accumulate import GradientAccumulator
from .clipping import all_finite, clip_grad_norm, clip_grad_value, global_norm
from .dispatch import backends
from .ema import EMA
from .optim import (
    ASGD,
    LAMB,
    LARS,
    LBFGS,
    SGD,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    AdamWScheduleFree,
    Lion,
    Muon,
    NAdam,
    NovoGrad,
    Optimizer,
    RAdam,
    RMSprop,
    Rprop,
    SGDScheduleFree,
    Yogi,
    muon_param_groups,
)
from .paramset import ParamSet

__version__ = "0.1.0"

_LAZY_MODULES = ("nn", "trainer", "schedules", "checkpoint", "sklearn", "cli", "swa")
"""Submodules that ``fastopt.<name>`` imports on first access."""

_LAZY_NAMES = {
    "MLP": "nn",
    "Trainer": "trainer",
    "History": "trainer",
    "ReduceLROnPlateau": "schedules",
    "save": "checkpoint",
    "load": "checkpoint",
    "CheckpointError": "checkpoint",
}
"""Public names -> the submodule that defines them, imported on first access."""


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))


__all__ = [
    "ASGD",
    "EMA",
    "SGD",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "AdamWScheduleFree",
    "Adamax",
    "CheckpointError",
    "GradientAccumulator",
    "History",
    "LBFGS",
    "MLP",
    "LAMB",
    "LARS",
    "Lion",
    "Muon",
    "NAdam",
    "NovoGrad",
    "Optimizer",
    "ParamSet",
    "RAdam",
    "RMSprop",
    "ReduceLROnPlateau",
    "Rprop",
    "SGDScheduleFree",
    "Trainer",
    "Yogi",
    "__version__",
    "all_finite",
    "backends",
    "clip_grad_norm",
    "clip_grad_value",
    "global_norm",
    "load",
    "muon_param_groups",
    "nn",
    "save",
    "schedules",
    "swa",
    "trainer",
]
