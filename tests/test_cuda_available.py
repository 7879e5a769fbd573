"""kernels/cuda.available() accepts only NVIDIA's numba-cuda package, not the CUDA target that older
numba releases carried built in (``numba.cuda.implementation == "Built-in"``)."""

import numba.cuda
import pytest
from numba.cuda.core import config

from fastopt.kernels import cuda as kcuda


@pytest.mark.parametrize("implementation", ["Built-in", None])
def test_available_rejects_numbas_builtin_cuda_target(monkeypatch, implementation):
    # The simulator flag makes available() say yes to numba-cuda without a GPU (the control below).
    monkeypatch.setattr(config, "ENABLE_CUDASIM", True)
    if implementation is None:
        monkeypatch.delattr(numba.cuda, "implementation")
    else:
        monkeypatch.setattr(numba.cuda, "implementation", implementation)
    ok, why = kcuda.available()
    assert ok is False and "numba-cuda" in why


def test_available_accepts_numba_cuda(monkeypatch):
    monkeypatch.setattr(config, "ENABLE_CUDASIM", True)
    monkeypatch.setattr(numba.cuda, "implementation", "NVIDIA")
    assert kcuda.available() == (True, "CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
