"""Access to mpi4py, imported on first use (the rest of fastopt.distributed imports without it)."""

import os

import numpy as np


def import_mpi():
    """The ``mpi4py.MPI`` module, or ImportError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "fastopt.distributed needs mpi4py and an MPI runtime: pip install 'fastopt[mpi]' "
            "(mpi4py + the MPICH wheel), or pip install mpi4py against a system MPI"
        ) from exc
    return MPI


def available():
    """True when mpi4py can be imported (and so an MPI library was found)."""
    try:
        import_mpi()
    except ImportError:
        return False
    return True


def communicator(comm):
    """``comm``, or ``MPI.COMM_WORLD`` when None."""
    return import_mpi().COMM_WORLD if comm is None else comm


def mpi_type(dtype):
    """The MPI datatype of a float32 / float64 buffer (reductions: MPI has no 16-bit floats)."""
    MPI = import_mpi()
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return MPI.FLOAT
    if dtype == np.float64:
        return MPI.DOUBLE
    raise TypeError(f"no MPI reduction datatype for {dtype}; sums are taken in float32 or float64")


def mpi_move_type(dtype):
    """The MPI datatype that moves a buffer's elements unchanged (broadcasts, gathers,
    scatters): float32/float64 as themselves, any other 1-, 2-, 4- or 8-byte dtype (bfloat16,
    float16, int8 codes) as unsigned integers of its width. Never for reductions."""
    MPI = import_mpi()
    dtype = np.dtype(dtype)
    if dtype in (np.float32, np.float64):
        return mpi_type(dtype)
    widths = {1: MPI.UINT8_T, 2: MPI.UINT16_T, 4: MPI.UINT32_T, 8: MPI.UINT64_T}
    if dtype.itemsize not in widths:
        raise TypeError(f"no MPI datatype moves {dtype} ({dtype.itemsize}-byte elements)")
    return widths[dtype.itemsize]


def cuda_aware_default():
    """Whether ``FASTOPT_CUDA_AWARE_MPI`` says the MPI library reads device buffers."""
    v = os.environ.get("FASTOPT_CUDA_AWARE_MPI", "").strip().lower()
    return v in ("1", "true", "yes", "on")
