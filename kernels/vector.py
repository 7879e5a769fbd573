"""Vector kernels of L-BFGS on the CPU: dot products fused with the axpys around them.

The two-loop recursion (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Algorithm 7.4) is a
chain of ``q <- q + a*x`` updates each followed by a dot product with the next history vector.
Each kernel here does one such link in ONE pass over memory (the update and the next dot), so an
outer L-BFGS iteration reads each history vector twice and nothing else more than needed.

Every reduction adds in a fixed order, whatever the thread count and wherever the arrays sit
in memory: fixed chunks of ``REDUCTION_CHUNK`` elements, each cut into blocks of ``BLOCK``
elements; a block is summed in float64 by a loop that only loads (LLVM splits it over vector
lanes: ``reassoc``), the blocks' sums are added in index order, then the chunks' partials are
summed by NumPy in index order (pairwise). A kernel that also stores (``update_dot``,
``scale_dot``, ``curvature_pair``) first writes a block, then sums the values it stored, read
back from L1: its result is the plain reduction of its output (``update_dot(q, ...)`` returns
``dot(z, q)`` of the updated ``q``, bit for bit). Stores and sums are never in one loop: LLVM
guards such a loop with run-time checks on how far apart the arrays are and falls back to a
scalar loop, which with ``reassoc`` summed in another order, so the result depended on where
the arrays sat (seen for vectors under ~32 elements). The order is fixed for a given build and
CPU (how many lanes LLVM uses depends on the vector width), as that of ``sumsq_and_finite`` in
``kernels/cpu.py``; it is not the GPU kernels' order (``kernels/vector_cuda.py``), whose last
bits differ. Arrays below ``PARALLEL_THRESHOLD`` elements run the same chunks serially (same
result). Arrays are flat, contiguous, float32 or float64; scalars are Python floats (float64
arithmetic, stored in the array's dtype).
"""

import numpy as np
from numba import njit, prange, uint64

from .cpu import PARALLEL_THRESHOLD
from .cpu_math import fma as _fma  # torch's add_(x, alpha=a) rounds once: so do the axpys here
from .layout import REDUCTION_CHUNK

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
_SUM = {"fastmath": {"reassoc"}, **_JIT}  # only for loops that load and sum, never store

BLOCK = 1024
"""Elements per block of a chunk (see the module docstring; part of the summation order): the
block just stored (two float64 outputs: 16 KiB) is still in L1 when it is summed. Chosen from
128-4096 by timing L-BFGS steps (history 10, 1M and 16M elements, float32 and float64) on a
2-core AVX-512 EPYC: among the fastest for both dtypes; against the fused loops with reassoc it
used to have (layout-dependent sums) the step took 0.88-1.02x the time in float32 and
1.04-1.09x in float64 (a second, L1-resident read of each block stored)."""

assert REDUCTION_CHUNK % BLOCK == 0


def _chunks(n):
    return max(1, -(-n // REDUCTION_CHUNK))


# ---------------------------------------------------------------------------- block sums
# Unsigned loop indices spare Numba's negative-index wraparound (which blocks vectorization).
# These loops only load, so LLVM vectorizes each without run-time alias checks: one code path,
# one order of additions for a given build.


@njit(**_SUM)
def _dot_block(x, y, lo, hi):
    acc = 0.0
    for i in range(lo, hi):
        acc += np.float64(x[i]) * np.float64(y[i])
    return acc


@njit(**_SUM)
def _dot_sumsq_block(y, s, lo, hi):
    ys = 0.0
    yy = 0.0
    for i in range(lo, hi):
        yv = np.float64(y[i])
        ys += yv * np.float64(s[i])
        yy += yv * yv
    return ys, yy


# The maxima of |x| are taken over the bit patterns with the sign cleared (unsigned integers of
# the float's width): for floats that order is the order of |x|, a NaN is above every number (so
# it wins, as torch's ``abs().max()`` returns NaN), and an integer max reduction vectorizes, where
# a float max does not without nnan/nsz (which would drop the NaN). An integer max is the same
# in any order.


@njit(**_SUM)
def _abs_sum_max_block(x, bits, magnitude, lo, hi, mx):
    acc = 0.0
    for i in range(lo, hi):
        acc += abs(np.float64(x[i]))
        mx = max(mx, bits[i] & magnitude)
    return acc, mx


# ---------------------------------------------------------------------------- chunk bodies
# Block by block: the stores of a block (their own loop, no reduction: LLVM may pick its vector
# or scalar version at run time, the values are the same), then its sum.


@njit(**_JIT)
def _dot_chunk(x, y, lo, hi):
    acc = 0.0
    for b in range(uint64(lo), uint64(hi), uint64(BLOCK)):
        e = min(b + uint64(BLOCK), uint64(hi))
        acc += _dot_block(x, y, b, e)
    return acc


@njit(**_JIT)
def _update_dot_chunk(q, a, x, h, z, lo, hi):
    # q <- h * (q + a*x), then z . q (q + a*x one fma, as torch's add_(x, alpha=a), then mul)
    acc = 0.0
    for b in range(uint64(lo), uint64(hi), uint64(BLOCK)):
        e = min(b + uint64(BLOCK), uint64(hi))
        for i in range(b, e):
            q[i] = q.dtype.type(h * q.dtype.type(_fma(a, np.float64(x[i]), np.float64(q[i]))))
        acc += _dot_block(z, q, b, e)
    return acc


@njit(**_JIT)
def _scale_dot_chunk(out, c, x, z, lo, hi):
    # out <- c * x, then z . out
    acc = 0.0
    for b in range(uint64(lo), uint64(hi), uint64(BLOCK)):
        e = min(b + uint64(BLOCK), uint64(hi))
        for i in range(b, e):
            out[i] = out.dtype.type(c * x[i])
        acc += _dot_block(z, out, b, e)
    return acc


@njit(**_JIT)
def _pair_chunk(g, pg, d, t, y, s, lo, hi):
    # y <- g - pg, s <- t*d; returns (y . s, y . y)
    ys = 0.0
    yy = 0.0
    for b in range(uint64(lo), uint64(hi), uint64(BLOCK)):
        e = min(b + uint64(BLOCK), uint64(hi))
        for i in range(b, e):
            y[i] = y.dtype.type(g[i] - pg[i])
            s[i] = s.dtype.type(d[i] * t)
        bys, byy = _dot_sumsq_block(y, s, b, e)
        ys += bys
        yy += byy
    return ys, yy


@njit(**_JIT)
def _abs_sum_max_chunk(x, bits, magnitude, lo, hi):
    acc = 0.0
    mx = bits.dtype.type(0)
    for b in range(uint64(lo), uint64(hi), uint64(BLOCK)):
        e = min(b + uint64(BLOCK), uint64(hi))
        s, mx = _abs_sum_max_block(x, bits, magnitude, b, e, mx)
        acc += s
    return acc, mx


@njit(**_JIT)
def _axpy_absmax_chunk(p, a, x, bits, magnitude, lo, hi):
    # p <- p + a*x; returns the bits of max |x| (no float sum)
    mx = bits.dtype.type(0)
    for i in range(uint64(lo), uint64(hi)):
        p[i] = _fma(a, np.float64(x[i]), np.float64(p[i]))
        mx = max(mx, bits[i] & magnitude)
    return mx


# ---------------------------------------------------------------------------- drivers
# Each driver runs its chunk body once per chunk into ``out`` (rows: results, columns: chunks).
# It is compiled twice: with parallel=True (prange over chunks) and without (prange is range),
# the same chunk bodies either way, so the partials are identical.


def _dot_run(n, out, x, y):
    for c in prange(out.shape[1]):
        lo = c * REDUCTION_CHUNK
        out[0, c] = _dot_chunk(x, y, lo, min(lo + REDUCTION_CHUNK, n))


def _update_dot_run(n, out, q, a, x, h, z):
    for c in prange(out.shape[1]):
        lo = c * REDUCTION_CHUNK
        out[0, c] = _update_dot_chunk(q, a, x, h, z, lo, min(lo + REDUCTION_CHUNK, n))


def _scale_dot_run(n, out, o, c_, x, z):
    for c in prange(out.shape[1]):
        lo = c * REDUCTION_CHUNK
        out[0, c] = _scale_dot_chunk(o, c_, x, z, lo, min(lo + REDUCTION_CHUNK, n))


def _pair_run(n, out, g, pg, d, t, y, s):
    for c in prange(out.shape[1]):
        lo = c * REDUCTION_CHUNK
        out[0, c], out[1, c] = _pair_chunk(g, pg, d, t, y, s, lo, min(lo + REDUCTION_CHUNK, n))


def _abs_run(n, out, maxbits, x, bits, m):
    for c in prange(out.shape[1]):
        lo = c * REDUCTION_CHUNK
        out[0, c], maxbits[c] = _abs_sum_max_chunk(x, bits, m, lo, min(lo + REDUCTION_CHUNK, n))


def _axpy_absmax_run(n, maxbits, p, a, x, bits, m):
    for c in prange(maxbits.size):
        lo = c * REDUCTION_CHUNK
        maxbits[c] = _axpy_absmax_chunk(p, a, x, bits, m, lo, min(lo + REDUCTION_CHUNK, n))


def _drivers(run):
    return njit(parallel=True, **_JIT)(run), njit(**_JIT)(run)


_DOT = _drivers(_dot_run)
_UPDATE_DOT = _drivers(_update_dot_run)
_SCALE_DOT = _drivers(_scale_dot_run)
_PAIR = _drivers(_pair_run)
_ABS = _drivers(_abs_run)
_AXPY_ABSMAX = _drivers(_axpy_absmax_run)


def _run(drivers, nout, n, *args):
    out = np.empty((nout, _chunks(n)), np.float64)
    (drivers[0] if n >= PARALLEL_THRESHOLD else drivers[1])(n, out, *args)
    return out


def _bits(x):
    """(``x``'s elements as unsigned integers of their width (a view), the mask that clears
    their sign bit)."""
    if x.dtype.itemsize == 4:
        return x.view(np.uint32), np.uint32(0x7FFFFFFF)
    return x.view(np.uint64), np.uint64(0x7FFFFFFFFFFFFFFF)


def _abs_max_of(maxbits, dtype):
    """The float ``max |x|`` from the per-chunk maxima of the magnitude bits."""
    return float(maxbits.max().view(dtype))


# ---------------------------------------------------------------------------- public API


def dot(x, y):
    """``x . y`` in float64, deterministic for any thread count."""
    return float(np.sum(_run(_DOT, 1, x.size, x, y)[0]))


def update_dot(q, a, x, h, z):
    """``q <- h * (q + a*x)`` in place, then return ``z . q`` (one pass)."""
    return float(np.sum(_run(_UPDATE_DOT, 1, q.size, q, float(a), x, float(h), z)[0]))


def scale_dot(out, c, x, z):
    """``out <- c * x``, then return ``z . out`` (one pass; ``out`` may be ``x``)."""
    return float(np.sum(_run(_SCALE_DOT, 1, out.size, out, float(c), x, z)[0]))


def curvature_pair(g, pg, d, t, y, s):
    """``y <- g - pg``, ``s <- t*d``; return ``(y . s, y . y)`` (one pass): the new L-BFGS pair
    and the two products its acceptance test and the initial Hessian scale need."""
    r = _run(_PAIR, 2, g.size, g, pg, d, float(t), y, s)
    return float(np.sum(r[0])), float(np.sum(r[1]))


def abs_sum_max(x):
    """``(sum |x_i|, max |x_i|)`` in float64 (one pass)."""
    bits, magnitude = _bits(x)
    maxbits = np.empty(_chunks(x.size), bits.dtype)
    r = _run(_ABS, 1, x.size, maxbits, x, bits, magnitude)
    return float(np.sum(r[0])), _abs_max_of(maxbits, x.dtype)


def axpy_absmax(p, a, x):
    """``p <- p + a*x`` in place; return ``max |x_i|`` (one pass)."""
    bits, magnitude = _bits(x)
    maxbits = np.empty(_chunks(p.size), bits.dtype)
    (_AXPY_ABSMAX[0] if p.size >= PARALLEL_THRESHOLD else _AXPY_ABSMAX[1])(
        p.size, maxbits, p, float(a), x, bits, magnitude
    )
    return _abs_max_of(maxbits, x.dtype)


def copy(dst, src):
    """``dst <- src``."""
    np.copyto(dst, src)
