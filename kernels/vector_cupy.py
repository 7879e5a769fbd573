"""Vector kernels of L-BFGS on CuPy arrays: the operations of ``kernels/vector_cuda.py`` as CUDA C
kernels (``vector_kernels.cu``) compiled by NVRTC through ``cupy.RawModule``.

Same functions, same meaning and the same bits as the numba-cuda module: each operation is one
pass of the template ``fo::vec::pass`` with an element functor, reducing up to two float64
quantities of the updated elements in the order documented there (``REDUCTION_CHUNK`` elements
per partial, thread ``t`` of ``REDUCTION_THREADS`` summing ``lo + t, lo + t + T, ...`` with one
fused multiply-add per product, a pairwise tree over the block), the ``(2, nchunks)`` partials
copied back and summed on the host by NumPy in index order, as ``vector_cuda`` does.

Arrays are flat, C-contiguous ``cupy.ndarray`` of float32 or float64, all of one dtype and on one
device; scalars are Python floats (float64 arithmetic, stored in the array's dtype). Every
launch goes to that device and to ``stream`` (a handle, see :func:`fastopt.kernels.cupy.as_stream`;
None: CuPy's current stream); a reduction reads its partials back on that stream, which it
synchronises alone. The partials live in one device buffer per thread and device, grown when a
longer vector needs more and reused by every call (no allocation per call); operations that
reduce nothing (``scale``, ``copy``, ``fill``) write no partials and never wait.
"""

import threading

import numpy as np

from . import cupy as kcupy
from .layout import REDUCTION_CHUNK, REDUCTION_THREADS

KERNEL_SOURCE = "vector_kernels.cu"
OPS = ("dot", "update_dot", "scale_dot", "pair", "abs", "axpy_absmax", "scale", "copy", "fill")
"""The kernels of ``vector_kernels.cu`` (``FO_VECTOR_OPS``), each as ``fo_vec_<op>_f32/_f64``."""
BLOCKS = 1024
"""At most this many blocks; each takes chunks b, b + BLOCKS, ... (the grid changes no result)."""

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}

_local = threading.local()  # .partials: {device id: float64 device buffer}


def source():
    """The CUDA source handed to NVRTC: ``vector_kernels.cu`` with ``optim_kernels.cu`` and its
    headers inlined (a stale ``rules_layout.cuh`` is refused, as for the rule kernels)."""
    return kcupy._inline(KERNEL_SOURCE)


_module = kcupy.RawModuleCache(source, kcupy.COMPILE_OPTIONS)


def kernel_name(op, dtype):
    """``fo_vec_<op>_<f32|f64>``."""
    return f"fo_vec_{op}_{_SUFFIX[np.dtype(dtype)]}"


def _partials(cupy, device, nchunks):
    """This thread's partials buffer on ``device``, at least ``2 * nchunks`` doubles."""
    buffers = getattr(_local, "partials", None)
    if buffers is None:
        buffers = _local.partials = {}
    buf = buffers.get(device)
    if buf is None or buf.size < 2 * nchunks:
        buf = buffers[device] = cupy.empty(2 * max(nchunks, 8), dtype=np.float64)
    return buf


def _check(arrays, n):
    """The arrays fit one pass over ``n`` elements, else TypeError/ValueError naming the problem
    (before anything is launched)."""
    kcupy.check_flat_arrays(arrays, n, "vector")


def _run(op, arrays, s=0.0, u=0.0, stream=None, reduce=True):
    """Run ``op`` over ``arrays`` (``arrays[0]``'s length); the ``(2, nchunks)`` partials on the
    host, or None when not ``reduce`` (nothing is copied back and nothing waits)."""
    import cupy

    n = arrays[0].size
    _check(arrays, n)
    if n == 0:
        return np.zeros((2, 1)) if reduce else None
    nchunks = -(-n // REDUCTION_CHUNK)
    device = arrays[0].data.device_id
    stream = kcupy.as_stream(stream, device)
    null = np.uint64(0)
    slots = tuple(arrays) + (null,) * (5 - len(arrays))
    with cupy.cuda.Device(device):
        if stream is None:
            return _launch(cupy, op, device, n, nchunks, slots, s, u, reduce)
        with stream:  # RawKernel launches and get() go to the current stream
            return _launch(cupy, op, device, n, nchunks, slots, s, u, reduce)


def _launch(cupy, op, device, n, nchunks, slots, s, u, reduce):
    k = _module.function(cupy, device, kernel_name(op, slots[0].dtype))
    out = _partials(cupy, device, nchunks) if reduce else np.uint64(0)
    grid = (min(nchunks, BLOCKS),)
    k(grid, (REDUCTION_THREADS,), (np.int64(n), out, *slots, np.float64(s), np.float64(u)))
    if not reduce:
        return None
    return out[: 2 * nchunks].get().reshape(2, nchunks)  # waits for this stream only


# ---------------------------------------------------------------------------- public API
# The same functions and meaning as kernels/vector.py and kernels/vector_cuda.py.


def dot(x, y, stream=None):
    """``x . y`` in float64 (deterministic)."""
    return float(np.sum(_run("dot", [x, y], stream=stream)[0]))


def update_dot(q, a, x, h, z, stream=None):
    """``q <- h * (q + a*x)`` in place, then return ``z . q`` (one pass)."""
    return float(np.sum(_run("update_dot", [q, x, z], a, h, stream)[0]))


def scale_dot(out, c, x, z, stream=None):
    """``out <- c * x``, then return ``z . out`` (one pass)."""
    return float(np.sum(_run("scale_dot", [out, x, z], c, stream=stream)[0]))


def curvature_pair(g, pg, d, t, y, s, stream=None):
    """``y <- g - pg``, ``s <- t*d``; return ``(y . s, y . y)`` (one pass)."""
    r = _run("pair", [g, pg, d, y, s], t, stream=stream)
    return float(np.sum(r[0])), float(np.sum(r[1]))


def abs_sum_max(x, stream=None):
    """``(sum |x_i|, max |x_i|)`` in float64 (one pass)."""
    r = _run("abs", [x], stream=stream)
    return float(np.sum(r[0])), float(np.max(r[1]))


def axpy_absmax(p, a, x, stream=None):
    """``p <- p + a*x`` in place; return ``max |x_i|`` (one pass)."""
    return float(np.max(_run("axpy_absmax", [p, x], a, stream=stream)[1]))


def scale(out, c, x, stream=None):
    """``out <- c * x`` (rounded once to ``out``'s dtype); asynchronous."""
    _run("scale", [out, x], c, stream=stream, reduce=False)


def copy(dst, src, stream=None):
    """``dst <- src`` (equal sizes); asynchronous."""
    _run("copy", [dst, src], stream=stream, reduce=False)


def fill(x, value, stream=None):
    """``x <- value`` everywhere; asynchronous."""
    _run("fill", [x], value, stream=stream, reduce=False)


def empty(n, dtype, device, stream=None):
    """An uninitialised flat ``cupy.ndarray`` of ``n`` elements on ``device``, allocated on
    ``stream`` (CuPy's memory pool orders its reuse on that stream)."""
    import cupy

    stream = kcupy.as_stream(stream, device)
    with cupy.cuda.Device(device):
        if stream is None:
            return cupy.empty(n, dtype=dtype)
        with stream:
            return cupy.empty(n, dtype=dtype)


def to_device(host, device, stream=None):
    """A flat ``cupy.ndarray`` copy of the NumPy array ``host`` on ``device``, on ``stream``."""
    import cupy

    out = empty(host.size, host.dtype, device, stream)
    with cupy.cuda.Device(device):
        out.set(np.ascontiguousarray(host).reshape(host.size), kcupy.as_stream(stream, device))
    return out


def synchronize(device=None, stream=None):
    """Wait for the work launched on ``stream`` on ``device``, before host copies that run on
    CuPy's current stream (``arrays.to_host``: an L-BFGS ``state_dict``). None: CuPy's current
    stream, which orders such copies by itself, so nothing is waited for."""
    import cupy

    stream = kcupy.as_stream(stream, device)
    if stream is not None:
        with cupy.cuda.Device(device):
            stream.synchronize()
