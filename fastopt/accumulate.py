"""Gradient accumulation: k micro-batches, one optimizer step on their mean."""

import numpy as np

from .optim.precision import is_16bit
from .validation import check_bool


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
        self._sums = {}  # id(unit) -> (unit, buffer) for units without a ParamSet gradient buffer
        self._added = set()  # id(unit) of the units given a gradient in this cycle
        if zero_first:
            optimizer.zero_grad()

    def add(self, grads=None):
        opt = self.optimizer
        if grads is not None:
            work = opt.check_grads(grads)  # structure, shapes, dtypes: checked before any write
            stream_of = opt.step_streams()
            for unit, g in work:
                stream = stream_of(unit)
                unit.backend.add(self._buffer(unit, stream), g, stream)
                self._added.add(id(unit))
        elif any(u.default_grad is None for u in opt.units()):
            raise ValueError(
                "add() without gradients needs every parameter group to be a ParamSet "
                "(plain arrays have no gradient buffer to accumulate into)"
            )
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
        sums = [(u, buf) for u, buf in self._sums.values() if id(u) in self._added]
        joined = [u for u, _ in sums if u.default_grad is not None]  # 16-bit ParamSets
        for unit, buf in sums:
            if unit.default_grad is not None:  # a 16-bit ParamSet: its buffer joins the sum
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

    def _buffer(self, unit, stream):
        """The sum's buffer: a ParamSet's gradient buffer, else one of this accumulator's own
        (float32 for 16-bit parameters, else the parameter's dtype)."""
        sixteen = is_16bit(unit.param.dtype)
        if unit.default_grad is not None and not sixteen:
            return unit.default_grad
        entry = self._sums.get(id(unit))
        if entry is None:
            dtype = np.float32 if sixteen else unit.param.dtype
            buf = unit.backend.zeros(unit.param.size, dtype, like=unit.param, stream=stream)
            entry = self._sums[id(unit)] = (unit, buf)
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


__all__ = ["GradientAccumulator"]
