"""The benchmark cases and timer of ``bench/``: re-exported from :mod:`fastopt.benchmarking`.

They live in the installed package so ``fastopt bench`` (the command line) and this pytest-benchmark
suite run the very same cases, peers and timing; see that module's docstring for what is measured.
Settings come from the environment here (``FASTOPT_BENCH_N``, ``FASTOPT_BENCH_MANY``,
``FASTOPT_BENCH_REPEATS``, ``FASTOPT_BENCH_MIN_TIME``).
"""

from fastopt.benchmarking import (  # noqa: F401
    ADAM_GOALS,
    ALGORITHMS,
    CASE_FIELDS,
    CASES,
    CASES_BY_NAME,
    DEFAULT_MANY,
    DEFAULT_MIN_TIME,
    DEFAULT_N,
    DEFAULT_REPEATS,
    MANY_GOALS,
    OTHER_GOALS,
    PEERS,
    QUICK_CASES,
    TINY_GOALS,
    WARMUP_STEPS,
    Case,
    Goal,
    check_goal,
    env_many,
    env_min_time,
    env_n,
    env_repeats,
    machine_info,
    run_case,
    time_steps,
)
