"""The fast paths of the storage and block loops give the bits of the arithmetic they replace.

``block_loops.normalized`` (a value over its block's absmax, as float32(x * (1 / absmax)) in
float64 instead of a float32 division) against NumPy's float32 division on a dense sweep of one
binade of numerators (every significand pattern class), many divisor significands including the
extreme ones, subnormal numerators and divisors, signed zeros, Inf and NaN.
"""

import numpy as np
from numba import njit

from fastopt.kernels import block_loops

_normalized = block_loops.helper("normalized")


@njit
def _normalize_all(x, scale, out):
    inverse = 1.0 / np.float64(scale)
    for i in range(x.size):
        out[i] = _normalized(x[i], inverse)


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def test_normalized_is_float32_division():
    rng = np.random.default_rng(12)
    # One binade of numerators at a stride co-prime with the significand's powers of two, and
    # the numerators next to 1, 2 and the powers of two where rounding boundaries crowd.
    sweep = (np.arange(0, 1 << 23, 61, dtype=np.uint32) | 0x3F800000).view(np.float32)
    ends = np.float32(
        [np.nextafter(np.float32(v), np.float32(d)) for v in (1, 2, 0.5) for d in (0, 4)]
        + [1, 2, 0.5]
    )
    subnormal = (rng.integers(1, 1 << 23, 2000, dtype=np.uint32)).view(np.float32)
    special = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38, -3.4e38])
    x = np.concatenate([sweep, -sweep[::7], ends, subnormal, -subnormal, special])
    x = np.concatenate([x, x[: sweep.size // 3] * np.float32(2.0**-40)]).astype(np.float32)
    scales = np.concatenate(
        [
            np.float32([1.0, 1.5, 3.0, np.nextafter(np.float32(2), np.float32(0)), 0.1, 7e-39]),
            np.float32([1e-45, 3.4e38, np.inf]),
            (rng.integers(0, 1 << 23, 24, dtype=np.uint32) | 0x3F800000).view(np.float32),
        ]
    ).astype(np.float32)
    out = np.empty_like(x)
    for s in scales:
        _normalize_all(x, s, out)
        with np.errstate(all="ignore"):
            expected = x / s
        np.testing.assert_array_equal(_bits(out), _bits(expected), err_msg=f"scale {s!r}")
