"""The benchmark machinery without timing anything: the roofline kernels leave the arrays they share
with the optimizer unchanged, the case catalogue covers every registered optimizer and keeps the
names and parameters of the committed results, and ``fastopt info`` needs only fastopt.machine."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastopt import benchmarking
from fastopt.benchmarking import roofline
from fastopt.optim import OPTIMIZERS

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
    with pytest.raises(ValueError, match="one dtype and length"):
        roofline.roofline_step(g, np.zeros(8, np.float64), [])
    with pytest.raises(ValueError, match="one dtype and length"):
        roofline.roofline_step(g, np.zeros(9, np.float32), [])
    with pytest.raises(ValueError, match="one dtype and length"):
        roofline.roofline_step(g, np.zeros(16, np.float32)[::2], [])
    with pytest.raises(ValueError, match="no roofline kernel for 5"):
        roofline.roofline_step(g, np.zeros(8, np.float32), [np.zeros(8, np.float32)] * 4)


def test_bytes_per_element_follows_the_design():
    """DESIGN.md, fp32: SGD 12, one state slot 20, Adam's two 28, AMSGrad's three 36."""
    assert [roofline.bytes_per_element(k) for k in range(4)] == [12, 20, 28, 36]
    assert roofline.bytes_per_element(2, itemsize=8) == 56


def test_every_registered_optimizer_has_a_case():
    """The catalogue reads its classes from fastopt.optim.OPTIMIZERS; a registered optimizer
    without a case would be missing from ``fastopt bench`` and the bench suite. The catalogue
    times elementwise step(grads); optimizers whose step takes a closure (LBFGS) have their own
    benchmark (bench/test_bench_lbfgs.py), and so do those over matrices only (Muon:
    bench/test_bench_muon.py)."""
    stepped = {
        cls
        for cls in OPTIMIZERS.values()
        if not cls.requires_closure and not getattr(cls, "matrices_only", False)
    }
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
