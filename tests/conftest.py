"""Test-suite setup: make sibling helper modules (``oracle``) importable under --import-mode=importlib.

Keep this minimal and free of heavy imports at import time (no numba): the CUDA simulator tests run in their own
process and must be able to set their environment before numba is first imported.
"""

import os
import pathlib
import sys

import pytest

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_configure(config):
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        # a shorter switch interval and an atomic shared-array allocation (cudasim.py says why)
        import cudasim

        cudasim.prepare()


@pytest.fixture
def serial_kernels():
    """Run the Numba kernels on one thread (``pytestmark = pytest.mark.usefixtures(...)``): on
    arrays of a handful of elements a parallel launch is pure overhead, and on a loaded machine
    (or between torch calls, with torch's and Numba's OpenMP pools contending) it can cost
    milliseconds per step. Elementwise results do not depend on the thread count."""
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(old)


@pytest.fixture(scope="session")
def nvcc():
    """Path of the CUDA compiler (``tests/cuda_toolchain.py``: PATH, CUDA_HOME, the
    nvidia-cuda-nvcc wheel, /usr/local/cuda); a skip without one, a failure when
    ``FASTOPT_REQUIRE_NVCC=1``."""
    from cuda_toolchain import nvcc_or_skip

    return nvcc_or_skip()
