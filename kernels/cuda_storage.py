"""numba.cuda kernels for arrays stored in another dtype than the rule computes in (bfloat16,
float16, mixed gradient dtypes, float32 master weights, 16-bit state, stochastic rounding).

The storage loops of ``kernels/packed_loops.py`` (a thread takes packs of 4 elements, one 8-byte
access per 16-bit array) with the element access of ``kernels/access.py`` and the helpers of
``kernels/storage.py`` compiled as device functions
(``compile_storage(cuda.jit(device=True), "cuda")``), one kernel per (rule, storage combination),
compiled on first use and cached in memory and on disk, as ``cuda.py`` does for the plain loops
(same grid-stride ``indices``, launch configuration, devices and streams). The float32 and
float64 kernels of ``cuda.py`` are not touched: a combination for which ``access.is_plain``
holds runs them; 8-bit blockwise state runs the block kernels of ``block_cuda.py``.
``convert`` (``Backend.convert``) compiles ``loops.convert_loop`` with ``access.bind_convert``
the same way, one kernel per (destination, source, stochastic rounding).

16-bit arrays reach the kernels as ``uint16`` views of their bits (:func:`bits`): a numba device
array of dtype ``ml_dtypes.bfloat16`` or ``float16`` is viewed with ``.view(np.uint16)`` (numba
cannot type bfloat16 in a kernel; float16 goes the same way so that both formats share the
integer conversion helpers, bit-identical with the CPU). Foreign arrays (torch, CuPy) are made
numba device arrays by ``NumbaCUDA.native`` first (``fastopt/dispatch.py``).

Numerics: the conversions and roundings are integer arithmetic, identical to the CPU kernels;
the rules run in float32 and, as in ``cuda.py``, NVVM may contract ``a * b + c`` into a fused
multiply-add on a GPU (under the simulator the rules run as Python: bit-identical to the CPU).
"""

import math
import threading

import numpy as np

from . import access, packed_loops
from . import cuda as kcuda
from . import cuda_launch as launch
from .compile_rules import ARITY, convert_kernel, rebind, storage_loop_kernel
from .storage import compile_storage

_KERNELS = {}
_HELPERS = []
_LOCK = threading.Lock()


def _device_decorator():
    cuda = launch._cuda()
    if launch._simulating():
        return cuda.jit(device=True)
    return cuda.jit(device=True, forceinline=True)


def helpers():
    """The helpers of ``kernels/storage.py`` compiled as device functions (built once)."""
    if not _HELPERS:
        with _LOCK:
            if not _HELPERS:
                _HELPERS.append(compile_storage(_device_decorator(), "cuda"))
    return _HELPERS[0]


def kernel(rule_name, storage):
    """The CUDA storage loop of ``rule_name`` for ``storage`` (an ``access.Storage``)."""
    key = (rule_name, storage)
    k = _KERNELS.get(key)
    if k is None:
        rules, indices = kcuda._device_functions()
        decorate = _device_decorator()
        element_access = access.bind(storage, helpers(), decorate)
        element_access.update(packed_loops.bind(storage, decorate), cuda=launch._cuda())
        with _LOCK:
            k = _KERNELS.get(key)
            if k is None:
                k = storage_loop_kernel(
                    rule_name,
                    storage,
                    rules,
                    element_access,
                    indices,
                    launch._cuda().jit(cache=True),
                    "_cuda",
                    packed_loops.PACKED_TEMPLATES,
                )
                _KERNELS[key] = k
    return k


def bits(a):
    """``a`` as the kernels take it: a 16-bit float array as a ``uint16`` view of its bits."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def apply(rule_name, storage, p, g, states, master, h, gs, rs, stream=0, *, threads=None):
    """Run ``rule_name`` over flat, equal-length, contiguous numba device arrays stored as
    ``storage`` says, in place (asynchronous, on ``p``'s device and ``stream``).

    ``master``: the float32 master copy of ``p`` (None without); ``h`` and ``gs`` cast to the
    compute dtype; ``rs`` = (seed, step, index of p[0] among the optimizer's parameters), the
    counter of stochastic rounding's random bits.

    8-bit state (``storage.state == "int8"``) runs the block kernels of ``block_cuda.py``."""
    if storage.state == "int8":
        from . import block_cuda  # it imports this module

        args = (rule_name, storage, p, g, states, master, h, gs, rs, stream)
        return block_cuda.apply(*args, threads=threads)
    if len(states) != ARITY[rule_name]:
        raise ValueError(f"{rule_name} takes {ARITY[rule_name]} state arrays, got {len(states)}")
    n = math.prod(p.shape)
    if n == 0:
        return
    cuda = launch._cuda()
    pb = bits(p)
    w = pb if master is None else master
    args = (pb, w, bits(g), *[bits(s) for s in states], h + gs, tuple(int(v) for v in rs))
    device = launch.launch_device(p)
    with launch.on_device(device):
        # a thread takes PACK elements per iteration (the packs of kernels/packed_loops.py)
        work = -(-n // packed_loops.PACK)
        nblocks, nthreads = kcuda.launch_config(work, threads, None, device)
        s = launch.as_stream(cuda, stream, device)
        launch.configured(kernel(rule_name, storage), nblocks, nthreads, s, device)(*args)


_CONVERTERS = {}


def converter(dst, src, stochastic):
    """The CUDA kernel of ``loops.convert_loop`` from storage ``src`` to ``dst`` (dtype names),
    rounding 16-bit stores stochastically when ``stochastic`` (built on first use)."""
    key = (dst, src, stochastic)
    k = _CONVERTERS.get(key)
    if k is None:
        _, indices = kcuda._device_functions()
        element_access = access.bind_convert(dst, src, stochastic, helpers(), _device_decorator())
        with _LOCK:
            k = _CONVERTERS.get(key)
            if k is None:
                k = convert_kernel(
                    dst,
                    src,
                    stochastic,
                    element_access,
                    indices,
                    launch._cuda().jit(cache=True),
                    "_cuda",
                )
                _CONVERTERS[key] = k
    return k


def convert(dst, src, rs=None, word=0, stream=0, *, threads=None, blocks=None):
    """``dst[...] = src`` for flat, equal-length, contiguous numba device arrays of the storage
    dtypes (asynchronous, on ``dst``'s device and ``stream``), as ``cpu_storage.convert`` does
    it, bit for bit: exact widening, else rounding to nearest even, or with ``rs`` = (seed,
    step, index of ``src[0]`` among the optimizer's parameters) and a 16-bit ``dst``
    stochastically with word ``word`` (0-3) of each element's ``random_bits4``.
    ``threads``/``blocks`` override the launch configuration."""
    n = math.prod(dst.shape)
    c = access.conversion(dst.dtype, src.dtype, n, math.prod(src.shape), rs, word)
    if n == 0:
        return
    cuda = launch._cuda()
    device = launch.launch_device(dst)
    with launch.on_device(device):
        nblocks, nthreads = kcuda.launch_config(n, threads, blocks, device)
        s = launch.as_stream(cuda, stream, device)
        k = launch.configured(converter(c.dst, c.src, c.stochastic), nblocks, nthreads, s, device)
        k(bits(dst), bits(src), c.rs, c.word)


def sumsq_and_finite(x, stream=0, *, threads=None, blocks=None):
    """(sum of squares in float64, all finite?) of a flat bfloat16 or float16 device array:
    ``cuda.sumsq_and_finite`` over its bits with a widening load (same chunks and order)."""
    name = "float16" if x.dtype == np.float16 else "bfloat16"
    xb = x.view(np.uint16)
    return kcuda.sumsq_and_finite(xb, stream, threads=threads, blocks=blocks, widen=name)


def fill(a, value, stream=0):
    """Set every element of a flat 16-bit device array to ``value`` rounded to nearest (the
    bits computed on the host by a NumPy/ml_dtypes cast), asynchronously."""
    word = np.array([value], np.float64).astype(a.dtype).view(np.uint16)[0]
    kcuda.fill(a.view(np.uint16), word, stream)


def zeros(n, dtype, stream=0, device=None):
    """A zeroed flat 16-bit device array of ``n`` elements (a ``uint16`` allocation viewed as
    ``dtype``: numba cannot allocate bfloat16 itself)."""
    return kcuda.zeros(n, np.uint16, stream, device).view(dtype)


def _transform16(a, gscale, clip):
    for i in indices(a.size):  # noqa: F821
        store(a, i, transformed_grad(load(a, i), gscale, clip), 0)  # noqa: F821


_TRANSFORMS = {}


def transform_kernel(name):
    """The kernel behind :func:`transform` for 16-bit storage ``name`` (built on first use)."""
    k = _TRANSFORMS.get(name)
    if k is None:
        rules, indices = kcuda._device_functions()
        same = access.Storage(name, name, name, False, False)
        element_access = access.bind(same, helpers(), _device_decorator())
        glb = {
            "indices": indices,
            "transformed_grad": rules["transformed_grad"],
            "load": element_access["load_grad"],
            "store": element_access["store_state"],
        }
        with _LOCK:
            k = _TRANSFORMS.get(name)
            if k is None:
                short = access.SHORT[name]
                k = launch._cuda().jit(rebind(_transform16, glb, f"transform_{short}"))
                _TRANSFORMS[name] = k
    return k


def transform(a, gscale, clip=0.0, stream=0):
    """``cuda.transform`` for a flat 16-bit device array: ``a * gscale`` clipped to
    [-clip, clip] when ``clip > 0``, in float32, rounded to nearest on store. ``gscale`` and
    ``clip`` are first rounded to ``a``'s dtype, as the CPU backend's ``a *= a.dtype.type(f)``
    and ``np.clip`` on a 16-bit array do."""
    n = a.size
    if n == 0:
        return
    rounded = np.array([gscale, clip], np.float64).astype(a.dtype).astype(np.float32)
    name = "float16" if a.dtype == np.float16 else "bfloat16"
    device = launch.launch_device(a)
    with launch.on_device(device):
        nblocks, nthreads = kcuda.launch_config(n, device=device)
        s = launch.as_stream(launch._cuda(), stream, device)
        k = launch.configured(transform_kernel(name), nblocks, nthreads, s, device)
        k(a.view(np.uint16), rounded[0], rounded[1])
