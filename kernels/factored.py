"""Adafactor's factored second moments over a flat buffer of segments: the work layout and the
Numba CPU kernel of its five phases.

A *segment* is one parameter tensor in a flat buffer (a ParamSet's ``offsets``; a plain array is
one segment). A segment of 2 or more dimensions, shape ``(*batch, m, n)``, is *factored*: each of
its ``B = prod(batch)`` matrices keeps ``m`` row and ``n`` column second moments (``row_var``,
``col_var``); a vector or scalar keeps one per element (``variance``). :func:`plan` cuts every
matrix into tiles of at most ``TILE_ROWS x TILE_COLS`` and every vector into pieces of at most
``REDUCTION_CHUNK`` elements, counted from the segment's start, so a tensor's sums do not depend
on where it lies in the buffer (a list of arrays and a ParamSet of the same arrays give the same
bits). Tiles and pieces (*items*) are the unit of parallel work. A step is one kernel call
(:func:`kernel`): first the segments of at most ``WHOLE_ELEMENTS`` (``plan``'s ``whole``), each
stepped through the five phases below by one thread, in one parallel loop over them; then, for
each *wave* of consecutive larger segments (``plan``'s ``waves``), five parallel loops, each
ending in a barrier, whatever the number of tensors:

0. per tile, the partial row sums (one per tile row) and column sums (one per tile column) of
   ``g^2`` in float64, into ``rowpart``/``colpart``;
1. per matrix, each row's partials added in tile order, ``/ n``, lerped into ``row_var``; the
   same for the columns (``/ m``) into ``col_var``; ``bmean`` = max(mean of the new row_var,
   eps1);
2. per item, the unscaled update ``u = g / max(sqrt(v), eps1)`` with
   ``v = row_var * col_var / bmean`` (or the lerped ``variance`` of a vector, stored here)
   into the scratch ``update``, and the sums of ``p^2`` and ``u^2`` in float64;
3. per segment, its items' sums added in item order, then its step
   ``scale = -max(eps2, RMS(p)) * rho / max(1, RMS(u) / d)`` (torch.optim.Adafactor);
4. per item, ``p = p * decay + scale * u``, ``u`` read back from ``update``.

Every element's arithmetic is in the parameter dtype (as torch's), every sum in float64 in an
order that depends only on the segment's shape: identical bits for any thread count. The same
phases on numba-cuda: ``kernels/factored_cuda.py``. A whole segment runs the same operations
on its items, matrices and segment in the same order as a wave would: the same bits.

Speed: one thread over the transformer shapes of bench/ (5.2M float32) spends about half the
step in phase 2, whose two divisions and square root per element (8 lanes at a time; 0.77
ns/element with everything in cache) bound it more than memory; so each element's ``u`` is
computed once, in phase 2, and phase 4 streams it back (4 more bytes written and read per
element, one scratch value per element) instead of computing it again. Phases 0 and 4 are
bound by memory: phase 0 prefetches its rows of ``g`` ``PREFETCH_BYTES`` ahead (without, it
waited on memory as long as it computed) and sums each row's tree three levels per pass;
phase 4 reads 8 and writes 4 bytes per element. Running the phases wave by wave
(``WAVE_ELEMENTS``) keeps what phases 2 and 4 read again in the last-level cache. Measured
(one thread, CPU time, ns/element): phase 0 0.65-0.84 -> 0.45, phase 2 1.05-1.3 -> 1.04-1.14,
phase 4 0.46-0.6 -> 0.47-0.52 (one wave), and the waves take the whole step from 13.8 to
12.4 ms (two threads: 8.7 -> 7.8 ms). The element loops run on slices of the rows (offsets
known to be >= 0) with selects, not branches, so LLVM vectorizes them at the full width of the
parameter dtype. For float32, phase 2's division by the matrix's ``bmean`` is a float64
product with its reciprocal and the sums of squares add each square with one fma
(``cpu_math``: the same bits, no division and no multiply per element): 3.74 -> 3.40-3.45 ms
per step on an AVX-512 Xeon, two threads (bench/test_bench_adafactor.py, two A/B runs).
"""

import math

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from .cpu_math import divide_by_scalar, square_add
from .layout import REDUCTION_CHUNK

TILE_COLS = 256
"""Columns of a tile (a power of two: the lanes of the per-item sums)."""
TILE_ROWS = max(1, REDUCTION_CHUNK // TILE_COLS)
VECTOR_CHUNK = REDUCTION_CHUNK

# Columns of the item table (one row per tile or vector piece).
KIND, SEG, LO, ROWS, COLS, LD, RV, CV, BATCH, RP, CP, NCB, NRB, VO = range(14)
ITEM_FIELDS = 14
# Columns of the batch table (one row per matrix of a factored segment).
B_RV, B_M, B_CV, B_N, B_RP, B_CP, B_NCB, B_NRB = range(8)
BATCH_FIELDS = 8
# Columns of the whole table (one row per segment stepped by one thread): the segment, its first
# and past-the-last item and batch, and its elements.
H_SEG, H_I0, H_I1, H_B0, H_B1, H_SIZE = range(6)
WHOLE_FIELDS = 6
WHOLE_ELEMENTS = 1 << 17
"""Segments of at most this many elements are stepped *whole*: all five phases by one thread,
the segments shared among the threads in one parallel loop, instead of in the waves' five
barriered loops (a small tensor's few items split over threads cost more in barriers than
in arithmetic; one thread keeps its ``g``, ``p`` and ``update`` in its own cache). Over the
transformer shapes of bench/ (its blocks' tensors whole, 2^14 to 2^16 elements; the embedding and
the output layer in waves): 5-9% less time with two threads and 5-10% less CPU time with one
than all in waves; a bound of 2^14 (the 16384-element matrices in waves) gained less."""
# Columns of the wave table: the first and past-the-last item, batch and segment of a wave.
W_I0, W_I1, W_B0, W_B1, W_S0, W_S1 = range(6)
WAVE_FIELDS = 6
WAVE_ELEMENTS = 1 << 19
"""Elements of a *wave*: consecutive segments that run the five phases before the next ones
(a segment larger than this is a wave alone), so that what phase 2 and 4 read again is still
in the last-level cache (about 12 bytes per float32 element: ``p``, ``g``, ``update``). Over
the transformer shapes of bench/ (two threads) 2^19 beat 2^17, 2^18, 2^20 and one wave."""
PARALLEL_THRESHOLD = 1 << 15
"""Buffers with fewer elements run the serial kernel (a parallel launch costs more than them)."""
PREFETCH_BYTES = 1 << 14
"""How far ahead of a row (in bytes) phase 0 asks for the cache lines of ``g`` it will read next:
with the hardware's prefetch alone it waited on memory as long as it computed (its time was
their sum). Phase 2 gained nothing from it and took 20 s longer to compile."""
CACHE_LINE = 64
# The element scalars ``h`` (parameter dtype): gsign, w, 1 - w, eps1, eps1^2, decay, 1. The kernel
# takes them with the gradient's (scale, clip) as one tuple ``hs = (*h, gscale, clip)``.
H_FIELDS = ("gsign", "w", "one_minus_w", "eps1", "eps1_sq", "decay", "one")
# The segment scalars ``h64`` (float64): eps2, rho, d.
H64_FIELDS = ("eps2", "rho", "d")


def factored(shape):
    """True when a tensor of ``shape`` keeps row and column factors (2 or more dimensions)."""
    return len(shape) >= 2


def state_sizes(shapes):
    """(rows, cols, vector elements): the lengths of ``row_var``, ``col_var`` and ``variance``
    of a buffer of tensors of ``shapes``: m + n values per matrix, one per vector element."""
    r = c = v = 0
    for shape in shapes:
        if factored(shape):
            b = math.prod(shape[:-2])
            r += b * shape[-2]
            c += b * shape[-1]
        else:
            v += math.prod(shape)
    return r, c, v


def plan(shapes):
    """The work layout of a flat buffer holding tensors of ``shapes`` back to back (in order,
    from element 0): a dict of int64 tables ``items`` (tiles and pieces, segment by segment),
    ``batches`` (one row per matrix), ``first`` (segment ``s``'s items are ``first[s] ..
    first[s + 1] - 1``), ``numel``, ``whole`` (the segments of at most ``WHOLE_ELEMENTS``,
    largest first, each stepped by one thread on the CPU) and ``waves`` (the other segments,
    consecutive runs of them grouped by ``WAVE_ELEMENTS``): the order in which the CPU kernel
    runs them (the sums do not depend on it), and the sizes
    ``rows``, ``cols``, ``vector``, ``rowpart``, ``colpart``."""
    items, batches, first, numel, waves, whole = [], [], [0], [], [], []
    wave = [0, 0, 0, 0, 0, 0]  # as W_I0, W_I1, ...: the wave being filled
    wave_size, wave_open = 0, False
    lo = rv = cv = vo = rp = cp = 0
    for s, shape in enumerate(shapes):
        size = math.prod(shape)
        b_first = len(batches)
        if factored(shape):
            m, n = shape[-2], shape[-1]
            nb = math.prod(shape[:-2])
            nrb, ncb = -(-m // TILE_ROWS), -(-n // TILE_COLS)
            for b in range(nb):
                q = len(batches)
                batches.append((rv, m, cv, n, rp, cp, ncb, nrb))
                base = lo + b * m * n
                for rb in range(nrb):
                    r0 = rb * TILE_ROWS
                    for cb in range(ncb):
                        c0 = cb * TILE_COLS
                        items.append(
                            (
                                1,
                                s,
                                base + r0 * n + c0,
                                min(TILE_ROWS, m - r0),
                                min(TILE_COLS, n - c0),
                                n,
                                rv + r0,
                                cv + c0,
                                q,
                                rp + r0 * ncb + cb,
                                cp + c0 * nrb + rb,
                                ncb,
                                nrb,
                                0,
                            )
                        )
                rv, cv = rv + m, cv + n
                rp, cp = rp + m * ncb, cp + n * nrb
        else:
            for k0 in range(0, size, VECTOR_CHUNK):
                k1 = min(size, k0 + VECTOR_CHUNK)
                items.append((0, s, lo + k0, 1, k1 - k0, 0, 0, 0, 0, 0, 0, 0, 0, vo + k0))
            vo += size
        lo += size
        if size <= WHOLE_ELEMENTS:
            whole.append((s, first[-1], len(items), b_first, len(batches), size))
        else:
            if wave_open and (wave_size + size > WAVE_ELEMENTS or wave[W_S1] != s):
                waves.append(tuple(wave))
                wave_open = False
            if not wave_open:  # a wave runs consecutive segments, none of them whole
                wave, wave_size, wave_open = [first[-1], 0, b_first, 0, s, 0], 0, True
            wave[W_I1], wave[W_B1], wave[W_S1] = len(items), len(batches), s + 1
            wave_size += size
        first.append(len(items))
        numel.append(size)
    return {
        "items": np.array(items, np.int64).reshape(-1, ITEM_FIELDS),
        "batches": np.array(batches, np.int64).reshape(-1, BATCH_FIELDS),
        "first": np.array(first, np.int64),
        "numel": np.array(numel, np.int64),
        "waves": np.array(waves + [tuple(wave)] * wave_open, np.int64).reshape(-1, WAVE_FIELDS),
        "whole": np.array(sorted(whole, key=lambda r: -r[H_SIZE]), np.int64).reshape(
            -1, WHOLE_FIELDS
        ),
        "rows": rv,
        "cols": cv,
        "vector": vo,
        "rowpart": rp,
        "colpart": cp,
    }


# ---------------------------------------------------------------------------------------------
# The phases (compiled on first use, cached on disk; numba's cache follows this file).

_inline = njit(inline="always", cache=True, error_model="numpy")
_helper = njit(cache=True, error_model="numpy")


@intrinsic
def _prefetch(typingctx, a, i):
    """LLVM's prefetch (for a read, into every cache level) of the element ``i`` of array ``a``:
    a hint that never faults, whatever ``i``; no bounds are checked."""

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        ptr = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(a, i), codegen


@_inline
def _ahead(a, start, count):
    """Prefetch the cache lines of ``a[start:start + count]`` shifted ``PREFETCH_BYTES`` ahead."""
    ahead = PREFETCH_BYTES // a.itemsize
    for q in range(0, count, CACHE_LINE // a.itemsize):
        _prefetch(a, start + ahead + q)


@_inline
def _grad(g, hs):
    """``transformed_grad``: ``g * gscale``, then clipped to [-clip, clip] (``gscale``, ``clip``
    = ``hs[-2]``, ``hs[-1]``; :func:`step` passes ``clip = inf`` for no clipping). Selects, not
    branches, so the element loops vectorize; NaN stays NaN."""
    x = g * hs[-2]
    clip = hs[-1]
    x = -clip if x < -clip else x
    return clip if x > clip else x


@_inline
def _lerp(a, b, w, one_minus_w):
    """torch.lerp: ``a + w (b - a)`` for w < 0.5, else ``b - (b - a)(1 - w)``."""
    if w < 0.5:
        return a + w * (b - a)
    return b - (b - a) * one_minus_w


@_inline
def _update(g, v, h):
    """torch's ``rsqrt(clamp_min(v, eps1^2)) * g`` for the ascent-signed gradient ``g``
    (NaN stays NaN)."""
    v = h[4] if v < h[4] else v
    return (h[6] / np.sqrt(v)) * (h[0] * g)


@_inline
def _pow2(n):
    """The least power of two >= n."""
    m = 1
    while m < n:
        m *= 2
    return m


@_inline
def _tree(t, n):
    """The sum of ``t[:n]`` (``n`` a power of two) by pairwise halving, ``t[j] += t[j + half]``
    for half = n/2, ..., 1; the order depends on ``n`` alone. Three levels per pass over ``t``
    while n >= 64 (``t[j]`` = the sum of its eight terms in the tree's order), two while
    n >= 16, the last levels on scalars: the same additions with fewer loads, stores and loop
    starts than a pass per level. Writes ``t[:n/4]`` at most."""
    while n >= 16:
        if n >= 64:
            e = n // 8
            for j in range(e):
                a = (t[j] + t[j + 4 * e]) + (t[j + 2 * e] + t[j + 6 * e])
                b = (t[j + e] + t[j + 5 * e]) + (t[j + 3 * e] + t[j + 7 * e])
                t[j] = a + b
        else:
            e = n // 4
            for j in range(e):
                t[j] = (t[j] + t[j + 2 * e]) + (t[j + e] + t[j + 3 * e])
        n = e
    if n == 8:
        return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]))
    if n == 4:
        return (t[0] + t[2]) + (t[1] + t[3])
    if n == 2:
        return t[0] + t[1]
    return t[0]


@_inline
def _tile_partials(k, g, hs, items, rowpart, colpart):
    """Row and column sums of g^2 over tile ``k``: each row's squares summed by :func:`_tree`,
    each column's added row by row.

    Inlined into the kernel: compiled as a function of its own (as the other phases are), the
    kernel loaded from numba's disk cache, as every run but the first loads it, took 8-10%
    longer per step than the same kernel compiled in the process (AMD EPYC Zen 4, the
    transformer shapes of bench/, two threads: 4.0-4.3 ms against 3.6-3.9 ms); inlined, the
    cached kernel runs as fast, for 1.5 s more compile time. Inlining every phase gained no
    more and compiled for 25 s."""
    lo, rows, cols, ld = items[k, LO], items[k, ROWS], items[k, COLS], items[k, LD]
    rp, cp, ncb, nrb = items[k, RP], items[k, CP], items[k, NCB], items[k, NRB]
    n = _pow2(cols)
    t = np.zeros(n, np.float64)
    col = np.zeros(cols, np.float64)
    for i in range(rows):
        _ahead(g, lo + i * ld, cols)
        gr = g[lo + i * ld : lo + i * ld + cols]  # slices: unsigned offsets, the loops vectorize
        for j in range(cols):
            x = np.float64(_grad(gr[j], hs))
            t[j] = x * x
            col[j] += x * x
        rowpart[rp + i * ncb] = _tree(t, n)  # writes t[:n/4] only: t[cols:] stays 0
    for j in range(cols):
        colpart[cp + j * nrb] = col[j]


@_helper
def _factor_update(q, batches, rowpart, colpart, row_var, col_var, bmean, h):
    rv, m, cv, n = batches[q, B_RV], batches[q, B_M], batches[q, B_CV], batches[q, B_N]
    rp, cp, ncb, nrb = batches[q, B_RP], batches[q, B_CP], batches[q, B_NCB], batches[q, B_NRB]
    acc = 0.0
    for i in range(m):
        s = 0.0
        for c in range(ncb):
            s += rowpart[rp + i * ncb + c]
        r = _lerp(row_var[rv + i], row_var.dtype.type(s / n), h[1], h[2])
        row_var[rv + i] = r
        acc += np.float64(r)
    mean = bmean.dtype.type(acc / m)
    bmean[q] = mean if mean >= h[3] or mean != mean else h[3]
    for j in range(n):
        s = 0.0
        for c in range(nrb):
            s += colpart[cp + j * nrb + c]
        col_var[cv + j] = _lerp(col_var[cv + j], col_var.dtype.type(s / m), h[1], h[2])


@_inline
def _add_squares(ap, au, pr, ur, n):
    """Lane ``j`` of ``ap`` and ``au`` += ``pr[j]^2`` and ``ur[j]^2`` in float64, j < ``n``."""
    for j in range(n):
        ap[j] = square_add(ap[j], pr[j])
        au[j] = square_add(au[j], ur[j])


@_helper
def _item_sums(k, p, g, hs, items, row_var, col_var, bmean, variance, update, part):
    """Item ``k``'s unscaled update ``u`` into ``update`` (a vector's lerped ``variance`` stored
    too), and its sums of p^2 and u^2: element ``j`` of each tile row (of each run of
    ``TILE_COLS`` elements of a vector piece) into lane ``j``, then :func:`_tree` over the
    lanes; the order depends on the item's shape alone. Each row's ``u`` is computed in one
    loop in the parameter dtype and squared in another, so both vectorize at full width."""
    lo, rows, cols, ld = items[k, LO], items[k, ROWS], items[k, COLS], items[k, LD]
    n = _pow2(cols) if items[k, KIND] == 1 else TILE_COLS
    ap = np.zeros(n, np.float64)
    au = np.zeros(n, np.float64)
    if items[k, KIND] == 1:
        rv, cv, bm = items[k, RV], items[k, CV], bmean[items[k, BATCH]]
        cr = col_var[cv : cv + cols]
        for i in range(rows):
            e = lo + i * ld  # slices below: offsets known >= 0, so the loops vectorize
            gr, ur, r = g[e : e + cols], update[e : e + cols], row_var[rv + i]
            for j in range(cols):
                ur[j] = _update(_grad(gr[j], hs), divide_by_scalar(r * cr[j], bm), hs)
            _add_squares(ap, au, p[e : e + cols], ur, cols)
    else:
        vo = items[k, VO]
        for base in range(0, cols, n):
            c = min(n, cols - base)
            e, o = lo + base, vo + base
            gr, ur, vr = g[e : e + c], update[e : e + c], variance[o : o + c]
            for j in range(c):
                gj = _grad(gr[j], hs)
                v = _lerp(vr[j], gj * gj, hs[1], hs[2])
                vr[j] = v
                ur[j] = _update(gj, v, hs)
            _add_squares(ap, au, p[e : e + c], ur, c)
    part[k, 0] = _tree(ap, n)
    part[k, 1] = _tree(au, n)


@_helper
def _segment_scale(s, first, numel, part, h64, scale):
    sp = 0.0
    su = 0.0
    for k in range(first[s], first[s + 1]):
        sp += part[k, 0]
        su += part[k, 1]
    n = numel[s]
    if n == 0:
        scale[s] = 0.0
        return
    root = math.sqrt(n)
    alpha = max(h64[0], math.sqrt(sp) / root) * h64[1]
    scale[s] = -alpha / max(1.0, math.sqrt(su) / (root * h64[2]))


@_helper
def _item_apply(k, p, hs, items, update, scale):
    """``p = p * decay + scale * u`` over item ``k``, ``u`` its stored unscaled update."""
    lo, rows, cols, ld = items[k, LO], items[k, ROWS], items[k, COLS], items[k, LD]
    a = scale[items[k, SEG]]
    decay = hs[5]
    for i in range(rows):
        e = lo + i * ld
        pr, ur = p[e : e + cols], update[e : e + cols]
        for j in range(cols):
            pr[j] = pr[j] * decay + a * ur[j]


indices = range
"""The loop range of :func:`_phases` (rebound to ``prange`` in the parallel kernel)."""


def _phases(p, g, hs, h64, items, batches, first, numel, waves, whole, threads, rowpart,
            colpart, row_var, col_var, bmean, variance, update, part, scale):  # fmt: skip
    """Stage 0: the ``whole`` segments (largest first), each by one thread: the ``nt`` tasks take
    them in snake order (task 0, 1, ..., nt - 1, then nt - 1, ..., 0, ...) so that the tasks'
    elements differ by about one segment at most. Then the five phases in order, wave by wave
    (``waves``). Every stage is one run of the same loop over ``indices`` (``prange`` or
    ``range``, bound by :func:`kernel`), whose end is a barrier before the next stage: one
    parallel loop in the code, compiled once, not one per phase."""
    nw = whole.shape[0]
    nt = max(1, min(threads, nw))
    for stage in range(-1, 5 * waves.shape[0]):
        w, phase = stage // 5, stage % 5
        lo, hi = 0, nt
        if stage >= 0:
            lo, hi = waves[w, W_I0], waves[w, W_I1]
            if phase == 1:
                lo, hi = waves[w, W_B0], waves[w, W_B1]
            elif phase == 3:
                lo, hi = waves[w, W_S0], waves[w, W_S1]
        for t in indices(lo, hi):
            k = np.int64(t)  # a prange index may be unsigned: int64 arithmetic below
            if stage < 0:
                for r0 in range(0, nw, nt):
                    r = r0 + (k if (r0 // nt) % 2 == 0 else nt - 1 - k)
                    if r < nw:  # the five phases of one wave over segment whole[r] alone:
                        _whole_segment(r, p, g, hs, h64, items, batches, first, numel, whole,
                                       rowpart, colpart, row_var, col_var, bmean, variance,
                                       update, part, scale)  # fmt: skip
            elif phase == 0:
                if items[k, KIND] == 1:
                    _tile_partials(k, g, hs, items, rowpart, colpart)
            elif phase == 1:
                _factor_update(k, batches, rowpart, colpart, row_var, col_var, bmean, hs)
            elif phase == 2:
                _item_sums(k, p, g, hs, items, row_var, col_var, bmean, variance, update, part)
            elif phase == 3:
                _segment_scale(k, first, numel, part, h64, scale)
            else:
                _item_apply(k, p, hs, items, update, scale)


@_inline
def _whole_segment(r, p, g, hs, h64, items, batches, first, numel, whole, rowpart, colpart,
                   row_var, col_var, bmean, variance, update, part, scale):  # fmt: skip
    """The five phases over segment ``whole[r]`` alone, by the calling thread: the same
    operations on its items, matrices and segment, in the same order, as in a wave."""
    i0, i1, b0, b1 = whole[r, H_I0], whole[r, H_I1], whole[r, H_B0], whole[r, H_B1]
    for k in range(i0, i1):
        if items[k, KIND] == 1:
            _tile_partials(k, g, hs, items, rowpart, colpart)
    for q in range(b0, b1):
        _factor_update(q, batches, rowpart, colpart, row_var, col_var, bmean, hs)
    for k in range(i0, i1):
        _item_sums(k, p, g, hs, items, row_var, col_var, bmean, variance, update, part)
    _segment_scale(whole[r, H_SEG], first, numel, part, h64, scale)
    for k in range(i0, i1):
        _item_apply(k, p, hs, items, update, scale)


_KERNELS = {}


def kernel(parallel):
    """:func:`_phases` compiled with ``numba.njit`` (``prange`` loops, without loop fusion, when
    ``parallel``; serial loops else), on first use, cached on disk."""
    k = _KERNELS.get(parallel)
    if k is None:
        from .compile_rules import rebind

        glb = dict(globals(), indices=prange if parallel else range)
        name = "adafactor_phases" + ("" if parallel else "_serial")
        options = {"fusion": False} if parallel else False
        k = njit(parallel=options, cache=True, nogil=True, error_model="numpy")(
            rebind(_phases, glb, name)
        )
        _KERNELS[parallel] = k
    return k


# ---------------------------------------------------------------------------------------------
# Launch


def scratch(layout, dtype, update=None):
    """The per-step scratch arrays of a buffer with ``layout`` (:func:`plan`) and parameters of
    ``dtype``: ``rowpart``, ``colpart``, ``part`` (float64), ``bmean``, ``scale`` and
    ``update``: each element's unscaled update, computed once (for its RMS) and applied from
    there, one value per element; the first elements of ``update`` when given (a buffer of
    ``dtype`` shared by buffers updated one after the other), else a new array."""
    size = int(layout["numel"].sum())
    if update is None or update.size < size:
        update = np.empty(size, dtype)
    return {
        "update": update[:size],
        "rowpart": np.zeros(layout["rowpart"]),
        "colpart": np.zeros(layout["colpart"]),
        "part": np.zeros((layout["items"].shape[0], 2)),
        "bmean": np.zeros(layout["batches"].shape[0], dtype),
        "scale": np.zeros(layout["numel"].size, dtype),
    }


def step(p, g, row_var, col_var, variance, h, h64, gs, layout, work):
    """One Adafactor update of the flat buffer ``p`` with gradient ``g`` in place: the five
    phases of :func:`kernel` in one call. ``h``: the element scalars ``H_FIELDS`` and ``gs`` the
    gradient (scale, clip), both in the parameter dtype; ``h64``: ``H64_FIELDS`` in float64;
    ``work``: :func:`scratch`. A clip of 0 (none) reaches the kernel as ``inf``."""
    scale, clip = gs
    if not clip > 0:
        clip = type(clip)(np.inf)
    kernel(p.size >= PARALLEL_THRESHOLD)(
        p, g, h + (scale, clip), h64,
        layout["items"], layout["batches"], layout["first"], layout["numel"], layout["waves"],
        layout["whole"], get_num_threads(), work["rowpart"], work["colpart"], row_var, col_var,
        work["bmean"], variance, work["update"], work["part"], work["scale"],
    )  # fmt: skip
