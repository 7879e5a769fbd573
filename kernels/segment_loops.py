"""Segment-aware loop templates: per-parameter (per-segment) reductions and the elementwise pass
that reads its segment's scalars, for the per-segment rules of ``rules.py`` (``SEGMENT_RULES``).

A *segment* is one parameter tensor in a flat buffer (a ParamSet's ``offsets``; a plain array is
one segment). A *piece* is a chunk of ``REDUCTION_CHUNK`` elements of a segment, counted from the
segment's start (:func:`pieces`), so the sums of a tensor do not depend on where it lies in the
buffer (a list of arrays and a ParamSet of the same arrays give the same bits). Pieces are the
unit of parallel work, so a step is the same three launches whatever the number of tensors:

1. ``reduce``: per piece, the sums of ``x^2`` and ``y^2`` in float64, where
   ``(x, y) = <rule>_pre(p, g, ...)`` (the parameter and the update, say). The order is fixed:
   lane ``t`` of ``LANES`` adds the elements ``lo + t, lo + t + LANES, ...`` in index order, then
   the lanes are added pairwise (``s[t] += s[t + half]`` for half = LANES/2, ..., 1). Nothing is
   written but the partial sums.
2. ``segment``: per segment, its pieces' partials added in piece order, then
   ``<rule>_segment(sx, sy, flags, st, h) -> (r0, r1, st)``: the segment's scalars (a trust
   ratio, NovoGrad's per-tensor second moment) and its scalar state.
3. ``apply``: per piece, ``<rule>(p, g, *state, h, flags, r0, r1)`` for every element.

On the CPU the rules of ``rules.STORED_UPDATE`` (LAMB) run a variant of 1 and 3: the reduction
also stores each element's update and new state, and the apply pass reads the update back
(the stored-update templates below; same bits, the update's divisions done once).

``reduce`` and ``apply`` take their scalars as one tuple ``hs = (*h, gradient scale, clip)``, as the
loops of ``kernels/loops.py`` do.

The order of every addition depends only on the segment layout and ``LANES``: the CPU templates
(``prange`` over tasks of ``TASK`` pieces, each piece's lanes in a scratch array of its task)
and the CUDA ones (one block of ``LANES`` threads per piece, a shared-memory tree) compute the
same bits, for any thread count or grid.
``add``/``mul`` are the target's explicitly rounded float64 operations (plain operators on the
CPU and under the CUDA simulator, libdevice's ``dadd_rn``/``dmul_rn`` on a GPU); the CPU
templates add each square with ``cpu_math.square_add``, the same bits as ``add(acc, mul(x, x))``
in float64.

Globals bound by ``compile_rules.specialize``: ``pre``, ``segrule``, ``rule``,
``transformed_grad``, ``indices`` (CPU: ``prange`` or ``range``), ``add``, ``mul``, ``np``,
``square_add`` and ``pre_row`` (CPU only), ``cuda`` (CUDA only) and ``LANES``.
"""

import numpy as np

from .layout import REDUCTION_CHUNK, REDUCTION_THREADS

LANES = REDUCTION_THREADS
"""Lanes of each piece's sum (the CUDA block size of the segment kernels)."""
STORED_BLOCK = 8 * LANES
"""Elements per block of the CPU's stored-update reduction (whole lane rows)."""
TASK = 8
"""Pieces per parallel task of the CPU's reductions (their scratch is allocated once per task:
an allocation per piece costs as much as a small piece's arithmetic)."""


def pieces(bounds, chunk=REDUCTION_CHUNK):
    """``(lo, hi, seg, first)`` of the segment layout ``bounds`` (offsets, ``nseg + 1`` of them,
    non-decreasing from 0): int64 arrays with piece ``k`` = ``[lo[k], hi[k])`` of segment
    ``seg[k]``, and segment ``s``'s pieces ``first[s] .. first[s + 1] - 1``."""
    bounds = np.asarray(bounds, np.int64)
    a, b = bounds[:-1], bounds[1:]
    if bounds[0] != 0 or np.any(b < a):
        raise ValueError("segment bounds must start at 0 and not decrease")
    counts = -(-(b - a) // chunk)
    first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    seg = np.repeat(np.arange(a.size, dtype=np.int64), counts)
    lo = a[seg] + (np.arange(first[-1], dtype=np.int64) - first[seg]) * chunk
    hi = np.minimum(lo + chunk, b[seg])
    return lo, hi, seg, first


def has_multi_piece(first):
    """Whether the layout whose ``first`` array (:func:`pieces`) this is has a segment of more
    than one piece (segment ``s`` has ``first[s + 1] - first[s]`` pieces; an empty one has 0)."""
    return bool(np.any(np.diff(first) > 1))


# ---------------------------------------------------------------------------------------------
# CPU templates (one per number of state slots the function takes). Each piece is walked through
# views starting at its first element: with indices known to be non-negative Numba emits no
# wraparound test and the element loops vectorize (6x faster for LAMB's update, same bits).


def _lane_tree(acc, c):
    """``acc[0]`` after the pairwise tree over the lanes, of which only the first ``c`` can be
    non-zero (a piece of fewer than ``LANES`` elements): the additions of a zero lane are left
    out, which changes no bit (the lanes are sums of squares: never -0, so ``x + 0`` is ``x``)
    and spares a small tensor the whole tree."""
    half = LANES // 2
    while half > 0:
        for t in range(c - half):
            acc[t] = add(acc[t], acc[t + half])
        c = min(c, half)
        half //= 2
    return acc[0]


def cpu_reduce0(p, g, hs, flags, lo, hi, seg, out):
    for task in indices((lo.size + TASK - 1) // TASK):
        ax, ay = np.empty(LANES, np.float64), np.empty(LANES, np.float64)  # once per task
        for k in range(task * TASK, min(lo.size, (task + 1) * TASK)):
            f, a, b = flags[seg[k]], lo[k], hi[k]
            for base in range(0, b - a, LANES):
                n = min(LANES, b - a - base)
                pre_row(p[a + base :], g[a + base :], ax, ay, n, base == 0, hs, f)
            out[k, 0] = lane_tree(ax, min(b - a, LANES))
            out[k, 1] = lane_tree(ay, min(b - a, LANES))


def cpu_reduce2(p, g, s0, s1, hs, flags, lo, hi, seg, out):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for task in indices((lo.size + TASK - 1) // TASK):
        ax, ay = np.empty(LANES, np.float64), np.empty(LANES, np.float64)
        xr, yr = np.empty(LANES, p.dtype), np.empty(LANES, p.dtype)
        for k in range(task * TASK, min(lo.size, (task + 1) * TASK)):
            f, a, b = flags[seg[k]], lo[k], hi[k]
            for base in range(0, b - a, LANES):
                i = a + base
                pk, gk, mk, vk = p[i:], g[i:], s0[i:], s1[i:]
                n = min(LANES, b - a - base)
                for t in range(n):
                    tg = transformed_grad(gk[t], gscale, clip)
                    xr[t], yr[t] = pre(pk[t], tg, mk[t], vk[t], h, f)
                add_row(ax, ay, xr, yr, n, base == 0)
            out[k, 0] = lane_tree(ax, min(b - a, LANES))
            out[k, 1] = lane_tree(ay, min(b - a, LANES))


def segment_step(s, first, out, flags, st, r, sums, h):
    """Segment ``s``: its pieces' partials added in piece order, then ``<rule>_segment``."""
    sx = 0.0
    sy = 0.0
    for k in range(first[s], first[s + 1]):
        sx = add(sx, out[k, 0])
        sy = add(sy, out[k, 1])
    r0, r1, v = segrule(sx, sy, flags[s], st[s], h)
    r[s, 0] = r0
    r[s, 1] = r1
    st[s] = v
    sums[s, 0] = sx
    sums[s, 1] = sy


def segment_pass(first, out, flags, st, r, sums, h):
    """Shared by the CPU (``indices`` = range) and CUDA (grid-stride) targets. ``skip_single``
    (bound True for the CPU's fused stored-update reduction, which steps the segments of one
    piece itself): leave those segments alone."""
    for s in indices(flags.size):
        if not (skip_single and first[s + 1] - first[s] == 1):
            segment_step(s, first, out, flags, st, r, sums, h)


def cpu_apply1(p, g, s0, hs, flags, lo, hi, seg, r):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for k in indices(lo.size):
        j = seg[k]
        f = flags[j]
        r0 = r[j, 0]
        r1 = r[j, 1]
        a, b = lo[k], hi[k]
        pk, gk, ak = p[a:b], g[a:b], s0[a:b]
        for i in range(b - a):
            pk[i], ak[i] = rule(pk[i], transformed_grad(gk[i], gscale, clip), ak[i], h, f, r0, r1)


def cpu_apply2(p, g, s0, s1, hs, flags, lo, hi, seg, r):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for k in indices(lo.size):
        j = seg[k]
        f = flags[j]
        r0 = r[j, 0]
        r1 = r[j, 1]
        a, b = lo[k], hi[k]
        pk, gk, mk, vk = p[a:b], g[a:b], s0[a:b], s1[a:b]
        for i in range(b - a):
            pk[i], mk[i], vk[i] = rule(
                pk[i], transformed_grad(gk[i], gscale, clip), mk[i], vk[i], h, f, r0, r1
            )


# Stored-update templates (``rules.STORED_UPDATE``, CPU only): the reduction computes each
# element's update ``y`` once, in the parameter dtype at the full vector width, stores it in the
# scratch ``u`` with the new state, then sums p^2 and y^2 over the piece in the lanes and order of
# ``cpu_reduce2``; the apply pass is ``p - r0 * y`` from ``u``. A segment of one piece (most
# tensors: up to REDUCTION_CHUNK elements) is stepped at once by the reduction, while its update
# is in the cache: its ``segment_step`` (the sums added to 0, as the segment pass adds them) and
# its apply; the segment and apply passes then skip it. The same operations on the same values as
# ``cpu_reduce2`` + ``segment_pass`` + ``cpu_apply2`` (same bits): the divider runs once per
# element instead of twice, the float64 lanes no longer halve the width of the update's
# arithmetic, and most of the buffer is read and written once per step.


def cpu_reduce2_stored(p, g, s0, s1, hs, flags, lo, hi, seg, out, u, first, st, r, sums, h64):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for task in indices((lo.size + TASK - 1) // TASK):
        # allocated once per task (an allocation per piece costs as much as its arithmetic):
        local = np.empty(CHUNK, p.dtype)  # the update of a one-piece segment: never leaves it
        ax = np.empty(LANES, np.float64)
        ay = np.empty(LANES, np.float64)
        for k in range(task * TASK, min(lo.size, (task + 1) * TASK)):
            s = seg[k]
            f = flags[s]
            a, b = lo[k], hi[k]
            whole = first[s + 1] - first[s] == 1
            uw = local[: b - a] if whole else u[a:b]
            c = min(b - a, LANES)  # the lanes this piece fills; the tree ignores the others
            for block in range(0, b - a, STORED_BLOCK):  # a few lane rows at a time, in cache
                e = min(block + STORED_BLOCK, b - a)
                pk, gk = p[a + block : a + e], g[a + block : a + e]
                mk, vk, uk = s0[a + block : a + e], s1[a + block : a + e], uw[block:e]
                for i in range(e - block):
                    uk[i], mk[i], vk[i] = rule(
                        pk[i], transformed_grad(gk[i], gscale, clip), mk[i], vk[i], h, f
                    )
                for base in range(block, e, LANES):
                    add_row(ax, ay, p[a + base :], uw[base:], min(LANES, e - base), base == 0)
            out[k, 0] = lane_tree(ax, c)
            out[k, 1] = lane_tree(ay, c)
            if whole:
                segment_step(s, first, out, flags, st, r, sums, h64)
                apply_stored_piece(p[a:b], uw, r[s, 0])


def _pre_squares(pk, gk, ax, ay, n, first, hs, f):
    """Lanes ``t < n`` of a row of ``cpu_reduce0``: ``(x, y) = pre(...)`` of element ``t``, then
    ``ax[t] += x^2`` and ``ay[t] += y^2`` (assigned on the piece's first row, as
    :func:`_lane_squares` does), in one loop. The rules of ``cpu_reduce0`` (LARS, NovoGrad, the
    plain norms) have a ``pre`` of a few operations, cheaper to recompute in the loop than its
    row of ``(x, y)`` is to store and read back: their reduction takes 5-17% less time over 16M
    elements and over 1000 to 4096-element tensors (A/B in one process, same bits). LAMB's
    stored-update reduction keeps the separate loops: its update needs the full vector width
    of the parameter dtype, which float64 lanes in the same loop would halve."""
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    if first:
        for t in range(n):
            x, y = pre(pk[t], transformed_grad(gk[t], gscale, clip), h, f)
            ax[t] = square_add(0.0, x)
            ay[t] = square_add(0.0, y)
    else:
        for t in range(n):
            x, y = pre(pk[t], transformed_grad(gk[t], gscale, clip), h, f)
            ax[t] = square_add(ax[t], x)
            ay[t] = square_add(ay[t], y)


def _pre_row(pk, gk, ax, ay, n, first, hs, f):
    """:func:`_pre_squares` of a row of ``n`` lanes; a whole row as a loop of constant length
    (as :func:`_add_row`)."""
    if n == LANES:
        pre_squares(pk, gk, ax, ay, LANES, first, hs, f)
    else:
        pre_squares(pk, gk, ax, ay, n, first, hs, f)


def _lane_squares(ax, ay, xr, yr, n, first):
    """Lanes ``t < n`` of a row of a CPU reduction: ``ax[t] += xr[t]^2`` and
    ``ay[t] += yr[t]^2``; the piece's first row (``first``) assigns them instead (the squares
    are never -0, so ``0 + x^2`` is ``x^2``: the lanes need no zeroing)."""
    if first:
        for t in range(n):
            ax[t] = square_add(0.0, xr[t])
            ay[t] = square_add(0.0, yr[t])
    else:
        for t in range(n):
            ax[t] = square_add(ax[t], xr[t])
            ay[t] = square_add(ay[t], yr[t])


def _add_row(ax, ay, xr, yr, n, first):
    """:func:`_lane_squares` of a row of ``n`` lanes; a whole row (``n == LANES``) as a loop of
    constant length, which LLVM compiles to faster code."""
    if n == LANES:
        lane_squares(ax, ay, xr, yr, LANES, first)
    else:
        lane_squares(ax, ay, xr, yr, n, first)


def apply_stored_piece(pk, uk, r0):
    for i in range(pk.size):
        pk[i] = pk[i] - r0 * uk[i]


def cpu_apply_stored(p, u, lo, hi, seg, first, r):
    for k in indices(lo.size):
        s = seg[k]
        if first[s + 1] - first[s] > 1:  # one-piece segments were stepped by the reduction
            apply_stored_piece(p[lo[k] : hi[k]], u[lo[k] : hi[k]], r[s, 0])


CPU_REDUCE = {0: cpu_reduce0, 2: cpu_reduce2}
CPU_APPLY = {1: cpu_apply1, 2: cpu_apply2}
CPU_REDUCE_STORED = {2: cpu_reduce2_stored}


# ---------------------------------------------------------------------------------------------
# CUDA templates: block b takes pieces b, b + gridDim, ...; blockDim.x == LANES.


def cuda_block_sum(s, t):
    """The pairwise tree of the CPU's ``lane_tree`` over shared ``s`` (every thread calls it)."""
    cuda.syncthreads()
    half = LANES // 2
    while half > 0:
        if t < half:
            s[t] = add(s[t], s[t + half])
        cuda.syncthreads()
        half //= 2


def cuda_reduce0(p, g, hs, flags, lo, hi, seg, out):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    sx = cuda.shared.array(LANES, np.float64)
    sy = cuda.shared.array(LANES, np.float64)
    t = cuda.threadIdx.x
    k = np.int64(cuda.blockIdx.x)
    while k < lo.size:
        f = flags[seg[k]]
        ax = 0.0
        ay = 0.0
        i = lo[k] + t
        while i < hi[k]:
            x, y = pre(p[i], transformed_grad(g[i], gscale, clip), h, f)
            xv = np.float64(x)
            yv = np.float64(y)
            ax = add(ax, mul(xv, xv))
            ay = add(ay, mul(yv, yv))
            i += LANES
        sx[t] = ax
        sy[t] = ay
        block_sum(sx, t)
        block_sum(sy, t)
        if t == 0:
            out[k, 0] = sx[0]
            out[k, 1] = sy[0]
        cuda.syncthreads()
        k += cuda.gridDim.x


def cuda_reduce2(p, g, s0, s1, hs, flags, lo, hi, seg, out):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    sx = cuda.shared.array(LANES, np.float64)
    sy = cuda.shared.array(LANES, np.float64)
    t = cuda.threadIdx.x
    k = np.int64(cuda.blockIdx.x)
    while k < lo.size:
        f = flags[seg[k]]
        ax = 0.0
        ay = 0.0
        i = lo[k] + t
        while i < hi[k]:
            x, y = pre(p[i], transformed_grad(g[i], gscale, clip), s0[i], s1[i], h, f)
            xv = np.float64(x)
            yv = np.float64(y)
            ax = add(ax, mul(xv, xv))
            ay = add(ay, mul(yv, yv))
            i += LANES
        sx[t] = ax
        sy[t] = ay
        block_sum(sx, t)
        block_sum(sy, t)
        if t == 0:
            out[k, 0] = sx[0]
            out[k, 1] = sy[0]
        cuda.syncthreads()
        k += cuda.gridDim.x


def cuda_apply1(p, g, s0, hs, flags, lo, hi, seg, r):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    k = np.int64(cuda.blockIdx.x)
    while k < lo.size:
        j = seg[k]
        f = flags[j]
        r0 = r[j, 0]
        r1 = r[j, 1]
        i = lo[k] + cuda.threadIdx.x
        while i < hi[k]:
            p[i], s0[i] = rule(p[i], transformed_grad(g[i], gscale, clip), s0[i], h, f, r0, r1)
            i += cuda.blockDim.x
        k += cuda.gridDim.x


def cuda_apply2(p, g, s0, s1, hs, flags, lo, hi, seg, r):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    k = np.int64(cuda.blockIdx.x)
    while k < lo.size:
        j = seg[k]
        f = flags[j]
        r0 = r[j, 0]
        r1 = r[j, 1]
        i = lo[k] + cuda.threadIdx.x
        while i < hi[k]:
            p[i], s0[i], s1[i] = rule(
                p[i], transformed_grad(g[i], gscale, clip), s0[i], s1[i], h, f, r0, r1
            )
            i += cuda.blockDim.x
        k += cuda.gridDim.x


CUDA_REDUCE = {0: cuda_reduce0, 2: cuda_reduce2}
CUDA_APPLY = {1: cuda_apply1, 2: cuda_apply2}
