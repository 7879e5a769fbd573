"""The ``fastopt`` command line: each command end to end in a subprocess (files written, PNG sizes,
JSON fields), bad input as exit code 2 with one readable line and no traceback, and the spec parser.

The subprocesses run ``python -m fastopt.cli`` (what the ``fastopt`` console script calls). Bad
input is checked in-process through ``fastopt.cli.main`` (the same code path, and fast) plus a few
subprocesses to see the real stderr.
"""

import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_ok, cli, png_size
from oracle import import_or_skip

from fastopt import benchmarking, playground
from fastopt.cli import main

import_or_skip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ version, help
def test_version():
    r = cli("--version")
    assert_ok(r)
    import fastopt

    assert r.stdout.strip() == f"fastopt {fastopt.__version__}"


@pytest.mark.parametrize("command", [[], ["info"], ["bench"], ["playground"]])
def test_help(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastopt")
    if not command:
        for name in ("info", "bench", "playground"):
            assert name in out
    else:
        assert "examples:" in out


# ------------------------------------------------------------------------------ info
def _installed_version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("fastopt", "numba", "llvmlite", "threading layer", "threads", "numba-cpu"):
        assert needle in out
    for dist in ("scikit-learn", "tqdm"):
        (line,) = [x for x in out.splitlines() if x.split()[:1] == [dist]]
        assert line.split(None, 1)[1] == (_installed_version(dist) or "not installed")
    assert "available" in out and "GPUs" in out


def test_info_json():
    r = cli("info", "--json")
    assert_ok(r)
    env = json.loads(r.stdout)
    for key in ("fastopt", "python", "platform", "cpu", "versions", "numba", "backends", "gpus"):
        assert key in env
    for key in ("numpy", "numba", "llvmlite", "torch", "cupy", "numba-cuda", "mpi4py"):
        assert key in env["versions"]
    for dist in ("scikit-learn", "tqdm", "matplotlib"):
        assert env["versions"][dist] == _installed_version(dist)
    assert env["versions"]["numba"]
    for key in ("threading_layer", "available_layers", "threads", "NUMBA_NUM_THREADS"):
        assert key in env["numba"]
    assert env["numba"]["threads"] >= 1
    names = {b["name"]: b for b in env["backends"]}
    assert names["numba-cpu"]["available"] is True
    for b in env["backends"]:
        assert set(b) == {"name", "available", "detail"}
        if not b["available"]:
            assert b["detail"], f"{b['name']} is unavailable without a reason"
    assert isinstance(env["gpus"], list)


# ------------------------------------------------------------------------------ bench
@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One small bench run shared by the bench tests: adam and sgd at 10,000 elements."""
    out = tmp_path_factory.mktemp("bench") / "small"
    r = cli(
        "bench", "--quick", "--algorithms", "adam,sgd", "--sizes", "10000",
        "--repeats", "1", "--min-time", "0.005", "--backends", "cpu", "--out", out,
    )  # fmt: skip
    return r, out


def test_bench_quick_small(bench_run):
    r, out = bench_run
    assert_ok(r)
    for name in ("backend", "elements/s", "GB/s", "of roofline", "vs NumPy"):
        assert name in r.stdout
    lines = [line for line in r.stdout.splitlines() if line.startswith("numba-cpu")]
    assert [line.split()[2] for line in lines] == ["adam", "sgd"]
    assert "10,000" in lines[0]
    assert "[1/2] adam float32 10,000 on numba-cpu" in r.stderr  # progress
    for ext in ("json", "md", "png"):
        assert out.with_name(out.name + "." + ext).is_file()


def test_bench_json_fields(bench_run):
    _, out = bench_run
    doc = json.loads(out.with_name(out.name + ".json").read_text())
    benchmarking.validate_results(doc)
    assert doc["schema"] == "fastopt-bench/1"
    assert doc["source"] == "fastopt bench"
    assert doc["settings"]["sizes"] == [10000]
    assert doc["settings"]["dtypes"] == ["float32"]
    assert doc["settings"]["quick"] is True
    assert doc["errors"] == []
    for key in ("cpu_model", "numba", "numba_threading_layer", "numba_threads", "fastopt"):
        assert key in doc["machine"]
    assert [c["case"] for c in doc["cases"]] == ["adam", "sgd"]
    for c in doc["cases"]:
        assert set(benchmarking.CASE_FIELDS) <= set(c)
        assert c["backend"] == "numba-cpu" and c["dtype"] == "float32" and c["elements"] == 10000
        assert c["median_s"] > 0 and c["gb_per_s"] > 0
        assert c["gb_per_s"] == pytest.approx(c["bytes_per_element"] * 1e4 / c["median_s"] / 1e9)
        assert c["fraction_of_roofline"] > 0
        assert "roofline" in c["timings"] and "numpy" in c["timings"]
        for peer, ratio in c["speedup_vs"].items():
            assert ratio == pytest.approx(c["timings"][peer]["median_s"] / c["median_s"])
        assert c["timings"]["fastopt"]["repeats"] == 1
    assert {c["bytes_per_element"] for c in doc["cases"]} == {28, 12}
    for g in doc["goals"]:
        assert g["status"] in ("pass", "fail", "skipped")
        assert {"case", "backend", "dtype", "goal", "value", "reason"} <= set(g)


def test_bench_chart_size(bench_run):
    _, out = bench_run
    doc = json.loads(out.with_name(out.name + ".json").read_text())
    assert png_size(out.with_name(out.name + ".png")) == benchmarking.chart_size(doc)
    assert benchmarking.chart_size(doc) == (900, 360)  # one panel: (float32, 10,000, cpu)


def _as_pytest_benchmark(doc):
    """A pytest-benchmark JSON holding ``doc``'s cases, as ``pytest bench/`` writes it."""
    return {
        "machine_info": {"fastopt_bench": doc["machine"]},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "benchmarks": [
            {
                "group": "cpu-float32",
                "name": c["case"],
                "fullname": f"bench/test_bench_optimizers.py::test_speed[{c['case']}]",
                "stats": {"median": c["median_s"], "mean": c["median_s"], "rounds": 1},
                "extra_info": {k: v for k, v in c.items() if k != "backend"},
            }
            for c in doc["cases"]
        ],
        "datetime": "2026-01-02T03:04:05.000000+00:00",
        "version": "5.1.0",
    }


def test_bench_from_pytest_benchmark_json(bench_run, tmp_path):
    _, out = bench_run
    doc = json.loads(out.with_name(out.name + ".json").read_text())
    src = tmp_path / "pb.json"
    src.write_text(json.dumps(_as_pytest_benchmark(doc)))
    r = cli("bench", "--from-json", src)
    assert_ok(r)
    lines = [line for line in r.stdout.splitlines() if line.startswith("numba-cpu")]
    assert [line.split()[2] for line in lines] == ["adam", "sgd"]
    report = tmp_path / "pb-report.json"
    converted = json.loads(report.read_text())
    benchmarking.validate_results(converted)
    assert converted["source"] == str(src)
    assert converted["date"] == "2026-01-02"
    assert [c["median_s"] for c in converted["cases"]] == [c["median_s"] for c in doc["cases"]]
    assert png_size(tmp_path / "pb-report.png") == benchmarking.chart_size(converted)
    assert (tmp_path / "pb-report.md").read_text().startswith("# fastopt CPU benchmark, 2026-01-02")
    # bench/report.py writes the same document through the same package code
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert report.main([str(src), "--out", str(tmp_path / "viareport"), "--no-chart"]) == 0
    via = json.loads((tmp_path / "viareport.json").read_text())
    assert via["cases"] == converted["cases"] and via["goals"] == converted["goals"]


def test_bench_from_its_own_json(bench_run, tmp_path):
    _, out = bench_run
    r = cli("bench", "--from-json", out.with_name(out.name + ".json"), "--out", tmp_path / "again")
    assert_ok(r)
    assert png_size(tmp_path / "again.png") == (900, 360)


def test_bench_on_the_cuda_simulator(tmp_path):
    """The GPU code path (numba-cuda with device arrays, CUDA-event timer, copy roofline), run by
    Numba's CUDA simulator: it must be asked for by name, and then it runs."""
    env = {"NUMBA_ENABLE_CUDASIM": "1"}
    r = cli(
        "bench", "--cases", "adam", "--sizes", "32", "--dtypes", "float32", "--repeats", "1",
        "--min-time", "0.001", "--backends", "numba-cuda", "--no-chart", "--quiet",
        "--out", tmp_path / "sim", env=env,
    )  # fmt: skip
    assert_ok(r)
    doc = json.loads((tmp_path / "sim.json").read_text())
    (case,) = doc["cases"]
    assert case["backend"] == "numba-cuda" and case["elements"] == 32
    assert "roofline" in case["timings"]
    assert "host only" in case["skipped_peers"]["numpy"]


# ------------------------------------------------------------------------------ playground
def test_playground_optimizers(tmp_path):
    out, js = tmp_path / "m.png", tmp_path / "m.json"
    r = cli(
        "playground", "--problem", "ellipse", "--optimizer", "sgd:lr=0.4",
        "--optimizer", "sgd:lr=0.4,momentum=0.5", "--steps", "20", "--start", "-5,-2",
        "--out", out, "--json", js,
    )  # fmt: skip
    assert_ok(r)
    assert png_size(out) == playground.TRAJECTORY_SIZE_PX == (1200, 500)
    data = json.loads(js.read_text())
    assert data["problem"]["name"] == "ellipse"
    assert data["problem"]["minimum"] == [0.0, 0.0]
    assert data["steps"] == 20
    labels = [run["label"] for run in data["runs"]]
    assert labels == ["sgd lr=0.4", "sgd lr=0.4, momentum=0.5"]
    for run in data["runs"]:
        assert set(run) == {"label", "optimizer", "kwargs", "points", "values", "diverged"}
        assert len(run["points"]) == 21 and len(run["values"]) == 21
        assert run["points"][0] == [-5.0, -2.0]
    # D2L 12.6: gradient descent with eta 0.4 ends at (-0.943467, -0.000073)
    assert data["runs"][0]["points"][-1] == pytest.approx([-0.943467, -0.000073], abs=5e-7)
    assert data["runs"][1]["kwargs"] == {"lr": 0.4, "momentum": 0.5}
    assert "wrote" in r.stdout


def test_playground_preset_subprocess(tmp_path):
    r = cli("playground", "--preset", "gd-lr", cwd=tmp_path)
    assert_ok(r)
    assert png_size(tmp_path / "gd-lr.png") == (1200, 500)
    assert "sgd lr=1.1" in r.stdout


@pytest.mark.parametrize(
    "preset", ["momentum", "adaptive", "curvature", "curvature-rosenbrock", "armijo"]
)
def test_playground_presets(preset, tmp_path, capsys):
    out = tmp_path / f"{preset}.png"
    assert main(["playground", "--preset", preset, "--out", str(out)]) == 0
    assert png_size(out) == (1200, 500)
    text = capsys.readouterr().out
    for spec in playground.PRESETS[preset].optimizers:
        assert playground.parse_optimizer(spec).label in text


def test_playground_muon_on_the_matrix_problem(tmp_path, capsys):
    """Muon steps the 2x2 matrix view of the ``matrix`` problem's point (beside Adam, on the
    same loss panel); its trajectory is the NumPy reference's, step for step."""
    from fastopt import problems, reference

    out, js = tmp_path / "m.png", tmp_path / "m.json"
    args = ["playground", "--problem", "matrix", "--optimizer", "muon:lr=0.1,ns_dtype=float64"]
    args += ["--optimizer", "adam:lr=0.1", "--steps", "12", "--out", str(out), "--json", str(js)]
    assert main(args) == 0
    assert png_size(out) == (1200, 500)
    assert "muon lr=0.1" in capsys.readouterr().out
    muon, adam = json.loads(js.read_text())["runs"]
    assert len(muon["points"]) == 13 and len(muon["points"][0]) == 4
    assert muon["values"][-1] < 0.5 * muon["values"][0] and not adam["diverged"]
    p = problems.get_problem("matrix")
    x = np.zeros((2, 2))
    hyper = playground.parse_optimizer("muon").build([np.zeros((2, 2))]).param_groups[0]
    names = ("weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps")
    kw = {k: hyper[k] for k in names} | {"adjust_lr_fn": hyper["adjust_lr_fn"], "lr": 0.1}
    state = {"momentum_buffer": np.zeros((2, 2))}
    for k in range(1, 13):
        reference.muon(x, p.grad(x.ravel()).reshape(2, 2), state, step=k, **kw)
        np.testing.assert_allclose(muon["points"][k], x.ravel(), rtol=1e-12, atol=1e-14)


def test_playground_negative_start_without_equals(tmp_path, capsys):
    out = tmp_path / "q.png"
    args = ["playground", "--problem", "quadratic:a=1,b=4", "--start", "-4,3"]
    assert main([*args, "--optimizer", "sgd:lr=0.1", "--steps", "5", "--out", str(out)]) == 0
    assert "from (-4, 3)" in capsys.readouterr().out


def test_playground_schedules_gallery(tmp_path):
    out, js = tmp_path / "s.png", tmp_path / "s.json"
    r = cli("playground", "--schedules", "--steps", "50", "--out", out, "--json", js)
    assert_ok(r)
    n = len(playground.default_schedules(50))
    assert png_size(out) == playground.schedules_size(n)
    data = json.loads(js.read_text())
    assert data["steps"] == 50 and len(data["schedules"]) == n
    for s in data["schedules"]:
        assert set(s) == {"label", "config", "lr"} and len(s["lr"]) == 50
        assert s["config"]["type"]


def test_playground_chosen_schedules(tmp_path, capsys):
    out, js = tmp_path / "c.png", tmp_path / "c.json"
    args = ["playground", "--schedule", "cosine:lr=0.1,warmup=10", "--schedule", "step:gamma=0.5"]
    assert main([*args, "--steps", "40", "--out", str(out), "--json", str(js)]) == 0
    assert png_size(out) == playground.schedules_size(2) == (800, 260)
    data = json.loads(js.read_text())
    warm, step = data["schedules"]
    # the warmup starts at lr/3 like fastopt.schedules.warmup and torch's LinearLR
    assert warm["config"]["type"] == "Warmup" and warm["lr"][0] == pytest.approx(0.1 / 3)
    assert max(warm["lr"]) == pytest.approx(0.1)
    assert step["lr"][0] == 0.1 and step["lr"][10] == 0.05  # step_size defaults to steps // 4


# ------------------------------------------------------------------------------ bad input
BAD = [
    (["playground", "--optimizer", "foo"], "unknown optimizer 'foo'"),
    (["playground", "--optimizer", "sgd:lr"], "'lr' is not key=value"),
    (["playground", "--optimizer", "sgd:lr=-1"], "invalid lr"),
    (["playground", "--optimizer", "sgd:foo=1"], "has no argument 'foo'"),
    (["playground", "--optimizer", "adam:betas=(0.9"], "unbalanced"),
    (["playground", "--optimizer", "sgd:lr=0.1,lr=0.2"], "'lr' given twice"),
    (["playground", "--optimizer", "muon"], "muon steps matrices only"),
    (["playground", "--problem", "nope"], "unknown problem 'nope'"),
    (["playground", "--problem", "quadratic:a=-1"], "invalid a: -1 (must be > 0)"),
    (["playground", "--problem", "quadratic:a=x"], "a must be a real number, got 'x'"),
    (["playground", "--start", "1,2,3"], "has 2 variable(s)"),
    (["playground", "--start", "a,b"], "not a comma-separated list of numbers"),
    (["playground", "--steps", "x"], "invalid int value"),
    (["playground", "--steps", "0"], "--steps must be"),
    (["playground", "--preset", "zzz"], "unknown preset"),
    (["playground", "--out", "x.jpg"], "must end in .png"),
    (["playground", "--out", "/nonexistent-dir/x.png"], "does not exist"),
    (["playground", "--json", "/nonexistent-dir/x.json"], "does not exist"),
    (["playground", "--schedule", "bogus"], "unknown schedule 'bogus'"),
    (["playground", "--schedule", "cosine:lr=-1"], "invalid lr: -1 (must be >= 0"),
    (["playground", "--schedule", "cosine:foo=1"], "has no argument 'foo'"),
    (["playground", "--schedules", "--optimizer", "sgd"], "takes no"),
    (["bench", "--from-json", "/nonexistent/file.json"], "no such file"),
    (["bench", "--algorithms", "foo"], "unknown algorithm 'foo'"),
    (["bench", "--cases", "foo"], "unknown case 'foo'"),
    (["bench", "--sizes", "1x"], "is not a size"),
    (["bench", "--dtypes", "int8"], "is not float32, float64, bfloat16 (bf16) or float16"),
    (["bench", "--backends", "tpu"], "unknown backend 'tpu'"),
    (["bench", "--repeats", "0"], "--repeats must be >= 1"),
    (["bench", "--min-time", "-1"], "--min-time must be"),
    (["bench", "--peers", "zz"], "unknown peer 'zz'"),
    (["bench", "--many", "3"], "not COUNTxSIZE"),
    (["bench", "--many", "0x5"], "not COUNTxSIZE"),
    (["bench", "--many", "2000000x1"], "2000000 tensors is too many: at most 1000000"),
    (["bench", "--many", "1000x3000000"], "3000000000 elements in all, too large"),
    (["bench", "--many", "1x" + "9" * 30], "too large: at most 2147483648"),
    (["bench", "--from-json", "x.json", "--quick"], "takes no run options"),
    (["nosuch"], "invalid choice"),
    ([], "no command given"),
    (["info", "--bad"], "unrecognized arguments: --bad"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) or "(none)" for a, _ in BAD])
def test_bad_input(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fastopt")
    assert ": error: " in lines[0]
    assert message in lines[0]
    assert "Traceback" not in captured.err
    assert not list(tmp_path.iterdir()), "bad input must write nothing"


def test_bad_files(tmp_path, capsys):
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "empty-pb.json").write_text('{"benchmarks": []}')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x80")
    for name, message in (
        ("text.json", "not valid JSON"),
        ("other.json", "neither a fastopt bench JSON nor a pytest-benchmark JSON"),
        ("empty-pb.json", "without fastopt bench/ cases"),
        ("binary.json", "not"),
        (".", "is a directory"),
    ):
        assert main(["bench", "--from-json", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize(
    "args,message",
    [
        (["playground", "--optimizer", "nosuch"], "unknown optimizer"),
        (["bench", "--from-json", "missing.json"], "no such file"),
        (["playground", "--problem", "rosenbrock:c=1"], "no parameter 'c'"),
    ],
)
def test_bad_input_subprocess(args, message, tmp_path):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr
    assert "Traceback" not in r.stderr


def test_internal_errors_are_one_line(monkeypatch, capsys):
    import fastopt.cli.info as info

    def boom(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(info, "run", boom)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "internal error: RuntimeError: something broke" in err


# ------------------------------------------------------------------------------ specs
def test_parse_spec():
    assert playground.parse_spec("sgd") == ("sgd", {})
    assert playground.parse_spec("sgd:lr=0.4,momentum=0.5") == ("sgd", {"lr": 0.4, "momentum": 0.5})
    name, kw = playground.parse_spec("adam:betas=(0.9, 0.99),amsgrad=true,foo=none,s=cos")
    assert kw == {"betas": (0.9, 0.99), "amsgrad": True, "foo": None, "s": "cos"}
    assert playground.parse_spec("multistep:milestones=[3,6]")[1] == {"milestones": (3, 6)}
    for bad in ("", ":lr=1", "sgd:", "sgd:=1", "sgd:lr=", "sgd:1x=2"):
        with pytest.raises(ValueError):
            playground.parse_spec(bad)


def test_parse_optimizer():
    spec = playground.parse_optimizer("GD:lr=0.1")
    assert spec.cls.__name__ == "SGD" and spec.kwargs == {"lr": 0.1}
    assert playground.parse_optimizer("adam:lr=0.1,betas=(0.5,0.9)").label == (
        "adam lr=0.1, betas=(0.5,0.9)"
    )
    for name in playground.OPTIMIZERS:
        playground.parse_optimizer(f"{name}:lr=0.01")


def test_parse_schedule():
    from fastopt import schedules as S

    assert playground.parse_schedule("cosine", steps=30) == S.CosineAnnealing(0.1, 30)
    assert playground.parse_schedule("OneCycle:max_lr=1", steps=10) == S.OneCycle(1, total_steps=10)
    assert playground.parse_schedule('{"type": "Constant", "lr": 0.5}') == S.Constant(0.5)
    sched = playground.parse_schedule("step:lr=1,step_size=2,per_epoch=3")
    assert [sched(k) for k in (0, 5, 6, 12)] == pytest.approx([1.0, 1.0, 0.1, 0.01])


def test_quick_cases_cover_every_algorithm():
    names = benchmarking.QUICK_CASES
    assert {benchmarking.CASES_BY_NAME[n].algorithm for n in names} == set(benchmarking.ALGORITHMS)
    assert [c.name for c in benchmarking.select_cases(["Adam", "sgd"], quick=True)] == [
        "adam",
        "sgd",
    ]
    full = [c.name for c in benchmarking.select_cases(["adam"])]
    assert full == ["adam", "adam_many", "adam_tiny", "amsgrad"]
    assert [c.name for c in benchmarking.select_cases(names=["lion", "adam"])] == ["lion", "adam"]
