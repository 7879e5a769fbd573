"""The Trainer's optimizer: checked clipping options, and an optimizer class built over the
model's parameters (or a given instance checked against them) with its gradient structure."""

from ..validation import check_bool, check_positive


def checked_clip(max_grad_norm, max_grad_value, skip_nonfinite):
    """The clipping options as a dict (None: leave the optimizer's), each checked."""
    clip = {
        "max_grad_norm": max_grad_norm,
        "max_grad_value": max_grad_value,
        "skip_nonfinite": skip_nonfinite,
    }
    for name, value in clip.items():
        if value is None:
            continue
        if name == "skip_nonfinite":
            check_bool(name, value)
        else:
            check_positive(name, value)
    return clip


def build_local(optimizer, model, trained, lr, weight_decay, optimizer_kwargs, clip):
    """(optimizer, grads for its step) without ZeRO. ``optimizer``: a fastopt optimizer class,
    built over ``trained`` (the model, or the 16-bit parameters of a ``precision="bf16"``
    Trainer: anything with ``params``, ``param_groups()`` and ``grads_for()``), or an instance
    over the model's parameters; the clipping options set on it."""
    from ..optim import Optimizer

    if isinstance(optimizer, type):
        if not issubclass(optimizer, Optimizer):
            raise TypeError(f"optimizer class {optimizer.__name__} is not a fastopt optimizer")
        # without weight decay one group over the whole ParamSet: one kernel per step
        # (a closure optimizer takes the ParamSet; its L2 term is in the closure); with it,
        # rules that are not elementwise (a norm or factored moment per tensor) get a view
        # per tensor, the others one view per group
        per_tensor = not optimizer.elementwise
        params = trained.param_groups(weight_decay, per_tensor) if weight_decay else trained.params
        params = model.params if optimizer.requires_closure else params
        own_groups = getattr(optimizer, "trainer_param_groups", None)  # Muon's recipe
        params = own_groups(trained.params, weight_decay) if own_groups else params
        optimizer = optimizer(params, lr=lr, **dict(optimizer_kwargs or {}))
    elif optimizer_kwargs:
        raise ValueError("optimizer_kwargs apply only when optimizer is a class")
    elif weight_decay:
        # the instance's own groups decide its decay: refuse rather than ignore it silently
        raise ValueError(
            f"weight_decay with a {type(optimizer).__name__} instance: pass the class instead "
            "(the Trainer builds it over model.param_groups(weight_decay)), or build the "
            "instance over model.param_groups(weight_decay) and leave weight_decay at 0"
        )
    grads = trained.grads_for(optimizer)  # raises if it is over other arrays
    for name, value in clip.items():
        if value is not None:
            if not hasattr(optimizer, name):
                raise TypeError(f"{type(optimizer).__name__} has no {name} option")
            setattr(optimizer, name, value)
    return optimizer, grads
