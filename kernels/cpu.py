"""CPU kernels: every rule of ``rules.py`` applied elementwise by a ``numba.njit(parallel=True)`` loop.

One loop template per number of state slots; each rule gets its own compiled, disk-cached copy
(``compile_rules.specialize``). Elementwise updates touch each element once, in any order, so the
result is bit-identical for any thread count. Indices are ``prange`` over ``p.size`` (int64).
"""

import numba
import numpy as np
from numba import njit, prange

from .compile_rules import ARITY, compile_rules, specialize

_RULES = compile_rules(njit(inline="always", cache=True, fastmath=False))


def _loop0(p, g, h):
    for i in prange(p.size):
        (p[i],) = rule(p[i], g[i], h)  # noqa: F821 (bound by specialize)


def _loop1(p, g, s0, h):
    for i in prange(p.size):
        p[i], s0[i] = rule(p[i], g[i], s0[i], h)  # noqa: F821


def _loop2(p, g, s0, s1, h):
    for i in prange(p.size):
        p[i], s0[i], s1[i] = rule(p[i], g[i], s0[i], s1[i], h)  # noqa: F821


def _loop3(p, g, s0, s1, s2, h):
    for i in prange(p.size):
        p[i], s0[i], s1[i], s2[i] = rule(p[i], g[i], s0[i], s1[i], s2[i], h)  # noqa: F821


_TEMPLATES = (_loop0, _loop1, _loop2, _loop3)
_KERNELS = {}


def kernel(rule_name):
    """The compiled parallel loop of one rule (compiled on first use, then cached on disk)."""
    k = _KERNELS.get(rule_name)
    if k is None:
        template = _TEMPLATES[ARITY[rule_name]]
        k = specialize(
            template,
            rule_name,
            _RULES[rule_name],
            {"prange": prange},
            njit(parallel=True, cache=True, nogil=True),
        )
        _KERNELS[rule_name] = k
    return k


def apply(rule_name, p, g, states, h):
    """Run ``rule_name`` over flat, equal-length, contiguous 1-D arrays, in place.

    ``h`` is the tuple of per-step scalars, already cast to ``p``'s dtype.
    """
    k = _KERNELS.get(rule_name) or kernel(rule_name)
    k(p, g, *states, h)


# ---------------------------------------------------------------------------------------------
# Reductions and plain kernels shared by the utilities and the benchmarks.


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
