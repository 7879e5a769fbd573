"""Arithmetic helpers of the numba-cpu loops that give the bits of the plain operations they
replace, with fewer or cheaper instructions: the other targets (Python, the CUDA simulator,
numba-cuda, the CUDA C) keep the plain operations and compute the same values.

- :func:`fma`: ``a * b + c`` rounded once (LLVM's ``llvm.fma``).
- :func:`square_add`: ``acc + x * x`` in float64, for the float64 sums of squares of the
  segment reductions and of Adafactor's phase 2. For an ``x`` of 32 bits or fewer the float64 product is exact (at most
  2 * 24 significant bits, far from float64's range limits), so one fma gives the bits of the
  product and the sum rounded separately, and saves the multiply (the sums of LAMB's
  reduction are bound by the floating-point ports, not by memory).
- :func:`divide_by_scalar`: ``x / c`` for a loop-invariant ``c``. For float32 it is
  ``float32(float64(x) * (1 / float64(c)))``: the same float32 for every ``x`` and every positive
  float32 ``c`` (the argument of ``block_loops.normalized``), with the reciprocal hoisted out of
  the loop and no division per element. LAMB's direction and Adafactor's ``v / bmean`` use it
  (both loops got faster on an AVX-512 Xeon); Adam's does not: in its bfloat16 storage loop there the conversions cost more
  than the division they save (0.96-0.99x against 1.06-1.08x torch fused, two A/B runs).
"""

import numpy as np
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` in float64 with one rounding."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


def _narrow(t):
    return isinstance(t, types.Float) and t.bitwidth <= 32


def square_add(acc, x):
    """``acc + float64(x) ** 2`` in float64, the product and the sum each rounded."""
    xv = np.float64(x)
    return acc + xv * xv


@overload(square_add, inline="always")
def _square_add(acc, x):
    if _narrow(x):

        def exact_product(acc, x):
            xv = np.float64(x)
            return fma(xv, xv, acc)

        return exact_product

    def rounded_product(acc, x):
        xv = np.float64(x)
        return acc + xv * xv

    return rounded_product


def divide_by_scalar(x, c):
    """``x / c`` rounded to the dtype of ``x``; ``c`` is positive and the same for every element."""
    return x / c


@overload(divide_by_scalar, inline="always")
def _divide_by_scalar(x, c):
    if all(isinstance(t, types.Float) and t.bitwidth == 32 for t in (x, c)):

        def through_float64(x, c):
            return np.float32(np.float64(x) * (1.0 / np.float64(c)))

        return through_float64

    def divided(x, c):
        return x / c

    return divided


RULE_HELPERS = {"divide_by_scalar": divide_by_scalar}
"""The helpers of ``rules.py`` that the numba-cpu target replaces (``compile_rules``'s
``overrides``)."""
