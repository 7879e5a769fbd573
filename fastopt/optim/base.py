"""Optimizer base: param groups, lazily allocated state, validation, state_dict.

Subclasses are thin: they declare torch's hyperparameters and defaults, check them, name the rule
and state slots for a group, and fold the hyperparameters into the rule's per-step scalar tuple.
Every check of a step runs before its first write, so a failed ``step()`` changes nothing.
"""

import math
from collections.abc import Mapping

import numpy as np

from .. import arrays, dispatch
from ..paramset import ParamSet
from ..validation import check_bool, check_lr, check_positive, check_scheduled_lr


class _Unit:
    """One kernel call's worth of parameters: a ParamSet's flat buffer or one plain array."""

    __slots__ = (
        "param",
        "source",
        "shape",
        "default_grad",
        "state",
        "backend",
        "label",
        "scalar_type",
        "kind",
        "device",
    )

    def __init__(self, param, source, shape, default_grad, label):
        self.param = param  # flat 1-D view that the kernels update
        self.source = source  # the user's array (its flags, not the view's, say if it is writable)
        self.shape = shape
        self.default_grad = default_grad
        self.label = label
        self.state = {}
        self.backend = None
        self.scalar_type = None
        self.kind = "numpy"  # arrays.array_kind of the user's array
        self.device = None  # None: host memory; "cuda:<i>" ("cuda" if unknown): device memory


def _host_unit(a, label):
    """A unit over a torch CPU tensor: the kernels update a NumPy view of its memory."""
    view = arrays.host_view(a)
    unit = _Unit(_flat_view(view, label), view, tuple(view.shape), None, label)
    unit.kind = arrays.array_kind(a)
    return unit


def _device_unit(a, label, backend_name, default_grad=None):
    """A unit over a CUDA array (CuPy, torch CUDA tensor, ``__cuda_array_interface__`` or DLPack):
    the backend is fixed here, so an unavailable one fails at construction, before any write.
    ``param``/``default_grad`` are the backend's native flat views of the same memory."""
    kind = arrays.array_kind(a)
    backend = dispatch.backend_for_kind(kind, backend_name)
    native = backend.native(a)
    dtype = native.dtype
    if dtype.kind != "f" or dtype not in (np.float32, np.float64):
        raise TypeError(f"{label} has dtype {dtype}; fastopt updates float32 or float64 arrays")
    if not backend.is_c_contiguous(native):
        raise ValueError(f"{label} is not C-contiguous; pass a contiguous array")
    if arrays.is_readonly(a):
        raise ValueError(f"{label} is read-only; the optimizer updates parameters in place")
    if default_grad is not None:
        default_grad = backend.flat(backend.native(default_grad))
    unit = _Unit(backend.flat(native), a, tuple(native.shape), default_grad, label)
    unit.kind = kind
    index = arrays.device_index(a, kind)
    unit.device = "cuda" if index is None else f"cuda:{index}"
    unit.backend = backend
    unit.scalar_type = backend.scalar_type(dtype)
    return unit


def _unit(a, label, backend_name):
    if isinstance(a, np.ndarray):  # the common case first
        return _Unit(_flat_view(a, label), a, a.shape, None, label)
    if arrays.is_device_kind(arrays.array_kind(a)):
        return _device_unit(a, label, backend_name)
    return _host_unit(a, label)


def _memory_span(u):
    """(device, first byte, end byte) of a unit's memory: a parameter must not be in two groups,
    while disjoint views of one buffer (weights and biases of a ParamSet) may be."""
    p = u.param
    if u.device is not None:
        start = arrays.data_ptr(p)
    else:
        start = p.ctypes.data
    return (u.device or "cpu", start, start + p.size * p.dtype.itemsize)


def _overlaps(a, b):
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def _flat_view(a, label):
    if not isinstance(a, np.ndarray):
        arrays.array_kind(a)  # raises a clear error for unsupported types
    if a.dtype.kind != "f" or a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{label} has dtype {a.dtype}; fastopt updates float32 or float64 arrays")
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{label} is not C-contiguous; pass a contiguous array (np.ascontiguousarray)"
        )
    if not a.flags.writeable:
        raise ValueError(f"{label} is read-only; the optimizer updates parameters in place")
    return a.reshape(-1)


def _units_of(params, where, backend_name=None):
    """(structure, units, keys) of one group's ``params``."""
    if isinstance(params, ParamSet):
        label = f"{where} ParamSet"
        if isinstance(params.flat, np.ndarray):
            unit = _Unit(params.flat, params.flat, (params.size,), params.grad_flat, label)
        else:
            unit = _device_unit(params.flat, label, backend_name, default_grad=params.grad_flat)
            unit.shape = (params.size,)
        return "paramset", [unit], None
    if isinstance(params, Mapping):
        keys = list(params)
        units = [_unit(a, f"{where} param {k!r}", backend_name) for k, a in params.items()]
        return "dict", units, keys
    if isinstance(params, (list, tuple)):
        units = [_unit(a, f"{where} param [{i}]", backend_name) for i, a in enumerate(params)]
        return "list", units, None
    if hasattr(params, "shape") or hasattr(params, "__dlpack_device__"):
        return "array", [_unit(params, f"{where} param", backend_name)], None
    raise TypeError(
        f"{where} params must be a ParamSet, an array, a list/tuple/dict of arrays, "
        f"got {type(params).__name__}"
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
    """

    algorithm = ""
    """Name of the rule family and of its reference function in ``fastopt.reference``."""

    def __init__(
        self,
        params,
        defaults,
        *,
        backend=None,
        max_grad_norm=None,
        max_grad_value=None,
        skip_nonfinite=False,
    ):
        self.defaults = dict(defaults)
        self._backend_name = backend
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

    # ------------------------------------------------------------------ subclass interface
    def _check(self, group):
        """Raise ValueError/TypeError naming any out-of-range hyperparameter of ``group``."""
        raise NotImplementedError

    def _rule(self, group):
        """Name of the rule in kernels/rules.py that this group's settings select."""
        raise NotImplementedError

    def _state_names(self, group):
        """Names (torch's) of the per-element state arrays, in the rule's slot order."""
        raise NotImplementedError

    def _scalars(self, group, state, step, lr):
        """(h, scalar_state_updates): the rule's per-step scalars in float64 for the ``step``-th
        step (1-based) at learning rate ``lr``, and new values of scalar state (e.g. NAdam's
        mu_product) to commit once the kernel has run."""
        raise NotImplementedError

    def _initial_value(self, group, name, lr):
        """Fill value of state array ``name`` at allocation (torch's initial state)."""
        return 0.0

    def _initial_scalar_state(self, group):
        """Scalar (host) state entries besides ``step``."""
        return {}

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group):
        """Add a group ``{"params": ..., **overrides}``; missing hyperparameters take the defaults."""
        if not isinstance(param_group, Mapping) or "params" not in param_group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        unknown = set(param_group) - set(self.defaults) - {"params", "initial_lr"}
        if unknown:
            raise ValueError(f"unknown hyperparameters {sorted(unknown)} for {type(self).__name__}")
        group = {**self.defaults, **param_group}
        where = f"param_groups[{len(self.param_groups)}]"
        structure, units, keys = _units_of(group["params"], where, self._backend_name)
        if not units:
            raise ValueError(f"{where} is empty: an optimizer needs parameters")
        self._check(group)
        if self._backend_name is not None:
            for u in units:  # a named backend must take these arrays: say so now, not at step()
                if u.backend is None:
                    dispatch.backend_for_kind(u.kind, self._backend_name)
        taken = [_memory_span(u) for g in self._groups for u in g["units"]]
        for u in units:
            span = _memory_span(u)
            if any(_overlaps(span, t) for t in taken):
                raise ValueError(
                    f"{u.label} shares memory with a parameter already in this optimizer "
                    "(a parameter may be in one group only)"
                )
            taken.append(span)
        group.setdefault("initial_lr", group["lr"])
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
        for g in self._groups:
            for u in g["units"]:
                if u.default_grad is not None:
                    if u.device is None:
                        u.default_grad.fill(0)
                    else:
                        u.backend.fill(u.default_grad, 0)

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
        gscale = 1.0
        if grad_scale is not None:
            check_positive("grad_scale", grad_scale)
            gscale = float(grad_scale)
        if self.max_grad_norm is not None or self.skip_nonfinite:
            norm, finite = self._grad_norm(plan, gscale)
            self.last_grad_norm = norm
            if self.skip_nonfinite and not finite:
                self.skipped_steps += 1
                self.last_step_taken = False
                return
            if self.max_grad_norm is not None:
                gscale *= min(self.max_grad_norm / (norm + 1e-6), 1.0)
        gclip = 0.0 if self.max_grad_value is None else float(self.max_grad_value)
        for group, g_int, lr, work in plan:
            rule, names = g_int["rule"], g_int["state_names"]
            for unit, grad in work:
                state = unit.state
                if not state:
                    self._allocate(group, unit, names, lr)
                step = state["step"] + 1
                h, updates = self._scalars(group, state, step, lr)
                st = unit.scalar_type
                unit.backend.update(
                    rule,
                    unit.param,
                    grad,
                    [state[n] for n in names],
                    tuple(map(st, h)),
                    (st(gscale), st(gclip)),
                    (self, group, state, lr, step),
                )
                state["step"] = step
                if updates:
                    state.update(updates)
            g_int["steps"] += 1
        self.last_step_taken = True

    @staticmethod
    def _grad_norm(plan, gscale):
        """Global L2 norm of the (scaled) gradients and whether all are finite: one read of each
        gradient, summed in a fixed order (groups, then parameters) so it is deterministic."""
        sumsq, finite = 0.0, True
        for _, _, _, work in plan:
            for unit, grad in work:
                s, f = unit.backend.sumsq_and_finite(grad)
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
        per_group = self._split_grads(grads)
        plan = []
        for i, (group, g_int, ggrads) in enumerate(zip(self.param_groups, self._groups, per_group)):
            self._group_settings(i, group, g_int)
            lr = group["lr"]
            lr = (
                check_scheduled_lr(lr(g_int["steps"]), g_int["steps"])
                if callable(lr)
                else float(lr)
            )
            work = []
            for unit, grad in zip(g_int["units"], ggrads):
                if grad is None:
                    continue
                work.append((unit, self._check_grad(unit, grad)))
            plan.append((group, g_int, lr, work))
        return plan

    def _check_grad(self, unit, grad):
        p = unit.param
        if unit.device is not None:
            return self._check_device_grad(unit, grad)
        if unit.backend is None:
            unit.backend = dispatch.backend_for([p], self._backend_name)
            unit.scalar_type = unit.backend.scalar_type(p.dtype)
        if grad is unit.default_grad:
            if not unit.source.flags.writeable:
                raise ValueError(
                    f"{unit.label} is read-only; the optimizer updates parameters in place"
                )
            return grad
        if type(grad) is not type(p):
            grad = self._host_grad(unit, grad)
        if grad.dtype != p.dtype:
            raise TypeError(
                f"gradient for {unit.label} has dtype {grad.dtype}, the parameter {p.dtype}"
            )
        if grad.shape != unit.shape and not (
            unit.default_grad is not None and grad.shape == (p.size,)
        ):
            raise ValueError(
                f"gradient for {unit.label} has shape {grad.shape}, expected {unit.shape}"
            )
        if not grad.flags.c_contiguous:
            raise ValueError(f"gradient for {unit.label} is not C-contiguous")
        if not unit.source.flags.writeable:
            raise ValueError(
                f"{unit.label} is read-only; the optimizer updates parameters in place"
            )
        return grad.reshape(-1)

    @staticmethod
    def _host_grad(unit, grad):
        """The gradient of a host unit that is not a plain ndarray: a torch CPU tensor becomes a
        NumPy view (host memory either way); anything else is an error naming the mismatch."""
        if not isinstance(grad, np.ndarray):
            kind = arrays.array_kind(grad)  # TypeError for unsupported types
            if kind == "torch-cpu":
                return arrays.host_view(grad)
            raise ValueError(
                f"gradient for {unit.label} is {arrays.describe(grad, kind)}, the parameter "
                f"{arrays.describe(unit.source)}: they live on different devices/libraries"
            )
        raise TypeError(
            f"gradient for {unit.label} is a {type(grad).__name__}, the parameter a {type(unit.param).__name__}"
        )

    @staticmethod
    def _check_device_grad(unit, grad):
        """``_check_grad`` for a unit in device memory: kind, device, dtype, shape, contiguity;
        returns the backend's native flat view of the gradient."""
        if grad is unit.default_grad:
            return grad
        kind = arrays.array_kind(grad)  # TypeError for unsupported types
        if kind != unit.kind:
            raise ValueError(
                f"gradient for {unit.label} is {arrays.describe(grad, kind)}, the parameter "
                f"{arrays.describe(unit.source, unit.kind)}: they live on different "
                "devices/libraries"
            )
        index = arrays.device_index(grad, kind)
        if index is not None and unit.device != "cuda" and unit.device != f"cuda:{index}":
            raise ValueError(
                f"gradient for {unit.label} is on cuda:{index}, the parameter on {unit.device}"
            )
        backend = unit.backend
        g = backend.native(grad)
        if g.dtype != unit.param.dtype:
            raise TypeError(
                f"gradient for {unit.label} has dtype {g.dtype}, the parameter {unit.param.dtype}"
            )
        shape = tuple(g.shape)
        if shape != unit.shape and not (
            unit.default_grad is not None and shape == (unit.param.size,)
        ):
            raise ValueError(f"gradient for {unit.label} has shape {shape}, expected {unit.shape}")
        if not backend.is_c_contiguous(g):
            raise ValueError(f"gradient for {unit.label} is not C-contiguous")
        return backend.flat(g)

    def _split_grads(self, grads):
        """Per group, a list of per-unit gradients (None = skip) following the params' structure."""
        if self._grouped:
            if grads is None:
                return [
                    self._group_grads(g, None, f"param_groups[{i}]")
                    for i, g in enumerate(self._groups)
                ]
            if not isinstance(grads, (list, tuple)) or len(grads) != len(self._groups):
                raise ValueError(
                    f"with {len(self._groups)} param groups, step() takes a list of {len(self._groups)} "
                    "gradient entries (one per group) or None"
                )
            return [
                self._group_grads(g, gr, f"param_groups[{i}]")
                for i, (g, gr) in enumerate(zip(self._groups, grads))
            ]
        return [self._group_grads(self._groups[0], grads, "params")]

    @staticmethod
    def _group_grads(g_int, grads, where):
        structure, units = g_int["structure"], g_int["units"]
        if grads is None:
            if structure != "paramset":
                raise ValueError(
                    f"step() without gradients needs a ParamSet; {where} holds plain arrays"
                )
            return [units[0].default_grad]
        if structure == "paramset":
            if isinstance(grads, ParamSet):
                grads = grads.grad_flat
            if not hasattr(grads, "shape"):
                raise TypeError(
                    f"gradient for the ParamSet in {where} must be a flat array or None"
                )
            return [grads]
        if structure == "array":
            return [grads]
        if structure == "dict":
            if not isinstance(grads, Mapping):
                raise TypeError(
                    f"{where} params are a dict; pass gradients as a dict with the same keys"
                )
            if set(grads) != set(g_int["keys"]):
                missing = sorted(set(g_int["keys"]) - set(grads))
                extra = sorted(set(grads) - set(g_int["keys"]))
                raise ValueError(
                    f"gradient keys do not match {where}: missing {missing}, unexpected {extra}"
                )
            return [grads[k] for k in g_int["keys"]]
        if not isinstance(grads, (list, tuple)) or len(grads) != len(units):
            raise ValueError(
                f"{where} has {len(units)} arrays; pass a list/tuple of {len(units)} gradients"
            )
        return list(grads)

    def _allocate(self, group, unit, names, lr):
        dtype = unit.param.dtype
        for n in names:
            a = unit.backend.zeros(unit.param.size, dtype, like=unit.param)
            fill = self._initial_value(group, n, lr)
            if fill != 0:
                unit.backend.fill(a, fill)
            unit.state[n] = a
        unit.state.update(self._initial_scalar_state(group))
        unit.state["step"] = 0

    # ------------------------------------------------------------------ state
    @property
    def state(self):
        """Per-parameter state, keyed like state_dict()["state"] (live arrays, flat)."""
        out, n = {}, 0
        for g in self._groups:
            for u in g["units"]:
                if u.state:
                    out[n] = u.state
                n += 1
        return out

    def state_dict(self):
        """Plain-dict snapshot (NumPy copies and Python scalars), torch.optim's layout:
        ``{"algorithm", "state": {i: {"step", <arrays shaped like param i>...}}, "param_groups"}``."""
        state, groups = {}, []
        base = self._index_base()
        for gi, (group, g_int) in enumerate(zip(self.param_groups, self._groups)):
            for j, u in enumerate(g_int["units"]):
                if not u.state:
                    continue
                entry = {}
                for k, v in u.state.items():
                    if k == "step":
                        entry[k] = int(v)
                    elif isinstance(v, float):
                        entry[k] = v
                    else:
                        entry[k] = u.backend.to_numpy(v).reshape(u.shape)
                state[base[gi] + j] = entry
            saved = {
                k: (tuple(v) if isinstance(v, list) else v)
                for k, v in group.items()
                if k != "params"
            }
            saved["params"] = list(range(base[gi], base[gi] + len(g_int["units"])))
            saved["steps"] = g_int["steps"]
            groups.append(saved)
        return {
            "algorithm": type(self).__name__,
            "state": state,
            "param_groups": groups,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict):
        """Restore a state_dict() of the same optimizer class over parameters of the same shapes.
        Everything is checked before anything changes."""
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(
                "not an optimizer state_dict: expected keys 'state' and 'param_groups'"
            )
        algo = state_dict.get("algorithm", type(self).__name__)
        if algo != type(self).__name__:
            raise ValueError(f"state_dict is for {algo}, this optimizer is {type(self).__name__}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups)} param groups, this optimizer {len(self.param_groups)}"
            )
        base = self._index_base()
        new_groups, new_states = [], {}
        for gi, (saved, g_int) in enumerate(zip(groups, self._groups)):
            idx = list(range(base[gi], base[gi] + len(g_int["units"])))
            if list(saved.get("params", [])) != idx:
                raise ValueError(
                    f"param_groups[{gi}] has {len(saved.get('params', []))} parameters in the state_dict, "
                    f"{len(idx)} here"
                )
            unknown = set(saved) - set(self.defaults) - {"params", "initial_lr", "steps"}
            if unknown:
                raise ValueError(
                    f"param_groups[{gi}] has unknown hyperparameters {sorted(unknown)}"
                )
            group = {
                **self.param_groups[gi],
                **{k: v for k, v in saved.items() if k not in ("params", "steps")},
            }
            group["params"] = self.param_groups[gi]["params"]
            check_lr(group["lr"])
            self._check(group)
            names = self._state_names(group)
            for j, u in enumerate(g_int["units"]):
                entry = state_dict["state"].get(base[gi] + j)
                if entry is None:
                    continue
                new_states[(gi, j)] = self._checked_entry(entry, names, group, u, base[gi] + j)
            new_groups.append(group)
        skipped = state_dict.get("skipped_steps", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, (int, np.integer)) or skipped < 0:
            raise ValueError(f"skipped_steps must be an int >= 0, got {skipped!r}")
        # commit
        self.skipped_steps = int(skipped)
        for gi, group in enumerate(new_groups):
            self.param_groups[gi].clear()
            self.param_groups[gi].update(group)
            self._groups[gi]["steps"] = int(groups[gi].get("steps", 0))
            self._groups[gi]["checked"] = None
            for j, u in enumerate(self._groups[gi]["units"]):
                u.state = new_states.get((gi, j), {})

    def _checked_entry(self, entry, names, group, unit, index):
        if not isinstance(entry, Mapping) or "step" not in entry:
            raise ValueError(f"state[{index}] is not a state entry with a 'step'")
        expected = set(names) | set(self._initial_scalar_state(group)) | {"step"}
        if set(entry) != expected:
            raise ValueError(
                f"state[{index}] holds {sorted(entry)}, {type(self).__name__} with these settings needs {sorted(expected)}"
            )
        step = entry["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"state[{index}]['step'] must be an int >= 0, got {step!r}")
        if unit.backend is None:
            unit.backend = dispatch.backend_for([unit.param], self._backend_name)
            unit.scalar_type = unit.backend.scalar_type(unit.param.dtype)
        out = {"step": int(step)}
        for k, v in entry.items():
            if k == "step":
                continue
            if k not in names:
                if not isinstance(v, (float, int)) or not math.isfinite(v):
                    raise ValueError(f"state[{index}][{k!r}] must be a finite float, got {v!r}")
                out[k] = float(v)
                continue
            a = _state_array(v)
            if a.dtype.kind != "f":
                raise TypeError(f"state[{index}][{k!r}] has dtype {a.dtype}, expected floats")
            if a.size != unit.param.size or tuple(a.shape) not in (
                tuple(unit.shape),
                (unit.param.size,),
            ):
                raise ValueError(
                    f"state[{index}][{k!r}] has shape {a.shape}, the parameter {tuple(unit.shape)}"
                )
            dst = unit.backend.zeros(unit.param.size, unit.param.dtype, like=unit.param)
            unit.backend.assign(dst, a.reshape(a.size))  # host or device source, cast
            out[k] = dst
        return out

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"  group {i}: " + ", ".join(f"{k}={g[k]!r}" for k in self.defaults))
        return "\n".join(lines + [")"])


def _state_array(v):
    """A state entry of load_state_dict as an array with ``dtype``/``shape``/``size``: NumPy and
    CuPy arrays and numba device arrays as they are (device entries are copied device to
    device), torch tensors as NumPy, anything else through ``np.asarray``."""
    if isinstance(v, np.ndarray) or not hasattr(v, "shape"):
        return np.asarray(v)
    try:
        kind = arrays.array_kind(v)
    except TypeError:
        return np.asarray(v)
    if kind == "cupy" or getattr(v, "__cuda_ndarray__", False):
        return v
    return arrays.to_host(v)
