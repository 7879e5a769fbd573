"""The activations of :class:`fastopt.nn.MLP`: one registry, :data:`ACTIVATIONS`, name -> definition.

Each :class:`Activation` holds its forward map and derivative as whole-array expressions of an
array module ``xp`` (NumPy or CuPy: the GPU path and the readable reference), the code of its
branch in the fused Numba kernels (``fastopt.kernels.nn_cpu``), its initialization gain and
whether ``init="auto"`` treats it as a ReLU-family activation (Kaiming init).

The derivative is taken from the output ``a`` (scaled by ``inv`` to undo the dropout scale on a
kept unit) where the output determines it, as the kernels do, or from the pre-activation ``z``
(gelu). ``alpha`` is ``negative_slope`` for leaky_relu and ``elu_alpha`` for elu.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..kernels.nn_cpu import ELU, GELU, IDENTITY, LEAKY_RELU, RELU, SIGMOID, TANH

__all__ = ["ACTIVATIONS", "Activation", "erf_function"]

SQRT_HALF = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327


@dataclass(frozen=True)
class Activation:
    """One activation: ``forward(xp, z, alpha) -> a``, ``derivative(xp, z, a, alpha, inv) ->
    da/dz``, ``code`` (the Numba kernels' branch), ``gain(negative_slope)`` (torch's
    ``calculate_gain``) and ``relu_like`` (Kaiming rather than Xavier for ``init="auto"``)."""

    name: str
    code: int
    forward: Callable
    derivative: Callable
    gain: Callable[[float], float]
    relu_like: bool
    reference: str
    """The torch function it matches (``torch.nn.functional`` names)."""


@functools.cache
def erf_function(xp):
    """The elementwise error function of array module ``xp`` (NumPy has none: ``math.erf``
    vectorized; CuPy: ``cupyx.scipy.special.erf``)."""
    if xp is np:
        return np.vectorize(math.erf, otypes=[np.float64])
    from cupyx.scipy.special import erf  # pragma: no cover - needs CuPy

    return erf  # pragma: no cover


def _t(a):
    return a.dtype.type


def _identity(xp, z, alpha):
    return z.copy()


def _identity_d(xp, z, a, alpha, inv):
    return xp.ones_like(a)


def _relu(xp, z, alpha):
    return xp.where(z < 0, _t(z)(0), z)


def _relu_d(xp, z, a, alpha, inv):
    return (a > 0).astype(a.dtype)


def _leaky_relu(xp, z, alpha):
    return xp.where(z < 0, z * _t(z)(alpha), z)


def _leaky_relu_d(xp, z, a, alpha, inv):
    t = _t(a)
    return xp.where(a > 0, t(1), t(alpha))


def _elu(xp, z, alpha):
    return xp.where(z < 0, _t(z)(alpha) * xp.expm1(z), z)


def _elu_d(xp, z, a, alpha, inv):
    t = _t(a)
    v = a * t(inv)
    return xp.where(v > 0, t(1), v + t(alpha))  # alpha·e^z = a + alpha for z < 0


def _gelu(xp, z, alpha):
    return (0.5 * z * (1.0 + erf_function(xp)(z * SQRT_HALF))).astype(z.dtype)


def _gelu_d(xp, z, a, alpha, inv):
    cdf = 0.5 * (1.0 + erf_function(xp)(z * SQRT_HALF))
    pdf = INV_SQRT_2PI * xp.exp(-0.5 * z * z)
    return (cdf + z * pdf).astype(a.dtype)


def _tanh(xp, z, alpha):
    return xp.tanh(z)


def _tanh_d(xp, z, a, alpha, inv):
    v = a * _t(a)(inv)
    return 1 - v * v


def _sigmoid(xp, z, alpha):
    e = xp.exp(-xp.abs(z))  # no overflow for either sign
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype)


def _sigmoid_d(xp, z, a, alpha, inv):
    v = a * _t(a)(inv)
    return v * (1 - v)


def _const(value):
    return lambda negative_slope: value


ACTIVATIONS = {
    a.name: a
    for a in (
        Activation("relu", RELU, _relu, _relu_d, _const(math.sqrt(2.0)), True, "relu"),
        Activation(
            "leaky_relu",
            LEAKY_RELU,
            _leaky_relu,
            _leaky_relu_d,
            lambda negative_slope: math.sqrt(2.0 / (1.0 + negative_slope**2)),
            True,
            "leaky_relu(negative_slope=alpha)",
        ),
        # elu and gelu get relu's sqrt(2), the usual choice (torch has no gain for them)
        Activation("elu", ELU, _elu, _elu_d, _const(math.sqrt(2.0)), True, "elu(alpha=alpha)"),
        Activation("gelu", GELU, _gelu, _gelu_d, _const(math.sqrt(2.0)), True, "gelu (erf)"),
        Activation("tanh", TANH, _tanh, _tanh_d, _const(5.0 / 3.0), False, "tanh"),
        Activation("sigmoid", SIGMOID, _sigmoid, _sigmoid_d, _const(1.0), False, "sigmoid"),
        Activation("identity", IDENTITY, _identity, _identity_d, _const(1.0), False, "(none)"),
    )
}
"""Every activation :class:`fastopt.nn.MLP` accepts, by name (the CLI and the scikit-learn
estimators read their choices from here)."""

BY_CODE = {a.code: a for a in ACTIVATIONS.values()}
"""The same definitions keyed by their kernel code."""
