"""The Trainer's checkpoints: what is saved beside the model and optimizer, writing it, and
putting it back (one process; :mod:`fastopt.distributed.trainer_strategy` does the collective
versions with the same pieces)."""

import math

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


def check_trainer_checkpoint(ckpt, path):
    """The saved trainer state of ``ckpt``, or CheckpointError if it has none."""
    state = (ckpt.extra or {}).get("trainer") if isinstance(ckpt.extra, dict) else None
    if not isinstance(state, dict):
        raise checkpoint.CheckpointError(
            f"{path!r} is not a Trainer checkpoint (no trainer state)", path
        )
    return state


def load(trainer, path, plateau_factory):
    """Restore a one-process trainer's model, optimizer, plateau and dropout generator from
    ``path``; returns (trainer state, best weights, saved per-rank RNG states or None).
    ``plateau_factory()`` builds the trainer's plateau scheduler (or None) when the checkpoint
    holds one and the trainer has none yet."""
    ckpt = checkpoint.load(path)
    state = check_trainer_checkpoint(ckpt, path)
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
