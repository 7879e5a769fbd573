"""The Trainer's checkpoints: what is saved beside the model and optimizer, writing it, and
putting it back (one process; :mod:`fastopt.distributed.trainer_strategy` does the collective
versions with the same pieces)."""

import math
import numbers

import numpy as np

from .. import checkpoint
from .history import History, jsonable


def trainer_state(trainer):
    """(the trainer's JSON state, the checkpoint's ``extra`` holding it and the best weights)."""
    state = {
        "epoch": trainer.epoch,
        "global_step": trainer.global_step,
        "seed": trainer.seed,
        "history": jsonable(dict(trainer.history)),
        "meta": jsonable(trainer.history.meta),
        **trainer.early_stopping.state(),
        "interrupted": trainer.interrupted,
    }
    extra = {"trainer": state}
    if trainer.early_stopping.best_state is not None:
        extra["best_state"] = trainer.early_stopping.best_state
    return state, extra


def save(trainer, path):
    """Write the whole training state of a one-process trainer to ``path`` (atomic)."""
    _, extra = trainer_state(trainer)
    return checkpoint.save(
        path,
        params=trainer.model.arrays(),
        optimizer=trainer.optimizer,
        plateau=trainer.plateau,
        rng=trainer.rng,
        extra=extra,
    )


def _count(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0


def _number(v):
    return v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool))


def _history(v):
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(vs, list) and all(_number(x) for x in vs)
        for k, vs in v.items()
    )


_FIELDS = (
    ("epoch", True, _count, "an integer >= 0"),
    ("global_step", True, _count, "an integer >= 0"),
    ("seed", True, _count, "an integer >= 0"),
    ("history", True, _history, "a dict of metric name -> list of numbers (or null)"),
    ("meta", False, lambda v: v is None or isinstance(v, dict), "a dict or null"),
    ("best", False, _number, "a number or null"),
    ("best_epoch", False, lambda v: v is None or _count(v), "an integer >= 0 or null"),
    ("wait", False, _count, "an integer >= 0"),
)
"""(field, required, check, what it must be) for every field of the saved trainer state that
:func:`apply_state` reads; the optional ones have defaults there (older checkpoints)."""


def check_trainer_checkpoint(ckpt, path, model=None):
    """The saved trainer state of ``ckpt``, every field :func:`apply_state` reads checked (and,
    with ``model``, the saved best weights against it); CheckpointError naming the first bad
    one. Resuming restores nothing before this passes."""
    state = (ckpt.extra or {}).get("trainer") if isinstance(ckpt.extra, dict) else None
    if not isinstance(state, dict):
        raise checkpoint.CheckpointError(
            f"{path!r} is not a Trainer checkpoint (no trainer state)", path
        )

    def bad(field, what):
        return checkpoint.CheckpointError(
            f"{path!r}: the saved trainer state's {field!r} {what}", path
        )

    for field, required, check, what in _FIELDS:
        if field not in state:
            if required:
                raise bad(field, "is missing")
        elif not check(state[field]):
            raise bad(field, f"must be {what}, got {state[field]!r:.80}")
    best_state = ckpt.extra.get("best_state")
    if best_state is not None:
        _check_best_state(best_state, model, bad)
    return state


def _check_best_state(best_state, model, bad):
    """The best weights: a dict of arrays, with ``model`` its names and shapes."""
    if not isinstance(best_state, dict):
        raise bad("best_state", f"must be a dict of arrays, got {type(best_state).__name__}")
    if model is None:
        return
    mine = model.arrays()
    if set(best_state) != set(mine):
        missing, unexpected = (
            sorted(set(mine) - set(best_state)),
            sorted(set(best_state) - set(mine)),
        )
        raise bad(
            "best_state", f"does not match the model: missing {missing}, unexpected {unexpected}"
        )
    for k, v in best_state.items():
        if tuple(np.shape(v)) != tuple(mine[k].shape):
            raise bad(
                "best_state",
                f"holds {k!r} of shape {tuple(np.shape(v))}, the model's is {tuple(mine[k].shape)}",
            )


def load(trainer, path, plateau_factory):
    """Restore a one-process trainer's model, optimizer, plateau and dropout generator from
    ``path``; returns (trainer state, best weights, saved per-rank RNG states or None).
    ``plateau_factory()`` builds the trainer's plateau scheduler (or None) when the checkpoint
    holds one and the trainer has none yet."""
    ckpt = checkpoint.load(path)
    state = check_trainer_checkpoint(ckpt, path, trainer.model)  # before anything is restored
    if ckpt.plateau_state is not None and trainer.plateau is None:
        trainer.plateau = plateau_factory()
    ckpt.restore(
        params=trainer.model.arrays(),
        optimizer=trainer.optimizer,
        plateau=trainer.plateau if ckpt.plateau_state is not None else None,
        rng=trainer.rng,
    )
    return state, ckpt.extra.get("best_state"), None


def apply_state(trainer, state, best_state):
    """Set the loop's counters, history and early-stopping state from a saved trainer state."""
    trainer.seed = int(state["seed"])
    trainer.epoch = int(state["epoch"])
    trainer.global_step = int(state["global_step"])
    trainer.history = History(
        {k: [math.nan if v is None else v for v in vs] for k, vs in state["history"].items()},
        meta=state.get("meta"),
    )
    trainer.early_stopping.load(state, best_state)
