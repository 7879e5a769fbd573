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

Data parallelism (a later ``distributed=True``) needs only the small overridable methods
:meth:`Trainer.epoch_indices` (which samples this process sees in an epoch),
:meth:`Trainer.reduce_gradients` (average the gradient buffer over processes) and
:meth:`Trainer.reduce_sums` (sum the metric accumulators over processes), plus
:attr:`Trainer.is_root` (only the root writes checkpoints and shows progress).
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
    ):
        from .optim import Adam, Optimizer

        self.model = model
        if optimizer is None:
            optimizer = Adam
        if isinstance(optimizer, type):
            if not issubclass(optimizer, Optimizer):
                raise TypeError(f"optimizer class {optimizer.__name__} is not a fastopt optimizer")
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

        self.batch_size = _posint("batch_size", batch_size)
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
        self.rng = np.random.default_rng([self.seed, 2**32])
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
        self._best = None
        self._best_epoch = None
        self._wait = 0
        self._best_state = None

    # ------------------------------------------------------------------ distributed hooks
    @property
    def is_root(self):
        """Whether this process writes checkpoints, history files and progress (always here)."""
        return True

    def epoch_indices(self, epoch, n):
        """Positions (into the training rows) this process visits in ``epoch``, in order: a
        permutation of ``range(n)`` from ``default_rng([seed, epoch])`` (or ``arange(n)``
        without shuffling). A data-parallel trainer returns its shard of that permutation."""
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)

    def reduce_gradients(self):
        """Called after every backward pass, before the optimizer step; a data-parallel trainer
        averages ``model.params.grad_flat`` over processes here."""

    def reduce_sums(self, sums):
        """Sum metric accumulators ``[loss, stat1, stat2, count]`` over processes (identity)."""
        return sums

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
        n_epoch = len(self.epoch_indices(self.epoch, n_train))  # this process's share
        bs = self.batch_size
        if self.drop_last and n_epoch < bs:
            raise ValueError(
                f"drop_last=True with batch_size={bs} > {n_epoch} training samples: no batches"
            )
        steps = self._steps(n_epoch)
        drop_single = model.batch_norm and not self.drop_last and n_epoch % bs == 1
        if drop_single and n_epoch == 1:
            raise ValueError("batch norm cannot train on a single sample")
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
        self.history.meta.update(
            monitor=monitor,
            seed=self.seed,
            n_train=int(n_train),
            n_val=int(0 if val is None else (val[0].shape[0] if val[2] is None else val[2].size)),
            batch_size=bs,
            steps_per_epoch=steps,
        )
        bar_factory = self._bar_factory()
        with self._sigint_guard():
            try:
                while self.epoch < total_epochs and not self.stop_training:
                    self._run_epoch(X, y, train_rows, val, steps, drop_single, bar_factory)
                    logs = {k: v[-1] for k, v in self.history.items()}
                    self._end_of_epoch(logs, monitor, mode)
            except KeyboardInterrupt:
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
        model, opt, bs = self.model, self.optimizer, self.batch_size
        order = train_rows[self.epoch_indices(self.epoch, train_rows.size)]
        xp = getattr(model, "_xp", np)
        if xp is not np:  # device indices for device data (one copy per epoch)
            order = xp.asarray(order)
        n = order.size
        steps = self._steps(n)
        sums = [0.0, 0.0, 0.0]
        seen = 0
        bar = bar_factory(n) if bar_factory else None
        start = time.perf_counter()
        last_post = start
        grads = self._grads
        step_fn = self._step
        for s in range(steps):
            lo = s * bs
            hi = min(lo + bs, n)
            if hi - lo == 1 and drop_single:
                break
            idx = order[lo:hi]
            out = model.batch_loss_and_grad(X, y, idx, train=True, rng=self.rng)
            self.reduce_gradients()
            step_fn(opt, grads)
            self.global_step += 1
            sums[0] += out[0]
            sums[1] += out[1]
            sums[2] += out[2]
            seen += hi - lo
            if bar is not None:
                bar.update(hi - lo)
                now = time.perf_counter()
                if now - last_post > 0.2:
                    last_post = now
                    bar.set_postfix(model.metrics_from_sums(sums, seen), refresh=False)
            if self._stop_requested:
                if bar is not None:
                    bar.close()
                raise KeyboardInterrupt
        elapsed = time.perf_counter() - start
        total = self.reduce_sums([*sums, float(seen)])
        row = {"epoch": self.epoch + 1}
        row.update(model.metrics_from_sums(total[:3], max(total[3], 1.0)))
        if val is not None:
            Xv, yv, rows = val
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

    def _step(self, opt, grads):
        threads = self.step_threads
        if threads is None:
            opt.step(grads)
            return
        import numba

        prev = numba.get_num_threads()
        if prev == threads:
            opt.step(grads)
            return
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            opt.step(grads)
        finally:
            numba.set_num_threads(prev)

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
        """Write the whole training state to ``path`` (fastopt.checkpoint format, atomic)."""
        if not self.is_root:
            return None
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
        return _checkpoint.save(
            path,
            params=self.model.arrays(),
            optimizer=self.optimizer,
            plateau=self.plateau,
            rng=self.rng,
            extra=extra,
        )

    def _resume(self, path):
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
        self._best_state = extra.get("best_state")


# ---------------------------------------------------------------------------- helpers


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
