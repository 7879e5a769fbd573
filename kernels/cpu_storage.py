"""CPU kernels for arrays stored in another dtype than the rule computes in (bfloat16, float16,
mixed gradient dtypes, float32 master weights, bfloat16 state, stochastic rounding).

The storage loops of ``kernels/loops.py`` with the element access of ``kernels/access.py``, one
compiled, disk-cached kernel per (rule, storage combination), parallel and serial as in
``cpu.py`` (same threshold). The float32 and float64 kernels of ``cpu.py`` are not touched: a
combination for which ``access.is_plain`` holds runs them. 16-bit arrays are passed as ``uint16``
views of their bits. Also the deterministic sum of squares of 16-bit gradients (the global norm).
"""

import numpy as np
from numba import njit, prange, uint64

from . import access, block_loops
from .compile_rules import convert_kernel, rebind, storage_loop_kernel
from .cpu import _RULES, PARALLEL_THRESHOLD
from .layout import REDUCTION_CHUNK
from .storage import compile_storage

_HELPER_DECORATOR = njit(inline="always", error_model="numpy")
_STORAGE = None
_KERNELS = {}


def _storage_helpers():
    global _STORAGE
    if _STORAGE is None:
        _STORAGE = compile_storage(_HELPER_DECORATOR, "cpu")
    return _STORAGE


def kernel(rule_name, storage, parallel=True):
    """The compiled storage loop of ``rule_name`` for ``storage`` (an ``access.Storage``)."""
    key = (rule_name, storage, parallel)
    k = _KERNELS.get(key)
    if k is None:
        k = storage_loop_kernel(
            rule_name,
            storage,
            _RULES,
            access.bind(storage, _storage_helpers(), _HELPER_DECORATOR),
            prange if parallel else range,
            njit(parallel=parallel, cache=True, nogil=True, error_model="numpy"),
            variant="" if parallel else "_serial",
        )
        _KERNELS[key] = k
    return k


def bits(a):
    """``a`` as the kernels take it: 16-bit floats as a ``uint16`` view of their bits."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def apply(rule_name, storage, p, g, states, master, h, gs, rs):
    """Run ``rule_name`` over flat, equal-length, contiguous arrays stored as ``storage`` says,
    in place. ``master``: the float32 master copy of ``p`` (None without); ``h`` and ``gs`` are
    cast to the compute dtype; ``rs`` = (seed, step, index of p[0] in the parameter set).
    8-bit state (``storage.state == "int8"``) runs the block loops of ``block_loops.py``."""
    if storage.state == "int8":
        return block_loops.apply(rule_name, storage, p, g, states, master, h, gs, rs)
    parallel = p.size >= PARALLEL_THRESHOLD
    k = _KERNELS.get((rule_name, storage, parallel)) or kernel(rule_name, storage, parallel)
    pb = bits(p)
    w = pb if master is None else master
    k(pb, w, bits(g), *[bits(s) for s in states], h + gs, rs)


_CONVERTERS = {}


def convert(dst, src, rs=None, word=0):
    """``dst[...] = src`` for flat, equal-length host arrays of the storage dtypes: exact when
    ``dst`` holds every value of ``src``, else rounded to nearest even, or, with ``rs`` =
    (seed, step, index of ``src[0]`` among the optimizer's parameters), stochastically with
    word ``word`` (0-3) of each element's ``random_bits4`` (the word the storage loops use:
    0 for the parameter, 1 + j for state slot j)."""
    c = access.conversion(dst.dtype, src.dtype, dst.size, src.size, rs, word)
    parallel = dst.size >= PARALLEL_THRESHOLD
    key = (c.dst, c.src, c.stochastic, parallel)
    k = _CONVERTERS.get(key)
    if k is None:
        element_access = access.bind_convert(
            c.dst, c.src, c.stochastic, _storage_helpers(), _HELPER_DECORATOR
        )
        k = _CONVERTERS[key] = convert_kernel(
            c.dst,
            c.src,
            c.stochastic,
            element_access,
            prange if parallel else range,
            njit(parallel=parallel, cache=True, nogil=True, error_model="numpy"),
            "" if parallel else "_serial",
        )
    k(bits(dst), bits(src), c.rs, c.word)


# ---------------------------------------------------------------------------------------------
# Sum of squares of 16-bit arrays: the chunks and the order of cpu.sumsq_and_finite.


def _chunk_sumsq16(x, lo, hi):
    sq = 0.0
    nonfinite = 0.0
    for i in range(uint64(lo), uint64(hi)):
        v = np.float64(widen(x[i]))  # noqa: F821
        sq += v * v
        nonfinite += v - v
    return sq, nonfinite


def _sumsq16_partials(x, sq, bad):
    n = x.size
    for c in prange(sq.size):
        lo = c * REDUCTION_CHUNK
        sq[c], nonfinite = chunk_sumsq(x, lo, min(lo + REDUCTION_CHUNK, n))  # noqa: F821
        bad[c] = nonfinite != 0.0


_REDUCTIONS = {}


def _reductions(name):
    """(chunk, partials) sum-of-squares kernels for 16-bit storage ``name``."""
    fns = _REDUCTIONS.get(name)
    if fns is None:
        helpers = _storage_helpers()
        widen = helpers["bf16_to_f32" if name == "bfloat16" else "f16_to_f32"]
        short = access.SHORT[name]
        glb = {"np": np, "uint64": uint64, "prange": prange, "REDUCTION_CHUNK": REDUCTION_CHUNK}
        glb["widen"] = widen
        chunk = njit(fastmath={"reassoc"}, nogil=True, error_model="numpy")(
            rebind(_chunk_sumsq16, glb, f"chunk_sumsq_{short}")
        )
        glb["chunk_sumsq"] = chunk
        partials = njit(parallel=True, nogil=True, error_model="numpy")(
            rebind(_sumsq16_partials, glb, f"sumsq_partials_{short}")
        )
        fns = _REDUCTIONS[name] = (chunk, partials)
    return fns


def sumsq_and_finite(x):
    """(sum of squares in float64, all finite?) of a flat bfloat16 or float16 array, with the
    chunks and order of ``cpu.sumsq_and_finite`` (deterministic for any thread count)."""
    name = "float16" if x.dtype == np.float16 else "bfloat16"
    chunk, partials = _reductions(name)
    xb = x.view(np.uint16)
    if x.size <= REDUCTION_CHUNK:
        sq, nonfinite = chunk(xb, 0, xb.size)
        return float(sq), nonfinite == 0.0
    nchunks = -(-x.size // REDUCTION_CHUNK)
    sq = np.empty(nchunks, np.float64)
    bad = np.empty(nchunks, np.int8)
    partials(xb, sq, bad)
    return float(np.sum(sq)), not bad.any()
