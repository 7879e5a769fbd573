"""pytest configuration of the benchmarks (``pytest bench/``; not part of the default test run).

Puts ``bench/`` on ``sys.path`` (the project runs pytest with ``--import-mode=importlib``, which
does not) so the tests can ``import cases``, and adds the machine details the report needs to the
``machine_info`` of pytest-benchmark's JSON.
"""

import pathlib
import sys

import pytest

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    import cases

    machine_info["fastopt_bench"] = cases.machine_info()
