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

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings

import numpy as np

from . import checkpoint as _checkpoint
from .schedules import PerEpoch, ReduceLROnPlateau

__all__ = ["History", "Trainer"]

_MAXIMIZE = ("accuracy",)


class History(dict):
    """Per-epoch metrics, ``history[name]`` a list with one value per epoch: ``epoch``,
    ``loss`` and the training metrics, ``val_*`` with validation, ``lr``, ``time`` (seconds)
    and ``samples_per_s``. ``meta`` holds run facts (``best_epoch``, ``stopped_early``,
    ``interrupted``, ...). :meth:`to_json` / :meth:`from_json` round-trip both."""

    def __init__(self, *args, meta=None, **kw):
        super().__init__(*args, **kw)
        self.meta = dict(meta or {})

    def append(self, row):
        for k, v in row.items():
            self.setdefault(k, []).append(v)

    def to_json(self, path=None, *, indent=1):
        """The history as JSON text (``{"metrics": {...}, "meta": {...}}``; non-finite values
        as null); written to ``path`` too when given."""
        text = json.dumps(
            {"metrics": _jsonable(dict(self)), "meta": _jsonable(self.meta)}, indent=indent
        )
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path):
        """Read :meth:`to_json` output (a JSON string or a file path)."""
        text = text_or_path
        if isinstance(text, os.PathLike) or not text.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        d = json.loads(text)
        return cls(
            {k: [math.nan if v is None else v for v in vs] for k, vs in d["metrics"].items()},
            meta=d.get("meta"),
        )


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


class Trainer:
    """Train ``model`` (a :class:`fastopt.nn.MLP`) by minibatch gradient descent.

    Optimizer: ``optimizer`` is a fastopt optimizer instance over the model's parameters
    (``model.params`` or ``model.param_groups()``), an optimizer class (built as
    ``cls(model.param_groups(weight_decay), lr=lr, **optimizer_kwargs)``, or over
    ``model.params`` when ``weight_decay`` is 0) or ``None`` for Adam.
    ``weight_decay`` is the L2 coefficient on the weights only (biases and batch-norm parameters
    are not decayed).

    Learning rate: ``schedule`` (a callable ``k -> lr``, e.g. a ``fastopt.schedules`` object)
    replaces every group's lr; ``schedule_unit="step"`` advances it per optimizer step,
    ``"epoch"`` once per epoch (:class:`fastopt.schedules.PerEpoch`). ``plateau``: ``True``, a
    dict of :class:`~fastopt.schedules.ReduceLROnPlateau` arguments, or an instance; it watches
    ``monitor`` at the end of every epoch.

    Clipping: ``max_grad_norm`` / ``max_grad_value`` / ``skip_nonfinite`` are set on the optimizer
    (fused into its step).

    Validation: ``validation_split`` (a fraction of the training data held out, stratified for
    class labels, drawn from ``seed``) or ``fit(validation_data=(X, y))``. Metrics: ``loss`` and
    ``accuracy`` for classification, ``loss``, ``mae`` and ``rmse`` for regression, on the
    training batches (running over the epoch, as Keras reports them) and on the validation set.

    Early stopping: ``patience`` epochs without an improvement of ``monitor`` (default
    ``val_loss``, or ``loss`` without validation) by more than ``min_delta`` stop training;
    ``restore_best_weights`` then puts the best epoch's parameters back.

    Progress: a tqdm bar per epoch with loss, metric and samples/s; ``progress=None`` shows it
    when tqdm is installed and stderr is a terminal. ``verbose=1`` prints one line per epoch.

    Reproducibility: ``seed`` fixes the validation split, the shuffling and the dropout masks
    (the model's own seed fixes its initialization); the same seeds give bit-identical results.

    Checkpoints: ``checkpoint=path`` saves the model, optimizer, plateau scheduler, dropout RNG,
    history and early-stopping state every ``checkpoint_every`` epochs and when training ends;
    ``fit(..., resume=path)`` continues from one. Ctrl-C (SIGINT) during ``fit`` finishes the
    current step, writes the checkpoint and ``history_path``, then re-raises KeyboardInterrupt
    (``on_interrupt="stop"``: returns the history instead); ``trainer.history`` holds the epochs
    completed so far.

    ``step_threads``: Numba threads for the optimizer step (``None``: leave Numba's setting).
    ``"auto"`` is one thread on the CPU: the step sits between multithreaded BLAS calls whose
    worker threads keep spinning for a while, and a second (Numba) thread pool fighting them for
    the cores made an epoch of a 784-256-256-10 MLP on 2 cores 6x slower (4.1 s instead of
    0.6 s); the single-threaded Adam step over its 269k parameters takes ~0.12 ms.

    ``callbacks``: callables ``cb(trainer, epoch, logs)`` run after every epoch; one returning
    True stops training.

    Data parallelism over MPI (``mpiexec -n N python train.py``; needs mpi4py):
    ``distributed=True`` (``MPI.COMM_WORLD``) or a :class:`fastopt.distributed.Context`. Every
    rank builds the same model and trainer and calls ``fit`` with the whole dataset; then

    - ``batch_size`` is the GLOBAL batch: global batch ``k`` is positions ``[k*B, (k+1)*B)`` of
      the one-process epoch order ``default_rng([seed, epoch]).permutation(n)`` and rank ``r``
      takes the positions ``p`` with ``p % world == r`` (so rank ``r`` visits ``perm[r::world]``,
      :func:`fastopt.distributed.shard_indices` without its padding), ``B/world`` rows per rank
      when ``world`` divides ``B``. Each rank's mean gradient is weighted by its share of the
      global batch, so N ranks train exactly as one process with batch ``B`` (to rounding), also
      for a last partial batch or a ``B`` that ``world`` does not divide (then one extra scaling
      pass over the gradient per step). Hyperparameters, steps per epoch and schedules do not
      depend on the number of ranks. ``batch_size`` must be at least ``world`` (``2*world`` with
      batch norm).
    - The seed is rank 0's; the parameters are broadcast from rank 0 at construction, the
      parameters and buffers (batch norm, input standardization) again at the start of ``fit``.
    - Gradients: ``zero=False``: one in-place ``Allreduce`` of the gradient buffer per step, the
      division by ``world`` folded into the update (:class:`~fastopt.distributed.DataParallel`),
      with any optimizer (also ``weight_decay``'s two param groups). ``zero=True``: ZeRO-1
      (:class:`~fastopt.distributed.ZeroRedundancyOptimizer`), each rank keeps the optimizer
      state of 1/world of the parameters; ``optimizer`` must then be a class (or an instance over
      ``model.params``, whose class and settings are used) and ``weight_decay`` 0 (pass the
      optimizer's own ``weight_decay`` in ``optimizer_kwargs`` to decay every parameter).
      Clipping and non-finite skipping act on the averaged gradient.
    - Metrics: every rank sums loss/statistics over its rows and the sums are added over the
      ranks (one small Allreduce per epoch), so ``loss``, ``val_*``... are sample-weighted
      averages, identical on every rank, equal to the one-process values; the validation set
      is split across the ranks the same way. ``time`` is the slowest rank's. Early stopping,
      the plateau scheduler and the callbacks' stop requests (any rank's) are therefore decided
      identically everywhere.
    - Batch norm normalizes with each rank's own batch statistics (as PyTorch's
      DistributedDataParallel without SyncBatchNorm); the running statistics are averaged over
      the ranks at the end of every epoch, so evaluation and checkpoints see identical buffers.
    - Dropout: rank ``r`` draws its masks from ``default_rng([seed, 2**32, r])`` (rank 0's is the
      one-process generator).
    - Only rank 0 shows the progress bar, prints ``verbose`` lines and warnings and writes
      ``history_path``; ``checkpoint`` is written collectively as ONE file by rank 0 (a ZeRO
      state gathered into the one-process layout, plus every rank's dropout generator).
      ``fit(..., resume=path)`` works with any number of ranks (only rank 0 reads the file) and
      a distributed checkpoint resumes in one process, and vice versa. Ctrl-C: the ranks agree
      on a stop request every 16 steps and at the end of each epoch, then stop together and
      write the checkpoint; a KeyboardInterrupt on one rank only (a second Ctrl-C, a callback
      raising it) propagates at once, without a checkpoint.
    """

    def __init__(
        self,
        model,
        optimizer=None,
        *,
        lr=1e-3,
        weight_decay=0.0,
        optimizer_kwargs=None,
        batch_size=32,
        epochs=10,
        shuffle=True,
        drop_last=False,
        schedule=None,
        schedule_unit="step",
        max_grad_norm=None,
        max_grad_value=None,
        skip_nonfinite=None,
        validation_split=0.0,
        monitor=None,
        patience=None,
        min_delta=0.0,
        restore_best_weights=True,
        plateau=None,
        progress=None,
        verbose=0,
        seed=None,
        checkpoint=None,
        checkpoint_every=1,
        history_path=None,
        on_interrupt="raise",
        callbacks=(),
        eval_batch_size=1024,
        step_threads="auto",
        distributed=False,
        zero=False,
    ):
        from .optim import Adam, Optimizer

        self.model = model
        self._dist = _context(distributed)
        self.zero = _bool("zero", zero)
        if self.zero and self._dist is None:
            raise ValueError("zero=True needs distributed=True (or a distributed.Context)")
        self.rank = 0 if self._dist is None else self._dist.rank
        """This process's rank (0 without ``distributed``)."""
        self.world_size = 1 if self._dist is None else self._dist.world_size
        """Number of processes training together (1 without ``distributed``)."""
        self._reducer = None  # the DataParallel / ZeroRedundancyOptimizer doing the collectives
        self._grad_scale = None
        self._batch_weight = 1.0
        if optimizer is None:
            optimizer = Adam
        if self.zero:
            for name, value in (
                ("max_grad_norm", max_grad_norm),
                ("max_grad_value", max_grad_value),
                ("skip_nonfinite", skip_nonfinite),
            ):
                if value is not None:
                    _check_option(name, value)
            optimizer = self._build_zero(
                optimizer, lr, weight_decay, optimizer_kwargs,
                max_grad_norm, max_grad_value, skip_nonfinite,
            )  # fmt: skip
            self.optimizer = self._reducer = optimizer
            self._grads = None  # the ParamSet's gradient buffer
        else:
            if isinstance(optimizer, type):
                if not issubclass(optimizer, Optimizer):
                    raise TypeError(
                        f"optimizer class {optimizer.__name__} is not a fastopt optimizer"
                    )
                # without weight decay one group over the whole ParamSet: one kernel per step
                params = model.param_groups(weight_decay) if weight_decay else model.params
                optimizer = optimizer(params, lr=lr, **dict(optimizer_kwargs or {}))
            elif optimizer_kwargs:
                raise ValueError("optimizer_kwargs apply only when optimizer is a class")
            self.optimizer = optimizer
            self._grads = model.grads_for(optimizer)  # raises if it is over other arrays
            for name, value in (
                ("max_grad_norm", max_grad_norm),
                ("max_grad_value", max_grad_value),
                ("skip_nonfinite", skip_nonfinite),
            ):
                if value is not None:
                    if not hasattr(optimizer, name):
                        raise TypeError(f"{type(optimizer).__name__} has no {name} option")
                    _check_option(name, value)
                    setattr(optimizer, name, value)
            if self._dist is not None:
                from .distributed import DataParallel

                # no optimizer: the Trainer steps its own (any param groups) with grad_scale
                self._reducer = DataParallel(
                    model.params, None, comm=self._dist.comm, root=self._dist.root
                )  # broadcasts the parameters from the root
                self._grad_scale = 1.0 / self.world_size

        self.batch_size = _posint("batch_size", batch_size)
        if self._dist is not None:
            need = 2 * self.world_size if model.batch_norm else self.world_size
            if self.batch_size < need:
                raise ValueError(
                    f"batch_size is the global batch; with {self.world_size} ranks"
                    f"{' and batch norm' if model.batch_norm else ''} it must be >= {need}, "
                    f"got {self.batch_size}"
                )
        self.epochs = _nonneg_int("epochs", epochs)
        self.eval_batch_size = _posint("eval_batch_size", eval_batch_size)
        self.shuffle = _bool("shuffle", shuffle)
        self.drop_last = _bool("drop_last", drop_last)
        if schedule is not None and not callable(schedule):
            raise TypeError("schedule must be a callable k -> lr (e.g. a fastopt.schedules one)")
        if schedule_unit not in ("step", "epoch"):
            raise ValueError(f"schedule_unit must be 'step' or 'epoch', got {schedule_unit!r}")
        self.schedule = schedule
        self.schedule_unit = schedule_unit
        if not (isinstance(validation_split, (int, float)) and 0 <= validation_split < 1):
            raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
        self.validation_split = float(validation_split)
        self.monitor = monitor
        if patience is not None:
            patience = _nonneg_int("patience", patience)
        self.patience = patience
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.min_delta = float(min_delta)
        self.restore_best_weights = _bool("restore_best_weights", restore_best_weights)
        self._plateau_arg = plateau
        self.plateau = None
        self.progress = progress
        self.verbose = int(verbose)
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        self.seed = int(seed)
        if self._dist is not None:
            self.seed = int(self._dist.comm.bcast(self.seed, root=self._dist.root))
        self.rng = self._dropout_rng()
        """Generator of the dropout masks (its state is saved in checkpoints)."""
        self.checkpoint_path = checkpoint
        self.checkpoint_every = _posint("checkpoint_every", checkpoint_every)
        self.history_path = history_path
        if on_interrupt not in ("raise", "stop"):
            raise ValueError(f"on_interrupt must be 'raise' or 'stop', got {on_interrupt!r}")
        self.on_interrupt = on_interrupt
        self.callbacks = list(callbacks)
        if step_threads == "auto":
            step_threads = 1 if model.device == "cpu" else None
        elif step_threads is not None:
            step_threads = _posint("step_threads", step_threads)
        self.step_threads = step_threads

        self.history = History()
        self.epoch = 0
        """Epochs completed."""
        self.global_step = 0
        self.interrupted = False
        self.stop_training = False
        self._stop_requested = False
        self._agreed_stop = False
        self._best = None
        self._best_epoch = None
        self._wait = 0
        self._best_state = None

    # ------------------------------------------------------------------ distributed hooks
    @property
    def is_root(self):
        """Whether this process writes checkpoints, history files and progress (rank 0)."""
        return self._dist is None or self._dist.is_root

    @property
    def distributed(self):
        """The :class:`fastopt.distributed.Context` (None without ``distributed``)."""
        return self._dist

    @property
    def comm_stats(self):
        """:class:`fastopt.distributed.CommStats` of the per-step gradient collectives (None
        without ``distributed``)."""
        return None if self._reducer is None else self._reducer.stats

    def epoch_indices(self, epoch, n):
        """Positions (into the training rows) this process visits in ``epoch``, in order: a
        permutation of ``range(n)`` from ``default_rng([seed, epoch])`` (or ``arange(n)``
        without shuffling); with ``distributed``, this rank's share ``perm[rank::world]``."""
        if not self.shuffle:
            order = np.arange(n, dtype=np.int64)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)
        if self.world_size > 1:
            order = order[self.rank :: self.world_size].copy()
        return order

    def reduce_gradients(self):
        """Called after every backward pass, before the optimizer step. With ``distributed``:
        weights this rank's mean gradient by its share of the global batch (only when the ranks'
        shares differ) and, without ZeRO, sums ``model.params.grad_flat`` over the ranks with
        one Allreduce (the division by the world size is in the step's ``grad_scale``; ZeRO
        reduces inside its step)."""
        if self._reducer is None:
            return
        w = self._batch_weight
        if w != 1.0:
            g = self.model.params.grad_flat
            if w == 0.0:
                g.fill(0)
            else:
                g *= g.dtype.type(w)
        if not self.zero:
            self._reducer.allreduce_grads(average=False)

    def reduce_sums(self, sums):
        """Sum metric accumulators ``[loss, stat1, stat2, count]`` over processes (one Allreduce
        of float64s with ``distributed``, else the identity)."""
        if self._dist is None:
            return sums
        return [float(v) for v in self._coll().allreduce_scalars(sums, "Allreduce(metrics)")]

    # ------------------------------------------------------------------ distributed helpers
    def _coll(self):
        c = getattr(self, "_small_coll", None)
        if c is None:
            from .distributed import _Collectives

            c = self._small_coll = _Collectives(self._dist.comm, None)
        return c

    def _any_rank(self, flag):
        """Collective OR of a bool (True everywhere if any rank passes True)."""
        return not self._coll().all_true(not flag)

    def _max_over_ranks(self, value):
        from mpi4py import MPI

        return float(self._dist.comm.allreduce(float(value), op=MPI.MAX))

    def _dropout_rng(self, epoch=None):
        # [seed, 2**32, 0] seeds the same stream as [seed, 2**32]: rank 0 draws the one-process
        # masks. ``epoch``: a fresh stream for a rank whose saved generator is not available.
        key = [self.seed, 2**32, self.rank] if self.rank else [self.seed, 2**32]
        if epoch is not None:
            key = [self.seed, 2**32, self.rank, epoch]
        return np.random.default_rng(key)

    def _build_zero(self, optimizer, lr, weight_decay, optimizer_kwargs, max_norm, max_value, skip):
        from .optim import Optimizer

        model = self.model
        if weight_decay:
            raise ValueError(
                "zero=True does not support weight_decay (the weights-only L2 needs two param "
                "groups); use zero=False, or the optimizer's own weight_decay in optimizer_kwargs"
            )
        overrides = {}
        backend = None
        if isinstance(optimizer, type):
            if not issubclass(optimizer, Optimizer):
                raise TypeError(f"optimizer class {optimizer.__name__} is not a fastopt optimizer")
            cls, kwargs = optimizer, {"lr": lr, **dict(optimizer_kwargs or {})}
        elif isinstance(optimizer, Optimizer):
            if optimizer_kwargs:
                raise ValueError("optimizer_kwargs apply only when optimizer is a class")
            groups = optimizer._groups
            if len(groups) != 1 or groups[0]["source"] is not model.params:
                raise ValueError(
                    "zero=True: an optimizer instance must be built over model.params (one "
                    "param group); or pass its class"
                )
            if optimizer.state:
                raise ValueError("zero=True: the optimizer instance has already stepped")
            cls, kwargs = type(optimizer), dict(optimizer.defaults)
            overrides = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
            backend = optimizer._backend_name
            max_norm = optimizer.max_grad_norm if max_norm is None else max_norm
            max_value = optimizer.max_grad_value if max_value is None else max_value
            skip = optimizer.skip_nonfinite if skip is None else skip
        else:
            raise TypeError(
                f"optimizer must be a fastopt optimizer class or instance, got {optimizer!r}"
            )
        zero = self._dist.zero(
            model.params, cls, max_grad_norm=max_norm, max_grad_value=max_value,
            skip_nonfinite=bool(skip), backend=backend, **kwargs,
        )  # fmt: skip
        zero.param_groups[0].update(overrides)
        return zero

    def _broadcast_model(self):
        """Every parameter and buffer from the root (collective)."""
        coll, root = self._coll(), self._dist.root
        coll.bcast(self.model.params.flat, root)
        for a in self.model.buffers.values():
            coll.bcast(a.reshape(-1), root)

    def _average_bn_buffers(self):
        names = [k for k in self.model.buffers if ".bn.running_" in k]
        if not names or self.world_size == 1:
            return
        xp = getattr(self.model, "_xp", np)
        bufs = [self.model.buffers[k] for k in names]
        flat = xp.concatenate([b.reshape(-1) for b in bufs])
        self._coll().allreduce_sum(flat, "Allreduce(batch norm)")
        flat *= flat.dtype.type(1.0 / self.world_size)
        lo = 0
        for b in bufs:
            b[...] = flat[lo : lo + b.size].reshape(b.shape)
            lo += b.size

    def _batch_bounds(self, s, n):
        """(lo, hi) into this rank's order and the global batch size of step ``s``."""
        bs = self.batch_size
        glo = s * bs
        ghi = min(glo + bs, n)
        w = self.world_size
        if w == 1:
            return glo, ghi, ghi - glo
        r = self.rank
        return _count(glo, r, w), _count(ghi, r, w), ghi - glo

    # ------------------------------------------------------------------ data
    def _prepare(self, X, y, validation_data):
        model = self.model
        X = model.check_X(X)
        y = model.check_targets(y, X.shape[0])
        n = X.shape[0]
        train_rows = np.arange(n, dtype=np.int64)
        val = None
        if validation_data is not None:
            if self.validation_split:
                raise ValueError("pass either validation_split or validation_data, not both")
            try:
                Xv, yv = validation_data
            except (TypeError, ValueError):
                raise TypeError("validation_data must be a pair (X_val, y_val)") from None
            Xv = model.check_X(Xv, "X_val")
            yv = model.check_targets(yv, Xv.shape[0], "y_val")
            val = (Xv, yv, None)
        elif self.validation_split:
            train_rows, val_rows = self._split(y, n)
            val = (X, y, val_rows)
        return X, y, train_rows, val

    def _split(self, y, n):
        """(train rows, validation rows): a seeded split, stratified for class labels."""
        rng = np.random.default_rng([self.seed, 2**32 + 1])
        n_val = int(math.ceil(self.validation_split * n))
        if n_val < 1 or n - n_val < 1:
            raise ValueError(
                f"validation_split={self.validation_split} leaves no training or no validation "
                f"samples out of {n}"
            )
        labels = _host(y) if y.ndim == 1 else None
        if labels is None:
            perm = rng.permutation(n)
            val = np.sort(perm[:n_val])
        else:
            # stratified: each class contributes round(frac * count) rows, then top up/trim
            val_parts = []
            for c in np.unique(labels):
                rows = np.flatnonzero(labels == c)
                rng.shuffle(rows)
                val_parts.append(rows[: int(round(self.validation_split * rows.size))])
            val = np.concatenate(val_parts)
            if val.size != n_val:
                rest = np.setdiff1d(np.arange(n), val)
                if val.size < n_val:
                    val = np.concatenate([val, rng.choice(rest, n_val - val.size, replace=False)])
                else:
                    val = rng.choice(val, n_val, replace=False)
            val = np.sort(val)
        mask = np.ones(n, bool)
        mask[val] = False
        return np.flatnonzero(mask).astype(np.int64), val.astype(np.int64)

    # ------------------------------------------------------------------ fit
    def fit(self, X, y, *, validation_data=None, epochs=None, resume=None):
        """Train on (X, y) for ``epochs`` (default: the constructor's) epochs in total, counting
        epochs already completed (by an earlier ``fit`` or the checkpoint in ``resume``).
        Returns :attr:`history`."""
        model = self.model
        total_epochs = self.epochs if epochs is None else _nonneg_int("epochs", epochs)
        if resume is not None:
            self._resume(resume)  # before the split: it restores the seed
        X, y, train_rows, val = self._prepare(X, y, validation_data)
        n_train = train_rows.size
        bs = self.batch_size
        if self._dist is None:
            n_epoch = len(self.epoch_indices(self.epoch, n_train))  # this process's share
            steps = self._steps(n_epoch)
            drop_single = model.batch_norm and not self.drop_last and n_epoch % bs == 1
        else:
            sizes = self._dist.comm.allgather((int(n_train), val is not None))
            if len(set(sizes)) != 1:
                raise ValueError(
                    "distributed fit: every rank must pass the same data (training samples, "
                    f"validation) per rank: {sizes}"
                )
            self._broadcast_model()
            n_epoch = n_train  # global batches are cut from the whole epoch order
            steps = self._steps(n_epoch)
            # batch norm: a last global batch giving some rank < 2 rows is skipped everywhere
            last = n_epoch - (steps - 1) * bs
            drop_single = model.batch_norm and not self.drop_last and last < 2 * self.world_size
        if self.drop_last and n_epoch < bs:
            raise ValueError(
                f"drop_last=True with batch_size={bs} > {n_epoch} training samples: no batches"
            )
        if drop_single and steps == 1:
            raise ValueError(
                "batch norm cannot train on a single sample"
                if self._dist is None
                else f"batch norm cannot train on {n_epoch} samples over "
                f"{self.world_size} ranks (fewer than 2 per rank)"
            )
        if self.schedule is not None and resume is None and self.epoch == 0:
            sched = self.schedule
            if self.schedule_unit == "epoch":
                sched = PerEpoch(sched, steps)
            for g in self.optimizer.param_groups:
                g["lr"] = sched
        if self.plateau is None and self._plateau_arg not in (None, False):
            self.plateau = self._make_plateau(val is not None)
        monitor, mode = self._monitor(val is not None)
        self.stop_training = False
        self.interrupted = False
        self._stop_requested = False
        self._agreed_stop = False
        self.history.meta.update(
            monitor=monitor,
            seed=self.seed,
            n_train=int(n_train),
            n_val=int(0 if val is None else (val[0].shape[0] if val[2] is None else val[2].size)),
            batch_size=bs,
            steps_per_epoch=steps,
        )
        if self._dist is not None:
            self.history.meta.update(world_size=self.world_size, zero=self.zero)
        else:  # e.g. resumed from a distributed run
            self.history.meta.pop("world_size", None)
            self.history.meta.pop("zero", None)
        bar_factory = self._bar_factory()
        with self._sigint_guard():
            try:
                while self.epoch < total_epochs and not self.stop_training:
                    self._run_epoch(X, y, train_rows, val, steps, drop_single, bar_factory)
                    logs = {k: v[-1] for k, v in self.history.items()}
                    self._end_of_epoch(logs, monitor, mode)
                    if self._dist is not None and self._stop_requested_anywhere():
                        self._agreed_stop = True
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                if self._dist is not None and not self._agreed_stop:
                    # on this rank only (a second Ctrl-C, a callback): the others are not in
                    # step, no collective checkpoint can be written
                    raise
                self.interrupted = True
                self.history.meta["interrupted"] = {
                    "epoch": self.epoch,
                    "global_step": self.global_step,
                }
                self._finish(interrupted=True)
                if self.on_interrupt == "raise":
                    raise
                return self.history
        self._finish(interrupted=False)
        return self.history

    def _steps(self, n):
        bs = self.batch_size
        return n // bs if self.drop_last or n % bs == 0 else n // bs + 1

    def _run_epoch(self, X, y, train_rows, val, steps, drop_single, bar_factory):
        model, opt = self.model, self.optimizer
        order = train_rows[self.epoch_indices(self.epoch, train_rows.size)]
        xp = getattr(model, "_xp", np)
        if xp is not np:  # device indices for device data (one copy per epoch)
            order = xp.asarray(order)
        distributed = self._dist is not None
        # the samples the (global) batches are cut from: this process's order, or all of them
        n = train_rows.size if distributed else order.size
        steps = self._steps(n)
        if drop_single:  # the last batch would give (some rank) a single row: skip it
            steps -= 1
        w = self.world_size
        sums = [0.0, 0.0, 0.0]
        seen = 0
        bar = bar_factory(n) if bar_factory else None
        start = time.perf_counter()
        last_post = start
        grads = self._grads
        step_fn = self._step
        for s in range(steps):
            lo, hi, m = self._batch_bounds(s, n)
            if distributed:
                # this rank's share of the global batch's mean gradient
                self._batch_weight = 1.0 if (hi - lo) * w == m else (hi - lo) * w / m
            if hi > lo:
                idx = order[lo:hi]
                out = model.batch_loss_and_grad(X, y, idx, train=True, rng=self.rng)
                sums[0] += out[0]
                sums[1] += out[1]
                sums[2] += out[2]
            self.reduce_gradients()
            step_fn(opt, grads)
            self.global_step += 1
            seen += hi - lo
            if bar is not None:
                bar.update(m)
                now = time.perf_counter()
                if now - last_post > 0.2:
                    last_post = now
                    bar.set_postfix(model.metrics_from_sums(sums, max(seen, 1)), refresh=False)
            stop = self._stop_requested
            if distributed and s < steps - 1:
                # the ranks agree (every _STOP_CHECK_EVERY steps); the last step's request is
                # acted on after the epoch is recorded (fit)
                stop = (s + 1) % _STOP_CHECK_EVERY == 0 and self._any_rank(stop)
            elif distributed:
                stop = False
            if stop:
                if bar is not None:
                    bar.close()
                self._agreed_stop = distributed
                raise KeyboardInterrupt
        elapsed = time.perf_counter() - start
        total = self.reduce_sums([*sums, float(seen)])
        if distributed:
            elapsed = self._max_over_ranks(elapsed)
            if model.batch_norm:
                self._average_bn_buffers()
        row = {"epoch": self.epoch + 1}
        row.update(model.metrics_from_sums(total[:3], max(total[3], 1.0)))
        if val is not None:
            Xv, yv, rows = val
            if distributed:
                vm = self._distributed_eval(Xv, yv, rows)
            else:
                if rows is not None and xp is not np:
                    rows = xp.asarray(rows)
                vm = model.evaluate_checked(Xv, yv, idx=rows, batch_size=self.eval_batch_size)
            row.update({f"val_{k}": v for k, v in vm.items()})
        row["lr"] = self._current_lr()
        row["time"] = elapsed
        row["samples_per_s"] = total[3] / elapsed if elapsed > 0 else math.inf
        if bar is not None:
            bar.set_postfix({k: v for k, v in row.items() if k not in ("epoch", "time")})
            bar.close()
        self.history.append(row)
        self.epoch += 1

    def _distributed_eval(self, X, y, rows):
        """Evaluation metrics over rows ``rows`` of (X, y) (all rows when None), each rank
        evaluating every world-th one, the sums added over the ranks."""
        model = self.model
        xp = getattr(model, "_xp", np)
        n = X.shape[0] if rows is None else len(rows)
        mine = np.arange(self.rank, n, self.world_size, dtype=np.int64)
        if rows is not None:
            mine = np.asarray(rows, dtype=np.int64)[mine]
        if xp is not np:
            mine = xp.asarray(mine)
        sums = [0.0, 0.0, 0.0]
        bs = self.eval_batch_size
        for lo in range(0, len(mine), bs):
            for i, v in enumerate(model.batch_loss(X, y, mine[lo : lo + bs])):
                sums[i] += v
        total = self.reduce_sums([*sums, float(len(mine))])
        return model.metrics_from_sums(total[:3], max(total[3], 1.0))

    def _stop_requested_anywhere(self):
        return self._any_rank(self._stop_requested)

    def _step(self, opt, grads):
        threads = self.step_threads
        if threads is None:
            self._opt_step(opt, grads)
            return
        import numba

        prev = numba.get_num_threads()
        if prev == threads:
            self._opt_step(opt, grads)
            return
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            self._opt_step(opt, grads)
        finally:
            numba.set_num_threads(prev)

    def _opt_step(self, opt, grads):
        if self._grad_scale is None:
            opt.step(grads)
        else:  # data parallel: the gradient buffer holds the sum over the ranks
            opt.step(grads, grad_scale=self._grad_scale)

    def _current_lr(self):
        lr = self.optimizer.param_groups[0]["lr"]
        return float(lr(self.global_step)) if callable(lr) else float(lr)

    def _end_of_epoch(self, logs, monitor, mode):
        if self.verbose and self.is_root:
            text = ", ".join(
                f"{k} {v:.6g}" for k, v in logs.items() if k not in ("epoch", "samples_per_s")
            )
            print(f"epoch {self.epoch}: {text}", flush=True)
        value = logs.get(monitor)
        if value is None:
            raise KeyError(f"monitor {monitor!r} is not a logged metric; logged: {sorted(logs)}")
        if not math.isfinite(logs["loss"]):
            if self.is_root:
                warnings.warn(
                    f"training loss is {logs['loss']} at epoch {self.epoch}: stopping",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self.history.meta["diverged"] = True
            self.stop_training = True
        improved = self._best is None or (
            value < self._best - self.min_delta
            if mode == "min"
            else value > self._best + self.min_delta
        )
        if improved and math.isfinite(value):
            self._best, self._best_epoch, self._wait = value, self.epoch, 0
            if self.patience is not None and self.restore_best_weights:
                self._best_state = self.model.state_dict()
        else:
            self._wait += 1
        self.history.meta.update(best_epoch=self._best_epoch, best=self._best)
        if self.plateau is not None:
            self.plateau.step(value)
        if self.patience is not None and self._wait >= max(self.patience, 1):
            self.stop_training = True
            self.history.meta["stopped_early"] = True
            self.history.meta["stopped_epoch"] = self.epoch
        for cb in self.callbacks:
            if cb(self, self.epoch, logs):
                self.stop_training = True
        if self._dist is not None and self.callbacks:
            # a callback's stop request on any rank stops every rank
            self.stop_training = self._any_rank(self.stop_training)
        if (
            self.checkpoint_path
            and self.epoch % self.checkpoint_every == 0
            and not self.stop_training
        ):
            self.save_checkpoint(self.checkpoint_path)

    def _finish(self, interrupted):
        if (
            not interrupted
            and self.patience is not None
            and self.restore_best_weights
            and self._best_state is not None
            and self._best_epoch != self.epoch
        ):
            self.model.load_state_dict(self._best_state)
            self.history.meta["restored_epoch"] = self._best_epoch
        if self.checkpoint_path:
            self.save_checkpoint(self.checkpoint_path)
        if self.history_path and self.is_root:
            self.history.to_json(self.history_path)

    # ------------------------------------------------------------------ monitoring
    def _monitor(self, has_val):
        monitor = self.monitor or ("val_loss" if has_val else "loss")
        if monitor.startswith("val_") and not has_val:
            raise ValueError(f"monitor={monitor!r} needs validation data")
        base = monitor[4:] if monitor.startswith("val_") else monitor
        known = ["loss", "accuracy"] if self.model.is_classifier else ["loss", "mae", "rmse"]
        if base not in known:
            raise ValueError(
                f"unknown monitor {monitor!r}; this model logs {known} (and val_ versions)"
            )
        return monitor, ("max" if base in _MAXIMIZE else "min")

    def _make_plateau(self, has_val):
        arg = self._plateau_arg
        if isinstance(arg, ReduceLROnPlateau):
            return arg
        _, mode = self._monitor(has_val)
        kwargs = {} if arg is True else dict(arg)
        kwargs.setdefault("mode", mode)
        return ReduceLROnPlateau(self.optimizer, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, X, y):
        """Evaluation-mode metrics of the model on (X, y)."""
        return self.model.evaluate(X, y, batch_size=self.eval_batch_size)

    # ------------------------------------------------------------------ progress bar
    def _bar_factory(self):
        want = self.progress
        if want is False or not self.is_root:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            if want:
                warnings.warn(
                    "progress=True needs tqdm (pip install tqdm); training without a progress bar",
                    stacklevel=3,
                )
            return None
        if want is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
            return None
        total_epochs = self.epochs

        def make(n):
            return tqdm(
                total=n,
                desc=f"epoch {self.epoch + 1}/{total_epochs}",
                unit="sample",
                unit_scale=True,
                leave=False,
                dynamic_ncols=True,
            )

        return make

    # ------------------------------------------------------------------ Ctrl-C
    @contextlib.contextmanager
    def _sigint_guard(self):
        """In the main thread, a first SIGINT only asks the loop to stop after the current
        step (so the checkpoint is consistent); a second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        try:
            previous = signal.getsignal(signal.SIGINT)
        except (ValueError, TypeError):  # pragma: no cover
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self._stop_requested = True

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # pragma: no cover - not the main interpreter
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path):
        """Write the whole training state to ``path`` (fastopt.checkpoint format, atomic).
        With ``distributed`` this is collective: rank 0 writes the one file (a ZeRO state is
        gathered first); every rank returns ``path`` or raises if rank 0 could not write."""
        state = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "seed": self.seed,
            "history": _jsonable(dict(self.history)),
            "meta": _jsonable(self.history.meta),
            "best": self._best,
            "best_epoch": self._best_epoch,
            "wait": self._wait,
            "interrupted": self.interrupted,
        }
        extra = {"trainer": state}
        if self._best_state is not None:
            extra["best_state"] = self._best_state
        if self._dist is None:
            return _checkpoint.save(
                path,
                params=self.model.arrays(),
                optimizer=self.optimizer,
                plateau=self.plateau,
                rng=self.rng,
                extra=extra,
            )
        from .distributed import _raise_everywhere, _StateHolder

        comm, root = self._dist.comm, self._dist.root
        optimizer = self.optimizer
        if self.zero:
            optimizer = _StateHolder(self.optimizer.state_dict(root=root))  # gathered
        rng_states = comm.gather(self.rng.bit_generator.state, root=root)
        exc = None
        if self.is_root:
            state["world_size"] = self.world_size
            state["zero"] = self.zero
            extra["rng_states"] = rng_states  # every rank's dropout generator
            try:
                _checkpoint.save(
                    path,
                    params=self.model.arrays(),
                    optimizer=optimizer,
                    plateau=self.plateau,
                    rng=self.rng,
                    extra=extra,
                )
            except Exception as e:  # noqa: BLE001 - re-raised on every rank
                exc = e
        _raise_everywhere(comm, root, exc)
        return path

    def _resume(self, path):
        if self._dist is not None:
            state, best_state, rng_states = self._resume_distributed(path)
        else:
            ckpt = _checkpoint.load(path)
            extra = ckpt.extra or {}
            state = extra.get("trainer")
            if not isinstance(state, dict):
                raise _checkpoint.CheckpointError(
                    f"{path!r} is not a Trainer checkpoint (no trainer state)", path
                )
            if ckpt.plateau_state is not None and self.plateau is None:
                self.plateau = self._make_plateau(True) if self._plateau_arg else None
            ckpt.restore(
                params=self.model.arrays(),
                optimizer=self.optimizer,
                plateau=self.plateau if ckpt.plateau_state is not None else None,
                rng=self.rng,
            )
            best_state, rng_states = extra.get("best_state"), None
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = History(
            {k: [math.nan if v is None else v for v in vs] for k, vs in state["history"].items()},
            meta=state.get("meta"),
        )
        self._best = state.get("best")
        self._best_epoch = state.get("best_epoch")
        self._wait = int(state.get("wait", 0))
        self._best_state = best_state
        if self._dist is not None:
            # this rank's dropout generator: its own when the world size is the same; rank 0's
            # is the checkpoint's rng; other ranks of another world size start a fresh stream
            if rng_states is not None and len(rng_states) == self.world_size:
                self.rng.bit_generator.state = rng_states[self.rank]
            elif self.rank:
                self.rng = self._dropout_rng(self.epoch)

    def _resume_distributed(self, path):
        """Collective resume: only the root reads ``path``; the others receive what they need.
        Returns (trainer state, best_state, saved per-rank RNG states or None)."""
        from .distributed import _raise_everywhere

        comm, root = self._dist.comm, self._dist.root
        ckpt, exc, has_plateau = None, None, None
        if self.is_root:
            try:
                ckpt = _checkpoint.load(path)
                if not isinstance((ckpt.extra or {}).get("trainer"), dict):
                    raise _checkpoint.CheckpointError(
                        f"{path!r} is not a Trainer checkpoint (no trainer state)", path
                    )
                if self.zero:  # check the optimizer state before anything changes
                    if ckpt.optimizer_state is None:
                        raise ckpt._error("it holds no optimizer state")
                    want = self.optimizer.optimizer_class.__name__
                    got = ckpt.optimizer_state.get("algorithm")
                    if got != want:
                        raise ckpt._error(
                            f"it holds {got} optimizer state, the optimizer is {want}"
                        )
                    self.optimizer._skeleton(ckpt.optimizer_state)
                has_plateau = ckpt.plateau_state is not None
            except Exception as e:  # noqa: BLE001 - re-raised on every rank
                exc = e
        _raise_everywhere(comm, root, exc)
        has_plateau = comm.bcast(has_plateau, root=root)
        if has_plateau and self.plateau is None:
            self.plateau = self._make_plateau(True) if self._plateau_arg else None
        plateau = self.plateau if has_plateau else None
        if self.is_root:
            try:
                ckpt.restore(
                    params=self.model.arrays(),
                    optimizer=None if self.zero else self.optimizer,
                    plateau=plateau,
                    rng=self.rng,
                )
            except Exception as e:  # noqa: BLE001 - re-raised on every rank
                exc = e
        _raise_everywhere(comm, root, exc)
        # parameters and buffers: fit broadcasts them from the root
        if self.zero:
            self.optimizer.load_state_dict(
                ckpt.optimizer_state if self.is_root else None, root=root
            )
        else:
            sd = comm.bcast(self.optimizer.state_dict() if self.is_root else None, root=root)
            if not self.is_root:
                self.optimizer.load_state_dict(sd)
        if plateau is not None:
            sd = comm.bcast(plateau.state_dict() if self.is_root else None, root=root)
            if not self.is_root:
                plateau.load_state_dict(sd)
        extra = ckpt.extra if self.is_root else None
        extra = comm.bcast(extra, root=root)
        return extra["trainer"], extra.get("best_state"), extra.get("rng_states")


# ---------------------------------------------------------------------------- helpers


_STOP_CHECK_EVERY = 16
"""Distributed Ctrl-C: the ranks agree on a stop request every this many steps (one int)."""


def _context(distributed):
    if distributed is None or distributed is False:
        return None
    from . import distributed as _dist

    if distributed is True:
        return _dist.Context()
    if isinstance(distributed, _dist.Context):
        return distributed
    raise TypeError(
        f"distributed must be a bool or a fastopt.distributed.Context, got {distributed!r}"
    )


def _count(x, r, w):
    """How many of the positions ``0 .. x-1`` are ``r`` modulo ``w``."""
    return max(0, (x - r + w - 1) // w)


def _host(a):
    return a if isinstance(a, np.ndarray) else a.get()


def _posint(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _nonneg_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return int(v)


def _bool(name, v):
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {v!r}")
    return bool(v)


def _check_option(name, value):
    if name == "skip_nonfinite":
        _bool(name, value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
