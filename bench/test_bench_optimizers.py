"""Speed benchmarks and speed goals of the CPU optimizers (pytest-benchmark).

Run: ``pytest bench/ --benchmark-json=out.json`` (full size: 16 Mi elements per case; quick:
``FASTOPT_BENCH_N=1000000``). Two kinds of test:

``test_speed[<case>]``  measures the case against its peers in one interleaved run
                        (``benchmarking.run_case``), stores every number in ``benchmark.extra_info``
                        and lets pytest-benchmark time fastopt's ``opt.step()`` once more.
``test_goal[<case>-<metric>]``  asserts one speed goal on that SAME measurement (ratios measured in
                        the same run, so machine speed cancels out); skipped, with the reason, when
                        the peer it compares against is unavailable (torch not installed, no fused
                        kernel).
"""

import case_runs
import pytest

from fastopt import benchmarking


@pytest.mark.parametrize("name", [c.name for c in benchmarking.CASES])
def test_speed(benchmark, name):
    case = benchmarking.CASES_BY_NAME[name]
    benchmark.group = "cpu-float32"
    benchmark.name = case.name
    result = case_runs.measure(case, benchmark=benchmark)
    benchmark.extra_info.update(result)
    assert result["median_s"] > 0


_GOALS = [(case.name, i) for case in benchmarking.CASES for i in range(len(case.goals))]


@pytest.mark.parametrize(
    "name,index",
    _GOALS,
    ids=[f"{n}-{benchmarking.CASES_BY_NAME[n].goals[i].metric}" for n, i in _GOALS],
)
def test_goal(name, index):
    case = benchmarking.CASES_BY_NAME[name]
    goal = case.goals[index]
    result = case_runs.measure(case)
    check = benchmarking.check_goal(result, goal)
    if check["status"] == "skipped":
        pytest.skip(f"{case.name}: {goal.label()}: {check['reason']}")
    assert check["status"] == "pass", (
        f"{case.name}: speed goal missed: {check['reason']} ({goal.text}); "
        f"{result['elements']} elements, median {result['us_per_step']:.1f} µs/step, "
        f"speedups {_fmt(result['speedup_vs'])}"
    )


def _fmt(d):
    return ", ".join(f"{k} {v:.3g}x" for k, v in d.items())
