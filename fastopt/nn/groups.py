"""Optimizer param groups over an :class:`fastopt.nn.MLP`'s flat parameter buffer: weight decay on
the weights only, and the gradient views that match an optimizer's parameter views."""

from __future__ import annotations

import numpy as np

from ..arrays import data_ptr

__all__ = ["decay_groups", "grads_for"]


def own_view(flat, lo, hi):
    """``flat[lo:hi]`` as an array of its own (not a view sharing ``flat``'s base object): the
    optimizers refuse two param groups over views of one NumPy base, even disjoint ones."""
    if isinstance(flat, np.ndarray):
        # through bytes: the buffer protocol has no code for ml_dtypes' bfloat16
        return np.frombuffer(flat[lo:hi].view(np.uint8).data, dtype=np.uint8).view(flat.dtype)
    return flat[lo:hi]  # pragma: no cover - CuPy: groups are told apart by data pointer


def decay_groups(params, n_weights, weight_decay=0.0, per_tensor=False, **overrides):
    """Two param groups over views of ParamSet ``params`` whose first ``n_weights`` elements are
    the weights: those with ``weight_decay``, everything else without. Each group is one flat
    view (one kernel launch per group) or, with ``per_tensor``, a dict of a view per parameter
    tensor, in its shape: what an optimizer that takes statistics over each tensor (a norm, a
    factored moment: ``Optimizer.elementwise`` False) needs, since a flat view would be one tensor."""
    flat = params.flat
    if per_tensor:
        sides = ({}, {})
        offsets, shapes = params.offsets, params.shapes
        for name in params.names:
            lo, hi = offsets[name]
            sides[0 if lo < n_weights else 1][name] = own_view(flat, lo, hi).reshape(shapes[name])
        weights, rest = sides
    else:
        weights = [own_view(flat, 0, n_weights)]
        rest = [own_view(flat, n_weights, flat.size)] if n_weights < flat.size else []
    groups = [{"params": weights, "weight_decay": weight_decay, **overrides}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0, **overrides})
    return groups


def grads_for(params, optimizer):
    """The ``grads`` argument of ``optimizer.step`` for an optimizer over ParamSet ``params``:
    ``None`` (the ParamSet's own buffer) or the gradient views matching each parameter view in
    its param groups."""
    groups = optimizer.param_groups
    grouped = getattr(optimizer, "_grouped", len(groups) > 1)
    per_group = [_grad_like(params, g["params"]) for g in groups]
    if not grouped:
        return per_group[0]
    return per_group


def _grad_like(params, src):
    if src is params:
        return None
    if isinstance(src, dict):
        return {k: _grad_view(params, a) for k, a in src.items()}
    if isinstance(src, (list, tuple)):
        return [_grad_view(params, a) for a in src]
    return _grad_view(params, src)


def _grad_view(params, a):
    flat = params.flat
    item = flat.dtype.itemsize
    off, rem = divmod(data_ptr(a) - data_ptr(flat), item)
    if (
        rem
        or off < 0
        or off + a.size > flat.size
        or a.dtype != flat.dtype
        or not a.flags.c_contiguous
    ):
        raise ValueError(
            "the optimizer holds an array that is not a contiguous view of this model's "
            "parameters; build it over model.params or model.param_groups()"
        )
    return params.grad_flat[off : off + a.size].reshape(a.shape)
