"""CuPy launchers of the per-segment rules (LAMB, LARS, NovoGrad, segment norms): the kernels of
``segment_kernels.cu`` (the rules of ``segment_rules.cuh``) compiled by NVRTC through
``cupy.RawModule``, with the contract of ``kernels/segment_cpu.py`` and ``segment_cuda.py``.

Same three launches and the same order of every float64 addition as numba-cuda's segment
kernels (one block of ``LANES`` threads per piece, thread ``t`` summing ``lo + t, lo + t + T,
...``, the pairwise tree over the block; the pieces of a segment added in piece order), and the
rules rounded as numba-cuda's compilation of ``rules.py`` rounds them (see
``segment_rules.cuh``), so CuPy and numba-cuda give the same bits.

Arrays are flat, C-contiguous ``cupy.ndarray``: the parameter, gradient and states of one dtype
(float32 or float64) on one device; the layout (:func:`to_device` of ``segment_loops.pieces``),
``flags`` (int32), ``out`` and ``sums`` (float64, two per piece / segment), ``r`` (two per
segment) and ``st`` (one per segment, the parameter's dtype) on that device. Every launch goes to
that device and to ``stream`` (None: CuPy's current stream); nothing synchronises.
"""

import inspect

import numpy as np

from . import cupy as kcupy
from . import rules, segment_loops

KERNEL_SOURCE = "segment_kernels.cu"
COMPILE_OPTIONS = ("--fmad=true",)
"""ptxas may contract the rules' unrounded mul/add as the driver's JIT does numba-cuda's PTX."""
BLOCKS = 1024
"""At most this many blocks; each takes pieces b, b + BLOCKS, ... (the grid changes no result)."""
SEGMENT_THREADS = 128

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def source():
    """The CUDA source handed to NVRTC: ``segment_kernels.cu`` with its headers inlined (a stale
    ``rules_layout.cuh`` is refused)."""
    return kcupy._inline(KERNEL_SOURCE)


_module = kcupy.RawModuleCache(source, COMPILE_OPTIONS)


def kernel_name(rule_name, launch, dtype):
    """``fo_seg_<rule>_<reduce|segment|apply>_<f32|f64>``."""
    return f"fo_seg_{rule_name}_{launch}_{_SUFFIX[np.dtype(dtype)]}"


def kernel_names():
    """Every kernel of the module."""
    names = set()
    for rule_name in rules.SEGMENT_RULES:
        for dtype in _SUFFIX:
            launches = ("reduce", "segment") + (
                ("apply",) if rules.SEGMENT_RULES[rule_name] else ()
            )
            names |= {kernel_name(rule_name, launch, dtype) for launch in launches}
    return names


def check(rule_name, p, g, states=None):
    """TypeError/ValueError naming the problem unless ``p``, ``g`` and ``states`` (None: not
    allocated yet) fit the segment kernels of ``rule_name`` (checked before any launch)."""
    if rule_name not in rules.SEGMENT_RULES:
        raise KeyError(f"unknown per-segment rule {rule_name!r}")
    nslots = rules.SEGMENT_RULES[rule_name]
    states = () if states is None else tuple(states)
    if states and len(states) != nslots:
        raise ValueError(f"{rule_name} takes {nslots} state arrays, got {len(states)}")
    kcupy.check_flat_arrays((p, g, *states), p.size, "segment")


def to_device(host, like, stream=None):
    """A flat ``cupy.ndarray`` copy of the NumPy array ``host`` on ``like``'s device."""
    from . import vector_cupy

    return vector_cupy.to_device(np.ascontiguousarray(host).ravel(), like.data.device_id, stream)


def pre_arity(rule_name):
    """State slots that ``<rule>_pre(p, g, *state, h, flags)`` reads."""
    return len(inspect.signature(getattr(rules, f"{rule_name}_pre")).parameters) - 4


def _scalars(h, dtype):
    return kcupy._scalars(h, np.dtype(dtype))


def _null():
    return np.uint64(0)


def _launch(name, p, grid, block, args, stream):
    import cupy

    device = p.data.device_id
    stream = kcupy.as_stream(stream, device)
    with cupy.cuda.Device(device):
        k = _module.function(cupy, device, name)
        if stream is None:
            k(grid, block, args)
        else:
            with stream:  # RawKernel launches go to the current stream
                k(grid, block, args)


def reduce(rule_name, p, g, states, h, gs, flags, layout, out, stream=None):
    """Launch 1 (see ``segment_cpu.reduce``): ``out[2k], out[2k + 1]`` the sums of piece k."""
    lo, hi, seg, _ = layout
    if lo.size == 0:
        return
    dt = p.dtype.type
    pre = tuple(states)[: pre_arity(rule_name)]
    slots = tuple(pre) + (_null(),) * (2 - len(pre))
    args = (p, g, *slots, _scalars(h, p.dtype), dt(gs[0]), dt(gs[1]))
    args += (flags, lo, hi, seg, np.int64(lo.size), out)
    grid = (min(lo.size, BLOCKS),)
    name = kernel_name(rule_name, "reduce", p.dtype)
    _launch(name, p, grid, (segment_loops.LANES,), args, stream)


def segment(rule_name, p, flags, layout, out, st, r, sums, h64, stream=None):
    """Launch 2 (see ``segment_cpu.segment``): one thread per segment."""
    n = flags.size
    if n == 0:
        return
    grid = (min(-(-n // SEGMENT_THREADS), BLOCKS),)
    args = (layout[3], out, flags, np.int64(n), st, r, sums, _scalars(h64, np.float64))
    _launch(kernel_name(rule_name, "segment", p.dtype), p, grid, (SEGMENT_THREADS,), args, stream)


def apply(rule_name, p, g, states, h, gs, flags, layout, r, stream=None):
    """Launch 3 (see ``segment_cpu.apply``): one block per piece."""
    lo, hi, seg, _ = layout
    if lo.size == 0:
        return
    dt = p.dtype.type
    slots = tuple(states) + (_null(),) * (2 - len(states))
    args = (p, g, *slots, _scalars(h, p.dtype), dt(gs[0]), dt(gs[1]))
    args += (flags, lo, hi, seg, np.int64(lo.size), r)
    grid = (min(lo.size, BLOCKS),)
    name = kernel_name(rule_name, "apply", p.dtype)
    _launch(name, p, grid, (segment_loops.LANES,), args, stream)
