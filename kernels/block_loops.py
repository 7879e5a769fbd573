"""Block loops: 8-bit blockwise optimizer state on the CPU (``state_dtype="int8"``).

The state of Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise
Quantization" (ICLR 2022), as bitsandbytes keeps it: each slot is one ``uint8`` code per element
and one float32 absmax per block of ``QUANT_BLOCK`` (256) consecutive elements of the unit's flat
state (the last block may be partial); an element's value is ``qmap[code] * absmax`` with
``qmap`` the signed (first moments, signed state) or unsigned (second moments, non-negative sums)
dynamic map of ``kernels/storage.py``.

One pass per block, as bitsandbytes' ``kOptimizerStatic8bit2StateBlockwise`` does it: dequantize
every slot, run the UNCHANGED compiled rule per element (in float32; float64 parameters compute
in float64 and their state is rounded to float32 before it is quantized), store the parameter
with the element access of ``kernels/access.py`` (so 16-bit parameters, master weights and
stochastic rounding of the parameter work as in the storage loops), keep the new state values in
a local buffer (of ``BLOCKS_PER_TASK`` blocks), take each block's new absmax (the largest magnitude of the NEW state,
over the valid elements only: bitsandbytes' CUDA kernel pads a partial last block with values that
never exceed it, its CPU path takes the valid elements), and requantize each value to the nearest
code of ``value / absmax`` (``storage.quantize_value``: ties to the even code; an all-zero block
gets the code of zero). Codes of the signed map keep the sign of the value: a negative value (or
-0.0) whose nearest code is the zero code gets the smallest negative code instead, as
bitsandbytes does after ``quantize_2D<1>``.

Non-finite values: the absmax of a block holding a NaN is a NaN (``storage.absmax_update``), so
its whole block dequantizes to NaN on the next step: the NaN propagates, as the non-finite
policy documents for every state dtype (``skip_nonfinite=True`` skips such steps whole).

Blocks are independent and each is updated by one thread in a fixed order, so the bits do not
depend on the thread count. The parallel loop hands out ``BLOCKS_PER_TASK`` blocks per ``prange``
iteration (one buffer allocation each); the serial variant (below ``cpu.PARALLEL_THRESHOLD``
elements) is the same template with ``range``.

The nearest code is found without a binary search: ``quantizer_table`` holds, per map, the
code of the lowest value of each bucket of floats sharing sign, exponent and 7 mantissa bits
(2**-23 .. 2, plus one bucket below and one above) and the one midpoint of the map the bucket
may hold; one lookup and one comparison give exactly ``storage.quantize``'s code
(tests/test_int8_state.py checks it on every midpoint, its neighbours and 10**5 values). The
lookups run in a loop of their own, so that the arithmetic around them vectorizes in 32-bit
lanes; the value over its absmax is a float64 product with the reciprocal, bit-identical to the
float32 division without its divider (``normalized``; tests/test_precision_speed_paths.py).

Standalone passes: the optimizers whose kernels are not elementwise (LAMB, LARS, NovoGrad,
Muon) run their float32 kernels on float32 copies of 8-bit state (``fastopt/optim/staging.py``).
:func:`dequantize_into` and :func:`quantize_from` are the block loops' first and last steps
alone (``dequantize_span``; a copy of the values, then ``requantize_span``), over the same tasks,
so dequantize -> the float32 rule -> quantize gives the fused block loop's bits
(tests/test_int8_convert.py). ``quantize_from`` equals ``precision.int8_from_values`` but for
NaN: a block's NaN absmax keeps the largest payload (``int8_from_values``: 0x7FC00000), and a
positive NaN value gets code 255 (``int8_from_values``: 0); either way the block dequantizes to
NaN.
"""

import hashlib
import pathlib

import numpy as np
from numba import int64, njit, prange, uint64

from . import access
from .compile_rules import SOURCE_TAG, rebind, specialize
from .cpu import _RULES, PARALLEL_THRESHOLD
from .layout import ARITY
from .storage import (
    DYNAMIC_MAP_SIGNED,
    DYNAMIC_MAP_UNSIGNED,
    QUANT_BLOCK,
    compile_storage,
    quantize,
)

BLOCKS_PER_TASK = 8
"""Quantization blocks per ``prange`` iteration (a task)."""
SPAN = BLOCKS_PER_TASK * QUANT_BLOCK
"""Elements per task (2048: its buffers stay in the L1/L2 cache)."""


def qmap(signed):
    """The dynamic map of a slot: signed or unsigned (``storage.DYNAMIC_MAP_*``)."""
    return DYNAMIC_MAP_SIGNED if signed else DYNAMIC_MAP_UNSIGNED


def dequantized(slot):
    """The float32 values of an 8-bit slot (codes, absmax, signed; host NumPy arrays):
    ``qmap[code] * absmax``."""
    n = slot.codes.size
    scale = np.repeat(slot.absmax, QUANT_BLOCK)[:n]
    return qmap(slot.signed)[slot.codes] * scale


def code_of(x, signed):
    """The code of float32 ``x`` (a value over its block's absmax) in a map, on the host:
    ``storage.quantize``, the sign kept as the kernels keep it."""
    c = quantize(np.float32(x), qmap(signed))
    return 126 if signed and c == 127 and np.signbit(x) else c


# ---------------------------------------------------------------------------------------------
# Nearest code by bucket lookup.

KEY_LO = 104 << 7
"""Bucket key (the 15 bits of exponent and 7 mantissa bits of a magnitude) of 2**-23: every
magnitude below shares one bucket (the maps' smallest midpoint is 1.6e-7, above it)."""
KEY_HI = 128 << 7
"""Bucket key of 2.0: every magnitude from 2 on (Inf, NaN) shares one bucket."""
BUCKETS = KEY_HI - KEY_LO + 2
"""Buckets per sign."""


def _bucket_floor(sign, kc):
    """The lowest float32 (in value order) of bucket ``kc`` of sign ``sign`` (0 or 1)."""
    key = np.uint32(kc + KEY_LO - 1)
    if sign == 0:
        return np.uint32(0 if kc == 0 else key << 16).view(np.float32)
    if kc == BUCKETS - 1:
        return np.float32(-np.inf)
    return np.uint32(0x80000000 | (key << 16) | 0xFFFF).view(np.float32)


def _bucket(u):
    """Bucket index (sign first) of float32 bits ``u`` (NumPy uint32 array)."""
    key = np.clip((u >> 16) & 0x7FFF, KEY_LO - 1, KEY_HI).astype(np.int64) - (KEY_LO - 1)
    return (u >> 31).astype(np.int64) * BUCKETS + key


def quantizer_table(signed):
    """The lookup table of one map: int32[2 * BUCKETS] (24 KiB), per bucket of floats (positive buckets
    first) ``code | threshold << 8``. ``code`` is the number of the map's float32 midpoints
    ``(q[k] + q[k + 1]) * 0.5`` below the bucket's lowest value (in value order); a value of the
    bucket gets ``code + 1`` when the low 16 bits of its magnitude, reversed below zero
    (``0xFFFF - low``, so that they grow with the value), reach ``threshold``: the bucket's
    midpoint's (reversed) low bits, plus one unless a tie there goes up to an even code; 0x10000
    (never) in a bucket without a midpoint. No bucket holds two midpoints (checked)."""
    q = qmap(signed)
    mids = ((q[:-1] + q[1:]) * np.float32(0.5)).astype(np.float32)
    floors = np.array(
        [_bucket_floor(s, kc) for s in (0, 1) for kc in range(BUCKETS)], dtype=np.float32
    )
    # Midpoints strictly below: one equal to the floor is the bucket's own (compared, ties too).
    codes = np.searchsorted(mids, floors, side="left").astype(np.int64)
    bits = mids.view(np.uint32)
    where = _bucket(bits)
    kc = where % BUCKETS
    if np.any((kc == 0) | (kc == BUCKETS - 1)) or np.unique(where).size != mids.size:
        raise AssertionError("a midpoint of the map lies outside the buckets or shares one")
    low = (bits & 0xFFFF).astype(np.int64)
    reversed_low = np.where(bits >> 31 == 1, 0xFFFF - low, low)
    tie_up = codes[where] % 2 == 1  # the midpoint between codes k and k + 1, k odd
    threshold = np.full(codes.size, 0x10000, np.int64)
    threshold[where] = reversed_low + np.where(tie_up, 0, 1)
    table = (codes | (threshold << 8)).astype(np.int32)
    table.flags.writeable = False
    return table


_TABLES = {}


def tables(signed):
    """(map, lookup table) of a slot: ``qmap(signed)`` and the cached :func:`quantizer_table`."""
    t = _TABLES.get(bool(signed))
    if t is None:
        t = _TABLES[bool(signed)] = (qmap(signed), quantizer_table(signed))
    return t


# Plain functions compiled with the storage helpers' float32 <-> bits casts (``_helpers``). All
# integer arithmetic is on unsigned 32-bit words (``u32``) and every choice a conditional
# expression, so that the loops calling them vectorise in 32-bit lanes (8 per AVX2 register).


def bucket_of(xn):
    """The bucket (index into a quantizer table) of float32 ``xn``."""
    u = float32_bits(xn)
    key = u32(u32(u >> 16) & 0x7FFF)
    key = key if key > u32(KEY_LO - 1) else u32(KEY_LO - 1)
    key = key if key < u32(KEY_HI) else u32(KEY_HI)
    return u32(u32(key - (KEY_LO - 1)) + u32(u32(0 - u32(u >> 31)) & BUCKETS))


def code_in_bucket(xn, entry, signed):
    """The code of float32 ``xn`` from its bucket's table ``entry``: ``storage.quantize``, and
    in the signed map the sign of a negative ``xn`` (or -0.0) kept (code 126, not zero's 127).
    A NaN gets some code: it only occurs in a block whose absmax is NaN, all of whose values
    are NaN whatever their codes."""
    u = float32_bits(xn)
    negative = u32(u >> 31)
    low = u32(u32(u ^ u32(0 - negative)) & 0xFFFF)
    e = u32(entry)
    code = u32(u32(e & 0xFF) + u32(1 if low >= u32(e >> 8) else 0))
    keep_sign = u32(1 if code == u32(127) else 0) & negative & u32(1 if signed else 0)
    return u32(code - keep_sign)


def nearest_code(xn, qm, lut):
    """The code of float32 ``xn`` in map ``qm`` with lookup table ``lut``: one lookup."""
    return code_in_bucket(xn, lut[bucket_of(xn)], qm[0] < 0)


def magnitude_bits(x):
    """The bits of |x| for float32 ``x``: ordered as the magnitudes, NaN above Inf, so an
    integer max over a block is its absmax (a NaN when it holds one)."""
    return u32(float32_bits(np.float32(x)) & 0x7FFFFFFF)


def normalized(x, inverse):
    """``x / scale`` rounded to float32, for float32 ``x`` and ``inverse`` = 1 / scale in float64
    (a positive float32 ``scale``, or +Inf): float32(x * inverse), computed in float64.

    Bit-identical to the float32 division and without its divider (the bottleneck of the block
    loops): ``inverse`` and the product each carry a relative error below 2**-53, so x * inverse
    lies within 2**-52 (relative) of x / scale, while x / scale, when it is not a float32, lies
    more than 2**-49 from every rounding boundary of float32 (a boundary m has at most 25
    significant bits, scale and x 24, so x - m * scale is a nonzero multiple of a power of two at
    least 2**-49 * m * scale; subnormal boundaries have fewer bits) and is never on one: both
    round to the same float32. Infinities and NaN give what the division gives (x * 0 for a
    scale of +Inf)."""
    return np.float32(np.float64(x) * inverse)


def dequantize_span(codes, absmax, qm, b0, lo, count, out):
    """``out[:count]`` = the values of ``codes[lo:lo + count]`` (blocks from ``b0`` on):
    ``qm[code] * absmax[block]``."""
    for start in range(uint64(0), count, uint64(QUANT_BLOCK)):
        scale = absmax[b0 + start // QUANT_BLOCK]
        for j in range(start, min(start + QUANT_BLOCK, count)):
            out[j] = qm[codes[lo + j]] * scale


def span_absmax(values, start, stop):
    """The largest ``magnitude_bits`` of ``values[start:stop]`` (0 for an empty span)."""
    m = u32(0)
    for j in range(start, stop):
        b = magnitude_bits(values[j])
        m = b if b > m else m
    return m


def requantize_span(codes, absmax, qm, lut, b0, lo, count, values, work):
    """Store the codes of ``values[:count]`` (overwritten) at ``codes[lo:]`` and each block's
    new absmax (the largest magnitude of its new values) at ``absmax[b0:]``: each value over
    its block's absmax (``normalized``; an all-zero block over 1, which gives the code of zero),
    then ``nearest_code``. The table lookup (a gather) runs in a loop of its own, so that the
    arithmetic around it vectorizes; ``work`` is a uint32 buffer of ``count`` elements."""
    for start in range(uint64(0), count, uint64(QUANT_BLOCK)):
        stop = min(start + QUANT_BLOCK, count)
        block_max = bits_float32(span_absmax(values, start, stop))
        absmax[b0 + start // QUANT_BLOCK] = block_max
        scale = block_max if block_max > 0 else np.float32(1.0)  # all zeros: the code of zero
        inverse = 1.0 / np.float64(scale)
        for j in range(start, stop):
            xn = normalized(values[j], inverse)
            values[j] = xn
            work[j] = bucket_of(xn)
    for j in range(uint64(0), count):
        work[j] = lut[work[j]]
    signed = qm[0] < 0
    for j in range(uint64(0), count):
        codes[lo + j] = code_in_bucket(values[j], work[j], signed)


# ---------------------------------------------------------------------------------------------
# Templates, one per number of state slots: per task of BLOCKS_PER_TASK blocks, dequantize each
# slot into a buffer, run the rule over the buffers (storing the parameter as it goes),
# requantize. Slot k: codes ck, absmax ak, map qk, lookup table lk.


def block_loop1(p, w, g, c0, a0, q0, l0, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    n = p.size
    for task in indices((n + SPAN - 1) // SPAN):
        v0 = np.empty(SPAN, np.float32)
        work = np.empty(SPAN, np.uint32)
        lo = uint64(task * SPAN)
        count = uint64(min(SPAN, n - task * SPAN))
        dequantize_span(c0, a0, q0, task * BLOCKS_PER_TASK, lo, count, v0)
        for j in range(uint64(0), count):
            i = lo + j
            r = draw(rs, int64(i))
            x, v0[j] = rule(
                load_param(p, w, i), transformed_grad(load_grad(g, i), gscale, clip), v0[j], h
            )
            store_param(p, w, i, x, r[0])
        requantize_span(c0, a0, q0, l0, task * BLOCKS_PER_TASK, lo, count, v0, work)


def block_loop2(p, w, g, c0, a0, q0, l0, c1, a1, q1, l1, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    n = p.size
    for task in indices((n + SPAN - 1) // SPAN):
        v0 = np.empty(SPAN, np.float32)
        v1 = np.empty(SPAN, np.float32)
        work = np.empty(SPAN, np.uint32)
        lo = uint64(task * SPAN)
        count = uint64(min(SPAN, n - task * SPAN))
        dequantize_span(c0, a0, q0, task * BLOCKS_PER_TASK, lo, count, v0)
        dequantize_span(c1, a1, q1, task * BLOCKS_PER_TASK, lo, count, v1)
        for j in range(uint64(0), count):
            i = lo + j
            r = draw(rs, int64(i))
            x, v0[j], v1[j] = rule(
                load_param(p, w, i),
                transformed_grad(load_grad(g, i), gscale, clip),
                v0[j],
                v1[j],
                h,
            )
            store_param(p, w, i, x, r[0])
        requantize_span(c0, a0, q0, l0, task * BLOCKS_PER_TASK, lo, count, v0, work)
        requantize_span(c1, a1, q1, l1, task * BLOCKS_PER_TASK, lo, count, v1, work)


def block_loop3(p, w, g, c0, a0, q0, l0, c1, a1, q1, l1, c2, a2, q2, l2, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    n = p.size
    for task in indices((n + SPAN - 1) // SPAN):
        v0 = np.empty(SPAN, np.float32)
        v1 = np.empty(SPAN, np.float32)
        v2 = np.empty(SPAN, np.float32)
        work = np.empty(SPAN, np.uint32)
        lo = uint64(task * SPAN)
        count = uint64(min(SPAN, n - task * SPAN))
        dequantize_span(c0, a0, q0, task * BLOCKS_PER_TASK, lo, count, v0)
        dequantize_span(c1, a1, q1, task * BLOCKS_PER_TASK, lo, count, v1)
        dequantize_span(c2, a2, q2, task * BLOCKS_PER_TASK, lo, count, v2)
        for j in range(uint64(0), count):
            i = lo + j
            r = draw(rs, int64(i))
            x, v0[j], v1[j], v2[j] = rule(
                load_param(p, w, i),
                transformed_grad(load_grad(g, i), gscale, clip),
                v0[j],
                v1[j],
                v2[j],
                h,
            )
            store_param(p, w, i, x, r[0])
        requantize_span(c0, a0, q0, l0, task * BLOCKS_PER_TASK, lo, count, v0, work)
        requantize_span(c1, a1, q1, l1, task * BLOCKS_PER_TASK, lo, count, v1, work)
        requantize_span(c2, a2, q2, l2, task * BLOCKS_PER_TASK, lo, count, v2, work)


TEMPLATES = {1: block_loop1, 2: block_loop2, 3: block_loop3}
"""The block loop of each number of state slots (rules without state have nothing to quantize)."""


# Standalone passes over one slot, for the kernels that run on float32 copies of 8-bit state
# (``fastopt/optim/staging.py``): the block loops' first and last steps, tasks as there.


def dequantize_loop(codes, absmax, qm, out):
    n = codes.size
    for task in indices((n + SPAN - 1) // SPAN):
        lo = uint64(task * SPAN)
        count = uint64(min(SPAN, n - task * SPAN))
        dequantize_span(codes, absmax, qm, task * BLOCKS_PER_TASK, lo, count, out[lo:])


def quantize_loop(codes, absmax, qm, lut, values):
    n = codes.size
    for task in indices((n + SPAN - 1) // SPAN):
        v = np.empty(SPAN, np.float32)
        work = np.empty(SPAN, np.uint32)
        lo = uint64(task * SPAN)
        count = uint64(min(SPAN, n - task * SPAN))
        for j in range(uint64(0), count):
            v[j] = values[lo + j]
        requantize_span(codes, absmax, qm, lut, task * BLOCKS_PER_TASK, lo, count, v, work)


TAG = hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:8]
"""Part of every block kernel's name: Numba's disk cache does not watch this file."""

# ---------------------------------------------------------------------------------------------
# Compilation and launch.

_HELPER_DECORATOR = njit(inline="always", error_model="numpy")
_HELPERS = None
_KERNELS = {}


QUANTIZER_HELPERS = (bucket_of, code_in_bucket, nearest_code, magnitude_bits, normalized)
"""The per-element quantizer helpers, shared with the CUDA block kernels (``block_cuda.py``)."""


def quantizer_namespace(compiled_storage, decorate):
    """The storage helpers ``compiled_storage`` (``storage.compile_storage`` for a target) and
    the :data:`QUANTIZER_HELPERS` compiled with ``decorate``, sharing one namespace."""
    namespace = dict(compiled_storage)
    namespace.update(
        np=np, int64=int64, uint64=uint64, KEY_LO=KEY_LO, KEY_HI=KEY_HI, BUCKETS=BUCKETS
    )
    namespace.update(QUANT_BLOCK=QUANT_BLOCK)
    for fn in QUANTIZER_HELPERS:
        namespace[fn.__name__] = decorate(rebind(fn, namespace))
    return namespace


def _helpers():
    """The compiled storage helpers and this module's quantizer helpers, sharing one namespace."""
    global _HELPERS
    if _HELPERS is None:
        namespace = quantizer_namespace(
            compile_storage(_HELPER_DECORATOR, "cpu"), _HELPER_DECORATOR
        )
        for fn in (dequantize_span, span_absmax, requantize_span):
            namespace[fn.__name__] = _HELPER_DECORATOR(rebind(fn, namespace))
        _HELPERS = namespace
    return _HELPERS


def helper(name):
    """A compiled quantizer helper (``nearest_code``, ``bucket_of``, ...), for the tests."""
    return _helpers()[name]


def _span_globals(helpers, parallel):
    """The globals the block loops and the standalone passes share: the span helpers, the task
    sizes and the index range (``prange`` or ``range``)."""
    return {
        "np": np,
        "uint64": uint64,
        "SPAN": SPAN,
        "BLOCKS_PER_TASK": BLOCKS_PER_TASK,
        "indices": prange if parallel else range,
        "dequantize_span": helpers["dequantize_span"],
        "requantize_span": helpers["requantize_span"],
    }


def kernel(rule_name, storage, parallel=True):
    """The compiled block loop of ``rule_name`` for ``storage`` (state ``"int8"``)."""
    key = (rule_name, storage, parallel)
    k = _KERNELS.get(key)
    if k is None:
        helpers = _helpers()
        glb = {
            **_span_globals(helpers, parallel),
            "int64": int64,
            "transformed_grad": _RULES["transformed_grad"],
            **access.bind(storage, helpers, _HELPER_DECORATOR),
        }
        k = specialize(
            TEMPLATES[ARITY[rule_name]],
            rule_name,
            _RULES[rule_name],
            glb,
            njit(parallel=parallel, cache=True, nogil=True, error_model="numpy"),
            f"{access.variant_name(storage)}_{TAG}{'' if parallel else '_serial'}",
        )
        _KERNELS[key] = k
    return k


_PASSES = {}


def pass_kernel(name, parallel=True):
    """The compiled standalone pass ``"dequantize"`` or ``"quantize"`` (:func:`dequantize_into`,
    :func:`quantize_from`), parallel over tasks of ``BLOCKS_PER_TASK`` blocks or serial."""
    key = (name, parallel)
    k = _PASSES.get(key)
    if k is None:
        glb = _span_globals(_helpers(), parallel)
        template = {"dequantize": dequantize_loop, "quantize": quantize_loop}[name]
        variant = f"{template.__name__}_{TAG}_{SOURCE_TAG}{'' if parallel else '_serial'}"
        k = njit(parallel=parallel, cache=True, nogil=True, error_model="numpy")(
            rebind(template, glb, variant)
        )
        _PASSES[key] = k
    return k


def _check_pass(what, slot, array, name):
    """ValueError/TypeError unless ``slot`` is an 8-bit host slot and ``array`` float32 of its
    size (both C-contiguous, ``array`` writable for ``dequantize_into``)."""
    codes, absmax = getattr(slot, "codes", None), getattr(slot, "absmax", None)
    if not (isinstance(codes, np.ndarray) and isinstance(absmax, np.ndarray)):
        raise TypeError(
            f"{what}: the slot must be an 8-bit slot of host arrays (codes, absmax, signed), "
            f"got {type(slot).__name__}"
        )
    n = codes.size
    blocks = -(-n // QUANT_BLOCK)
    if codes.dtype != np.uint8 or absmax.dtype != np.float32 or absmax.size != blocks:
        raise ValueError(
            f"{what}: the slot needs uint8 codes and float32 absmax, one per block of "
            f"{QUANT_BLOCK} ({n} codes: {blocks}), got {codes.dtype} codes of size {n} and "
            f"{absmax.dtype} absmax of size {absmax.size}"
        )
    if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.size != n:
        raise ValueError(
            f"{what}: {name} must be a float32 NumPy array of the slot's {n} elements, got "
            f"{getattr(array, 'dtype', type(array).__name__)} of size {getattr(array, 'size', '?')}"
        )
    arrays = (codes, absmax, array)
    if not all(a.flags.c_contiguous for a in arrays):
        raise ValueError(f"{what}: the slot's arrays and {name} must be C-contiguous")
    written = (array,) if what == "dequantize" else (codes, absmax)
    if not all(a.flags.writeable for a in written):
        raise ValueError(f"{what}: {'out' if what == 'dequantize' else 'the slot'} is read-only")


def dequantize_into(slot, out):
    """``out[i] = qmap[code[i]] * absmax[block(i)]`` (float32) for an 8-bit host slot (a
    ``precision.Quantized`` of NumPy arrays) and a float32 host array ``out`` of its size: the
    block loops' dequantization (``dequantize_span``), bit-identical to :func:`dequantized`."""
    _check_pass("dequantize", slot, out, "out")
    n = slot.codes.size
    if n == 0:
        return
    k = pass_kernel("dequantize", n >= PARALLEL_THRESHOLD)
    k(slot.codes.reshape(-1), slot.absmax.reshape(-1), qmap(slot.signed), out.reshape(-1))


def quantize_from(slot, values):
    """Store float32 host ``values`` (the slot's size; not modified) into an 8-bit host slot,
    in place: each block's absmax the largest magnitude of its values (NaN if it holds one),
    each code the nearest of the value over it (``requantize_span``: ties to the even code, the
    sign kept in the signed map, an all-zero block the code of zero). The codes and absmax the
    block loops write for these new state values, bit for bit."""
    _check_pass("quantize", slot, values, "values")
    n = slot.codes.size
    if n == 0:
        return
    k = pass_kernel("quantize", n >= PARALLEL_THRESHOLD)
    k(slot.codes.reshape(-1), slot.absmax.reshape(-1), *tables(slot.signed), values.reshape(-1))


def _bits(a):
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def apply(rule_name, storage, p, g, states, master, h, gs, rs):
    """``cpu_storage.apply`` for 8-bit state: ``states`` are 8-bit slots (``codes``, ``absmax``,
    ``signed``; ``fastopt.optim.precision.Quantized``) of ``p``'s size, in the rule's slot
    order; the rest as there."""
    parallel = p.size >= PARALLEL_THRESHOLD
    k = _KERNELS.get((rule_name, storage, parallel)) or kernel(rule_name, storage, parallel)
    pb = _bits(p)
    args = []
    for s in states:
        args += [s.codes, s.absmax, *tables(s.signed)]
    k(pb, pb if master is None else master, _bits(g), *args, h + gs, rs)
