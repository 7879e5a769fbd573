"""What the tests of the CuPy kernel modules share: the PTX NVRTC makes of a module's source as
``cupy.RawModule`` compiles it (sm_90, the module's options plus CuPy's ``-ftz=true``), one
kernel's body in it, the nvcc build of a host harness, and bit-for-bit array equality."""

import ctypes
import pathlib

import numpy as np
import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"


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


def build_harness(nvcc, source, workdir, argtypes, restypes=None):
    """The host harness ``source`` (a .cu file including kernels/ headers) built by ``nvcc`` in
    ``workdir`` as a shared library (host code at -O2, no floating-point contraction, every
    warning an error) and loaded, its functions typed: ``argtypes`` and ``restypes`` map
    function names to their ctypes argument lists and result types."""
    source = pathlib.Path(source)
    lib = pathlib.Path(workdir) / f"lib{source.stem}.so"
    cmd = [nvcc, "-x", "cu", "--shared", "-O2", "-Xcompiler", "-fPIC"]
    cmd += ["-Xcompiler", "-ffp-contract=off", "-Werror", "all-warnings", "-I", str(KERNELS)]
    cuda_c()._run([*cmd, str(source), "-o", str(lib)], workdir)
    dll = ctypes.CDLL(str(lib))
    for name, types in argtypes.items():
        getattr(dll, name).argtypes = list(types)
    for name, restype in (restypes or {}).items():
        getattr(dll, name).restype = restype
    return dll


def same(a, b):
    """The same shape, dtype and bytes."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
