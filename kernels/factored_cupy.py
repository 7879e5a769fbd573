"""Adafactor's factored second moments on the CuPy backend: the five phases of
``kernels/factored.py`` as the CUDA C kernels of ``factored_kernels.cu``, compiled by NVRTC
through ``cupy.RawModule``, with the contract of ``factored.step``.

A step is five launches whatever the number of tensors (phases 0 and 1 left out for a buffer
without matrices): the tile partial row/column sums of ``g^2``, the factors per matrix, the
unscaled update and the per-item sums of ``p^2`` and ``u^2``, the step size per segment, the
update. Every addition happens in the numba-cpu kernel's order (one block of ``TILE_COLS``
threads per tile or vector piece, thread ``j`` on column ``j``, the same pairwise halving over
the lanes; a matrix's mean added in row order; a segment's items in item order) and every
operation is rounded as there (explicitly rounded PTX, no contraction, no flush to zero; see
``factored_kernels.cu``), so CuPy and numba-cpu give the same bits for any grid.

Arrays are flat, C-contiguous ``cupy.ndarray`` on one device: the parameter, gradient and
states (``row_var``, ``col_var``, ``variance``) of one dtype (float32 or float64), the layout of
:func:`device_layout` and the scratch of :func:`scratch` on that device. Every launch goes to
CuPy's current stream on that device (``stream`` to choose another); nothing synchronises.
"""

import numpy as np

from . import cupy as kcupy
from . import factored, vector_cupy

KERNEL_SOURCE = "factored_kernels.cu"
COMPILE_OPTIONS = ("--fmad=false",)
"""Every floating-point operation is explicitly rounded inline PTX; nothing else is contracted."""
PHASES = ("tiles", "factors", "items", "scales", "apply")
BLOCKS = 4096
"""At most this many blocks; each takes items b, b + BLOCKS, ... (the grid changes no result)."""
FACTOR_THREADS = 256
SCALE_THREADS = 128
APPLY_THREADS = 256
TABLES = ("items", "batches", "first", "numel")
SCRATCH = ("rowpart", "colpart", "bmean", "update", "part", "scale")

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def source():
    """The CUDA source handed to NVRTC: ``factored_kernels.cu`` with its headers inlined (a
    stale ``rules_layout.cuh`` is refused)."""
    return kcupy._inline(KERNEL_SOURCE)


_module = kcupy.RawModuleCache(source, COMPILE_OPTIONS)


def kernel_name(phase, dtype):
    """``fo_af_<phase>_<f32|f64>``."""
    return f"fo_af_{phase}_{_SUFFIX[np.dtype(dtype)]}"


def kernel_names():
    """Every kernel of the module."""
    return {kernel_name(phase, dtype) for phase in PHASES for dtype in _SUFFIX}


def device_layout(layout, like, stream=None):
    """``layout`` (:func:`factored.plan`) with its int64 tables copied to ``like``'s device (the
    same shapes), its sizes unchanged, and ``size``: the number of elements it covers."""
    device = like.data.device_id
    out = dict(layout)
    for key in TABLES:
        host = np.ascontiguousarray(layout[key], np.int64)
        table = vector_cupy.to_device(host, device, stream)
        out[key] = table.reshape(*host.shape) if host.ndim > 1 else table
    out["size"] = int(np.sum(layout["numel"]))
    return out


def _size(layout):
    size = layout.get("size")
    return int(np.sum(layout["numel"])) if size is None else size


def scratch(layout, dtype, like, update=None, stream=None):
    """The per-step scratch arrays of ``layout`` on ``like``'s device, as ``factored.scratch``:
    ``rowpart``, ``colpart``, ``part`` (float64; ``part`` flat, two per item), ``bmean``,
    ``scale`` and ``update`` (``dtype``): the first elements of ``update`` when it is given
    and large enough, else a new array. Uninitialised: every step writes them before reading."""
    device = like.data.device_id
    dtype = np.dtype(dtype)

    def empty(n, dt):
        return vector_cupy.empty(int(n), dt, device, stream)

    size = _size(layout)
    if update is None or update.size < size:
        update = empty(size, dtype)
    return {
        "update": update[:size],
        "rowpart": empty(layout["rowpart"], np.float64),
        "colpart": empty(layout["colpart"], np.float64),
        "part": empty(2 * layout["items"].shape[0], np.float64),
        "bmean": empty(layout["batches"].shape[0], dtype),
        "scale": empty(layout["numel"].shape[0], dtype),
    }


def check(p, g, row_var, col_var, variance, layout, work):
    """TypeError/ValueError naming the problem unless the arrays fit one :func:`step` over
    ``layout`` (a :func:`device_layout`) with ``work`` (its :func:`scratch`); checked before any
    launch."""
    import cupy

    size = _size(layout)
    kcupy.check_flat_arrays((p, g, work["update"]), size, "Adafactor")
    sizes = {"row_var": layout["rows"], "col_var": layout["cols"], "variance": layout["vector"]}
    for name, a in zip(sizes, (row_var, col_var, variance), strict=True):
        if not isinstance(a, cupy.ndarray):
            raise TypeError(
                f"the CuPy Adafactor kernels take cupy.ndarray, {name} is a {type(a).__name__}"
            )
        if a.dtype != p.dtype:
            raise TypeError(f"{name} has dtype {a.dtype}, the parameter {p.dtype}")
        if a.size != sizes[name] or not a.flags.c_contiguous:
            raise ValueError(
                f"{name} must be a contiguous array of {sizes[name]} elements, got shape {a.shape}"
            )
        if a.data.device_id != p.data.device_id:
            raise ValueError(
                f"{name} is on cuda:{a.data.device_id}, the parameter on cuda:{p.data.device_id}"
            )
    for key in TABLES:
        if not isinstance(layout[key], cupy.ndarray):
            raise TypeError(f"layout[{key!r}] is not on the device: pass device_layout(plan)")


def step(p, g, row_var, col_var, variance, h, h64, gs, layout, work, stream=None):
    """One Adafactor update of the flat buffer ``p`` with gradient ``g`` in place, as
    ``factored.step``: ``h`` the element scalars ``factored.H_FIELDS`` and ``gs`` the gradient
    (scale, clip) in the parameter dtype, ``h64`` the segment scalars ``factored.H64_FIELDS``;
    ``layout`` a :func:`device_layout`, ``work`` its :func:`scratch`. A clip of 0 (none)
    reaches the kernels as ``inf``. The arrays are checked (:func:`check`) before the first of
    the five launches, which go to ``stream`` (None: CuPy's current stream)."""
    import cupy

    check(p, g, row_var, col_var, variance, layout, work)
    dt = p.dtype.type
    gscale, clip = gs
    gscale, clip = dt(gscale), dt(clip if clip > 0 else np.inf)
    hs = kcupy._scalars(tuple(h), p.dtype)
    h64s = kcupy._scalars(tuple(h64), np.dtype(np.float64))
    items, batches = layout["items"], layout["batches"]
    nitems, nbatches = items.shape[0], batches.shape[0]
    nseg = layout["numel"].shape[0]
    ni, nb, ns = np.int64(nitems), np.int64(nbatches), np.int64(nseg)
    rp, cp, bmean, update, part, scale = (work[k] for k in SCRATCH)
    tiles = (g, gscale, clip, items, ni, rp, cp)
    factors = (batches, nb, rp, cp, row_var, col_var, bmean, hs)
    sums = (p, g, hs, gscale, clip, items, ni, row_var, col_var, bmean, variance, update, part)
    scales = (layout["first"], layout["numel"], ns, part, h64s, scale)
    apply = (p, hs, items, ni, update, scale)
    cols = factored.TILE_COLS
    launches = []
    if nbatches:
        launches += [("tiles", nitems, cols, tiles), ("factors", nbatches, FACTOR_THREADS, factors)]
    if nitems:
        launches.append(("items", nitems, cols, sums))
    if nseg:
        launches.append(("scales", -(-nseg // SCALE_THREADS), SCALE_THREADS, scales))
    if nitems:
        launches.append(("apply", nitems, APPLY_THREADS, apply))
    device = p.data.device_id
    stream = kcupy.as_stream(stream, device)
    with cupy.cuda.Device(device):
        kernels = [_module.function(cupy, device, kernel_name(n, p.dtype)) for n, *_ in launches]
        if stream is None:
            _run(kernels, launches)
        else:
            with stream:  # RawKernel launches go to the current stream
                _run(kernels, launches)


def _run(kernels, launches):
    for k, (_, blocks, threads, args) in zip(kernels, launches, strict=True):
        k((min(blocks, BLOCKS),), (threads,), args)
