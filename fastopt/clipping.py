"""Gradient clipping and finiteness checks as functions (the optimizers fuse the same operations
into their step: ``max_grad_norm=``, ``max_grad_value=``, ``skip_nonfinite=``)."""

import math

import numpy as np

from . import streams
from .structure import flat_units
from .validation import check_real


def _units(grads, stream, writable=False):
    """[(backend, flat native view, stream handle)] of every gradient: ``stream`` when given,
    else the stream of the library that owns the array (:func:`fastopt.streams.current`);
    ``writable``: every array checked writable before the caller changes any."""
    override = streams.handle(stream)
    return [
        (b, flat, override if override is not None else streams.current(a))
        for b, flat, a in flat_units(grads, "grads", writable=writable)
    ]


def _norm_and_finite(units):
    sumsq, finite = 0.0, True
    for backend, a, stream in units:
        s, f = backend.sumsq_and_finite(a, stream)
        sumsq += s
        finite = finite and f
    return math.sqrt(sumsq), finite


def clip_coefficient(norm, max_norm):
    r"""The factor that brings gradients of global norm ``norm`` within ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_``: :math:`\min(1, \text{max\_norm} / (\text{norm} + 10^{-6}))`
    (NaN for a NaN norm). The one definition used by clipping, the optimizers' fused
    ``max_grad_norm`` and the distributed optimizers."""
    return min(max_norm / (norm + 1e-6), 1.0)


def global_norm(grads, *, stream=None):
    r"""The L2 norm over every array, :math:`\sqrt{\sum_i \|g_i\|_2^2}`, accumulated in float64.

    Deterministic: fixed chunks summed in a fixed order, whatever the thread count. ``grads``: a
    ParamSet (its gradient buffer), an array, or a list/tuple/dict of arrays (NumPy, torch CPU
    or CUDA tensors, CuPy or other CUDA arrays). On a GPU the reduction runs on ``stream`` (a
    torch/CuPy/numba stream or a handle; by default the arrays' library's current stream,
    :mod:`fastopt.streams`) and only that stream is synchronised to read the result.
    """
    return _norm_and_finite(_units(grads, stream))[0]


def all_finite(grads, *, stream=None):
    """True when no element of any gradient is NaN or +-Inf (one read of each array);
    ``stream`` as for :func:`global_norm`."""
    return _norm_and_finite(_units(grads, stream))[1]


def clip_grad_norm(grads, max_norm, *, error_if_nonfinite=False, stream=None):
    r"""Scale ``grads`` in place so their global L2 norm is at most ``max_norm``; return the norm
    before clipping. Same rule as ``torch.nn.utils.clip_grad_norm_`` (L2):

    .. math:: g \leftarrow g \cdot \min\!\left(1, \frac{\text{max\_norm}}{\|g\| + 10^{-6}}\right)

    ``max_norm``: a finite real number > 0 (Python or NumPy; not a bool): else TypeError for a
    non-number, ValueError for a value out of range. With ``error_if_nonfinite=True``, a total
    norm that is NaN or infinite raises FloatingPointError before anything is scaled, as torch
    raises: whether an element is NaN/Inf or every element is finite and the sum of squares
    overflows float64 (then clipping would scale every gradient by 0). The norm and the scaling
    run on ``stream`` (as for :func:`global_norm`).
    """
    max_norm = check_real("max_norm", max_norm, lo=0.0, lo_open=True)
    units = _units(grads, stream, writable=True)
    norm, finite = _norm_and_finite(units)
    if error_if_nonfinite and not (finite and math.isfinite(norm)):
        why = (
            "some gradient holds NaN or Inf"
            if not finite
            else "every element is finite but the sum of their squares overflows float64"
        )
        raise FloatingPointError(f"the total gradient norm is {norm}: {why}")
    coef = clip_coefficient(norm, max_norm)
    if coef < 1.0 or not finite:
        for backend, a, s in units:
            backend.scale(a, coef, s)
    return norm


def clip_grad_value(grads, clip_value, *, stream=None):
    """Clip every gradient element to [-clip_value, clip_value] in place
    (``torch.nn.utils.clip_grad_value_``); on a GPU on ``stream`` (as for :func:`global_norm`).
    ``clip_value``: a finite real number > 0, as ``max_norm`` of :func:`clip_grad_norm`."""
    clip_value = check_real("clip_value", clip_value, lo=0.0, lo_open=True)
    units = _units(grads, stream, writable=True)
    for _, a, _ in units:  # every array checked before the first is clamped
        if np.array(clip_value, dtype=a.dtype) == 0:
            raise ValueError(
                f"clip_value={clip_value!r} rounds to 0 in {np.dtype(a.dtype).name}; the smallest "
                f"clip it can hold is {float(np.finfo(a.dtype).smallest_subnormal):.3g}"
            )
    for backend, a, s in units:
        backend.clamp(a, clip_value, s)
