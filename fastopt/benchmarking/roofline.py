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

Storage combinations (bfloat16 or float16 parameters, gradients or state, a float32 master copy):
:func:`roofline_step` takes the arrays as the step stores them and moves exactly their bytes. Arrays
of one float32 or float64 dtype run the float kernels above; any other mix runs the same kernels
on the arrays' bits (each viewed as the unsigned integer of its width, ``c = 0``), and a master copy
adds ``roofline_master<k>``, which reads and writes the master and the state but only writes the
parameter (its value truncated from the master's bits), as the step does. :func:`traffic` counts
those bytes (bf16 parameters, gradients and Adam state: 14 per element).
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


@njit(**_JIT)
def roofline_master1(g, w, p, c, shift):
    """Reads g, w; writes w and p (a master copy, no state)."""
    for i in prange(w.size):
        x = w[i] + c * g[i]
        w[i] = x
        p[i] = x >> shift


@njit(**_JIT)
def roofline_master2(g, w, s0, p, c, shift):
    """Reads g, w, s0; writes w, s0 and p (a master copy, one state slot)."""
    for i in prange(w.size):
        d = c * g[i]
        x = w[i] + d
        w[i] = x
        s0[i] = s0[i] + d
        p[i] = x >> shift


@njit(**_JIT)
def roofline_master3(g, w, s0, s1, p, c, shift):
    """Reads g, w, s0, s1; writes w, s0, s1 and p (a master copy, two state slots: Adam)."""
    for i in prange(w.size):
        d = c * g[i]
        x = w[i] + d
        w[i] = x
        s0[i] = s0[i] + d
        s1[i] = s1[i] + d
        p[i] = x >> shift


@njit(**_JIT)
def roofline_master4(g, w, s0, s1, s2, p, c, shift):
    """Reads g, w, s0, s1, s2; writes w, s0, s1, s2 and p (a master copy, three state slots)."""
    for i in prange(w.size):
        d = c * g[i]
        x = w[i] + d
        w[i] = x
        s0[i] = s0[i] + d
        s1[i] = s1[i] + d
        s2[i] = s2[i] + d
        p[i] = x >> shift


MASTER_KERNELS = {
    1: roofline_master1,
    2: roofline_master2,
    3: roofline_master3,
    4: roofline_master4,
}
"""n_read_write (master and state) -> kernel(g, master, *states, param, c, shift)."""

_BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def traffic(grad, param, states, master=None):
    """Bytes per element one step moves over these arrays: the gradient read, the parameter and
    every state array read and written; with a ``master`` copy, the master read and written and
    the parameter only written."""
    rw = (param if master is None else master, *states)
    written_only = 0 if master is None else param.dtype.itemsize
    return grad.dtype.itemsize + 2 * sum(a.dtype.itemsize for a in rw) + written_only


def bytes_per_element(state_slots, itemsize=4):
    """Bytes moved per element by a step with ``state_slots`` state arrays and one gradient."""
    n_read_write = 1 + state_slots
    return itemsize * (1 + 2 * n_read_write)


def roofline_step(grad, param, states, master=None):
    """A zero-argument callable running the roofline kernel over ``grad`` and ``(param, *states)``
    (with a float32 ``master`` copy: over ``(master, *states)``, writing ``param``).

    All arrays must be 1-D NumPy arrays, contiguous, of one length, each of 2, 4 or 8 bytes per
    element (float32, float64, bfloat16, float16). Arrays of one float32 or float64 dtype without
    master run on their values, anything else on their bits (see the module docstring).
    """
    arrays = (param, *states) if master is None else (master, *states)
    every = (grad, *arrays) if master is None else (grad, *arrays, param)
    for a in every:
        if (
            not isinstance(a, np.ndarray)
            or a.ndim != 1
            or a.shape != grad.shape
            or a.dtype.itemsize not in _BITS
            or not a.flags.c_contiguous
        ):
            raise ValueError(
                "roofline arrays must be 1-D NumPy arrays, contiguous, of one length, with 2, 4 "
                "or 8 bytes per element"
            )
    table = KERNELS if master is None else MASTER_KERNELS
    try:
        kernel = table[len(arrays)]
    except KeyError:
        raise ValueError(f"no roofline kernel for {len(arrays)} read-write arrays") from None
    same_float = master is None and all(
        a.dtype == grad.dtype and a.dtype in (np.float32, np.float64) for a in every
    )
    if same_float:
        c = grad.dtype.type(0)

        def step():
            kernel(grad, *arrays, c)

        return step
    g, rw = _bits(grad), [_bits(a) for a in arrays]
    c = np.uint16(0)
    if master is None:

        def step():
            kernel(g, *rw, c)

        return step
    p = _bits(param)
    shift = np.uint8(8 * max(0, master.dtype.itemsize - param.dtype.itemsize))

    def step():
        kernel(g, *rw, p, c, shift)

    return step


def _bits(a):
    """``a`` viewed as the unsigned integers of its width (what the bit-level kernels move)."""
    return a.view(_BITS[a.dtype.itemsize])


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
