"""Storage helpers: 16-bit floats as raw bits, stochastic rounding, a counter-based hash, 8-bit state.

An array is *stored* in one dtype and the rules *compute* in another (float32 for bfloat16, float16
and 8-bit storage). A loop template loads an element (``bf16_to_f32``, ``f16_to_f32``,
``dequantize``), applies the unchanged rule, and stores it back (``f32_to_bf16_rne`` /
``f32_to_f16_rne``, or the stochastic ``*_sr`` variants fed with ``random_bits``; ``quantize_value``
for 8-bit codes). ``kernels/storage.cuh`` is the same arithmetic in CUDA C; tests/test_storage.py
checks the two bit for bit against each other, against ml_dtypes/NumPy casts and bitsandbytes.

16-bit values are their IEEE bits held in an integer (Numba has no bfloat16 type): a loop views an
``ml_dtypes.bfloat16`` or ``np.float16`` array as ``np.uint16`` and passes the element; a store
helper returns the new bits (an int in [0, 65535]) to write back. Bit manipulation happens on
unsigned 32-bit words (``u32``: plain ints modulo 2**32, ``uint32`` under Numba), so results do
not depend on flush-to-zero settings (the one float addition, in ``f32_to_f16_rne``, adds normal
floats and cannot be flushed; ``storage.cuh`` does it in integers). The conversions are
branch-free (every candidate computed, one picked by a conditional expression), so that the
storage loops of ``kernels/loops.py`` vectorise.

No decorators, as in ``rules.py``: ``compile_storage(decorate, target)`` returns compiled copies for
``numba.njit`` (target ``"cpu"``) or ``numba.cuda.jit(device=True)`` (target ``"cuda"``), with
``u32`` replaced by a ``uint32`` cast and the two float32 <-> bits casts by an LLVM ``bitcast`` of
that target; on the CPU target, where the CPU converts float16 in hardware (``native_half``: F16C),
``f16_to_f32`` and ``f32_to_f16_rne`` are compiled through LLVM's ``half`` type instead, with the
same bits. Called directly (and under the CUDA simulator) the functions are plain Python on
NumPy scalars, bit-identical. Float arguments of the helpers must be float32 (NumPy scalars or
Numba float32); integer arguments int64 / Python int (or the words the helpers return).
"""

import os
import types

import numpy as np

MASK16 = 0xFFFF
MASK32 = 0xFFFFFFFF

# ---------------------------------------------------------------------------------------------
# Unsigned 32-bit words and float32 <-> bits. Plain-Python versions; compile_storage swaps in
# a uint32 cast and bitcast intrinsics.


def u32(v):
    """``v`` modulo 2**32: the unsigned 32-bit word of the CUDA C helpers' ``unsigned int``.

    Plain Python: an int in [0, 2**32). Compiled: a ``uint32``. Numba widens integer arithmetic
    to 64 bits; wrapping each result that is shifted right or compared keeps LLVM's vector code
    in 32-bit lanes (8 per AVX2 register instead of 4), which the 16-bit stores need to keep up
    with memory. Every helper below computes modulo 2**32 exactly as ``storage.cuh`` does.
    """
    return int(v) & MASK32


def float32_bits(x):
    """The IEEE 754 bits of float32 ``x``, as a non-negative int below 2**32."""
    return int(np.float32(x).view(np.uint32))


def bits_float32(u):
    """The float32 whose IEEE 754 bits are ``u`` (an int in [0, 2**32))."""
    return np.uint32(u).view(np.float32)


def is_nan_bits(u):
    """True when float32 bits ``u`` are a NaN (exponent all ones, mantissa not zero)."""
    return u32(u & 0x7FFFFFFF) > u32(0x7F800000)


def is_nan(x):
    """True when float32 ``x`` is a NaN: ``is_nan_bits`` of its bits, as one unordered float
    comparison (one vector instruction where the bit test takes three; the storage loops are
    bound by their instruction count). Never compiled with fastmath's ``nnan``, which would
    fold it to False."""
    return x != x


# The helpers below are branch-free: each computes every candidate result and picks one with a
# conditional expression (an LLVM ``select``), so that a loop calling them vectorises. No min()
# or max() either: Numba's builtins loop over their arguments, which kept the float16 storage
# loops from vectorising.

# ---------------------------------------------------------------------------------------------
# bfloat16: the upper half of a float32.


def bf16_to_f32(bits):
    """The float32 of bfloat16 ``bits`` (exact: bfloat16 is float32 with 16 fewer mantissa bits)."""
    return bits_float32(u32(u32(bits) << 16))


def bf16_nan(u):
    """The bfloat16 NaN stored for float32 NaN bits ``u``: the sign and the canonical quiet NaN
    0x7FC0 (the payload is dropped), as ``ml_dtypes`` casts it."""
    return u32(u32(u32(u >> 16) & 0x8000) | 0x7FC0)


def f32_to_bf16_rne(x):
    """bfloat16 bits of float32 ``x`` rounded to nearest, ties to even (IEEE 754 roundTiesToEven).

    Finite values above the largest bfloat16 by at least half an ulp become Inf, subnormals round
    like normals (bfloat16 has float32's exponent range), Inf stays Inf, NaN becomes
    ``bf16_nan``. Bit-exact with ``ml_dtypes.bfloat16`` and torch's ``.to(torch.bfloat16)`` (torch
    writes other NaN bits).
    """
    u = float32_bits(x)
    rounded = u32(u32(u + u32(0x7FFF + u32(u32(u >> 16) & 1))) >> 16)
    return bf16_nan(u) if is_nan(x) else rounded


def f32_to_bf16_sr(x, rbits):
    """bfloat16 bits of float32 ``x`` rounded stochastically with the low 16 bits of ``rbits``.

    ``(bits(x) + (rbits & 0xFFFF)) >> 16``: with uniform ``rbits`` the magnitude rounds up (away
    from zero) with probability (|x| - |t|) / ulp, where t is ``x`` truncated toward zero to
    bfloat16, so the expected result is exactly ``x``. Between the largest finite bfloat16 and
    2**128 the upper neighbour is Inf (as if 2**128 were representable). Inf stays Inf; NaN
    becomes ``bf16_nan``, as in ``f32_to_bf16_rne``.
    """
    u = float32_bits(x)
    rounded = u32(u32(u + u32(u32(rbits) & MASK16)) >> 16)
    return bf16_nan(u) if is_nan(x) else rounded


# ---------------------------------------------------------------------------------------------
# float16 (IEEE binary16): 1 sign, 5 exponent (bias 15), 10 mantissa bits. In integers as below
# for numba-cuda, the simulator and CPUs without F16C; ``compile_storage`` gives the CPU target
# with F16C ``_f16_to_f32_native`` and ``_f32_to_f16_rne_native`` (one vcvtph2ps / vcvtps2ph per
# 8 elements), the same bits for every input (tests/test_storage_half.py checks all of them).


def f16_to_f32(bits):
    """The float32 of IEEE binary16 ``bits`` (exact, subnormals included). Inf stays Inf; a NaN
    keeps its sign and payload (shifted into the top of float32's mantissa), as NumPy casts it.

    The CPU target with F16C compiles ``_f16_to_f32_native`` instead (same bits).

    Exponent and mantissa move up 13 bits together; the exponent is rebiased by 127 - 15 = 112,
    or set to 255 for Inf and NaN. A subnormal m * 2**-24 is float32(m) (exact) with 24 taken off
    its exponent, which normalises it without a loop.
    """
    h = u32(u32(bits) & MASK16)
    sign = u32((h & 0x8000) << 16)
    magnitude = u32(h & 0x7FFF)
    exponent = u32(magnitude >> 10)
    moved = u32(magnitude << 13)
    normal = u32(moved + 0x38000000)  # (exponent + 112) << 23
    special = u32(moved + 0x70000000)  # exponent 31 -> 255
    subnormal = u32(float32_bits(np.float32(u32(h & 0x3FF))) - 0x0C000000)  # 24 << 23
    out = special if exponent == u32(0x1F) else normal
    out = subnormal if exponent == u32(0) else out
    out = u32(0) if magnitude == u32(0) else out
    return bits_float32(u32(sign | out))


def f16_nan(u):
    """The float16 NaN stored for float32 NaN bits ``u``, as NumPy's cast makes it: the sign and
    the top 10 mantissa bits (payload and quiet bit), with the lowest bit set if those are zero."""
    h = u32((u >> 13) & 0x3FF)
    h = u32(1) if h == u32(0) else h
    return u32(((u >> 16) & 0x8000) | 0x7C00 | h)


def f32_to_f16_rne(x):
    """IEEE binary16 bits of float32 ``x`` rounded to nearest, ties to even.

    |x| >= 65520 (half an ulp above the largest float16, 65504) becomes Inf; values below the
    smallest normal (2**-14) round to subnormals m * 2**-24, |x| <= 2**-25 to a signed zero; NaN
    becomes ``f16_nan``. Bit-exact with NumPy's ``astype(np.float16)``. The CPU target with F16C
    compiles ``_f32_to_f16_rne_native`` instead (same bits).

    A normal result rebiases the exponent (127 - 15) and rounds the 13 bits below float16's
    last place: add half an ulp less one plus the lowest kept bit (the tie goes to even), then
    truncate (a carry into the exponent is the correct result). A subnormal result is |x| + 0.5
    in float32, whose ulp there, 2**-24, is float16's subnormal spacing: the addition rounds to
    nearest even exactly as wanted and leaves m in the low mantissa bits. Inputs and sum are
    normal floats (a float32 subnormal |x| rounds to zero either way), so flush-to-zero cannot
    change it.
    """
    u = float32_bits(x)
    sign = u32(u32(u >> 16) & 0x8000)
    a = u32(u & 0x7FFFFFFF)
    normal = u32(u32(a - 0x38000000 + 0xFFF + u32(u32(a >> 13) & 1)) >> 13)
    below_normal = bits_float32(a if a < u32(0x38800000) else u32(0x38800000))  # no Inf, NaN
    subnormal = u32(float32_bits(below_normal + np.float32(0.5)) - 0x3F000000)
    h = normal if a >= u32(0x38800000) else subnormal
    h = u32(0x7C00) if a >= u32(0x477FF000) else h  # 65520 and above
    return f16_nan(u) if a > u32(0x7F800000) else u32(sign | h)


def f32_to_f16_sr(x, rbits):
    """IEEE binary16 bits of float32 ``x`` rounded stochastically with the low bits of ``rbits``.

    The magnitude rounds up (away from zero) with probability (|x| - |t|) / ulp, t being ``x``
    truncated toward zero to float16, ulp the spacing there (2**-24 in the subnormal range): the
    k bits of |x| below float16's last place are added to the low k bits of ``rbits`` and the sum
    truncated. k = 13 for normal results, 14 to 32 for subnormal ones; where more than 32 bits
    lie below (|x| < 2**-32) the fraction is first truncated to 32 bits, so the probability is
    exact down to 2**-32 of an ulp. Between 65504 and 65536 the upper neighbour is Inf; |x| >=
    65536 becomes Inf; Inf stays Inf; NaN becomes ``f16_nan``.

    The subnormal sum needs 33 bits, so that branch computes in int64: float32 subnormals (e = 0)
    have no implicit one and the scale of e = 1; ``shift`` = 126 - e bits lie below the last
    place, of which those beyond 32 are dropped first (all of the mantissa from 56 on).
    """
    u = float32_bits(x)
    r = u32(rbits)
    sign = u32((u >> 16) & 0x8000)
    a = u32(u & 0x7FFFFFFF)
    normal = u32(u32(a - 0x38000000 + (r & 0x1FFF)) >> 13)
    e = np.int64(a >> 23)
    e = e if e > 1 else np.int64(1)
    mant = np.int64(a & 0x7FFFFF) | (0x800000 if a >= u32(0x800000) else 0)
    shift = 126 - e if e < 112 else np.int64(14)  # 14 .. 125; normal results are picked below
    dropped = shift - 32 if shift > 32 else np.int64(0)
    dropped = dropped if dropped < 24 else np.int64(24)  # a mantissa below 2**24 drops to zero
    shift = shift if shift < 32 else np.int64(32)
    subnormal = u32(((mant >> dropped) + (np.int64(r) & ((1 << shift) - 1))) >> shift)
    h = normal if a >= u32(0x38800000) else subnormal
    h = u32(0x7C00) if a >= u32(0x47800000) else h  # 65536 and above
    return f16_nan(u) if a > u32(0x7F800000) else u32(sign | h)


# ---------------------------------------------------------------------------------------------
# Counter-based random bits: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers:
# as easy as 1, 2, 3", SC 2011; the generator of Random123, cuRAND and torch's CUDA RNG).

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def mulhilo32(a, m):
    """(high, low) 32-bit halves of the 64-bit product of 32-bit ``a`` and ``m``."""
    p = np.uint64(a) * np.uint64(m)
    return u32(p >> np.uint64(32)), u32(p)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of the 128-bit counter (c0, c1, c2, c3) under the 64-bit key (k0, k1), all
    32-bit words: the four 32-bit output words (Random123's ``philox4x32``, 10 rounds)."""
    c0, c1, c2, c3, k0, k1 = u32(c0), u32(c1), u32(c2), u32(c3), u32(k0), u32(k1)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = u32(hi1 ^ c1 ^ k0), lo1, u32(hi0 ^ c3 ^ k1), lo0
        k0 = u32(k0 + PHILOX_W0)
        k1 = u32(k1 + PHILOX_W1)
    return c0, c1, c2, c3


def random_bits4(seed, step, index):
    """Four independent uniform 32-bit words for element ``index`` at optimizer step ``step``.

    Philox4x32-10 with counter (index low, index high, step low, step high) and key (seed low,
    seed high): every (seed, step, index) triple with 64-bit non-negative values gets its own
    counter, so draws never repeat or depend on the launch configuration. Negative ints are taken
    modulo 2**64 (two's complement), as the CUDA C version's unsigned arguments.
    """
    return philox4x32_10(
        u32(index), u32(index >> 32), u32(step), u32(step >> 32), u32(seed), u32(seed >> 32)
    )


def random_bits(seed, step, index):
    """One uniform 32-bit word for (seed, step, index): the first word of ``random_bits4``."""
    return random_bits4(seed, step, index)[0]


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise state (Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise
# Quantization", ICLR 2022): codes index a 256-entry dynamic map, scaled by the block's absmax.

QUANT_BLOCK = 256
"""Elements per quantization block (one float32 absmax each)."""


def dequantize(code, absmax, qmap):
    """The float32 value of 8-bit ``code`` in a block with float32 ``absmax``: qmap[code] * absmax."""
    return qmap[code] * absmax


def quantize(xn, qmap):
    """The code of float32 ``xn`` (a value divided by its block's absmax) in the sorted 256-entry
    ``qmap``: the nearest entry, with bitsandbytes' tie rule.

    A binary search counts the entries of qmap[0:255] below ``xn`` (r); the code is r or r - 1,
    whichever entry is nearer as judged against their float32 midpoint (qmap[r - 1] + qmap[r])
    * 0.5, and an exact tie goes to the even code. Values beyond the ends take the end codes; NaN
    takes code 0. This is exactly bitsandbytes' ``dQuantize<0>`` (csrc/kernels.cu), whose eight
    comparisons walk a complete binary tree over entries 0..254 with the even codes as leaves and
    then compare with the midpoint toward the neighbour on ``xn``'s side, keeping the leaf on a tie.
    """
    r = 0
    step = 128
    while step > 0:
        if qmap[r + step - 1] < xn:
            r += step
        step >>= 1
    if r == 0:
        return 0
    mid = (qmap[r - 1] + qmap[r]) * np.float32(0.5)
    if xn > mid:
        return r
    if xn < mid:
        return r - 1
    return r - (r & 1)


def quantize_value(x, absmax, qmap):
    """The code of float32 ``x`` in a block with float32 ``absmax``: ``quantize(x / absmax)``, and
    the code of zero when absmax is zero (an all-zero block). A block holding a NaN has a NaN
    absmax (``absmax_update``), so all its values dequantize to NaN whatever their codes."""
    if absmax > 0:
        return quantize(x / absmax, qmap)
    return quantize(np.float32(0.0), qmap)


def absmax_update(m, x):
    """max(m, |x|) for float32 ``m`` and ``x``, propagating NaN from either side (as
    torch.maximum), so a block with a NaN gets a NaN absmax."""
    a = abs(x)
    if a > m:
        return a
    if a <= m:
        return m
    return m + a


def block_absmax(a, start, stop):
    """The absmax of float32 array ``a[start:stop]`` (one quantization block): the largest |a[i]|,
    NaN if any element is NaN, 0 for an empty or all-zero block."""
    m = np.float32(0.0)
    for i in range(start, stop):
        m = absmax_update(m, a[i])
    return m


def dynamic_map(signed):
    """The 256 sorted float32 entries of bitsandbytes' dynamic quantization map
    (``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``).

    For i = 0..6, the midpoints of a float32 ``linspace(0.1, 1, n_i)`` (n_i = 2**i + 1 signed,
    2**(i+1) + 1 unsigned) scaled by float32(10**(i - 6)) (and negated, when signed), plus 0 and
    1: 127 negative, 0, 127 positive and 1 (signed), or 0, 254 positive and 1 (unsigned).
    linspace is computed as torch's vectorised CPU kernel does (with which bitsandbytes builds
    the map on x86-64): step = (end - start) / (n - 1) in float32, then start + step * k for the
    first half and end - step * (n - 1 - k) for the rest, each one fused multiply-add (a single
    rounding to float32; torch's scalar path rounds twice and differs in a few entries).
    Host-side NumPy, not a kernel helper; ``storage.cuh`` holds the same tables
    (``dynamic_map_macros``).
    """
    start, end = np.float32(0.1), np.float32(1.0)
    entries = [np.float32(0.0), np.float32(1.0)]
    for i in range(7):
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        step = (end - start) / np.float32(n - 1)
        # One rounding of start + step * k (a fused multiply-add): exact in float64 here (at
        # most 32 significant bits), then rounded once to float32.
        bounds = [
            np.float32(float(start) + float(step) * k)
            if k < n // 2
            else np.float32(float(end) - float(step) * (n - 1 - k))
            for k in range(n)
        ]
        scale = np.float32(10.0 ** (i - 6))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            mean = (lo + hi) / np.float32(2.0)
            entries.append(scale * mean)
            if signed:
                entries.append(-scale * mean)
    table = np.array(entries, dtype=np.float32)
    table.sort()
    return table


DYNAMIC_MAP_SIGNED = dynamic_map(True)
"""Map of signed 8-bit state (first moments)."""
DYNAMIC_MAP_UNSIGNED = dynamic_map(False)
"""Map of non-negative 8-bit state (second moments)."""
for _table in (DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED):
    _table.flags.writeable = False


def dynamic_map_macros():
    """The C preprocessor definitions ``FO_DYNAMIC_MAP_SIGNED`` and ``FO_DYNAMIC_MAP_UNSIGNED`` of
    ``storage.cuh``: initializers of the two maps as exact hexadecimal float literals. The header
    holds this text verbatim (tests/test_storage.py checks it); paste it there if a map changes."""
    blocks = []
    for name, signed in (("FO_DYNAMIC_MAP_SIGNED", True), ("FO_DYNAMIC_MAP_UNSIGNED", False)):
        values = []
        for v in dynamic_map(signed):
            mantissa, exponent = float(v).hex().split("p")
            values.append(f"{mantissa.rstrip('0').rstrip('.')}p{exponent}f")
        rows = [", ".join(values[k : k + 6]) for k in range(0, len(values), 6)]
        body = ", \\\n    ".join(rows)
        blocks.append(f"#define {name} \\\n    {{{body}}}\n")
    return "\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# Compilation.

HELPERS = (
    "u32",
    "float32_bits",
    "bits_float32",
    "is_nan_bits",
    "is_nan",
    "bf16_to_f32",
    "bf16_nan",
    "f32_to_bf16_rne",
    "f32_to_bf16_sr",
    "f16_to_f32",
    "f16_nan",
    "f32_to_f16_rne",
    "f32_to_f16_sr",
    "mulhilo32",
    "philox4x32_10",
    "random_bits4",
    "random_bits",
    "dequantize",
    "quantize",
    "quantize_value",
    "absmax_update",
    "block_absmax",
)
"""The scalar helpers ``compile_storage`` compiles (everything above but the host-side maps)."""


def _simulating():
    try:
        from numba.cuda.core import config
    except Exception:  # pragma: no cover - older numba-cuda
        return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    return bool(config.ENABLE_CUDASIM)


def _bitcast_intrinsics(target):
    """(float32 -> uint32, uint32 -> float32) bitcasts as Numba intrinsics of ``target``."""
    if target == "cuda":
        from numba.cuda import types as nbtypes
        from numba.cuda.extending import intrinsic
    else:
        from numba.core import types as nbtypes
        from numba.core.extending import intrinsic

    def bitcast(src, dst):
        def typer(typingctx, x):
            if x != src:
                return None

            def codegen(context, builder, signature, args):
                return builder.bitcast(args[0], context.get_value_type(dst))

            return dst(src), codegen

        typer.__name__ = f"bitcast_{src}_{dst}"
        return intrinsic(typer)

    return bitcast(nbtypes.float32, nbtypes.uint32), bitcast(nbtypes.uint32, nbtypes.float32)


# Compiled u32 / float32_bits / bits_float32: f32_as_u32 and u32_as_f32 are the intrinsics that
# compile_storage binds in the copies' globals.


def _u32_compiled(v):
    return np.uint32(v)


def _float32_bits_compiled(x):
    return f32_as_u32(np.float32(x))  # noqa: F821


def _bits_float32_compiled(u):
    return u32_as_f32(np.uint32(u))  # noqa: F821


# float16 on the CPU target: LLVM's ``half`` type, which x86-64 CPUs with F16C convert in one
# vector instruction each way (``vcvtph2ps``, ``vcvtps2ph``; with AVX512-FP16 LLVM picks
# ``vcvtph2psx``, ``vcvtps2phx``, which round the same way) where the integer versions above take
# a dozen (an Adam float16 storage loop compiled in 2.4x the time of the bfloat16 one and ran 2.9x
# slower). The instructions round to nearest even (LLVM's default environment: MXCSR's rounding
# field, which Numba never changes), never flush their results and are exact where the result is
# representable, so only NaN differs from NumPy: the hardware quiets a signaling NaN. A masked
# fix-up of the instruction's result, selected (not branched to), restores NumPy's bits; the
# loops stay vectorised. tests/test_storage_half.py checks every input against the integer path.


def native_half():
    """True when Numba's CPU target converts float16 in hardware: x86-64 with AVX and F16C among the
    features it compiles for (``NUMBA_CPU_FEATURES``, else the host's). Without them LLVM lowers
    ``half`` to calls of compiler-rt's ``__extendhfsf2`` / ``__truncsfhf2``, which Numba's JIT does
    not link ("LLVM ERROR: Symbol not found"); the integer versions are compiled there. Other
    architectures keep the integer versions too."""
    from numba.core import codegen, config

    features = config.CPU_FEATURES
    if features is None:
        features = codegen.get_host_cpu_features()
    enabled = set(features.split(","))
    return {"+avx", "+f16c"} <= enabled


def _half_intrinsics():
    """(uint32 -> float32, float32 -> uint32) Numba CPU intrinsics: the low 16 bits as an IEEE
    ``half`` extended to float (``fpext``, exact), and float rounded to ``half`` (``fptrunc``:
    to nearest, ties to even) as bits, zero-extended."""
    from llvmlite import ir
    from numba.core import types as nbtypes
    from numba.core.extending import intrinsic

    @intrinsic
    def f16_bits_as_f32(typingctx, h):
        if h != nbtypes.uint32:
            return None

        def codegen(context, builder, signature, args):
            half = builder.bitcast(builder.trunc(args[0], ir.IntType(16)), ir.HalfType())
            return builder.fpext(half, ir.FloatType())

        return nbtypes.float32(nbtypes.uint32), codegen

    @intrinsic
    def f32_as_f16_bits(typingctx, x):
        if x != nbtypes.float32:
            return None

        def codegen(context, builder, signature, args):
            half = builder.fptrunc(args[0], ir.HalfType())
            return builder.zext(builder.bitcast(half, ir.IntType(16)), ir.IntType(32))

        return nbtypes.uint32(nbtypes.float32), codegen

    return f16_bits_as_f32, f32_as_f16_bits


def _f16_to_f32_native(bits):
    """``f16_to_f32`` by ``fpext`` of the bits as a ``half``. The instruction returns a signaling
    NaN quieted (float32 bit 22 set; sign and payload kept, as F16C specifies), NumPy leaves the
    bit clear: for the inputs with exponent 31 and the quiet bit clear (signaling NaNs, and Inf,
    whose bit 22 is clear anyway), bit 22 is cleared, tested on the 16-bit input."""
    h = u32(bits)
    x = f16_bits_as_f32(h)  # noqa: F821
    quiet_cleared = bits_float32(u32(float32_bits(x) & 0xFFBFFFFF))
    return quiet_cleared if u32(h & 0x7E00) == u32(0x7C00) else x


def _f32_to_f16_rne_native(x):
    """``f32_to_f16_rne`` by ``fptrunc`` to ``half``. For a NaN the instruction keeps the sign but
    sets the quiet bit (and so drops a payload held in the low 13 bits only); the mantissa of
    ``f16_nan`` (the top 10 mantissa bits of ``x``, 1 if all are zero) replaces its mantissa."""
    h = f32_as_f16_bits(x)  # noqa: F821
    top = u32(u32(float32_bits(x) >> 13) & 0x3FF)
    nan = u32(u32(h & 0xFC00) | (top if top > u32(1) else u32(1)))
    return nan if is_nan(x) else h


def compile_storage(decorate, target, half=None):
    """Return {name: decorate(copy of storage.name)} for every helper in ``HELPERS``.

    ``target`` is ``"cpu"`` for ``numba.njit``, ``"cuda"`` for ``numba.cuda.jit(device=True)``
    (under the CUDA simulator the plain-Python bit casts are kept) or ``"python"`` to keep them
    whatever ``decorate`` is. The copies call each other through one shared globals dict, as
    ``compile_rules.compile_rules`` does for the rules.

    On target ``"cpu"`` with ``half`` true (by default: when ``native_half()``), ``f16_to_f32``
    and ``f32_to_f16_rne`` are compiled through LLVM's ``half`` type, with the same bits (NaN
    fixed up to NumPy's); ``half=False`` keeps the integer versions, which every other target
    runs. ``half=True`` where ``native_half()`` is false aborts the process when a loop compiles.
    """
    if target not in ("cpu", "cuda", "python"):
        raise ValueError(f"target must be 'cpu', 'cuda' or 'python', not {target!r}")
    module = globals()
    namespace = dict(module)
    sources = {name: module[name] for name in HELPERS}
    if target == "cpu" or (target == "cuda" and not _simulating()):
        namespace["f32_as_u32"], namespace["u32_as_f32"] = _bitcast_intrinsics(target)
        sources["u32"] = _u32_compiled
        sources["float32_bits"] = _float32_bits_compiled
        sources["bits_float32"] = _bits_float32_compiled
    if target == "cpu" and (native_half() if half is None else half):
        namespace["f16_bits_as_f32"], namespace["f32_as_f16_bits"] = _half_intrinsics()
        sources["f16_to_f32"] = _f16_to_f32_native
        sources["f32_to_f16_rne"] = _f32_to_f16_rne_native
    for name, fn in sources.items():
        copy = types.FunctionType(fn.__code__, namespace, name, fn.__defaults__)
        copy.__qualname__ = name
        namespace[name] = decorate(copy)
    return {name: namespace[name] for name in HELPERS}
