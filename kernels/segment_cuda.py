"""numba-cuda launchers of the per-segment rules: the CUDA templates of
``kernels/segment_loops.py`` (one block of ``LANES`` threads per piece), with the contract of
``kernels/segment_cpu.py``. The layout arrays (``segment_loops.pieces``), ``flags``, ``out``,
``st``, ``r`` and ``sums`` are device arrays (:func:`to_device`). Every launch goes to ``p``'s
device and to ``stream`` (a handle or stream; 0/None the default stream: the optimizers pass the
step's). Launches only: nothing synchronises.

Under the CUDA simulator the results equal the CPU kernels bit for bit (same order of every
addition, plain IEEE operators). On a GPU the float64 sums use libdevice's explicitly rounded
``dadd_rn``/``dmul_rn``; the rules themselves may be contracted into FMAs by NVVM (see
``kernels/cuda.py``), so the values summed can differ from the CPU's in the last bit.
"""

import threading

import numpy as np

from . import cuda_launch as launch
from . import rules, segment_loops
from .compile_rules import compile_rules, rebind, specialize
from .cuda import BLOCKS_PER_SM, _cuda, _simulating
from .segment_cpu import _TAG, pre_arity

_KERNELS = {}
_COMPILED = []
_LOCK = threading.Lock()


def _grid_stride(n):
    return range(cuda.grid(1), n, cuda.gridsize(1))


def _compiled():
    if not _COMPILED:
        cuda = _cuda()
        if _simulating():
            import operator

            decorate = cuda.jit(device=True)
            add, mul = operator.add, operator.mul
        else:
            from numba.cuda import libdevice

            decorate = cuda.jit(device=True, forceinline=True)
            add, mul = libdevice.dadd_rn, libdevice.dmul_rn
        glb = {"cuda": cuda, "np": np, "LANES": segment_loops.LANES, "add": add, "mul": mul}
        glb["skip_single"] = False
        glb["block_sum"] = decorate(rebind(segment_loops.cuda_block_sum, glb, "block_sum"))
        glb["indices"] = decorate(rebind(_grid_stride, {"cuda": cuda}))
        _COMPILED.append((compile_rules(decorate), glb, decorate))
    return _COMPILED[0]


def kernels(rule_name):
    """(reduce, segment, apply or None) CUDA kernels of a per-segment rule."""
    ks = _KERNELS.get(rule_name)
    if ks is None:
        with _LOCK:
            ks = _KERNELS.get(rule_name)
            if ks is None:
                compiled, glb, device = _compiled()
                jit = _cuda().jit(cache=True)
                variant = f"_seg{_TAG}_cuda"
                extra = dict(glb, transformed_grad=compiled["transformed_grad"])
                extra["pre"] = compiled[f"{rule_name}_pre"]
                extra["segrule"] = compiled[f"{rule_name}_segment"]
                extra["segment_step"] = device(rebind(segment_loops.segment_step, extra))
                reduce_t = segment_loops.CUDA_REDUCE[pre_arity(rule_name)]
                red = specialize(reduce_t, rule_name, None, extra, jit, variant)
                seg = specialize(segment_loops.segment_pass, rule_name, None, extra, jit, variant)
                app = None
                if rule_name in compiled:
                    apply_t = segment_loops.CUDA_APPLY[rules.SEGMENT_RULES[rule_name]]
                    app = specialize(apply_t, rule_name, compiled[rule_name], extra, jit, variant)
                ks = _KERNELS[rule_name] = (red, seg, app)
    return ks


def to_device(host, like, stream=0):
    """A device copy of the NumPy array ``host`` on the device of the device array ``like``,
    uploaded on ``stream`` (the launches that read it go there too)."""
    cuda = _cuda()
    device = launch.launch_device(like)
    with launch.on_device(device):
        s = launch.as_stream(cuda, stream, device)
        return cuda.to_device(np.ascontiguousarray(host), stream=s)


def _blocks(n, device=None):
    return max(1, min(int(n), BLOCKS_PER_SM * launch.sm_count(_cuda(), device)))


def _run(k, n, threads, p, stream, args):
    """``k`` over ``n`` blocks of ``threads`` on ``p``'s device and ``stream``."""
    device = launch.launch_device(p)
    with launch.on_device(device):
        s = launch.as_stream(_cuda(), stream, device)
        k[_blocks(n, device), threads, s](*args)


def reduce(rule_name, p, g, states, h, gs, flags, layout, out, stream=0):
    """Launch 1 (see ``segment_cpu.reduce``)."""
    lo, hi, seg, _ = layout
    if lo.size == 0:
        return
    args = (p, g, *states[: pre_arity(rule_name)], h + gs, flags, lo, hi, seg, out)
    _run(kernels(rule_name)[0], lo.size, segment_loops.LANES, p, stream, args)


def segment(rule_name, p, flags, layout, out, st, r, sums, h64, stream=0):
    """Launch 2 (see ``segment_cpu.segment``): one thread per segment."""
    n = flags.size
    threads = 128
    args = (layout[3], out, flags, st, r, sums, h64)
    _run(kernels(rule_name)[1], -(-n // threads), threads, p, stream, args)


def apply(rule_name, p, g, states, h, gs, flags, layout, r, stream=0):
    """Launch 3 (see ``segment_cpu.apply``): one block per piece."""
    lo, hi, seg, _ = layout
    if lo.size == 0:
        return
    args = (p, g, *states, h + gs, flags, lo, hi, seg, r)
    _run(kernels(rule_name)[2], lo.size, segment_loops.LANES, p, stream, args)
