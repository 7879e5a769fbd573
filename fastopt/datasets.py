"""Tabular datasets for ``fastopt train`` / ``fastopt predict``: built-in ones and CSV / NPZ files.

::

    from fastopt import datasets
    ds = datasets.load("digits")                    # scikit-learn's bundled copy, no download
    ds = datasets.load("data.csv", target="price")  # header row; every other column a feature
    ds = datasets.load("data.npz")                  # arrays X (n, d) and y (n,)
    task, reason = datasets.infer_task(ds.y)        # "classification" or "regression"
    classes, codes = datasets.encode_labels(ds.y)   # sorted distinct labels, int64 codes
    mean, std = datasets.target_standardization(y)  # regression targets
    train, test = datasets.split_indices(len(ds.y), 0.25, seed=0, labels=codes)

Built-in datasets (the registry :data:`BUILTIN`) are the copies bundled with scikit-learn (an
optional dependency): ``digits`` (8x8 images, 10 classes), ``iris``, ``wine``, ``breast_cancer``
(classification) and ``diabetes`` (regression).

CSV files need a header row; the target is the column named ``target`` (default: the last
column) and every other column is a numeric feature. The delimiter is ``,`` (``.tsv``: a tab)
unless given. NPZ files hold ``X`` (2-D, numeric) and the target array ``y`` (or the one named by
``target``; when predicting, the model's target name or else ``y``), optionally
``feature_names`` (strings). Anything wrong in a file (missing, not a CSV
or NPZ, ragged rows, an unknown column, a non-numeric feature, NaN/infinity, wrong shapes) raises
:class:`DatasetError`, a ValueError with one readable line naming the file, column and line.
"""

from __future__ import annotations

import csv
import io
import math
import os
import zipfile
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BUILTIN",
    "MAX_AUTO_CLASSES",
    "Builtin",
    "Dataset",
    "DatasetError",
    "encode_labels",
    "infer_task",
    "load",
    "load_builtin",
    "load_csv",
    "load_npz",
    "split_indices",
    "target_standardization",
]


@dataclass(frozen=True)
class Builtin:
    """A built-in dataset: the ``sklearn.datasets`` function that loads it, its task and a
    one-line description (shown by ``fastopt train --help``)."""

    loader: str
    task: str
    description: str


BUILTIN = {
    "digits": Builtin(
        "load_digits", "classification", "8x8 images of handwritten digits, 10 classes"
    ),
    "iris": Builtin("load_iris", "classification", "150 iris flowers, 4 measurements, 3 species"),
    "wine": Builtin("load_wine", "classification", "178 wines, 13 chemical features, 3 cultivars"),
    "breast_cancer": Builtin(
        "load_breast_cancer", "classification", "569 tumours, 30 features, malignant or benign"
    ),
    "diabetes": Builtin(
        "load_diabetes", "regression", "442 patients, 10 features, disease progression"
    ),
}
"""The registry of built-in datasets, name -> :class:`Builtin`: the copies bundled with
scikit-learn (no download). ``fastopt train`` takes its choices and help from here."""

MAX_AUTO_CLASSES = 50
"""Integer targets with at most this many distinct values (and at most half as many as samples)
are inferred to be class labels; more, or float values, mean regression."""

CSV_SUFFIXES = (".csv", ".tsv", ".txt")
NPZ_SUFFIXES = (".npz",)


class DatasetError(ValueError):
    """Bad input data: a one-line message saying what is wrong and where."""


@dataclass
class Dataset:
    """``X`` float64 (n, d); ``y`` the raw targets (n,) as found (int, float or str labels), or
    None when the data has no target (``fastopt predict`` input); ``feature_names`` (d names, or
    None when the source has none), ``target_name``, ``name`` (for messages and titles),
    ``source`` (the built-in name or the file path) and ``task_hint`` (a built-in dataset's
    task, else None)."""

    X: np.ndarray
    y: np.ndarray | None
    feature_names: list | None
    target_name: str | None
    name: str
    source: str
    task_hint: str | None = None


# ------------------------------------------------------------------------------ entry point
def load(source, *, target=None, delimiter=None, features=None):
    """A :class:`Dataset` from a built-in name or a CSV / NPZ path (chosen by the suffix).

    ``features`` (a list of names, or an int count): the feature columns a trained model expects;
    the file must hold exactly those (plus, optionally, the target ``target``): the ``fastopt
    predict`` mode. Without ``features`` (training), the target must be there."""
    source = os.fspath(source)
    path = source
    suffix = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        if source.lower() in BUILTIN and not suffix:
            if features is not None:
                raise DatasetError(f"{source!r} is a built-in dataset; predict needs a file")
            if target is not None:
                raise DatasetError(f"--target does not apply to the built-in dataset {source!r}")
            return load_builtin(source.lower())
        hint = "" if suffix else f"; built-in datasets: {', '.join(BUILTIN)}"
        raise DatasetError(f"{source}: no such file{hint}")
    if os.path.isdir(path):
        raise DatasetError(f"{source}: is a directory, expected a .csv or .npz file")
    if suffix in NPZ_SUFFIXES:
        return load_npz(path, target=target, features=features)
    if suffix in CSV_SUFFIXES:
        return load_csv(path, target=target, delimiter=delimiter, features=features)
    raise DatasetError(
        f"{source}: unsupported file type {suffix or '(no suffix)'!r}; expected .csv or .npz"
    )


# ------------------------------------------------------------------------------ built-in
def load_builtin(name):
    """One of :data:`BUILTIN`, from scikit-learn's bundled copy (ImportError without it)."""
    try:
        entry = BUILTIN[name]
    except KeyError:
        raise DatasetError(
            f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN)}"
        ) from None
    try:
        import sklearn.datasets as skd
    except ImportError:
        raise ImportError(
            f"the built-in dataset {name!r} is scikit-learn's bundled copy: "
            "pip install scikit-learn (or train on a CSV / NPZ file)"
        ) from None
    task = entry.task
    bunch = getattr(skd, entry.loader)()
    X = np.ascontiguousarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target)
    names = getattr(bunch, "target_names", None)
    if task == "classification" and names is not None and np.asarray(names).dtype.kind in "US":
        y = np.asarray(names)[y]  # readable labels (setosa, malignant, ...)
    features = [str(f) for f in getattr(bunch, "feature_names", [])] or None
    return Dataset(X, y, features, "target", name, name, task_hint=task)


# ------------------------------------------------------------------------------ CSV
def load_csv(path, *, target=None, delimiter=None, features=None):
    """Read a CSV file with a header row (see the module docstring). ``target``: the target
    column's name (default: the last column); ``features``: see :func:`load`."""
    path = os.fspath(path)
    if delimiter is None:
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
    if len(delimiter) != 1:
        raise DatasetError(f"the delimiter must be one character, got {delimiter!r}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a text CSV file (not valid UTF-8)") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if "\0" in text:
        raise DatasetError(f"{path}: not a text CSV file (it holds NUL bytes)")
    # the text as the file it was read from (newline=''), so that csv sees every line end as it
    # is: str.splitlines() would also split at \f, \x85, U+2028, ... and drop the newlines kept
    # inside quoted fields
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows, lines = [], []
    header = None
    try:
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue  # blank line
            if header is None:
                header = [c.strip() for c in row]
                header_line = reader.line_num
                continue
            if len(row) != len(header):
                raise DatasetError(
                    f"{path}: line {reader.line_num} has {len(row)} fields, the header has "
                    f"{len(header)}{_delimiter_hint(header, delimiter)}"
                )
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise DatasetError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from None
    if header is None:
        raise DatasetError(f"{path}: the file is empty (expected a header row and data rows)")
    for i, name in enumerate(header):
        if not name:
            raise DatasetError(
                f"{path}: column {i + 1} of the header (line {header_line}) has no name"
            )
    seen = set()
    for name in header:
        if name in seen:
            raise DatasetError(f"{path}: column {name!r} appears twice in the header")
        seen.add(name)
    if not rows:
        raise DatasetError(f"{path}: no data rows after the header")
    if len(header) < 2 and features is None:
        raise DatasetError(
            f"{path}: only one column ({header[0]!r}); expected feature columns and a target "
            f"column{_delimiter_hint(header, delimiter)}"
        )
    feat_cols, target_col = _csv_columns(path, header, target, features)
    cells = np.array(rows, dtype=str)
    X = np.empty((len(rows), len(feat_cols)), np.float64)
    for j, c in enumerate(feat_cols):
        X[:, j] = _numeric_column(path, header[c], cells[:, c], lines)
    y = None
    if target_col is not None:
        y = _target_column(path, header[target_col], cells[:, target_col], lines)
    name = os.path.splitext(os.path.basename(path))[0]
    return Dataset(
        X,
        y,
        [header[c] for c in feat_cols],
        None if target_col is None else header[target_col],
        name,
        path,
    )


def _delimiter_hint(header, delimiter):
    """A hint for a file read with the wrong delimiter: its one-column header holds another."""
    if len(header) != 1:
        return ""
    for other in (";", "\t", "|", ","):
        if other != delimiter and other in header[0]:
            shown = "$'\\t'" if other == "\t" else repr(other)
            return f"; is it {other!r}-separated? try --delimiter {shown}"
    return ""


def _csv_columns(path, header, target, features):
    index = {name: i for i, name in enumerate(header)}
    if features is None:  # training: the target column and every other column
        if target is not None and target not in index:
            raise DatasetError(
                f"{path}: no column {target!r} (--target); columns: {_names(header)}"
            )
        t = index[target] if target is not None else len(header) - 1  # default: the last column
        return [i for i in range(len(header)) if i != t], t
    if isinstance(features, (int, np.integer)):  # a model without feature names: count only
        t = index.get(target) if target is not None else None
        cols = [i for i in range(len(header)) if i != t]
        if len(cols) != features:
            raise DatasetError(
                f"{path}: {len(cols)} feature column(s), the model expects {features}"
            )
        return cols, t
    # predict mode with named features: exactly those columns (and optionally the target)
    wanted = list(features)
    missing = [f for f in wanted if f not in index]
    unknown = [h for h in header if h not in set(wanted) and h != target]
    if missing:
        more = f"; unexpected column(s) {_names(unknown)}" if unknown else ""
        raise DatasetError(
            f"{path}: the columns do not match the model's {len(wanted)} features: missing "
            f"{_names(missing)}{more}"
        )
    if unknown:
        raise DatasetError(
            f"{path}: unexpected column(s) {_names(unknown)}; the model expects the features "
            f"{_names(wanted)}" + (f" and optionally the target {target!r}" if target else "")
        )
    t = index.get(target) if target is not None else None
    return [index[f] for f in wanted], t


def _names(names, limit=8):
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _numeric_column(path, name, col, lines):
    try:
        values = col.astype(np.float64)
    except ValueError:
        values = None
    if values is None:
        for i, s in enumerate(col):
            if not s.strip():
                raise DatasetError(
                    f"{path}: missing value in feature column {name!r} (line {lines[i]})"
                )
            try:
                float(s)
            except ValueError:
                raise DatasetError(
                    f"{path}: feature column {name!r} is not numeric (line {lines[i]}: "
                    f"{_short(s)!r})"
                ) from None
        values = np.array([float(s) for s in col])  # pragma: no cover - numpy refused, Python not
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise DatasetError(
            f"{path}: NaN or infinity in feature column {name!r} (line {lines[i]}: "
            f"{_short(col[i])!r}); features must be finite numbers"
        )
    return values


def _target_column(path, name, col, lines):
    stripped = np.char.strip(col)
    empty = stripped == ""
    if empty.any():
        i = int(np.argmax(empty))
        raise DatasetError(f"{path}: missing value in the target column {name!r} (line {lines[i]})")
    try:
        return np.array([int(s) for s in stripped], dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        values = stripped.astype(np.float64)
    except ValueError:
        return stripped  # labels (strings)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise DatasetError(
            f"{path}: NaN or infinity in the target column {name!r} (line {lines[i]})"
        )
    return values


def _short(s, n=40):
    s = str(s)
    return s if len(s) <= n else s[: n - 3] + "..."


# ------------------------------------------------------------------------------ NPZ
def load_npz(path, *, target=None, features=None):
    """Read an NPZ archive: ``X`` (n, d) numeric, the target ``y`` (or ``target``), optional
    ``feature_names``; ``features``: see :func:`load`. No pickled objects are loaded."""
    path = os.fspath(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or _first_line(exc)}") from None
    if not is_zip:
        raise DatasetError(f"{path}: not an .npz archive (not a zip file; numpy.savez writes one)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError):
        raise DatasetError(f"{path}: not a valid .npz archive") from None
    except ValueError as exc:
        raise DatasetError(f"{path}: not a valid .npz archive ({_first_line(exc)})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or _first_line(exc)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(
            f"{path}: holds a single array (.npy), expected an .npz archive with X and y"
        )
    with archive:
        keys = list(archive.files)

        def get(key):
            try:
                return archive[key]
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                raise DatasetError(
                    f"{path}: cannot read array {key!r} ({_first_line(exc)})"
                ) from None

        if "X" not in keys:
            raise DatasetError(f"{path}: no array 'X'; arrays: {_names(keys) or 'none'}")
        X = get("X")
        if X.dtype.kind not in "biuf":
            raise DatasetError(f"{path}: X must hold real numbers, got dtype {X.dtype}")
        if X.ndim != 2:
            raise DatasetError(
                f"{path}: X must be 2-D (n_samples, n_features), got shape {tuple(X.shape)}"
            )
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise DatasetError(f"{path}: X is empty, shape {tuple(X.shape)}")
        X = np.ascontiguousarray(X, dtype=np.float64)
        bad = ~np.isfinite(X)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DatasetError(
                f"{path}: NaN or infinity in X (row {r}, column {c}); features must be finite"
            )
        names = None
        if "feature_names" in keys:
            fn = get("feature_names")
            if fn.dtype.kind not in "US" or fn.shape != (X.shape[1],):
                raise DatasetError(
                    f"{path}: feature_names must be {X.shape[1]} strings, got dtype {fn.dtype} "
                    f"shape {tuple(fn.shape)}"
                )
            names = [_text(v) for v in fn.tolist()]
        if features is not None:
            want = features if isinstance(features, (int, np.integer)) else len(features)
            if X.shape[1] != want:
                raise DatasetError(f"{path}: X has {X.shape[1]} features, the model expects {want}")
            if names is not None and not isinstance(features, (int, np.integer)):
                if names != list(features):
                    diff = [f"{a!r} != {b!r}" for a, b in zip(names, features) if a != b]
                    raise DatasetError(
                        f"{path}: feature_names differ from the model's: {', '.join(diff[:3])}"
                    )
        key = target if target is not None else "y"
        if features is not None and key not in keys:
            key = "y"  # predict: the model's target name, else the conventional y
        y = None
        if key in keys and key != "X":
            y = get(key)
            if y.ndim == 2 and y.shape[1] == 1:
                y = y[:, 0]
            if y.ndim != 1:
                raise DatasetError(
                    f"{path}: the target {key!r} must be 1-D (n_samples,), got shape "
                    f"{tuple(y.shape)}"
                )
            if y.shape[0] != X.shape[0]:
                raise DatasetError(f"{path}: X has {X.shape[0]} rows but {key!r} has {y.shape[0]}")
            if y.dtype.kind == "S":
                y = np.array([_text(v) for v in y.tolist()])
            elif y.dtype.kind == "b":
                y = y.astype(np.int64)
            elif y.dtype.kind not in "iufU":
                raise DatasetError(f"{path}: the target {key!r} has unsupported dtype {y.dtype}")
            if y.dtype.kind == "f" and not np.isfinite(y).all():
                raise DatasetError(f"{path}: NaN or infinity in the target {key!r}")
        elif features is None:  # training needs the target; predict does not
            what = (
                f"{target!r} (--target)" if target is not None else "'y' (or name it with --target)"
            )
            raise DatasetError(f"{path}: no target array {what}; arrays: {_names(keys)}")
    name = os.path.splitext(os.path.basename(path))[0]
    return Dataset(X, y, names, key if y is not None else None, name, path)


def _text(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _first_line(exc):
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# ------------------------------------------------------------------------------ targets
def infer_task(y):
    """(``"classification"`` or ``"regression"``, reason): string or bool labels are classes;
    integers with at most :data:`MAX_AUTO_CLASSES` distinct values (and at most half as many as
    samples) are classes; floats, or many distinct integers, are regression targets."""
    y = np.asarray(y)
    kind = y.dtype.kind
    if kind in "USOb":
        return "classification", "non-numeric labels" if kind != "b" else "boolean labels"
    k = int(np.unique(y).size)
    if kind in "iu":
        if k <= MAX_AUTO_CLASSES and k <= max(2, y.size // 2):
            return "classification", f"integer labels with {k} distinct values"
        return "regression", f"integer target with {k} distinct values"
    return "regression", "real-valued target"


def encode_labels(y):
    """(classes, codes): the sorted distinct labels and each sample's index into them (the
    encoding of ``fastopt.sklearn.MLPClassifier``: ``classes_`` and ``searchsorted``)."""
    classes, codes = np.unique(np.asarray(y), return_inverse=True)
    return classes, codes.reshape(-1).astype(np.int64)


def target_standardization(y):
    """(mean, std) of regression targets ``y``, float64 per column (shape (k,), or scalars for
    1-D ``y``); a (near-)constant column gets std 1 (the rule of
    ``fastopt.sklearn.MLPRegressor(standardize_targets=True)``)."""
    y = np.asarray(y, dtype=np.float64)
    mean = y.mean(axis=0)
    std = y.std(axis=0)
    std = np.where(std <= 1e-12 * np.maximum(1.0, np.abs(mean)), 1.0, std)
    if y.ndim == 1:
        return float(mean), float(std)
    return mean, std


def split_indices(n, fraction, seed, labels=None):
    """(kept rows, held-out rows), both sorted: ``ceil(fraction * n)`` rows held out, drawn from
    ``seed``; stratified when ``labels`` (int codes) are given: each class contributes
    ``round(fraction * count)`` rows, then the total is topped up or trimmed at random (the
    rule of :class:`fastopt.Trainer`'s validation split). ``fraction == 0``: nothing held out."""
    n = int(n)
    if fraction == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, np.int64)
    n_out = int(math.ceil(fraction * n))
    if n_out < 1 or n - n_out < 1:
        raise DatasetError(
            f"a fraction of {fraction:g} of {n} samples leaves an empty part ({n - n_out} / {n_out})"
        )
    rng = np.random.default_rng(seed)
    if labels is None:
        held = rng.permutation(n)[:n_out]
    else:
        labels = np.asarray(labels)
        parts = []
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            rng.shuffle(rows)
            parts.append(rows[: int(round(fraction * rows.size))])
        held = np.concatenate(parts)
        if held.size < n_out:
            rest = np.setdiff1d(np.arange(n), held)
            held = np.concatenate([held, rng.choice(rest, n_out - held.size, replace=False)])
        elif held.size > n_out:
            held = rng.choice(held, n_out, replace=False)
    mask = np.ones(n, bool)
    mask[held] = False
    return np.flatnonzero(mask).astype(np.int64), np.sort(held).astype(np.int64)
