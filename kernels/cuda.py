"""CUDA kernels: every rule of ``rules.py`` applied elementwise by a ``numba.cuda.jit`` kernel.

The rules are compiled as ``cuda.jit(device=True, forceinline=True)`` device functions (NVVM-level
``alwaysinline``; Numba-IR-level ``inline="always"`` only helps type inference, not speed). The
loop templates are those of ``kernels/loops.py`` (shared with ``cpu.py``); each rule gets its own
kernel (``compile_rules.loop_kernel``), compiled on first use and cached in memory and on disk.
The loop is grid-stride over 64-bit indices (``indices`` bound to :func:`_grid_stride`):
``cuda.grid(1)`` and ``cuda.gridsize(1)`` are int64 in numba-cuda (computed in 64 bits from the
32-bit special registers) and ``p.size`` is intp, so arrays over 2**31 elements are covered.

``numba.cuda`` is imported on first use only, and nothing here touches a device before
``kernel``/``apply`` is called, so ``import fastopt.kernels.cuda`` works on machines without CUDA.
``apply`` only launches: no allocation, no copy, no synchronisation. The kernels take the arrays
and ONE scalar tuple ``hs = (*h, gradient scale, clip)`` (``kernels/loops.py``): numba-cuda
prepares every launch argument in Python, so each one costs host time on every launch; the tuple's
leaves are still passed one by one, but as one argument. Launches go on the stream
given (a handle or a stream object; ``fastopt.streams`` picks the one of the arrays' library) and
on the arrays' device; the launch plumbing (devices, external streams, configured launches,
reduction scratch, all cached) is ``kernels/cuda_launch.py``. Arrays are viewed without
synchronising the stream their ``__cuda_array_interface__`` names (``sync=False``): the caller
launches on that stream instead.

Also here: ``as_device_array`` (zero-copy numba views of CuPy arrays, torch CUDA tensors and
DLPack exporters), ``zeros``/``fill`` (state allocation), and ``sumsq_and_finite``, the
deterministic float64 sum of squares and finiteness flag behind gradient clipping and non-finite
skipping (the only call here that synchronises, the launch stream alone: it returns host values),
and ``transform`` (in-place scaling and clamping for the clipping functions).

Numerics: without ``fastmath`` NVVM still contracts ``a * b + c`` into fused multiply-adds (its
default ``-fma=1``; numba-cuda offers no switch), so GPU results are bit-identical run to run and
for any launch configuration, but may differ from the CPU kernels in the last bit.
"""

import math
import threading

from . import cuda_launch as launch
from .compile_rules import ARITY, compile_rules, loop_kernel, rebind
from .cuda_launch import SIMULATOR_SM_COUNT, _cuda, _simulating  # noqa: F401 (re-exported)
from .layout import REDUCTION_CHUNK, REDUCTION_THREADS

THREADS = 256
"""Threads per block."""
BLOCKS_PER_SM = 32
"""Upper bound on blocks per streaming multiprocessor; the grid-stride loop covers the rest."""


# ---------------------------------------------------------------------------------------------
# Kernels of the rules. ``cuda`` is a global of the device functions bound by ``rebind`` (globals,
# not closure variables: the simulator swaps the ``cuda`` module in a function's globals for its own).


def _grid_stride(n):
    """The indices of an ``n``-element grid-stride loop that this thread takes."""
    return range(cuda.grid(1), n, cuda.gridsize(1))


_KERNELS = {}
_DEVICE = None  # (compiled rules, compiled _grid_stride), built on first use
_LOCK = threading.Lock()


def _device_functions():
    """(rules compiled as device functions, the grid-stride ``indices``)."""
    global _DEVICE
    if _DEVICE is None:
        cuda = _cuda()
        if _simulating():
            # The simulator's jit takes no ``forceinline``; its device functions run as Python.
            decorate = cuda.jit(device=True)
        else:
            decorate = cuda.jit(device=True, forceinline=True)
        _DEVICE = compile_rules(decorate), decorate(rebind(_grid_stride, {"cuda": cuda}))
    return _DEVICE


def kernel(rule_name):
    """The CUDA kernel of one rule (built on first use; compiled per dtype on first launch)."""
    k = _KERNELS.get(rule_name)
    if k is None:
        with _LOCK:
            k = _KERNELS.get(rule_name)
            if k is None:
                rules, indices = _device_functions()
                # The variant keeps the disk cache entries apart from the CPU kernels' (same file).
                k = loop_kernel(rule_name, rules, indices, _cuda().jit(cache=True), "_cuda")
                _KERNELS[rule_name] = k
    return k


def launch_config(n, threads=None, blocks=None, device=None):
    """``(blocks, threads)`` for ``n`` elements: ``min(ceil(n / threads), BLOCKS_PER_SM * SMs)``."""
    threads = THREADS if threads is None else int(threads)
    if blocks is None:
        blocks = min(-(-n // threads), BLOCKS_PER_SM * launch.sm_count(_cuda(), device))
    return max(int(blocks), 1), threads


def _is_device_array(a):
    # numba device arrays (real and simulated) carry __cuda_ndarray__; CuPy arrays and torch CUDA
    # tensors carry __cuda_array_interface__ (a CPU torch tensor's property raises AttributeError).
    return getattr(a, "__cuda_ndarray__", False) or hasattr(a, "__cuda_array_interface__")


def apply(rule_name, p, g, states, h, gs, stream=0, *, threads=None, blocks=None):
    """Run ``rule_name`` over flat, equal-length, contiguous 1-D device arrays, in place.

    Arrays may be any objects with ``__cuda_array_interface__`` (numba device arrays, CuPy arrays,
    torch CUDA tensors). ``h`` is the tuple of per-step scalars and ``gs`` = (gradient scale, clip
    value or 0), both already cast to ``p``'s dtype; the kernel takes them as one tuple
    ``h + gs`` (see the module docstring).
    ``stream``: 0/None (default stream), a numba stream, a raw ``cudaStream_t`` handle or a
    CuPy/torch stream. The launch is asynchronous, on ``p``'s device; ``threads``/``blocks``
    override the launch configuration.
    """
    arrays = (p, g, *states)
    for a in arrays:
        if not _is_device_array(a):
            raise TypeError(
                f"fastopt CUDA kernels need device arrays, got {type(a).__name__} "
                "(host arrays would be copied to the device and back on every call)"
            )
    if len(states) != ARITY[rule_name]:
        raise ValueError(f"{rule_name} takes {ARITY[rule_name]} state arrays, got {len(states)}")
    n = math.prod(p.shape)
    if n == 0:
        return
    cuda = _cuda()
    device = launch.launch_device(p)
    with launch.on_device(device):
        nblocks, nthreads = launch_config(n, threads, blocks, device)
        s = launch.as_stream(cuda, stream, device)
        k = launch.configured(kernel(rule_name), nblocks, nthreads, s, device)
        k(p, g, *states, h + gs)


# ---------------------------------------------------------------------------------------------
# Device arrays: zero-copy views, allocation, fill.


def as_device_array(a, device=None):
    """A numba device array viewing ``a``'s memory (zero-copy): numba device arrays as they are,
    objects with ``__cuda_array_interface__`` through ``cuda.as_cuda_array`` (without
    synchronising the stream the interface names), DLPack exporters through
    ``cuda.core``'s ``StridedMemoryView``. TypeError for anything else.

    The view belongs to the context of ``a``'s device: ``device`` when the caller knows it (torch
    and CuPy metadata), else the device that owns the pointer (asked from the driver when the
    machine has several GPUs), so launches over it go to that device."""
    if getattr(a, "__cuda_ndarray__", False):
        return a
    cuda = _cuda()
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        if device is None and launch.gpu_count(cuda) > 1 and cai["data"][0]:
            device = launch.pointer_device(cai["data"][0])
        with launch.on_device(device):
            return cuda.as_cuda_array(a, sync=False)
    if hasattr(a, "__dlpack__"):
        with launch.on_device(device):
            return _from_dlpack(cuda, a)
    raise TypeError(f"{type(a).__name__} is not a CUDA array (no __cuda_array_interface__/DLPack)")


def _from_dlpack(cuda, a):
    from cuda.core.utils import StridedMemoryView

    view = StridedMemoryView.from_dlpack(a, stream_ptr=-1)
    if not view.is_device_accessible:
        raise TypeError(f"{type(a).__name__} is not in device memory")
    strides = view.strides
    itemsize = view.dtype.itemsize
    desc = {
        "shape": tuple(view.shape),
        "strides": None if strides is None else tuple(s * itemsize for s in strides),
        "typestr": view.dtype.str,
        "data": (int(view.ptr), bool(view.readonly)),
        "version": 3,
    }
    # The view owns the DLPack capsule: keep it alive as long as the device array.
    return cuda.from_cuda_array_interface(desc, owner=view, sync=False)


def _fill(a, value):
    for i in indices(a.size):
        a[i] = value


_FILL = []


def fill_kernel():
    """The kernel behind :func:`fill` (built on first use)."""
    if not _FILL:
        with _LOCK:
            if not _FILL:
                _FILL.append(
                    _cuda().jit(rebind(_fill, {"indices": _device_functions()[1]}, "fill"))
                )
    return _FILL[0]


def fill(a, value, stream=0):
    """Set every element of a flat device array to ``value`` (asynchronous, on ``a``'s device)."""
    n = a.size
    if n == 0:
        return
    device = launch.launch_device(a)
    with launch.on_device(device):
        nblocks, nthreads = launch_config(n, device=device)
        s = launch.as_stream(_cuda(), stream, device)
        launch.configured(fill_kernel(), nblocks, nthreads, s, device)(a, a.dtype.type(value))


def _transform(a, gscale, clip):
    for i in indices(a.size):
        a[i] = transformed_grad(a[i], gscale, clip)


_TRANSFORM = []


def transform_kernel():
    """The kernel behind :func:`transform` (built on first use)."""
    if not _TRANSFORM:
        with _LOCK:
            if not _TRANSFORM:
                rules, indices = _device_functions()
                glb = {"indices": indices, "transformed_grad": rules["transformed_grad"]}
                _TRANSFORM.append(_cuda().jit(rebind(_transform, glb, "transform")))
    return _TRANSFORM[0]


def transform(a, gscale, clip=0.0, stream=0):
    """``a = transformed_grad(a, gscale, clip)`` in place on a flat device array (asynchronous):
    ``a * gscale``, then clipped to [-clip, clip] when ``clip > 0``, the rules' own arithmetic
    (``clip_grad_norm``'s scaling and ``clip_grad_value``'s clamp, as torch)."""
    n = a.size
    if n == 0:
        return
    t = a.dtype.type
    device = launch.launch_device(a)
    with launch.on_device(device):
        nblocks, nthreads = launch_config(n, device=device)
        s = launch.as_stream(_cuda(), stream, device)
        launch.configured(transform_kernel(), nblocks, nthreads, s, device)(a, t(gscale), t(clip))


def zeros(n, dtype, stream=0, device=None):
    """A zeroed flat device array of ``n`` elements on ``device`` (None: the current one),
    cudaMalloc'd (256-byte aligned); zeroed on ``stream``."""
    cuda = _cuda()
    with launch.on_device(device):
        a = cuda.device_array(int(n), dtype=dtype, stream=launch.as_stream(cuda, stream, device))
        fill(a, 0, stream)
    return a


# ---------------------------------------------------------------------------------------------
# Reductions: sum of squares in float64 and a non-finite flag (kernels/cpu.py sumsq_and_finite).

# REDUCTION_CHUNK elements per partial sum, as kernels/cpu.py; REDUCTION_THREADS threads per block
# by default (both from kernels/layout.py, which the CUDA C sees as FO_REDUCTION_CHUNK/THREADS).
#
# Reduction templates. ``cuda``, ``np``, ``add``, ``mul``, ``threads``, ``chunk``, ``value`` and
# ``block_reduce`` are globals bound by ``_reduction_globals`` (through ``rebind``). ``value``
# reads an element in float64: ``np.float64`` for float32/float64 arrays, a widening load of the
# bits for 16-bit arrays (``_widened``, over their ``uint16`` view).
#
# Partials: block b takes chunks b, b + gridDim, ...; in chunk c = [lo, hi) thread t sums
# x[lo + t]^2, x[lo + t + T]^2, ... in index order (float64), then the block adds its T sums
# pairwise, s[t] += s[t + half] for half = T/2, T/4, ..., 1, and thread 0 stores the partial of
# chunk c. Finish (one block): the same over the partials. The order of every addition is fixed
# by (n, T) alone: the result is the same for any grid, run to run. ``add``/``mul`` are
# libdevice's explicitly rounded ``dadd_rn``/``dmul_rn`` on a GPU (NVVM would otherwise contract
# a*a + acc into an FMA), so the GPU result equals the CUDA C kernels and the NumPy model bit for
# bit; plain operators under the simulator (Python floats: no contraction either). A value v is
# non-finite when v - v is not 0 (NaN for +-Inf and NaN), as in kernels/cpu.py.


def _block_reduce(s, b, t, acc, flag):
    """Thread t's (acc, flag) into s[0] (pairwise sums, a fixed order) and b[0] (an OR)."""
    s[t] = acc
    b[t] = flag
    cuda.syncthreads()
    half = threads // 2
    while half > 0:
        if t < half:
            s[t] = add(s[t], s[t + half])
            b[t] = b[t] | b[t + half]
        cuda.syncthreads()
        half //= 2


def _sumsq_partials(x, n, sq, bad):
    s = cuda.shared.array(threads, np.float64)
    b = cuda.shared.array(threads, np.int32)
    t = cuda.threadIdx.x
    nchunks = (n + (chunk - 1)) // chunk
    c = np.int64(cuda.blockIdx.x)
    while c < nchunks:
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = 0.0
        flag = 0
        i = lo + t
        while i < hi:
            v = value(x[i])
            acc = add(acc, mul(v, v))
            if v - v != 0.0:
                flag = 1
            i += threads
        block_reduce(s, b, t, acc, flag)
        if t == 0:
            sq[c] = s[0]
            bad[c] = b[0]
        cuda.syncthreads()
        c += cuda.gridDim.x


def _sumsq_finish(sq, bad, m, out):
    s = cuda.shared.array(threads, np.float64)
    b = cuda.shared.array(threads, np.int32)
    t = cuda.threadIdx.x
    acc = 0.0
    flag = 0
    i = np.int64(t)
    while i < m:
        acc = add(acc, sq[i])
        flag = flag | bad[i]
        i += threads
    block_reduce(s, b, t, acc, flag)
    if t == 0:
        out[0] = s[0]
        out[1] = 1.0 if b[0] != 0 else 0.0


_REDUCTIONS = {}


def _widened(u):
    """The float64 value of 16-bit float bits ``u`` (``to_f32`` is bound per format)."""
    return np.float64(to_f32(u))


def _reduction_globals(cuda, add, mul, threads, widen=None):
    """The globals the reduction templates run with (``block_reduce`` compiled for the target;
    ``value`` a widening load of ``widen`` = "bfloat16"/"float16" bits, else ``np.float64``)."""
    import numpy as np

    glb = {"cuda": cuda, "np": np, "add": add, "mul": mul, "threads": threads}
    glb["chunk"] = REDUCTION_CHUNK
    options = {} if _simulating() else {"forceinline": True}
    glb["block_reduce"] = cuda.jit(device=True, **options)(rebind(_block_reduce, glb))
    glb["value"] = np.float64
    if widen is not None:
        from .cuda_storage import helpers

        to_f32 = helpers()["bf16_to_f32" if widen == "bfloat16" else "f16_to_f32"]
        load = rebind(_widened, {"np": np, "to_f32": to_f32}, f"widened_{widen}")
        glb["value"] = cuda.jit(device=True, **options)(load)
    return glb


def reduction_kernels(threads=None, widen=None):
    """(partials, finish) kernels for ``threads`` per block (default REDUCTION_THREADS); with
    ``widen`` ("bfloat16" or "float16") the partials read the ``uint16`` bits of that format."""
    threads = REDUCTION_THREADS if threads is None else int(threads)
    if threads < 1 or threads & (threads - 1):
        raise ValueError(f"reduction threads must be a power of two, got {threads}")
    if widen not in (None, "bfloat16", "float16"):
        raise ValueError(f"widen must be None, 'bfloat16' or 'float16', not {widen!r}")
    ks = _REDUCTIONS.get((threads, widen))
    if ks is None:
        with _LOCK:
            ks = _REDUCTIONS.get((threads, widen))
            if ks is None:
                cuda = _cuda()
                if _simulating():
                    import operator

                    add, mul = operator.add, operator.mul
                else:
                    from numba.cuda import libdevice

                    add, mul = libdevice.dadd_rn, libdevice.dmul_rn
                glb = _reduction_globals(cuda, add, mul, threads, widen)
                ks = tuple(cuda.jit(rebind(fn, glb)) for fn in (_sumsq_partials, _sumsq_finish))
                _REDUCTIONS[(threads, widen)] = ks
    return ks


def sumsq_and_finite(x, stream=0, *, threads=None, blocks=None, widen=None):
    """(sum of squares in float64, all finite?) of a flat device array, deterministic: fixed
    chunks of REDUCTION_CHUNK elements, a fixed-order tree in each block, the partials summed
    in a fixed order by one block on the device. Returns host values, so it waits for the
    two kernels: the result is copied back on ``stream`` and only that stream is synchronised
    (the launch stream: 0/None the default stream, or a handle/stream as for :func:`apply`).
    ``threads`` changes the summation order (it is part of the definition); ``blocks`` does not.
    ``widen`` ("bfloat16"/"float16"): ``x`` holds the bits of that format as ``uint16``."""
    n = int(x.size)
    if n == 0:
        return 0.0, True
    cuda = _cuda()
    threads = REDUCTION_THREADS if threads is None else int(threads)
    partials, finish = reduction_kernels(threads, widen)
    nchunks = -(-n // REDUCTION_CHUNK)
    device = launch.launch_device(x)
    with launch.on_device(device):
        if blocks is None:
            blocks = min(nchunks, BLOCKS_PER_SM * launch.sm_count(cuda, device))
        s = launch.as_stream(cuda, stream, device)
        sc = launch.scratch(cuda, nchunks, device, s)
        launch.configured(partials, max(int(blocks), 1), threads, s, device)(x, n, sc.sq, sc.bad)
        launch.configured(finish, 1, threads, s, device)(sc.sq, sc.bad, nchunks, sc.out)
        host = launch.read_back(sc, s)
    return float(host[0]), bool(host[1] == 0.0)


def available():
    """``(True, description)`` when the CUDA kernels can run here, else ``(False, reason)``.

    Never raises. Initialises the CUDA driver (no context is created).
    """
    try:
        cuda = _cuda()
    except Exception as e:  # numba-cuda or the CUDA bindings missing
        return False, f"numba.cuda cannot be imported: {type(e).__name__}: {e}"
    if getattr(cuda, "implementation", None) != "NVIDIA":  # numba's old built-in target
        return False, "numba.cuda is numba's built-in CUDA target, not numba-cuda"
    try:
        if _simulating():
            return True, "CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
        if not cuda.is_available():
            err = cuda.cuda_error()
            if err:
                return False, "CUDA driver unavailable: " + " ".join(str(err).split())
            return False, "CUDA unavailable: libNVVM not found"
        gpus = list(cuda.gpus)
        if not gpus:
            return False, "no CUDA GPU found"
        try:  # numba-cuda asks NVRTC for the supported architectures before every compile
            from numba.cuda.cudadrv import nvrtc

            nvrtc.get_supported_ccs()
        except (ImportError, AttributeError):  # internal API moved: let the first compile tell
            pass
        except Exception as e:
            return False, "NVRTC unavailable: " + " ".join(f"{type(e).__name__}: {e}".split())
        names = ", ".join(
            f"{g.name.decode() if isinstance(g.name, bytes) else g.name} "
            f"(cc {g.compute_capability[0]}.{g.compute_capability[1]})"
            for g in gpus
        )
        return True, names
    except Exception as e:
        return False, f"CUDA check failed: {type(e).__name__}: {e}"
