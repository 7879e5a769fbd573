"""The Trainer's ``precision="bf16"`` / ``"fp16"``: 16-bit parameters that the optimizer updates,
a float32 model that computes from them.

The :class:`fastopt.nn.MLP` computes in float32. With a 16-bit precision the Trainer keeps the
trained parameters in a 16-bit ParamSet (:attr:`Mixed16.params`, same names and layout as
``model.params``): the optimizer is built over it, and ``model.params`` holds their widened
(exact) float32 values, from which forward and backward run. The gradients stay float32 (the
model's gradient buffer): the optimizers read float32 gradients of 16-bit parameters, so nothing
is rounded before the update. After each step the 16-bit values are widened into the model
(one pass). Master weights are on by default (``master_weights=True`` in the optimizer's
keyword arguments; pass ``False`` to train the 16-bit values alone, e.g. with
``stochastic_rounding=True``).

When something else writes ``model.params`` (a checkpoint, the broadcast of a distributed run,
restored best or last finite weights), :meth:`Mixed16.pull` rounds the model's values into the
16-bit parameters and, except right after a resume (whose checkpoint holds the master copy), sets
the float32 master copies to them.
"""

import numpy as np

from ..arrays import array_module, data_ptr
from ..nn.groups import decay_groups
from ..nn.groups import grads_for as paramset_grads_for
from ..optim.precision import MASTER
from ..paramset import ParamSet

PRECISIONS = {
    "fp32": None,
    "float32": None,
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}
"""The ``precision=`` values: None (the model's own float32) or the 16-bit storage dtype."""


def mixed_precision(model, precision, optimizer):
    """A :class:`Mixed16` for a 16-bit ``precision``, None for ``None`` / ``"fp32"``;
    ValueError/TypeError naming a bad value or a combination that cannot work."""
    if precision is None:
        return None
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(map(repr, PRECISIONS))} or None, got "
            f"{precision!r}"
        )
    storage = PRECISIONS[precision]
    if np.dtype(model.dtype) != np.float32:
        raise ValueError(
            f"precision={precision!r} trains a float32 model (its forward and backward run in "
            f"float32); this model's dtype is {np.dtype(model.dtype).name}"
        )
    if storage is None:
        return None
    if not isinstance(optimizer, type):
        raise ValueError(
            f"precision={precision!r}: pass the optimizer class (the Trainer builds it over "
            "the 16-bit parameters); an optimizer instance is built over other arrays"
        )
    if getattr(optimizer, "requires_closure", False):
        raise ValueError(
            f"precision={precision!r} does not apply to {optimizer.__name__}: it steps with "
            "a closure over the model's float32 parameters"
        )
    return Mixed16(model, storage)


class Mixed16:
    """The 16-bit parameters of a float32 ``model`` (see the module docstring)."""

    def __init__(self, model, storage):
        self.model = model
        src = model.params
        # the model itself is rounded at the start of fit (pull): a Trainer that fails to
        # build leaves it untouched
        self.params = ParamSet({n: src[n] for n in src.names}, dtype=storage, device=model.device)

    @staticmethod
    def optimizer_kwargs(kwargs):
        """The optimizer's keyword arguments with ``master_weights=True`` unless given."""
        return {"master_weights": True, **dict(kwargs or {})}

    def param_groups(self, weight_decay=0.0, per_tensor=False, **overrides):
        """``model.param_groups`` over the 16-bit parameters."""
        n_weights = self.model.n_weights
        return decay_groups(self.params, n_weights, weight_decay, per_tensor, **overrides)

    def grads_for(self, optimizer):
        """The ``grads`` of ``optimizer.step``: the model's float32 gradient buffer, or its
        views at the offsets of the optimizer's (16-bit) parameter views."""
        g16 = paramset_grads_for(self.params, optimizer)
        base16, item = data_ptr(self.params.grad_flat), self.params.dtype.itemsize
        g32 = self.model.params.grad_flat

        def wide(v):
            if v is None:
                return g32
            if isinstance(v, dict):
                return {k: wide(a) for k, a in v.items()}
            if isinstance(v, list):
                return [wide(a) for a in v]
            lo = (data_ptr(v) - base16) // item
            return g32[lo : lo + v.size].reshape(v.shape)

        return wide(g16)

    def widen(self):
        """``model.params`` = the 16-bit parameters, widened (exact)."""
        self.model.params.flat[...] = self.params.flat

    def pull(self, optimizer, reset_master):
        """Take the model's values when something else wrote them (else do nothing): round
        them into the 16-bit parameters, widen those back, and with ``reset_master`` set the
        optimizer's float32 master copies to them."""
        flat32 = self.model.params.flat
        xp = array_module(self.model.device)[0]
        widened = self.params.flat.astype(np.float32)
        if bool(xp.array_equal(flat32.view(np.uint32), widened.view(np.uint32))):
            return
        self.params.flat[...] = flat32
        self.widen()
        if reset_master:
            inner = getattr(optimizer, "local_optimizer", optimizer)  # a ZeRO shard's
            for unit in inner.units():
                if MASTER in unit.state:
                    unit.backend.assign(unit.state[MASTER], unit.param)
