"""``fastopt train``'s data: load it, settle the task and loss, encode the targets and split the
rows into training, validation and test parts (all from ``--seed``)."""

import dataclasses

from . import MissingDependency, UsageError
from .train_options import DEFAULT_LABEL_SMOOTHING, LOSSES


@dataclasses.dataclass
class Data:
    """The loaded data, its task and loss, the encoded targets and the row indices of the
    training (``fit``), validation and test parts."""

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


def prepare_data(args):
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
                f"({label_value(classes[0])!r}); classification needs at least 2"
            )
        loss = "cross_entropy" if args.loss == "auto" else args.loss
    else:
        if y.dtype.kind not in "iuf":
            example = next(v for v in y if not _is_number(v))
            raise UsageError(
                f"{ds.name}: the target {ds.target_name!r} holds non-numeric values "
                f"({label_value(example)!r}); regression needs numbers"
            )
        loss = "mse" if args.loss == "auto" else args.loss
    if loss not in LOSSES[task]:
        raise UsageError(f"--loss {loss} does not fit {task}; use {' or '.join(LOSSES[task])}")
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
    return Data(ds, task, reason, loss, smoothing, classes, targets, y_mean, y_std, fit, val, test)


def class_list(data):
    """The class labels as plain JSON values, or None for regression."""
    return None if data.classes is None else [label_value(c) for c in data.classes.tolist()]


def label_value(v):
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
