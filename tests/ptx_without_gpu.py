"""Preamble of the subprocess scripts that compile numba.cuda kernels to PTX on a machine without a
GPU: it answers the device queries numba-cuda makes while compiling, and exits 77 (the tests' skip
code) where libNVVM is missing. Defines ``cuda``, ``types``, ``libdevice``, ``np`` and ``sys``."""

PREAMBLE = """
import json, sys, types as pytypes
import numpy as np
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
        sys.exit(77)
except Exception as e:
    print(f"setup: {type(e).__name__}: {e}")
    sys.exit(77)
"""
