"""The benchmark machinery without timing anything: the roofline kernels leave the arrays they share
with the optimizer unchanged (16-bit storage too), the case catalogue covers every registered
optimizer and keeps the names and parameters of the committed results, goals follow the storage
dtype, ``fastopt bench --dtypes bf16`` runs, and ``fastopt info`` needs only fastopt.machine."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_ok, cli
from oracle import import_or_skip

from fastopt import arrays, benchmarking
from fastopt.benchmarking import roofline
from fastopt.optim import OPTIMIZERS

BF16_GOALS = benchmarking.BF16_ADAMW_GOALS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "bench" / "results").glob("*.json"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_read_write", sorted(roofline.KERNELS))
def test_roofline_kernel_leaves_the_arrays_unchanged(n_read_write, dtype):
    """The roofline runs on the very parameter, gradient and state arrays fastopt steps: it must
    move their bytes without changing a bit of them (c = 0)."""
    rng = np.random.default_rng(n_read_write)
    n = 1001  # not a multiple of any vector width
    grad = rng.standard_normal(n).astype(dtype)
    arrays = [rng.standard_normal(n).astype(dtype) for _ in range(n_read_write)]
    before = [a.copy() for a in (grad, *arrays)]
    step = roofline.roofline_step(grad, arrays[0], arrays[1:])
    step()
    step()
    for a, b in zip((grad, *arrays), before, strict=True):
        assert a.tobytes() == b.tobytes()


def test_roofline_step_rejects_mismatched_arrays():
    g = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="of one length"):
        roofline.roofline_step(g, np.zeros(9, np.float32), [])
    with pytest.raises(ValueError, match="contiguous"):
        roofline.roofline_step(g, np.zeros(16, np.float32)[::2], [])
    with pytest.raises(ValueError, match="2, 4 or 8 bytes per element"):
        roofline.roofline_step(g, np.zeros(8, np.int8), [])
    with pytest.raises(ValueError, match="no roofline kernel for 5"):
        roofline.roofline_step(g, np.zeros(8, np.float32), [np.zeros(8, np.float32)] * 4)


def test_16bit_roofline_moves_the_bytes_of_the_storage_combination():
    """bfloat16 parameters, gradients and Adam state: the roofline runs on their bits and leaves
    them unchanged; with a float32 master copy it reads and writes the master and the state and
    only writes the parameter (the master's bits truncated to bfloat16). Bytes per element as the
    step moves them."""
    rng = np.random.default_rng(3)
    n = 1001
    bf16 = arrays.bfloat16()
    p, g, m, v = (rng.standard_normal(n, dtype=np.float32).astype(bf16) for _ in range(4))
    before = [a.tobytes() for a in (p, g, m, v)]
    roofline.roofline_step(g, p, [m, v])()
    assert [a.tobytes() for a in (p, g, m, v)] == before
    assert roofline.traffic(g, p, [m, v]) == 14

    w, m32, v32 = (rng.standard_normal(n, dtype=np.float32) for _ in range(3))
    kept = [a.tobytes() for a in (g, w, m32, v32)]
    roofline.roofline_step(g, p, [m32, v32], master=w)()
    assert [a.tobytes() for a in (g, w, m32, v32)] == kept
    np.testing.assert_array_equal(p.view(np.uint16), w.view(np.uint32) >> 16)
    assert roofline.traffic(g, p, [m32, v32], master=w) == 2 + 8 + 16 + 2
    assert roofline.traffic(g, w, [m32, v32]) == 2 + 8 + 16


def test_goals_follow_the_storage_dtype():
    """bf16 AdamW has the precision issue's goals; float32/float64 keep the case's goals and a
    16-bit run of a case without 16-bit goals checks none (float32 goals say nothing of it)."""
    adamw = benchmarking.CASES_BY_NAME["adamw"]
    assert adamw.goals_for("bfloat16") == benchmarking.BF16_ADAMW_GOALS
    assert [g.label() for g in adamw.goals_for("bfloat16")] == [
        "fraction_of_roofline >= 0.9",
        "speedup_vs.torch_fused >= 1.2",
    ]
    assert adamw.goals_for("float32") == adamw.goals_for("float64") == adamw.goals
    assert adamw.goals_for("float16") == ()
    assert benchmarking.CASES_BY_NAME["sgd"].goals_for("bfloat16") == ()


def test_bench_runs_bfloat16_against_torch_on_the_same_tensor(tmp_path):
    """``fastopt bench --dtypes bf16``: AdamW over a bfloat16 ParamSet (bfloat16 state), timed
    against its 14-byte roofline and torch's fused AdamW on the same bfloat16 tensor; the NumPy
    peer is skipped by name and the bf16 goals are checked."""
    out = tmp_path / "bf16"
    r = cli(
        "bench", "--cases", "adamw", "--sizes", "256", "--dtypes", "bf16", "--repeats", "1",
        "--min-time", "0.001", "--backends", "cpu", "--no-chart", "--quiet", "--out", out,
    )  # fmt: skip
    assert_ok(r)
    doc = json.loads(out.with_name("bf16.json").read_text())
    benchmarking.validate_results(doc)
    assert doc["settings"]["dtypes"] == ["bfloat16"]
    (case,) = doc["cases"]
    assert case["dtype"] == "bfloat16" and case["elements"] == 256
    assert case["bytes_per_element"] == 14 and case["state_bytes_per_element"] == 4
    assert "roofline" in case["timings"] and "torch_fused" in case["timings"]
    assert "no 16-bit storage" in case["skipped_peers"]["numpy"]
    assert [g["goal"] for g in case["goals"]] == [g.label() for g in BF16_GOALS]


def test_bench_runs_muon_on_matrices_against_torch(tmp_path):
    """``fastopt bench --algorithms muon``: Muon over the 4 hidden matrices of a width-64 block
    (a ParamSet of matrices), timed against torch.optim.Muon (no foreach or fused flag: the
    peer ``torch``) and the NumPy reference on the same matrices; its goal is checked."""
    from fastopt.cli import main

    import_or_skip("torch")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    out = tmp_path / "muon"
    # in process (no second start of Python, Numba and torch); one BLAS thread, as
    # bench/test_bench_muon.py: small products on a busy machine's thread pool crawl
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        code = main([
            "bench", "--algorithms", "muon", "--dtypes", "float32", "--repeats", "1",
            "--min-time", "0.001", "--backends", "cpu", "--no-chart", "--quiet", "--out", str(out),
        ])  # fmt: skip
    assert code == 0
    doc = json.loads(out.with_name("muon.json").read_text())
    benchmarking.validate_results(doc)
    (case,) = doc["cases"]
    assert case["case"] == "muon" and case["layout"] == "matrices" and case["params"] == 4
    assert case["elements"] == sum(a * b for a, b in benchmarking.cases.MUON_SHAPES)
    assert {"torch", "numpy", "roofline"} <= set(case["timings"])
    assert "torch_foreach" not in case["timings"] and not case["skipped_peers"]
    (goal,) = case["goals"]
    assert goal["goal"] == "speedup_vs.torch >= 1" and goal["status"] in ("pass", "fail")
    assert "muon" in benchmarking.QUICK_CASES


def test_bytes_per_element_follows_the_design():
    """DESIGN.md, fp32: SGD 12, one state slot 20, Adam's two 28, AMSGrad's three 36."""
    assert [roofline.bytes_per_element(k) for k in range(4)] == [12, 20, 28, 36]
    assert roofline.bytes_per_element(2, itemsize=8) == 56


def test_every_registered_optimizer_has_a_case():
    """The catalogue reads its classes from fastopt.optim.OPTIMIZERS; a registered optimizer
    without a case would be missing from ``fastopt bench`` and the bench suite. The catalogue
    times step(grads) (Muon over a ParamSet of matrices); optimizers whose step takes a closure
    (LBFGS) have their own benchmark (bench/test_bench_lbfgs.py)."""
    stepped = {cls for cls in OPTIMIZERS.values() if not cls.requires_closure}
    assert {c.optimizer_class for c in benchmarking.CASES} == stepped
    assert set(benchmarking.ALGORITHMS) == {cls.__name__ for cls in stepped}


def test_a_case_must_name_a_registered_optimizer():
    with pytest.raises(ValueError, match="'Adamm' is not in fastopt.optim.OPTIMIZERS"):
        benchmarking.Case("typo", "Adamm", {}, 2)


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_committed_results_stay_comparable(path):
    """Every case of a committed results file still exists with the same optimizer, arguments,
    layout and bytes per element, so a new run compares with it case by case."""
    doc = benchmarking.load_results(path)
    assert doc["cases"], f"{path.name} holds no cases"
    for old in doc["cases"]:
        case = benchmarking.CASES_BY_NAME[old["case"]]
        assert case.algorithm == old["algorithm"]
        assert case.kwargs == old["kwargs"]
        assert case.layout == old["layout"]
        assert case.state_slots == old["state_slots"]
        itemsize = np.dtype(old["dtype"]).itemsize
        assert case.bytes_per_element(itemsize) == old["bytes_per_element"]


def test_fastopt_info_does_not_import_the_benchmarks():
    code = (
        "import sys, json; from fastopt.cli import main; main(['info', '--json']); "
        "assert 'fastopt.benchmarking' not in sys.modules, 'info imported the benchmarks'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["versions"]["numba"]


@pytest.mark.parametrize("case", benchmarking.CASES, ids=lambda c: c.name)
def test_every_cpu_case_builds_and_every_peer_steps(case):
    """Each case of the catalogue builds on the CPU at a small size, and its step and every peer
    (roofline, NumPy, torch, the list and one-parameter forms) run: a full bench run is the only
    other place where a broken peer shows (the NumPy peers of LAMB and LARS once raised a
    TypeError there, NovoGrad's slot check counted its per-tensor second moments)."""
    from fastopt.benchmarking import peers

    _, _, step, timed, skipped, _, _, traffic = peers.build_cpu(
        case, 4096, np.float32, 0, many=(3, 1000)
    )
    step()
    for peer in timed.values():
        peer()
    assert "numpy" in timed, skipped
    assert traffic["bytes_per_element"] == case.bytes_per_element(4)
