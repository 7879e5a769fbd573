"""Gradient accumulation: k micro-batches, one optimizer step on their mean."""

import weakref

import numpy as np

from .optim.precision import is_16bit
from .paramset import ParamSet
from .validation import check_bool

_OVERWRITTEN = {}
"""id -> weak reference of the ParamSets declared with :func:`mark_grads_overwritten` (a
ParamSet is a Mapping, hence unhashable: no WeakSet)."""


def mark_grads_overwritten(params):
    """Declare that whatever computes the gradients of ParamSet ``params`` writes each one into
    its gradient buffer OVER the previous one (e.g. :class:`fastopt.nn.MLP`, whose
    ``loss_and_grad`` overwrites ``model.params.grads``; torch's backward, which adds, does not
    qualify). A :class:`GradientAccumulator` over it then keeps the sum in a buffer of its own
    (see there). Returns ``params``."""
    if not isinstance(params, ParamSet):
        raise TypeError(f"expected a ParamSet, got {type(params).__name__}")
    key = id(params)

    def forget(ref):
        if _OVERWRITTEN.get(key) is ref:
            del _OVERWRITTEN[key]

    _OVERWRITTEN[key] = weakref.ref(params, forget)
    return params


def _grads_overwritten(params):
    ref = _OVERWRITTEN.get(id(params))
    return ref is not None and ref() is params


class GradientAccumulator:
    r"""Step ``optimizer`` once every ``steps`` micro-batches, on the mean of their gradients.

    .. math:: g = \frac{1}{k}\sum_{j=1}^{k} g^{(j)}

    For mean-reduced losses over equal micro-batches this is the gradient of the whole batch, so
    k micro-batches give the same step as one batch k times larger (to rounding), and weight
    decay, clipping (``max_grad_norm``) and non-finite skipping apply once per real step. The sum
    lives in each ParamSet's gradient buffer (other parameters get a buffer of their own); the
    1/k is folded into the update kernel (``step(grad_scale=1/k)``), so averaging costs no pass.

    ``add(grads)`` adds one micro-batch gradient (same structure as ``optimizer.step`` takes),
    checked like a step before anything is added. ``add()`` with no gradients counts a
    micro-batch whose gradient the caller already accumulated into the ParamSet buffers
    (e.g. ``ps.grads["w"] += g``). Both return True when that call took the optimizer step.

    A ParamSet whose gradient buffer each backward pass overwrites (declared with
    :func:`mark_grads_overwritten`; an :class:`fastopt.nn.MLP`'s ``params`` is) cannot hold the
    sum: the accumulator sums its gradients in a buffer of its own (one more pass per
    micro-batch), and ``add()`` adds the buffer's content, this micro-batch's gradient (as does a
    ``None`` given for that ParamSet in ``add(grads)``)::

        opt = fo.Adam(model.params)
        acc = fo.GradientAccumulator(opt, 4)
        for Xb, yb in micro_batches:
            model.loss_and_grad(Xb, yb)  # writes this micro-batch's gradient over the last
            acc.add()  # steps on the mean of 4 gradients

    16-bit parameters (bfloat16, float16) accumulate in a float32 buffer of their own, also in a
    ParamSet: a sum of k bfloat16 gradients rounded k times loses most of its low bits (with 8
    significant bits, adding a gradient a quarter the size of the sum already rounds). The step
    takes the float32 sum as its gradient (the kernels read float32 gradients of 16-bit
    parameters). Anything the caller put into a 16-bit ParamSet gradient buffer (``add()``
    without gradients, or ``zero_first=False``) is added to that sum at the step.

    A parameter given no gradient (None) in any micro-batch of a cycle is skipped at that cycle's
    step, as ``optimizer.step`` skips it. When the step refuses (e.g. an invalid lr), nothing is
    stepped and the sum is kept (a 16-bit ParamSet's gradient buffer then moved into its float32
    sum, the buffer zeroed): fix the cause and call ``flush()`` again.
    """

    def __init__(self, optimizer, steps, *, zero_first=True):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"invalid steps: {steps!r} (must be an int >= 1)")
        check_bool("zero_first", zero_first)
        self.optimizer = optimizer
        self.steps = steps
        self.count = 0
        # id(unit) -> (unit, buffer, joins) for the units whose sum is not in their ParamSet's
        # gradient buffer; joins: that buffer (16-bit) is added to the sum at the step
        self._sums = {}
        self._added = set()  # id(unit) of the units given a gradient in this cycle
        if zero_first:
            optimizer.zero_grad()

    def add(self, grads=None):
        opt = self.optimizer
        if grads is None and any(u.default_grad is None for u in opt.units()):
            raise ValueError(
                "add() without gradients needs every parameter group to be a ParamSet "
                "(plain arrays have no gradient buffer to accumulate into)"
            )
        overwritten = self._overwritten_units()
        # structure, shapes, dtypes: checked before any write. A ParamSet given no gradient (None,
        # or add()) comes with its own buffer: already the sum (skipped), unless overwritten
        # (then it holds this micro-batch's gradient, added to the accumulator's sum).
        work = [] if grads is None and not overwritten else opt.check_grads(grads)
        work = [(u, g) for u, g in work if id(u) in overwritten or g is not u.default_grad]
        if work:
            stream_of = opt.step_streams()
            for unit, g in work:
                stream = stream_of(unit)
                unit.backend.add(self._buffer(unit, stream, id(unit) in overwritten), g, stream)
                self._added.add(id(unit))
        self.count += 1
        if self.count < self.steps:
            return False
        self.flush()
        return True

    def flush(self):
        """Step now on the mean of the micro-batches added so far (if any), then reset."""
        if self.count == 0:
            return
        opt = self.optimizer
        stream_of = opt.step_streams()
        entries = [e for e in self._sums.values() if id(e[0]) in self._added]
        sums = [(u, buf) for u, buf, _ in entries]
        joined = [u for u, _, joins in entries if joins]  # 16-bit ParamSets
        for unit, buf, joins in entries:
            if joins:  # a 16-bit ParamSet: its buffer joins the sum
                unit.backend.add(buf, unit.default_grad, stream_of(unit))
        try:
            opt.step(self._structured_sums(), grad_scale=1.0 / self.count)
        except BaseException:
            # The refused step wrote nothing, but those ParamSet buffers are in the float32 sums
            # now: empty them, so that a retry does not add them twice.
            for unit in joined:
                unit.backend.fill(unit.default_grad, 0, stream_of(unit))
            raise
        opt.zero_grad()
        for unit, buf in sums:
            unit.backend.fill(buf, 0, stream_of(unit))
        self._added.clear()
        self.count = 0

    def _overwritten_units(self):
        """id() of the units over a ParamSet declared with :func:`mark_grads_overwritten`."""
        if not _OVERWRITTEN:
            return set()
        opt = self.optimizer
        flats = {
            id(s.flat) for s in opt.sources() if isinstance(s, ParamSet) and _grads_overwritten(s)
        }
        if not flats:
            return set()
        return {id(u) for u in opt.units() if u.default_grad is not None and id(u.source) in flats}

    def _buffer(self, unit, stream, overwritten=False):
        """The sum's buffer: a ParamSet's gradient buffer, else one of this accumulator's own
        (float32 for 16-bit parameters, else the parameter's dtype): for plain arrays, 16-bit
        ParamSets and ``overwritten`` ones (see :func:`mark_grads_overwritten`)."""
        sixteen = is_16bit(unit.param.dtype)
        if unit.default_grad is not None and not sixteen and not overwritten:
            return unit.default_grad
        entry = self._sums.get(id(unit))
        if entry is None:
            dtype = np.float32 if sixteen else unit.param.dtype
            buf = unit.backend.zeros(unit.param.size, dtype, like=unit.param, stream=stream)
            joins = unit.default_grad is not None and not overwritten
            entry = self._sums[id(unit)] = (unit, buf, joins)
        return entry[1]

    def _structured_sums(self):
        """The accumulated sums in the structure ``optimizer.step`` expects (None for a ParamSet:
        its own gradient buffer holds the sum; None for a parameter that got no gradient in this
        cycle: its buffer, zeroed, is kept from an earlier one)."""
        per_unit = []
        for u in self.optimizer.units():
            entry = self._sums.get(id(u)) if id(u) in self._added else None
            per_unit.append(None if entry is None else entry[1].reshape(u.shape))
        return self.optimizer.structure_grads(per_unit)


__all__ = ["GradientAccumulator", "mark_grads_overwritten"]
