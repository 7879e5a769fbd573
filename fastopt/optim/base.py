"""Optimizer base: param groups, lazily allocated state, validation, the step.

Subclasses are thin: they declare torch's hyperparameters and defaults, check them, name the rule
and state slots for a group, and return the rule's per-step scalars BY NAME: a dict whose keys are
the fields declared next to the rule in ``kernels/rules.py`` (``rules.SCALARS``); the base class
orders them into the tuple the kernels take. Every check of a step runs before its first write,
so a failed ``step()`` changes nothing. Units and gradient structures live in ``units.py``, the
state_dict in ``state_dict.py``.
"""

import math
import operator
import sys
from collections.abc import Mapping

import numpy as np

from .. import dispatch, streams
from ..clipping import clip_coefficient
from ..kernels.rules import SCALARS
from ..validation import check_bool, check_positive, check_scheduled_lr
from . import precision
from . import state_dict as _state_dict
from .hyperparameters import check_table, constructor
from .units import check_grad, join_grads, overlaps, split_grads, units_of


def constructor_defaults(arguments):
    """The hyperparameters among a subclass constructor's ``locals()``: every argument but
    ``self``, ``params`` and ``**options`` (call it first thing, before any other local exists)."""
    return {
        k: v
        for k, v in arguments.items()
        if k not in ("self", "params", "options") and not k.startswith("__")
    }


def maximize_sign(group):
    """``gsign``: -1.0 to ascend (``maximize``), else 1.0."""
    return -1.0 if group["maximize"] else 1.0


def l2_scalars(group):
    """The ``weight_decay`` (coupled L2 term) and ``gsign`` fields of the rules using l2_grad."""
    return {"weight_decay": group["weight_decay"], "gsign": maximize_sign(group)}


_FIELD_GETTERS = {}


def _field_getter(rule):
    """``values -> tuple of values[f]`` for the declared fields of ``rule``, in order."""
    get = _FIELD_GETTERS.get(rule)
    if get is None:
        fields = SCALARS[rule]
        if len(fields) == 1:
            (field,) = fields
            get = lambda values: (values[field],)  # noqa: E731 (itemgetter of one key: no tuple)
        else:
            get = operator.itemgetter(*fields)
        _FIELD_GETTERS[rule] = get
    return get


def scalar_tuple(optimizer, rule, values, cast):
    """``values`` (field name -> float) as the tuple ``rule`` takes: in the order
    ``rules.SCALARS[rule]`` declares, each cast by ``cast``. TypeError naming the missing and
    unexpected names when the keys are not exactly the declared fields."""
    fields = SCALARS[rule]
    if len(values) == len(fields):
        try:
            picked = _field_getter(rule)(values)
        except KeyError:
            pass
        else:
            if cast is np.float32:
                # one conversion of them all (the same roundings) instead of a NumPy scalar
                # constructor per field: 1 us less per step of a ten-field rule
                return tuple(np.array(picked, np.float32))
            return tuple(map(cast, picked))
    missing = [f for f in fields if f not in values]
    extra = [k for k in values if k not in fields]
    raise TypeError(
        f"{type(optimizer).__name__}._scalars returned the wrong fields for rule {rule!r}: "
        f"missing {missing}, unexpected {extra} (declared in kernels/rules.py: {fields})"
    )


def check_clip_representable(name, value, unit):
    """ValueError unless the elementwise clip ``value`` (> 0) stays above 0 in the dtype
    ``unit`` computes in: below that dtype's smallest positive value it rounds to 0, which the
    kernels read as "no clipping" (every gradient would otherwise have to become 0)."""
    dtype = np.dtype(np.float32 if precision.is_16bit(unit.param.dtype) else unit.param.dtype)
    if dtype.type(value) == 0:
        raise ValueError(
            f"{name}={value!r} rounds to 0 in {dtype.name}, the dtype {unit.label} computes in; "
            f"the smallest clip it can hold is {float(np.finfo(dtype).smallest_subnormal):.3g}"
        )


class Optimizer:
    """Base class. ``params``: a ParamSet, an array, a list/tuple/dict of arrays, or a list of
    param-group dicts ``{"params": ..., <hyperparameter overrides>}`` as in torch.optim.

    ``backend`` forces a backend by name (``"numba-cpu"``, ``"numpy"`` for the reference,
    ``"cupy"``, ``"numba-cuda"``); by default it is picked from the arrays (``fastopt.dispatch``).

    Arrays: NumPy arrays; torch CPU tensors (the kernels update a zero-copy NumPy view, so the
    tensor changes in place; ``requires_grad`` is fine); CuPy arrays (CuPy kernels); torch CUDA
    tensors and any other CUDA array with ``__cuda_array_interface__`` or DLPack (Numba CUDA
    kernels by default, zero-copy, in place); a ParamSet on either device. The backend of device
    arrays is fixed at construction, so a CUDA array on a machine that cannot run it fails there
    with the reason. Gradients must be of the same kind and on the same device as their parameter
    (a NumPy gradient for a CuPy parameter is a ValueError naming both, raised before any write);
    NumPy arrays and torch CPU tensors mix freely.

    Gradient handling, fused into the update (no extra pass over the parameters):

    - ``max_grad_norm``: clip by the global L2 norm over every parameter, as
      ``torch.nn.utils.clip_grad_norm_`` (coefficient ``min(1, max_norm / (norm + 1e-6))``); the
      norm is a deterministic float64 reduction, one extra read of the gradients. The pre-clip
      norm is ``last_grad_norm``.
    - ``max_grad_value``: clip every gradient element to [-v, v] (``clip_grad_value_``), after
      the norm clipping.
    - ``skip_nonfinite``: if any gradient holds NaN or Inf, skip the whole step (parameters,
      state, step counters and schedules untouched), count it in ``skipped_steps`` and set
      ``last_step_taken = False``. Without it, a NaN propagates into the parameters, as in torch.

    ``stream``: the CUDA stream every launch goes on (a torch/CuPy/numba stream or a
    ``cudaStream_t`` handle). By default each step follows the arrays' library: torch's current
    stream on the tensor's device, CuPy's current stream, the ``__cuda_array_interface__``
    stream entry (:mod:`fastopt.streams`), so ``with torch.cuda.stream(s): opt.step()`` is
    ordered on ``s``. The norm/finiteness check synchronises that stream alone.

    Storage precision (``fastopt.optim.precision``): parameters and gradients may be float32,
    float64, bfloat16 (``ml_dtypes.bfloat16`` arrays, torch bfloat16 tensors) or float16, and a
    gradient's dtype may differ from its parameter's (Numba CPU backend). 16-bit values are
    widened to float32, the rule runs in float32 and the results are rounded on store.
    ``state_dtype=`` (default: the parameter's dtype), ``master_weights=`` (a float32 copy of
    16-bit parameters), ``stochastic_rounding=`` and ``seed=`` choose how.
    """

    algorithm = ""
    """Name of the rule family and of its reference function in ``fastopt.reference``."""
    requires_closure = False
    """True for optimizers whose ``step(closure)`` re-evaluates the objective (LBFGS)."""

    element_offset = 0
    """Index of this optimizer's first parameter element in a larger parameter set (a ZeRO
    shard's ``lo``): stochastic rounding's element index starts there."""
    state_offsets = None
    """{state array name: index of this optimizer's first element of it in the larger set's
    layout of that array} (a ZeRO shard of a per-tensor rule sets it: Adafactor's factors and
    NovoGrad's per-tensor moments are not one value per element); stochastic rounding of that
    array counts from there. None: from the unit's parameter offset."""

    elementwise = True
    """True when every element's update depends on that element alone, so any slice of the flat
    buffer can be stepped on its own (ZeRO-1 shards, plain-array slices). Per-tensor rules (LAMB,
    LARS, NovoGrad: a norm per tensor) set it False."""
    state_like_params = True
    """True when every state array holds one value per parameter element, laid out like the
    parameters (Adafactor's row and column factors are not: see :attr:`tensor_state`)."""
    tensor_state = ()
    """The names of the state arrays that are not one value per parameter element, each the
    shares of the unit's tensors back to back in their order (:meth:`tensor_state_shapes` gives
    a tensor's share): Adafactor's factors, NovoGrad's per-tensor moment. ``fastopt.torch``
    keeps each in a flat buffer of its own with that layout."""

    @classmethod
    def tensor_state_shapes(cls, shape):
        """{name in :attr:`tensor_state`: its shape} for one tensor of ``shape``, in torch's
        shapes; a name the tensor has no share of is left out."""
        return {}

    def __init__(
        self,
        params,
        defaults,
        *,
        backend=None,
        max_grad_norm=None,
        max_grad_value=None,
        skip_nonfinite=False,
        stream=None,
        state_dtype=None,
        master_weights=False,
        stochastic_rounding=False,
        seed=0,
    ):
        self.defaults = dict(defaults)
        self.precision = precision.precision_options(
            state_dtype, master_weights, stochastic_rounding, seed
        )
        self._offsets = None
        self._backend_name = backend
        self._stream = streams.handle(stream)
        if max_grad_norm is not None:
            check_positive("max_grad_norm", max_grad_norm)
        if max_grad_value is not None:
            check_positive("max_grad_value", max_grad_value)
        check_bool("skip_nonfinite", skip_nonfinite)
        self.max_grad_norm = max_grad_norm
        self.max_grad_value = max_grad_value
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.last_step_taken = None
        self.last_grad_norm = None
        if backend is not None:
            dispatch.get_backend(backend)  # unknown/unavailable backends fail at construction
        self.param_groups = []
        self._groups = []  # internal, parallel to param_groups: dict(units, structure, keys, ...)
        is_group_list = (
            isinstance(params, (list, tuple))
            and len(params) > 0
            and all(isinstance(p, Mapping) and "params" in p for p in params)
        )
        self._grouped = is_group_list
        for group in params if is_group_list else [{"params": params}]:
            self.add_param_group(group)
        if not self.param_groups:
            raise ValueError("optimizer got an empty parameter list")

    # ------------------------------------------------------------------ public accessors
    @property
    def backend_name(self):
        """The backend named at construction (``backend=``), or None when picked from the arrays."""
        return self._backend_name

    def sources(self):
        """Each param group's ``params`` exactly as given (a ParamSet, an array, a list or dict),
        in group order: how wrappers (Trainer, DataParallel, ZeRO) check what an optimizer is
        built over without reaching into its internals."""
        return [g["source"] for g in self._groups]

    def step_streams(self):
        """A :class:`fastopt.streams.StepStreams` for one round of work on this optimizer's
        arrays: ``stream_of(unit)`` is the ``stream=`` given at construction, else the current
        stream of the library owning the unit's arrays (None for host arrays). Wrappers that
        launch on the optimizer's arrays (GradientAccumulator) order their work with it."""
        return streams.StepStreams(self._stream)

    def units(self):
        """Every :class:`~fastopt.optim.units.Unit` (one kernel call's arrays), in group order,
        then in the order of each group's params."""
        return [u for g in self._groups for u in g["units"]]

    def check_grads(self, grads):
        """Check ``grads`` (the structure ``step()`` takes) as ``step()`` would, without writing
        anything; return ``[(unit, flat gradient)]`` for every gradient given (None entries
        left out), each gradient the unit's backend's native flat view."""
        return [pair for _, work in self._checked_grads(grads) for pair in work]

    def structure_grads(self, per_unit):
        """The ``grads`` argument of ``step()`` from one array (or None) per unit, in
        :meth:`units` order: lists, dicts and arrays shaped like the params, one entry per group
        with param-group dicts. For a ParamSet, None means its own gradient buffer."""
        it = iter(per_unit)
        entries = [
            join_grads(g["structure"], g["keys"], [next(it) for _ in g["units"]])
            for g in self._groups
        ]
        return entries if self._grouped else entries[0]

    # ------------------------------------------------------------------ subclass interface
    hyperparameter_table = None
    """The class's hyperparameters as :class:`~fastopt.optim.hyperparameters.Hyper` rows, in
    torch's argument order. A class that declares one gets its ``__init__`` (real signature),
    defaults and ``_check`` built from it; a class with a hand-written ``__init__`` (passing
    ``constructor_defaults(locals())``) and ``_check`` leaves it None."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "hyperparameter_table" in cls.__dict__ and "__init__" not in cls.__dict__:
            cls.__init__ = constructor(cls)

    def _check(self, group):
        """Raise ValueError/TypeError naming any out-of-range hyperparameter of ``group``: each
        row's check in table order, then ``_check_together`` (classes without a table override
        this)."""
        if self.hyperparameter_table is None:
            raise NotImplementedError
        group = self._scheduled(group, 0)  # a scheduled hyperparameter: its first value
        check_table(self.hyperparameter_table, group)
        self._check_together(group)
        precision.check_int8_rule(self, group)

    def _check_together(self, group):
        """Checks across hyperparameters (e.g. SGD's nesterov needing momentum), after the rows'."""

    def _rule(self, group):
        """Name of the rule in kernels/rules.py that this group's settings select."""
        raise NotImplementedError

    def _state_names(self, group):
        """Names (torch's) of the per-element state arrays, in the rule's slot order."""
        raise NotImplementedError

    def _scalars(self, group, state, step, lr):
        """(scalars, scalar_state_updates): the rule's per-step scalars in float64 for the
        ``step``-th step (1-based) at learning rate ``lr``, as a dict keyed by the field names
        ``rules.SCALARS[rule]`` declares, and new values of scalar state (e.g. NAdam's
        mu_product) to commit once the kernel has run (or None)."""
        raise NotImplementedError

    def _initial_value(self, group, name, lr):
        """Fill value of state array ``name`` at allocation (torch's initial state)."""
        return 0.0

    def _initial_scalar_state(self, group):
        """Scalar (host) state entries besides ``step``."""
        return {}

    def _state_shape(self, g_int, unit, name):
        """The shape ``state_dict()`` gives state array ``name`` of ``unit`` (the parameter's;
        Adafactor's row and column factors override it)."""
        return unit.shape

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group):
        """Add a group ``{"params": ..., **overrides}``; missing hyperparameters take the defaults.
        An optimizer built over plain parameters (not group dicts) then has several groups, and
        ``step()`` takes one gradient entry per group (None: a ParamSet's own buffer), as it does
        for an optimizer built from group dicts."""
        if not isinstance(param_group, Mapping) or "params" not in param_group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        unknown = set(param_group) - set(self.defaults) - {"params", "initial_lr"}
        if unknown:
            raise ValueError(f"unknown hyperparameters {sorted(unknown)} for {type(self).__name__}")
        group = {**self.defaults, **param_group}
        where = f"param_groups[{len(self.param_groups)}]"
        structure, units, keys = units_of(group["params"], where, self._backend_name)
        if not units:
            raise ValueError(f"{where} is empty: an optimizer needs parameters")
        self._check(group)
        if self._backend_name is not None:
            for u in units:  # a named backend must take these arrays: say so now, not at step()
                if u.backend is None:
                    backend = dispatch.backend_for_kind(u.kind, self._backend_name)
                    precision.check_param_storable(backend, u.param, u.label)
        for u in units:
            if u.backend is not None:
                precision.check_param_storable(u.backend, u.param, u.label)
        precision.check_int8_backends(self.precision, units, self._backend_name)
        taken = [u.memory_span() for u in self.units()]
        for u in units:
            span = u.memory_span()
            if any(overlaps(span, t) for t in taken):
                raise ValueError(
                    f"{u.label} shares memory with a parameter already in this optimizer "
                    "(a parameter may be in one group only)"
                )
            taken.append(span)
        group.setdefault("initial_lr", group["lr"])
        if self.param_groups:  # a second group: gradients come per group from now on
            self._grouped = True
        self.param_groups.append(group)
        self._groups.append(
            {
                "units": units,
                "structure": structure,
                "keys": keys,
                "source": group["params"],
                "steps": 0,
                "checked": None,
            }
        )

    def _index_base(self):
        out, n = [], 0
        for g in self._groups:
            out.append(n)
            n += len(g["units"])
        return out

    # ------------------------------------------------------------------ step
    def zero_grad(self):
        """Zero the gradient buffers of every ParamSet group (plain arrays own no gradient buffer)."""
        stream_of = streams.StepStreams(self._stream)
        for u in self.units():
            if u.default_grad is not None:
                if u.device is None:
                    u.default_grad.fill(0)
                else:
                    u.backend.fill(u.default_grad, 0, stream_of(u))

    def step(self, grads=None, *, grad_scale=None):
        """One update of every parameter whose gradient is given, in place.

        ``grads`` mirrors ``params``: a list/tuple/dict of arrays (``None`` entries skip that
        parameter, as torch skips params without ``.grad``), a flat array for a ParamSet, or
        ``None`` to use the ParamSet gradient buffers. With param-group dicts, a list with one such
        entry per group. ``grad_scale`` multiplies every gradient inside the update (e.g. 1/k for
        k accumulated micro-batches, 1/S to remove a loss scale S). Everything is validated
        before anything is written.
        """
        plan = self._plan(grads)
        stream_of = streams.StepStreams(self._stream)
        scales = self._grad_scales(plan, grad_scale, stream_of)
        if scales is None:
            return
        gscale, gclip = scales
        # Every unit's scalars before the first launch: a subclass returning the wrong fields
        # fails with nothing written.
        launches = []
        storages = {}  # id(unit) -> (storage, plain)
        for _, _, _, work in plan:
            for unit, grad in work:
                storages[id(unit)] = self._storage(unit, grad)
        for group, g_int, lr, work in plan:
            rule, names = g_int["rule"], g_int["state_names"]
            for unit, grad in work:
                state = unit.state
                if not state:
                    self._allocate(group, unit, names, lr, stream_of(unit))
                step = state["step"] + 1
                kept = storages[id(unit)]
                values, updates = self._scalars(group, state, step, lr)
                h = scalar_tuple(self, rule, values, unit.scalar_type)
                launches.append((group, rule, names, lr, unit, grad, step, h, updates, kept))
        for group, rule, names, lr, unit, grad, step, h, updates, kept in launches:
            state = unit.state
            st = unit.scalar_type
            storage, plain = kept
            if plain:
                unit.backend.update(
                    rule,
                    unit.param,
                    grad,
                    [state[n] for n in names],
                    h,
                    self._cast_scales(st, gscale, gclip),
                    (self, group, state, lr, step),
                    stream_of(unit),
                )
            else:
                unit.backend.update_storage(
                    rule,
                    storage,
                    unit.param,
                    grad,
                    [state[n] for n in names],
                    state.get(precision.MASTER),
                    h,
                    self._cast_scales(st, gscale, gclip),
                    (self.precision.seed, step, self._offset_of(unit)),
                    stream_of(unit),
                )
            state["step"] = step
            if updates:
                state.update(updates)
        self._count_step(plan)

    def _storage(self, unit, grad):
        """(``access.Storage`` of the unit's update with ``grad``, whether it is plain), checked
        against the unit's backend (TypeError naming the unit). It depends only on the precision
        options, the gradient's dtype and the backend (the parameter's dtype and size are the
        unit's): the last answer is kept on the unit while those are the same objects, which
        spares the lookups in the host time of a small step."""
        memo = unit.storage_memo
        if (
            memo is not None
            and memo[0] is self.precision
            and memo[1] is grad.dtype
            and memo[2] is unit.backend
        ):
            return memo[3]
        storage = precision.storage_of(self.precision, unit.param, grad)
        precision.check_backend_stores(unit.backend, storage, unit.label)
        answer = (storage, precision.is_plain(storage))
        unit.storage_memo = (self.precision, grad.dtype, unit.backend, answer)
        return answer

    def _cast_scales(self, cast, gscale, gclip):
        """``(cast(gscale), cast(gclip))``, the last one kept (the same every step unless the
        gradient is scaled or clipped by norm)."""
        memo = self.__dict__.get("_scales_memo")
        if memo is not None and memo[0] is cast and memo[1] == gscale and memo[2] == gclip:
            return memo[3]
        out = (cast(gscale), cast(gclip))
        self._scales_memo = (cast, gscale, gclip, out)
        return out

    def _grad_scales(self, plan, grad_scale, stream_of=None):
        """(gscale, gclip) of this step: ``grad_scale`` times the norm-clipping coefficient,
        and the elementwise clip (0 for none); None when ``skip_nonfinite`` skips the step
        (counted here). ``stream_of``: the step's :class:`fastopt.streams.StepStreams`."""
        if stream_of is None:
            stream_of = streams.StepStreams(self._stream)
        if self.max_grad_value is not None:
            for _, _, _, work in plan:
                for unit, _ in work:
                    check_clip_representable("max_grad_value", self.max_grad_value, unit)
        gscale = 1.0
        if grad_scale is not None:
            check_positive("grad_scale", grad_scale)
            gscale = float(grad_scale)
        if self.max_grad_norm is not None or self.skip_nonfinite:
            norm, finite = self._grad_norm(plan, gscale, stream_of)
            self.last_grad_norm = norm
            if self.skip_nonfinite and not finite:
                self.skipped_steps += 1
                self.last_step_taken = False
                return None
            if self.max_grad_norm is not None:
                gscale *= clip_coefficient(norm, self.max_grad_norm)
        return gscale, 0.0 if self.max_grad_value is None else float(self.max_grad_value)

    def _count_step(self, plan):
        """Advance the step counters of the groups in ``plan`` once every kernel has run."""
        for _, g_int, _, _ in plan:
            g_int["steps"] += 1
        self.last_step_taken = True

    @staticmethod
    def _grad_norm(plan, gscale, stream_of):
        """Global L2 norm of the (scaled) gradients and whether all are finite: one read of each
        gradient, summed in a fixed order (groups, then parameters) so it is deterministic."""
        sumsq, finite = 0.0, True
        for _, _, _, work in plan:
            for unit, grad in work:
                s, f = unit.backend.sumsq_and_finite(grad, stream_of(unit))
                sumsq += s
                finite = finite and f
        return gscale * math.sqrt(sumsq), finite

    def hyperparameters(self, group, lr):
        """The group's hyperparameters as keyword arguments of its ``fastopt.reference`` rule."""
        hyper = {k: group[k] for k in self.defaults}
        hyper["lr"] = lr
        return hyper

    def _group_settings(self, i, group, g_int):
        """Validate hyperparameters when they changed since the last step; cache rule and slots."""
        # Re-check only when a hyperparameter changed. A list value never equals the stored tuple,
        # so in-place edits of list-valued settings are re-checked every step (slow but correct).
        key = tuple(map(group.__getitem__, self.defaults))
        if g_int["checked"] != key:
            self._check(group)
            g_int["rule"] = self._rule(group)
            names = self._state_names(group)
            for u in g_int["units"]:
                if u.state and any(n not in u.state for n in names):
                    raise ValueError(
                        f"param_groups[{i}]: the settings changed to need state {names}, but the state "
                        f"of {u.label} holds {sorted(k for k in u.state if k != 'step')}; "
                        "create a new optimizer to switch variants"
                    )
            g_int["state_names"] = names
            g_int["checked"] = tuple(tuple(v) if isinstance(v, list) else v for v in key)
        if group["params"] is not g_int["source"]:
            raise ValueError(
                f"param_groups[{i}]['params'] was replaced; add parameters with add_param_group()"
            )

    def _plan(self, grads):
        """[(group, internal group, lr, [(unit, checked grad)])]: everything a step needs,
        validated."""
        checked = self._checked_grads(grads)
        plan = []
        for i, (group, (g_int, work)) in enumerate(zip(self.param_groups, checked)):
            group = self._scheduled(group, g_int["steps"])
            self._group_settings(i, group, g_int)
            lr = group["lr"]
            if callable(lr):
                lr = check_scheduled_lr(lr(g_int["steps"]), g_int["steps"])
            else:
                lr = float(lr)
            plan.append((group, g_int, lr, work))
        return plan

    def _scheduled(self, group, k):
        """``group``, or a copy with its scheduled hyperparameters other than ``lr``
        (:class:`fastopt.schedules.Schedule` objects such as ``CyclicMomentum``, also as entries
        of a tuple such as ``betas``) replaced by their value at step ``k``; the table checks
        then see numbers. Other callables (LARS's masks) are hyperparameters in their own right."""
        schedules = sys.modules.get("fastopt.schedules")
        if schedules is None:  # not imported: no hyperparameter can be a schedule
            return group
        schedule = schedules.Schedule
        out = None
        for name in self.defaults:
            if name == "lr":
                continue
            v = group[name]
            if isinstance(v, schedule):
                value = v(k)
            elif isinstance(v, (tuple, list)) and any(isinstance(x, schedule) for x in v):
                value = tuple(x(k) if isinstance(x, schedule) else x for x in v)
            else:
                continue
            if out is None:
                out = dict(group)
            out[name] = value
        return group if out is None else out

    def _checked_grads(self, grads):
        """[(internal group, [(unit, checked flat grad)])] for every group (None grads left out)."""
        out = []
        for g_int, per_unit in zip(self._groups, self._split_grads(grads)):
            work = []
            for unit, grad in zip(g_int["units"], per_unit):
                if grad is None:
                    continue
                self._ensure_backend(unit)
                work.append((unit, check_grad(unit, grad)))
            out.append((g_int, work))
        return out

    def _ensure_backend(self, unit):
        """Pick a host unit's backend on first use (device units got theirs at construction)."""
        if unit.backend is None:
            backend = dispatch.backend_for([unit.param], self._backend_name)
            precision.check_param_storable(backend, unit.param, unit.label)
            unit.use_backend(backend)

    def _offset_of(self, unit):
        """Index of the unit's first element among all the optimizer's parameters (the element
        index of stochastic rounding's random bits)."""
        if self._offsets is None or unit not in self._offsets:
            self._offsets, n = {}, self.element_offset
            for u in self.units():
                self._offsets[u] = n
                n += u.param.size
        return self._offsets[unit]

    def _tensor_state_offsets(self, unit):
        """{name in :attr:`tensor_state`: index of the unit's first value of that state array
        among all the units' arrays}: the place a ParamSet of the same tensors gives it, so that
        stochastic rounding draws the same bits for a list of arrays and for a ParamSet."""
        cache = self.__dict__.setdefault("_tensor_offsets", {})
        hit = cache.get(unit)
        if hit is None:
            cache.clear()
            totals = dict.fromkeys(self.tensor_state, 0)
            for g_int in self._groups:
                for u in g_int["units"]:
                    cache[u] = dict(totals)
                    for name in self.tensor_state:
                        totals[name] += math.prod(self._state_shape(g_int, u, name))
            hit = cache[unit]
        return hit

    def _split_grads(self, grads):
        """Per group, a list of per-unit gradients (None = skip) following the params' structure."""
        groups = self._groups
        if not self._grouped:
            g = groups[0]
            return [split_grads(g["structure"], g["units"], g["keys"], grads, "params")]
        if grads is None:
            grads = [None] * len(groups)
        elif not isinstance(grads, (list, tuple)) or len(grads) != len(groups):
            raise ValueError(
                f"with {len(groups)} param groups, step() takes a list of {len(groups)} "
                "gradient entries (one per group) or None"
            )
        return [
            split_grads(g["structure"], g["units"], g["keys"], gr, f"param_groups[{i}]")
            for i, (g, gr) in enumerate(zip(groups, grads))
        ]

    def state_array_dtype(self, name, param):
        """The dtype a state array ``name`` of ``param`` (a unit's flat array) outside the rule's
        slots is kept in (the float32 master copy; a per-tensor or per-row array): the state
        dtype, float32 where the slots are 8-bit (``precision.state_dtype``)."""
        if name == precision.MASTER:
            return np.dtype(np.float32)
        dtype = precision.state_dtype(self.precision, param)
        return np.dtype(np.float32) if dtype is precision.INT8 else np.dtype(dtype)

    def _allocate(self, group, unit, names, lr, stream=None):
        for n, dtype in precision.slot_dtypes(self.precision, unit.param, names).items():
            if precision.is_quantized(dtype):  # 8-bit codes and block absmax
                fill = self._initial_value(group, n, lr)
                unit.state[n] = precision.int8_zeros(
                    unit.backend, unit.param.size, dtype, fill, like=unit.param, stream=stream
                )
                continue
            a = unit.backend.zeros(unit.param.size, dtype, like=unit.param, stream=stream)
            if n == precision.MASTER:
                # exact (float32 holds every 16-bit value), on the step's stream
                unit.backend.assign(a, unit.param, stream)
            else:
                fill = self._initial_value(group, n, lr)
                if fill != 0:
                    unit.backend.fill(a, fill, stream)
            unit.state[n] = a
        unit.state.update(self._initial_scalar_state(group))
        unit.state["step"] = 0

    # ------------------------------------------------------------------ state
    @property
    def state(self):
        """Per-parameter state, keyed like state_dict()["state"] (live arrays, flat)."""
        return {i: u.state for i, u in enumerate(self.units()) if u.state}

    def state_dict(self):
        """Plain-dict snapshot (NumPy copies and Python scalars), torch.optim's layout:
        ``{"algorithm", "state": {i: {"step", <arrays shaped like param i>...}}, "param_groups"}``."""
        return _state_dict.state_dict(self)

    def load_state_dict(self, state_dict):
        """Restore a state_dict() of the same optimizer class over parameters of the same shapes.
        Everything is checked before anything changes."""
        _state_dict.load_state_dict(self, state_dict)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"  group {i}: " + ", ".join(f"{k}={g[k]!r}" for k in self.defaults))
        return "\n".join(lines + [")"])
