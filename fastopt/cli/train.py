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
``curves.png``
    loss per epoch next to accuracy (regression: MAE and RMSE), train and validation,
    :data:`CURVES_SIZE_PX` pixels.
"""

import dataclasses
import math
import os
import sys
import time

from . import MissingDependency, UsageError, require_matplotlib, split_list

HELP = "train an MLP on a built-in dataset or a CSV / NPZ file"
DESCRIPTION = """\
Train a multilayer perceptron (fastopt.MLP with fastopt.Trainer) on a built-in dataset (digits,
iris, wine, breast_cancer, diabetes: scikit-learn's bundled copies, no download) or on a CSV file
with a header row (--target COLUMN, default the last column; every other column a numeric
feature) or an NPZ file (arrays X and y, or --target naming the y array).

Classification or regression is inferred from the target (strings, or integers with at most 50
distinct values -> classification; real numbers -> regression) or forced with --task. Inputs are
standardized on the training rows; regression targets too (predictions are mapped back). The
data is split into test (--test-size, stratified for classification), validation
(--validation-split of the rest) and training rows, all from --seed.

Writes to --out DIR: model.ckpt (a fastopt checkpoint with everything 'fastopt predict' needs),
history.json (per-epoch metrics) and curves.png (loss and accuracy / MAE-RMSE curves), and
prints train / validation / test metrics, the time and samples/s."""
EPILOG = """\
examples:
  fastopt train digits
  fastopt train digits --hidden 256,128 --optimizer adamw:lr=1e-3,weight_decay=0.01 --epochs 50
  fastopt train digits --schedule cosine --warmup 100 --patience 5 --out runs/digits
  fastopt train houses.csv --target price --task regression --loss huber
  fastopt train data.npz --optimizer sgd:lr=0.05,momentum=0.9,nesterov=true --batch-size 128
  fastopt predict digits-model test.csv --out predictions.csv

Optimizers: sgd, adam, adamw, adagrad, rmsprop, adadelta, adamax, nadam, radam, rprop, yogi,
lion, as NAME:k=v,k=v with their torch.optim arguments (and max_grad_norm, max_grad_value,
skip_nonfinite). weight_decay applies to the weights only (not biases); it defaults to the
optimizer's default (AdamW: 0.01). Schedules (per step, over the whole run): cosine, step,
multistep, exponential, polynomial, rsqrt, sgdr, onecycle, piecewise, constant, as
NAME:k=v; the lr defaults to the optimizer's. --warmup STEPS ramps the lr up linearly from 0
first. --patience N stops when the validation loss has not improved for N epochs and restores
the best epoch's weights. Ctrl-C stops after the current step and still writes the outputs."""

MODEL_FILE = "model.ckpt"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
MODEL_FORMAT = "fastopt-train-model/1"
"""``extra["model"]["format"]`` of the checkpoints this command writes."""
CURVES_SIZE_PX = (1000, 400)
"""(width, height) of curves.png."""
HISTORY_META = (
    "command",
    "dataset",
    "task",
    "target",
    "classes",
    "n_features",
    "n_test",
    "epochs_run",
    "train_time_s",
    "samples_per_s",
    "final",
    "optimizer",
    "schedule",
    "loss_units",
)
"""Keys this command adds to the history's ``meta``; ``final`` maps ``train``, ``validation``
and ``test`` (those present) to their metrics (classification: ``loss``, ``accuracy``;
regression: ``loss``, ``mae``, ``rmse``, ``r2``)."""

DEFAULT_LABEL_SMOOTHING = 0.1
_ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "tanh", "sigmoid", "identity")
_LOSSES = {"classification": ("cross_entropy",), "regression": ("mse", "l1", "huber")}


def add_arguments(p):
    p.add_argument(
        "data",
        metavar="DATA",
        help="digits, iris, wine, breast_cancer, diabetes, or a FILE.csv / FILE.npz",
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
        "--hidden", default="256", metavar="N,N", help="hidden layer sizes (default 256; none)"
    )
    m.add_argument(
        "--activation", default="relu", metavar="NAME", help=", ".join(_ACTIVATIONS) + " (relu)"
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
        help="classification (default 0.1, as fastopt.sklearn.MLPClassifier)",
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
    t.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear lr warmup from 0")
    t.add_argument("--batch-size", type=int, default=64, metavar="N", help="(64)")
    t.add_argument("--epochs", type=int, default=30, metavar="N", help="(30)")
    t.add_argument(
        "--patience", type=int, metavar="N", help="early stopping on the validation loss"
    )
    t.add_argument("--seed", type=int, default=0, metavar="S", help="splits, init, order (0)")
    t.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default) or cuda[:N]")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="output folder (default: NAME-model)")
    o.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--quiet", action="store_true", help="no progress bar, no per-epoch lines")


# ------------------------------------------------------------------------------ option checks
def _fraction(name, v):
    if not (math.isfinite(v) and 0 <= v < 1):
        raise UsageError(f"{name} must be in [0, 1), got {v:g}")
    return v


def _parse_hidden(text):
    if str(text).strip().lower() in ("none", "", "0"):
        return ()
    sizes = []
    for item in split_list(text, "--hidden"):
        try:
            v = int(item)
        except ValueError:
            v = 0
        if v < 1:
            raise UsageError(f"--hidden: {item!r} is not a positive layer size (e.g. 256,128)")
        sizes.append(v)
    return tuple(sizes)


def _check_device(device):
    dev = device.strip().lower()
    base, _, index = dev.partition(":")
    if dev == "cpu" or (base == "cuda" and (not index or index.isdigit())):
        return dev
    raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")


def _default_out(source):
    base = os.path.basename(os.path.normpath(source)) or "data"
    return os.path.splitext(base)[0] + "-model"


def _optimizer(text):
    """(OptimizerSpec, lr, weight_decay, other kwargs) from ``--optimizer``."""
    import inspect

    from .. import playground as P

    try:
        spec = P.parse_optimizer(text)
    except ValueError as exc:
        raise UsageError(f"--optimizer: {exc}") from None
    params = inspect.signature(spec.cls.__init__).parameters
    kwargs = dict(spec.kwargs)
    lr = kwargs.pop("lr", params["lr"].default if "lr" in params else 1e-3)
    wd = 0.0
    if "weight_decay" in params:
        wd = kwargs.pop("weight_decay", params["weight_decay"].default)
    return spec, float(lr), float(wd), kwargs


def _schedule(text, lr, steps):
    """The ``--schedule`` spec (playground syntax) over ``steps`` steps, its lr defaulting to
    the optimizer's."""
    from .. import playground as P
    from .. import schedules

    text = text.strip()
    if not text.startswith("{"):
        try:
            name, kwargs = P.parse_spec(text, "schedule")
        except ValueError as exc:
            raise UsageError(f"--schedule: {exc}") from None
        key = name.lower().replace("_", "").replace("-", "")
        cls_name = P.SCHEDULE_NAMES.get(key) or P.SCHEDULE_ALIASES.get(key)
        if cls_name is not None:
            import dataclasses

            fields = {f.name for f in dataclasses.fields(getattr(schedules, cls_name))}
            for k in ("lr", "max_lr"):
                if k in fields and k not in kwargs:
                    text += ("," if ":" in text else ":") + f"{k}={lr!r}"
    try:
        return P.parse_schedule(text, steps)
    except ValueError as exc:
        raise UsageError(f"--schedule: {exc}") from None


# ------------------------------------------------------------------------------ run
@dataclasses.dataclass
class _Options:
    hidden: tuple
    device: str
    spec: object  # playground.OptimizerSpec
    lr: float
    weight_decay: float
    opt_kwargs: dict
    out_dir: str


@dataclasses.dataclass
class _Data:
    ds: object  # datasets.Dataset
    task: str
    reason: str
    loss: str
    label_smoothing: float
    classes: object  # sorted labels (classification) or None
    targets: object  # int codes, or standardized values
    y_mean: float | None
    y_std: float | None
    fit: object  # row indices
    val: object
    test: object


def run(args):
    t_start = time.perf_counter()
    opts = _check_options(args)  # nothing read or written before the options are valid
    data = _prepare_data(args)
    model, trainer, sched, steps_per_epoch = _build(args, opts, data)
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
    opt_text = _optimizer_text(opts)
    print(
        f"optimizer: {opt_text}; schedule: {'none' if sched is None else _sched_label(sched)}; "
        f"batch {args.batch_size}, {args.epochs} epochs of {steps_per_epoch} steps"
    )
    sys.stdout.flush()

    history = _fit(trainer, data)
    final = {
        part: _metrics(model, ds.X[rows], data.targets[rows], data)
        for part, rows in (("train", fit), ("validation", val), ("test", test))
        if rows.size
    }
    epochs_run = len(history.get("loss", []))
    train_time = float(sum(history.get("time", [])))
    sps = fit.size * epochs_run / train_time if train_time > 0 else float("nan")

    hist = _history(history, args, data, final, sched, epochs_run, train_time, sps)
    written = _write(
        args,
        opts,
        data,
        model,
        trainer,
        hist,
        final,
        title=f"{ds.name}: {'-'.join(map(str, model.sizes))} MLP, {opt_text}",
    )

    print(_summary_table(final, data.task))
    meta = history.meta
    stop = ""
    if meta.get("stopped_early"):
        stop = f", stopped early (best epoch {meta.get('best_epoch')} restored)"
    if trainer.interrupted:
        stop = f", interrupted after epoch {epochs_run}"
    print(
        f"{epochs_run} epochs in {train_time:.2f} s ({_si(sps)} samples/s){stop}; "
        f"total {time.perf_counter() - t_start:.1f} s"
    )
    print("wrote " + ", ".join(written))
    sys.stdout.flush()
    if meta.get("diverged"):
        print(
            "fastopt train: error: training diverged (non-finite loss); try a smaller lr",
            file=sys.stderr,
        )
        return 1
    return 130 if trainer.interrupted else 0


def _check_options(args):
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.patience is not None and args.patience < 1:
        raise UsageError(f"--patience must be >= 1, got {args.patience}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    _fraction("--test-size", args.test_size)
    _fraction("--validation-split", args.validation_split)
    if args.patience is not None and args.validation_split == 0:
        raise UsageError("--patience needs a validation set (--validation-split > 0)")
    if not (math.isfinite(args.dropout) and 0 <= args.dropout < 1):
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout:g}")
    smoothing = args.label_smoothing
    if smoothing is not None and not (math.isfinite(smoothing) and 0 <= smoothing <= 1):
        raise UsageError(f"--label-smoothing must be in [0, 1], got {smoothing:g}")
    if args.activation not in _ACTIVATIONS:
        raise UsageError(
            f"unknown activation {args.activation!r}; known: {', '.join(_ACTIVATIONS)}"
        )
    all_losses = ("auto",) + _LOSSES["classification"] + _LOSSES["regression"]
    if args.loss not in all_losses:
        raise UsageError(f"unknown loss {args.loss!r}; known: {', '.join(all_losses[1:])}")
    if args.delimiter is not None and len(args.delimiter) != 1:
        raise UsageError(f"--delimiter must be one character, got {args.delimiter!r}")
    hidden = _parse_hidden(args.hidden)
    device = _check_device(args.device)
    spec, lr, weight_decay, opt_kwargs = _optimizer(args.optimizer)
    if args.schedule:
        _schedule(args.schedule, lr, 100)  # names and keys, before reading the data
    out_dir = args.out or _default_out(args.data)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out: {out_dir!r} exists and is not a directory")
    if not args.no_plot:
        require_matplotlib("fastopt train (curves.png; --no-plot skips it)")
    return _Options(hidden, device, spec, lr, weight_decay, opt_kwargs, out_dir)


def _prepare_data(args):
    """Load the data, settle the task, encode the targets and split the rows."""
    from .. import datasets as D

    try:
        ds = D.load(args.data, target=args.target, delimiter=args.delimiter)
    except D.DatasetError as exc:
        raise UsageError(str(exc)) from None
    except ImportError as exc:
        raise MissingDependency(str(exc)) from None
    y = ds.y
    if args.task != "auto":
        task, reason = args.task, "--task"
    elif ds.task_hint is not None:
        task, reason = ds.task_hint, "built-in dataset"
    else:
        task, reason = D.infer_task(y)
    classes = codes = None
    if task == "classification":
        classes, codes = D.encode_labels(y)
        if classes.size < 2:
            raise UsageError(
                f"{ds.name}: the target {ds.target_name!r} holds one class only "
                f"({_label(classes[0])!r}); classification needs at least 2"
            )
        loss = "cross_entropy" if args.loss == "auto" else args.loss
    else:
        if y.dtype.kind not in "iuf":
            example = next(v for v in y if not _is_number(v))
            raise UsageError(
                f"{ds.name}: the target {ds.target_name!r} holds non-numeric values "
                f"({_label(example)!r}); regression needs numbers"
            )
        loss = "mse" if args.loss == "auto" else args.loss
    if loss not in _LOSSES[task]:
        raise UsageError(f"--loss {loss} does not fit {task}; use {' or '.join(_LOSSES[task])}")
    smoothing = args.label_smoothing
    if smoothing is None:
        smoothing = DEFAULT_LABEL_SMOOTHING if task == "classification" else 0.0
    elif smoothing and task != "classification":
        raise UsageError("--label-smoothing applies to classification only")

    # test rows (stratified for classes), then validation rows from the rest
    n = ds.X.shape[0]
    try:
        rest, test = D.split_indices(n, args.test_size, [args.seed, 1], codes)
    except D.DatasetError:
        raise UsageError(
            f"{ds.name}: {n} sample(s) are too few to hold out --test-size {args.test_size:g}"
        ) from None
    try:
        labels = None if codes is None else codes[rest]
        fit_pos, val_pos = D.split_indices(rest.size, args.validation_split, [args.seed, 2], labels)
    except D.DatasetError:
        raise UsageError(
            f"{ds.name}: {rest.size} sample(s) left after the test split are too few to hold "
            f"out --validation-split {args.validation_split:g}"
        ) from None
    fit, val = rest[fit_pos], rest[val_pos]
    y_mean = y_std = None
    if task == "classification":
        targets = codes
    else:
        import numpy as np

        y64 = y.astype(np.float64)
        y_mean, y_std = D.target_standardization(y64[fit])
        targets = (y64 - y_mean) / y_std
    return _Data(ds, task, reason, loss, smoothing, classes, targets, y_mean, y_std, fit, val, test)


def _build(args, opts, data):
    """(model, trainer, schedule or None, steps per epoch)."""
    from .. import schedules
    from ..nn import MLP
    from ..trainer import Trainer

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

    steps_per_epoch = -(-data.fit.size // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    if args.warmup and args.warmup >= total_steps:
        raise UsageError(
            f"--warmup {args.warmup} is not shorter than the run ({total_steps} steps: "
            f"{args.epochs} epochs x {steps_per_epoch})"
        )
    sched = None
    if args.schedule:
        sched = _schedule(args.schedule, opts.lr, total_steps - args.warmup)
        if args.warmup and isinstance(sched, schedules.Warmup):
            raise UsageError("give the warmup once: --warmup or warmup= in --schedule")
    if args.warmup:
        inner = sched if sched is not None else schedules.Constant(opts.lr)
        sched = schedules.warmup(inner, args.warmup, 0.0)
    try:
        trainer = Trainer(
            model,
            opts.spec.cls,
            lr=opts.lr,
            weight_decay=opts.weight_decay,
            optimizer_kwargs=opts.opt_kwargs,
            batch_size=args.batch_size,
            epochs=args.epochs,
            schedule=sched,
            patience=args.patience,
            progress=False if (args.quiet or args.no_progress) else None,
            seed=args.seed,
            on_interrupt="stop",
        )
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--optimizer {args.optimizer}: {exc}") from None
    if not args.quiet:
        scale = 1.0 if data.y_std is None else data.y_std
        trainer.callbacks.append(_epoch_printer(args.epochs, data.task, scale))
    return model, trainer, sched, steps_per_epoch


def _fit(trainer, data):
    """Train; warnings (a diverging loss) as one line each on stderr. Ctrl-C stops after the
    current step (``trainer.interrupted``)."""
    import warnings

    X, t = data.ds.X, data.targets
    validation = (X[data.val], t[data.val]) if data.val.size else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(X[data.fit], t[data.fit], validation_data=validation)
    for w in caught:
        print(f"fastopt train: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    return history


def _history(history, args, data, final, sched, epochs_run, train_time, sps):
    """The History to write: the Trainer's, regression errors in target units, plus
    :data:`HISTORY_META`."""
    from ..trainer import History

    hist = History({k: list(v) for k, v in history.items()}, meta=dict(history.meta))
    if data.task == "regression":
        for k in ("mae", "rmse", "val_mae", "val_rmse"):
            if k in hist:
                hist[k] = [v * data.y_std for v in hist[k]]
    hist.meta.update(
        command="fastopt train",
        dataset=data.ds.source,
        task=data.task,
        target=data.ds.target_name,
        classes=_class_list(data),
        n_features=int(data.ds.X.shape[1]),
        n_test=int(data.test.size),
        epochs_run=epochs_run,
        train_time_s=train_time,
        samples_per_s=sps,
        final=final,
        optimizer=args.optimizer,
        schedule=None if sched is None else _sched_dict(sched),
        loss_units="standardized target" if data.task == "regression" else "cross-entropy",
    )
    return hist


def _write(args, opts, data, model, trainer, hist, final, title):
    """model.ckpt, history.json and (unless --no-plot) curves.png; returns what was written."""
    from ..checkpoint import save

    info = {
        "format": MODEL_FORMAT,
        "mlp": dict(model.get_config(), device="cpu", backend=None),
        "task": data.task,
        "classes": _class_list(data),
        "target": data.ds.target_name,
        "target_mean": data.y_mean,
        "target_std": data.y_std,
        "feature_names": data.ds.feature_names,
        "n_features": int(data.ds.X.shape[1]),
        "input_mean": _host(model.buffers["input.mean"]).copy(),
        "input_std": 1.0 / _host(model.buffers["input.inv_std"]),
        "dataset": data.ds.source,
        "metrics": final,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }
    paths = [os.path.join(opts.out_dir, f) for f in (MODEL_FILE, HISTORY_FILE, CURVES_FILE)]
    try:
        save(paths[0], params=model.arrays(), optimizer=trainer.optimizer, extra={"model": info})
        hist.to_json(paths[1])
    except OSError as exc:
        raise UsageError(
            f"--out: cannot write to {opts.out_dir!r}: {exc.strerror or exc}"
        ) from None
    if args.no_plot:
        return paths[:2]
    w, h = plot_curves(hist, data.task, paths[2], title=title)
    return [*paths[:2], f"{paths[2]} ({w}x{h})"]


# ------------------------------------------------------------------------------ helpers
def _class_list(data):
    return None if data.classes is None else [_label(c) for c in data.classes.tolist()]


def _optimizer_text(opts):
    text = f"{opts.spec.name} lr={opts.lr:g}"
    text += "".join(f", {k}={v!r}" for k, v in opts.opt_kwargs.items())
    if opts.weight_decay:
        text += f", weight_decay={opts.weight_decay:g} (weights only)"
    return text


def _host(a):
    import numpy as np

    return a if isinstance(a, np.ndarray) else a.get()


def _label(v):
    """A class label as a plain JSON value (int, float or str)."""
    import numpy as np

    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return v


def _is_number(v):
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def _sched_label(sched):
    from .. import playground as P
    from .. import schedules

    if isinstance(sched, schedules.Warmup):
        inner = sched.schedule
        inner = f"{inner.lr:g}" if isinstance(inner, schedules.Constant) else _sched_label(inner)
        return f"linear warmup over {sched.warmup_steps} steps, then {inner}"
    return P.schedule_label(sched)


def _sched_dict(sched):
    try:
        return sched.to_dict()
    except (AttributeError, TypeError):
        return None


def _metrics(model, X, t, data):
    """Evaluation-mode metrics: loss and accuracy, or loss, MAE, RMSE and R^2 in target units."""
    import numpy as np

    m = model.evaluate(X, t)
    y_mean, y_std = data.y_mean, data.y_std
    if data.task == "classification":
        return {"loss": float(m["loss"]), "accuracy": float(m["accuracy"])}
    pred = _host(model.predict(X)).astype(np.float64)[:, 0] * y_std + y_mean
    y = np.asarray(t, np.float64) * y_std + y_mean
    err = pred - y
    var = float(((y - y.mean()) ** 2).mean())
    mse = float((err**2).mean())
    return {
        "loss": float(m["loss"]),
        "mae": float(np.abs(err).mean()),
        "rmse": math.sqrt(mse),
        "r2": 1.0 - mse / var if var > 0 else float("nan"),
    }


def _epoch_printer(epochs, task, scale):
    width = len(str(epochs))

    def show(trainer, epoch, logs):
        keys = ("accuracy",) if task == "classification" else ("mae", "rmse")
        parts = [f"loss {logs['loss']:.4f}"]
        for k in keys:
            parts.append(f"{k[:3] if k == 'accuracy' else k} {_scaled(logs, k, scale):.4f}")
        if "val_loss" in logs:
            parts.append(f"val_loss {logs['val_loss']:.4f}")
            for k in keys:
                name = "val_acc" if k == "accuracy" else f"val_{k}"
                parts.append(f"{name} {_scaled(logs, 'val_' + k, scale):.4f}")
        parts.append(f"lr {logs['lr']:.3g}")
        parts.append(f"{logs['time']:.2f} s")
        print(f"epoch {epoch:>{width}}/{epochs}  " + "  ".join(parts), flush=True)
        return False

    return show


def _scaled(logs, key, scale):
    v = logs[key]
    return v if key.endswith("accuracy") else v * scale


def _summary_table(final, task):
    cols = ("loss", "accuracy") if task == "classification" else ("loss", "mae", "rmse", "r2")
    lines = [f"{'':12}" + "".join(f"{c:>12}" for c in cols)]
    for part, m in final.items():
        lines.append(f"{part:12}" + "".join(f"{_fmt(m[c]):>12}" for c in cols))
    return "\n".join(lines)


def _fmt(v):
    if v is None or not math.isfinite(v):
        return "nan"
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


def _si(v):
    if not math.isfinite(v):
        return "n/a"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def plot_curves(history, task, path, title=None):
    """Loss per epoch (train, validation) next to accuracy (regression: MAE and RMSE); the
    epoch whose weights early stopping restored, dotted. Returns the PNG's (width, height)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    w, h = CURVES_SIZE_PX
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(w / dpi, h / dpi), dpi=dpi)
    epochs = history.get("epoch", [])
    marker = "o" if len(epochs) <= 30 else None

    def curve(ax, key, label, style="-"):
        if key in history:
            color = "C1" if key.startswith("val_") else "C0"
            ax.plot(
                epochs, history[key], style, color=color, marker=marker, markersize=3, label=label
            )

    curve(ax_loss, "loss", "train")
    curve(ax_loss, "val_loss", "validation")
    ax_loss.set_ylabel("loss" + (" (standardized target)" if task == "regression" else ""))
    losses = [v for k in ("loss", "val_loss") for v in history.get(k, []) if v and v > 0]
    if losses and max(losses) / min(losses) > 30:
        ax_loss.set_yscale("log")
    if task == "classification":
        curve(ax_metric, "accuracy", "train")
        curve(ax_metric, "val_accuracy", "validation")
        ax_metric.set_ylabel("accuracy")
    else:
        curve(ax_metric, "mae", "train MAE")
        curve(ax_metric, "val_mae", "validation MAE")
        curve(ax_metric, "rmse", "train RMSE", ":")
        curve(ax_metric, "val_rmse", "validation RMSE", ":")
        ax_metric.set_ylabel("error (target units)")
    meta = history.meta
    best = meta.get("restored_epoch") or (
        meta.get("best_epoch") if meta.get("stopped_early") else None
    )
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if best is not None and len(epochs) > 1:
            ax.axvline(best, color="gray", linestyle=":", linewidth=1, label=f"restored ({best})")
        ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return w, h
