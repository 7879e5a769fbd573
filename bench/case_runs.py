"""One ``benchmarking.run_case`` per catalogue case and dtype per bench session, shared by the
speed test (which also lets pytest-benchmark time the step) and the goal tests that read it."""

from fastopt import benchmarking

_RESULTS = {}
"""(case name, dtype) -> (run_case result, whether pytest-benchmark timed it too)."""


def measure(case, dtype=None, benchmark=None):
    """``run_case(case, dtype=dtype)``, run once; with ``benchmark`` pytest-benchmark times the
    fastopt step as well (a cached result without that timing is run again)."""
    name = getattr(case, "name", case)
    key = (name, dtype)
    cached = _RESULTS.get(key)
    if cached is not None and (benchmark is None or cached[1]):
        return cached[0]

    def on_fastopt(step, steps_per_repeat):
        if benchmark is not None:
            benchmark.pedantic(
                step,
                rounds=benchmarking.env_repeats(),
                iterations=steps_per_repeat,
                warmup_rounds=1,
            )

    kwargs = {} if dtype is None else {"dtype": dtype}
    result = benchmarking.run_case(case, on_fastopt=on_fastopt, **kwargs)
    _RESULTS[key] = (result, benchmark is not None)
    return result
