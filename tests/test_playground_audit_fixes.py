"""``fastopt playground`` audit fixes: outputs checked before any work (--out/--json), --start
drawn and written, a preset's text only on the preset's own setup, --title with --schedules,
--list alone, Rosenbrock's a bounded, and a spec's warmup inside --steps (as ``train --warmup``).

In-process through ``fastopt.cli.main`` (exit 2 and one line for bad input)."""

import json

import pytest
from oracle import import_or_skip

import fastopt.playground as P
import fastopt.playground.drawing as drawing
from fastopt import problems
from fastopt.cli import main

import_or_skip("matplotlib")

OLD = b"an old picture"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def figures(monkeypatch):
    """The (figure, title) of every picture written."""
    seen = []
    save = drawing.save_figure

    def spy(fig, path, title=None):
        seen.append((fig, title))
        return save(fig, path, title)

    monkeypatch.setattr(drawing, "save_figure", spy)
    return seen


def _error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error" not in err, err
    return err


# ------------------------------------------------------------------------ 1. --json checked first
@pytest.mark.parametrize(
    "args",
    [
        ["--preset", "gd-lr", "--json", "jdir"],
        ["--preset", "gd-lr", "--json", "-"],
        ["--schedules", "--steps", "10", "--json", "jdir"],
    ],
    ids=["folder", "stdout", "schedules-folder"],
)
def test_bad_json_refused_before_the_png_is_written(args, in_tmp, capsys):
    (in_tmp / "jdir").mkdir()
    png = in_tmp / "p1.png"
    png.write_bytes(OLD)
    assert main(["playground", *args, "--out", "p1.png"]) == 2
    assert png.read_bytes() == OLD  # untouched
    err = _error(capsys)
    assert err.count("cannot write") <= 1 and "--json" in err


# ------------------------------------------------------------------------ 2. --json == --out
@pytest.mark.parametrize("json_path", ["same.png", "./same.png"])
def test_json_and_out_the_same_file_refused(json_path, in_tmp, capsys):
    assert main(["playground", "--preset", "gd-lr", "--out", "same.png", "--json", json_path]) == 2
    assert not (in_tmp / "same.png").exists()
    assert "same.png" in _error(capsys)


# ------------------------------------------------------------------------ 3. --out a folder
def test_out_folder_is_a_usage_error_before_the_runs(in_tmp, capsys, monkeypatch):
    (in_tmp / "d.png").mkdir()

    def no_run(*a, **k):
        raise AssertionError("ran before checking --out")

    monkeypatch.setattr(P, "run", no_run)
    assert main(["playground", "--preset", "gd-lr", "--out", "d.png"]) == 2
    assert "it is a directory" in _error(capsys)


# ------------------------------------------------------------------------ 4. --start
def test_start_point_drawn_and_written(in_tmp, figures):
    args = ["--problem", "quadratic", "--start", "1.5,2.5", "--optimizer", "sgd:lr=0.1"]
    assert main(["playground", *args, "--steps", "5", "--out", "s.png", "--json", "s.json"]) == 0
    data = json.loads((in_tmp / "s.json").read_text())
    assert data["problem"]["start"] == [1.5, 2.5] == data["runs"][0]["points"][0]
    ((fig, _),) = figures
    marks = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "start"]
    assert len(marks) == 1
    assert list(marks[0].get_xdata()) == [1.5] and list(marks[0].get_ydata()) == [2.5]


def test_trajectories_json_start_defaults_to_the_runs_start():
    p = problems.get_problem("ellipse")
    runs = [P.run(p, "sgd:lr=0.1", steps=2, start=(1.0, 1.0))]
    assert P.trajectories_json(p, runs, 2)["problem"]["start"] == [1.0, 1.0]


# ------------------------------------------------------------------------ 5. preset text
@pytest.mark.parametrize(
    "extra", [["--problem", "ellipse"], ["--start", "5"]], ids=["problem", "start"]
)
def test_preset_text_not_on_another_setup(extra, in_tmp, figures):
    assert main(["playground", "--preset", "gd-lr", *extra, "--out", "t.png"]) == 0
    ((_, title),) = figures
    assert title != P.PRESETS["gd-lr"].text


def test_preset_text_kept_on_its_own_setup(in_tmp, figures):
    args = ["--preset", "gd-lr", "--problem", "square", "--start", "10", "--out", "t.png"]
    assert main(["playground", *args]) == 0
    assert figures[0][1] == P.PRESETS["gd-lr"].text


# ------------------------------------------------------------------------ 6. --title, --list
def test_title_with_schedules(in_tmp, figures):
    assert (
        main(["playground", "--schedules", "--steps", "20", "--title", "X y", "--out", "s.png"])
        == 0
    )
    assert figures[0][1] == "X y"


def test_list_takes_no_other_options(in_tmp, capsys):
    assert main(["playground", "--list", "--steps", "3"]) == 2
    assert "--list" in _error(capsys)
    assert main(["playground", "--list"]) == 0


# ------------------------------------------------------------------------ 7. rosenbrock a
def test_rosenbrock_a_whose_square_overflows_refused(in_tmp, capsys):
    with pytest.raises(ValueError, match="a"):
        problems.get_problem("rosenbrock", a=1e200)
    with pytest.raises(ValueError, match="not finite"):
        problems.get_problem("quadratic", a=1e308)
    assert problems.get_problem("rosenbrock", a=-2.0, b=5.0).minimum == (-2.0, 4.0)
    assert main(["playground", "--problem", "rosenbrock:a=1e200", "--out", "r.png"]) == 2
    assert "invalid a" in _error(capsys)
    assert not (in_tmp / "r.png").exists()


# ------------------------------------------------------------------------ 8. warmup in --steps
def test_spec_warmup_shortens_the_schedule_after_it():
    sched = P.parse_schedule("cosine:lr=0.1,warmup=10", 100)
    assert sched.schedule.T_max == 90  # as fastopt train: total_steps - warmup
    v = P.schedule_values(sched, 100)
    assert v[10] == pytest.approx(0.1) and v[99] < 1e-4


def test_spec_warmup_not_shorter_than_steps(in_tmp, capsys):
    args = ["--schedule", "cosine:lr=0.1,warmup=200", "--steps", "100", "--out", "w.png"]
    assert main(["playground", *args]) == 2
    assert "not shorter than" in _error(capsys)
    assert not (in_tmp / "w.png").exists()
    # the library call without strict (train checks a spec's keys with 100 steps) still parses
    assert P.parse_schedule("cosine:lr=0.1,warmup=200", 100).warmup_steps == 200
