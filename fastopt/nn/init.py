"""Weight initializers of :class:`fastopt.nn.MLP` and the activation gains they scale by.

Initializers: zeros, normal (std 0.01), xavier/glorot normal and uniform, kaiming/he normal and
uniform, lecun normal and uniform, orthogonal, or a callable ``init(fan_in, fan_out, rng) ->
array``; ``"auto"`` is Kaiming uniform for the relu family and Xavier uniform otherwise (the
output layer always Xavier uniform). Biases start at zero.
"""

from __future__ import annotations

import math

import numpy as np

from .activations import ACTIVATIONS

__all__ = ["INITIALIZERS", "auto_initializer", "gain", "initialize"]


def gain(activation, *, negative_slope=0.01):
    """The recommended gain of an activation (``torch.nn.init.calculate_gain``; elu and gelu get
    relu's sqrt(2), the usual choice)."""
    act = ACTIVATIONS.get(activation)
    if act is None:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    return act.gain(negative_slope)


def _zeros(fan_in, fan_out, rng, gain, std):
    return np.zeros((fan_in, fan_out))


def _normal(fan_in, fan_out, rng, gain, std):
    return rng.normal(0.0, std, (fan_in, fan_out))


def _xavier_normal(fan_in, fan_out, rng, gain, std):
    return rng.normal(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), (fan_in, fan_out))


def _xavier_uniform(fan_in, fan_out, rng, gain, std):
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, (fan_in, fan_out))


def _kaiming_normal(fan_in, fan_out, rng, gain, std):
    return rng.normal(0.0, gain / math.sqrt(fan_in), (fan_in, fan_out))


def _kaiming_uniform(fan_in, fan_out, rng, gain, std):
    bound = gain * math.sqrt(3.0 / fan_in)
    return rng.uniform(-bound, bound, (fan_in, fan_out))


def _lecun_normal(fan_in, fan_out, rng, gain, std):
    return rng.normal(0.0, 1.0 / math.sqrt(fan_in), (fan_in, fan_out))


def _lecun_uniform(fan_in, fan_out, rng, gain, std):
    bound = math.sqrt(3.0 / fan_in)
    return rng.uniform(-bound, bound, (fan_in, fan_out))


def _orthogonal(fan_in, fan_out, rng, gain, std):
    rows, cols = max(fan_in, fan_out), min(fan_in, fan_out)
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    q *= np.sign(np.diag(r))
    if fan_in < fan_out:
        q = q.T
    return gain * q


_DRAW = {
    "zeros": _zeros,
    "normal": _normal,
    "xavier_normal": _xavier_normal,
    "xavier_uniform": _xavier_uniform,
    "glorot_normal": _xavier_normal,
    "glorot_uniform": _xavier_uniform,
    "kaiming_normal": _kaiming_normal,
    "kaiming_uniform": _kaiming_uniform,
    "he_normal": _kaiming_normal,
    "he_uniform": _kaiming_uniform,
    "lecun_normal": _lecun_normal,
    "lecun_uniform": _lecun_uniform,
    "orthogonal": _orthogonal,
}

INITIALIZERS = ("auto", *_DRAW)
"""The initializer names ``MLP(init=...)`` accepts (besides a callable)."""


def initialize(name, fan_in, fan_out, rng, *, gain=1.0, std=0.01):
    """A (fan_in, fan_out) float64 weight matrix drawn by initializer ``name`` from ``rng``.

    ``zeros``; ``normal``: N(0, std²); ``xavier_normal``: std = gain·sqrt(2/(fan_in+fan_out));
    ``xavier_uniform``: U(±gain·sqrt(6/(fan_in+fan_out))) (Glorot & Bengio 2010);
    ``kaiming_normal``: std = gain/sqrt(fan_in); ``kaiming_uniform``: U(±gain·sqrt(3/fan_in))
    (He et al. 2015, fan_in mode, the gain being the activation's); ``lecun_normal``:
    std = 1/sqrt(fan_in); ``lecun_uniform``: U(±sqrt(3/fan_in)) (LeCun et al. 1998);
    ``orthogonal``: gain times a matrix with orthonormal rows or columns (Saxe et al. 2014; the QR
    of a Gaussian matrix, signs fixed as in ``torch.nn.init.orthogonal_``). ``glorot_*`` and
    ``he_*`` are the xavier and kaiming ones.
    """
    draw = _DRAW.get(name)
    if draw is None:
        raise ValueError(f"unknown initializer {name!r}; known: {', '.join(_DRAW)}")
    return draw(fan_in, fan_out, rng, gain, std)


def auto_initializer(activation, hidden):
    """The initializer ``init="auto"`` picks: Kaiming uniform for a hidden layer of the relu
    family, Xavier uniform otherwise (the output layer always)."""
    return "kaiming_uniform" if hidden and ACTIVATIONS[activation].relu_like else "xavier_uniform"
