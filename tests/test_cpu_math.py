"""The numba-cpu helpers of ``kernels/cpu_math.py`` give the bits of the plain operations that the
other targets compute (Python, the CUDA simulator, numba-cuda, the CUDA C)."""

import numpy as np
import pytest
from numba import njit

from fastopt.kernels import cpu_math, rules


@njit(cache=False)
def _square_adds(acc, x):
    out = np.empty(acc.size)
    for i in range(acc.size):
        out[i] = cpu_math.square_add(acc[i], x[i])
    return out


@njit(cache=False)
def _divisions(x, c):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = cpu_math.divide_by_scalar(x[i], c)
    return out


def _float32_samples(n, seed=0):
    """Random bit patterns over the whole float32 range (subnormals, huge values, both signs)
    plus the edge values, without signalling NaNs."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = np.where(np.isnan(x), np.float32(np.nan), x)
    fi = np.finfo(np.float32)
    edges = [0.0, -0.0, fi.max, -fi.max, fi.tiny, fi.smallest_subnormal, 1.0, np.inf, -np.inf]
    return np.concatenate([x, np.array(edges, np.float32), rng.standard_normal(n, np.float32)])


def _same_bits(a, b):
    return np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_square_add_gives_the_product_and_sum_each_rounded(dtype):
    x = _float32_samples(200_000)
    x = x[np.isfinite(x)].astype(dtype)
    if dtype == np.float64:  # beyond float32's precision: the product is rounded
        x = x * (1 + np.random.default_rng(3).random(x.size))
    rng = np.random.default_rng(1)
    acc = rng.random(x.size) * 10.0 ** rng.integers(-300, 300, x.size)
    xv = x.astype(np.float64)
    assert _same_bits(_square_adds(acc, x), acc + xv * xv)


def test_divide_by_scalar_equals_the_float32_division():
    x = _float32_samples(400_000)
    steps = np.arange(1, 2001)
    divisors = [1.0 - b**t for b in (0.999, 0.95, 0.5) for t in steps[::37]]
    fi = np.finfo(np.float32)
    divisors += [1.0, 3.0, 0.1, fi.tiny, fi.smallest_subnormal, 7e-39, fi.max, np.inf]
    divisors += list(np.nextafter(np.float32(1), np.float32([0, 2])))
    for c in np.array(divisors, np.float32):
        with np.errstate(all="ignore"):
            expected = x / c
        assert _same_bits(_divisions(x, c), expected), c


def test_divide_by_scalar_keeps_the_float64_division():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(100_000) * 10.0 ** rng.integers(-300, 300, 100_000)
    for c in (1.0 - 0.999**7, 3.0, 1e-310):
        with np.errstate(all="ignore"):
            expected = x / c
        assert _same_bits(_divisions(x, c), expected)


def test_the_rules_helper_is_the_plain_division():
    """What every target but numba-cpu compiles (and what the CUDA C writes)."""
    assert rules.divide_by_scalar(np.float32(1), np.float32(3)) == np.float32(1) / np.float32(3)
    assert cpu_math.RULE_HELPERS["divide_by_scalar"] is cpu_math.divide_by_scalar
