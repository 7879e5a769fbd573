"""``fastopt train``'s outputs: the lines it prints (per epoch, the summary) and the files it
writes in ``--out`` (model.ckpt, history.json, test.npz, curves.png)."""

import dataclasses
import math
import os
import shlex

from ..fileio import OutputError, atomic_write, check_output
from . import UsageError
from .train_data import class_list

MODEL_FILE = "model.ckpt"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
TEST_FILE = "test.npz"
"""The held-out test rows, ``X`` (raw features) and ``y`` (raw targets), and ``feature_names``
when the data has them: ``fastopt predict OUT OUT/test.npz`` scores the model on them."""
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
    "compile_time_s",
    "samples_per_s",
    "final",
    "optimizer",
    "schedule",
    "loss_units",
)
"""Keys this command adds to the history's ``meta`` (``train_time_s`` is the epochs' time;
``compile_time_s`` the kernel compilation, or loading from Numba's cache, before it); ``final`` maps ``train``, ``validation``
and ``test`` (those present) to their metrics (classification: ``loss``, ``accuracy``;
regression: ``loss``, ``mae``, ``rmse``, ``r2``)."""


def output_files(test_size, plot):
    """The names of the files the run writes in ``--out``: model.ckpt and history.json,
    test.npz with ``test_size`` > 0, curves.png with ``plot``."""
    names = [MODEL_FILE, HISTORY_FILE]
    if test_size > 0:
        names.append(TEST_FILE)
    if plot:
        names.append(CURVES_FILE)
    return names


def check_outputs(out_dir, names, source):
    """UsageError, before any work, for an output file ``out_dir/NAME`` that could not be
    written (:func:`fastopt.fileio.check_output`: a directory, a special file, a folder that is
    not writable...) or that is the data file ``source`` (or a link to it): the run would replace
    its own input. A folder that does not exist yet is created by the run and holds nothing."""
    if not os.path.isdir(out_dir):
        return
    for name in names:
        path = os.path.join(out_dir, name)
        if _same_file(path, source):
            raise UsageError(
                f"--out: {path} is the input data {source}; writing it would replace the data "
                "(give another --out folder)"
            )
        try:
            check_output(path)
        except OutputError as exc:
            raise UsageError(f"--out: {exc}") from None


def _same_file(path, source):
    try:
        return os.path.samefile(path, source)
    except OSError:  # either is missing (a built-in dataset's name), or cannot be examined
        return False


def history_to_write(history, args, data, final, sched, times):
    """The History to write: the Trainer's, regression errors in target units, plus
    :data:`HISTORY_META`. ``times``: :class:`RunTimes`."""
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
        classes=class_list(data),
        n_features=int(data.ds.X.shape[1]),
        n_test=int(data.test.size),
        epochs_run=times.epochs,
        train_time_s=times.train_s,
        compile_time_s=times.compile_s,
        samples_per_s=times.samples_per_s,
        final=final,
        optimizer=args.optimizer,
        precision=args.precision,
        schedule=None if sched is None else _sched_dict(sched),
        loss_units="standardized target" if data.task == "regression" else "cross-entropy",
    )
    return hist


def write_outputs(args, opts, data, model, trainer, hist, final, title):
    """model.ckpt, history.json, test.npz (when there are test rows) and curves.png (unless
    --no-plot, or without matplotlib); returns (what was written, the test.npz path or None)."""
    import numpy as np

    from ..arrays import to_host
    from ..checkpoint import save

    info = {
        "format": MODEL_FORMAT,
        "mlp": dict(model.get_config(), device="cpu", backend=None),
        "task": data.task,
        "classes": class_list(data),
        "target": data.ds.target_name,
        "target_mean": data.y_mean,
        "target_std": data.y_std,
        "feature_names": data.ds.feature_names,
        "n_features": int(data.ds.X.shape[1]),
        "input_mean": to_host(model.buffers["input.mean"]).copy(),
        "input_std": 1.0 / to_host(model.buffers["input.inv_std"]),
        "dataset": data.ds.source,
        "metrics": final,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }
    path = {f: os.path.join(opts.out_dir, f) for f in (MODEL_FILE, HISTORY_FILE, TEST_FILE)}
    written = [path[MODEL_FILE], path[HISTORY_FILE]]
    test_path = None
    try:
        save(written[0], params=model.arrays(), optimizer=trainer.optimizer, extra={"model": info})
        hist.to_json(written[1])
        if data.test.size:
            test_path = path[TEST_FILE]
            arrays = {"X": data.ds.X[data.test], "y": data.ds.y[data.test]}
            if data.ds.feature_names is not None:
                arrays["feature_names"] = np.array(data.ds.feature_names, dtype=str)
            with atomic_write(test_path) as f:
                np.savez(f, **arrays)
            written.append(test_path)
    except OSError as exc:
        raise UsageError(
            f"--out: cannot write to {opts.out_dir!r}: {exc.strerror or exc}"
        ) from None
    if opts.plot:
        curves = os.path.join(opts.out_dir, CURVES_FILE)
        w, h = plot_curves(hist, data.task, curves, title=title)
        written.append(f"{curves} ({w}x{h})")
    return written, test_path


def predict_command(out_dir, test_path):
    """The shell command that scores the model on its saved test rows."""
    return f"fastopt predict {shlex.quote(out_dir)} {shlex.quote(test_path)}"


def optimizer_text(opts):
    text = f"{opts.spec.name} lr={opts.lr:g}"
    text += "".join(f", {k}={v!r}" for k, v in opts.opt_kwargs.items())
    if opts.weight_decay:
        text += f", weight_decay={opts.weight_decay:g} (weights only)"
    return text


def schedule_text(sched):
    from .. import playground as P
    from .. import schedules

    if isinstance(sched, schedules.Warmup):
        inner = sched.schedule
        inner = f"{inner.lr:g}" if isinstance(inner, schedules.Constant) else schedule_text(inner)
        return f"linear warmup over {sched.warmup_steps} steps, then {inner}"
    return P.schedule_label(sched)


def _sched_dict(sched):
    try:
        return sched.to_dict()
    except (AttributeError, TypeError):
        return None


def final_metrics(model, X, t, data):
    """Evaluation-mode metrics: loss and accuracy, or loss, MAE, RMSE and R^2 in target units."""
    import numpy as np

    from ..arrays import to_host

    m = model.evaluate(X, t)
    y_mean, y_std = data.y_mean, data.y_std
    if data.task == "classification":
        return {"loss": float(m["loss"]), "accuracy": float(m["accuracy"])}
    pred = to_host(model.predict(X)).astype(np.float64)[:, 0] * y_std + y_mean
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


def epoch_printer(epochs, task, scale):
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
        parts.append(duration(logs["time"]))
        print(f"epoch {epoch:>{width}}/{epochs}  " + "  ".join(parts), flush=True)
        return False

    return show


def _scaled(logs, key, scale):
    v = logs[key]
    return v if key.endswith("accuracy") else v * scale


def summary_table(final, task):
    cols = ("loss", "accuracy") if task == "classification" else ("loss", "mae", "rmse", "r2")
    lines = [f"{'':12}" + "".join(f"{c:>12}" for c in cols)]
    for part, m in final.items():
        lines.append(f"{part:12}" + "".join(f"{_fmt(m[c]):>12}" for c in cols))
    return "\n".join(lines)


def _fmt(v):
    if v is None or not math.isfinite(v):
        return "nan"
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


def si(v):
    if not math.isfinite(v):
        return "n/a"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def duration(seconds):
    """A duration for humans: ``37.2 ms`` under a second, ``2.36 s`` above."""
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.2f} s"


@dataclasses.dataclass
class RunTimes:
    """The timing of a run: epochs run, their training time, samples per second of it, and the
    kernel compilation (or loading from Numba's cache) done before the clock started."""

    epochs: int
    train_s: float
    samples_per_s: float
    compile_s: float

    @classmethod
    def of(cls, history, n_train, compile_s):
        epochs = len(history.get("loss", []))
        train_s = float(sum(history.get("time", [])))
        sps = n_train * epochs / train_s if train_s > 0 else float("nan")
        return cls(epochs, train_s, sps, compile_s)


def plot_curves(history, task, path, title=None):
    """Loss per epoch (train, validation) next to accuracy (regression: MAE and RMSE); the
    epoch whose weights early stopping restored, dotted. Non-finite values (a diverging run) are
    left out. Returns the PNG's (width, height). Needs matplotlib."""
    from ..playground import FIGURE_DPI, pyplot, save_figure

    plt = pyplot()
    w, h = CURVES_SIZE_PX
    fig, (ax_loss, ax_metric) = plt.subplots(
        1, 2, figsize=(w / FIGURE_DPI, h / FIGURE_DPI), dpi=FIGURE_DPI
    )
    epochs = history.get("epoch", [])
    marker = "o" if len(epochs) <= 30 else None

    def finite(key):
        return [v if v is not None and math.isfinite(v) else math.nan for v in history[key]]

    def curve(ax, key, label, style="-"):
        if key in history:
            color = "C1" if key.startswith("val_") else "C0"
            ax.plot(epochs, finite(key), style, color=color, marker=marker, ms=3, label=label)

    curve(ax_loss, "loss", "train")
    curve(ax_loss, "val_loss", "validation")
    ax_loss.set_ylabel("loss" + (" (standardized target)" if task == "regression" else ""))
    losses = [v for k in ("loss", "val_loss") if k in history for v in finite(k) if v > 0]
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
    save_figure(fig, path, title)
    return w, h
