"""The Trainer: the minibatch loop, early stopping and the run's bookkeeping.

Checkpoints and resuming are in :mod:`.resume`, the progress bar in :mod:`.progress`, Ctrl-C in
:mod:`.interrupt`, early stopping in :mod:`.early_stopping`, the validation split in :mod:`.data`;
what changes with several processes goes through a strategy (:mod:`.strategy`, and
:mod:`fastopt.distributed.trainer_strategy` over MPI).
"""

import math
import time

import numpy as np

from ..arrays import array_module
from ..nn.data import all_finite
from ..optim.schedulefree import evaluation_point
from ..schedules import PerEpoch, ReduceLROnPlateau
from ..validation import check_bool, check_choice, check_int, check_real
from . import data, resume
from .closure import check_closure_optimizer, closure_step
from .early_stopping import EarlyStopping, choose_monitor
from .history import History
from .interrupt import StopRequest
from .optimizer_setup import build_local, checked_clip
from .precision import mixed_precision
from .progress import bar_factory
from .strategy import strategy_for

_CLIP_OPTIONS = ("max_grad_norm", "max_grad_value", "skip_nonfinite")


def _all_finite(model):
    """Whether every parameter and buffer of ``model`` is finite (one pass, no copy on the CPU)."""
    xp = array_module(model.device)[0]
    arrays = [model.params.flat, *model.buffers.values()]
    return all(a.size == 0 or all_finite(a.reshape(1, -1), xp) for a in arrays)


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

    Precision: ``precision="bf16"`` / ``"fp16"`` (or ``"bfloat16"`` / ``"float16"``) trains
    16-bit parameters of a float32 model: the optimizer (a class) is built over a 16-bit copy
    of ``model.params`` with ``master_weights=True`` unless ``optimizer_kwargs`` says otherwise
    (``state_dtype``, ``stochastic_rounding`` and ``seed`` go there too); forward and backward
    run in float32 from the widened 16-bit values and the float32 gradients feed the step
    (:mod:`fastopt.trainer.precision`). ``None`` or ``"fp32"``: the model's own dtype.

    Validation: ``validation_split`` (a fraction of the training data held out, stratified for
    class labels, drawn from ``seed``) or ``fit(validation_data=(X, y))``. Metrics: ``loss`` and
    ``accuracy`` for classification, ``loss``, ``mae`` and ``rmse`` for regression, on the
    training batches (running over the epoch, as Keras reports them) and on the validation set.

    Early stopping: ``patience`` epochs without an improvement of ``monitor`` (default
    ``val_loss``, or ``loss`` without validation) by more than ``min_delta`` stop training;
    ``restore_best_weights`` then puts the best epoch's parameters back.

    Divergence: a training loss that becomes NaN or infinite (e.g. a learning rate far too
    large) stops training; the parameters and buffers from the start of that epoch are put back
    (the optimizer state is left as it is), or, when those were not all finite (the previous
    epoch's last step overflowed them, its loss being computed before the step), the last
    epoch-start state that was; ``history.stop_reason`` is ``"nonfinite_loss"``. One process
    checks every step's loss (and stops at once), several processes the epoch's (the same
    number everywhere). NumPy's overflow / invalid-value warnings are silenced inside the
    epoch: the stop reason says what happened.
    ``history.stop_reason`` / ``history.stop_epoch`` also record the other early ends:
    ``"early_stopping"``, ``"callback"`` and ``"interrupted"``.

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
        precision=None,
    ):
        from ..optim import Adam

        self.model = model
        check_bool("zero", zero)
        self.zero = zero
        self._strategy = strategy_for(distributed, zero)
        self.rank = self._strategy.rank
        """This process's rank (0 without ``distributed``)."""
        self.world_size = self._strategy.world_size
        """Number of processes training together (1 without ``distributed``)."""
        # before the optimizer is built or set up (a refused batch size leaves it untouched)
        self.batch_size = check_int("batch_size", batch_size, lo=1)
        self._strategy.check_batch_size(self.batch_size, model.batch_norm)
        if optimizer is None:
            optimizer = Adam
        self._mixed = mixed_precision(model, precision, optimizer)
        if self._mixed is not None:
            optimizer_kwargs = self._mixed.optimizer_kwargs(optimizer_kwargs)
        trained = model if self._mixed is None else self._mixed  # what the optimizer updates
        clip = checked_clip(max_grad_norm, max_grad_value, skip_nonfinite)
        self._closure_decay = 0.0
        if getattr(optimizer, "requires_closure", False):
            check_closure_optimizer(optimizer, model, weight_decay, distributed or zero, clip)
            self._closure_decay = float(weight_decay)
        if zero:
            self.optimizer = self._strategy.build_zero(
                model, optimizer, lr, weight_decay, optimizer_kwargs, clip, trained.params
            )
            # the ZeRO optimizer steps on the ParamSet's gradient buffer (the model's float32 one)
            self._grads = None if self._mixed is None else model.params.grad_flat
        else:
            self.optimizer, self._grads = build_local(
                optimizer, model, trained, lr, weight_decay, optimizer_kwargs, clip
            )
        self._grad_scale = self._strategy.attach(model, self.optimizer)

        self.epochs = check_int("epochs", epochs, lo=0)
        self.eval_batch_size = check_int("eval_batch_size", eval_batch_size, lo=1)
        check_bool("shuffle", shuffle)
        check_bool("drop_last", drop_last)
        self.shuffle, self.drop_last = shuffle, drop_last
        if schedule is not None and not callable(schedule):
            raise TypeError("schedule must be a callable k -> lr (e.g. a fastopt.schedules one)")
        self.schedule = schedule
        self.schedule_unit = check_choice("schedule_unit", schedule_unit, ("step", "epoch"))
        self.validation_split = check_real(
            "validation_split", validation_split, lo=0.0, hi=1.0, hi_open=True
        )
        self.monitor = monitor
        self.patience = None if patience is None else check_int("patience", patience, lo=0)
        self.min_delta = check_real("min_delta", min_delta, lo=0.0)
        check_bool("restore_best_weights", restore_best_weights)
        self.restore_best_weights = restore_best_weights
        self._plateau_arg = plateau
        self.plateau = None
        self.progress = progress
        self.verbose = int(verbose)
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
        self.seed = self._strategy.agree_seed(check_int("seed", seed, lo=0))
        self.rng = self.dropout_rng()
        """Generator of the dropout masks (its state is saved in checkpoints)."""
        self.checkpoint_path = checkpoint
        self.checkpoint_every = check_int("checkpoint_every", checkpoint_every, lo=1)
        self.history_path = history_path
        self.on_interrupt = check_choice("on_interrupt", on_interrupt, ("raise", "stop"))
        self.callbacks = list(callbacks)
        if step_threads == "auto":
            step_threads = 1 if model.device == "cpu" else None
        elif step_threads is not None:
            step_threads = check_int("step_threads", step_threads, lo=1)
        self.step_threads = step_threads

        self.history = History()
        self.epoch = 0
        """Epochs completed."""
        self.global_step = 0
        self.interrupted = False
        self.stop_training = False
        self._stop = StopRequest()
        self._agreed_stop = False
        self.early_stopping = EarlyStopping(self.patience, self.min_delta, restore_best_weights)
        """Best value of the monitored metric, its epoch, epochs since, best weights."""
        self._last_finite = None  # the last epoch-start state of the model whose values are finite
        self._last_finite_epoch = 0  # the epochs completed at that state

    # ------------------------------------------------------------------ distributed hooks
    @property
    def is_root(self):
        """Whether this process writes checkpoints, history files and progress (rank 0)."""
        return self._strategy.is_root

    @property
    def distributed(self):
        """The :class:`fastopt.distributed.Context` (None without ``distributed``)."""
        return self._strategy.context

    @property
    def comm_stats(self):
        """:class:`fastopt.distributed.CommStats` of the per-step gradient collectives (None
        without ``distributed``)."""
        return self._strategy.stats

    def epoch_indices(self, epoch, n):
        """Positions (into the training rows) this process visits in ``epoch``, in order: a
        permutation of ``range(n)`` from ``default_rng([seed, epoch])`` (or ``arange(n)``
        without shuffling); with ``distributed``, this rank's share ``perm[rank::world]``."""
        if not self.shuffle:
            order = np.arange(n, dtype=np.int64)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)
        return self._strategy.share(order)

    def reduce_gradients(self):
        """Called after every backward pass, before the optimizer step. With ``distributed``:
        weights this rank's mean gradient by its share of the global batch (only when the ranks'
        shares differ) and, without ZeRO, sums ``model.params.grad_flat`` over the ranks with
        one Allreduce (the division by the world size is in the step's ``grad_scale``; ZeRO
        reduces inside its step)."""
        self._strategy.reduce_gradients(self.model)

    def reduce_sums(self, sums):
        """Sum metric accumulators ``[loss, stat1, stat2, count]`` over processes (one Allreduce
        of float64s with ``distributed``, else the identity)."""
        return self._strategy.reduce_sums(sums)

    def dropout_rng(self, epoch=None):
        """A dropout generator: this rank's stream, or with ``epoch`` a fresh one for a rank
        whose saved generator is not available."""
        # [seed, 2**32, 0] seeds the same stream as [seed, 2**32]: rank 0 draws the one-process
        # masks. ``epoch``: a fresh stream for a rank whose saved generator is not available.
        key = [self.seed, 2**32, self.rank] if self.rank else [self.seed, 2**32]
        if epoch is not None:
            key = [self.seed, 2**32, self.rank, epoch]
        return np.random.default_rng(key)

    # ------------------------------------------------------------------ data
    def _split(self, y, n):
        """(train rows, validation rows) of ``validation_split`` (see :func:`.data.split`)."""
        return data.split(y, n, self.validation_split, self.seed)

    # ------------------------------------------------------------------ fit
    def fit(self, X, y, *, validation_data=None, epochs=None, resume=None):
        """Train on (X, y) for ``epochs`` (default: the constructor's) epochs in total, counting
        epochs already completed (by an earlier ``fit`` or the checkpoint in ``resume``).
        Returns :attr:`history`."""
        model = self.model
        total_epochs = self.epochs if epochs is None else check_int("epochs", epochs, lo=0)
        self._last_finite = None  # taken again at the first epoch of this fit
        if resume is not None:
            # the data are checked before the checkpoint replaces anything; the split needs the
            # seed the checkpoint restores, so it is drawn again below
            data.prepare(model, X, y, validation_data, self.validation_split, self.seed)
            self._resume(resume)
        X, y, train_rows, val = data.prepare(
            model, X, y, validation_data, self.validation_split, self.seed
        )
        n_train = train_rows.size
        bs = self.batch_size
        n_epoch = self._strategy.epoch_size(self, n_train, val is not None)
        drop_single = (
            model.batch_norm
            and not self.drop_last
            and self._strategy.skips_last_batch(n_epoch, self._steps(n_epoch), bs)
        )
        if self.drop_last and n_epoch < bs:
            raise ValueError(
                f"drop_last=True with batch_size={bs} > {n_epoch} training samples: no batches"
            )
        steps = self._steps(n_epoch, drop_single)  # the optimizer steps of an epoch
        if drop_single and steps == 0:
            raise ValueError(
                "batch norm cannot train on a single sample"
                if self.world_size == 1
                else f"batch norm cannot train on {n_epoch} samples over "
                f"{self.world_size} ranks (fewer than 2 per rank)"
            )
        monitor, mode = self._monitor(val is not None)
        if self.plateau is None and self._plateau_arg not in (None, False):
            self.plateau = self._make_plateau(val is not None)
        # every check above comes before the first write: a fit that raises leaves the model
        # (and, with a 16-bit precision, its float32 weights) as it found them
        if self._mixed is not None:  # the model's values may be new (resumed, broadcast)
            self._mixed.pull(self.optimizer, reset_master=resume is None)
        if self.schedule is not None and resume is None and self.epoch == 0:
            sched = self.schedule
            if self.schedule_unit == "epoch":
                sched = PerEpoch(sched, steps)
            for g in self.optimizer.param_groups:
                g["lr"] = sched
        self.stop_training = False
        self.interrupted = False
        self._stop.requested = False
        self._agreed_stop = False
        meta = self.history.meta
        for key in ("stop_reason", "stop_epoch"):
            meta.pop(key, None)
        meta.update(
            monitor=monitor,
            seed=self.seed,
            n_train=int(n_train),
            n_val=int(0 if val is None else (val[0].shape[0] if val[2] is None else val[2].size)),
            batch_size=bs,
            steps_per_epoch=steps,
        )
        for key, value in self._strategy.run_meta().items():
            if value is None:
                meta.pop(key, None)  # e.g. resumed in one process from a distributed run
            else:
                meta[key] = value
        bars = bar_factory(self.progress if self.is_root else False, self.epochs, self._epochs)
        with self._stop.guard():
            try:
                while self.epoch < total_epochs and not self.stop_training:
                    self._run_epoch(X, y, train_rows, val, drop_single, bars)
                    logs = {k: v[-1] for k, v in self.history.items()}
                    self._end_of_epoch(logs, monitor, mode)
                    if self._strategy.stop_after_epoch(self._stop.requested):
                        self._agreed_stop = True
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                if self._strategy.collective and not self._agreed_stop:
                    # on this rank only (a second Ctrl-C, a callback): the others are not in
                    # step, no collective checkpoint can be written
                    raise
                self.interrupted = True
                meta["interrupted"] = {"epoch": self.epoch, "global_step": self.global_step}
                self._record_stop("interrupted", self.epoch)
                self._finish(interrupted=True)
                if self.on_interrupt == "raise":
                    raise
                return self.history
        self._finish(interrupted=False)
        return self.history

    def _epochs(self):
        return self.epoch

    def _steps(self, n, drop_single=False):
        """Optimizer steps of an epoch over ``n`` samples: the batches, less a last one that
        ``drop_last`` drops or that batch norm skips (``drop_single``: it would give a process
        a single row). :class:`~fastopt.schedules.PerEpoch` (``schedule_unit="epoch"``) and
        ``history.meta["steps_per_epoch"]`` count these, so the lr changes exactly at epoch
        boundaries, as torch's ``scheduler.step()`` once per epoch."""
        bs = self.batch_size
        steps = n // bs if self.drop_last or n % bs == 0 else n // bs + 1
        return steps - 1 if drop_single else steps

    def _record_stop(self, reason, epoch):
        """The first reason training stopped early (``history.stop_reason``) and its epoch."""
        if "stop_reason" not in self.history.meta:
            self.history.meta.update(stop_reason=reason, stop_epoch=epoch)

    def _run_epoch(self, X, y, train_rows, val, drop_single, bars):
        model, opt, strategy = self.model, self.optimizer, self._strategy
        if self._mixed is not None:  # restored weights (best, last finite) restart the master
            self._mixed.pull(opt, reset_master=True)
        order = train_rows[self.epoch_indices(self.epoch, train_rows.size)]
        xp = array_module(model.device)[0]
        if xp is not np:  # device indices for device data (one copy per epoch)
            order = xp.asarray(order)
        # the samples the (global) batches are cut from: this process's order, or all of them
        n = strategy.cut_size(order, train_rows.size)
        steps = self._steps(n, drop_single)  # drop_single: skip a last batch of a single row
        check_each_step = not strategy.collective  # several processes check the epoch's loss
        self._snapshot_if_finite()
        sums = [0.0, 0.0, 0.0]
        seen = 0
        bar = bars(n) if bars else None
        start = time.perf_counter()
        last_post = start
        grads = self._grads
        closure_opt = getattr(opt, "requires_closure", False)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for s in range(steps):
                lo, hi, m = strategy.batch_bounds(s, n, self.batch_size)
                strategy.set_batch_rows(lo, hi, m)
                if hi > lo:
                    idx = order[lo:hi]
                    if closure_opt:  # its step re-evaluates the batch (and steps) itself
                        out = closure_step(opt, model, X, y, idx, self._closure_decay, self.rng)
                    else:
                        out = model.batch_loss_and_grad(X, y, idx, train=True, rng=self.rng)
                    sums[0] += out[0]
                    sums[1] += out[1]
                    sums[2] += out[2]
                    if check_each_step and not math.isfinite(out[0]):
                        seen += hi - lo
                        break  # diverged: no step on a non-finite gradient
                if not closure_opt:
                    self.reduce_gradients()
                    self._step(opt, grads)
                self.global_step += 1
                seen += hi - lo
                if bar is not None:
                    bar.update(m)
                    now = time.perf_counter()
                    if now - last_post > 0.2:
                        last_post = now
                        bar.set_postfix(model.metrics_from_sums(sums, max(seen, 1)), refresh=False)
                if strategy.stop_now(s, steps, self._stop.requested):
                    if bar is not None:
                        bar.close()
                    self._agreed_stop = strategy.collective
                    raise KeyboardInterrupt
            elapsed = strategy.slowest(time.perf_counter() - start)
            total = self.reduce_sums([*sums, float(seen)])
            strategy.end_of_epoch(model)
            row = {"epoch": self.epoch + 1}
            row.update(model.metrics_from_sums(total[:3], max(total[3], 1.0)))
            if val is not None:
                with evaluation_point(opt):  # schedule-free: validate at the averaged point
                    vm = strategy.evaluate(self, *val)
                row.update({f"val_{k}": v for k, v in vm.items()})
        row["lr"] = self._current_lr()
        row["time"] = elapsed
        row["samples_per_s"] = total[3] / elapsed if elapsed > 0 else math.inf
        if bar is not None:
            bar.set_postfix({k: v for k, v in row.items() if k not in ("epoch", "time")})
            bar.close()
        self.history.append(row)
        self.epoch += 1

    def _snapshot_if_finite(self):
        """At the start of an epoch: keep the model's state (parameters and buffers) as the one
        a divergence restores, if every value is finite (one pass over them); else keep the
        last one that was (the first of a fit is kept in any case: there is no other)."""
        model = self.model
        if self._last_finite is None or _all_finite(model):
            self._last_finite = model.state_dict()
            self._last_finite_epoch = self.epoch

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
        if self._mixed is not None:
            self._mixed.widen()

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
        diverged = not math.isfinite(logs["loss"])
        if diverged:
            # the same decision on every rank: the loss is the sum over the ranks
            self.model.load_state_dict(self._last_finite)
            self._weights_put_back()
            self.history.meta["diverged"] = True
            self._record_stop("nonfinite_loss", self.epoch)
            self.stop_training = True
            if self.verbose and self.is_root:
                print(
                    f"epoch {self.epoch}: the training loss is {logs['loss']}: stopped, "
                    f"weights of epoch {self._last_finite_epoch} restored",
                    flush=True,
                )
        early = self.early_stopping
        early.update(value, mode, self.epoch, self.model)
        self.history.meta.update(best_epoch=early.best_epoch, best=early.best)
        if self.plateau is not None and not diverged:
            self.plateau.step(value)
        if early.should_stop() and not diverged:
            self.stop_training = True
            self.history.meta["stopped_early"] = True
            self.history.meta["stopped_epoch"] = self.epoch
            self._record_stop("early_stopping", self.epoch)
        callback_stop = False
        for cb in self.callbacks:
            if cb(self, self.epoch, logs):
                callback_stop = True
        if self.callbacks:
            # a callback's stop request on any rank stops every rank
            callback_stop = self._strategy.any_rank(callback_stop)
        if callback_stop:
            self.stop_training = True
            self._record_stop("callback", self.epoch)
        if (
            self.checkpoint_path
            and self.epoch % self.checkpoint_every == 0
            and not self.stop_training
        ):
            self.save_checkpoint(self.checkpoint_path)

    def _finish(self, interrupted):
        if not interrupted:
            restored = self.early_stopping.restore_best(self.model, self.epoch)
            if restored is not None:
                self._weights_put_back()
                self.history.meta["restored_epoch"] = restored
        if self.checkpoint_path:
            self.save_checkpoint(self.checkpoint_path)
        if self.history_path and self.is_root:
            self.history.to_json(self.history_path)

    def _weights_put_back(self):
        """After the model's weights were replaced (best or last finite ones): with a 16-bit
        precision, round them into the trained parameters and set the optimizer's float32
        master copies to them, so that the checkpoint written next holds them and a resume
        (which keeps the saved master) continues from these weights, not the last step's."""
        if self._mixed is not None:
            self._mixed.pull(self.optimizer, reset_master=True)

    # ------------------------------------------------------------------ monitoring
    def _monitor(self, has_val):
        return choose_monitor(self.monitor, has_val, self.model.is_classifier)

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

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path):
        """Write the whole training state to ``path`` (fastopt.checkpoint format, atomic).
        With ``distributed`` this is collective: rank 0 writes the one file (a ZeRO state is
        gathered first); every rank returns ``path`` or raises if rank 0 could not write."""
        return self._strategy.save_checkpoint(self, path)

    def _resume(self, path):
        def plateau_factory():
            return self._make_plateau(True) if self._plateau_arg else None

        state, best_state, rng_states = self._strategy.load_checkpoint(self, path, plateau_factory)
        resume.apply_state(self, state, best_state)
        self._strategy.restore_rng(self, rng_states)
