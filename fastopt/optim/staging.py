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
   (word 1 + j for the j-th of the rule's slots, modulo 3; the element index counted from the
   array's own place where a ZeRO shard says so: ``Optimizer.state_offsets``).

8-bit state (``state_dtype="int8"``) is dequantized into the float32 scratch and requantized
from it (``Backend.dequantize`` / ``Backend.quantize``: the block kernels' own steps, each block's
new absmax and nearest codes), which is what the fused block kernels do around a rule.

The result is bit for bit the one-pass design's: every value the kernels read is the widened
stored value, every stored value the rounded float32 result. What it costs is traffic and
memory: a float32 scratch for the parameter (without master weights), the gradient (when
16-bit) and each 16-bit state array, one buffer per role, device and dtype shared by the units
(they run one after the other, on one stream), so a list of arrays costs its largest array.
"""

import numpy as np

from . import precision
from .units import Unit

_FLOAT32 = np.dtype(np.float32)


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
        self._buffers = {}  # (role, backend, device, dtype) -> flat scratch

    def _scratch(self, unit, role, n, dtype, stream=None):
        """``n`` elements of ``dtype`` of the shared buffer of ``role`` on ``unit``'s device,
        made (zero-filled) on ``stream``, the step's, when it is new or grows."""
        backend = unit.backend
        key = (role, backend.name, backend.device_of(unit.param), dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.size < n:
            buf = backend.zeros(max(n, 1), dtype, like=unit.param, stream=stream)
            self._buffers[key] = buf
        return buf[:n]

    def stage_of(self, unit):
        hit = self._stages.get(id(unit))
        if hit is None or hit[0] is not unit:
            stage = Unit(unit.param, unit.source, unit.shape, None, unit.label)
            stage.use_backend(unit.backend)
            stage.kind, stage.device = unit.kind, unit.device
            hit = self._stages[id(unit)] = (unit, stage)
        return hit[1]

    def load(self, unit, grad, slots, stream=None):
        """(stage, gradient in the compute dtype) of ``unit`` for this step: the arrays the
        kernels update, widened (or dequantized) from the unit's storage. ``slots``: the names
        of the state arrays in the rule's order (it fixes their random-bit words)."""
        backend = unit.backend
        stage = self.stage_of(unit)
        state = unit.state
        dtype = compute_dtype(unit.param.dtype)
        param = state.get(precision.MASTER)
        if param is None:
            param = unit.param
            if param.dtype != dtype:
                param = self._scratch(unit, "param", unit.param.size, dtype, stream)
                backend.convert(param, unit.param, stream=stream)
        stage.param = param
        stage.scalar_type = backend.scalar_type(dtype)
        if grad.dtype != dtype:
            wide = self._scratch(unit, "grad", grad.size, dtype, stream)
            backend.convert(wide, grad, stream=stream)
            grad = wide
        staged = {}
        for j, name, value in _stored(state, dtype, slots):
            if isinstance(value, precision.Quantized):  # 8-bit: dequantized, then widened
                n = value.codes.size
                a = self._scratch(unit, f"state{j}", n, _FLOAT32, stream)
                backend.dequantize(value, a, stream=stream)
                if dtype != _FLOAT32:
                    wide = self._scratch(unit, f"wide{j}", n, dtype, stream)
                    backend.convert(wide, a, stream=stream)
                    a = wide
                staged[name] = a
                continue
            a = self._scratch(unit, f"state{j}", value.size, dtype, stream)
            backend.convert(a, _flat(value), stream=stream)
            staged[name] = a.reshape(value.shape)
        stage.state = {k: staged.get(k, v) for k, v in state.items() if k != precision.MASTER}
        return stage, grad

    def store(self, unit, stage, slots, counter=None, stream=None):
        """Round the stage's results into the unit's storage: the parameter (random-bit word
        0), then each state array stored otherwise (word 1 + its index in ``slots``, modulo 3;
        8-bit slots requantized). ``counter``: :func:`random_counter` under stochastic rounding,
        else None (to nearest even)."""
        backend = unit.backend
        if stage.param is not unit.param:
            rs = None if counter is None else counter[:3]
            backend.convert(unit.param, stage.param, rs, 0, stream)
        for j, name, value in _stored(unit.state, stage.param.dtype, slots):
            result = _flat(stage.state[name])
            if isinstance(value, precision.Quantized):  # rounded to float32, then requantized
                if result.dtype != _FLOAT32:
                    narrow = self._scratch(unit, f"state{j}", result.size, _FLOAT32, stream)
                    backend.convert(narrow, result, stream=stream)
                    result = narrow
                backend.quantize(value, result, stream=stream)
                continue
            rs = None
            if counter is not None:
                seed, step, offset, offsets = counter
                rs = (seed, step, offsets.get(name, offset) if offsets else offset)
            backend.convert(_flat(value), result, rs, 1 + j % 3, stream)
        for k, v in stage.state.items():
            if not (is_array(v) or isinstance(v, precision.Quantized)) and k != "step":
                unit.state[k] = v


def _stored(state, dtype, slots):
    """[(index in the order, name, array)] of the state arrays kept in another dtype than
    ``dtype`` (the compute dtype) or 8-bit, in the order ``slots`` then any other by name. The
    position in ``slots`` fixes an array's random-bit word, not the dict's order (a loaded
    state_dict may list its arrays otherwise) nor which slots a unit keeps (a ZeRO shard of
    Muon may keep only its fallback's)."""
    order = list(slots)
    order += sorted(k for k in state if k not in order and k != precision.MASTER)
    out = []
    for j, k in enumerate(order):  # j: the position in ``slots``, whether or not all are kept
        v = state.get(k)
        if v is None:
            continue
        if isinstance(v, precision.Quantized) or (is_array(v) and np.dtype(v.dtype) != dtype):
            out.append((j, k, v))
    return out


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
    """The stochastic rounding counter of :meth:`Staging.store`, or None without: (seed, step,
    index of the unit's first parameter element, each state array's own first index where it
    differs: ``optimizer.state_offsets`` where a ZeRO shard sets them, else the per-tensor
    state's place among the units' arrays)."""
    if not storage.stochastic:
        return None
    offsets = optimizer.state_offsets
    if offsets is None and optimizer.tensor_state:  # per-tensor state: its own layout's index
        offsets = optimizer._tensor_state_offsets(unit)
    return (optimizer.precision.seed, step, optimizer._offset_of(unit), offsets)
