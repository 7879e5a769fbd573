"""Block kernels: 8-bit blockwise optimizer state on numba-cuda (``state_dtype="int8"``).

The block loops of ``kernels/block_loops.py`` as ``numba.cuda`` kernels, with the same state
(per slot one ``uint8`` code per element and one float32 absmax per block of ``QUANT_BLOCK``
elements, the dynamic maps) and the same arithmetic, element for element:

- one CUDA block of ``QUANT_BLOCK`` (256) threads per quantization block, one element per
  thread (a partial last block leaves its surplus threads idle); with fewer threads per block
  (a divisor of 256) each thread takes several elements of the block, and with fewer blocks
  than quantization blocks each CUDA block steps over several (block-stride loop): the
  simulator runs that way (``SIMULATOR_LAUNCH``), the bits do not depend on the launch;
- each thread dequantizes its elements of every slot (``qmap[code] * absmax``, float32), runs the
  UNCHANGED rule (the device functions ``kernels/cuda.py`` compiles) and stores the parameter
  with the element access of ``kernels/access.py`` (16-bit parameters, master weights and
  stochastic rounding as in ``cuda_storage.py``);
- the block's new absmax is the largest ``magnitude_bits`` of its new values: an integer
  ``atomic.max`` in shared memory (one per thread and slot, over the thread's own maximum) (max is exact and does not depend on the order; a NaN's bits
  lie above every magnitude, so a block holding a NaN gets a NaN absmax, as on the CPU);
- each thread requantizes its values with the helpers of ``block_loops.py`` compiled as device
  functions (``normalized``, then ``nearest_code``'s table lookup; the maps and lookup tables
  go to each device once).

Numerics: the quantizer is integer arithmetic, a float32 product, a float64 reciprocal and a
float64 product rounded to float32, none of which NVVM contracts: dequantizing and quantizing
are bit-identical to the CPU. The rules run in float32 (float64 for float64 parameters) and, as
in ``cuda.py``, NVVM may contract ``a * b + c`` into a fused multiply-add on a GPU, so a value
may differ from the CPU in its last bit (and then a code by one); under the CUDA simulator the
rules run as Python and everything is bit-identical to ``block_loops.py``.

Standalone passes (:func:`dequantize_into`, :func:`quantize_from`; for the float32 kernels that
run on copies of 8-bit state, ``fastopt/optim/staging.py``): the block kernels' dequantization
(``dequantize_element``) and their block maximum and ``requantize_block``, launched as the block
kernels; the bits of ``block_loops.dequantize_into`` / ``quantize_from``.
"""

# ruff: noqa: F821 (the templates' helpers are globals that ``rebind`` gives them)

import hashlib
import math
import pathlib
import threading

import numpy as np
from numba import float32, uint32

from . import access, block_loops, cuda_storage
from . import cuda as kcuda
from . import cuda_launch as launch
from .compile_rules import SOURCE_TAG, rebind, specialize
from .layout import ARITY
from .storage import QUANT_BLOCK

SLOTS_MAX = 3
"""The most state slots a rule has (the size of the shared absmax array)."""

TAG = hashlib.sha256(pathlib.Path(__file__).read_bytes() + block_loops.TAG.encode()).hexdigest()[:8]
"""Part of every block kernel's name: Numba's disk cache watches neither this file's helpers
nor ``block_loops.py``."""


# ---------------------------------------------------------------------------------------------
# Device functions and kernel templates (globals bound by ``rebind``; ``cuda`` among them).


def requantize_block(codes, absmax, qm, lut, top, b, values, n):
    """Store block ``b``'s absmax (``top``: the largest magnitude bits of its new values; by
    the block's first thread) and the codes of this thread's elements of it (new float32
    ``values``, one per ``THREADS`` elements from the thread's index; those from ``n`` on are
    outside the array): ``block_loops.requantize_span`` for one block."""
    block_max = bits_float32(top)
    tid = cuda.threadIdx.x
    if tid == 0:
        absmax[b] = block_max
    scale = block_max if block_max > 0 else np.float32(1.0)  # all zeros: the code of zero
    inverse = 1.0 / np.float64(scale)
    for k in range(EPT):
        i = b * QUANT_BLOCK + k * THREADS + tid
        if i < n:
            codes[i] = nearest_code(normalized(values[k], inverse), qm, lut)


def dequantize_element(codes, absmax, qm, i, b):
    """The float32 value of element ``i`` (of block ``b``) of a slot: ``qm[code] * absmax``,
    ``block_loops.dequantize_span``'s product."""
    return qm[codes[i]] * absmax[b]


# The templates: per quantization block b (block-stride), reset the shared maxima, run the rule
# over this thread's elements (dequantized state in, float32 state kept in local arrays), take
# the maxima (one atomic per thread and slot), then requantize. Slot k: codes ck, absmax ak,
# map qk, lookup table lk.


def block_kernel1(p, w, g, c0, a0, q0, l0, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    n = p.size
    tid = cuda.threadIdx.x
    top = cuda.shared.array(SLOTS_MAX, uint32)
    v0 = cuda.local.array(EPT, float32)
    for b in range(cuda.blockIdx.x, (n + QUANT_BLOCK - 1) // QUANT_BLOCK, cuda.gridDim.x):
        for s in range(tid, SLOTS_MAX, cuda.blockDim.x):  # every slot, with any thread count
            top[s] = 0
        cuda.syncthreads()
        m0 = magnitude_bits(0.0)
        for k in range(EPT):
            i = b * QUANT_BLOCK + k * THREADS + tid
            if i < n:
                r = draw(rs, i)
                x, t0 = rule(
                    load_param(p, w, i),
                    transformed_grad(load_grad(g, i), gscale, clip),
                    to_compute(dequantize_element(c0, a0, q0, i, b)),
                    h,
                )
                store_param(p, w, i, x, r[0])
                v0[k] = np.float32(t0)
                m0 = max(m0, magnitude_bits(v0[k]))
        cuda.atomic.max(top, 0, m0)
        cuda.syncthreads()
        requantize_block(c0, a0, q0, l0, top[0], b, v0, n)
        cuda.syncthreads()


def block_kernel2(p, w, g, c0, a0, q0, l0, c1, a1, q1, l1, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    n = p.size
    tid = cuda.threadIdx.x
    top = cuda.shared.array(SLOTS_MAX, uint32)
    v0 = cuda.local.array(EPT, float32)
    v1 = cuda.local.array(EPT, float32)
    for b in range(cuda.blockIdx.x, (n + QUANT_BLOCK - 1) // QUANT_BLOCK, cuda.gridDim.x):
        for s in range(tid, SLOTS_MAX, cuda.blockDim.x):  # every slot, with any thread count
            top[s] = 0
        cuda.syncthreads()
        m0 = magnitude_bits(0.0)
        m1 = m0
        for k in range(EPT):
            i = b * QUANT_BLOCK + k * THREADS + tid
            if i < n:
                r = draw(rs, i)
                x, t0, t1 = rule(
                    load_param(p, w, i),
                    transformed_grad(load_grad(g, i), gscale, clip),
                    to_compute(dequantize_element(c0, a0, q0, i, b)),
                    to_compute(dequantize_element(c1, a1, q1, i, b)),
                    h,
                )
                store_param(p, w, i, x, r[0])
                v0[k] = np.float32(t0)
                v1[k] = np.float32(t1)
                m0 = max(m0, magnitude_bits(v0[k]))
                m1 = max(m1, magnitude_bits(v1[k]))
        cuda.atomic.max(top, 0, m0)
        cuda.atomic.max(top, 1, m1)
        cuda.syncthreads()
        requantize_block(c0, a0, q0, l0, top[0], b, v0, n)
        requantize_block(c1, a1, q1, l1, top[1], b, v1, n)
        cuda.syncthreads()


def block_kernel3(p, w, g, c0, a0, q0, l0, c1, a1, q1, l1, c2, a2, q2, l2, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    n = p.size
    tid = cuda.threadIdx.x
    top = cuda.shared.array(SLOTS_MAX, uint32)
    v0 = cuda.local.array(EPT, float32)
    v1 = cuda.local.array(EPT, float32)
    v2 = cuda.local.array(EPT, float32)
    for b in range(cuda.blockIdx.x, (n + QUANT_BLOCK - 1) // QUANT_BLOCK, cuda.gridDim.x):
        for s in range(tid, SLOTS_MAX, cuda.blockDim.x):  # every slot, with any thread count
            top[s] = 0
        cuda.syncthreads()
        m0 = magnitude_bits(0.0)
        m1 = m0
        m2 = m0
        for k in range(EPT):
            i = b * QUANT_BLOCK + k * THREADS + tid
            if i < n:
                r = draw(rs, i)
                x, t0, t1, t2 = rule(
                    load_param(p, w, i),
                    transformed_grad(load_grad(g, i), gscale, clip),
                    to_compute(dequantize_element(c0, a0, q0, i, b)),
                    to_compute(dequantize_element(c1, a1, q1, i, b)),
                    to_compute(dequantize_element(c2, a2, q2, i, b)),
                    h,
                )
                store_param(p, w, i, x, r[0])
                v0[k] = np.float32(t0)
                v1[k] = np.float32(t1)
                v2[k] = np.float32(t2)
                m0 = max(m0, magnitude_bits(v0[k]))
                m1 = max(m1, magnitude_bits(v1[k]))
                m2 = max(m2, magnitude_bits(v2[k]))
        cuda.atomic.max(top, 0, m0)
        cuda.atomic.max(top, 1, m1)
        cuda.atomic.max(top, 2, m2)
        cuda.syncthreads()
        requantize_block(c0, a0, q0, l0, top[0], b, v0, n)
        requantize_block(c1, a1, q1, l1, top[1], b, v1, n)
        requantize_block(c2, a2, q2, l2, top[2], b, v2, n)
        cuda.syncthreads()


TEMPLATES = {1: block_kernel1, 2: block_kernel2, 3: block_kernel3}
"""The block kernel of each number of state slots."""


# Standalone passes over one slot (the block kernels' first and last steps), for the kernels
# that run on float32 copies of 8-bit state (``fastopt/optim/staging.py``); launched as the
# block kernels are.


def dequantize_kernel(codes, absmax, qm, out):
    n = codes.size
    tid = cuda.threadIdx.x
    for b in range(cuda.blockIdx.x, (n + QUANT_BLOCK - 1) // QUANT_BLOCK, cuda.gridDim.x):
        for k in range(EPT):
            i = b * QUANT_BLOCK + k * THREADS + tid
            if i < n:
                out[i] = dequantize_element(codes, absmax, qm, i, b)


def quantize_kernel(codes, absmax, qm, lut, values):
    n = codes.size
    tid = cuda.threadIdx.x
    top = cuda.shared.array(1, uint32)
    v = cuda.local.array(EPT, float32)
    for b in range(cuda.blockIdx.x, (n + QUANT_BLOCK - 1) // QUANT_BLOCK, cuda.gridDim.x):
        if tid == 0:
            top[0] = 0
        cuda.syncthreads()
        m = magnitude_bits(0.0)
        for k in range(EPT):
            i = b * QUANT_BLOCK + k * THREADS + tid
            if i < n:
                v[k] = values[i]
                m = max(m, magnitude_bits(v[k]))
        cuda.atomic.max(top, 0, m)
        cuda.syncthreads()
        requantize_block(codes, absmax, qm, lut, top[0], b, v, n)
        cuda.syncthreads()


PASSES = {"dequantize": dequantize_kernel, "quantize": quantize_kernel}
"""The standalone passes (:func:`dequantize_into`, :func:`quantize_from`)."""

# ---------------------------------------------------------------------------------------------
# Compilation, tables and launch.

_COMPUTE = {"float32": access.as_float32, "float64": access.as_float64}
"""The dequantized float32 state in the rule's compute dtype: explicit, since under the
simulator a float64 rule's Python-float scalars would otherwise compute in float32 (NumPy's
weak scalars); compiled, the conversion is the one a mixed operation makes anyway."""

SIMULATOR_LAUNCH = (2, 32)
"""(most blocks, threads per block) under the CUDA simulator, which runs one Python thread per
CUDA thread: few threads, each taking several elements of a block (same bits)."""

_KERNELS = {}
_HELPERS = []
_TABLES = {}
_LOCK = threading.Lock()


def helpers():
    """The storage helpers and ``block_loops``' quantizer helpers compiled as device functions,
    in one namespace (built once)."""
    if not _HELPERS:
        with _LOCK:
            if not _HELPERS:
                decorate = cuda_storage._device_decorator()
                _HELPERS.append(block_loops.quantizer_namespace(cuda_storage.helpers(), decorate))
    return _HELPERS[0]


def _globals(threads):
    """The globals of a template launched with ``threads`` threads per block (a divisor of
    ``QUANT_BLOCK``), but a rule's and its element access."""
    if threads < 1 or QUANT_BLOCK % threads:
        raise ValueError(f"threads must divide {QUANT_BLOCK}, got {threads}")
    cuda = launch._cuda()
    decorate = cuda_storage._device_decorator()
    sizes = {"cuda": cuda, "EPT": QUANT_BLOCK // threads, "THREADS": threads}
    namespace = dict(helpers(), **sizes)
    return {
        **sizes,
        "np": np,
        "uint32": uint32,
        "float32": float32,
        "QUANT_BLOCK": QUANT_BLOCK,
        "SLOTS_MAX": SLOTS_MAX,
        "magnitude_bits": namespace["magnitude_bits"],
        "dequantize_element": decorate(rebind(dequantize_element, namespace)),
        "requantize_block": decorate(rebind(requantize_block, namespace)),
    }


def kernel(rule_name, storage, threads=QUANT_BLOCK):
    """The CUDA block kernel of ``rule_name`` for ``storage`` (state ``"int8"``) launched with
    ``threads`` threads per block (a divisor of ``QUANT_BLOCK``: each thread takes
    ``QUANT_BLOCK // threads`` elements of a block)."""
    key = (rule_name, storage, threads)
    k = _KERNELS.get(key)
    if k is None:
        glb = _globals(threads)
        rules, _ = kcuda._device_functions()
        cuda = launch._cuda()
        decorate = cuda_storage._device_decorator()
        glb.update(
            transformed_grad=rules["transformed_grad"],
            to_compute=decorate(rebind(_COMPUTE[access.compute_name(storage)], {"np": np})),
            **access.bind(storage, cuda_storage.helpers(), decorate),
        )
        with _LOCK:
            k = _KERNELS.get(key)
            if k is None:
                k = specialize(
                    TEMPLATES[ARITY[rule_name]],
                    rule_name,
                    rules[rule_name],
                    glb,
                    cuda.jit(cache=True),
                    f"{access.variant_name(storage)}_t{threads}_{TAG}_cuda",
                )
                _KERNELS[key] = k
    return k


def pass_kernel(name, threads=QUANT_BLOCK):
    """The CUDA kernel of the standalone pass ``"dequantize"`` or ``"quantize"`` launched with
    ``threads`` threads per block (a divisor of ``QUANT_BLOCK``)."""
    key = (name, threads)
    k = _KERNELS.get(key)
    if k is None:
        template = PASSES[name]
        glb = _globals(threads)
        with _LOCK:
            k = _KERNELS.get(key)
            if k is None:
                variant = f"{template.__name__}_t{threads}_{TAG}_{SOURCE_TAG}_cuda"
                k = launch._cuda().jit(cache=True)(rebind(template, glb, variant))
                _KERNELS[key] = k
    return k


def tables(signed, device, stream=0):
    """(map, lookup table) of a slot as device arrays on ``device`` (None: the current one),
    copied there once: ``block_loops.tables``. The copy goes to ``stream``, the first launch's
    (the launch that reads them is ordered after it), and that stream alone is synchronised,
    once per process, device and map: every later launch reads the tables, whatever its
    stream, and a copy from pageable host memory may still be in flight when it returns."""
    key = (bool(signed), device)
    t = _TABLES.get(key)
    if t is None:
        cuda = launch._cuda()
        with launch.on_device(device):
            s = launch.as_stream(cuda, stream, device)
            t = tuple(cuda.to_device(np.array(a), stream=s) for a in block_loops.tables(signed))
            if s:
                s.synchronize()
        _TABLES[key] = t
    return t


def _check_slots(states, n, arity, rule_name):
    """ValueError/TypeError before any launch when ``states`` are not ``arity`` 8-bit device slots
    of ``n`` elements."""
    if len(states) != arity:
        raise ValueError(f"{rule_name} takes {arity} state slots, got {len(states)}")
    blocks = -(-n // QUANT_BLOCK)
    for k, s in enumerate(states):
        codes, absmax = getattr(s, "codes", None), getattr(s, "absmax", None)
        if not (kcuda._is_device_array(codes) and kcuda._is_device_array(absmax)):
            raise TypeError(
                f"state slot {k} of {rule_name} must be an 8-bit slot of device arrays "
                f"(codes, absmax, signed), got {type(s).__name__}"
            )
        if codes.dtype != np.uint8 or math.prod(codes.shape) != n:
            raise ValueError(
                f"state slot {k} of {rule_name}: codes must be uint8 of {n} elements, got "
                f"{codes.dtype} of shape {tuple(codes.shape)}"
            )
        if absmax.dtype != np.float32 or math.prod(absmax.shape) != blocks:
            raise ValueError(
                f"state slot {k} of {rule_name}: absmax must be float32 of {blocks} elements "
                f"(one per block of {QUANT_BLOCK}), got {absmax.dtype} of shape "
                f"{tuple(absmax.shape)}"
            )


def apply(
    rule_name, storage, p, g, states, master, h, gs, rs, stream=0, *, threads=None, blocks=None
):
    """``cuda_storage.apply`` for 8-bit state: ``states`` are 8-bit slots (``codes``,
    ``absmax``, ``signed``; ``fastopt.optim.precision.Quantized``) of numba device arrays, in
    the rule's slot order. Asynchronous, on ``p``'s device and ``stream``; checked before
    anything is launched. Launch: one block of ``QUANT_BLOCK`` threads per quantization block
    (``SIMULATOR_LAUNCH`` under the simulator); ``threads`` (a divisor of ``QUANT_BLOCK``)
    and ``blocks`` override it, the bits are the same."""
    n = math.prod(p.shape)
    _check_slots(states, n, ARITY[rule_name], rule_name)
    if n == 0:
        return
    nblocks = -(-n // QUANT_BLOCK)
    most, default_threads = SIMULATOR_LAUNCH if launch._simulating() else (nblocks, QUANT_BLOCK)
    threads = default_threads if threads is None else int(threads)
    blocks = min(nblocks, most) if blocks is None else max(int(blocks), 1)
    k = kernel(rule_name, storage, threads)
    device = launch.launch_device(p)
    pb = cuda_storage.bits(p)
    args = [pb, pb if master is None else master, cuda_storage.bits(g)]
    for s in states:
        args += [s.codes, s.absmax, *tables(s.signed, device, stream)]
    args += [h + gs, tuple(int(v) for v in rs)]
    with launch.on_device(device):
        s = launch.as_stream(launch._cuda(), stream, device)
        launch.configured(k, blocks, threads, s, device)(*args)


def _check_pass(what, slot, array, name):
    """TypeError/ValueError before any launch unless ``slot`` is an 8-bit slot of numba device
    arrays and ``array`` a float32 device array of its size; the slot's size."""
    codes, absmax = getattr(slot, "codes", None), getattr(slot, "absmax", None)
    if not (
        hasattr(slot, "signed")
        and kcuda._is_device_array(codes)
        and kcuda._is_device_array(absmax)
        and kcuda._is_device_array(array)
    ):
        raise TypeError(
            f"{what}: needs an 8-bit slot of device arrays (codes, absmax, signed) and a device "
            f"array {name}, got {type(slot).__name__} and {type(array).__name__}"
        )
    n = math.prod(codes.shape)
    blocks = -(-n // QUANT_BLOCK)
    if codes.dtype != np.uint8 or absmax.dtype != np.float32 or math.prod(absmax.shape) != blocks:
        raise ValueError(
            f"{what}: the slot needs uint8 codes and float32 absmax, one per block of "
            f"{QUANT_BLOCK} ({n} codes: {blocks}), got {codes.dtype} codes and {absmax.dtype} "
            f"absmax of shape {tuple(absmax.shape)}"
        )
    if array.dtype != np.float32 or math.prod(array.shape) != n:
        raise ValueError(
            f"{what}: {name} must be float32 of the slot's {n} elements, got {array.dtype} of "
            f"shape {tuple(array.shape)}"
        )
    return n


def _launch(name, n, device, stream, threads, blocks, args):
    """One launch of pass ``name`` over ``n`` elements, configured as :func:`apply`'s."""
    nblocks = -(-n // QUANT_BLOCK)
    most, default_threads = SIMULATOR_LAUNCH if launch._simulating() else (nblocks, QUANT_BLOCK)
    threads = default_threads if threads is None else int(threads)
    blocks = min(nblocks, most) if blocks is None else max(int(blocks), 1)
    k = pass_kernel(name, threads)
    with launch.on_device(device):
        s = launch.as_stream(launch._cuda(), stream, device)
        launch.configured(k, blocks, threads, s, device)(*args)


def _flat(a):
    return a if len(a.shape) == 1 else a.reshape(math.prod(a.shape))


def dequantize_into(slot, out, stream=0, *, threads=None, blocks=None):
    """``out[i] = qmap[code[i]] * absmax[block(i)]`` (float32) for an 8-bit slot of numba
    device arrays and a float32 device array ``out`` of its size: the block kernels'
    dequantization (``dequantize_element``), bit-identical to ``block_loops.dequantize_into``.
    Asynchronous, on the slot's device and ``stream``; checked before the launch; launched as
    :func:`apply` (``threads`` and ``blocks`` override it, the bits are the same)."""
    n = _check_pass("dequantize", slot, out, "out")
    if n == 0:
        return
    device = launch.launch_device(slot.codes)
    qm, _ = tables(slot.signed, device, stream)
    args = (_flat(slot.codes), _flat(slot.absmax), qm, _flat(out))
    _launch("dequantize", n, device, stream, threads, blocks, args)


def quantize_from(slot, values, stream=0, *, threads=None, blocks=None):
    """Store float32 device ``values`` (the slot's size; not modified) into an 8-bit slot of
    numba device arrays, in place: each block's absmax the largest magnitude of its values (an
    integer max of ``magnitude_bits``: NaN if it holds one), each code the nearest of the value
    over it (``requantize_block``, the block kernels' own last step): the bits of
    ``block_loops.quantize_from``. Asynchronous, checked and launched as
    :func:`dequantize_into`."""
    n = _check_pass("quantize", slot, values, "values")
    if n == 0:
        return
    device = launch.launch_device(slot.codes)
    qm, lut = tables(slot.signed, device, stream)
    args = (_flat(slot.codes), _flat(slot.absmax), qm, lut, _flat(values))
    _launch("quantize", n, device, stream, threads, blocks, args)
