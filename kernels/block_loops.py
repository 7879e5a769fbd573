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
a local buffer of one block, take the block's new absmax (the largest magnitude of the NEW state,
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
(2**-30 .. 2, plus one bucket below and one above) and the one midpoint of the map the bucket
may hold; one lookup and one comparison give exactly ``storage.quantize``'s code
(tests/test_int8_state.py checks it on every midpoint, its neighbours and 10**5 values). Per
block the lookups run in a loop of their own, so that the arithmetic around them vectorizes.
"""

import hashlib
import pathlib

import numpy as np
from numba import int64, njit, prange, uint64

from . import access
from .compile_rules import rebind, specialize
from .cpu import _RULES, PARALLEL_THRESHOLD
from .layout import ARITY
from .storage import (
    DYNAMIC_MAP_SIGNED,
    DYNAMIC_MAP_UNSIGNED,
    QUANT_BLOCK,
    compile_storage,
    quantize,
)

BLOCKS_PER_TASK = 16
"""Quantization blocks per ``prange`` iteration (4096 elements)."""


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

KEY_LO = 97 << 7
"""Bucket key (the 15 bits of exponent and 7 mantissa bits of a magnitude) of 2**-30: every
magnitude below shares one bucket."""
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
    """The lookup table of one map: uint32[2 * BUCKETS], per bucket of floats (positive buckets
    first) ``code | has_midpoint << 8 | midpoint_low_bits << 16``: ``code`` is the number of
    midpoints below the bucket's lowest value (in value order), and a bucket holding one
    of the map's float32 midpoints ``(q[k] + q[k + 1]) * 0.5`` has its low 16 bits (the upper 16
    are the bucket's). No bucket holds two midpoints (checked), so one comparison finishes."""
    q = qmap(signed)
    mids = ((q[:-1] + q[1:]) * np.float32(0.5)).astype(np.float32)
    floors = np.array(
        [_bucket_floor(s, kc) for s in (0, 1) for kc in range(BUCKETS)], dtype=np.float32
    )
    # Midpoints strictly below: one equal to the floor is the bucket's own (compared, ties too).
    table = np.searchsorted(mids, floors, side="left").astype(np.uint32)
    bits = mids.view(np.uint32)
    where = _bucket(bits)
    kc = where % BUCKETS
    inner = (kc > 0) & (kc < BUCKETS - 1)
    if inner.sum() != mids.size or np.unique(where).size != mids.size:
        raise AssertionError("a midpoint of the map lies outside the buckets or shares one")
    table[where] |= np.uint32(1 << 8) | ((bits & 0xFFFF) << 16)
    table.flags.writeable = False
    return table


_TABLES = {}


def tables(signed):
    """(map, lookup table) of a slot: ``qmap(signed)`` and the cached :func:`quantizer_table`."""
    t = _TABLES.get(bool(signed))
    if t is None:
        t = _TABLES[bool(signed)] = (qmap(signed), quantizer_table(signed))
    return t


# Plain functions compiled with the storage helpers' float32 <-> bits casts (``_helpers``).


def bucket_of(xn):
    """The bucket (index into a quantizer table) of float32 ``xn``."""
    u = float32_bits(xn)  # noqa: F821
    return (u >> 31) * BUCKETS + min(max((u >> 16) & 0x7FFF, KEY_LO - 1), KEY_HI) - (KEY_LO - 1)


def code_in_bucket(xn, entry, signed):
    """The code of float32 ``xn`` from its bucket's table ``entry``: ``storage.quantize``, and
    in the signed map the sign of a negative ``xn`` (or -0.0) kept (code 126, not zero's 127).
    Integer arithmetic without branches, so that a loop of it vectorizes."""
    u = float32_bits(xn)  # noqa: F821
    code = int64(entry & 0xFF)
    low = u & 0xFFFF
    mid = int64(entry >> 16)
    negative = u >> 31
    # Past the bucket's midpoint in value order (magnitudes run backwards below zero), or on it
    # with an even code above. Selects and masks, no multiplications (slow in int64 lanes).
    past = int64(mid > low) if negative == 1 else int64(mid < low)
    code += (entry >> 8) & 1 & (past | (int64(mid == low) & code))
    code = code if xn == xn else 0  # NaN: code 0
    return code - (int64(code == 127) & negative & int64(signed))


def nearest_code(xn, qm, lut):
    """The code of float32 ``xn`` in map ``qm`` with lookup table ``lut``: one lookup."""
    return code_in_bucket(xn, lut[bucket_of(xn)], qm[0] < 0)


def magnitude_bits(x):
    """The bits of |x| for float32 ``x``: ordered as the magnitudes, NaN above Inf, so an
    integer max over a block is its absmax (a NaN when it holds one)."""
    return float32_bits(np.float32(x)) & 0x7FFFFFFF  # noqa: F821


def dequantize_block(codes, lo, count, qm, absmax, out):
    """``out[:count]`` = the values of ``codes[lo:lo + count]``: ``qm[code] * absmax``."""
    for j in range(uint64(0), count):
        out[j] = qm[codes[lo + j]] * absmax


def requantize(codes, lo, values, count, mbits, qm, lut, work):
    """Store the codes of ``values[:count]`` (overwritten) at ``codes[lo:]``; return the block's
    new absmax, the float32 of ``mbits``. Three loops, so that the table lookup (a gather) runs
    alone and the arithmetic around it vectorizes; ``work`` is an int64 buffer of a block."""
    absmax = bits_float32(mbits)  # noqa: F821
    scale = absmax if absmax > 0 else np.float32(1.0)  # all zeros: the code of zero
    for j in range(uint64(0), count):
        values[j] = values[j] / scale
        work[j] = bucket_of(values[j])
    for j in range(uint64(0), count):
        work[j] = lut[work[j]]
    signed = qm[0] < 0
    for j in range(uint64(0), count):
        codes[lo + j] = code_in_bucket(values[j], work[j], signed)
    return absmax


# ---------------------------------------------------------------------------------------------
# Templates, one per number of state slots: per block, dequantize each slot into a buffer, run
# the rule over the buffers (the parameter stored as it goes), requantize. Slot k: codes ck,
# absmax ak, map qk, lookup table lk.


def block_loop1(p, w, g, c0, a0, q0, l0, h, gs, rs):
    n = p.size
    nblocks = (n + QUANT_BLOCK - 1) // QUANT_BLOCK
    for task in indices((nblocks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        v0 = np.empty(QUANT_BLOCK, np.float32)
        work = np.empty(QUANT_BLOCK, np.int64)
        for b in range(task * BLOCKS_PER_TASK, min(nblocks, (task + 1) * BLOCKS_PER_TASK)):
            lo = uint64(b * QUANT_BLOCK)
            count = uint64(min(QUANT_BLOCK, n - b * QUANT_BLOCK))
            dequantize_block(c0, lo, count, q0, a0[b], v0)
            m0 = 0
            for j in range(uint64(0), count):
                i = lo + j
                r = draw(rs, int64(i))
                x, v0[j] = rule(
                    load_param(p, w, i),
                    transformed_grad(load_grad(g, i), gs[0], gs[1]),
                    v0[j],
                    h,
                )
                store_param(p, w, i, x, r[0])
                m0 = max(m0, magnitude_bits(v0[j]))
            a0[b] = requantize(c0, lo, v0, count, m0, q0, l0, work)


def block_loop2(p, w, g, c0, a0, q0, l0, c1, a1, q1, l1, h, gs, rs):
    n = p.size
    nblocks = (n + QUANT_BLOCK - 1) // QUANT_BLOCK
    for task in indices((nblocks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        v0 = np.empty(QUANT_BLOCK, np.float32)
        v1 = np.empty(QUANT_BLOCK, np.float32)
        work = np.empty(QUANT_BLOCK, np.int64)
        for b in range(task * BLOCKS_PER_TASK, min(nblocks, (task + 1) * BLOCKS_PER_TASK)):
            lo = uint64(b * QUANT_BLOCK)
            count = uint64(min(QUANT_BLOCK, n - b * QUANT_BLOCK))
            dequantize_block(c0, lo, count, q0, a0[b], v0)
            dequantize_block(c1, lo, count, q1, a1[b], v1)
            m0 = 0
            m1 = 0
            for j in range(uint64(0), count):
                i = lo + j
                r = draw(rs, int64(i))
                x, v0[j], v1[j] = rule(
                    load_param(p, w, i),
                    transformed_grad(load_grad(g, i), gs[0], gs[1]),
                    v0[j],
                    v1[j],
                    h,
                )
                store_param(p, w, i, x, r[0])
                m0 = max(m0, magnitude_bits(v0[j]))
                m1 = max(m1, magnitude_bits(v1[j]))
            a0[b] = requantize(c0, lo, v0, count, m0, q0, l0, work)
            a1[b] = requantize(c1, lo, v1, count, m1, q1, l1, work)


def block_loop3(p, w, g, c0, a0, q0, l0, c1, a1, q1, l1, c2, a2, q2, l2, h, gs, rs):
    n = p.size
    nblocks = (n + QUANT_BLOCK - 1) // QUANT_BLOCK
    for task in indices((nblocks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        v0 = np.empty(QUANT_BLOCK, np.float32)
        v1 = np.empty(QUANT_BLOCK, np.float32)
        v2 = np.empty(QUANT_BLOCK, np.float32)
        work = np.empty(QUANT_BLOCK, np.int64)
        for b in range(task * BLOCKS_PER_TASK, min(nblocks, (task + 1) * BLOCKS_PER_TASK)):
            lo = uint64(b * QUANT_BLOCK)
            count = uint64(min(QUANT_BLOCK, n - b * QUANT_BLOCK))
            dequantize_block(c0, lo, count, q0, a0[b], v0)
            dequantize_block(c1, lo, count, q1, a1[b], v1)
            dequantize_block(c2, lo, count, q2, a2[b], v2)
            m0 = 0
            m1 = 0
            m2 = 0
            for j in range(uint64(0), count):
                i = lo + j
                r = draw(rs, int64(i))
                x, v0[j], v1[j], v2[j] = rule(
                    load_param(p, w, i),
                    transformed_grad(load_grad(g, i), gs[0], gs[1]),
                    v0[j],
                    v1[j],
                    v2[j],
                    h,
                )
                store_param(p, w, i, x, r[0])
                m0 = max(m0, magnitude_bits(v0[j]))
                m1 = max(m1, magnitude_bits(v1[j]))
                m2 = max(m2, magnitude_bits(v2[j]))
            a0[b] = requantize(c0, lo, v0, count, m0, q0, l0, work)
            a1[b] = requantize(c1, lo, v1, count, m1, q1, l1, work)
            a2[b] = requantize(c2, lo, v2, count, m2, q2, l2, work)


TEMPLATES = {1: block_loop1, 2: block_loop2, 3: block_loop3}
"""The block loop of each number of state slots (rules without state have nothing to quantize)."""

TAG = hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:8]
"""Part of every block kernel's name: Numba's disk cache does not watch this file."""

# ---------------------------------------------------------------------------------------------
# Compilation and launch.

_HELPER_DECORATOR = njit(inline="always", error_model="numpy")
_HELPERS = None
_KERNELS = {}


def _helpers():
    """The compiled storage helpers and this module's quantizer helpers, sharing one namespace."""
    global _HELPERS
    if _HELPERS is None:
        namespace = dict(compile_storage(_HELPER_DECORATOR, "cpu"))
        namespace.update(
            np=np, int64=int64, uint64=uint64, KEY_LO=KEY_LO, KEY_HI=KEY_HI, BUCKETS=BUCKETS
        )
        helpers = (bucket_of, code_in_bucket, nearest_code, magnitude_bits)
        for fn in (*helpers, dequantize_block, requantize):
            namespace[fn.__name__] = _HELPER_DECORATOR(rebind(fn, namespace))
        _HELPERS = namespace
    return _HELPERS


def helper(name):
    """A compiled quantizer helper (``nearest_code``, ``bucket_of``, ...), for the tests."""
    return _helpers()[name]


def kernel(rule_name, storage, parallel=True):
    """The compiled block loop of ``rule_name`` for ``storage`` (state ``"int8"``)."""
    key = (rule_name, storage, parallel)
    k = _KERNELS.get(key)
    if k is None:
        helpers = _helpers()
        glb = {
            "np": np,
            "int64": int64,
            "uint64": uint64,
            "QUANT_BLOCK": QUANT_BLOCK,
            "BLOCKS_PER_TASK": BLOCKS_PER_TASK,
            "indices": prange if parallel else range,
            "transformed_grad": _RULES["transformed_grad"],
            "magnitude_bits": helpers["magnitude_bits"],
            "dequantize_block": helpers["dequantize_block"],
            "requantize": helpers["requantize"],
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
    k(pb, pb if master is None else master, _bits(g), *args, h, gs, rs)
