"""What the tests of the CuPy kernel modules share: the PTX NVRTC makes of a module's source as
``cupy.RawModule`` compiles it (sm_90, the module's options plus CuPy's ``-ftz=true``), one
kernel's body in it, and bit-for-bit array equality."""

import numpy as np
import pytest


def cuda_c():
    """tests/test_cuda_c.py, which holds the NVRTC and nvcc plumbing."""
    import test_cuda_c

    return test_cuda_c


def nvrtc_ptx(source, options=None):
    """The sm_90 PTX of ``source`` compiled with ``options`` (a module's ``COMPILE_OPTIONS``;
    None: the elementwise kernels' own), as CuPy would; skipped without NVRTC."""
    h = cuda_c()
    with pytest.MonkeyPatch.context() as mp:
        if options is not None:
            mp.setattr(h.cupy_backend, "COMPILE_OPTIONS", options)
        return h._nvrtc_compile(h.nvrtc_or_skip(), source, arch="compute_90")[0]


def entry_body(ptx, name):
    """The PTX of kernel ``name``, up to the next entry."""
    start = ptx.index(f".entry {name}(")
    end = ptx.find(".entry ", start + 1)
    return ptx[start : end if end > 0 else len(ptx)]


def same(a, b):
    """The same shape, dtype and bytes."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
