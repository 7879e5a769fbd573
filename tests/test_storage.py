"""Storage helpers (kernels/storage.py, kernels/storage.cuh): 16-bit conversions, stochastic
rounding, the Philox hash and 8-bit blockwise quantization.

The Numba-compiled helpers are checked against the reference libraries (ml_dtypes for bfloat16,
NumPy for float16, Random123's known answers for Philox, bitsandbytes' maps and binary search),
the plain-Python helpers (what the CUDA simulator runs) against the compiled ones, and the CUDA C
header, built for the host by nvcc into a shared library (tests/storage_host_harness.cu), against
the compiled ones bit for bit. Tests that need nvcc skip without it.
"""

import ctypes
import json
import pathlib
import warnings

import ml_dtypes
import numba
import numpy as np
import pytest
from cupy_ptx import build_harness
from elementwise import elementwise
from oracle import import_or_skip
from ptx_without_gpu import PREAMBLE, run_ptx_script
from test_cuda_c import _run, nvrtc_or_skip

from fastopt.kernels import storage

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
HARNESS = pathlib.Path(__file__).resolve().parent / "storage_host_harness.cu"
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
RNG_SEED = 20240611
N_RANDOM = 1_000_000

# ---------------------------------------------------------------------------------------------
# Compiled helpers and elementwise drivers.

H = storage.compile_storage(numba.njit, "cpu")


bf16_rne = elementwise(H["f32_to_bf16_rne"], 1, np.uint16)
f16_rne = elementwise(H["f32_to_f16_rne"], 1, np.uint16)
bf16_sr = elementwise(H["f32_to_bf16_sr"], 2, np.uint16)
f16_sr = elementwise(H["f32_to_f16_sr"], 2, np.uint16)
bf16_widen = elementwise(H["bf16_to_f32"], 1, np.float32)
f16_widen = elementwise(H["f16_to_f32"], 1, np.float32)
absmax_update = elementwise(H["absmax_update"], 2, np.float32)


@numba.njit
def _random_words(seed, step, index, out):
    for i in range(seed.size):
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = random_bits4(seed[i], step[i], index[i])


random_bits4 = H["random_bits4"]
random_bits = H["random_bits"]


def random_words(seed, step, index):
    out = np.empty((seed.size, 4), np.int64)
    _random_words(seed.astype(np.int64), step.astype(np.int64), index.astype(np.int64), out)
    return out.astype(np.uint32)


@numba.njit
def _sr_hashed(is_f16, x, seed, step, index0, out):
    for i in range(x.size):
        r = random_bits(seed, step, index0 + i)
        out[i] = f32_to_f16_sr(x[i], r) if is_f16 else f32_to_bf16_sr(x[i], r)


f32_to_f16_sr = H["f32_to_f16_sr"]
f32_to_bf16_sr = H["f32_to_bf16_sr"]


def sr_hashed(is_f16, x, seed, step, index0):
    out = np.empty(x.size, np.uint16)
    _sr_hashed(is_f16, x, seed, step, index0, out)
    return out


@numba.njit
def _quantize_all(xn, qmap, out):
    for i in range(xn.size):
        out[i] = quantize(xn[i], qmap)


@numba.njit
def _quantize_values(x, absmax, qmap, out):
    for i in range(x.size):
        out[i] = quantize_value(x[i], absmax[i], qmap)


@numba.njit
def _dequantize_all(code, absmax, qmap, out):
    for i in range(code.size):
        out[i] = dequantize(code[i], absmax[i], qmap)


@numba.njit
def _block_absmaxes(a, block, out):
    for b in range(out.size):
        out[b] = block_absmax(a, b * block, min((b + 1) * block, a.size))


quantize, quantize_value = H["quantize"], H["quantize_value"]
dequantize, block_absmax = H["dequantize"], H["block_absmax"]


def quantize_all(xn, qmap):
    out = np.empty(xn.size, np.uint8)
    _quantize_all(xn, qmap, out)
    return out


def quantize_values(x, absmax, qmap):
    out = np.empty(x.size, np.uint8)
    _quantize_values(x, absmax, qmap, out)
    return out


def dequantize_all(code, absmax, qmap):
    out = np.empty(code.size, np.float32)
    _dequantize_all(code, absmax, qmap, out)
    return out


def block_absmaxes(a, block=storage.QUANT_BLOCK):
    out = np.empty(-(-a.size // block), np.float32)
    _block_absmaxes(a, block, out)
    return out


# ---------------------------------------------------------------------------------------------
# Inputs.


def as_f32(bits):
    return np.ascontiguousarray(bits, dtype=np.uint32).view(np.float32)


def bits_of(x):
    return np.ascontiguousarray(x).view(np.uint32 if x.dtype == np.float32 else np.uint16)


def bf16_cases():
    """Every upper half with the low halves that decide rounding (0, 1, just below/at/above the
    tie, all ones, a random one), then 10**6 random patterns."""
    rng = np.random.default_rng(RNG_SEED)
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF]
    structured = [high | low for low in lows]
    structured.append(high | rng.integers(0, 1 << 16, high.size, dtype=np.uint32))
    random = rng.integers(0, 1 << 32, N_RANDOM, dtype=np.uint32)
    return as_f32(np.concatenate([*structured, random]))


def f16_cases():
    """Every float16 value widened, every midpoint between neighbours (exact ties) and the float32
    values one ulp on each side of them, the subnormal band bit by bit near its edges, 10**6
    random patterns and 10**6 random values in float16's range."""
    rng = np.random.default_rng(RNG_SEED + 1)
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = np.sort(values[np.isfinite(values)].astype(np.float64))
    mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)  # exact: 12 significant bits
    around = [mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))]
    edges = np.array(
        [2.0**-25, 2.0**-24, 2.0**-14, 65504, 65519, 65520, 65536, 2.0**-26], np.float32
    )
    band = np.concatenate([bits_of(edges).astype(np.int64) + d for d in range(-64, 65)])
    big = rng.uniform(-70000, 70000, N_RANDOM).astype(np.float32)
    small = (rng.uniform(-1, 1, N_RANDOM) * 2.0 ** rng.uniform(-30, -12, N_RANDOM)).astype(
        np.float32
    )
    random = as_f32(rng.integers(0, 1 << 32, N_RANDOM, dtype=np.uint32))
    parts = [values.astype(np.float32), *around, as_f32(band), big, small, random]
    x = np.concatenate([np.concatenate([p, -p]) for p in parts])
    return np.ascontiguousarray(x, dtype=np.float32)


@pytest.fixture(scope="module")
def bf16_inputs():
    return bf16_cases()


@pytest.fixture(scope="module")
def f16_inputs():
    return f16_cases()


# ---------------------------------------------------------------------------------------------
# bfloat16 and float16 round to nearest even.


def test_bf16_rne_matches_ml_dtypes(bf16_inputs):
    with np.errstate(invalid="ignore", over="ignore"):
        expected = bf16_inputs.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(bf16_rne(bf16_inputs), expected)


def test_bf16_rne_edges():
    cases = {
        0x3F800000: 0x3F80,  # 1
        0x3F808000: 0x3F80,  # tie, even below
        0x3F818000: 0x3F82,  # tie, odd below: up
        0x3F808001: 0x3F81,
        0x7F7F7FFF: 0x7F7F,
        0x7F7F8000: 0x7F80,  # tie above the largest bfloat16: Inf
        0x7F7FFFFF: 0x7F80,  # float32 max overflows
        0xFF7FFFFF: 0xFF80,
        0x00008000: 0x0000,  # subnormal tie to even zero
        0x00018000: 0x0002,
        0x80000001: 0x8000,  # -0 keeps its sign
        0x7F800000: 0x7F80,
        0xFF800000: 0xFF80,
        0x7F800001: 0x7FC0,  # signalling NaN -> quiet, payload dropped
        0xFFA12345: 0xFFC0,
        0x7FFFFFFF: 0x7FC0,
    }
    got = bf16_rne(as_f32(list(cases)))
    assert [hex(v) for v in got] == [hex(v) for v in cases.values()]


@pytest.mark.oracle
def test_bf16_rne_matches_torch(bf16_inputs):
    from oracle import torch_or_skip

    torch = torch_or_skip()
    ours = bf16_rne(bf16_inputs)
    theirs = torch.from_numpy(bf16_inputs).to(torch.bfloat16).view(torch.int16).numpy()
    nan = np.isnan(bf16_inputs)
    np.testing.assert_array_equal(ours[~nan], theirs.view(np.uint16)[~nan])
    assert np.isnan(ours[nan].view(ml_dtypes.bfloat16).astype(np.float32)).all()


def test_bf16_widen_matches_ml_dtypes():
    bits = np.arange(1 << 16, dtype=np.uint16)
    expected = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(bits_of(bf16_widen(bits)), bits_of(expected))


def _f16_nan_expected(x):
    u = bits_of(x).astype(np.uint32)
    payload = (u >> 13) & 0x3FF
    payload[payload == 0] = 1
    return (((u >> 16) & 0x8000) | 0x7C00 | payload).astype(np.uint16)


def test_f16_rne_matches_numpy(f16_inputs):
    ours = f16_rne(f16_inputs)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = f16_inputs.astype(np.float16).view(np.uint16)
    nan = np.isnan(f16_inputs)
    np.testing.assert_array_equal(ours[~nan], expected[~nan])
    # NaN: NumPy's software cast keeps the sign and top payload bits (hardware casts may quiet).
    np.testing.assert_array_equal(ours[nan], _f16_nan_expected(f16_inputs[nan]))
    assert np.isnan(ours[nan].view(np.float16)).all()


def test_f16_rne_edges():
    cases = {
        65504.0: 0x7BFF,
        65519.99609375: 0x7BFF,
        65520.0: 0x7C00,  # tie above the largest float16: Inf
        2.0**-24: 0x0001,
        2.0**-25: 0x0000,  # tie to even zero
        float(np.nextafter(np.float32(2.0**-25), np.float32(1))): 0x0001,
        3 * 2.0**-25: 0x0002,  # 1.5 ulp: tie to even 2
        5 * 2.0**-25: 0x0002,  # 2.5 ulp: tie to even 2
        float(np.nextafter(np.float32(2.0**-14), np.float32(0))): 0x0400,  # up into the normals
        -0.0: 0x8000,
        1.0 + 2.0**-11: 0x3C00,  # tie, even below
        1.0 + 3 * 2.0**-11: 0x3C02,  # tie, odd below: up
    }
    got = f16_rne(np.array(list(cases), np.float32))
    assert [hex(v) for v in got] == [hex(v) for v in cases.values()]


def test_f16_widen_matches_numpy():
    bits = np.arange(1 << 16, dtype=np.uint16)
    ours = f16_widen(bits)
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(bits_of(ours)[~nan], bits_of(expected)[~nan])
    u = bits[nan].astype(np.uint32)
    payload = ((u & 0x8000) << 16) | 0x7F800000 | ((u & 0x3FF) << 13)
    np.testing.assert_array_equal(bits_of(ours)[nan], payload)


# ---------------------------------------------------------------------------------------------
# Stochastic rounding.


def _hash_bits(n, seed=7, step=3):
    index = np.arange(n, dtype=np.int64)
    return random_words(np.full(n, seed), np.full(n, step), index)[:, 0]


def _assert_unbiased(up, frac, what):
    """up: 0/1 per value (rounded away from zero); frac: the exact probability it should have.
    The mean error in ulps (up - frac) must be within 3 standard errors of zero."""
    err = up.astype(np.float64) - frac
    se = np.sqrt(np.mean(frac * (1 - frac)) / up.size)
    assert abs(err.mean()) < 3 * se, f"{what}: mean error {err.mean():.3g} ulp, se {se:.3g}"


@pytest.mark.parametrize("k", [1, 6554, 19661, 32768, 49152, 65535])
def test_bf16_sr_unbiased(k):
    """x = t + (k / 65536) ulp for random bfloat16 t (both signs, normal and subnormal): rounding
    away from zero happens with probability k / 65536, so the mean error is zero. Truncation
    fails this for every k, round-to-nearest for every k but the tie 32768."""
    rng = np.random.default_rng(k)
    n = N_RANDOM
    t = rng.integers(0, 0x7F7F, n, dtype=np.uint32)  # finite magnitudes below the largest
    t |= rng.integers(0, 2, n, dtype=np.uint32) << 15
    x = as_f32((t << 16) | k)
    out = bf16_sr(x, _hash_bits(n, seed=k).astype(np.int64))
    up = out.astype(np.int64) - t.astype(np.int64)
    assert set(np.unique(up)) <= {0, 1}
    _assert_unbiased(up, np.full(n, k / 65536), f"bf16 k={k}")


def _f16_neighbours(x):
    """(t, t + 1): float16 bits truncated toward zero and the next magnitude, for finite x."""
    h = np.abs(x).astype(np.float16)  # nearest, then step down where it rounded up
    hb = h.view(np.uint16).astype(np.int64)
    hb -= (h.astype(np.float64) > np.abs(x).astype(np.float64)).astype(np.int64)
    sign = (np.signbit(x).astype(np.int64)) << 15
    return sign | hb, sign | (hb + 1), hb


@pytest.mark.parametrize(
    "lo, hi",
    [(2.0**-14, 65504.0), (2.0**-24, 2.0**-14), (2.0**-31, 2.0**-24)],
    ids=["normal", "subnormal", "below-smallest-subnormal"],
)
def test_f16_sr_unbiased(lo, hi):
    """Random x in [lo, hi) (both signs): the mean of (rounded - x) / ulp is zero within 3 SE, and
    every result is one of x's two float16 neighbours."""
    rng = np.random.default_rng(int(-np.log2(lo)))
    n = N_RANDOM
    x = (2.0 ** rng.uniform(np.log2(lo), np.log2(hi), n)).astype(np.float32)
    x *= np.where(rng.integers(0, 2, n) == 1, np.float32(-1), np.float32(1))
    out = f16_sr(x, _hash_bits(n, seed=11).astype(np.int64))
    down, up, mag = _f16_neighbours(x)
    assert np.all((out == down) | (out == up))
    lo16 = mag.astype(np.uint16).view(np.float16).astype(np.float64)
    ulp = (mag + 1).astype(np.uint16).view(np.float16).astype(np.float64) - lo16
    frac = (np.abs(x).astype(np.float64) - lo16) / ulp
    _assert_unbiased((out == up).astype(np.int64), frac, f"f16 [{lo}, {hi})")


def test_sr_mean_error_fixed_fraction_f16():
    """A fixed fraction (0.3 ulp) above random float16 values in the normal and subnormal ranges:
    RNE would always round down (mean error -0.3 ulp); SR's mean error is zero."""
    rng = np.random.default_rng(5)
    n = N_RANDOM
    k = 2458  # 0.3 * 8192
    t = rng.integers(1, 0x7BFF, n, dtype=np.uint32)
    # (t + k / 8192) ulp exactly: normal t -> float32 bits; subnormal t -> (m + k/8192) * 2**-24.
    exp = t >> 10
    normal = as_f32(((t + (112 << 10)) << 13) | k)
    subnormal = ((t & 0x3FF) + k / 8192.0) * 2.0**-24
    x = np.where(exp > 0, normal, subnormal.astype(np.float32)).astype(np.float32)
    out = f16_sr(x, _hash_bits(n, seed=13).astype(np.int64))
    up = out.astype(np.int64) - t.astype(np.int64)
    assert set(np.unique(up)) <= {0, 1}
    _assert_unbiased(up, np.full(n, k / 8192), "f16 fixed 0.3 ulp")


def test_f16_sr_threshold_follows_the_definition():
    """For x across the whole range (normal, subnormal, below the smallest subnormal down to
    float32 subnormals): with F = the fraction of an ulp above the truncation written with K =
    min(k, 32) bits (k = bits of |x| below float16's last place), x rounds up exactly when
    (rbits mod 2**K) >= 2**K - F: checked at the threshold and one below."""
    from fractions import Fraction

    rng = np.random.default_rng(6)
    x = (2.0 ** rng.uniform(-149, 15.9, 4000) * rng.uniform(1, 2, 4000)).astype(np.float32)
    x = x[(x > 0) & (x < 65504)]
    t = _f16_neighbours(x)[2]
    for xi, ti in zip(x.tolist(), t.tolist()):
        lo = Fraction(float(np.uint16(ti).view(np.float16)))
        ulp = Fraction(float(np.uint16(ti + 1).view(np.float16))) - lo
        e32 = max(int(np.frexp(np.float32(xi))[1]) - 1, -126)  # xi in [2**e32, 2**(e32 + 1))
        k = int(np.log2(float(ulp))) - (e32 - 23)  # ulp / float32 ulp = 2**k
        K = min(k, 32)
        F = int((Fraction(xi) - lo) / ulp * 2**K)
        if F == 0:
            assert f16_sr(np.float32([xi]), np.array([2**K - 1], np.int64))[0] == ti
            continue
        r = np.array([2**K - F, 2**K - F - 1], np.int64)
        assert f16_sr(np.float32([xi, xi]), r).tolist() == [ti + 1, ti], (xi, k)


def test_sr_exact_values_stay_and_nonfinite_kept():
    rng = np.random.default_rng(3)
    r = rng.integers(0, 1 << 32, 4096, dtype=np.uint32).astype(np.int64)
    exact_bf16 = as_f32(rng.integers(0, 1 << 16, 4096, dtype=np.uint32) << 16)
    exact_bf16 = exact_bf16[np.isfinite(exact_bf16)]
    np.testing.assert_array_equal(bf16_sr(exact_bf16, r[: exact_bf16.size]), bf16_rne(exact_bf16))
    exact_f16 = rng.integers(0, 1 << 16, 4096, dtype=np.uint16).view(np.float16)
    exact_f16 = exact_f16[np.isfinite(exact_f16)].astype(np.float32)
    np.testing.assert_array_equal(f16_sr(exact_f16, r[: exact_f16.size]), f16_rne(exact_f16))
    special = as_f32([0x7F800000, 0xFF800000, 0x7FC00000, 0xFF800001, 0x7F800001])
    for rbits in (0, 1, 0xFFFF, 0x1FFF, 0xFFFFFFFF, 0x12345678):
        rr = np.full(special.size, rbits, np.int64)
        np.testing.assert_array_equal(bf16_sr(special, rr), bf16_rne(special))
        np.testing.assert_array_equal(f16_sr(special, rr), f16_rne(special))
    # Above the largest finite value the upper neighbour is Inf; from 65536 on float16 is Inf.
    big = np.array([65536.0, 1e30, -7e4], np.float32)
    np.testing.assert_array_equal(f16_sr(big, np.zeros(3, np.int64)), [0x7C00, 0x7C00, 0xFC00])
    assert f16_sr(np.array([65505.0], np.float32), np.array([0], np.int64))[0] == 0x7BFF
    assert f16_sr(np.array([65535.0], np.float32), np.array([0x1FFF], np.int64))[0] == 0x7C00


# ---------------------------------------------------------------------------------------------
# Philox4x32-10.

KAT = [  # Random123 tests/kat_vectors, "philox4x32 10": counter[4], key[2] -> output[4]
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


def philox_reference(counter, key):
    """Philox4x32-10 on Python ints, written from Salmon et al. (2011), section 4.1."""
    c, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
        k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
    return c


def _triples(n, rng):
    seed = rng.integers(0, 1 << 63, n, dtype=np.int64)
    step = rng.integers(0, 1 << 40, n, dtype=np.int64)
    index = rng.integers(0, 1 << 62, n, dtype=np.int64)
    index[: n // 4] %= 1 << 32  # 32-bit indices too, and some just around 2**32
    index[n // 4 : n // 2] = (1 << 32) + rng.integers(-1000, 1000, n // 2 - n // 4)
    step[: n // 8] = rng.integers(0, 100, n // 8)
    return seed, step, index


def test_philox_known_answers():
    compiled = H["philox4x32_10"]
    for counter, key, expected in KAT:
        assert philox_reference(counter, key) == expected
        assert [int(v) for v in compiled(*counter, *key)] == expected
        assert [int(v) for v in storage.philox4x32_10(*counter, *key)] == expected


def test_random_bits_matches_reference():
    seed, step, index = _triples(20_000, np.random.default_rng(1))
    words = random_words(seed, step, index)
    for i in range(0, seed.size, 37):
        s, t, j = int(seed[i]), int(step[i]), int(index[i])
        counter = [j & 0xFFFFFFFF, j >> 32, t & 0xFFFFFFFF, t >> 32]
        expected = philox_reference(counter, [s & 0xFFFFFFFF, s >> 32])
        assert [int(w) for w in words[i]] == expected, (s, t, j)
        assert [int(w) for w in storage.random_bits4(s, t, j)] == expected
        assert int(random_bits(s, t, j)) == expected[0] == int(storage.random_bits(s, t, j))


def test_random_bits_uniform():
    """2**20 consecutive indices: the top byte of each word is uniform (chi-square, 255 degrees of
    freedom, far below the 5-sigma bound) and every bit is set half of the time."""
    n = 1 << 20
    words = random_words(np.full(n, 1234), np.full(n, 9), np.arange(n) + (1 << 32) - n // 2)
    for w in words.T:
        counts = np.bincount(w >> 24, minlength=256)
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
        assert chi2 < 255 + 5 * np.sqrt(2 * 255), chi2
        ones = ((w[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=0)
        assert np.all(np.abs(ones - 0.5) < 5 * 0.5 / np.sqrt(n)), ones
    # Neighbouring steps and seeds give unrelated streams.
    other_step = random_words(np.full(n, 1234), np.full(n, 10), np.arange(n) + (1 << 32) - n // 2)
    other_seed = random_words(np.full(n, 1235), np.full(n, 9), np.arange(n) + (1 << 32) - n // 2)
    for other in (other_step, other_seed):
        assert np.mean(other[:, 0] == words[:, 0]) < 1e-4
        corr = np.corrcoef(other[:, 0].astype(np.float64), words[:, 0].astype(np.float64))[0, 1]
        assert abs(corr) < 5 / np.sqrt(n)


# ---------------------------------------------------------------------------------------------
# 8-bit: maps, quantization, absmax.

MAPS = {"signed": storage.DYNAMIC_MAP_SIGNED, "unsigned": storage.DYNAMIC_MAP_UNSIGNED}


@pytest.mark.parametrize("kind", list(MAPS))
def test_dynamic_map_matches_fixture(kind):
    expected = json.loads((FIXTURES / "dynamic_maps.json").read_text())[kind]
    assert [f"{int(b):08x}" for b in MAPS[kind].view(np.uint32)] == expected
    table = MAPS[kind].astype(np.float64)
    assert table.size == 256 and np.all(np.diff(table) > 0) and table[-1] == 1.0
    if kind == "signed":
        assert table[127] == 0.0
        np.testing.assert_array_equal(table[:127], -table[254:127:-1])
    else:
        assert table[0] == 0.0


@pytest.mark.oracle
@pytest.mark.parametrize("kind", list(MAPS))
def test_dynamic_map_matches_bitsandbytes(kind):
    with warnings.catch_warnings():  # its import triggers torch.jit deprecation warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        bnb_functional = import_or_skip("bitsandbytes.functional")  # required with the oracle
    expected = bnb_functional.create_dynamic_map(signed=kind == "signed").numpy()
    np.testing.assert_array_equal(MAPS[kind].view(np.uint32), expected.view(np.uint32))


def bnb_dquantize(x, code):
    """bitsandbytes' dQuantize<0> (csrc/kernels.cu), transcribed and vectorised over x: the oracle
    of storage.quantize's search and tie rule."""
    x = np.asarray(x, np.float32)
    pivot = np.full(x.shape, 127)
    upper_pivot, lower_pivot = np.full(x.shape, 255), np.zeros(x.shape, int)
    lower, upper = np.full(x.shape, np.float32(-1.0)), np.full(x.shape, np.float32(1.0))
    val = code[pivot]
    for i in (64, 32, 16, 8, 4, 2, 1):
        right = x > val
        lower_pivot = np.where(right, pivot, lower_pivot)
        lower = np.where(right, val, lower)
        upper_pivot = np.where(right, upper_pivot, pivot)
        upper = np.where(right, upper, val)
        pivot = np.where(right, pivot + i, pivot - i)
        val = code[pivot]
    upper = np.where(upper_pivot == 255, code[255], upper)
    lower = np.where(lower_pivot == 0, code[0], lower)
    right = x > val
    up = np.where(x > (upper + val) * np.float32(0.5), upper_pivot, pivot)
    down = np.where(x < (lower + val) * np.float32(0.5), lower_pivot, pivot)
    return np.where(right, up, down).astype(np.uint8)


def quant_cases(table, rng):
    """Map entries, float32 midpoints between neighbours (ties) and their float32 neighbours,
    values beyond the ends, NaN, and 10**5 uniform values over the map's range."""
    mids = ((table[1:] + table[:-1]) * np.float32(0.5)).astype(np.float32)
    near = [np.nextafter(mids, np.float32(s)) for s in (np.inf, -np.inf)]
    ends = np.array([-2.0, -1.0, 0.0, -0.0, 1.0, 2.0, 1e-30, -1e-30, np.nan], np.float32)
    uniform = rng.uniform(table[0] - 0.01, 1.01, 100_000).astype(np.float32)
    return np.concatenate([table, mids, *near, ends, uniform]).astype(np.float32)


@pytest.mark.parametrize("kind", list(MAPS))
def test_quantize_is_nearest_with_bitsandbytes_ties(kind):
    table = MAPS[kind]
    x = quant_cases(table, np.random.default_rng(8))
    codes = quantize_all(x, table)
    np.testing.assert_array_equal(codes, bnb_dquantize(x, table))
    np.testing.assert_array_equal(quantize_all(table, table), np.arange(256))
    finite = ~np.isnan(x)
    dist = np.abs(table[codes[finite]].astype(np.float64) - x[finite])
    best = np.min(np.abs(table[None, :].astype(np.float64) - x[finite][:2000, None]), axis=1)
    # Equal up to the rounding of the float32 midpoints the search compares with.
    assert np.all(dist[:2000] - best <= np.abs(x[finite][:2000]) * 2.0**-22)
    # An exact tie (the float32 midpoint of codes k, k + 1) goes to the even code.
    mids = ((table[1:] + table[:-1]) * np.float32(0.5)).astype(np.float32)
    k = np.arange(255)
    np.testing.assert_array_equal(quantize_all(mids, table), np.where(k % 2 == 0, k, k + 1))
    assert quantize_all(np.array([np.nan], np.float32), table)[0] == 0


@pytest.mark.parametrize("kind", list(MAPS))
def test_quantize_round_trip(kind):
    """Blocks of 256 values: quantize_value then dequantize lands on the map entry nearest to
    x / absmax, so the error is at most half the local gap of the map (times absmax)."""
    table = MAPS[kind]
    rng = np.random.default_rng(9)
    n = 256 * 400
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 4, n // 256).repeat(256)).astype(
        np.float32
    )
    if kind == "unsigned":
        x = np.abs(x)
    absmax = block_absmaxes(x)
    np.testing.assert_array_equal(absmax, np.abs(x).reshape(-1, 256).max(axis=1))
    per = absmax.repeat(256)
    codes = quantize_values(x, per, table)
    back = dequantize_all(codes, per, table)
    np.testing.assert_array_equal(back, table[codes] * per)
    xn = x.astype(np.float64) / per
    k = np.clip(np.searchsorted(table, xn), 1, 255)
    half_gap = (table[k].astype(np.float64) - table[k - 1]) / 2
    err = np.abs(back.astype(np.float64) - x) / per
    assert np.all(err <= half_gap * (1 + 1e-6) + 1e-7)
    # A block's positive maximum is stored exactly (code of 1).
    top = x == per
    assert top.any() and np.array_equal(back[top], x[top])


def test_absmax_nan_zero_and_short_blocks():
    a = np.zeros(256 * 3 + 10, np.float32)
    a[5], a[300], a[700], a[-1] = -3.5, np.nan, 2.0, -7.0
    m = block_absmaxes(a)
    assert m[0] == 3.5 and np.isnan(m[1]) and m[2] == 2.0 and m[3] == 7.0
    assert np.isnan(absmax_update(np.float32([np.nan, 1.0]), np.float32([1.0, np.nan]))).all()
    zero_codes = quantize_values(np.zeros(4, np.float32), np.zeros(4, np.float32), MAPS["signed"])
    assert np.all(MAPS["signed"][zero_codes] == 0)
    assert np.all(dequantize_all(zero_codes, np.zeros(4, np.float32), MAPS["signed"]) == 0)


def test_plain_python_helpers_match_compiled():
    """What the CUDA simulator executes (the functions called as Python on NumPy scalars)."""
    rng = np.random.default_rng(4)
    x = as_f32(rng.integers(0, 1 << 32, 3000, dtype=np.uint32))
    x[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 65520.0]
    r = rng.integers(0, 1 << 32, x.size, dtype=np.uint32).astype(np.int64)
    h = rng.integers(0, 1 << 16, x.size, dtype=np.uint16)
    py = {
        "bf16_rne": [storage.f32_to_bf16_rne(v) for v in x],
        "f16_rne": [storage.f32_to_f16_rne(v) for v in x],
        "bf16_sr": [storage.f32_to_bf16_sr(v, k) for v, k in zip(x, r)],
        "f16_sr": [storage.f32_to_f16_sr(v, k) for v, k in zip(x, r)],
    }
    assert py["bf16_rne"] == bf16_rne(x).tolist() and py["f16_rne"] == f16_rne(x).tolist()
    assert py["bf16_sr"] == bf16_sr(x, r).tolist() and py["f16_sr"] == f16_sr(x, r).tolist()
    widened = np.array([storage.f16_to_f32(v) for v in h], np.float32)
    np.testing.assert_array_equal(bits_of(widened), bits_of(f16_widen(h)))
    widened = np.array([storage.bf16_to_f32(v) for v in h], np.float32)
    np.testing.assert_array_equal(bits_of(widened), bits_of(bf16_widen(h)))
    for table in MAPS.values():
        xn = quant_cases(table, rng)[::50]
        assert [storage.quantize(v, table) for v in xn] == quantize_all(xn, table).tolist()
    blocks = rng.standard_normal(1000).astype(np.float32)
    assert storage.block_absmax(blocks, 10, 700) == block_absmax(blocks, 10, 700)


def test_compile_storage_rejects_unknown_target():
    with pytest.raises(ValueError, match="target"):
        storage.compile_storage(numba.njit, "gpu")


# ---------------------------------------------------------------------------------------------
# CUDA C: the header's tables, the host harness bit for bit, device code under CuPy's flags.


def test_header_tables_are_the_python_maps():
    assert storage.dynamic_map_macros() in (KERNELS / "storage.cuh").read_text()


@pytest.fixture(scope="module")
def harness(nvcc, tmp_path_factory):
    return build_harness(nvcc, HARNESS, tmp_path_factory.mktemp("storage_c"), {})


def _p(a):
    return ctypes.c_void_p(a.ctypes.data)


def c_apply(harness, name, out_dtype, *arrays, prefix=()):
    n = arrays[0].shape[0]
    out = np.empty(n, out_dtype)
    getattr(harness, name)(*prefix, ctypes.c_longlong(n), *map(_p, arrays), _p(out))
    return out


def test_c_maps_equal_python(harness):
    for is_signed, table in ((1, MAPS["signed"]), (0, MAPS["unsigned"])):
        out = np.empty(256, np.float32)
        harness.st_map(ctypes.c_int(is_signed), _p(out))
        np.testing.assert_array_equal(out.view(np.uint32), table.view(np.uint32))
    assert harness.st_quant_block() == storage.QUANT_BLOCK


def test_c_conversions_match_numba(harness, bf16_inputs, f16_inputs):
    for x in (bf16_inputs, f16_inputs):
        r = np.random.default_rng(x.size).integers(0, 1 << 32, x.size, dtype=np.uint32)
        np.testing.assert_array_equal(
            c_apply(harness, "st_f32_to_bf16_rne", np.uint16, x), bf16_rne(x)
        )
        np.testing.assert_array_equal(
            c_apply(harness, "st_f32_to_f16_rne", np.uint16, x), f16_rne(x)
        )
        rr = r.astype(np.int64)
        got = c_apply(harness, "st_f32_to_bf16_sr", np.uint16, x, r)
        np.testing.assert_array_equal(got, bf16_sr(x, rr))
        got = c_apply(harness, "st_f32_to_f16_sr", np.uint16, x, r)
        np.testing.assert_array_equal(got, f16_sr(x, rr))
    bits = np.arange(1 << 16, dtype=np.uint16)
    for name, ours in (("st_bf16_to_f32", bf16_widen), ("st_f16_to_f32", f16_widen)):
        np.testing.assert_array_equal(
            bits_of(c_apply(harness, name, np.float32, bits)), bits_of(ours(bits))
        )


def test_c_random_bits_match_numba(harness):
    seed, step, index = (a.astype(np.uint64) for a in _triples(50_000, np.random.default_rng(2)))
    out = np.empty((seed.size, 4), np.uint32)
    harness.st_random_bits4(ctypes.c_longlong(seed.size), _p(seed), _p(step), _p(index), _p(out))
    expected = random_words(seed.astype(np.int64), step.astype(np.int64), index.astype(np.int64))
    np.testing.assert_array_equal(out, expected)
    first = c_apply(harness, "st_random_bits", np.uint32, seed, step, index)
    np.testing.assert_array_equal(first, expected[:, 0])
    for counter, key, answer in KAT:
        c, k, o = np.array(counter, np.uint32), np.array(key, np.uint32), np.empty(4, np.uint32)
        harness.st_philox(_p(c), _p(k), _p(o))
        assert o.tolist() == answer


@pytest.mark.parametrize("is_f16", [0, 1], ids=["bf16", "f16"])
def test_c_hashed_sr_matches_numba(harness, is_f16):
    """Same (seed, step, index) -> same random bits -> same rounded bits, across 2**32."""
    rng = np.random.default_rng(10 + is_f16)
    x = (rng.standard_normal(200_000) * 2.0 ** rng.integers(-30, 10, 200_000)).astype(np.float32)
    seed, step, index0 = 987654321987, 12, (1 << 32) - 100_000
    out = np.empty(x.size, np.uint16)
    harness.st_sr_hashed(
        ctypes.c_int(is_f16), ctypes.c_longlong(x.size), _p(x), ctypes.c_ulonglong(seed),
        ctypes.c_ulonglong(step), ctypes.c_ulonglong(index0), _p(out),
    )  # fmt: skip
    np.testing.assert_array_equal(out, sr_hashed(bool(is_f16), x, seed, step, index0))


def test_c_quantization_matches_numba(harness):
    rng = np.random.default_rng(12)
    for is_signed, table in ((1, MAPS["signed"]), (0, MAPS["unsigned"])):
        xn = quant_cases(table, rng)
        got = c_apply(harness, "st_quantize", np.uint8, xn, prefix=(ctypes.c_int(is_signed),))
        np.testing.assert_array_equal(got, quantize_all(xn, table))
        x = (rng.standard_normal(256 * 64) * 1e-3).astype(np.float32)
        x[:256] = 0.0
        x[256:512] *= 1e-35  # subnormal values and absmax
        absmax = block_absmaxes(x)
        c_absmax = np.empty(absmax.size, np.float32)
        harness.st_block_absmax(ctypes.c_longlong(x.size), _p(x), _p(c_absmax))
        np.testing.assert_array_equal(c_absmax, absmax)
        per = absmax.repeat(256)
        codes = quantize_values(x, per, table)
        pre = (ctypes.c_int(is_signed),)
        np.testing.assert_array_equal(
            c_apply(harness, "st_quantize_value", np.uint8, x, per, prefix=pre), codes
        )
        got = c_apply(harness, "st_dequantize", np.float32, codes, per, prefix=pre)
        np.testing.assert_array_equal(bits_of(got), bits_of(dequantize_all(codes, per, table)))


DEVICE_SOURCE = """#include "storage.cuh"
__constant__ float fo_qmap[256] = FO_DYNAMIC_MAP_SIGNED;
extern "C" __global__ void storage_all(const float* x, const unsigned short* h, float* f,
                                       unsigned short* o, unsigned char* c, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const fo::Philox4 r = fo::random_bits4(7, 1, i);
    o[4 * i] = fo::f32_to_bf16_rne(x[i]);
    o[4 * i + 1] = fo::f32_to_bf16_sr(x[i], r.v[0]);
    o[4 * i + 2] = fo::f32_to_f16_rne(x[i]);
    o[4 * i + 3] = fo::f32_to_f16_sr(x[i], r.v[1]);
    f[3 * i] = fo::bf16_to_f32(h[i]);
    f[3 * i + 1] = fo::f16_to_f32(h[i]);
    const float m = fo::block_absmax(x, i & ~255ull, (i & ~255ull) + 256);
    c[i] = fo::quantize_value(x[i], m, fo_qmap);
    f[3 * i + 2] = fo::dequantize(c[i], m, fo_qmap);
}
"""


def test_device_code_is_ieee_under_cupy_flags(nvcc, tmp_path):
    """Device code of every helper, compiled with the flags CuPy forces (-ftz=true) and FMA
    contraction on: no flushed, fused or approximate float instruction."""
    src = tmp_path / "storage_device.cu"
    src.write_text(DEVICE_SOURCE)
    ptx = tmp_path / "storage_device.ptx"
    flags = ["-arch=sm_90", "-ptx", "-ftz=true", "-fmad=true", "-Werror", "all-warnings"]
    _run([nvcc, *flags, "-I", str(KERNELS), str(src), "-o", str(ptx)], tmp_path)
    text = ptx.read_text()
    assert ".entry storage_all" in text and "div.rn.f32" in text
    for forbidden in ("fma.", ".ftz", ".approx"):
        assert forbidden not in text, forbidden


def test_header_compiles_with_nvrtc():
    """NVRTC has no standard headers: storage.cuh must not need any."""
    nvrtc = nvrtc_or_skip()
    prog = ctypes.c_void_p()
    code = DEVICE_SOURCE.replace('#include "storage.cuh"', (KERNELS / "storage.cuh").read_text())
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"storage.cu", 0, None, None)
    assert rc == 0
    try:
        options = [b"-ftz=true", b"-arch=compute_80"]
        opts = (ctypes.c_char_p * len(options))(*options)
        rc = nvrtc.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        assert rc == 0, log.value.decode()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


_NUMBA_PTX = (
    PREAMBLE
    + """from fastopt.kernels import storage
helpers = storage.compile_storage(cuda.jit(device=True), "cuda")
f32, u16, i64 = types.float32, types.uint16, types.int64

def kernel(x, h, f, o, c, qmap, seed):
    i = cuda.grid(1)
    if i < x.size:
        r0, r1, r2, r3 = random_bits4(seed, 1, i)
        o[4 * i] = f32_to_bf16_rne(x[i])
        o[4 * i + 1] = f32_to_bf16_sr(x[i], r0)
        o[4 * i + 2] = f32_to_f16_rne(x[i])
        o[4 * i + 3] = f32_to_f16_sr(x[i], r1)
        f[3 * i] = bf16_to_f32(h[i])
        f[3 * i + 1] = f16_to_f32(h[i])
        m = block_absmax(x, i - i % 256, i - i % 256 + 256)
        c[i] = quantize_value(x[i], m, qmap)
        f[3 * i + 2] = dequantize(c[i], m, qmap)

kernel = pytypes.FunctionType(kernel.__code__, dict(helpers, cuda=cuda), "kernel")
arr = lambda t: types.Array(t, 1, "C")
sig = (arr(f32), arr(u16), arr(f32), arr(u16), arr(types.uint8), arr(f32), i64)
ptx, _ = cuda.compile_ptx(kernel, sig, cc=(9, 0))
assert ".entry" in ptx
print("ok")
"""
)


def test_numba_cuda_helpers_compile_to_ptx():
    """The cuda target (bitcast intrinsics of numba.cuda) compiles every helper; skipped where
    libNVVM is missing."""
    out = run_ptx_script(_NUMBA_PTX, path=ROOT)
    assert out.strip().endswith("ok"), out
