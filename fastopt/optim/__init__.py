"""Optimizer classes: torch.optim's names, arguments, defaults and semantics (plus Yogi, Lion and schedule-free SGD/AdamW)."""

from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .asgd import ASGD
from .base import Optimizer
from .lamb import LAMB
from .lars import LARS
from .lbfgs import LBFGS
from .lion import Lion
from .muon import Muon, muon_param_groups
from .nadam import NAdam
from .novograd import NovoGrad
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .schedulefree import AdamWScheduleFree, SGDScheduleFree
from .sgd import SGD
from .yogi import Yogi

OPTIMIZERS = {
    cls.__name__.lower(): cls
    for cls in (
        SGD,
        Adagrad,
        RMSprop,
        Adadelta,
        Adam,
        AdamW,
        Adamax,
        NAdam,
        RAdam,
        Rprop,
        Yogi,
        Lion,
        LAMB,
        LARS,
        NovoGrad,
        Muon,
        Adafactor,
        ASGD,
        SGDScheduleFree,
        AdamWScheduleFree,
        LBFGS,
    )
}
"""The registry of optimizer classes by lowercase name (``"adamw"`` -> :class:`AdamW`), in the
order they are listed to users. The CLI, the playground, the benchmarks, the scikit-learn
estimators and the tests read it; a new algorithm is added here once."""

__all__ = [
    "OPTIMIZERS",
    "Optimizer",
    "muon_param_groups",
    *(cls.__name__ for cls in OPTIMIZERS.values()),
]
