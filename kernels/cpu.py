"""CPU kernels: every rule of ``rules.py`` applied elementwise by a ``numba.njit(parallel=True)`` loop.

The loop templates of ``kernels/loops.py`` (shared with ``cuda.py``); each rule gets its own
compiled, disk-cached copy (``compile_rules.loop_kernel``), twice: a ``prange`` loop for large
arrays and a serial loop (the same template with ``indices`` bound to ``range``) below
``PARALLEL_THRESHOLD`` elements, where waking threads costs more than it saves and, with another
OpenMP runtime in the process (torch's), can stall for milliseconds. ``error_model="numpy"``
everywhere: IEEE results for x/0 and sqrt(-1) (as torch), and no per-element exception checks,
which would block vectorization. Elementwise updates touch each element once, in any order, so
the result is bit-identical for any thread count. Indices are ``prange`` over ``p.size`` (int64).
"""

import numba
import numpy as np
from numba import njit, prange, uint64

from . import cpu_math
from .compile_rules import compile_rules, loop_kernel
from .layout import REDUCTION_CHUNK

_RULES = compile_rules(
    njit(inline="always", cache=True, error_model="numpy"), cpu_math.RULE_HELPERS
)

PARALLEL_THRESHOLD = 1 << 15
"""Arrays with fewer elements run the serial loop."""

_KERNELS = {}
_SERIAL_KERNELS = {}


def kernel(rule_name, parallel=True):
    """The compiled loop of one rule (compiled on first use, then cached on disk)."""
    cache = _KERNELS if parallel else _SERIAL_KERNELS
    k = cache.get(rule_name)
    if k is None:
        k = loop_kernel(
            rule_name,
            _RULES,
            prange if parallel else range,
            njit(parallel=parallel, cache=True, nogil=True, error_model="numpy"),
            variant="" if parallel else "_serial",
        )
        cache[rule_name] = k
    return k


def apply(rule_name, p, g, states, h, gs):
    """Run ``rule_name`` over flat, equal-length, contiguous 1-D arrays, in place.

    ``h`` is the tuple of per-step scalars and ``gs`` = (gradient scale, clip value or 0), both
    already cast to ``p``'s dtype; the kernel takes them as one tuple ``h + gs``.
    """
    if p.size >= PARALLEL_THRESHOLD:
        k = _KERNELS.get(rule_name) or kernel(rule_name)
    else:
        k = _SERIAL_KERNELS.get(rule_name) or kernel(rule_name, parallel=False)
    k(p, g, *states, h + gs)


# ---------------------------------------------------------------------------------------------
# Reductions and plain kernels shared by the utilities and the benchmarks.

# Fixed chunks of REDUCTION_CHUNK elements (kernels/layout.py), each summed in a fixed order, then
# the partials summed pairwise by NumPy: the result does not depend on the number of threads.


@njit(fastmath={"reassoc"}, cache=True, nogil=True, error_model="numpy")
def _chunk_sumsq(x, lo, hi):
    # Unsigned indices spare Numba's negative-index wraparound, which blocks vectorization.
    # reassoc lets LLVM split the sums over vector lanes: a fixed order for a given build, so the
    # result is still identical run to run and for any thread count. No nnan/ninf: the
    # non-finite sum (v - v is 0 for finite v, NaN for inf/NaN) must survive.
    sq = 0.0
    nonfinite = 0.0
    for i in range(uint64(lo), uint64(hi)):
        v = np.float64(x[i])
        sq += v * v
        nonfinite += v - v
    return sq, nonfinite


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _sumsq_partials(x, sq, bad):
    n = x.size
    for c in prange(sq.size):
        lo = c * REDUCTION_CHUNK
        sq[c], nonfinite = _chunk_sumsq(x, lo, min(lo + REDUCTION_CHUNK, n))
        bad[c] = nonfinite != 0.0


@njit(cache=True, nogil=True, error_model="numpy")
def _sumsq_small(x):
    sq, nonfinite = _chunk_sumsq(x, 0, x.size)
    return sq, nonfinite != 0.0


def sumsq_and_finite(x):
    """(sum of squares in float64, all finite?) of a flat array, deterministic for any thread count."""
    if x.size <= REDUCTION_CHUNK:  # one chunk: the same partial the parallel path would compute
        sq, bad = _sumsq_small(x)
        return float(sq), not bad
    nchunks = -(-x.size // REDUCTION_CHUNK)
    sq = np.empty(nchunks, np.float64)
    bad = np.empty(nchunks, np.int8)
    _sumsq_partials(x, sq, bad)
    return float(np.sum(sq)), not bad.any()


@njit(parallel=True, cache=True, nogil=True)
def roofline_copy(dst, src_a, src_b):
    """Loads two arrays, stores one: the memory traffic pattern the update kernels are judged by."""
    for i in prange(dst.size):
        dst[i] = src_a[i] + src_b[i]


def threading_layer():
    """Numba's active threading layer (launching the pool if it is not running yet)."""
    try:
        return numba.threading_layer()
    except ValueError:
        roofline_copy(np.zeros(1), np.zeros(1), np.zeros(1))
        return numba.threading_layer()
