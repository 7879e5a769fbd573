"""Roofline kernels: the memory traffic of an optimizer step with trivial arithmetic.

An optimizer update is memory-bound, so its speed is judged against a kernel that moves the same
bytes and does (almost) nothing else, run in the same process on the very same arrays:

- CPU: ``roofline_rw<k>`` (``numba.njit(parallel=True, cache=True)``) reads the gradient and ``k``
  read-write arrays (the parameter and its state) and writes the ``k`` arrays back, adding
  ``c * g[i]`` with ``c = 0``, so it leaves the arrays unchanged and does not disturb them.
- GPU: a device-to-device copy of half the step's bytes (a copy reads and writes each byte, so it
  moves the same traffic), timed with CUDA events; see :func:`device_copy_step`.

``bytes_per_element(state_slots, itemsize)`` is the traffic of one element of a step: the gradient
read once, the parameter and every state slot read and written (fp32: SGD 12, one state slot 20,
Adam's two 28, AMSGrad's three 36).
"""

import numpy as np
from numba import njit, prange

_JIT = dict(parallel=True, cache=True, nogil=True)


@njit(**_JIT)
def roofline_rw1(g, p, c):
    """Reads g, p; writes p (SGD's traffic)."""
    for i in prange(p.size):
        p[i] = p[i] + c * g[i]


@njit(**_JIT)
def roofline_rw2(g, p, s0, c):
    """Reads g, p, s0; writes p, s0 (one state slot)."""
    for i in prange(p.size):
        d = c * g[i]
        p[i] = p[i] + d
        s0[i] = s0[i] + d


@njit(**_JIT)
def roofline_rw3(g, p, s0, s1, c):
    """Reads g, p, s0, s1; writes p, s0, s1 (two state slots: Adam)."""
    for i in prange(p.size):
        d = c * g[i]
        p[i] = p[i] + d
        s0[i] = s0[i] + d
        s1[i] = s1[i] + d


@njit(**_JIT)
def roofline_rw4(g, p, s0, s1, s2, c):
    """Reads g, p, s0, s1, s2; writes p, s0, s1, s2 (three state slots: AMSGrad)."""
    for i in prange(p.size):
        d = c * g[i]
        p[i] = p[i] + d
        s0[i] = s0[i] + d
        s1[i] = s1[i] + d
        s2[i] = s2[i] + d


KERNELS = {1: roofline_rw1, 2: roofline_rw2, 3: roofline_rw3, 4: roofline_rw4}
"""n_read_write -> kernel(g, *read_write_arrays, c)."""


def bytes_per_element(state_slots, itemsize=4):
    """Bytes moved per element by a step with ``state_slots`` state arrays and one gradient."""
    n_read_write = 1 + state_slots
    return itemsize * (1 + 2 * n_read_write)


def roofline_step(grad, param, states):
    """A zero-argument callable running the roofline kernel over ``grad`` and ``(param, *states)``.

    All arrays must be 1-D NumPy arrays, contiguous, of one dtype and one length.
    """
    arrays = (param, *states)
    for a in (grad, *arrays):
        if (
            not isinstance(a, np.ndarray)
            or a.shape != grad.shape
            or a.dtype != grad.dtype
            or not a.flags.c_contiguous
        ):
            raise ValueError("roofline arrays must be 1-D, contiguous, of one dtype and length")
    try:
        kernel = KERNELS[len(arrays)]
    except KeyError:
        raise ValueError(f"no roofline kernel for {len(arrays)} read-write arrays") from None
    c = grad.dtype.type(0)

    def step():
        kernel(grad, *arrays, c)

    return step


def device_copy_step(nbytes, library):
    """A zero-argument callable copying ``nbytes // 2`` bytes device to device (so ``nbytes`` are
    moved: each byte read once and written once), plus the buffers keeping it alive.

    ``library`` is ``"cupy"`` (CuPy's current device and stream) or ``"numba-cuda"`` (the legacy
    default stream). Launch only; time it with CUDA events (:class:`fastopt.benchmarking.timing.CudaEventTimer`).
    """
    half = max(4, (int(nbytes) // 2) // 4 * 4)
    if library == "cupy":
        import cupy

        src = cupy.zeros(half // 4, np.float32)
        dst = cupy.empty_like(src)

        def step():
            dst.data.copy_from_device_async(src.data, half)

    elif library == "numba-cuda":
        from numba import cuda

        src = cuda.to_device(np.zeros(half // 4, np.float32))
        dst = cuda.device_array_like(src)

        def step():
            dst.copy_to_device(src)

    else:
        raise ValueError(f"no device copy for {library!r}")
    step.buffers = (src, dst)
    return step
