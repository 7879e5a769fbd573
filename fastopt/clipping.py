"""Gradient clipping and finiteness checks as functions (the optimizers fuse the same operations
into their step: ``max_grad_norm=``, ``max_grad_value=``, ``skip_nonfinite=``)."""

import math

from . import dispatch
from .structure import flat_arrays


def _norm_and_finite(arrays):
    sumsq, finite = 0.0, True
    for a in arrays:
        s, f = dispatch.backend_for([a]).sumsq_and_finite(a)
        sumsq += s
        finite = finite and f
    return math.sqrt(sumsq), finite


def clip_coefficient(norm, max_norm):
    r"""The factor that brings gradients of global norm ``norm`` within ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_``: :math:`\min(1, \text{max\_norm} / (\text{norm} + 10^{-6}))`
    (NaN for a NaN norm). The one definition used by clipping, the optimizers' fused
    ``max_grad_norm`` and the distributed optimizers."""
    return min(max_norm / (norm + 1e-6), 1.0)


def global_norm(grads):
    r"""The L2 norm over every array, :math:`\sqrt{\sum_i \|g_i\|_2^2}`, accumulated in float64.

    Deterministic: fixed chunks summed in a fixed order, whatever the thread count. ``grads``: a
    ParamSet (its gradient buffer), an array, or a list/tuple/dict of arrays.
    """
    return _norm_and_finite(flat_arrays(grads, "grads"))[0]


def all_finite(grads):
    """True when no element of any gradient is NaN or +-Inf (one read of each array)."""
    return _norm_and_finite(flat_arrays(grads, "grads"))[1]


def clip_grad_norm(grads, max_norm, *, error_if_nonfinite=False):
    r"""Scale ``grads`` in place so their global L2 norm is at most ``max_norm``; return the norm
    before clipping. Same rule as ``torch.nn.utils.clip_grad_norm_`` (L2):

    .. math:: g \leftarrow g \cdot \min\!\left(1, \frac{\text{max\_norm}}{\|g\| + 10^{-6}}\right)
    """
    if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"invalid max_norm: {max_norm!r} (must be a finite number > 0)")
    arrays = flat_arrays(grads, "grads")
    norm, finite = _norm_and_finite(arrays)
    if error_if_nonfinite and not finite:
        raise FloatingPointError(
            f"the total gradient norm is {norm}: some gradient holds NaN or Inf"
        )
    coef = clip_coefficient(norm, max_norm)
    if coef < 1.0 or not finite:
        for a in arrays:
            a *= a.dtype.type(coef)
    return norm


def clip_grad_value(grads, clip_value):
    """Clip every gradient element to [-clip_value, clip_value] in place
    (``torch.nn.utils.clip_grad_value_``)."""
    if not (isinstance(clip_value, (int, float)) and math.isfinite(clip_value) and clip_value > 0):
        raise ValueError(f"invalid clip_value: {clip_value!r} (must be a finite number > 0)")
    for a in flat_arrays(grads, "grads"):
        a.clip(-clip_value, clip_value, out=a)
