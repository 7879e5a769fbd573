"""Speed goals of 16-bit storage on the CPU (the precision issue; pytest-benchmark).

Run: ``pytest bench/test_bench_precision.py --benchmark-json=out.json`` (16 Mi elements; quick:
``FASTOPT_BENCH_N=1000000``). Every case with goals for a 16-bit dtype (``Case.dtype_goals``:
AdamW with bfloat16 parameters, gradients and state) runs once in that dtype against its
roofline (a kernel moving the same 14 bytes per element) and torch's fused optimizer on the same
bfloat16 tensor, all timed in one interleaved run (``benchmarking.run_case``); each goal is then
asserted on that measurement, or skipped with the reason when its peer is unavailable.
"""

import case_runs
import pytest

from fastopt import benchmarking

_RUNS = [
    (case.name, dtype)
    for case in benchmarking.CASES
    for dtype, _ in case.dtype_goals
    if dtype in ("bfloat16", "float16")
]


@pytest.mark.parametrize("name,dtype", _RUNS, ids=[f"{n}-{d}" for n, d in _RUNS])
def test_speed(benchmark, name, dtype):
    benchmark.group = f"cpu-{dtype}"
    benchmark.name = f"{name}[{dtype}]"
    result = case_runs.measure(name, dtype, benchmark)
    benchmark.extra_info.update(result)
    assert result["dtype"] == dtype and result["median_s"] > 0


_GOALS = [
    (name, dtype, i)
    for name, dtype in _RUNS
    for i in range(len(benchmarking.CASES_BY_NAME[name].goals_for(dtype)))
]


@pytest.mark.parametrize(
    "name,dtype,index",
    _GOALS,
    ids=[f"{n}-{d}-{benchmarking.CASES_BY_NAME[n].goals_for(d)[i].metric}" for n, d, i in _GOALS],
)
def test_goal(name, dtype, index):
    goal = benchmarking.CASES_BY_NAME[name].goals_for(dtype)[index]
    result = case_runs.measure(name, dtype)
    check = benchmarking.check_goal(result, goal)
    if check["status"] == "skipped":
        pytest.skip(f"{name} {dtype}: {goal.label()}: {check['reason']}")
    speedups = ", ".join(f"{k} {v:.3g}x" for k, v in result["speedup_vs"].items())
    assert check["status"] == "pass", (
        f"{name} {dtype}: speed goal missed: {check['reason']} ({goal.text}); "
        f"{result['elements']} elements, {result['bytes_per_element']} bytes/element, "
        f"median {result['us_per_step']:.1f} µs/step, speedups {speedups}"
    )
