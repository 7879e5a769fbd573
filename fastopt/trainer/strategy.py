"""What the Trainer does differently on one process and on several: the single-process strategy.

The Trainer's loop calls these methods at each point where data parallelism changes something
(which samples a process sees, how gradients and metric sums are combined, whether a stop is
agreed, who writes checkpoints). :class:`LocalStrategy` is the one-process behaviour;
:class:`fastopt.distributed.trainer_strategy.MPIStrategy` overrides it over MPI.
"""

import numpy as np

from ..arrays import array_module
from . import resume


class LocalStrategy:
    """One process: every method is the identity or a plain local action."""

    rank = 0
    world_size = 1
    is_root = True
    context = None
    """The :class:`fastopt.distributed.Context` (None here)."""
    stats = None
    """:class:`fastopt.distributed.CommStats` of the gradient collectives (None here)."""
    collective = False
    """Whether stops and checkpoints must be agreed between processes."""

    # ---- construction
    def check_batch_size(self, batch_size, batch_norm):
        if batch_norm and batch_size < 2:
            raise ValueError(
                f"batch_size={batch_size} with batch norm: training needs at least 2 samples "
                "per batch (the batch statistics of a single sample are undefined); use "
                "batch_size >= 2"
            )

    def agree_seed(self, seed):
        return seed

    def attach(self, model, optimizer):
        """Called once the optimizer is built; returns the ``grad_scale`` of every step."""
        return None

    # ---- the seam of the loop
    def share(self, order):
        """This process's share of an epoch order."""
        return order

    def set_batch_rows(self, lo, hi, m):
        """This step's rows ``[lo, hi)`` of this process's order, ``m`` in the global batch."""

    def reduce_gradients(self, model):
        pass

    def reduce_sums(self, sums):
        return sums

    def any_rank(self, flag):
        return flag

    def slowest(self, seconds):
        return seconds

    # ---- epochs
    def epoch_size(self, trainer, n_train, has_val):
        """Samples the batches of an epoch are cut from: this process's share."""
        return len(trainer.epoch_indices(trainer.epoch, n_train))

    def cut_size(self, order, n_train):
        return order.size

    def skips_last_batch(self, n_epoch, steps, batch_size):
        """With batch norm: whether the last batch would leave a process a single row."""
        return n_epoch % batch_size == 1

    def batch_bounds(self, s, n, batch_size):
        """(lo, hi) into this process's order and the global size of batch ``s``."""
        lo = s * batch_size
        hi = min(lo + batch_size, n)
        return lo, hi, hi - lo

    def stop_now(self, s, steps, requested):
        """Whether to act on a stop request after step ``s`` of ``steps``."""
        return requested

    def stop_after_epoch(self, requested):
        return False

    def end_of_epoch(self, model):
        pass

    def evaluate(self, trainer, X, y, rows):
        xp = array_module(trainer.model.device)[0]
        if rows is not None and xp is not np:
            rows = xp.asarray(rows)
        return trainer.model.evaluate_checked(X, y, idx=rows, batch_size=trainer.eval_batch_size)

    def run_meta(self):
        """Facts about the processes for ``history.meta`` (None values are removed)."""
        return {"world_size": None, "zero": None}

    # ---- checkpoints
    def save_checkpoint(self, trainer, path):
        return resume.save(trainer, path)

    def load_checkpoint(self, trainer, path, plateau_factory):
        return resume.load(trainer, path, plateau_factory)

    def restore_rng(self, trainer, rng_states):
        pass


def strategy_for(distributed, zero):
    """The strategy of ``Trainer(distributed=..., zero=...)``: :class:`LocalStrategy` for one
    process, :class:`fastopt.distributed.trainer_strategy.MPIStrategy` over MPI."""
    if distributed is None or distributed is False:
        if zero:
            raise ValueError("zero=True needs distributed=True (or a distributed.Context)")
        return LocalStrategy()
    from ..distributed import Context
    from ..distributed.trainer_strategy import MPIStrategy

    if distributed is True:
        return MPIStrategy(Context(), zero)
    if isinstance(distributed, Context):
        return MPIStrategy(distributed, zero)
    raise TypeError(
        f"distributed must be a bool or a fastopt.distributed.Context, got {distributed!r}"
    )
