"""Vector kernels of L-BFGS on the CPU: dot products fused with the axpys around them.

The two-loop recursion (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Algorithm 7.4) is a
chain of ``q <- q + a*x`` updates each followed by a dot product with the next history vector.
Each kernel here does one such link in ONE pass over memory (the update and the next dot), so an
outer L-BFGS iteration reads each history vector twice and nothing else more than needed.

Every reduction is deterministic and independent of the thread count, as
:func:`fastopt.kernels.cpu.sumsq_and_finite`: fixed chunks of ``REDUCTION_CHUNK`` elements, each
summed in a fixed order in float64, then the partials summed by NumPy in index order (pairwise).
Arrays below ``PARALLEL_THRESHOLD`` elements run the same chunks serially (same result). Arrays are
flat, contiguous, float32 or float64; scalars are Python floats (float64 arithmetic, stored in the
array's dtype).
"""

import numpy as np
from numba import njit, prange, uint64

from .cpu import PARALLEL_THRESHOLD
from .cpu_math import fma as _fma  # torch's add_(x, alpha=a) rounds once: so do the axpys here
from .layout import REDUCTION_CHUNK

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
_INNER = {"fastmath": {"reassoc"}, **_JIT}


def _chunks(n):
    return max(1, -(-n // REDUCTION_CHUNK))


# ---------------------------------------------------------------------------- chunk bodies
# Unsigned loop indices spare Numba's negative-index wraparound (which blocks vectorization);
# reassoc lets LLVM split each chunk's sum over vector lanes, a fixed order for a given build.


@njit(**_INNER)
def _dot_chunk(x, y, lo, hi):
    acc = 0.0
    for i in range(uint64(lo), uint64(hi)):
        acc += np.float64(x[i]) * np.float64(y[i])
    return acc


@njit(**_INNER)
def _update_dot_chunk(q, a, x, h, z, lo, hi):
    # q <- h * (q + a*x), then z . q (q + a*x one fma, as torch's add_(x, alpha=a), then mul)
    acc = 0.0
    for i in range(uint64(lo), uint64(hi)):
        v = q.dtype.type(h * q.dtype.type(_fma(a, np.float64(x[i]), np.float64(q[i]))))
        q[i] = v
        acc += np.float64(z[i]) * np.float64(v)
    return acc


@njit(**_INNER)
def _scale_dot_chunk(out, c, x, z, lo, hi):
    # out <- c * x, then z . out
    acc = 0.0
    for i in range(uint64(lo), uint64(hi)):
        v = out.dtype.type(c * x[i])
        out[i] = v
        acc += np.float64(z[i]) * np.float64(v)
    return acc


@njit(**_INNER)
def _pair_chunk(g, pg, d, t, y, s, lo, hi):
    # y <- g - pg, s <- t*d; returns (y . s, y . y)
    ys = 0.0
    yy = 0.0
    for i in range(uint64(lo), uint64(hi)):
        yv = y.dtype.type(g[i] - pg[i])
        sv = s.dtype.type(d[i] * t)
        y[i] = yv
        s[i] = sv
        ys += np.float64(yv) * np.float64(sv)
        yy += np.float64(yv) * np.float64(yv)
    return ys, yy


# The maxima of |x| are taken over the bit patterns with the sign cleared (unsigned integers of
# the float's width): for floats that order is the order of |x|, a NaN is above every number (so
# it wins, as torch's ``abs().max()`` returns NaN), and an integer max reduction vectorizes, where
# a float max does not without nnan/nsz (which would drop the NaN).


@njit(**_INNER)
def _abs_sum_max_chunk(x, bits, magnitude, lo, hi):
    acc = 0.0
    mx = bits.dtype.type(0)
    for i in range(uint64(lo), uint64(hi)):
        acc += abs(np.float64(x[i]))
        mx = max(mx, bits[i] & magnitude)
    return acc, mx


@njit(**_INNER)
def _axpy_absmax_chunk(p, a, x, bits, magnitude, lo, hi):
    # p <- p + a*x; returns the bits of max |x|
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
