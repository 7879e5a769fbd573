"""pytest configuration of the benchmarks (``pytest bench/``; not part of the default test run).

Adds the machine details the report needs (:func:`fastopt.machine.machine_info`) to the
``machine_info`` of pytest-benchmark's JSON.
"""

import pathlib
import sys

import pytest

# The benches import each other's shapes (test_bench_adafactor uses test_bench_torch's); the
# project's --import-mode=importlib puts no test directory on sys.path, so a bench file run alone
# would not find its sibling.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    from fastopt.machine import machine_info as fastopt_machine_info

    machine_info["fastopt_bench"] = fastopt_machine_info()
