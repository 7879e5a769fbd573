"""fastopt: compiled-kernel optimizers for NumPy and CUDA arrays with torch.optim semantics."""

from . import nn, schedules, trainer
from .accumulate import GradientAccumulator
from .checkpoint import CheckpointError, load, save
from .clipping import all_finite, clip_grad_norm, clip_grad_value, global_norm
from .dispatch import backends
from .ema import EMA
from .nn import MLP
from .optim import (
    SGD,
    Adadelta,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    Lion,
    NAdam,
    Optimizer,
    RAdam,
    RMSprop,
    Rprop,
    Yogi,
)
from .paramset import ParamSet
from .schedules import ReduceLROnPlateau
from .trainer import History, Trainer

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "CheckpointError",
    "GradientAccumulator",
    "History",
    "MLP",
    "Lion",
    "NAdam",
    "Optimizer",
    "ParamSet",
    "RAdam",
    "RMSprop",
    "ReduceLROnPlateau",
    "Rprop",
    "Trainer",
    "Yogi",
    "__version__",
    "all_finite",
    "backends",
    "clip_grad_norm",
    "clip_grad_value",
    "global_norm",
    "load",
    "nn",
    "save",
    "schedules",
    "trainer",
]
