"""Base of the optimizers whose update needs one value per parameter tensor (LAMB, LARS,
NovoGrad): the per-segment rules of ``kernels/rules.py`` (``SEGMENT_RULES``), run by the
templates of ``kernels/segment_loops.py``.

A unit's segments are its ParamSet's parameters (``names``, ``offsets``, ``shapes``) or, for a
plain array, the array itself. A step of a unit is three launches whatever the number of
tensors: the segmented reduction (per-piece partial sums), the per-segment pass (sums, scalars,
scalar state) and the elementwise update. The list path and the ParamSet path compute the same
bits: the order of every addition depends only on the segment itself.

Masks (``weight_decay_mask``, ``trust_ratio_mask``) are ``True``/``False`` or a callable
``mask(name, shape) -> bool``, where ``name`` is the ParamSet name, the dict key, or the list
index of the parameter (optax's masks over a pytree, by name).
"""

import importlib

import numpy as np

from .. import reference
from ..kernels import rules, segment_loops
from ..paramset import ParamSet
from . import precision, staging
from .base import Optimizer
from .hyperparameters import Hyper

_KERNEL_MODULES = {
    "numba-cpu": "segment_cpu",
    "numba-cuda": "segment_cuda",
    "cupy": "segment_cupy",
}


def check_mask(name, value):
    """TypeError unless ``value`` is a bool or a callable (name, shape) -> bool."""
    if not (isinstance(value, bool) or callable(value)):
        raise TypeError(f"{name} must be True, False or a callable (name, shape) -> bool")


def mask(name):
    """The hyperparameter row of a mask (keyword-only, True by default)."""
    return Hyper(name, True, check_mask, keyword_only=True)


def _mask_key(mask):
    """A mask as its cached flags depend on it: lists and dicts by their current contents (an
    edit in place changes the key), anything else (a bool, a callable) as it is."""
    if isinstance(mask, list):
        return ("list", tuple(mask))
    if isinstance(mask, dict):
        return ("dict", tuple(mask.items()))
    return mask


def _mask_value(mask, name, shape, what):
    if isinstance(mask, bool):
        return mask
    value = mask(name, shape)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what}({name!r}, {shape}) returned {value!r}, not a bool")
    return bool(value)


class SegmentedOptimizer(Optimizer):
    """Optimizer base for the per-segment rules. Subclasses declare ``hyperparameter_table``
    (``weight_decay_mask`` and ``trust_ratio_mask`` rows, made by :func:`mask`, select the
    tensors decayed and adapted), implement ``_state_names`` (element state, the rule's slot
    order) and ``_scalars`` (the rule's fields by name), and may set ``segment_state`` (the name
    of a per-segment scalar state array)."""

    segment_state = None
    elementwise = False

    def __init__(self, params, defaults, **options):
        self._segment_cache = {}
        super().__init__(params, defaults, **options)

    def _rule(self, group):
        return self.algorithm

    def _masks(self, group):
        """(weight decay mask, trust ratio mask) of ``group``: True where it has none."""
        return group.get("weight_decay_mask", True), group.get("trust_ratio_mask", True)

    # ------------------------------------------------------------------ segments
    def _segments(self, g_int, unit):
        """[(name, shape, lo, hi)] of a unit."""
        source = g_int["source"]
        if isinstance(source, ParamSet):
            offs, shapes = source.offsets, source.shapes
            return [(n, shapes[n], *offs[n]) for n in source.names]
        units = g_int["units"]
        j = next(i for i, u in enumerate(units) if u is unit)
        name = g_int["keys"][j] if g_int["keys"] is not None else j
        return [(name, tuple(unit.shape), 0, int(unit.param.size))]

    def _flags(self, group, segs):
        decay, trust = self._masks(group)
        flags = np.zeros(len(segs), np.int32)
        for s, (name, shape, _, _) in enumerate(segs):
            if _mask_value(decay, name, shape, "weight_decay_mask"):
                flags[s] |= rules.FLAG_DECAY
            if _mask_value(trust, name, shape, "trust_ratio_mask"):
                flags[s] |= rules.FLAG_TRUST
        return flags

    def _work(self, group, g_int, unit, stream=None):
        """The cached per-unit arrays: segments, layout, flags and scratch on the unit's device,
        uploaded (once) on ``stream``, the step's: its launches read them there. Rebuilt when
        the group's masks change (the flags), not with lr or another setting."""
        key = (id(unit), tuple(map(_mask_key, self._masks(group))))
        work = self._segment_cache.get(id(unit))
        if work is not None and work["key"] == key:
            return work
        segs = self._segments(g_int, unit)
        bounds = [0] + [hi for _, _, _, hi in segs]
        layout = segment_loops.pieces(bounds)
        multi_piece = segment_loops.has_multi_piece(layout[3])  # on the host, once per layout
        flags = self._flags(group, segs)
        nseg, npieces = len(segs), layout[0].size
        dtype = staging.compute_dtype(unit.param.dtype)
        host = {
            "out": np.zeros((npieces, 2)),
            "r": np.zeros((nseg, 2), dtype),
            "sums": np.zeros((nseg, 2)),
            "flags": flags,
            "st": np.zeros(nseg, dtype),  # segment state of rules that keep none
        }
        name = unit.backend.name
        if name == "numba-cuda":
            from ..kernels import segment_cuda

            arrays = {k: segment_cuda.to_device(v, unit.param, stream) for k, v in host.items()}
            layout = tuple(segment_cuda.to_device(a, unit.param, stream) for a in layout)
        elif name == "cupy":
            from ..kernels import segment_cupy

            arrays = {k: segment_cupy.to_device(v, unit.param, stream) for k, v in host.items()}
            layout = tuple(segment_cupy.to_device(a, unit.param, stream) for a in layout)
        else:
            arrays = host
        work = dict(arrays, key=key, segs=segs, layout=layout, multi_piece=multi_piece)
        self._segment_cache[id(unit)] = work
        return work

    def _check_backend(self, unit):
        name = unit.backend.name
        if name not in _KERNEL_MODULES and name != "numpy":
            raise RuntimeError(
                f"{type(self).__name__} runs on the numba-cpu, numba-cuda, cupy and numpy "
                f"backends; {unit.label} is on {name!r}"
            )

    def _check_storage(self, unit, grad):
        """The unit's ``access.Storage`` with ``grad``; TypeError naming the unit when its
        backend cannot store it (16-bit storage runs through ``staging``)."""
        storage = precision.storage_of(self.precision, unit.param, grad)
        precision.check_backend_stores(unit.backend, storage, unit.label)
        return storage

    def _state_shape(self, g_int, unit, name):
        """The per-tensor state (``segment_state``) has one value per segment."""
        if name == self.segment_state:
            return (len(self._segments(g_int, unit)),)
        return unit.shape

    def _allocate(self, group, unit, names, lr, stream=None):
        super()._allocate(group, unit, names, lr, stream)
        if self.segment_state is not None:
            n = len(self._segment_cache[id(unit)]["segs"])
            dtype = self.state_array_dtype(self.segment_state, unit.param)
            unit.state[self.segment_state] = unit.backend.zeros(
                n, dtype, like=unit.param, stream=stream
            )

    # ------------------------------------------------------------------ step
    def step(self, grads=None, *, grad_scale=None):
        """One update of every parameter whose gradient is given (see ``Optimizer.step``):
        gradient scaling, clipping and non-finite skipping as there, then three launches per
        unit (on the CPU, a rule of ``rules.STORED_UPDATE`` stores each element's update and
        its new state in the first and applies the stored update in the third)."""
        plan = self._plan(grads)
        stream_of = self.step_streams()  # every launch, copy and fill of the step goes there
        seg_works = {}
        storages = {}
        for group, g_int, _, work in plan:
            for unit, grad in work:
                self._check_backend(unit)
                storages[id(unit)] = storage = self._check_storage(unit, grad)
                if unit.backend.name == "cupy" and not staging.needs_stage(storage):
                    names = g_int["state_names"]
                    states = [unit.state[n] for n in names] if unit.state else None
                    _kernels(unit).check(self.algorithm, unit.param, grad, states)
                # every unit's masks are called here, before any unit's state is allocated
                seg_works[id(unit)] = self._work(group, g_int, unit, stream_of(unit))
        scales = self._grad_scales(plan, grad_scale, stream_of)
        if scales is None:
            return
        launches = []
        for group, g_int, lr, work in plan:
            for unit, grad in work:
                seg_work = seg_works[id(unit)]
                if not unit.state:
                    self._allocate(group, unit, g_int["state_names"], lr, stream_of(unit))
                step = unit.state["step"] + 1
                values, _ = self._scalars(group, unit.state, step, lr)
                fields = rules.LAYOUTS[self.algorithm]
                missing = set(fields) ^ set(values)
                if missing:
                    raise TypeError(f"{type(self).__name__}._scalars: wrong fields {missing}")
                h64 = tuple(float(values[f]) for f in fields)
                launches.append((group, g_int, lr, unit, grad, step, h64, seg_work))
        for group, g_int, lr, unit, grad, step, h64, seg_work in launches:
            storage = storages[id(unit)]
            stream = stream_of(unit)
            if staging.needs_stage(storage):  # 16-bit storage: float32 copies around the kernels
                stages = staging.staging_of(self)
                slots = (*g_int["state_names"], self.segment_state)
                stage, wide = stages.load(unit, grad, slots, stream)
                self._launch(group, g_int, lr, stage, wide, step, h64, seg_work, scales, stream)
                rs = staging.random_counter(self, unit, storage, step)
                stages.store(unit, stage, slots, rs, stream)
            else:
                self._launch(group, g_int, lr, unit, grad, step, h64, seg_work, scales, stream)
            unit.state["step"] = step
        self._count_step(plan)

    def _launch(self, group, g_int, lr, unit, grad, step, h64, w, gs, stream=None):
        """The three launches of ``unit`` (on a GPU on ``stream``, the step's: the launchers of
        both GPU backends take it, so the update is ordered after the gradient norm and the
        16-bit conversions of the step, on the same stream)."""
        state = unit.state
        names = g_int["state_names"]
        p = unit.param
        if unit.backend.name == "numpy":
            g = reference.transformed_grad(grad, gs[0], gs[1])
            segments = [(lo, hi) for _, _, lo, hi in w["segs"]]
            flags = w["flags"]
            getattr(reference, self.algorithm)(
                p,
                g,
                state,
                step=step,
                segments=segments,
                decay=[bool(f & rules.FLAG_DECAY) for f in flags],
                trust=[bool(f & rules.FLAG_TRUST) for f in flags],
                **self.hyperparameters(group, lr),
            )
            return
        k = _kernels(unit)
        st = unit.scalar_type
        h = tuple(st(v) for v in h64)
        gs = (st(gs[0]), st(gs[1]))
        states = [state[n] for n in names]
        seg_state = state[self.segment_state] if self.segment_state else w["st"]
        on = {}
        if unit.backend.name in ("cupy", "numba-cuda"):
            on["stream"] = stream
        flags, layout, out, r, sums = w["flags"], w["layout"], w["out"], w["r"], w["sums"]
        if unit.backend.name == "numba-cpu" and self.algorithm in rules.STORED_UPDATE:
            u = self._update_buffer(p)
            k.reduce_stored(
                self.algorithm, p, grad, states, h, gs, flags, layout, out, u, seg_state, r,
                sums, h64,
            )  # fmt: skip
            multi = w["multi_piece"]
            k.segment_stored(self.algorithm, p, flags, layout, out, seg_state, r, sums, h64, multi)
            k.apply_stored(self.algorithm, p, u, layout, r, multi)
            return
        k.reduce(self.algorithm, p, grad, states, h, gs, flags, layout, out, **on)
        k.segment(self.algorithm, p, flags, layout, out, seg_state, r, sums, h64, **on)
        k.apply(self.algorithm, p, grad, states, h, gs, flags, layout, r, **on)

    def _update_buffer(self, p):
        """Scratch for the stored update of a CPU unit (``rules.STORED_UPDATE``): one value per
        element, one buffer per dtype shared by the units (they run one after the other), so a
        list of arrays costs its largest array, not their sum."""
        buffers = self.__dict__.setdefault("_update_buffers", {})
        buf = buffers.get(p.dtype)
        if buf is None or buf.size < p.size:
            buf = buffers[p.dtype] = np.empty(p.size, p.dtype)
        return buf[: p.size]


def _kernels(unit):
    """The segment launcher module of the unit's backend."""
    name = _KERNEL_MODULES[unit.backend.name]
    return importlib.import_module(f"..kernels.{name}", __package__)
