"""Audit fixes (second batch) of ``fastopt predict``, ``info`` and ``bench``: bad input is one line
and exit 2 (``info`` reports a broken environment and exits 0), refused before anything is
written; ``--out`` never replaces the model or the data; non-finite outputs never become labels;
a results JSON of the wrong shape is refused; every ``bench`` output is checked before the run
and before the first is written."""

import copy
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import cli

from fastopt import benchmarking
from fastopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths")


def _train(d, rows, target, *extra):
    with open(d / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", target])
        w.writerows(rows)
    r = subprocess.run(
        [sys.executable, "-m", "fastopt.cli", "train", "train.csv", "--target", target,
         "--epochs", "2", "--hidden", "4", "--quiet", "--out", "m", *extra],
        cwd=d, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return d / "m"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    d = tmp_path_factory.mktemp("classifier")
    X = np.random.default_rng(0).standard_normal((60, 3))
    y = np.where(X[:, 0] > 0, "yes", "no")
    return _train(d, [[*map(repr, r), lab] for r, lab in zip(X.tolist(), y)], "label")


@pytest.fixture(scope="module")
def regressor(tmp_path_factory):
    d = tmp_path_factory.mktemp("regressor")
    X = np.random.default_rng(1).standard_normal((60, 3))
    y = (X @ [1.0, -2.0, 0.5] + 3.0).tolist()
    return _train(
        d, [[*map(repr, r), repr(t)] for r, t in zip(X.tolist(), y)], "t", "--task", "regression"
    )


def _copy(model, tmp_path):
    """A copy of the model folder (a failing test must not spoil the module's model)."""
    return Path(shutil.copytree(model, tmp_path / "model"))


def _csv(path, X):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c"])
        w.writerows([list(map(repr, r)) for r in X.tolist()])
    return path


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _usage_error(code, err, *needles):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


# ------------------------------------------------------------------------------ 9: predict --out
def test_predict_out_refuses_the_model_file(classifier, tmp_path, capsys):
    classifier = _copy(classifier, tmp_path)
    ckpt = classifier / "model.ckpt"
    before = ckpt.read_bytes()
    data = _csv(tmp_path / "new.csv", np.zeros((3, 3)))
    code, _, err = _run(["predict", classifier, data, "--out", ckpt], capsys)
    _usage_error(code, err, "--out", "model")
    assert ckpt.read_bytes() == before


@posix
def test_predict_out_refuses_a_link_to_the_model_file(classifier, tmp_path, capsys):
    classifier = _copy(classifier, tmp_path)
    ckpt = classifier / "model.ckpt"
    before = ckpt.read_bytes()
    (tmp_path / "link.csv").symlink_to(ckpt)
    data = _csv(tmp_path / "new.csv", np.zeros((3, 3)))
    code, _, err = _run(["predict", ckpt, data, "--out", tmp_path / "link.csv"], capsys)
    _usage_error(code, err, "--out", "model")
    assert ckpt.read_bytes() == before


def test_predict_out_refuses_the_data_file(classifier, tmp_path, capsys):
    classifier = _copy(classifier, tmp_path)
    data = _csv(tmp_path / "new.csv", np.zeros((3, 3)))
    before = data.read_bytes()
    code, _, err = _run(["predict", classifier, data, "--out", data], capsys)
    _usage_error(code, err, "--out", "data")
    assert data.read_bytes() == before


# ------------------------------------------------------------------- 10: non-finite predictions
def test_predict_refuses_nonfinite_outputs(classifier, tmp_path, capsys):
    classifier = _copy(classifier, tmp_path)
    X = np.random.default_rng(2).standard_normal((6, 3))
    X[[3, 5]] = 1e308  # finite inputs, NaN network outputs
    np.savez(tmp_path / "big.npz", X=X)
    out = tmp_path / "p.csv"
    code, stdout, err = _run(["predict", classifier, tmp_path / "big.npz", "--out", out], capsys)
    _usage_error(code, err, "2 of 6 rows", "row 3")
    assert not out.exists()
    code, stdout, err = _run(["predict", classifier, tmp_path / "big.npz", "--proba"], capsys)
    _usage_error(code, err, "NaN or infinite")
    assert stdout == ""


@pytest.mark.parametrize("edit", [{"target_std": float("nan")}, {"target_mean": float("inf")},
                                  {"target_std": 0.0}])  # fmt: skip
def test_load_model_refuses_nonfinite_target_standardization(regressor, tmp_path, capsys, edit):
    from fastopt.checkpoint import load, save
    from fastopt.cli.predict import ModelError, load_model

    ckpt = load(regressor / "model.ckpt")
    model = load_model(regressor)
    info = copy.deepcopy(ckpt.extra["model"])
    info["mlp"]["dtype"] = "float64"
    info.update(edit)
    bad = tmp_path / "bad.ckpt"
    save(bad, params=model.mlp.arrays(), extra={"model": info})
    with pytest.raises(ModelError, match=next(iter(edit))):
        load_model(bad)
    data = _csv(tmp_path / "new.csv", np.zeros((3, 3)))
    code, stdout, err = _run(["predict", bad, data], capsys)
    _usage_error(code, err, next(iter(edit)))
    assert stdout == ""


# ------------------------------------------------------------------------ 11: info, broken layer
def test_info_reports_a_threading_layer_that_cannot_start(tmp_path):
    from fastopt.machine import threading_layers

    if threading_layers().get("tbb"):
        pytest.skip("TBB is installed: the tbb layer starts")
    env = {"NUMBA_THREADING_LAYER": "tbb"}
    r = cli("info", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert "unavailable" in r.stdout and "threads          unknown" in r.stdout
    r = cli("info", "--json", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    nb = json.loads(r.stdout)["numba"]
    assert nb["threading_layer"].startswith("unavailable") and nb["threads"] is None


# ---------------------------------------------------------------------- 12: --from-json shapes
def _committed_doc():
    for path in sorted(ROOT.glob("bench/results/*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("schema") == benchmarking.SCHEMA and doc["cases"]:
            return doc
    pytest.skip("no committed fastopt bench JSON")


@pytest.fixture(scope="module")
def good_doc():
    return _committed_doc()


def _pytest_entry(case):
    return {"benchmarks": [{"extra_info": case}]}


def _bad_docs(doc):
    case = doc["cases"][0]

    def edited(**kw):
        d = copy.deepcopy(doc)
        d.update(kw)
        return d

    def case_edited(**kw):
        d = copy.deepcopy(doc)
        d["cases"][0].update(kw)
        return d

    no_median = {k: v for k, v in case.items() if k != "median_s"}
    return {
        "pytest-case-and-median-only": _pytest_entry({"case": "adam", "median_s": 0.001}),
        "pytest-no-median": _pytest_entry(no_median),
        "pytest-extra-info-list": {"benchmarks": [{"extra_info": {"case": "adam"}}, {"extra_info": [1]}]},
        "pytest-bad-datetime": {**_pytest_entry(dict(case)), "datetime": 5},
        "machine-null": edited(machine=None),
        "cases-ints": edited(cases=[1, 2]),
        "goals-string": edited(goals="x"),
        "median-string": case_edited(median_s="fast"),
        "speedup-list": case_edited(speedup_vs=[1]),
        "elements-string": case_edited(elements="1000"),
        "goal-status": edited(goals=[{"case": "adam", "goal": "g", "value": 1, "status": "?"}]),
        "empty": edited(cases=[], goals=[]),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_bad_docs(_committed_doc())))
def test_from_json_refuses_a_wrongly_shaped_document(good_doc, tmp_path, capsys, name):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(_bad_docs(good_doc)[name]))
    code, _, err = _run(
        ["bench", "--from-json", src, "--out", tmp_path / "r", "--no-chart"], capsys
    )
    _usage_error(code, err, "--from-json", str(src))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json"]
    with pytest.raises(ValueError):
        benchmarking.load_results(src)


def test_from_json_still_reads_a_good_document(good_doc, tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(good_doc))
    code, out, err = _run(["bench", "--from-json", src, "--no-chart"], capsys)
    assert code == 0, err
    assert (tmp_path / "in-report.json").is_file() and (tmp_path / "in-report.md").is_file()


# ------------------------------------------------------------------------ 13-15: bench --out
@pytest.fixture
def no_run(monkeypatch):
    """Record every benchmark run instead of running it: a refusal must come before it."""
    calls = []

    def fake_run_suite(*a, **kw):
        calls.append(kw)
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(benchmarking, "run_suite", fake_run_suite)
    return calls


def test_from_json_refuses_an_empty_out(good_doc, tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(good_doc))
    code, _, err = _run(["bench", "--from-json", src, "--out", ""], capsys)
    _usage_error(code, err, "--out")


def test_bench_refuses_an_empty_out_before_running(tmp_path, capsys, no_run):
    code, _, err = _run(["bench", "--cases", "sgd", "--sizes", "1Ki", "--out", ""], capsys)
    _usage_error(code, err, "--out")
    assert no_run == []


def test_no_output_is_written_when_one_cannot_be(good_doc, tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(good_doc))
    (tmp_path / "pm.json").write_text("old")
    (tmp_path / "pm.md").mkdir()
    code, _, err = _run(
        ["bench", "--from-json", src, "--out", tmp_path / "pm", "--no-chart"], capsys
    )
    _usage_error(code, err, "pm.md", "directory")
    assert (tmp_path / "pm.json").read_text() == "old"
    with pytest.raises(OSError):
        benchmarking.write_outputs(good_doc, tmp_path / "pm", chart=False)
    assert (tmp_path / "pm.json").read_text() == "old"


def test_bench_refuses_an_uncreatable_out_folder_before_running(tmp_path, capsys, no_run):
    (tmp_path / "b.json").write_text("{}")
    code, _, err = _run(
        ["bench", "--cases", "sgd", "--sizes", "1Ki", "--dtypes", "float32", "--repeats", "1",
         "--min-time", "0.01", "--peers", "roofline", "--quiet", "--out", tmp_path / "b.json/sub/x"],
        capsys,
    )  # fmt: skip
    _usage_error(code, err, "--out", "not a directory")
    assert no_run == []


def test_bench_creates_a_missing_out_folder(good_doc, tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(good_doc))
    out = tmp_path / "new" / "sub" / "r"
    code, _, err = _run(["bench", "--from-json", src, "--out", out, "--no-chart"], capsys)
    assert code == 0, err
    assert (out.parent / "r.json").is_file() and (out.parent / "r.md").is_file()


# ----------------------------------------------------------------- 16: ignored or empty options
@pytest.mark.parametrize(
    "opts", [["--peers", "numpy"], ["--threads", "1"], ["--many", "3x100"]], ids=lambda o: o[0]
)
def test_from_json_refuses_run_options(good_doc, tmp_path, capsys, opts):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(good_doc))
    code, _, err = _run(["bench", "--from-json", src, "--no-chart", *opts], capsys)
    _usage_error(code, err, "--from-json", opts[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json"]


@pytest.mark.parametrize("option", ["--algorithms", "--cases", "--sizes", "--dtypes", "--peers"])
def test_bench_refuses_an_empty_list(tmp_path, capsys, no_run, option):
    code, _, err = _run(["bench", option, "", "--out", tmp_path / "b", "--quiet"], capsys)
    _usage_error(code, err, option, "empty")
    assert no_run == []
