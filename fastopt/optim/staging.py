"""16-bit storage for the optimizers whose kernels are not elementwise (LAMB, LARS, NovoGrad,
Adafactor, Muon): their float32 kernels run on float32 working copies, between conversion
passes.

The elementwise rules load 16-bit values, run the rule in float32 and round on store inside
one loop (``kernels/loops.py``'s storage loops). The per-tensor reductions, Adafactor's row and
column passes and Muon's BLAS products read each element more than once and across launches, so
here the conversions are passes of their own (``Backend.convert``, the same load and store
helpers as the storage loops) around the unchanged float32 kernels:

1. before the kernels: the gradient widened to float32 (when it is not float32), the parameter
   widened (without master weights; with them the float32 ``master_param`` of the state is
   the parameter the kernels update) and every 16-bit state array widened;
2. the optimizer's kernels on these float32 arrays (a *stage*: a :class:`~.units.Unit` over
   them, kept per unit);
3. after them: the parameter rounded into its 16-bit storage (word 0 of the element's random
   bits under stochastic rounding, as the storage loops), each 16-bit state array rounded back
   (word 1 + j for its j-th array, j counted modulo 3).

The result is bit for bit the one-pass design's: every value the kernels read is the widened
stored value, every stored value the rounded float32 result. What it costs is traffic and
memory: a float32 scratch for the parameter (without master weights), the gradient (when
16-bit) and each 16-bit state array, one buffer per role, device and dtype shared by the units
(they run one after the other, on one stream), so a list of arrays costs its largest array.
"""

import numpy as np

from . import precision
from .units import Unit


def compute_dtype(param_dtype):
    """The dtype the kernels of a parameter stored as ``param_dtype`` compute in (with or
    without a master copy: the master copy of a 16-bit parameter is float32)."""
    return np.dtype(np.float64) if np.dtype(param_dtype) == np.float64 else np.dtype(np.float32)


def _flat(a):
    return a if a.ndim == 1 else a.reshape(a.size)


def is_array(value):
    return hasattr(value, "dtype") and hasattr(value, "shape")


class Staging:
    """The stages of one optimizer: :meth:`load` before a unit's kernels, :meth:`store` after."""

    def __init__(self):
        self._stages = {}  # id(unit) -> (unit, stage Unit)
        self._buffers = {}  # (role, backend, device, size class) -> flat float32 scratch

    def _scratch(self, unit, role, n, dtype):
        """``n`` elements of ``dtype`` of the shared buffer of ``role`` on ``unit``'s device."""
        backend = unit.backend
        key = (role, backend.name, backend.device_of(unit.param), dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.size < n:
            buf = self._buffers[key] = backend.zeros(max(n, 1), dtype, like=unit.param)
        return buf[:n]

    def stage_of(self, unit):
        hit = self._stages.get(id(unit))
        if hit is None or hit[0] is not unit:
            stage = Unit(unit.param, unit.source, unit.shape, None, unit.label)
            stage.use_backend(unit.backend)
            stage.kind, stage.device = unit.kind, unit.device
            hit = self._stages[id(unit)] = (unit, stage)
        return hit[1]

    def load(self, unit, grad, stream=None):
        """(stage, float32 gradient) of ``unit`` for this step: the float32 arrays the kernels
        update, widened from the unit's storage (the gradient too when it is not float32)."""
        backend = unit.backend
        stage = self.stage_of(unit)
        state = unit.state
        dtype = compute_dtype(unit.param.dtype)
        param = state.get(precision.MASTER)
        if param is None:
            param = unit.param
            if param.dtype != dtype:
                param = self._scratch(unit, "param", unit.param.size, dtype)
                backend.convert(param, unit.param, stream=stream)
        stage.param = param
        stage.scalar_type = backend.scalar_type(dtype)
        if grad.dtype != dtype:
            wide = self._scratch(unit, "grad", grad.size, dtype)
            backend.convert(wide, grad, stream=stream)
            grad = wide
        staged = {}
        for j, (name, value) in enumerate(self._stored(state, dtype)):
            a = self._scratch(unit, f"state{j}", value.size, dtype)
            backend.convert(a, _flat(value), stream=stream)
            staged[name] = a.reshape(value.shape)
        stage.state = {k: staged.get(k, v) for k, v in state.items() if k != precision.MASTER}
        return stage, grad

    def store(self, unit, stage, rs, stream=None):
        """Round the stage's results into the unit's storage: the parameter, then each 16-bit
        state array. ``rs`` = (seed, step, index of the unit's first element among the
        optimizer's parameters) under stochastic rounding, else None (to nearest even)."""
        backend = unit.backend
        if stage.param is not unit.param:
            backend.convert(unit.param, stage.param, rs, 0, stream)
        stored = self._stored(unit.state, stage.param.dtype)
        for j, (name, value) in enumerate(stored):
            backend.convert(_flat(value), _flat(stage.state[name]), rs, 1 + j % 3, stream)
        for k, v in stage.state.items():
            if not is_array(v) and k != "step":
                unit.state[k] = v

    @staticmethod
    def _stored(state, dtype):
        """[(name, array)] of the state arrays stored in another dtype than ``dtype`` (the
        compute dtype), in state order."""
        return [
            (k, v)
            for k, v in state.items()
            if k != precision.MASTER and is_array(v) and np.dtype(v.dtype) != dtype
        ]


def staging_of(optimizer):
    """The optimizer's :class:`Staging` (made on first use)."""
    staging = optimizer.__dict__.get("_staging")
    if staging is None:
        staging = optimizer.__dict__["_staging"] = Staging()
    return staging


def needs_stage(storage):
    """Whether a unit stored as ``storage`` (an ``access.Storage``) runs through a stage."""
    return not precision.is_plain(storage)


def random_counter(optimizer, unit, storage, step):
    """``rs`` of :meth:`Staging.store`: the stochastic rounding counter, or None."""
    if not storage.stochastic:
        return None
    return (optimizer.precision.seed, step, optimizer._offset_of(unit))
