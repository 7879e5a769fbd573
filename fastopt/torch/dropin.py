"""torch.optim's constructor keywords that select its implementation, and its tensor ``lr``.

``torch.optim.AdamW(params, lr=1e-3, fused=True)`` becomes ``fastopt.torch.AdamW(params,
lr=1e-3, fused=True)``: each ``fastopt.torch`` class takes the keywords of :data:`TORCH_FLAGS`
that its ``torch.optim`` namesake takes (none where torch has no such class), with torch's
defaults, and keeps them in ``defaults`` and in every param group as torch does, so that
``state_dict()`` param groups carry torch's keys and load into torch both ways.

- ``foreach`` and ``fused`` (None, False or True) choose among torch's implementations; fastopt
  always runs its fused kernels (one call per flat buffer), so they only check their value and
  are kept for torch. Both True is refused, as torch refuses it.
- ``capturable=True`` (CUDA-graph capture of the step) and ``differentiable=True`` (autograd
  through the step) are refused with ValueError: fastopt's step is a kernel call on buffers
  outside autograd, launched from the host with host-side scalars.

``lr`` may be a one-element tensor, as in torch (CPU tensors; its value is read at every step,
so an LR scheduler that writes into it in place drives the optimizer); torch's refusals hold:
a tensor of another size, and, for Adam and AdamW, a tensor ``lr`` with ``foreach=True``.
"""

import inspect

import torch

TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable")
"""torch.optim's implementation keywords, in the order of :func:`torch_flags`."""

REFUSED = {
    "capturable": "fastopt does not support CUDA-graph capture of the step (its kernels are "
    "launched from the host with host-side scalars such as the step count)",
    "differentiable": "fastopt's step runs outside autograd (fused kernels writing the flat "
    "buffers in place), so gradients cannot flow through it",
}
"""The flags whose True fastopt cannot honour, with the reason."""

TORCH_CONSTANT_KEYS = {"AdamW": {"decoupled_weight_decay": True}}
"""Param-group keys a torch class sets that are no argument of its constructor
(``torch.optim.AdamW`` is Adam with ``decoupled_weight_decay=True``)."""

TENSOR_LR_NO_FOREACH = frozenset({"Adam", "AdamW"})
"""torch classes that refuse a tensor ``lr`` with ``foreach=True`` (and ``capturable=False``,
the only value here)."""


def torch_flags(name):
    """{keyword: torch's default} of the :data:`TORCH_FLAGS` that ``torch.optim.<name>``
    takes; {} when torch has no optimizer of that name."""
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return {}
    params = inspect.signature(cls).parameters
    return {n: params[n].default for n in TORCH_FLAGS if n in params}


def torch_defaults(name):
    """The param-group keys ``fastopt.torch.<name>`` adds for torch: its flags with torch's
    defaults and :data:`TORCH_CONSTANT_KEYS`."""
    return {**torch_flags(name), **TORCH_CONSTANT_KEYS.get(name, {})}


def keyword_parameters(defaults):
    """``inspect.Parameter`` (keyword-only) of each flag in ``defaults``, for a signature."""
    kind = inspect.Parameter.KEYWORD_ONLY
    return [inspect.Parameter(n, kind, default=v) for n, v in defaults.items()]


def pop_flags(cls, kwargs):
    """The class's torch flags taken out of constructor ``kwargs`` (torch's defaults for those
    not given), checked by :func:`check_flags` before the caller writes anything."""
    flags = {**cls.torch_defaults}
    for name in cls.torch_flags:
        if name in kwargs:
            flags[name] = kwargs.pop(name)
    check_flags(flags, cls.__name__)
    return flags


def check_flags(group, where):
    """ValueError naming the flag of ``group`` (a param group or the constructor's flags) that
    fastopt cannot honour, or that has a value torch refuses; nothing else is looked at."""
    for name in ("foreach", "fused"):
        v = group.get(name)
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{where}: {name} must be None, False or True, got {v!r}")
    if group.get("foreach") and group.get("fused"):
        raise ValueError(f"{where}: fused=True and foreach=True cannot be set together (torch)")
    for name, why in REFUSED.items():
        v = group.get(name, False)
        if not isinstance(v, bool):
            raise ValueError(f"{where}: {name} must be False or True, got {v!r}")
        if v:
            raise ValueError(f"{where}: {name}=True is not supported: {why}; use {name}=False")


def plain_value(v):
    """A hyperparameter as the fastopt core takes it: one-element tensors (``lr``, ``betas``'
    entries, as torch accepts them) as Python numbers."""
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, tuple):
        return tuple(plain_value(x) for x in v)
    return v


def check_tensor_lr(cls_name, group, where):
    """ValueError where torch refuses ``group["lr"]`` as a tensor: not one element, or (Adam,
    AdamW) with ``foreach=True``; a float, a callable or a one-element tensor pass. The same
    for tensor entries of ``betas`` (any class with ``betas``, as torch's Adam family)."""
    betas = group.get("betas") or ()
    if len({isinstance(b, torch.Tensor) for b in betas}) > 1:
        raise ValueError(f"{where}: betas must be both floats or both tensors (torch)")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            if beta.numel() != 1:
                raise ValueError(f"{where}: betas[{i}] as a tensor must have one element")
            if group.get("foreach"):
                raise ValueError(
                    f"{where}: betas[{i}] as a tensor is not supported with foreach=True (torch "
                    "refuses it without capturable=True); pass foreach=None or False"
                )
    lr = group.get("lr")
    if not isinstance(lr, torch.Tensor):
        return
    if lr.numel() != 1:
        raise ValueError(
            f"{where}: lr as a tensor must have one element, got shape {tuple(lr.shape)}"
        )
    if cls_name in TENSOR_LR_NO_FOREACH and group.get("foreach"):
        raise ValueError(
            f"{where}: lr as a tensor is not supported with foreach=True (torch refuses it "
            "without capturable=True); pass foreach=None or False"
        )
