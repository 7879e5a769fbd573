"""Roofline kernels: the memory traffic of an optimizer step with trivial arithmetic.

An elementwise optimizer step reads the gradient (read-only) and reads and writes the parameter and
each optimizer-state slot. A kernel with the SAME loads and stores per element and almost no
arithmetic is the ceiling that step can reach on this machine (it is memory-bound), so "fraction of
roofline" = roofline time / optimizer time, measured in the same process on the same arrays.

One loop per shape ``(1 read-only array, n_read_write arrays)``; ``n_read_write`` = 1 + the number
of state slots. Bytes per element = itemsize * (1 + 2 * n_read_write):

=====================================  =====  ===========  =============
optimizer                              slots  read-write   fp32 B/elt
=====================================  =====  ===========  =============
SGD                                    0      p            12
SGD momentum, Adagrad, RMSprop, Lion   1      p, s0        20
Adam, AdamW, Adamax, NAdam, RAdam,     2      p, s0, s1    28
Adadelta, Rprop, Yogi, RMSprop
centered / momentum
AMSGrad, RMSprop centered + momentum   3      p, s0..s2    36
=====================================  =====  ===========  =============

Every kernel computes ``x[i] = x[i] + c * g[i]`` for each read-write array ``x``. ``c`` is a runtime
scalar (of the arrays' dtype), so the compiler cannot drop the loads or stores; the benchmarks pass
``c = 0``, which leaves finite values unchanged, so the roofline can run on an optimizer's own
parameter and state arrays between its steps without disturbing them.
"""

import numpy as np
from numba import njit, prange

_JIT = dict(parallel=True, cache=True, nogil=True)


@njit(**_JIT)
def roofline_rw1(g, p, c):
    """Reads g, p; writes p (SGD's traffic)."""
    for i in prange(p.size):
        p[i] = p[i] + c * g[i]


@njit(**_JIT)
def roofline_rw2(g, p, s0, c):
    """Reads g, p, s0; writes p, s0 (one state slot)."""
    for i in prange(p.size):
        d = c * g[i]
        p[i] = p[i] + d
        s0[i] = s0[i] + d


@njit(**_JIT)
def roofline_rw3(g, p, s0, s1, c):
    """Reads g, p, s0, s1; writes p, s0, s1 (two state slots: Adam)."""
    for i in prange(p.size):
        d = c * g[i]
        p[i] = p[i] + d
        s0[i] = s0[i] + d
        s1[i] = s1[i] + d


@njit(**_JIT)
def roofline_rw4(g, p, s0, s1, s2, c):
    """Reads g, p, s0, s1, s2; writes p, s0, s1, s2 (three state slots: AMSGrad)."""
    for i in prange(p.size):
        d = c * g[i]
        p[i] = p[i] + d
        s0[i] = s0[i] + d
        s1[i] = s1[i] + d
        s2[i] = s2[i] + d


KERNELS = {1: roofline_rw1, 2: roofline_rw2, 3: roofline_rw3, 4: roofline_rw4}
"""n_read_write -> kernel(g, *read_write_arrays, c)."""


def bytes_per_element(state_slots, itemsize=4):
    """Bytes moved per element by a step with ``state_slots`` state arrays and one gradient."""
    n_read_write = 1 + state_slots
    return itemsize * (1 + 2 * n_read_write)


def roofline_step(grad, param, states):
    """A zero-argument callable running the roofline kernel over ``grad`` and ``(param, *states)``.

    All arrays must be 1-D, contiguous, of one dtype and one length.
    """
    arrays = (param, *states)
    for a in arrays:
        if a.shape != grad.shape or a.dtype != grad.dtype or not a.flags.c_contiguous:
            raise ValueError("roofline arrays must be 1-D, contiguous, of one dtype and length")
    try:
        kernel = KERNELS[len(arrays)]
    except KeyError:
        raise ValueError(f"no roofline kernel for {len(arrays)} read-write arrays") from None
    c = grad.dtype.type(0)

    def step():
        kernel(grad, *arrays, c)

    return step


def check_roofline_is_identity(n=1000, dtype=np.float32):
    """True if every kernel leaves finite arrays unchanged with c = 0 (a self-check)."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal(n).astype(dtype)
    ok = True
    for k in KERNELS:
        arrays = [rng.standard_normal(n).astype(dtype) for _ in range(k)]
        before = [a.copy() for a in arrays]
        roofline_step(g, arrays[0], arrays[1:])()
        ok &= all(np.array_equal(a, b) for a, b in zip(arrays, before, strict=True))
    return ok
