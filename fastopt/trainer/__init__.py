"""Minibatch training of a :class:`fastopt.nn.MLP` with any fastopt optimizer.

::

    from fastopt.nn import MLP
    from fastopt.trainer import Trainer

    model = MLP(64, (128,), 10, seed=0)
    trainer = Trainer(model, lr=1e-3, batch_size=64, epochs=50, validation_split=0.1,
                      patience=5, seed=0, checkpoint="run.ckpt")
    history = trainer.fit(X, y)          # dict metric -> list per epoch; history.to_json()
    trainer.evaluate(X_test, y_test)     # {"loss": ..., "accuracy": ...}

Minibatch SGD as the textbooks describe it (Goodfellow et al., *Deep Learning* 8.1.3; D2L 12.5):
every epoch visits each training sample exactly once, in a fresh random order (sampling without
replacement), in batches of ``batch_size`` (the last one smaller unless ``drop_last``). The
order of epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(n)``, a pure function
of the seed and the epoch (the same rule as ``fastopt.distributed.shard_indices`` with one
rank), so a resumed run shuffles exactly as an uninterrupted one.

One step: gather the batch rows into the model's preallocated workspace, forward, loss, backward
(into the ParamSet's gradient buffer), :meth:`Trainer.reduce_gradients` (a no-op here), and one
``optimizer.step``. Nothing is allocated per step.

Data parallelism over MPI (``distributed=True``, see :class:`Trainer`) goes through the small
overridable methods :meth:`Trainer.epoch_indices` (which samples this process sees in an
epoch), :meth:`Trainer.reduce_gradients` (average the gradient buffer over processes) and
:meth:`Trainer.reduce_sums` (sum the metric accumulators over processes), plus
:attr:`Trainer.is_root` (only the root writes files and shows progress).
"""

from .history import History
from .trainer import Trainer

__all__ = ["History", "Trainer"]
