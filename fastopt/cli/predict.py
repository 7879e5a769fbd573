"""``fastopt predict``: apply a model written by ``fastopt train`` to a CSV / NPZ file.

::

    from fastopt.cli.predict import load_model
    model = load_model("digits-model")       # the folder, or the model.ckpt in it
    model.predict(X)                         # labels (classification) or values (regression)
    model.predict_proba(X)                   # (n, n_classes), columns ordered as model.classes

Inference runs in float64 from the trained weights (as ``fastopt.sklearn`` does): predictions
do not depend on how the rows are batched.
"""

import csv
import math
import os
import sys

from ..fileio import OutputError, atomic_write, check_output
from . import UsageError

HELP = "apply a model written by 'fastopt train' to a CSV / NPZ file"
DESCRIPTION = """\
Load a model written by 'fastopt train' (its output folder or the model.ckpt in it; the file is
verified) and predict the target of every row of DATA: a CSV file with a header row holding the
model's feature columns (in any order; the target column may be there too, and is then scored)
or an NPZ file with an array X of the model's width (and optionally the target: an array named
as the model's target, or y; 'fastopt train' saves its test rows so, as test.npz).

Writes CSV: a 'prediction' column (class labels or values) and, with --proba, one 'proba_LABEL'
column per class (--precision significant digits, default 6), to --out FILE or to stdout
(--out -). When DATA holds the target, prints the accuracy (regression: MAE, RMSE, R^2)."""
EPILOG = """\
examples:
  fastopt predict digits-model digits-model/test.npz
  fastopt predict digits-model test.csv --out predictions.csv
  fastopt predict digits-model/model.ckpt test.npz --proba > predictions.csv
  fastopt predict houses-model new-houses.csv --out prices.csv"""


PROBA_DIGITS = 6
"""Significant digits of the ``--proba`` columns by default (``--precision``)."""


def add_arguments(p):
    p.add_argument(
        "model", metavar="MODEL", help="output folder of 'fastopt train', or its model.ckpt"
    )
    p.add_argument("data", metavar="DATA", help="FILE.csv or FILE.npz")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write the predictions here (CSV; '-' or default: stdout). A file is replaced "
        "atomically (through a symlink, its target); a FIFO or /dev/null is written in place",
    )
    p.add_argument("--proba", action="store_true", help="add the class probabilities")
    p.add_argument(
        "--precision",
        type=int,
        default=PROBA_DIGITS,
        metavar="N",
        help=f"significant digits of the probabilities (default {PROBA_DIGITS}; 17 round-trips)",
    )
    p.add_argument(
        "--delimiter", metavar="C", help="CSV delimiter of DATA (default ',', .tsv: tab)"
    )


class ModelError(ValueError):
    """A model file that cannot be used: one readable line."""


class TrainedModel:
    """A model of ``fastopt train`` ready for inference: ``task``, ``classes`` (array or None),
    ``feature_names`` (list or None), ``n_features``, ``target``, ``info`` (the checkpoint's
    ``extra["model"]``), ``mlp`` (the float64 :class:`fastopt.MLP`) and ``path``."""

    def __init__(self, path, info, mlp):
        import numpy as np

        self.path = path
        self.info = info
        self.mlp = mlp
        self.task = info["task"]
        self.classes = None if info.get("classes") is None else np.asarray(info["classes"])
        self.feature_names = info.get("feature_names")
        self.n_features = int(info["n_features"])
        self.target = info.get("target")

    def outputs(self, X):
        """The network's outputs: probabilities (classification) or standardized values."""
        return self.mlp.predict(X)

    def predict_proba(self, X):
        if self.task != "classification":
            raise ValueError("predict_proba needs a classification model")
        return self.outputs(X)

    def predict(self, X):
        """Class labels (classification) or values in the target's units (regression)."""
        return self.decode(self.outputs(X))

    def decode(self, out):
        """Predictions from :meth:`outputs`."""
        import numpy as np

        if self.task == "classification":
            return self.classes[np.argmax(out, axis=1)]
        return out[:, 0] * float(self.info["target_std"]) + float(self.info["target_mean"])


def resolve_model_path(path):
    path = os.fspath(path)
    if os.path.isdir(path):
        from .train import MODEL_FILE

        inner = os.path.join(path, MODEL_FILE)
        if not os.path.isfile(inner):
            raise ModelError(
                f"{path}: no {MODEL_FILE} in this folder (not a 'fastopt train' output?)"
            )
        return inner
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file or folder")
    return path


def load_model(path):
    """Load and check a ``fastopt train`` model (folder or checkpoint); :class:`ModelError`
    (one line) when it is missing, corrupt or not such a model."""
    import numpy as np

    from ..checkpoint import CheckpointError, load
    from ..nn import MLP
    from .train import MODEL_FORMAT

    path = resolve_model_path(path)
    try:
        ckpt = load(path)
    except CheckpointError as exc:
        raise ModelError(str(exc)) from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    info = (ckpt.extra or {}).get("model") if isinstance(ckpt.extra, dict) else None
    if not isinstance(info, dict) or info.get("format") != MODEL_FORMAT:
        raise ModelError(
            f"{path}: a fastopt checkpoint, but not a model written by 'fastopt train' "
            f"(no extra['model'] of format {MODEL_FORMAT})"
        )
    try:
        config = dict(info["mlp"], device="cpu", backend=None, init="zeros")
        task = info["task"]
        if task not in ("classification", "regression"):
            raise ValueError(f"unknown task {task!r}")
        if task == "classification" and len(info["classes"]) != config["n_outputs"]:
            raise ValueError("classes do not match the output layer")
        if task == "regression":
            mean, std = info["target_mean"], info["target_std"]
            if not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in (mean, std)
            ):
                raise ValueError("no target standardization")
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(
                    f"target_mean {mean!r} and target_std {std!r} must be finite numbers, "
                    "target_std > 0"
                )
        if int(info["n_features"]) != config["n_features"]:
            raise ValueError("n_features does not match the input layer")
        names = info.get("feature_names")
        if names is not None and len(names) != config["n_features"]:
            raise ValueError("feature_names do not match the input layer")
        mlp = MLP(**config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: invalid model description in the checkpoint: {exc}") from None
    try:
        ckpt.restore(params=mlp.arrays())
    except CheckpointError as exc:
        raise ModelError(str(exc)) from None
    if mlp.dtype != np.float64:
        # float64 inference from the trained weights (as fastopt.sklearn): predictions do not
        # depend on how the rows are batched
        mlp = mlp.astype(np.float64)
    if not all(np.isfinite(a).all() for a in mlp.arrays().values()):
        raise ModelError(f"{path}: the model's parameters hold NaN or infinity")
    return TrainedModel(path, info, mlp)


def _same_file(a, b):
    """Whether paths ``a`` and ``b`` name the same existing file (through links too)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one does not exist (yet), or cannot be looked at
        return False


def run(args):
    import numpy as np

    from .. import datasets as D

    if args.delimiter is not None and len(args.delimiter) != 1:
        raise UsageError(f"--delimiter must be one character, got {args.delimiter!r}")
    if not 1 <= args.precision <= 17:
        raise UsageError(f"--precision must be in 1..17, got {args.precision}")
    to_stdout = args.out is None or args.out == "-"
    if not to_stdout:
        try:  # before any work: a missing directory, a directory, a block device ...
            check_output(args.out)
        except OutputError as exc:
            raise UsageError(f"--out: {exc}") from None
        try:
            model_path = resolve_model_path(args.model)
        except ModelError as exc:
            raise UsageError(str(exc)) from None
        # the predictions would replace the model or the data they are made from
        for what, path in (("the model", model_path), ("the data", args.data)):
            if _same_file(args.out, path):
                raise UsageError(f"--out: {args.out} is {what} file ({path}); choose another file")
    try:
        model = load_model(args.model)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    if args.proba and model.task != "classification":
        raise UsageError("--proba needs a classification model; this one does regression")
    features = model.feature_names if model.feature_names is not None else model.n_features
    try:
        ds = D.load(args.data, target=model.target, delimiter=args.delimiter, features=features)
    except D.DatasetError as exc:
        raise UsageError(str(exc)) from None
    X = ds.X
    if X.shape[1] != model.n_features:  # load() checked it; keep the promise explicit
        raise UsageError(
            f"{args.data}: {X.shape[1]} features, the model expects {model.n_features}"
        )

    with np.errstate(all="ignore"):  # non-finite outputs are refused below, by row
        out = model.outputs(X)
        pred = model.decode(out)
    bad = ~np.isfinite(out).all(axis=1)
    if model.task == "regression":
        bad |= ~np.isfinite(pred)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise UsageError(
            f"{args.data}: the model's output is NaN or infinite for {len(rows)} of "
            f"{X.shape[0]} rows (first: row {int(rows[0])}, counting from 0; inputs too "
            "large for the network?); nothing written"
        )
    header = ["prediction"]
    if args.proba:
        header += [f"proba_{c}" for c in model.classes.tolist()]

    def rows():
        for i in range(X.shape[0]):
            p = pred[i]
            row = [repr(float(p)) if model.task == "regression" else str(p)]
            if args.proba:
                row += [f"{float(v):.{args.precision}g}" for v in out[i]]
            yield row

    score = _score(model, ds.y, pred, ds.target_name) if ds.y is not None else None
    if to_stdout:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows())
        sys.stdout.flush()
        if score:
            print(score, file=sys.stderr)
        return 0
    try:  # atomic for a file (a symlink's target is replaced); FIFOs, /dev/null in place
        with atomic_write(args.out, text=True, newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows())
    except OutputError as exc:
        raise UsageError(f"--out: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--out: cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"wrote {X.shape[0]} predictions to {args.out}")
    if score:
        print(score)
    return 0


def _score(model, y, pred, target):
    """One line scoring ``pred`` against the data's own target ``y`` (named ``target``)."""
    import numpy as np

    if model.task == "classification":
        known = {str(c) for c in model.classes.tolist()}
        y_s = np.array([str(v) for v in np.asarray(y).tolist()])
        unseen = sorted(set(y_s.tolist()) - known)
        acc = float(np.mean(y_s == np.array([str(p) for p in pred.tolist()])))
        note = (
            f" ({len(unseen)} label(s) unseen in training: {', '.join(unseen[:3])})"
            if unseen
            else ""
        )
        return f"accuracy {acc:.4f} on {len(y_s)} rows (target {target!r}){note}"
    if np.asarray(y).dtype.kind not in "iuf":
        return None
    y = np.asarray(y, np.float64)
    err = pred - y
    mse = float((err**2).mean())
    var = float(((y - y.mean()) ** 2).mean())
    r2 = f", R^2 {1 - mse / var:.4f}" if var > 0 else ""
    return f"MAE {float(np.abs(err).mean()):.4g}, RMSE {math.sqrt(mse):.4g}{r2} on {len(y)} rows (target {target!r})"
