"""The standalone 8-bit passes on the CPU: ``block_loops.dequantize_into`` / ``quantize_from``
(``Backend.dequantize`` / ``Backend.quantize`` of numba-cpu), for the kernels that run on float32
copies of 8-bit state (``fastopt/optim/staging.py``).

- dequantize equals ``block_loops.dequantized`` (``precision.Quantized.dequantized``) bit for bit;
- quantize equals ``precision.int8_from_values`` bit for bit on random values of many
  magnitudes, every midpoint of both maps (exact ties) and its neighbours, zeros, -0.0,
  subnormals, infinities and NaN blocks, at sizes 0, 1, 255, 256, 257, 4099 and above
  ``cpu.PARALLEL_THRESHOLD`` (the parallel path), signed and unsigned map, with one documented
  exception: an element whose normalized value is a NaN (a NaN, or an infinity in an infinity
  block) gets code 255 from the kernels' table lookup when that NaN is positive, 0 from
  ``int8_from_values`` (a NaN block dequantizes to NaN whatever its codes); and a NaN block's
  absmax keeps the largest NaN payload, which ``int8_from_values`` canonicalizes;
- quantize(dequantize(slot)) gives the slot back;
- one fused block step (``block_loops.apply``) equals dequantize -> the float32 rule
  (``cpu.apply``, ``cpu_storage.apply`` with float32 state) -> quantize, bit for bit
  (parameter, master copy, codes and absmax);
- 1 and 2 Numba threads give the same bits (tests/thread_counts.py).
"""

import hashlib

import ml_dtypes
import numpy as np
import pytest
import thread_counts

from fastopt import dispatch
from fastopt.kernels import block_loops, cpu, cpu_storage
from fastopt.kernels.access import Storage
from fastopt.kernels.cpu import PARALLEL_THRESHOLD
from fastopt.kernels.rules import SCALARS
from fastopt.kernels.storage import QUANT_BLOCK
from fastopt.optim import precision

SIZES = (0, 1, 255, 256, 257, 4096 + 3, PARALLEL_THRESHOLD + 2 * QUANT_BLOCK + 17)
SIGNS = pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
POSITIVE_NAN = np.uint32(0x7FC00000).view(np.float32)
NEGATIVE_NAN = np.uint32(0xFFC00000).view(np.float32)


def empty_slot(n, signed):
    """An 8-bit host slot of ``n`` elements filled with garbage (every byte written or not)."""
    codes = np.full(n, 77, np.uint8)
    absmax = np.full(precision.int8_block_count(n), -3.0, np.float32)
    return precision.Quantized(codes, absmax, signed)


def quantized(values, signed):
    """``block_loops.quantize_from`` into a fresh slot; ``values`` left untouched (checked)."""
    before = values.tobytes()
    slot = empty_slot(values.size, signed)
    block_loops.quantize_from(slot, values)
    assert values.tobytes() == before
    return slot


def dequantized(slot):
    out = np.full(slot.codes.size, np.nan, np.float32)
    block_loops.dequantize_into(slot, out)
    return out


def _mids(signed):
    q = block_loops.qmap(signed)
    return ((q[:-1] + q[1:]) * np.float32(0.5)).astype(np.float32)


def values_of(n, signed, seed=0):
    """``n`` float32 values: blocks of very different scales; then, where there is room, a block
    of every midpoint of the map with 1.0 (so its absmax is 1 and each midpoint an exact tie), the
    midpoints' neighbours and -1 (absmax 1 again), the midpoints times 2**-100 with 2**-100
    (ties at a tiny absmax), an all-zero block holding -0.0, subnormals, a NaN block and an
    infinity block."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(n) * 10.0 ** rng.uniform(-25, 25, n)
    v *= np.repeat(10.0 ** rng.integers(-8, 8, -(-n // QUANT_BLOCK)), QUANT_BLOCK)[:n]
    v = v.astype(np.float32)
    base = rng.standard_normal(QUANT_BLOCK).astype(np.float32)
    mids = _mids(signed)
    near = np.concatenate([np.nextafter(mids, np.float32(s)) for s in (np.inf, -np.inf)])
    zeros = np.zeros(QUANT_BLOCK, np.float32)
    zeros[1::3] = -0.0
    tiny = np.float32(2.0**-100)
    nan = base.copy()
    nan[[3, 100]] = POSITIVE_NAN, NEGATIVE_NAN
    inf = base * np.float32(1e30)
    inf[[7, 9]] = np.inf, -np.inf
    special = [
        np.concatenate([[1.0], mids]),
        np.concatenate([near[:255], [-1.0]]),
        np.concatenate([near[255:], [1.0]]),
        np.concatenate([mids * tiny, [tiny]]),
        zeros,
        (rng.standard_normal(QUANT_BLOCK) * 1e-40).astype(np.float32),  # subnormals
        nan,
        inf,
    ]
    at = QUANT_BLOCK  # block 0 stays random
    for block in special:
        if at + QUANT_BLOCK > n:
            break
        v[at : at + QUANT_BLOCK] = block
        at += QUANT_BLOCK
    return v


def assert_matches_int8_from_values(slot, values):
    """Codes and absmax of ``slot`` equal ``precision.int8_from_values``' bit for bit, but for
    the codes of the values whose normalized value is a NaN (a NaN, or an infinity over an
    infinite absmax): the kernels' table lookup gives a positive NaN code 255 and a negative
    one 0, int8_from_values 0 to both. (Which NaN Inf * 0 makes is the hardware's: negative on
    x86, positive on a GPU or ARM.)"""
    with np.errstate(invalid="ignore"):  # inf / inf in an infinity block
        ref = precision.int8_from_values(values, slot.signed)
    assert ref.absmax.tobytes() == slot.absmax.tobytes()
    inf_block = np.repeat(np.isinf(ref.absmax), QUANT_BLOCK)[: values.size]
    nan_xn = np.isnan(values) | (np.isinf(values) & inf_block)
    assert np.isin(slot.codes[nan_xn], (0, 255)).all() and (ref.codes[nan_xn] == 0).all()
    pos_nan = np.isnan(values) & ~np.signbit(values)
    assert (slot.codes[pos_nan] == 255).all()
    assert np.array_equal(slot.codes[~nan_xn], ref.codes[~nan_xn])


# ---------------------------------------------------------------------------------------------
# dequantize and quantize against the host spec.


@SIGNS
@pytest.mark.parametrize("n", SIZES)
def test_quantize_equals_int8_from_values(n, signed):
    values = values_of(n, signed, seed=n)
    slot = quantized(values, signed)
    assert_matches_int8_from_values(slot, values)
    if n >= 9 * QUANT_BLOCK:  # the special blocks are there
        assert slot.absmax[1] == 1 and slot.absmax[4] == 2.0**-100 and slot.absmax[5] == 0
        zero = block_loops.code_of(0.0, signed)
        assert set(slot.codes[5 * QUANT_BLOCK : 6 * QUANT_BLOCK]) == (
            {zero, zero - 1} if signed else {zero}  # -0.0 keeps its sign in the signed map
        )
        assert np.isnan(slot.absmax[7]) and slot.absmax[8] == np.inf


@SIGNS
def test_ties_go_to_the_even_code(signed):
    """Every midpoint of the map (an exact tie at absmax 1) gets the even one of its two codes."""
    mids = _mids(signed)
    slot = quantized(np.concatenate([[1.0], mids]).astype(np.float32), signed)
    assert (slot.codes[1:] % 2 == 0).all()
    assert (slot.codes[1:] - np.arange(255) <= 1).all()


@SIGNS
def test_nan_codes_are_the_table_lookups(signed):
    """A NaN block: absmax NaN (the largest magnitude bits: the NaN with the largest payload),
    a positive NaN value gets code 255 and a negative one 0 (the buckets of the values from 2 on);
    int8_from_values gives code 0 to both and canonical NaN as absmax."""
    v = np.full(300, 0.25, np.float32)
    v[[3, 4, 5]] = POSITIVE_NAN, NEGATIVE_NAN, np.uint32(0x7FC00005).view(np.float32)
    slot = quantized(v, signed)
    assert slot.absmax.view(np.uint32)[0] == 0x7FC00005 and slot.absmax[1] == 0.25
    assert slot.codes[3:6].tolist() == [255, 0, 255]
    assert np.isnan(dequantized(slot)[:256]).all()
    ref = precision.int8_from_values(v, signed)
    assert ref.codes[3:6].tolist() == [0, 0, 0] and ref.absmax.view(np.uint32)[0] == 0x7FC00000


@SIGNS
@pytest.mark.parametrize("n", SIZES)
def test_dequantize_equals_dequantized(n, signed):
    rng = np.random.default_rng(n + 1)
    blocks = precision.int8_block_count(n)
    absmax = (10.0 ** rng.uniform(-38, 38, blocks)).astype(np.float32)
    absmax[1::7] = 0.0
    absmax[2::11] = np.nan
    absmax[3::13] = np.inf
    slot = precision.Quantized(rng.integers(0, 256, n, dtype=np.uint8), absmax, signed)
    with np.errstate(invalid="ignore", over="ignore"):
        want = block_loops.dequantized(slot)
    assert want.dtype == np.float32
    assert dequantized(slot).tobytes() == want.tobytes()


@SIGNS
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_gives_the_slot_back(n, signed):
    """quantize(dequantize(slot)) == slot for a slot of quantized values: absmax from 1e-20 to
    1e20, all-zero blocks (with -0.0). Each block's largest magnitude is a positive value (code
    255, the map's 1.0): the signed map ends at -0.99297 below zero, so a block whose largest
    magnitude is negative dequantizes to a smaller largest magnitude (checked below) and is not
    a fixed point."""
    rng = np.random.default_rng(n + 2)
    v = rng.standard_normal(n) * np.repeat(10.0 ** rng.uniform(-20, 20, n // 256 + 1), 256)[:n]
    v = v.astype(np.float32)
    v = v if signed else np.abs(v)
    for b in range(0, n, QUANT_BLOCK):
        v[b] = np.abs(v[b : b + QUANT_BLOCK]).max() * np.float32(1.5)
    v[QUANT_BLOCK : 2 * QUANT_BLOCK] = 0.0
    v[QUANT_BLOCK + 1 : 2 * QUANT_BLOCK : 2] = -0.0
    slot = quantized(v, signed)
    again = quantized(dequantized(slot), signed)
    assert again.codes.tobytes() == slot.codes.tobytes()
    assert again.absmax.tobytes() == slot.absmax.tobytes()
    if signed and n:
        v[0] = -v[0]
        slot = quantized(v, signed)
        assert slot.codes[0] == 0
        shrunk = quantized(dequantized(slot), signed).absmax[0]
        assert shrunk == np.float32(slot.absmax[0] * block_loops.qmap(True)[0] * -1)


def test_the_backend_methods_run_the_passes():
    backend = dispatch.get_backend("numba-cpu")
    v = values_of(5000, True, seed=9)
    slot = empty_slot(v.size, True)
    backend.quantize(slot, v)
    assert_matches_int8_from_values(slot, v)
    out = np.empty(v.size, np.float32)
    backend.dequantize(slot, out, stream=None)
    with np.errstate(invalid="ignore"):
        assert out.tobytes() == block_loops.dequantized(slot).tobytes()
    base = dispatch.Backend()
    for method, args in ((base.dequantize, (slot, out)), (base.quantize, (slot, v))):
        with pytest.raises(NotImplementedError):
            method(*args)


def test_bad_arguments_are_refused_before_writing():
    slot = empty_slot(300, False)
    before = slot.codes.tobytes() + slot.absmax.tobytes()
    v = np.ones(300, np.float32)
    cases = [
        (block_loops.quantize_from, slot, np.ones(299, np.float32), ValueError, "300 elements"),
        (block_loops.quantize_from, slot, np.ones(300), ValueError, "float32"),
        (block_loops.dequantize_into, slot, np.ones(300, np.float64), ValueError, "float32"),
        (block_loops.dequantize_into, (1, 2), v, TypeError, "8-bit slot of host arrays"),
        (
            block_loops.quantize_from,
            precision.Quantized(slot.codes, np.zeros(1, np.float32), False),
            v,
            ValueError,
            "one per block",
        ),
        (block_loops.dequantize_into, slot, np.ones(600, np.float32)[::2], ValueError, "contig"),
    ]
    for fn, s, a, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn(s, a)
    ro = np.ones(300, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        block_loops.dequantize_into(slot, ro)
    block_loops.quantize_from(slot, ro)  # read-only values are fine
    assert slot.absmax.tolist() == [1.0, 1.0]
    assert before != slot.codes.tobytes() + slot.absmax.tobytes()


# ---------------------------------------------------------------------------------------------
# One fused block step = dequantize, the float32 rule, quantize.


def _scalars(rule, dtype=np.float32):
    """Plausible per-step scalars of ``rule`` (its fields of rules.SCALARS), cast to ``dtype``."""
    known = dict(
        decay=0.999,
        weight_decay=0.01,
        gsign=1.0,
        beta1=0.9,
        one_minus_beta1=0.1,
        beta2=0.999,
        one_minus_beta2=0.001,
        step_size=1e-2,
        bias_correction2_sqrt=0.0447,
        eps=1e-8,
        lr=0.05,
        momentum=0.9,
        one_minus_dampening=1.0,
        nesterov=1.0,
        first=0.0,
    )
    return tuple(np.dtype(dtype).type(known[f]) for f in SCALARS[rule])


def _state(rule):
    return {
        "adam": ("exp_avg", "exp_avg_sq"),
        "adam_amsgrad": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        "sgd_momentum": ("momentum_buffer",),
    }[rule]


def _start(rule, n, seed):
    """Parameter, gradient (scaled, a zero block and a NaN block) and 8-bit state slots."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 2, n)).astype(np.float32)
    g[QUANT_BLOCK : 2 * QUANT_BLOCK] = 0.0
    g[3 * QUANT_BLOCK + 5] = np.nan
    slots = []
    for name in _state(rule):
        signed = precision.INT8_SIGNED[name]
        s = rng.standard_normal(n) * 10.0 ** rng.integers(-4, 1, n)
        s = s if signed else np.abs(s)
        s[QUANT_BLOCK : 2 * QUANT_BLOCK] = 0.0
        slots.append(precision.int8_from_values(s.astype(np.float32), signed))
    return p, g, slots


def _copy(slot):
    return precision.Quantized(slot.codes.copy(), slot.absmax.copy(), slot.signed)


STEP_CASES = [
    ("adam", PARALLEL_THRESHOLD),  # the parallel block loop and cpu kernel
    ("adam_amsgrad", 4 * QUANT_BLOCK + 77),  # three slots, serial, a partial last block
    ("sgd_momentum", 4 * QUANT_BLOCK + 77),
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("rule, n", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_fused_step_equals_dequantize_rule_quantize(rule, n):
    """Two steps of ``block_loops.apply`` against dequantize -> ``cpu.apply`` (float32 state)
    -> quantize: the parameter, every slot's codes and absmax, bit for bit."""
    p, g, slots = _start(rule, n, seed=n)
    storage = Storage("float32", "float32", "int8", False, False)
    h, gs = _scalars(rule), (np.float32(0.5), np.float32(0.8))
    fused_p, fused = p.copy(), [_copy(s) for s in slots]
    staged_p, staged = p.copy(), [_copy(s) for s in slots]
    for step in (1, 2):
        block_loops.apply(rule, storage, fused_p, g, fused, None, h, gs, (0, step, 0))
        work = [dequantized(s) for s in staged]
        cpu.apply(rule, staged_p, g, work, h, gs)
        for s, w in zip(staged, work, strict=True):
            block_loops.quantize_from(s, w)
        assert staged_p.tobytes() == fused_p.tobytes(), step
        for a, b in zip(staged, fused, strict=True):
            assert a.codes.tobytes() == b.codes.tobytes(), step
            assert a.absmax.tobytes() == b.absmax.tobytes(), step
    assert np.isnan(fused[0].absmax[3])  # the NaN gradient's block
    assert np.isfinite(np.delete(fused[0].absmax, 3)).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fused_step_with_16bit_parameters_and_master_weights():
    """bfloat16 parameters with a float32 master copy: ``block_loops.apply`` against dequantize
    -> ``cpu_storage.apply`` with float32 state -> quantize."""
    n = 2 * PARALLEL_THRESHOLD
    p, g, slots = _start("adam", n, seed=4)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    p16, g16 = p.astype(bf16), g.astype(bf16)
    h, gs = _scalars("adam"), (np.float32(1.0), np.float32(0.0))
    rs = (0, 1, 0)
    fused_p, fused_w, fused = p16.copy(), p.copy(), [_copy(s) for s in slots]
    staged_p, staged_w, staged = p16.copy(), p.copy(), [_copy(s) for s in slots]
    int8 = Storage("bfloat16", "bfloat16", "int8", True, False)
    f32 = Storage("bfloat16", "bfloat16", "float32", True, False)
    block_loops.apply("adam", int8, fused_p, g16, fused, fused_w, h, gs, rs)
    work = [dequantized(s) for s in staged]
    cpu_storage.apply("adam", f32, staged_p, g16, work, staged_w, h, gs, rs)
    for s, w in zip(staged, work, strict=True):
        block_loops.quantize_from(s, w)
    assert staged_p.tobytes() == fused_p.tobytes() and staged_w.tobytes() == fused_w.tobytes()
    for a, b in zip(staged, fused, strict=True):
        assert a.codes.tobytes() == b.codes.tobytes() and a.absmax.tobytes() == b.absmax.tobytes()


# ---------------------------------------------------------------------------------------------
# Thread counts.


def child_digests():
    """SHA-256 of both passes over a parallel-size slot, both maps (tests/thread_counts.py)."""
    out = {}
    n = 3 * PARALLEL_THRESHOLD + 123
    for signed in (True, False):
        values = values_of(n, signed, seed=21)
        slot = quantized(values, signed)
        back = dequantized(slot)
        h = hashlib.sha256(slot.codes.tobytes() + slot.absmax.tobytes() + back.tobytes())
        out[str(signed)] = h.hexdigest()
    return out


def test_one_and_two_threads_give_the_same_bits():
    assert thread_counts.digests(__name__, 1) == thread_counts.digests(__name__, 2)
