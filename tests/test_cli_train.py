"""``fastopt train`` and ``fastopt predict`` end to end, and ``fastopt.datasets``.

Subprocess runs of ``python -m fastopt.cli`` (cwd = tmp_path) on the built-in digits and on
small generated CSV / NPZ files: the files written (checkpoint with its documented ``extra``,
history JSON fields, PNG size), the predictions against an in-process model rebuilt from the
checkpoint, and bad input as exit code 2 with one line on stderr and no traceback. Small data,
few epochs: the whole file runs in seconds.
"""

import csv
import json
import os
import sys

import numpy as np
import pytest
from cli_helpers import assert_ok, cli, png_size
from oracle import import_or_skip

import fastopt
from fastopt import datasets
from fastopt.cli import main
from fastopt.cli import train as train_cmd

import_or_skip("matplotlib")

DIGITS_QUICK = ("--epochs", "30", "--seed", "0")
"""The suite's digits settings: the defaults (256 hidden units, Adam 1e-3, batch 64, label
smoothing 0.1), 30 epochs, seed 0; about 0.3 s of training."""


def assert_bad(r, message):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert message in lines[0], lines[0]


# ------------------------------------------------------------------------------ data files
def _features(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3))


def _labels(X):
    return np.where(X[:, 0] + X[:, 1] > 0.3, "yes", np.where(X[:, 2] > 0, "maybe", "no"))


def _values(X):
    return 2 * X[:, 0] - X[:, 1] + 0.5 * X[:, 2] ** 2 + 10.0


def write_csv(path, header, columns):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in zip(*columns):
            w.writerow([repr(float(v)) if isinstance(v, float) else str(v) for v in row])
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    X = _features(240)
    Xn = _features(40, seed=1)
    cols = [X[:, j].tolist() for j in range(3)]
    new_cols = [Xn[:, j].tolist() for j in range(3)]
    f = {"dir": d, "X_new": Xn}
    # classification with string labels; the target in the middle, named with --target
    f["cls"] = write_csv(d / "cls.csv", ["a", "label", "b", "c"], [cols[0], _labels(X), *cols[1:]])
    # predict input: features in another order plus the target column
    f["cls_new"] = write_csv(
        d / "new.csv", ["c", "a", "b", "label"], [*new_cols[2:], *new_cols[:2], _labels(Xn)]
    )
    # regression: the target is the last column (the default)
    f["reg"] = write_csv(d / "reg.csv", ["a", "b", "c", "price"], [*cols, _values(X).tolist()])
    f["reg_new"] = write_csv(d / "reg_new.csv", ["a", "b", "c"], new_cols)
    np.savez(d / "data.npz", X=X, y=(X[:, 0] > 0).astype(np.int64))
    f["npz"] = d / "data.npz"
    return f


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    import_or_skip("sklearn")  # the built-in datasets are scikit-learn's bundled copies
    cwd = tmp_path_factory.mktemp("digits")
    r = cli("train", "digits", *DIGITS_QUICK, cwd=cwd)
    return r, cwd / "digits-model"


@pytest.fixture(scope="module")
def cls_run(files):
    cwd = files["dir"]
    r = cli("train", files["cls"], "--target", "label", "--epochs", "15", "--hidden", "32,16",
            "--optimizer", "adamw:lr=3e-3,weight_decay=0.01", "--schedule", "cosine",
            "--warmup", "5", "--quiet", "--out", "cls-model", cwd=cwd)  # fmt: skip
    return r, cwd / "cls-model"


# ------------------------------------------------------------------------------ digits
def test_train_digits(digits_run):
    r, out = digits_run
    assert_ok(r)
    text = r.stdout
    assert "digits: 1797 samples x 64 features" in text and "classification, 10 classes" in text
    assert "split: 1212 train / 135 validation / 450 test (stratified), seed 0" in text
    assert "epoch 30/30" in text
    for part in ("train", "validation", "test"):
        assert any(line.split()[:1] == [part] for line in text.splitlines()), part
    assert "samples/s" in text and "wrote digits-model" in text
    # per-epoch times with enough digits (ms for short epochs), never "0.00 s"
    import re

    for line in text.splitlines():
        if line.startswith("epoch "):
            assert re.search(r"  \d+(\.\d+)? (ms|s)$", line) and "0.00 s" not in line, line
    # the kernels are compiled (or loaded) before the clock: reported apart
    assert "kernel compilation: " in text and "not counted in its time" in text
    history = json.loads((out / "history.json").read_text())
    test_acc = history["meta"]["final"]["test"]["accuracy"]
    assert test_acc >= 0.97, test_acc
    # the summary prints the same number
    (test_line,) = [line for line in text.splitlines() if line.startswith("test ")]
    assert float(test_line.split()[2]) == pytest.approx(test_acc, abs=5e-5)


def test_digits_history_fields(digits_run):
    _, out = digits_run
    doc = json.loads((out / "history.json").read_text())
    assert set(doc) == {"metrics", "meta"}
    m = doc["metrics"]
    keys = {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "time", "samples_per_s"}
    assert set(m) == keys
    assert all(len(v) == 30 for v in m.values())
    assert m["epoch"] == list(range(1, 31))
    assert m["loss"][-1] < m["loss"][0] and m["val_accuracy"][-1] > 0.9
    assert all(v == pytest.approx(1e-3) for v in m["lr"])
    meta = doc["meta"]
    assert set(train_cmd.HISTORY_META) <= set(meta)
    for key in ("monitor", "seed", "n_train", "n_val", "batch_size", "steps_per_epoch"):
        assert key in meta
    assert (meta["n_train"], meta["n_val"], meta["n_test"]) == (1212, 135, 450)
    assert meta["steps_per_epoch"] == 19 and meta["batch_size"] == 64
    assert meta["task"] == "classification" and meta["classes"] == list(range(10))
    assert meta["dataset"] == "digits" and meta["epochs_run"] == 30 and meta["n_features"] == 64
    assert set(meta["final"]) == {"train", "validation", "test"}
    for part in meta["final"].values():
        assert set(part) == {"loss", "accuracy"}
    assert meta["train_time_s"] > 0 and meta["samples_per_s"] > 0
    # History.from_json reads it back
    h = fastopt.trainer.History.from_json(out / "history.json")
    assert h["val_accuracy"] == m["val_accuracy"] and h.meta["final"] == meta["final"]


def test_digits_checkpoint(digits_run):
    _, out = digits_run
    ckpt = fastopt.load(out / "model.ckpt")
    assert ckpt.algorithm == "Adam" and ckpt.optimizer_state is not None
    info = ckpt.extra["model"]
    assert info["format"] == train_cmd.MODEL_FORMAT
    assert info["task"] == "classification" and info["classes"] == list(range(10))
    assert info["target"] == "target" and info["target_mean"] is None
    assert info["n_features"] == 64 and info["feature_names"][:2] == ["pixel_0_0", "pixel_0_1"]
    assert info["mlp"]["hidden_sizes"] == (256,) and info["mlp"]["n_outputs"] == 10
    assert info["input_mean"].shape == info["input_std"].shape == (64,)
    assert np.allclose(1.0 / info["input_std"], ckpt.params["input.inv_std"])
    assert np.array_equal(info["input_mean"], ckpt.params["input.mean"])
    assert info["metrics"]["test"]["accuracy"] >= 0.97
    assert info["settings"]["seed"] == 0 and info["dataset"] == "digits"
    # the documented recipe rebuilds the model
    model = fastopt.MLP(**info["mlp"])
    ckpt.restore(params=model.arrays())
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    assert (np.argmax(model.predict(X), axis=1) == y).mean() > 0.97


def test_digits_png(digits_run):
    _, out = digits_run
    assert png_size(out / "curves.png") == train_cmd.CURVES_SIZE_PX == (1000, 400)


# ------------------------------------------------------------------------------ CSV / NPZ
def test_train_csv_string_labels(cls_run):
    r, out = cls_run
    assert_ok(r)
    assert "target 'label': classification, 3 classes (non-numeric labels)" in r.stdout
    assert "epoch " not in r.stdout  # --quiet
    assert "linear warmup over 5 steps, then CosineAnnealing" in r.stdout
    info = fastopt.load(out / "model.ckpt").extra["model"]
    assert info["classes"] == ["maybe", "no", "yes"]
    assert info["feature_names"] == ["a", "b", "c"] and info["target"] == "label"
    doc = json.loads((out / "history.json").read_text())
    lr = doc["metrics"]["lr"]
    assert lr[-1] < lr[len(lr) // 2] < 3e-3  # cosine decay after the warmup
    assert doc["meta"]["schedule"]["type"] == "Warmup"
    assert doc["meta"]["final"]["test"]["accuracy"] > 0.7
    assert png_size(out / "curves.png") == (1000, 400)


def test_train_csv_regression(files, tmp_path):
    r = cli("train", files["reg"], "--epochs", "40", "--hidden", "64", "--quiet",
            "--optimizer", "adam:lr=3e-3", "--out", tmp_path / "m", cwd=tmp_path)  # fmt: skip
    assert_ok(r)
    assert "target 'price': regression (real-valued target)" in r.stdout
    assert "(stratified)" not in r.stdout
    header = next(line for line in r.stdout.splitlines() if "mae" in line)
    assert header.split() == ["loss", "mae", "rmse", "r2"]
    doc = json.loads((tmp_path / "m" / "history.json").read_text())
    assert {"mae", "rmse", "val_mae", "val_rmse"} <= set(doc["metrics"])
    final = doc["meta"]["final"]
    assert set(final["test"]) == {"loss", "mae", "rmse", "r2"}
    assert final["test"]["r2"] > 0.8
    # mae / rmse are in target units: loss (standardized MSE) * std^2 ~ rmse^2
    info = fastopt.load(tmp_path / "m" / "model.ckpt").extra["model"]
    assert info["task"] == "regression" and info["classes"] is None
    std = info["target_std"]
    assert final["train"]["rmse"] ** 2 == pytest.approx(final["train"]["loss"] * std**2, rel=1e-3)
    assert info["target_mean"] == pytest.approx(10.0, abs=1.0)
    assert png_size(tmp_path / "m" / "curves.png") == (1000, 400)

    # predict to stdout: values, compared with the model rebuilt in process
    p = cli("predict", tmp_path / "m", files["reg_new"], cwd=tmp_path)
    assert_ok(p)
    rows = list(csv.reader(p.stdout.splitlines()))
    assert rows[0] == ["prediction"] and len(rows) == 41
    got = np.array([float(v[0]) for v in rows[1:]])
    assert np.allclose(
        got, _in_process(tmp_path / "m" / "model.ckpt", files["X_new"]), rtol=0, atol=1e-9
    )
    assert np.corrcoef(got, _values(files["X_new"]))[0, 1] > 0.9


def test_train_npz(files, tmp_path):
    r = cli("train", files["npz"], "--epochs", "5", "--no-plot", "--quiet", "--seed", "3",
            "--out", "npz-model", cwd=tmp_path)  # fmt: skip
    assert_ok(r)
    assert (
        "target 'y': classification, 2 classes (integer labels with 2 distinct values)" in r.stdout
    )
    out = tmp_path / "npz-model"
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "model.ckpt", "test.npz"]
    info = fastopt.load(out / "model.ckpt").extra["model"]
    assert info["classes"] == [0, 1] and info["feature_names"] is None
    assert json.loads((out / "history.json").read_text())["meta"]["seed"] == 3


def _in_process(ckpt_path, X):
    """The model's outputs rebuilt from the checkpoint by its documented fields (float64)."""
    ckpt = fastopt.load(ckpt_path)
    info = ckpt.extra["model"]
    model = fastopt.MLP(**info["mlp"])
    ckpt.restore(params=model.arrays())
    out = model.astype(np.float64).predict(X)
    if info["task"] == "regression":
        return out[:, 0] * info["target_std"] + info["target_mean"]
    return out


def test_predict_csv(cls_run, files, tmp_path):
    _, model_dir = cls_run
    out = tmp_path / "pred.csv"
    r = cli("predict", model_dir, files["cls_new"], "--proba", "--precision", "17", "--out", out,
            cwd=tmp_path)  # fmt: skip
    assert_ok(r)
    assert "wrote 40 predictions" in r.stdout and "accuracy" in r.stdout
    rows = list(csv.reader(out.read_text().splitlines()))
    assert rows[0] == ["prediction", "proba_maybe", "proba_no", "proba_yes"]
    proba = np.array([[float(v) for v in row[1:]] for row in rows[1:]])
    labels = [row[0] for row in rows[1:]]
    expected = _in_process(model_dir / "model.ckpt", files["X_new"])  # columns a, b, c
    np.testing.assert_allclose(proba, expected, rtol=0, atol=1e-12)
    assert labels == [["maybe", "no", "yes"][i] for i in expected.argmax(axis=1)]
    acc = np.mean(np.array(labels) == _labels(files["X_new"]))
    assert f"accuracy {acc:.4f} on 40 rows" in r.stdout
    # the library entry point agrees
    from fastopt.cli.predict import load_model

    m = load_model(model_dir)
    assert m.predict(files["X_new"]).tolist() == labels
    np.testing.assert_allclose(m.predict_proba(files["X_new"]), expected, atol=1e-12)


# ------------------------------------------------------------------------------ bad input
def test_bad_input_subprocess(files, cls_run, tmp_path):
    _, model_dir = cls_run
    bad = tmp_path / "corrupt.ckpt"
    data = bytearray((model_dir / "model.ckpt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    for args, message in (
        (["train", "missing.csv"], "missing.csv: no such file"),
        (["predict", bad, files["cls_new"]], "cannot load checkpoint"),
        (["train", files["cls"], "--optimizer", "adamw:lr=1e-3,betas=0.9"], "--optimizer"),
    ):
        r = cli(*args, cwd=tmp_path)
        assert_bad(r, message)
        assert r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.ckpt"], "wrote nothing"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "nonnum.csv").write_text("a,b,y\n1,x,0\n2,3,1\n")
    (d / "nan.csv").write_text("a,b,y\n1,nan,0\n2,3,1\n")
    (d / "ragged.csv").write_text("a,b,y\n1,2,0\n1,2\n")
    (d / "empty.csv").write_text("")
    (d / "header.csv").write_text("a,b,y\n")
    (d / "dup.csv").write_text("a,a,y\n1,2,0\n")
    (d / "binary.csv").write_bytes(b"\xff\xfe\x00\x80garbage")
    (d / "semi.csv").write_text("a;b;y\n1;2;0\n3;4;1\n")
    (d / "semi_decimal.csv").write_text("a;b;y\n1,5;2;0\n3;4,5;1\n")
    (d / "text.npz").write_text("not a zip")
    (d / "data.txt.gz").write_bytes(b"")
    np.savez(d / "noy.npz", X=np.ones((4, 2)))
    np.savez(d / "x1d.npz", X=np.ones(4), y=np.ones(4))
    np.savez(d / "short.npz", X=np.ones((4, 2)), y=np.ones(3))
    np.savez(d / "nanx.npz", X=np.array([[1.0, np.nan], [0.0, 1.0]]), y=np.array([0, 1]))
    np.savez(d / "wide.npz", X=np.ones((4, 4)))
    (d / "plain.ckpt").write_bytes(b"")
    fastopt.save(d / "other.ckpt", params={"w": np.ones(3)})
    write_csv(d / "one.csv", ["a", "b", "c", "label"], [[1.0] * 5, [2.0] * 5, [3.0] * 5, ["x"] * 5])
    write_csv(d / "missing_c.csv", ["a", "b"], [[1.0], [2.0]])
    write_csv(d / "extra.csv", ["a", "b", "c", "id"], [[1.0], [2.0], [3.0], [7]])
    write_csv(d / "nanpred.csv", ["a", "b", "c"], [[1.0], [float("nan")], [3.0]])
    return d


BAD_TRAIN = [
    (["nosuch"], "no such file; built-in datasets: digits"),
    (["{d}/data.txt.gz"], "unsupported file type"),
    (["{cls}", "--target", "nope"], "no column 'nope' (--target); columns: 'a', 'label', 'b', 'c'"),
    (["{d}/nonnum.csv"], "feature column 'b' is not numeric (line 2: 'x')"),
    (["{d}/nan.csv"], "NaN or infinity in feature column 'b' (line 2"),
    (["{d}/ragged.csv"], "line 3 has 2 fields, the header has 3"),
    (["{d}/empty.csv"], "the file is empty"),
    (["{d}/header.csv"], "no data rows"),
    (["{d}/dup.csv"], "column 'a' appears twice"),
    (["{d}/binary.csv"], "not a text CSV file"),
    (["{d}/text.npz"], "not an .npz archive"),
    (["{d}/noy.npz"], "no target array 'y'"),
    (["{npz}", "--target", "labels"], "no target array 'labels' (--target); arrays: 'X', 'y'"),
    (["{d}/x1d.npz"], "X must be 2-D"),
    (["{d}/short.npz"], "X has 4 rows but 'y' has 3"),
    (["{d}/nanx.npz"], "NaN or infinity in X (row 0, column 1)"),
    (["{d}/one.csv"], "holds one class only ('x')"),
    (["{cls}", "--target", "label", "--task", "regression"], "holds non-numeric values"),
    (["{reg}", "--loss", "cross_entropy"], "does not fit regression"),
    (["{cls}", "--optimizer", "foo"], "unknown optimizer 'foo'"),
    (["{cls}", "--optimizer", "adam:lr"], "'lr' is not key=value"),
    (["{cls}", "--optimizer", "adam:lr=-1"], "invalid lr"),
    (["{cls}", "--optimizer", "sgd:nesterov=true"], "nesterov=True requires momentum > 0"),
    (["{cls}", "--optimizer", "adam:foo=1"], "has no argument 'foo'"),
    (["{reg}", "--schedule", "bogus"], "unknown schedule 'bogus'"),
    (["{reg}", "--schedule", "cosine:warmup=3", "--warmup", "2"], "give the warmup once"),
    (["{reg}", "--warmup", "100000"], "is not shorter than the run"),
    (["{cls}", "--hidden", "12,x"], "--hidden: 'x' is not a positive layer size"),
    (["{cls}", "--hidden", "0,0"], "holds a layer of 0 units; for no hidden layer give --hidden 0"),
    (["{cls}", "--hidden", "64,0"], "holds a layer of 0 units"),
    (["{d}/semi.csv"], "is it ';'-separated? try --delimiter ';'"),
    (["{d}/semi_decimal.csv"], "is it ';'-separated? try --delimiter ';'"),
    (["{cls}", "--warmup-start-factor", "1.5"], "--warmup-start-factor must be in [0, 1]"),
    (["{cls}", "--activation", "swish"], "unknown activation 'swish'"),
    (["{cls}", "--test-size", "1.5"], "--test-size must be in [0, 1)"),
    (["{cls}", "--epochs", "0"], "--epochs must be >= 1"),
    (["{cls}", "--patience", "3", "--validation-split", "0"], "--patience needs a validation"),
    (["{cls}", "--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["{cls}", "--delimiter", ";;"], "--delimiter must be one character"),
    (["{d}/other.ckpt"], "unsupported file type '.ckpt'"),
]


def _fill(args, files, d):
    subs = {"d": d, "cls": files["cls"], "reg": files["reg"], "npz": files["npz"]}
    return [a.format(**subs) for a in args]


def _check_one_line(capsys, message):
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert ": error: " in lines[0] and message in lines[0], lines[0]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("args,message", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_train_bad_input(args, message, files, bad_files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *_fill(args, files, bad_files)]) == 2
    _check_one_line(capsys, message)
    assert not list(tmp_path.iterdir()), "bad input must write nothing"


BAD_PREDICT = [
    (["{d}/none", "{cls}"], "no such file or folder"),
    (["{d}", "{cls}"], "no model.ckpt in this folder"),
    (["{d}/plain.ckpt", "{cls}"], "the file is empty"),
    (["{cls}", "{cls}"], "not a fastopt checkpoint"),
    (["{d}/other.ckpt", "{cls}"], "not a model written by 'fastopt train'"),
    (["{model}", "{d}/missing_c.csv"], "missing 'c'"),
    (["{model}", "{d}/extra.csv"], "unexpected column(s) 'id'"),
    (["{model}", "{d}/wide.npz"], "X has 4 features, the model expects 3"),
    (["{model}", "{d}/nanpred.csv"], "NaN or infinity in feature column 'b'"),
    (["{model}", "digits"], "'digits' is a built-in dataset"),
    (["{model}", "{d}/nope.csv"], "nope.csv: no such file"),
    (["{model}", "{cls}", "--out", "{d}/no/dir/p.csv"], "does not exist"),
]


@pytest.mark.parametrize("args,message", BAD_PREDICT, ids=[" ".join(a) for a, _ in BAD_PREDICT])
def test_predict_bad_input(args, message, files, bad_files, cls_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    subs = {"d": bad_files, "cls": files["cls"], "model": cls_run[1]}
    assert main(["predict", *[a.format(**subs) for a in args]]) == 2
    _check_one_line(capsys, message)
    assert not list(tmp_path.iterdir())


def test_predict_proba_needs_classification(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(files["reg"]), "--epochs", "1", "--quiet", "--no-plot"]) == 0
    capsys.readouterr()
    assert main(["predict", "reg-model", str(files["reg_new"]), "--proba"]) == 2
    _check_one_line(capsys, "--proba needs a classification model")


def test_help(capsys):
    for command in ("train", "predict"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: fastopt {command}") and "examples:" in out
    # train's help reads the registries, and documents the exit codes and the warmup default
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for name, entry in datasets.BUILTIN.items():
        assert f"  {name:<14}{entry.task}: {entry.description}" in out
    flat = " ".join(out.split())
    assert ", ".join(fastopt.optim.OPTIMIZERS) in flat
    assert ", ".join(fastopt.nn.ACTIVATIONS) in flat
    assert "130 interrupted by Ctrl-C" in flat and "1 the loss became non-finite" in flat
    assert "--warmup-start-factor F" in out and "default 1/3, as torch's LinearLR" in flat
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "predict" in out


# ------------------------------------------------------------------------------ datasets
def test_infer_task():
    assert datasets.infer_task(np.array(["a", "b", "a"]))[0] == "classification"
    assert datasets.infer_task(np.arange(100) % 3)[0] == "classification"
    assert datasets.infer_task(np.arange(100))[0] == "regression"  # many distinct integers
    assert datasets.infer_task(np.arange(100) % 60)[0] == "regression"  # > MAX_AUTO_CLASSES
    assert datasets.infer_task(np.array([0.5, 1.5, 0.5]))[0] == "regression"
    assert datasets.infer_task(np.array([True, False]))[0] == "classification"


def test_split_indices_stratified():
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    keep, held = datasets.split_indices(100, 0.2, seed=0, labels=labels)
    assert held.size == 20 and keep.size == 80
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(100))
    assert np.bincount(labels[held]).tolist() == [12, 6, 2]
    again = datasets.split_indices(100, 0.2, seed=0, labels=labels)
    assert np.array_equal(again[1], held)
    assert datasets.split_indices(10, 0.0, seed=0)[1].size == 0


def test_load_csv_default_target_and_types(tmp_path):
    p = write_csv(tmp_path / "t.tsv", ["x", "y"], [[1.0, 2.0], [3, 4]])
    p.write_text(p.read_text().replace(",", "\t"))
    ds = datasets.load(p)
    assert ds.target_name == "y" and ds.feature_names == ["x"]
    assert ds.y.dtype == np.int64 and ds.X.tolist() == [[1.0], [2.0]]
    import_or_skip("sklearn")
    ds = datasets.load("iris")
    assert ds.X.shape == (150, 4) and set(ds.y.tolist()) == {"setosa", "versicolor", "virginica"}


def test_missing_scikit_learn(tmp_path, monkeypatch, capsys):
    """No scikit-learn: the built-in datasets are unavailable. Exit code 1 and one line saying
    what to install; nothing written. (Without matplotlib the run trains and skips curves.png:
    test_train_without_matplotlib.)"""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["train", "digits", "--no-plot"]) == 1
    _check_one_line(capsys, "pip install scikit-learn")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ first hour
def test_digits_test_split_and_predict_command(digits_run):
    """train saves its test rows beside the model and prints the predict command that scores
    them; that command runs and scores the NPZ's y (the model's target is named 'target')."""
    r, out = digits_run
    with np.load(out / "test.npz") as z:
        assert z["X"].shape == (450, 64) and z["y"].shape == (450,)
        assert z["feature_names"].tolist()[:2] == ["pixel_0_0", "pixel_0_1"]
        X, y = z["X"], z["y"]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("score the test rows: ")]
    command = line.removeprefix("score the test rows: ").split()
    assert command == ["fastopt", "predict", "digits-model", "digits-model/test.npz"]
    p = cli(*command[1:], "--proba", cwd=out.parent)
    assert_ok(p)
    rows = list(csv.reader(p.stdout.splitlines()))
    assert len(rows) == 451
    expected = _in_process(out / "model.ckpt", X)
    assert [int(row[0]) for row in rows[1:]] == expected.argmax(axis=1).tolist()
    acc = float(np.mean(expected.argmax(axis=1) == y))
    assert f"accuracy {acc:.4f} on 450 rows (target 'y')" in p.stderr
    # --proba: 6 significant digits by default (no 17-digit noise)
    cells = [c for row in rows[1:] for c in row[1:]]
    digits = [c.split("e")[0].replace(".", "").lstrip("0") for c in cells]
    assert max(map(len, digits)) <= 6 and max(map(len, digits)) >= 5
    np.testing.assert_allclose(
        np.array([[float(c) for c in row[1:]] for row in rows[1:]]), expected, rtol=5e-6
    )


def test_train_reports_compile_time_apart(files, tmp_path, monkeypatch, capsys):
    """A slow kernel compilation is reported on its own line, announced while it runs, and
    does not count in the training time (it did: the first epoch held it)."""
    import time as time_module

    compile_kernels = train_cmd.compile_kernels

    def slow_compile(*args):
        time_module.sleep(1.6)
        compile_kernels(*args)

    monkeypatch.setattr(train_cmd, "compile_kernels", slow_compile)
    monkeypatch.chdir(tmp_path)
    argv = ["train", str(files["npz"]), "--epochs", "3", "--no-plot", "--no-progress"]
    assert main([*argv, "--out", "m"]) == 0
    out = capsys.readouterr().out
    assert "compiling kernels (first run only)..." in out
    meta = json.loads((tmp_path / "m" / "history.json").read_text())["meta"]
    assert meta["compile_time_s"] >= 1.6
    assert meta["train_time_s"] < 1.6
    assert f"kernel compilation: {meta['compile_time_s']:.2f} s before training" in out
    epochs = [ln for ln in out.splitlines() if ln.startswith("epoch 1/3")]
    assert epochs and epochs[0].endswith(" ms"), epochs


def test_compile_warm_up_leaves_the_run_unchanged(files, tmp_path, monkeypatch):
    """The warm-up fits a copy: the real run's numbers are those of a run without it."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", str(files["npz"]), "--epochs", "3", "--no-plot", "--quiet"]
    assert main([*argv, "--out", "a"]) == 0
    monkeypatch.setattr(train_cmd, "compile_kernels", lambda *args: None)
    assert main([*argv, "--out", "b"]) == 0
    a, b = (json.loads((tmp_path / d / "history.json").read_text()) for d in "ab")
    assert a["metrics"]["loss"] == b["metrics"]["loss"]
    assert a["meta"]["final"] == b["meta"]["final"]


def test_train_without_matplotlib(files, tmp_path):
    """No matplotlib: the run trains, writes everything but curves.png and says so in one line
    (it used to stop with exit code 1 before training)."""
    fake = tmp_path / "nomatplotlib"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    path = os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])
    r = cli("train", files["npz"], "--epochs", "2", "--quiet", "--out", "m", cwd=tmp_path,
            env={"PYTHONPATH": path})  # fmt: skip
    assert_ok(r)
    assert "curves.png skipped: matplotlib is not installed" in r.stdout
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "history.json",
        "model.ckpt",
        "test.npz",
    ]


def test_diverging_run_is_one_line(files, tmp_path):
    """sgd lr=1e4: the loss becomes non-finite; one line on stderr says at which epoch and
    suggests a smaller lr; no NumPy or Trainer warning reaches the terminal; exit code 1."""
    r = cli("train", files["reg"], "--optimizer", "sgd:lr=1e4", "--epochs", "5", "--no-progress",
            "--out", "m", cwd=tmp_path)  # fmt: skip
    assert r.returncode == train_cmd.EXIT_DIVERGED == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    history = json.loads((tmp_path / "m" / "history.json").read_text())
    losses = history["metrics"]["loss"]  # JSON null: non-finite
    first = next(
        (i + 1 for i, v in enumerate(losses) if v is None or not np.isfinite(v)), len(losses) + 1
    )
    assert f"the loss became non-finite (NaN or infinity) at epoch {first};" in lines[0]
    assert "Try a smaller learning rate (e.g. --optimizer sgd:lr=1000)" in lines[0]
    assert "Warning" not in r.stdout + r.stderr


def test_warmup_starts_at_a_third_of_the_lr(files, tmp_path, monkeypatch):
    """--warmup ramps from lr/3 like fastopt.schedules.warmup (torch's LinearLR default); the
    CLI used to start at 0. --warmup-start-factor 0 does that."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", str(files["npz"]), "--epochs", "2", "--no-plot", "--quiet", "--warmup", "4"]
    for out, extra, start in (("a", [], 1e-3 / 3), ("b", ["--warmup-start-factor", "0"], 0.0)):
        assert main([*argv, *extra, "--out", out]) == 0
        meta = json.loads((tmp_path / out / "history.json").read_text())["meta"]
        sched = fastopt.schedules.schedule_from_dict(meta["schedule"])
        assert sched(0) == pytest.approx(start) and sched(4) == pytest.approx(1e-3)


def test_schedule_spec_warmup_takes_its_steps_from_the_run(files, tmp_path, monkeypatch, capsys):
    """warmup=W in --schedule works as --warmup W: the schedule after it takes the run's other
    steps, and a warmup not shorter than the run is refused (exit 2) before anything is
    written (before, the cosine kept the whole run's length and any W was taken)."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", str(files["npz"]), "--epochs", "2", "--no-plot", "--quiet"]
    assert main([*argv, "--batch-size", "48", "--schedule", "cosine:warmup=4", "--out", "a"]) == 0
    meta = json.loads((tmp_path / "a" / "history.json").read_text())["meta"]
    sched = fastopt.schedules.schedule_from_dict(meta["schedule"])
    assert sched.warmup_steps == 4 and sched.schedule.T_max == 2 * meta["steps_per_epoch"] - 4
    assert main([*argv, "--schedule", "cosine:warmup=100000", "--out", "b"]) == 2
    assert "not shorter" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_hidden_zero_means_no_hidden_layer(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ("0", "none"):
        argv = ["train", str(files["npz"]), "--hidden", text, "--epochs", "1", "--no-plot"]
        assert main([*argv, "--quiet", "--out", text]) == 0
        info = fastopt.load(tmp_path / text / "model.ckpt").extra["model"]
        assert info["mlp"]["hidden_sizes"] == ()


def test_npz_target_y_is_scored(cls_run, files, tmp_path):
    """An NPZ's y is scored even when the model's target has another name ('label')."""
    _, model_dir = cls_run
    X = files["X_new"][:, [0, 1, 2]]
    np.savez(tmp_path / "new.npz", X=X, y=_labels(files["X_new"]))
    r = cli("predict", model_dir, tmp_path / "new.npz", "--out", tmp_path / "p.csv", cwd=tmp_path)
    assert_ok(r)
    assert "on 40 rows (target 'y')" in r.stdout


def test_builtin_registry():
    """Every built-in dataset of the registry loads, with the task it declares."""
    import_or_skip("sklearn")
    for name, entry in datasets.BUILTIN.items():
        ds = datasets.load(name)
        assert ds.task_hint == entry.task and ds.X.shape[0] == ds.y.shape[0] > 100
        assert entry.description
