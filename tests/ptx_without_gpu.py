"""Preamble of the subprocess scripts that compile numba.cuda kernels to PTX on a machine without a
GPU: it answers the device queries numba-cuda makes while compiling, and exits 77 (the tests' skip
code) where numba-cuda, libNVVM or libdevice is missing, or exits 1 (a failure) instead when
``FASTOPT_REQUIRE_NVVM=1`` (CI sets it: the test extra's nvidia-cuda-nvcc wheel depends on
nvidia-nvvm, which carries libNVVM and libdevice). Defines ``cuda``, ``types``, ``libdevice``, ``np``
and ``sys``."""

import os
import subprocess
import sys

import pytest

REQUIRE_ENV = "FASTOPT_REQUIRE_NVVM"


def run_ptx_script(source, *args, path=None):
    """Run ``source`` (a script that starts with :data:`PREAMBLE`) in a fresh Python outside the
    CUDA simulator, with ``path`` put in front of PYTHONPATH; skip the calling test when the
    preamble exits 77 (nothing to compile with), fail on any other error; return its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", source, *args], env=env, capture_output=True, text=True, timeout=600
    )
    if r.returncode == 77:
        pytest.skip(f"cannot compile CUDA here: {r.stdout.strip() or 'libNVVM not found'}")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


PREAMBLE = """
import json, os, sys, types as pytypes
import numpy as np


def _unavailable(why):
    if os.environ.get("FASTOPT_REQUIRE_NVVM", "").strip() == "1":
        print(f"FASTOPT_REQUIRE_NVVM=1 but numba-cuda cannot compile PTX here: {why}")
        sys.exit(1)
    print(why)
    sys.exit(77)


try:
    import numba.cuda.cuda_paths as cuda_paths
    import numba.cuda.cudadrv.nvrtc as nvrtc
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda, types
    from numba.cuda import libdevice
    from numba.cuda.cudadrv import nvvm

    if not cuda.is_available():
        dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
    try:
        nvrtc.get_supported_ccs()
    except Exception:
        nvrtc.get_arch_option = lambda major, minor, arch="": f"compute_{major}{minor}"
        cuda_paths._get_nvrtc_path = lambda: ("not needed for PTX", None)
    if not nvvm.is_available():
        _unavailable("libNVVM not found")
except Exception as e:
    _unavailable(f"setup: {type(e).__name__}: {e}")
"""
