"""Vector kernels of L-BFGS on a CUDA GPU (numba-cuda): the operations of ``kernels/vector.py``.

Each operation is one kernel pass that applies an element update (an axpy, a scale, the new
curvature pair) and reduces up to two float64 quantities of the updated elements (dot products,
``sum |x|``, ``max |x|``). The reduction is deterministic as ``kernels/cuda.py``'s
``sumsq_and_finite`` is: ``REDUCTION_CHUNK`` elements per partial, thread ``t`` of a block summing
elements ``lo + t, lo + t + T, ...`` in index order, then a pairwise tree over the block's ``T``
threads; the partials are copied back and summed on the host in index order. The order of every
addition depends on ``(n, T)`` only, never on the grid: the same bits run to run. They differ from
the CPU kernels' (``kernels/vector.py``) in the last places: there each chunk is summed as
1024-element blocks, each block sequentially (in L1), the block sums in order.

All kernels are one template, :func:`_pass`, with an element function per operation bound as a
global (``element(i, A, B, C, D, E, a, b) -> (v0, v1)``; unused array slots get a one-element
dummy) and ``second_max`` choosing whether ``v1`` is summed or maxed. Arrays are flat device arrays
(numba, or anything with ``__cuda_array_interface__``) of float32 or float64, all on one device;
every launch goes to that device and to ``stream`` (a handle, numba/CuPy/torch stream or None:
the legacy default stream, see :func:`fastopt.kernels.cuda_launch.as_stream`). A reduction
copies its partials back on that stream and synchronises that stream alone, as the L-BFGS
control flow needs host floats; operations that reduce nothing (``scale``, ``copy``, ``fill``)
never wait. The partials buffer and the dummy arrays live per thread and device
(``threading.local``, as ``kernels/vector_cupy.py``): optimizers stepped from several threads,
or on several devices, never share them.
"""

import threading

import numpy as np

from . import cuda_launch as launch
from .compile_rules import rebind
from .cuda_launch import _cuda
from .layout import REDUCTION_CHUNK, REDUCTION_THREADS

THREADS = REDUCTION_THREADS
"""Threads per block of the reduction passes (a power of two; part of the summation order)."""
BLOCKS = 1024
"""At most this many blocks; each takes chunks b, b + BLOCKS, ..."""

_LOCK = threading.Lock()
_KERNELS = {}
_local = threading.local()  # .partials: {device: (2, capacity) float64}; .dummy: {(device, dtype)}


# ---------------------------------------------------------------------------- element functions
# Stores round to the array's dtype; the value reduced is the one stored, read back, as the CPU
# kernels reduce the rounded value.


def _el_dot(i, A, B, C, D, E, a, b):
    return np.float64(A[i]) * np.float64(B[i]), 0.0


def _el_update_dot(i, A, B, C, D, E, a, b):
    # q <- h * (q + a*x) (the sum one fma), then z . q: A = q, B = x, C = z, a = a, b = h
    A[i] = cuda.fma(a, np.float64(B[i]), np.float64(A[i]))
    A[i] = b * np.float64(A[i])
    return np.float64(C[i]) * np.float64(A[i]), 0.0


def _el_scale_dot(i, A, B, C, D, E, a, b):
    # out <- c * x, then z . out: A = out, B = x, C = z, a = c
    A[i] = a * np.float64(B[i])
    return np.float64(C[i]) * np.float64(A[i]), 0.0


def _el_pair(i, A, B, C, D, E, a, b):
    # y <- g - pg, s <- t*d: A = g, B = pg, C = d, D = y, E = s, a = t; (y . s, y . y)
    D[i] = A[i] - B[i]
    E[i] = np.float64(C[i]) * a
    yv = np.float64(D[i])
    return yv * np.float64(E[i]), yv * yv


def _el_abs(i, A, B, C, D, E, a, b):
    v = abs(np.float64(A[i]))
    return v, v


def _el_axpy_absmax(i, A, B, C, D, E, a, b):
    # p <- p + a*x (one fma); max |x|: A = p, B = x
    A[i] = cuda.fma(a, np.float64(B[i]), np.float64(A[i]))
    return 0.0, abs(np.float64(B[i]))


def _el_scale(i, A, B, C, D, E, a, b):
    A[i] = a * np.float64(B[i])
    return 0.0, 0.0


def _el_fill(i, A, B, C, D, E, a, b):
    A[i] = a
    return 0.0, 0.0


def _el_copy(i, A, B, C, D, E, a, b):
    A[i] = B[i]
    return 0.0, 0.0


# ---------------------------------------------------------------------------- the pass template


def _pass(n, out, A, B, C, D, E, a, b):
    s0 = cuda.shared.array(threads, np.float64)
    s1 = cuda.shared.array(threads, np.float64)
    t = cuda.threadIdx.x
    nchunks = (n + (chunk - 1)) // chunk
    c = np.int64(cuda.blockIdx.x)
    while c < nchunks:
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc0 = 0.0
        acc1 = 0.0
        i = lo + t
        while i < hi:
            v0, v1 = element(i, A, B, C, D, E, a, b)
            acc0 += v0
            if second_max:
                acc1 = max(acc1, v1)
            else:
                acc1 += v1
            i += threads
        s0[t] = acc0
        s1[t] = acc1
        cuda.syncthreads()
        half = threads // 2
        while half > 0:
            if t < half:
                s0[t] += s0[t + half]
                if second_max:
                    s1[t] = max(s1[t], s1[t + half])
                else:
                    s1[t] += s1[t + half]
            cuda.syncthreads()
            half //= 2
        if t == 0:
            out[0, c] = s0[0]
            out[1, c] = s1[0]
        cuda.syncthreads()
        c += cuda.gridDim.x


_ELEMENTS = {
    "dot": (_el_dot, False),
    "update_dot": (_el_update_dot, False),
    "scale_dot": (_el_scale_dot, False),
    "pair": (_el_pair, False),
    "abs": (_el_abs, True),
    "axpy_absmax": (_el_axpy_absmax, True),
    "scale": (_el_scale, False),
    "copy": (_el_copy, False),
    "fill": (_el_fill, False),
}


def _kernel(op, threads):
    key = (op, threads)
    k = _KERNELS.get(key)
    if k is None:
        with _LOCK:
            k = _KERNELS.get(key)
            if k is None:
                cuda = _cuda()
                fn, second_max = _ELEMENTS[op]
                glb = {"cuda": cuda, "np": np, "threads": threads, "chunk": REDUCTION_CHUNK}
                glb["second_max"] = second_max
                glb["element"] = cuda.jit(device=True)(rebind(fn, glb, f"element_{op}"))
                k = _KERNELS[key] = cuda.jit(rebind(_pass, glb, f"vector_{op}"))
    return k


def _thread_buffers(name):
    """This thread's ``{key: device array}`` of kind ``name`` (a ``threading.local``)."""
    buffers = getattr(_local, name, None)
    if buffers is None:
        buffers = {}
        setattr(_local, name, buffers)
    return buffers


def _dummy(dtype, device=None, stream=0):
    """This thread's one-element filler of ``dtype`` on ``device`` (never read nor written);
    allocated on the current device (the caller's ``launch.on_device``)."""
    dummies = _thread_buffers("dummy")
    key = (device, np.dtype(dtype))
    d = dummies.get(key)
    if d is None:
        d = dummies[key] = _cuda().device_array(1, dtype, stream=stream)
    return d


def _partials(nchunks, device=None, stream=0, sink=False):
    """This thread's ``(2, capacity)`` partials buffer on ``device``, ``capacity >= nchunks``
    (grown when a longer vector needs more, else reused), allocated on the current device.
    ``sink``: the buffer the passes that reduce nothing write their (unread) partials to, so
    that they never touch the one a reduction reads back."""
    buffers = _thread_buffers("partials")
    key = (device, sink)
    p = buffers.get(key)
    if p is None or p.shape[1] < nchunks:
        p = buffers[key] = _cuda().device_array((2, nchunks), np.float64, stream=stream)
    return p


def _run(op, n, arrays, a=0.0, b=0.0, reduce=True, stream=None):
    """Run ``op`` over ``n`` elements on ``stream``; the (2, nchunks) partials on the host
    (None when not ``reduce``: nothing is copied back and nothing waits)."""
    cuda = _cuda()
    threads = int(THREADS)
    if threads < 1 or threads & (threads - 1):
        raise ValueError(f"vector_cuda.THREADS must be a power of two, got {threads}")
    if n == 0:  # no launch: its partials buffer would hold the previous call's sums
        return np.zeros((2, 1)) if reduce else None
    nchunks = max(1, -(-n // REDUCTION_CHUNK))
    arrays = [x if getattr(x, "__cuda_ndarray__", False) else cuda.as_cuda_array(x) for x in arrays]
    device = launch.device_of(arrays[0])
    where = launch.launch_device(arrays[0])
    with launch.on_device(where):
        s = launch.as_stream(cuda, stream, where)
        filler = _dummy(arrays[0].dtype, device, s)
        args = arrays + [filler] * (5 - len(arrays))
        out = _partials(nchunks, device, s, sink=not reduce)
        k = launch.configured(_kernel(op, threads), min(nchunks, BLOCKS), threads, s, where)
        k(n, out, *args, float(a), float(b))
        if not reduce:
            return None
        if s:
            host = out.copy_to_host(stream=s)
            s.synchronize()  # this stream alone
        else:
            host = out.copy_to_host()
    return host[:, :nchunks]


# ---------------------------------------------------------------------------- public API
# The same functions and meaning as kernels/vector.py.


def dot(x, y, stream=None):
    """``x . y`` in float64 (deterministic)."""
    return float(np.sum(_run("dot", x.size, [x, y], stream=stream)[0]))


def update_dot(q, a, x, h, z, stream=None):
    """``q <- h * (q + a*x)`` in place, then return ``z . q`` (one pass)."""
    return float(np.sum(_run("update_dot", q.size, [q, x, z], a, h, stream=stream)[0]))


def scale_dot(out, c, x, z, stream=None):
    """``out <- c * x``, then return ``z . out`` (one pass)."""
    return float(np.sum(_run("scale_dot", out.size, [out, x, z], c, stream=stream)[0]))


def curvature_pair(g, pg, d, t, y, s, stream=None):
    """``y <- g - pg``, ``s <- t*d``; return ``(y . s, y . y)`` (one pass)."""
    r = _run("pair", g.size, [g, pg, d, y, s], t, stream=stream)
    return float(np.sum(r[0])), float(np.sum(r[1]))


def abs_sum_max(x, stream=None):
    """``(sum |x_i|, max |x_i|)`` in float64 (one pass)."""
    r = _run("abs", x.size, [x], stream=stream)
    return float(np.sum(r[0])), float(np.max(r[1]))


def axpy_absmax(p, a, x, stream=None):
    """``p <- p + a*x`` in place; return ``max |x_i|`` (one pass)."""
    return float(np.max(_run("axpy_absmax", p.size, [p, x], a, stream=stream)[1]))


def scale(out, c, x, stream=None):
    """``out <- c * x`` (rounded once to ``out``'s dtype); asynchronous."""
    _run("scale", out.size, [out, x], c, reduce=False, stream=stream)


def copy(dst, src, stream=None):
    """``dst <- src`` (equal sizes); asynchronous."""
    _run("copy", dst.size, [dst, src], reduce=False, stream=stream)


def fill(x, value, stream=None):
    """``x <- value`` everywhere; asynchronous."""
    _run("fill", x.size, [x], value, reduce=False, stream=stream)


def empty(n, dtype, device=None, stream=None):
    """An uninitialised flat device array of ``n`` elements on ``device`` (None: the current
    one), allocated on ``stream``."""
    cuda = _cuda()
    with launch.on_device(device):
        return cuda.device_array(int(n), dtype, stream=launch.as_stream(cuda, stream, device))


def to_device(host, device=None, stream=None):
    """A flat device copy of the NumPy array ``host`` on ``device``, uploaded on ``stream``."""
    host = np.ascontiguousarray(host).reshape(host.size)
    out = empty(host.size, host.dtype, device, stream)
    cuda = _cuda()
    with launch.on_device(device):
        out.copy_to_device(host, stream=launch.as_stream(cuda, stream, device))
    return out


def synchronize(device=None, stream=None):
    """Wait for ``stream`` (None: the legacy default stream) on ``device``."""
    cuda = _cuda()
    with launch.on_device(device):
        s = launch.as_stream(cuda, stream, device)
        if s:
            s.synchronize()
        else:
            cuda.synchronize()
