"""CUDA kernels: every rule of ``rules.py`` applied elementwise by a ``numba.cuda.jit`` kernel.

The rules are compiled as ``cuda.jit(device=True, forceinline=True)`` device functions (NVVM-level
``alwaysinline``; Numba-IR-level ``inline="always"`` only helps type inference, not speed). One loop
template per number of state slots; each rule gets its own kernel (``compile_rules.specialize``),
compiled on first use and cached in memory and on disk. The loop is grid-stride over 64-bit indices:
``cuda.grid(1)`` and ``cuda.gridsize(1)`` are int64 in numba-cuda (computed in 64 bits from the
32-bit special registers) and ``p.size`` is intp, so arrays over 2**31 elements are covered.

``numba.cuda`` is imported on first use only, and nothing here touches a device before
``kernel``/``apply`` is called, so ``import fastopt.kernels.cuda`` works on machines without CUDA.
``apply`` only launches: no allocation, no copy, no synchronisation. (numba-cuda views CuPy arrays
and torch tensors through DLPack; an object offering only ``__cuda_array_interface__`` with a
``stream`` entry makes numba-cuda synchronise that stream unless
``NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0``.)

Numerics: without ``fastmath`` NVVM still contracts ``a * b + c`` into fused multiply-adds (its
default ``-fma=1``; numba-cuda offers no switch), so GPU results are bit-identical run to run and
for any launch configuration, but may differ from the CPU kernels in the last bit.
"""

import math
import threading

from .compile_rules import ARITY, compile_rules, specialize

THREADS = 256
"""Threads per block."""
BLOCKS_PER_SM = 32
"""Upper bound on blocks per streaming multiprocessor; the grid-stride loop covers the rest."""
SIMULATOR_SM_COUNT = 1
"""SM count assumed under the CUDA simulator (every simulated thread is a Python thread)."""


def _cuda():
    from numba import cuda

    return cuda


def _simulating():
    try:
        from numba.cuda.core import config
    except Exception:  # pragma: no cover - very old numba-cuda
        import os

        return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    return bool(config.ENABLE_CUDASIM)


# ---------------------------------------------------------------------------------------------
# Loop templates. ``rule`` and ``cuda`` are globals bound by ``specialize``.


def _loop0(p, g, h, gs):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        (p[i],) = rule(p[i], transformed_grad(g[i], gs[0], gs[1]), h)


def _loop1(p, g, s0, h, gs):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i], s0[i] = rule(p[i], transformed_grad(g[i], gs[0], gs[1]), s0[i], h)


def _loop2(p, g, s0, s1, h, gs):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i], s0[i], s1[i] = rule(p[i], transformed_grad(g[i], gs[0], gs[1]), s0[i], s1[i], h)


def _loop3(p, g, s0, s1, s2, h, gs):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i], s0[i], s1[i], s2[i] = rule(
            p[i], transformed_grad(g[i], gs[0], gs[1]), s0[i], s1[i], s2[i], h
        )


_TEMPLATES = (_loop0, _loop1, _loop2, _loop3)
_KERNELS = {}
_RULES = None
_SM_COUNT = {}
_LOCK = threading.Lock()


def _device_rules():
    global _RULES
    if _RULES is None:
        cuda = _cuda()
        if _simulating():
            # The simulator's jit takes no ``forceinline``; its device functions run as Python.
            decorate = cuda.jit(device=True)
        else:
            decorate = cuda.jit(device=True, forceinline=True)
        _RULES = compile_rules(decorate)
    return _RULES


def kernel(rule_name):
    """The CUDA kernel of one rule (built on first use; compiled per dtype on first launch)."""
    k = _KERNELS.get(rule_name)
    if k is None:
        with _LOCK:
            k = _KERNELS.get(rule_name)
            if k is None:
                cuda = _cuda()
                k = specialize(
                    _TEMPLATES[ARITY[rule_name]],
                    rule_name,
                    _device_rules()[rule_name],
                    {"cuda": cuda, "transformed_grad": _device_rules()["transformed_grad"]},
                    cuda.jit(cache=True),
                )
                _KERNELS[rule_name] = k
    return k


def _sm_count(cuda):
    if _simulating():
        return SIMULATOR_SM_COUNT
    dev = cuda.get_current_device()
    n = _SM_COUNT.get(dev.id)
    if n is None:
        n = _SM_COUNT[dev.id] = int(dev.MULTIPROCESSOR_COUNT)
    return n


def launch_config(n, threads=None, blocks=None):
    """``(blocks, threads)`` for ``n`` elements: ``min(ceil(n / threads), BLOCKS_PER_SM * SMs)``."""
    threads = THREADS if threads is None else int(threads)
    if blocks is None:
        blocks = min(-(-n // threads), BLOCKS_PER_SM * _sm_count(_cuda()))
    return max(int(blocks), 1), threads


def _is_device_array(a):
    # numba device arrays (real and simulated) carry __cuda_ndarray__; CuPy arrays and torch CUDA
    # tensors carry __cuda_array_interface__ (a CPU torch tensor's property raises AttributeError).
    return getattr(a, "__cuda_ndarray__", False) or hasattr(a, "__cuda_array_interface__")


def _as_stream(cuda, stream):
    """numba Stream / 0 pass through; a raw handle or a CuPy/torch stream becomes external."""
    if not stream or _simulating():
        return 0
    if isinstance(stream, int):
        return cuda.external_stream(stream)
    for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        handle = getattr(stream, attr, None)
        if isinstance(handle, int):
            return cuda.external_stream(handle) if handle else 0
    return stream


def apply(rule_name, p, g, states, h, gs, stream=0, *, threads=None, blocks=None):
    """Run ``rule_name`` over flat, equal-length, contiguous 1-D device arrays, in place.

    Arrays may be any objects with ``__cuda_array_interface__`` (numba device arrays, CuPy arrays,
    torch CUDA tensors). ``h`` is the tuple of per-step scalars and ``gs`` = (gradient scale, clip
    value or 0), both already cast to ``p``'s dtype.
    ``stream``: 0 (default stream), a numba stream, a raw ``cudaStream_t`` handle or a CuPy/torch
    stream. The launch is asynchronous; ``threads``/``blocks`` override the launch configuration.
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
    nblocks, nthreads = launch_config(n, threads, blocks)
    kernel(rule_name)[nblocks, nthreads, _as_stream(cuda, stream)](p, g, *states, h, gs)


def available():
    """``(True, description)`` when the CUDA kernels can run here, else ``(False, reason)``.

    Never raises. Initialises the CUDA driver (no context is created).
    """
    try:
        cuda = _cuda()
    except Exception as e:  # numba-cuda or the CUDA bindings missing
        return False, f"numba.cuda cannot be imported: {type(e).__name__}: {e}"
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
