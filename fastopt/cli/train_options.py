"""``fastopt train``'s options checked before anything is read or written: layer sizes, device,
optimizer and schedule specs, fractions and counts, the output files."""

import dataclasses
import math
import os

from . import MissingDependency, UsageError, require_matplotlib, split_list

LOSSES = {"classification": ("cross_entropy",), "regression": ("mse", "l1", "huber")}
"""The losses ``--loss`` accepts for each task."""
DEFAULT_LABEL_SMOOTHING = 0.1
"""``--label-smoothing``'s default for classification, as fastopt.sklearn.MLPClassifier's."""
WARMUP_START_FACTOR = 1.0 / 3
"""``--warmup-start-factor``'s default: torch's ``LinearLR`` start factor, as
:func:`fastopt.schedules.warmup`'s."""


@dataclasses.dataclass
class Options:
    """The checked options: hidden sizes, device, optimizer (spec, lr, weight decay, other
    keyword arguments), output folder and whether curves.png is drawn."""

    hidden: tuple
    device: str
    spec: object  # playground.OptimizerSpec
    lr: float
    weight_decay: float
    opt_kwargs: dict
    out_dir: str
    plot: bool


def check_options(args):
    """:class:`Options` from the parsed arguments; UsageError naming the first bad one."""
    from ..nn import ACTIVATIONS
    from .train_outputs import check_outputs, output_files  # train_outputs imports train_data

    for name, value, low in (
        ("--epochs", args.epochs, 1),
        ("--batch-size", args.batch_size, 1),
        ("--patience", args.patience, 1),
        ("--warmup", args.warmup, 0),
        ("--seed", args.seed, 0),
    ):
        if value is not None and value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    _interval("--test-size", args.test_size, closed_hi=False)
    _interval("--validation-split", args.validation_split, closed_hi=False)
    _interval("--warmup-start-factor", args.warmup_start_factor, closed_hi=True)
    if args.patience is not None and args.validation_split == 0:
        raise UsageError("--patience needs a validation set (--validation-split > 0)")
    _check_swa(args)
    _interval("--dropout", args.dropout, closed_hi=False)
    if args.label_smoothing is not None:
        _interval("--label-smoothing", args.label_smoothing, closed_hi=True)
    if args.activation not in ACTIVATIONS:
        raise UsageError(f"unknown activation {args.activation!r}; known: {', '.join(ACTIVATIONS)}")
    all_losses = ("auto",) + LOSSES["classification"] + LOSSES["regression"]
    if args.loss not in all_losses:
        raise UsageError(f"unknown loss {args.loss!r}; known: {', '.join(all_losses[1:])}")
    if args.delimiter is not None and len(args.delimiter) != 1:
        raise UsageError(f"--delimiter must be one character, got {args.delimiter!r}")
    hidden = parse_hidden(args.hidden)
    device = check_device(args.device)
    spec, lr, weight_decay, opt_kwargs = parse_optimizer(args.optimizer)
    opt_kwargs.update(precision_kwargs(args))
    if args.schedule:
        parse_schedule(args.schedule, lr, 100, strict=False)  # names and keys, before the data
    out_dir = args.out or default_out(args.data)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out: {out_dir!r} exists and is not a directory")
    plot = not args.no_plot and has_matplotlib()
    check_outputs(out_dir, output_files(args.test_size, plot), args.data)
    return Options(hidden, device, spec, lr, weight_decay, opt_kwargs, out_dir, plot)


def _check_swa(args):
    """``--swa-start`` within the run (averaging needs an epoch after it), ``--swa-lr`` > 0 and
    only with ``--swa-start``, and not together with ``--patience``."""
    start, lr = getattr(args, "swa_start", None), getattr(args, "swa_lr", None)
    if start is None:
        if lr is not None:
            raise UsageError("--swa-lr needs --swa-start EPOCH")
        return
    if not 1 <= start < args.epochs:
        raise UsageError(
            f"--swa-start must be in [1, --epochs - 1] = [1, {args.epochs - 1}] so that at least "
            f"one epoch is averaged, got {start}"
        )
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--swa-lr must be a finite number > 0, got {lr:g}")
    if args.patience is not None:
        raise UsageError(
            "--swa-start and --patience: early stopping restores the best epoch's weights, SWA "
            "replaces them with the average; give one"
        )


def precision_kwargs(args):
    """The optimizer's precision options from ``--precision``, ``--state-dtype``,
    ``--stochastic-rounding`` (seeded by ``--seed``) and ``--no-master-weights``; the state
    dtype is passed on as given (any name :mod:`fastopt.optim.precision` accepts)."""
    from ..optim.precision import precision_options

    sixteen = args.precision != "fp32"
    if sixteen and args.dtype != "float32":
        raise UsageError(
            f"--precision {args.precision} trains a float32 model (forward and backward in "
            f"float32); drop --dtype {args.dtype}"
        )
    if args.no_master_weights and not sixteen:
        raise UsageError("--no-master-weights applies with --precision bf16 or fp16")
    kwargs = {}
    if args.state_dtype is not None:
        kwargs["state_dtype"] = args.state_dtype
    if args.stochastic_rounding:
        kwargs.update(stochastic_rounding=True, seed=args.seed)
    if args.no_master_weights:
        kwargs["master_weights"] = False
    try:
        precision_options(**kwargs)
    except (TypeError, ValueError) as exc:
        flag = "--state-dtype" if "state_dtype" in str(exc) else "--stochastic-rounding"
        raise UsageError(f"{flag}: {exc}") from None
    return kwargs


def has_matplotlib():
    """True when matplotlib imports (curves.png is drawn; without it the run skips the picture)."""
    try:
        require_matplotlib("curves.png")
    except MissingDependency:
        return False
    return True


def _interval(name, v, closed_hi):
    ok = math.isfinite(v) and 0 <= v and (v <= 1 if closed_hi else v < 1)
    if not ok:
        raise UsageError(f"{name} must be in [0, 1{']' if closed_hi else ')'}, got {v:g}")
    return v


def parse_hidden(text):
    """Hidden layer sizes from ``--hidden``: ``256,128`` -> (256, 128); ``0``, ``none`` or an
    empty string -> () (no hidden layer). A 0 inside a list (``0,0``, ``64,0``) is rejected: a
    layer of no units is not a layer."""
    if str(text).strip().lower() in ("none", "", "0"):
        return ()
    sizes = []
    for item in split_list(text, "--hidden"):
        try:
            v = int(item)
        except ValueError:
            v = -1
        if v == 0:
            raise UsageError(
                f"--hidden: {text!r} holds a layer of 0 units; for no hidden layer give "
                "--hidden 0 (or none) alone"
            )
        if v < 1:
            raise UsageError(f"--hidden: {item!r} is not a positive layer size (e.g. 256,128)")
        sizes.append(v)
    return tuple(sizes)


def check_device(device):
    """``cpu``, ``cuda`` or ``cuda:N`` (any case), as :func:`fastopt.arrays.parse_device` reads
    them."""
    from ..arrays import parse_device

    dev = device.strip().lower()
    try:
        parse_device(dev)
    except ValueError:
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    return dev


def default_out(source):
    base = os.path.basename(os.path.normpath(source)) or "data"
    return os.path.splitext(base)[0] + "-model"


def parse_optimizer(text):
    """(OptimizerSpec, lr, weight_decay, other kwargs) from ``--optimizer``."""
    import inspect

    from .. import playground as P

    try:
        spec = P.parse_optimizer(text)
    except ValueError as exc:
        raise UsageError(f"--optimizer: {exc}") from None
    if not hasattr(spec.cls, "requires_closure"):  # newton, armijo: the playground's own
        raise UsageError(f"--optimizer: {spec.name} is a playground method, not an optimizer")
    params = inspect.signature(spec.cls.__init__).parameters
    kwargs = dict(spec.kwargs)
    lr = kwargs.pop("lr", params["lr"].default if "lr" in params else 1e-3)
    wd = 0.0
    if "weight_decay" in params:
        wd = kwargs.pop("weight_decay", params["weight_decay"].default)
    return spec, float(lr), float(wd), kwargs


def parse_schedule(text, lr, steps, strict=True):
    """The ``--schedule`` spec (playground syntax) over ``steps`` steps, its lr defaulting to
    the optimizer's; with ``strict`` a ``warmup=W`` in it must be shorter than ``steps``, as
    ``--warmup`` must be shorter than the run (the check of the options' keys, before the data
    sets the run's length, passes ``strict=False``)."""
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
            fields = {f.name for f in dataclasses.fields(getattr(schedules, cls_name))}
            for k in ("lr", "max_lr"):
                if k in fields and k not in kwargs:
                    text += ("," if ":" in text else ":") + f"{k}={lr!r}"
    try:
        return P.parse_schedule(text, steps, strict=strict)
    except ValueError as exc:
        raise UsageError(f"--schedule: {exc}") from None
