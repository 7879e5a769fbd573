"""float16 on the CPU target through LLVM's ``half`` type (kernels/storage.py, ``native_half``).

Where the CPU converts in hardware (x86-64 with F16C), ``compile_storage(..., "cpu")`` compiles
``f16_to_f32`` and ``f32_to_f16_rne`` as ``fpext`` / ``fptrunc`` (vcvtph2ps / vcvtps2ph) with
a selected fix-up of NaN results (the hardware quiets signaling NaNs). They must give the
integer versions' bits (NumPy's casts; what numba-cuda, the simulator and ``storage.cuh``
compute) for every input: all 65536 float16 patterns and all 2**32 float32 patterns, compared
inside one compiled loop each.
"""

import re

import numba
import numpy as np

from fastopt.kernels import storage

NATIVE = storage.compile_storage(numba.njit, "cpu")
INTEGER = storage.compile_storage(numba.njit, "cpu", half=False)
load_native, load_integer = NATIVE["f16_to_f32"], INTEGER["f16_to_f32"]
store_native, store_integer = NATIVE["f32_to_f16_rne"], INTEGER["f32_to_f16_rne"]
float32_bits, bits_float32 = NATIVE["float32_bits"], NATIVE["bits_float32"]


# Each sweep returns the OR of (native bits XOR integer bits) over its inputs: 0 when all agree.
# A uint32 accumulator keeps the vectorised loop in 32-bit lanes (8 per AVX2 register).


@numba.njit
def _load_differences():
    bad = np.uint32(0)
    for h in range(1 << 16):
        b = np.uint16(h)
        bad = np.uint32(bad | (float32_bits(load_native(b)) ^ float32_bits(load_integer(b))))
    return bad


@numba.njit
def _store_differences(first, stop):
    bad = np.uint32(0)
    for u in range(first, stop):
        x = bits_float32(np.uint32(u))
        bad = np.uint32(bad | np.uint32(store_native(x) ^ store_integer(x)))
    return bad


@numba.njit
def _store_loop(x, out):
    for i in range(x.size):
        out[i] = store_native(x[i])


@numba.njit
def _load_loop(h, out):
    for i in range(h.size):
        out[i] = load_native(h[i])


def test_load_matches_integer_for_every_float16():
    assert _load_differences() == 0


def test_store_matches_integer_for_every_float32():
    assert _store_differences(0, 1 << 32) == 0


def test_nan_keeps_numpy_payloads():
    """The cases the hardware gets otherwise: signaling NaNs (quieted by vcvtph2ps/vcvtps2ph) and
    float32 payloads in the low 13 bits only (dropped to the canonical NaN by vcvtps2ph)."""
    h = np.array([0x7C01, 0xFC01, 0x7D55, 0x7E00, 0x7FFF], np.uint16)
    out = np.empty(h.size, np.float32)
    _load_loop(h, out)
    expected = [0x7F802000, 0xFF802000, 0x7FAAA000, 0x7FC00000, 0x7FFFE000]
    assert out.view(np.uint32).tolist() == expected
    u = np.array([0x7F800001, 0xFF801FFF, 0x7F802000, 0x7FC00000, 0x7FFFFFFF], np.uint32)
    out16 = np.empty(u.size, np.uint16)
    _store_loop(u.view(np.float32), out16)
    assert out16.tolist() == [0x7C01, 0xFC01, 0x7C01, 0x7E00, 0x7FFF]


def test_cpu_conversions_are_single_instructions():
    """With F16C the loops hold vcvtph2ps / vcvtps2ph (the vectorised ymm form included; with
    AVX512-FP16, as on Sapphire Rapids and later Xeons, LLVM picks its vcvtph2psx / vcvtps2phx,
    which round to nearest even under the default MXCSR as the immediate $4 does) and no call to
    compiler-rt's half routines (which Numba's JIT cannot resolve); without it the integer
    versions are compiled, with no half conversion at all."""
    _store_loop(np.zeros(1, np.float32), np.zeros(1, np.uint16))
    _load_loop(np.zeros(1, np.uint16), np.zeros(1, np.float32))
    asm = "\n".join("\n".join(f.inspect_asm().values()) for f in (_store_loop, _load_loop))
    assert not re.search(r"extendhfsf2|truncsfhf2|__gnu_", asm)
    if storage.native_half():
        assert re.search(r"vcvtph2psx?\s+[^\n]*%ymm", asm)
        assert re.search(r"vcvtps2ph\s+\$4, %ymm|vcvtps2phx\s+%ymm", asm)
    else:
        assert not re.search(r"cvtph2ps|cvtps2ph", asm)
