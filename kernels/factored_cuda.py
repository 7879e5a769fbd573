"""Adafactor's factored second moments on numba-cuda: the five phases of ``kernels/factored.py``
as five ``numba.cuda`` kernels, one launch each whatever the number of tensors, over the same
work layout (``factored.plan``, its tables copied to the device by :func:`device_layout`).

Every kernel takes its items (tiles and vector pieces), matrices or segments block-stride (or
grid-stride) and computes what the CPU loop of the same phase computes, in the same order:

0. one block per tile: lane ``j`` is column ``j``; each row's squares of ``g`` go to shared
   memory (zero from ``cols`` to ``pow2(cols)``) and are summed by ``factored._tree``'s pairwise
   halving (``s[j] += s[j + half]``, a barrier per level); each column's sum is added row by row
   in its lane;
1. one block per matrix: the row factors in parallel (each row's partials in tile order), then
   their mean by one thread in row order, then the column factors in parallel;
2. one block per item: lane ``j`` of each tile row (of each run of ``TILE_COLS`` elements of a
   vector piece) computes ``u`` into ``update`` and adds ``p^2`` and ``u^2`` to its lane, then
   the lanes are summed by the same tree;
3. one thread per segment: ``factored._segment_scale`` itself, the items' sums in item order;
4. one block per item: ``p = p * decay + scale * u``.

A block's threads take the lanes ``t, t + blockDim, ...`` (``TILE_COLS`` threads on a GPU, a few
under the simulator, which runs every CUDA thread as a Python thread): the order of every
addition depends on the layout alone, never on the launch. The element arithmetic is the CPU's
own (``factored._grad``, ``_lerp`` compiled as device functions, ``_update`` as
:func:`rsqrt_update`), in the parameter dtype; the sums are float64.

Numerics: under the CUDA simulator every value equals numba-cpu's bit for bit. On a GPU the
float64 sums use libdevice's explicitly rounded ``dadd_rn``/``dmul_rn`` (never contracted), but
NVVM may contract the parameter-dtype ``a * b + c`` of the lerp and the update into fused
multiply-adds (see ``kernels/cuda.py``), so a value may differ from the CPU in its last bit.
Launches only: nothing synchronises.
"""

import hashlib
import math
import pathlib
import threading

import numpy as np

from . import cuda_launch as launch
from . import factored
from .compile_rules import rebind
from .cuda import BLOCKS_PER_SM
from .factored import (
    B_CP,
    B_CV,
    B_M,
    B_N,
    B_NCB,
    B_NRB,
    B_RP,
    B_RV,
    BATCH,
    COLS,
    CP,
    CV,
    KIND,
    LD,
    LO,
    NCB,
    NRB,
    ROWS,
    RP,
    RV,
    SEG,
    TILE_COLS,
    VO,
)

LANES = TILE_COLS
"""Lanes of every block sum (the CPU's lane arrays): a tile row's columns, a vector run."""
THREADS = TILE_COLS
"""Threads per block on a GPU: one per lane."""
SIMULATOR_THREADS = 4
"""Threads per block under the CUDA simulator (each takes every 4th lane: same bits)."""
TABLES = ("items", "batches", "first", "numel")
"""The int64 tables of a layout that live on the device."""

TAG = hashlib.sha256(
    b"".join((pathlib.Path(__file__).parent / f).read_bytes() for f in ("factored.py", __file__))
).hexdigest()[:8]
"""Part of every kernel's name: Numba's disk cache watches neither ``factored.py`` (the device
functions' source) nor the globals bound here."""


# ---------------------------------------------------------------------------------------------
# Device functions and kernels (templates: ``cuda``, ``add``, ``mul``, ``sqrt``, ``grad``,
# ``lerp``, ``rsqrt_update``, ``pow2``, ``add_square``, ``block_tree`` and ``segment_scale`` are
# globals bound by ``rebind``).
# ruff: noqa: F821


def block_tree(s, n):
    """``factored._tree`` over shared ``s[:n]`` (``n`` a power of two <= ``LANES``): every
    thread calls it; thread ``t`` adds the lanes ``t, t + blockDim, ...`` below ``half`` at each
    level, a barrier before each level and after the last. The sum is ``s[0]``, for thread 0
    (the owner of lane 0) to read."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    cuda.syncthreads()
    half = n // 2
    while half > 0:
        for j in range(t, half, nt):
            s[j] = add(s[j], s[j + half])
        cuda.syncthreads()
        half //= 2


def add_square(s, j, a):
    """Lane ``j`` of ``s`` += ``a``^2, in float64 (``factored._add_squares``'s lane sum)."""
    x = np.float64(a)
    s[j] = add(s[j], mul(x, x))


def rsqrt_update(g, v, h):
    """``factored._update`` with the target's square root (``math.sqrt`` compiled, which
    numba-cuda takes for float32 too; ``np.sqrt`` under the simulator, in the value's dtype)."""
    v = h[4] if v < h[4] else v
    return (h[6] / sqrt(v)) * (h[0] * g)


def tile_partials(g, hs, items, rowpart, colpart):
    """Phase 0: per tile, each row's sum of g^2 (:func:`block_tree`) and each column's."""
    sq = cuda.shared.array(LANES, np.float64)
    col = cuda.shared.array(LANES, np.float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    k = np.int64(cuda.blockIdx.x)
    while k < items.shape[0]:
        if items[k, KIND] == 1:  # the same for the whole block: its barriers are reached by all
            lo, rows, cols, ld = items[k, LO], items[k, ROWS], items[k, COLS], items[k, LD]
            rp, cp, ncb, nrb = items[k, RP], items[k, CP], items[k, NCB], items[k, NRB]
            n = pow2(cols)
            for j in range(t, cols, nt):
                col[j] = 0.0
            for i in range(rows):
                e = lo + i * ld
                for j in range(t, n, nt):
                    if j < cols:
                        x = np.float64(grad(g[e + j], hs))
                        sq[j] = mul(x, x)
                        add_square(col, j, x)
                    else:
                        sq[j] = 0.0
                block_tree(sq, n)
                if t == 0:
                    rowpart[rp + i * ncb] = sq[0]
            for j in range(t, cols, nt):
                colpart[cp + j * nrb] = col[j]
        k += cuda.gridDim.x


def factor_update(batches, rowpart, colpart, row_var, col_var, bmean, hs):
    """Phase 1: per matrix, the row factors (rows in parallel), their mean in row order (one
    thread), the column factors (columns in parallel): ``factored._factor_update``."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    q = np.int64(cuda.blockIdx.x)
    while q < batches.shape[0]:
        rv, m, cv, n = batches[q, B_RV], batches[q, B_M], batches[q, B_CV], batches[q, B_N]
        rp, cp = batches[q, B_RP], batches[q, B_CP]
        ncb, nrb = batches[q, B_NCB], batches[q, B_NRB]
        for i in range(t, m, nt):
            s = 0.0
            for c in range(ncb):
                s = add(s, rowpart[rp + i * ncb + c])
            row_var[rv + i] = lerp(row_var[rv + i], row_var.dtype.type(s / n), hs[1], hs[2])
        cuda.syncthreads()
        if t == 0:
            acc = 0.0
            for i in range(m):
                acc = add(acc, np.float64(row_var[rv + i]))
            mean = bmean.dtype.type(acc / m)
            bmean[q] = mean if mean >= hs[3] or mean != mean else hs[3]
        for j in range(t, n, nt):
            s = 0.0
            for c in range(nrb):
                s = add(s, colpart[cp + j * nrb + c])
            col_var[cv + j] = lerp(col_var[cv + j], col_var.dtype.type(s / m), hs[1], hs[2])
        q += cuda.gridDim.x


def item_sums(p, g, hs, items, row_var, col_var, bmean, variance, update, part):
    """Phase 2: per item, ``u`` into ``update`` (a vector's lerped ``variance`` stored too) and
    the sums of p^2 and u^2 by lane, then :func:`block_tree`: ``factored._item_sums``."""
    sp = cuda.shared.array(LANES, np.float64)
    su = cuda.shared.array(LANES, np.float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    k = np.int64(cuda.blockIdx.x)
    while k < items.shape[0]:
        lo, rows, cols, ld = items[k, LO], items[k, ROWS], items[k, COLS], items[k, LD]
        tile = items[k, KIND] == 1
        n = pow2(cols) if tile else LANES
        for j in range(t, n, nt):
            sp[j] = 0.0
            su[j] = 0.0
        if tile:
            rv, cv, bm = items[k, RV], items[k, CV], bmean[items[k, BATCH]]
            for i in range(rows):
                e = lo + i * ld
                r = row_var[rv + i]
                for j in range(t, cols, nt):
                    u = rsqrt_update(grad(g[e + j], hs), r * col_var[cv + j] / bm, hs)
                    update[e + j] = u
                    add_square(sp, j, p[e + j])
                    add_square(su, j, u)
        else:
            vo = items[k, VO]
            for base in range(0, cols, LANES):
                for j in range(t, min(LANES, cols - base), nt):
                    e, o = lo + base + j, vo + base + j
                    gj = grad(g[e], hs)
                    v = lerp(variance[o], gj * gj, hs[1], hs[2])
                    variance[o] = v
                    u = rsqrt_update(gj, v, hs)
                    update[e] = u
                    add_square(sp, j, p[e])
                    add_square(su, j, u)
        block_tree(sp, n)
        block_tree(su, n)
        if t == 0:
            part[k, 0] = sp[0]
            part[k, 1] = su[0]
        k += cuda.gridDim.x


def segment_scales(first, numel, part, h64, scale):
    """Phase 3: one thread per segment, ``factored._segment_scale``."""
    for s in range(cuda.grid(1), numel.size, cuda.gridsize(1)):
        segment_scale(s, first, numel, part, h64, scale)


def item_apply(p, hs, items, update, scale):
    """Phase 4: per item, ``p = p * decay + scale * u``: ``factored._item_apply``."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    k = np.int64(cuda.blockIdx.x)
    while k < items.shape[0]:
        lo, rows, cols, ld = items[k, LO], items[k, ROWS], items[k, COLS], items[k, LD]
        a = scale[items[k, SEG]]
        decay = hs[5]
        for i in range(rows):
            e = lo + i * ld
            for j in range(t, cols, nt):
                p[e + j] = p[e + j] * decay + a * update[e + j]
        k += cuda.gridDim.x


PHASES = (tile_partials, factor_update, item_sums, segment_scales, item_apply)
_KERNELS = []
_LOCK = threading.Lock()


def _globals():
    """The globals of the templates: ``cuda``, the float64 ``add``/``mul`` of the target, the
    layout's columns and the device functions."""
    cuda = launch._cuda()
    if launch._simulating():
        import operator

        decorate = cuda.jit(device=True)  # the simulator's jit takes no forceinline
        add, mul, sqrt = operator.add, operator.mul, np.sqrt
    else:
        from numba.cuda import libdevice

        decorate = cuda.jit(device=True, forceinline=True)
        add, mul, sqrt = libdevice.dadd_rn, libdevice.dmul_rn, math.sqrt
    glb = {name: getattr(factored, name) for name in factored.__dict__ if name.isupper()}
    glb.update(cuda=cuda, np=np, math=math, add=add, mul=mul, sqrt=sqrt, LANES=LANES)
    for name, fn in (
        ("grad", factored._grad.py_func),
        ("lerp", factored._lerp.py_func),
        ("pow2", factored._pow2.py_func),
        ("segment_scale", factored._segment_scale.py_func),
        ("rsqrt_update", rsqrt_update),
        ("add_square", add_square),
        ("block_tree", block_tree),
    ):
        glb[name] = decorate(rebind(fn, glb, f"adafactor_{name}"))
    return glb


def kernels():
    """The five phase kernels (built on first use; compiled per dtype on first launch, cached on
    disk)."""
    if not _KERNELS:
        with _LOCK:
            if not _KERNELS:
                glb = _globals()
                jit = launch._cuda().jit(cache=True)
                _KERNELS.extend(
                    jit(rebind(f, glb, f"adafactor_{f.__name__}_{TAG}_cuda")) for f in PHASES
                )
    return _KERNELS


# ---------------------------------------------------------------------------------------------
# Layout, scratch and launch


def device_layout(layout, like, stream=0):
    """``layout`` (``factored.plan``) with its int64 tables (``TABLES``) copied to the device of
    the device array ``like``, uploaded on ``stream`` (the step's: its launches read them
    there); the sizes as they are."""
    cuda = launch._cuda()
    out = dict(layout)
    device = launch.launch_device(like)
    with launch.on_device(device):
        s = launch.as_stream(cuda, stream, device)
        for name in TABLES:
            out[name] = cuda.to_device(np.ascontiguousarray(layout[name], np.int64), stream=s)
    return out


def scratch(layout, dtype, like, update=None, stream=0):
    """``factored.scratch`` on the device of the device array ``like``: ``rowpart``,
    ``colpart``, ``part`` (float64), ``bmean``, ``scale`` and ``update`` (``dtype``) as zeroed
    device arrays (zero-filled on the device, on ``stream``: the step's); ``update`` the first
    elements of the device array given when it is large enough. ``layout``: the host plan or
    its :func:`device_layout`."""
    from . import cuda as kcuda

    device = launch.launch_device(like)
    numel = layout["numel"]
    if not isinstance(numel, np.ndarray):  # a device layout: its sizes read back on ``stream``
        with launch.on_device(device):
            s = launch.as_stream(launch._cuda(), stream, device)
            numel = numel.copy_to_host(stream=s)
            if s:
                s.synchronize()
    size = int(numel.sum())
    nitems = layout["items"].shape[0]
    shapes = {
        "rowpart": ((int(layout["rowpart"]),), np.float64),
        "colpart": ((int(layout["colpart"]),), np.float64),
        "part": ((nitems, 2), np.float64),
        "bmean": ((layout["batches"].shape[0],), dtype),
        "scale": ((numel.size,), dtype),
    }
    work = {}
    for name, (shape, dt) in shapes.items():
        a = kcuda.zeros(math.prod(shape), dt, stream, device)
        work[name] = a.reshape(shape) if len(shape) > 1 else a
    if update is None or update.size < size:
        update = kcuda.zeros(size, dtype, stream, device)
    work["update"] = update[:size]
    return work


def launch_threads():
    """Threads per block of the item and matrix kernels: ``THREADS`` on a GPU,
    ``SIMULATOR_THREADS`` under the simulator."""
    return SIMULATOR_THREADS if launch._simulating() else THREADS


def step(p, g, row_var, col_var, variance, h, h64, gs, layout, work, stream=0, *, threads=None):
    """One Adafactor update of the flat device array ``p`` with gradient ``g`` in place:
    ``factored.step`` as five launches on ``stream`` (0: the default stream) and ``p``'s device.
    ``layout``: :func:`device_layout`; ``work``: :func:`scratch`; ``threads`` per block
    (:func:`launch_threads` when None) changes no bit. A clip of 0 (none) reaches the kernels
    as ``inf``."""
    scale, clip = gs
    if not clip > 0:
        clip = type(clip)(np.inf)
    hs = h + (scale, clip)
    items, batches = layout["items"], layout["batches"]
    nitems, nmats, nseg = items.shape[0], batches.shape[0], layout["numel"].size
    threads = launch_threads() if threads is None else int(threads)
    k0, k1, k2, k3, k4 = kernels()
    cuda = launch._cuda()
    device = launch.launch_device(p)
    most = BLOCKS_PER_SM * launch.sm_count(cuda, device)
    items_grid = max(1, min(nitems, most))
    with launch.on_device(device):
        s = launch.as_stream(cuda, stream, device)

        def run(k, blocks, *args):
            launch.configured(k, blocks, threads, s, device)(*args)

        if nmats:
            run(k0, items_grid, g, hs, items, work["rowpart"], work["colpart"])
            run(
                k1, min(nmats, most), batches, work["rowpart"], work["colpart"], row_var,
                col_var, work["bmean"], hs,
            )  # fmt: skip
        if nitems:
            run(
                k2, items_grid, p, g, hs, items, row_var, col_var, work["bmean"], variance,
                work["update"], work["part"],
            )  # fmt: skip
        if nseg:
            run(k3, max(1, min(-(-nseg // threads), most)), layout["first"], layout["numel"],
                work["part"], h64, work["scale"])  # fmt: skip
        if nitems:
            run(k4, items_grid, p, hs, items, work["update"], work["scale"])
