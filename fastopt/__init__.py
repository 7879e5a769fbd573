"""fastopt: compiled-kernel optimizers for NumPy and CUDA arrays with torch.optim semantics."""

from .dispatch import backends
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

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Lion",
    "NAdam",
    "Optimizer",
    "ParamSet",
    "RAdam",
    "RMSprop",
    "Rprop",
    "Yogi",
    "backends",
    "__version__",
]
