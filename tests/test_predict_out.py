"""``fastopt predict --out``: written through fastopt.fileio (a symlink keeps being a link, a
FIFO or /dev/null is written in place, ``-`` is standard output, a bad directory is refused
before any work)."""

import csv
import io
import os
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

from fastopt.cli import main

posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file types")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict-out")
    X = np.random.default_rng(0).standard_normal((60, 3))
    y = np.where(X[:, 0] > 0, "yes", "no")
    with open(d / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "label"])
        w.writerows([[*map(repr, row), lab] for row, lab in zip(X.tolist(), y)])
    with open(d / "new.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c"])
        w.writerows([list(map(repr, row)) for row in X[:7].tolist()])
    r = subprocess.run(
        [sys.executable, "-m", "fastopt.cli", "train", "train.csv", "--target", "label",
         "--epochs", "2", "--hidden", "4", "--quiet", "--out", "m"],
        cwd=d, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return d / "m", d / "new.csv"


def _predict(model, out, capsys):
    code = main(["predict", str(model[0]), str(model[1]), "--out", str(out)])
    return code, capsys.readouterr()


def _rows(text):
    return list(csv.reader(io.StringIO(text)))


@posix
def test_symlink_keeps_being_a_link(model, tmp_path, capsys):
    (tmp_path / "real.csv").write_text("old\n")
    (tmp_path / "link.csv").symlink_to("real.csv")
    code, _ = _predict(model, tmp_path / "link.csv", capsys)
    assert code == 0
    assert (tmp_path / "link.csv").is_symlink()
    rows = _rows((tmp_path / "real.csv").read_text())
    assert rows[0] == ["prediction"] and len(rows) == 8
    assert sorted(os.listdir(tmp_path)) == ["link.csv", "real.csv"]  # no temporary file


@posix
def test_dangling_symlink_creates_its_target(model, tmp_path, capsys):
    (tmp_path / "link.csv").symlink_to(tmp_path / "made.csv")
    assert _predict(model, tmp_path / "link.csv", capsys)[0] == 0
    assert (tmp_path / "link.csv").is_symlink() and len(
        _rows((tmp_path / "made.csv").read_text())
    ) == 8


@posix
def test_fifo_is_written_in_place(model, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    code, _ = _predict(model, fifo, capsys)
    reader.join(timeout=60)
    assert code == 0 and len(_rows(got[0])) == 8
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@posix
def test_dev_null_stays_a_character_device(model, capsys):
    before = os.stat(os.devnull)
    code, _ = _predict(model, os.devnull, capsys)
    after = os.stat(os.devnull)
    assert code == 0
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (
        before.st_ino,
        before.st_rdev,
    )


def test_dash_is_standard_output(model, capsys):
    code, captured = _predict(model, "-", capsys)
    assert code == 0
    rows = _rows(captured.out)
    assert rows[0] == ["prediction"] and len(rows) == 8
    assert not os.path.exists("-")


def test_a_parent_that_is_a_file_is_refused_before_any_work(model, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, captured = _predict(model, tmp_path / "afile" / "p.csv", capsys)
    assert code == 2
    assert "--out" in captured.err and str(tmp_path / "afile" / "p.csv") in captured.err
    assert captured.out == "" and sorted(os.listdir(tmp_path)) == ["afile"]
