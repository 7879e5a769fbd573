"""``fastopt train``: train an MLP on a built-in dataset or a CSV / NPZ file; write the model.

The output folder (``--out DIR``) holds:

``model.ckpt``
    a :func:`fastopt.save` checkpoint: ``params`` (the MLP's parameters and buffers, as
    ``model.arrays()``), ``optimizer`` (its state, schedule included) and in ``extra["model"]``
    everything ``fastopt predict`` needs (:data:`MODEL_FORMAT`): ``mlp`` (the ``MLP``
    constructor arguments, ``MLP(**mlp)``), ``task``, ``classes`` (the labels, output ``i`` is
    ``classes[i]``; None for regression), ``target``, ``target_mean`` / ``target_std``
    (regression: the network predicts ``(y - mean) / std``), ``feature_names`` (None when the
    data had none), ``n_features``, ``input_mean`` / ``input_std`` (the input standardization,
    also in the parameters as ``input.mean`` / ``input.inv_std``), ``dataset``, ``metrics``
    (final train / validation / test metrics) and ``settings`` (the options of the run).
``history.json``
    :meth:`fastopt.trainer.History.to_json`: ``metrics`` (one value per epoch: ``epoch``,
    ``loss``, ``accuracy`` or ``mae`` and ``rmse``, the ``val_`` versions with validation,
    ``lr``, ``time``, ``samples_per_s``) and ``meta`` (the Trainer's: ``monitor``, ``seed``,
    ``n_train``, ``n_val``, ``batch_size``, ``steps_per_epoch``, ``best_epoch``, ``best``,
    ``stopped_early``...; and this command's, :data:`HISTORY_META`). For regression ``loss``
    is on standardized targets, ``mae`` / ``rmse`` are in the target's units.
``test.npz``
    the held-out test rows (``X``, ``y``; ``feature_names`` when the data has them), when
    ``--test-size`` > 0: ``fastopt predict DIR DIR/test.npz`` scores the model on them (the
    summary prints that command).
``curves.png``
    loss per epoch next to accuracy (regression: MAE and RMSE), train and validation,
    :data:`CURVES_SIZE_PX` pixels; skipped, with a note, when matplotlib is not installed.

Timing: the kernels the run needs are compiled (or loaded from Numba's cache) before the
training clock starts, by a short fit of a copy of the model and optimizer on a few rows
(:func:`compile_kernels`); the summary reports that time apart from the training time.

Modules: :mod:`.train_options` (option checks), :mod:`.train_data` (loading, task, split),
:mod:`.train_outputs` (printed lines, written files), this one (arguments and the run).
"""

import os
import sys
import textwrap
import threading
import time

from . import EXIT_ERROR, MissingDependency, UsageError
from .train_data import prepare_data
from .train_options import (
    DEFAULT_LABEL_SMOOTHING,
    WARMUP_START_FACTOR,
    check_options,
    parse_schedule,
)
from .train_outputs import (
    CURVES_FILE,
    CURVES_SIZE_PX,
    HISTORY_FILE,
    HISTORY_META,
    MODEL_FILE,
    MODEL_FORMAT,
    TEST_FILE,
    RunTimes,
    duration,
    epoch_printer,
    final_metrics,
    history_to_write,
    optimizer_text,
    plot_curves,
    predict_command,
    schedule_text,
    si,
    summary_table,
    write_outputs,
)

__all__ = [
    "CURVES_FILE",
    "CURVES_SIZE_PX",
    "DEFAULT_LABEL_SMOOTHING",
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "HISTORY_FILE",
    "HISTORY_META",
    "MODEL_FILE",
    "MODEL_FORMAT",
    "TEST_FILE",
    "add_arguments",
    "compile_kernels",
    "plot_curves",
    "run",
]

EXIT_DIVERGED = EXIT_ERROR
"""Exit code when the training loss became non-finite (the outputs are still written)."""
EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C (training stops after the current step; the outputs are written)."""
COMPILE_NOTE_AFTER_S = 1.0
"""``compiling kernels (first run only)...`` is printed when compiling takes longer than this."""

HELP = "train an MLP on a built-in dataset or a CSV / NPZ file"


def _description():
    from ..datasets import BUILTIN

    first = textwrap.fill(
        "Train a multilayer perceptron (fastopt.MLP with fastopt.Trainer) on a built-in dataset "
        f"({', '.join(BUILTIN)}: scikit-learn's bundled copies, no download) or on a CSV file "
        "with a header row (--target COLUMN, default the last column; every other column a "
        "numeric feature) or an NPZ file (arrays X and y, or --target naming the y array).",
        96,
    )
    return f"""\
{first}

Classification or regression is inferred from the target (strings, or integers with at most 50
distinct values -> classification; real numbers -> regression) or forced with --task. Inputs are
standardized on the training rows; regression targets too (predictions are mapped back). The
data is split into test (--test-size, stratified for classification), validation
(--validation-split of the rest) and training rows, all from --seed.

Writes to --out DIR: model.ckpt (a fastopt checkpoint with everything 'fastopt predict' needs),
history.json (per-epoch metrics), test.npz (the test rows, X and y: the summary prints the
'fastopt predict' command that scores them) and curves.png (loss and accuracy / MAE-RMSE
curves; skipped with a note without matplotlib). Prints train / validation / test metrics, the
training time and samples/s; the kernels are compiled (first run) or loaded from Numba's cache
before the clock starts, and that time is reported apart."""


def _epilog():
    from .. import playground as P
    from ..datasets import BUILTIN
    from ..nn import ACTIVATIONS
    from ..optim import OPTIMIZERS

    builtin = "\n".join(f"  {name:<14}{b.task}: {b.description}" for name, b in BUILTIN.items())
    aliases = ", ".join(P.SCHEDULE_ALIASES)
    notes = textwrap.fill(
        " ".join(
            f"""Optimizers: {", ".join(OPTIMIZERS)}, as NAME:k=v,k=v with their torch.optim arguments (and max_grad_norm, max_grad_value, skip_nonfinite). weight_decay applies to the weights only (not biases); it defaults to the optimizer's default (AdamW: 0.01). Activations: {", ".join(ACTIVATIONS)}. Schedules (per step, over the whole run): {aliases}, or a class name of fastopt.schedules, as NAME:k=v; the lr defaults to the optimizer's. --warmup STEPS ramps the lr up linearly first, from --warmup-start-factor times it (default 1/3, as fastopt.schedules.warmup and torch's LinearLR; 0 starts from 0). --patience N stops when the validation loss has not improved for N epochs and restores the best epoch's weights.""".split()
        ),
        96,
    )
    return f"""\
examples:
  fastopt train digits
  fastopt train digits --hidden 256,128 --optimizer adamw:lr=1e-3,weight_decay=0.01 --epochs 50
  fastopt train digits --schedule cosine --warmup 100 --patience 5 --out runs/digits
  fastopt train houses.csv --target price --task regression --loss huber
  fastopt train data.npz --optimizer sgd:lr=0.05,momentum=0.9,nesterov=true --batch-size 128
  fastopt predict digits-model digits-model/test.npz

built-in datasets:
{builtin}

{notes}

exit codes:
  0    trained; outputs written
  1    the loss became non-finite (NaN or infinity; try a smaller learning rate; the outputs
       are still written), or a missing dependency (scikit-learn for the built-in datasets)
  2    bad input (an option, a file), reported before anything is written
  130  interrupted by Ctrl-C: training stops after the current step and still writes the outputs"""


DESCRIPTION = _description()
EPILOG = _epilog()


def add_arguments(p):
    p.add_argument(
        "data",
        metavar="DATA",
        help=f"{', '.join(_builtin_names())}, or a FILE.csv / FILE.npz",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--target", metavar="NAME", help="target column (CSV; default: the last) or array (NPZ)"
    )
    d.add_argument(
        "--task",
        choices=("auto", "classification", "regression"),
        default="auto",
        help="default: inferred from the target",
    )
    d.add_argument(
        "--test-size",
        type=float,
        default=0.25,
        metavar="F",
        help="fraction held out for testing (default 0.25; 0: none)",
    )
    d.add_argument(
        "--validation-split",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of the rest for validation (default 0.1; 0: none)",
    )
    d.add_argument("--delimiter", metavar="C", help="CSV delimiter (default ',', .tsv: tab)")
    m = p.add_argument_group("model")
    m.add_argument(
        "--hidden",
        default="256",
        metavar="N,N",
        help="hidden layer sizes (default 256; 0 or none: no hidden layer)",
    )
    m.add_argument(
        "--activation", default="relu", metavar="NAME", help=", ".join(_activations()) + " (relu)"
    )
    m.add_argument(
        "--loss",
        default="auto",
        metavar="NAME",
        help="regression: mse (default), l1, huber; classification: cross_entropy",
    )
    m.add_argument("--dropout", type=float, default=0.0, metavar="P", help="dropout rate")
    m.add_argument("--batch-norm", action="store_true", help="batch normalization")
    m.add_argument(
        "--label-smoothing",
        type=float,
        metavar="E",
        help="classification (default 0.1, the tuned setting fastopt.sklearn.MLPClassifier.tuned() uses)",
    )
    m.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="(float32)")
    t = p.add_argument_group("training")
    t.add_argument(
        "--optimizer",
        default="adam",
        metavar="SPEC",
        help="NAME[:k=v,...] (default adam), e.g. adamw:lr=1e-3,weight_decay=0.01",
    )
    t.add_argument(
        "--schedule", metavar="SPEC", help="lr schedule NAME[:k=v,...], e.g. cosine, onecycle"
    )
    t.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear lr warmup steps")
    t.add_argument(
        "--warmup-start-factor",
        type=float,
        default=WARMUP_START_FACTOR,
        metavar="F",
        help="the warmup starts at F x lr (default 1/3, as torch's LinearLR; 0: from 0)",
    )
    t.add_argument("--batch-size", type=int, default=64, metavar="N", help="(64)")
    t.add_argument("--epochs", type=int, default=30, metavar="N", help="(30)")
    t.add_argument(
        "--patience", type=int, metavar="N", help="early stopping on the validation loss"
    )
    t.add_argument(
        "--swa-start",
        type=int,
        metavar="EPOCH",
        help="stochastic weight averaging: average the weights of every epoch after EPOCH and "
        "keep the average (batch-norm statistics recomputed); see fastopt.swa",
    )
    t.add_argument(
        "--swa-lr", type=float, metavar="LR", help="with --swa-start: anneal the lr to LR (SWALR)"
    )
    t.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="parameter storage: bf16/fp16 train 16-bit parameters of the float32 model, with "
        "float32 master weights unless --no-master-weights (fp32)",
    )
    t.add_argument(
        "--state-dtype",
        metavar="NAME",
        help="optimizer state dtype: float32, float64, bfloat16, float16, or int8 (8-bit "
        "blockwise); default: the parameters'",
    )
    t.add_argument(
        "--stochastic-rounding",
        action="store_true",
        help="round 16-bit stores stochastically (random bits from --seed)",
    )
    t.add_argument(
        "--no-master-weights",
        action="store_true",
        help="with --precision bf16/fp16: no float32 master copy (use --stochastic-rounding)",
    )
    t.add_argument("--seed", type=int, default=0, metavar="S", help="splits, init, order (0)")
    t.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default) or cuda[:N]")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="output folder (default: NAME-model)")
    o.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument(
        "--quiet", action="store_true", help="no progress bar, no per-epoch or compile lines"
    )


def _builtin_names():
    from ..datasets import BUILTIN

    return tuple(BUILTIN)


def _activations():
    from ..nn import ACTIVATIONS

    return ACTIVATIONS


# ------------------------------------------------------------------------------ the run
def run(args):
    import numpy as np

    t_start = time.perf_counter()
    opts = check_options(args)  # nothing read or written before the options are valid
    data = prepare_data(args)
    sched, steps_per_epoch = _schedule(args, opts, data)
    model = _model(args, opts, data)
    trainer = _trainer(args, opts, model, sched, args.epochs, args.quiet, args.patience)
    averaging = _swa_callback(args, model, trainer)
    if not args.quiet:
        scale = 1.0 if data.y_std is None else data.y_std
        trainer.callbacks.append(epoch_printer(args.epochs, data.task, scale))
    try:
        os.makedirs(opts.out_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {opts.out_dir!r}: {exc.strerror or exc}") from None

    ds, fit, val, test = data.ds, data.fit, data.val, data.test
    n, n_features = ds.X.shape
    what = f"{data.classes.size} classes" if data.task == "classification" else ""
    print(
        f"{ds.name}: {n} samples x {n_features} features, target {ds.target_name!r}: "
        f"{data.task}{', ' + what if what else ''} ({data.reason})"
    )
    stratified = " (stratified)" if data.task == "classification" else ""
    print(
        f"split: {fit.size} train / {val.size} validation / {test.size} test{stratified}, "
        f"seed {args.seed}"
    )
    print(f"model: {model!r}")
    opt_text = optimizer_text(opts)
    if args.precision != "fp32":
        master = "without" if args.no_master_weights else "with float32"
        opt_text += f"; {args.precision} parameters {master} master weights"
    print(
        f"optimizer: {opt_text}; schedule: {'none' if sched is None else schedule_text(sched)}; "
        f"batch {args.batch_size}, {args.epochs} epochs of {steps_per_epoch} steps"
    )
    sys.stdout.flush()

    compile_s = _timed_compile(args, opts, data, sched)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        history, caught = _fit(trainer, data)
        _finish_swa(averaging, history, ds.X[fit])
        if hasattr(trainer.optimizer, "eval"):
            trainer.optimizer.eval()  # schedule-free: the averaged point x is the model
        final = {
            part: final_metrics(model, ds.X[rows], data.targets[rows], data)
            for part, rows in (("train", fit), ("validation", val), ("test", test))
            if rows.size
        }
    diverged_at = _nonfinite_epoch(history)
    for w in caught:
        if diverged_at is None or not issubclass(w.category, RuntimeWarning):
            print(f"fastopt train: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    times = RunTimes.of(history, fit.size, compile_s)
    hist = history_to_write(history, args, data, final, sched, times)
    title = f"{ds.name}: {'-'.join(map(str, model.sizes))} MLP, {opt_text}"
    written, test_path = write_outputs(args, opts, data, model, trainer, hist, final, title)

    print(summary_table(final, data.task))
    stop = ""
    if history.meta.get("stopped_early"):
        stop = f", stopped early (best epoch {history.meta.get('best_epoch')} restored)"
    if trainer.interrupted:
        stop = f", interrupted after epoch {times.epochs}"
    print(
        f"{times.epochs} epoch{'' if times.epochs == 1 else 's'} in {duration(times.train_s)} ({si(times.samples_per_s)} "
        f"samples/s){stop}; total {time.perf_counter() - t_start:.1f} s"
    )
    print(
        f"kernel compilation: {duration(compile_s)} before training (not counted in its time; "
        "Numba caches the kernels for later runs)"
    )
    print("wrote " + ", ".join(written))
    if not opts.plot and not args.no_plot:
        print(f"{CURVES_FILE} skipped: matplotlib is not installed (pip install matplotlib)")
    if test_path is not None and _finite_model(model):
        print(f"score the test rows: {predict_command(opts.out_dir, test_path)}")
    sys.stdout.flush()
    if diverged_at is not None:
        lr = f"{opts.spec.name}:lr={opts.lr / 10:g}"
        print(
            f"fastopt train: error: the loss became non-finite (NaN or infinity) at epoch "
            f"{diverged_at}; training stopped. Try a smaller learning rate (e.g. --optimizer {lr})",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    return EXIT_INTERRUPTED if trainer.interrupted else 0


def _swa_callback(args, model, trainer):
    """The :class:`fastopt.swa.SWA` callback of ``--swa-start`` / ``--swa-lr`` (None without)."""
    if args.swa_start is None:
        return None
    from ..swa import SWA

    averaging = SWA(model, args.swa_start, swa_lr=args.swa_lr)
    trainer.callbacks.append(averaging)
    return averaging


def _finish_swa(averaging, history, X):
    """Put the SWA average into the model (batch-norm statistics recomputed on ``X``) when an
    epoch was averaged; record what was averaged in the history."""
    if averaging is None:
        return
    n = averaging.averaged.n_averaged
    if n:
        averaging.finish(X)
        last = averaging.first_epoch + n - 1
        print(f"SWA: the model is the average of epochs {averaging.first_epoch}-{last}")
    else:
        print(f"SWA: no epoch after {averaging.swa_start} was trained; nothing averaged")
    history.meta["swa"] = {
        "start": averaging.swa_start,
        "lr": averaging.swa_lr,
        "averaged_epochs": n,
        "first_epoch": averaging.first_epoch,
    }


def _schedule(args, opts, data):
    """(the lr schedule or None, steps per epoch): ``--schedule`` over the steps after the
    warmup, behind ``--warmup`` steps starting at ``--warmup-start-factor`` x lr."""
    from .. import schedules

    steps_per_epoch = -(-data.fit.size // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    if args.warmup and args.warmup >= total_steps:
        raise UsageError(
            f"--warmup {args.warmup} is not shorter than the run ({total_steps} steps: "
            f"{args.epochs} epochs x {steps_per_epoch})"
        )
    sched = None
    if args.schedule:
        sched = parse_schedule(args.schedule, opts.lr, total_steps - args.warmup)
        if args.warmup and isinstance(sched, schedules.Warmup):
            raise UsageError("give the warmup once: --warmup or warmup= in --schedule")
    if args.warmup:
        inner = sched if sched is not None else schedules.Constant(opts.lr)
        sched = schedules.warmup(inner, args.warmup, args.warmup_start_factor)
    return sched, steps_per_epoch


def _model(args, opts, data):
    """The MLP, its input standardization fitted on the training rows."""
    from ..nn import MLP

    n_out = int(data.classes.size) if data.task == "classification" else 1
    try:
        model = MLP(
            data.ds.X.shape[1],
            opts.hidden,
            n_out,
            activation=args.activation,
            loss=data.loss,
            batch_norm=args.batch_norm,
            dropout=args.dropout,
            label_smoothing=data.label_smoothing,
            dtype=args.dtype,
            device=opts.device,
            seed=args.seed,
        )
    except RuntimeError as exc:  # no CuPy for device="cuda"
        raise MissingDependency(
            f"--device {opts.device}: {exc} (pip install 'fastopt[cuda12]')"
        ) from None
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    model.fit_standardizer(data.ds.X[data.fit])
    return model


def _trainer(args, opts, model, sched, epochs, quiet, patience=None):
    from ..trainer import Trainer

    try:
        return Trainer(
            model,
            opts.spec.cls,
            lr=opts.lr,
            weight_decay=opts.weight_decay,
            optimizer_kwargs=opts.opt_kwargs,
            batch_size=args.batch_size,
            epochs=epochs,
            schedule=sched,
            patience=patience,
            progress=False if (quiet or args.no_progress) else None,
            seed=args.seed,
            on_interrupt="stop",
            precision=args.precision,
        )
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--optimizer {args.optimizer}: {exc}") from None


def compile_kernels(args, opts, data, sched):
    """Compile (first run) or load from Numba's cache the kernels the run needs: one epoch of a
    copy of the model and optimizer on at most two batches of training rows, validation on a
    few rows, and a prediction. Nothing of the real run is touched."""
    import warnings

    import numpy as np

    model = _model(args, opts, data)
    trainer = _trainer(args, opts, model, sched, 1, quiet=True)
    X, t = data.ds.X, data.targets
    rows = data.fit[: 2 * args.batch_size]
    val = (X[data.val[:8]], t[data.val[:8]]) if data.val.size else None
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        trainer.fit(X[rows], t[rows], validation_data=val)
        model.evaluate(X[rows[:2]], t[rows[:2]])
        model.predict(X[rows[:2]])


def _timed_compile(args, opts, data, sched):
    """Seconds :func:`compile_kernels` took; says "compiling kernels" when it passes
    :data:`COMPILE_NOTE_AFTER_S`."""
    note = None
    if not args.quiet:
        note = threading.Timer(
            COMPILE_NOTE_AFTER_S, print, ("compiling kernels (first run only)...",), {"flush": True}
        )
        note.daemon = True
        note.start()
    start = time.perf_counter()
    try:
        compile_kernels(args, opts, data, sched)
    finally:
        if note is not None:
            note.cancel()
    return time.perf_counter() - start


def _fit(trainer, data):
    """Train; returns (history, the warnings raised). Ctrl-C stops after the current step
    (``trainer.interrupted``)."""
    import warnings

    X, t = data.ds.X, data.targets
    validation = (X[data.val], t[data.val]) if data.val.size else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(X[data.fit], t[data.fit], validation_data=validation)
    return history, caught


def _nonfinite_epoch(history):
    """The epoch at which the training loss became non-finite, or None. The Trainer says so
    with ``history.stop_reason == "nonfinite_loss"`` (older: ``meta["diverged"]``); the epoch
    is the first logged one with a non-finite loss, else the one after the last logged."""
    import math

    if getattr(history, "stop_reason", None) != "nonfinite_loss" and not history.meta.get(
        "diverged"
    ):
        return None
    for epoch, loss in zip(history.get("epoch", []), history.get("loss", [])):
        if not math.isfinite(loss):
            return epoch
    return len(history.get("loss", [])) + 1


def _finite_model(model):
    import numpy as np

    from ..arrays import to_host

    return all(np.isfinite(to_host(a)).all() for a in model.arrays().values())
