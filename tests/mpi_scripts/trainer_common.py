"""The small classification problem and Trainer settings shared by the ``trainer_*.py`` MPI
scripts and ``tests/test_distributed.py`` (which trains the one-process references with them).

100 samples, 6 features, 3 classes; ``validation_split=0.2`` leaves 80 training samples: with
the global batch 12 an epoch is 6 full batches and a last one of 8 (per rank 6 and 4 on 2 ranks,
4 and 3/3/2 on 3 ranks). MLP 6-10-3 in float64: 103 parameters (uneven ZeRO shards).
"""

import numpy as np

import fastopt as fo
from fastopt.nn import MLP
from fastopt.trainer import Trainer

N, D, K = 100, 6, 3
BATCH = 12
EPOCHS = 2

# name -> (optimizer class, Trainer keyword arguments)
SCENARIOS = {
    "sgd": (fo.SGD, {"lr": 0.05, "optimizer_kwargs": {"momentum": 0.9}}),
    "adam": (fo.Adam, {"lr": 0.01, "max_grad_norm": 0.5}),
    # two param groups (weights decayed, the rest not): data parallel only
    "sgd_wd": (fo.SGD, {"lr": 0.05, "weight_decay": 1e-2, "optimizer_kwargs": {"momentum": 0.9}}),
    # a global batch the ranks share unevenly (7/6, 5/4/4 rows) and a last batch of 2 rows
    # (3 ranks: 1/1/0, one rank contributes nothing)
    "sgd_b13": (fo.SGD, {"lr": 0.05, "batch_size": 13, "optimizer_kwargs": {"momentum": 0.9}}),
}
ZERO_SCENARIOS = ("sgd", "adam")

# early stopping + plateau on the validation loss: the lr halves after epochs 3 and 5, training
# stops after epoch 6 and the weights of epoch 4 are restored (margins >= 0.007 in val_loss)
STOPPING = {
    "patience": 2,
    "min_delta": 0.07,
    "plateau": {"patience": 0, "factor": 0.5, "threshold": 0.07, "threshold_mode": "abs"},
}
STOPPING_EPOCHS = 8


def data():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((N, D))
    W = rng.standard_normal((D, K))
    y = np.argmax(X @ W + 0.3 * rng.standard_normal((N, K)), axis=1)
    return X, y


def model(seed=0, **kw):
    return MLP(D, (10,), K, dtype="float64", seed=seed, **kw)


def trainer(m, name, *, cls=Trainer, **kw):
    opt, settings = SCENARIOS[name]
    args = dict(
        optimizer=opt, batch_size=BATCH, epochs=EPOCHS, validation_split=0.2, seed=5, progress=False
    )
    args.update(settings)
    args.update(kw)
    return cls(m, **args)


def flat_history(h):
    """The history as plain lists (for JSON), without the wall-clock entries."""
    return {k: list(v) for k, v in h.items() if k not in ("time", "samples_per_s")}
