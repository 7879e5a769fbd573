"""pytest configuration of the benchmarks (``pytest bench/``; not part of the default test run).

Adds the machine details the report needs (:func:`fastopt.machine.machine_info`) to the
``machine_info`` of pytest-benchmark's JSON.
"""

import pytest


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    from fastopt.machine import machine_info as fastopt_machine_info

    machine_info["fastopt_bench"] = fastopt_machine_info()
