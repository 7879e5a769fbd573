"""Loading torch's per-parameter optimizer state into the adapter's flat state.

After ``torch.optim.Optimizer.load_state_dict`` has matched groups and cast the tensors,
:func:`install_state` converts ``opt.state`` (param -> {name: tensor}) into the fastopt core's
state_dict layout, one entry per run of parameters with equal scalar state, and lets the core's
``load_state_dict`` check it (state names for these settings, shapes, steps, hyperparameters).
Only then are the flat state tensors written.

Two departures from torch's loader, both for 16-bit parameters: torch casts every floating state
tensor to its parameter's dtype, which would round fastopt's float32 master copy
(``"master_param"``) and float32 state (``state_dtype="float32"``); :func:`keep_saved_dtypes`
puts the saved tensors back. And a state without ``"master_param"`` (one saved by
``torch.optim``, which keeps no master copy) loaded into an optimizer with
``master_weights=True`` starts the master copy from the current 16-bit parameter.

8-bit state (``state_dtype="int8"``): every parameter of at least ``MIN_8BIT_SIZE`` elements
keeps each slot as uint8 codes and one float32 absmax per block of 256 of its own elements
(its blocks start with it), the smaller ones float32 state: the layout of a fastopt core over
the parameters as separate arrays. ``state_dict()`` gives each such parameter its codes under
the slot's name, its absmax under ``name + "_absmax"`` and the map under ``name + "_qmap"``:
fastopt's keys, which torch.optim cannot load. Loading checks them per parameter (with the
core) or, from a float state such as torch.optim's, quantizes it (``precision.int8_from_values``,
the kernels' rounding) per parameter.

State that depends on a setting (SGD's ``momentum_buffer``, AMSGrad's ``max_exp_avg_sq``,
RMSprop's ``momentum_buffer`` and ``grad_avg``) is kept as torch keeps it: an entry may hold
such state while the setting that uses it is off (:data:`OPTIONAL_STATE`: torch leaves it in
the state, unused, and uses it again when the setting comes back), and an entry may lack
SGD's ``momentum_buffer`` while momentum is on (:data:`LAZY_STATE`: torch creates it at the
parameter's next step). ``opt.state`` is a :class:`TrackedState` whose entries are
:class:`StateEntry` objects: both note any change made through them, so that a step sees that
``opt.state`` was edited (a moment reset, deleted or replaced, as torch users do) without
looking at every entry.
"""

import collections
import functools
import itertools
import re

import numpy as np
import torch

from .. import arrays
from ..optim import precision
from .dropin import plain_value
from .flat import torch_dtype

SCALAR_STATE = ("step", "mu_product", "eta", "mu")
"""The state entries torch keeps as 0-d tensors (NAdam's running product of momentum factors,
ASGD's eta and mu); every other tensor entry is a per-element array."""

LAZY_STATE = {"SGD": frozenset({"momentum_buffer"})}
"""Core class name -> state arrays torch creates at *any* step of a parameter that needs them,
not only at its first one: ``torch.optim.SGD`` takes ``state.get("momentum_buffer")`` and,
finding none, starts it as a copy of the gradient (torch/optim/sgd.py, ``_init_group`` and
``if buf is None: buf = grad.detach().clone()``), so momentum turned on mid-run (or a
deleted buffer) just starts a buffer. fastopt's SGD rule does the same at its step 1
(``first``); fastopt.torch runs that first step for such parameters (see
:meth:`fastopt.torch.FastoptOptimizer._start_lazy_state`). Every other state array is made at a
parameter's first step only, as torch's ``if len(state) == 0`` blocks make them."""

OPTIONAL_STATE = {
    "SGD": frozenset({"momentum_buffer"}),
    "Adam": frozenset({"max_exp_avg_sq"}),
    "AdamW": frozenset({"max_exp_avg_sq"}),
    "RMSprop": frozenset({"momentum_buffer", "grad_avg"}),
}
"""Core class name -> state arrays whose use depends on a setting (``momentum``, ``amsgrad``,
``centered``). When the setting is turned off, torch leaves the array in the state, unused,
and steps with it again when the setting comes back; a state holding one while the setting
is off (as torch saves it then) loads here the same way."""


NO_TORCH_STEP = frozenset({"SGD", "Muon"})
"""Core class names whose torch.optim namesake keeps no ``"step"`` (fastopt's rule counts steps
only to know its first one, which starts the momentum buffer): a state with a buffer is past
its first step, whatever its ``"step"`` says or if it has none (torch ignores such a key)."""


class _Edits:
    """The flag an optimizer's :class:`TrackedState` and its entries share."""

    __slots__ = ("edited",)

    def __init__(self):
        self.edited = False


def _flagging(base, name):
    method = getattr(base, name)

    def flagged(self, *args, **kwargs):
        self._edits.edited = True
        return method(self, *args, **kwargs)

    flagged.__name__ = name
    return flagged


_MUTATORS = (
    "__setitem__",
    "__delitem__",
    "__ior__",
    "clear",
    "pop",
    "popitem",
    "setdefault",
    "update",
)


class StateEntry(dict):
    """``opt.state[p]`` as the adapter publishes it: a dict (torch's format) that notes any
    change made through its methods (a key set, deleted, the entry cleared) in the flag it
    shares with its :class:`TrackedState`. In-place writes into its tensors are writes into the
    optimizer's state and need no note."""

    _edits = _Edits()

    def __init__(self, edits, *args):
        dict.__init__(self, *args)
        self._edits = edits

    def __reduce__(self):  # a copy (pickle, copy, deepcopy) is a plain dict
        return dict, (dict(self),)


class _NewEntry:
    """The default factory of :class:`TrackedState`: an empty :class:`StateEntry`."""

    __slots__ = ("edits",)

    def __init__(self, edits):
        self.edits = edits

    def __call__(self):
        return StateEntry(self.edits)


class TrackedState(collections.defaultdict):
    """``opt.state``: torch's ``defaultdict(dict)`` (param -> its state entry) that notes any
    change made through its methods or its entries' (``opt.state.clear()``, ``del
    opt.state[p]``, ``opt.state[p] = {}``, ``opt.state[p]["exp_avg"] = t``, ``del
    opt.state[p]["momentum_buffer"]``) in ``edits.edited``; the next step then compares the
    entries with what the adapter published (:meth:`FastoptOptimizer._reconcile_state`). The
    adapter's own writes go through ``dict``'s methods and set nothing."""

    _edits = _Edits()

    def __init__(self, edits, *args):
        collections.defaultdict.__init__(self, _NewEntry(edits), *args)
        self._edits = edits

    def __reduce__(self):  # a copy is torch's plain defaultdict(dict), entries plain dicts
        return collections.defaultdict, (dict,), None, None, iter(self.items())

    def __repr__(self):
        return f"defaultdict({dict!r}, {dict.__repr__(self)})"


for _name in _MUTATORS:
    setattr(StateEntry, _name, _flagging(dict, _name))
    setattr(TrackedState, _name, _flagging(collections.defaultdict, _name))
del _name


def _entry(p, raw, label, per_tensor=(), scalar_names=(), step="default", exact=None):
    """(record, arrays) of one parameter's torch state: scalar state as sorted (name, value)
    pairs and the state arrays; (None, {}) for a parameter without state. torch.optim.SGD keeps
    no ``step``: a momentum buffer means the first step is behind it. ValueError naming the
    parameter (``label``) for a step that is not a finite count, or a state array that is not
    shaped like the parameter (other than the core's ``per_tensor`` state and 8-bit absmax).
    ``scalar_names``: further names of 0-d tensors that hold scalar state (the adapter's, for an
    ``opt.state`` it published). ``step``: ``"past_first"`` where the optimizer's torch
    namesake keeps no ``"step"`` (:data:`NO_TORCH_STEP`): a state with arrays is past its first
    step, whatever its ``"step"``; ``"required"``: a state with arrays and no ``"step"`` raises
    ValueError (torch's step raises KeyError on it); ``"default"``: a missing one is 1.
    ``exact``: {id(0-d tensor): value} of scalar state the adapter published and nobody
    changed, read as the value it holds unrounded (the tensor holds it in float32)."""
    slots, scalars = {}, {}
    for name, v in (raw or {}).items():
        if v is None:  # torch.optim.SGD without momentum stores momentum_buffer=None
            continue
        if isinstance(v, str):  # an 8-bit slot's map name: the core checks it
            slots[name] = v
        elif name in SCALAR_STATE or name in scalar_names or not isinstance(v, torch.Tensor):
            value = exact.get(id(v), None) if exact else None
            value = float(v) if value is None else value
            if name == "step" and not (np.isfinite(value) and value >= 0):
                raise ValueError(f"state 'step' of {label} is {value}, not a count of steps")
            scalars[name] = int(value) if name == "step" else value
        else:
            if name not in per_tensor and not name.endswith("_absmax") and v.shape != p.shape:
                raise ValueError(
                    f"state {name!r} of {label} has shape {tuple(v.shape)}, expected "
                    f"{tuple(p.shape)} (the parameter's)"
                )
            slots[name] = v
    if not slots and not scalars:
        return None, {}
    if step == "past_first" and slots:
        scalars["step"] = max(scalars.get("step", 1), 1)
    elif step == "required" and slots and "step" not in scalars:
        raise ValueError(f"the state of {label} has no 'step'")
    scalars.setdefault("step", 1 if slots else 0)
    return tuple(sorted(scalars.items())), slots


def without_strings(state_dict):
    """(state_dict without its str state values, {index: {name: str}}): torch's loader turns a
    str (an 8-bit slot's ``"_qmap"``) into a generator; :func:`restore_strings` puts them back."""
    strings, state = {}, {}
    for index, entry in state_dict["state"].items():
        found = {k: v for k, v in entry.items() if isinstance(v, str)}
        if found:
            strings[index] = found
            entry = {k: v for k, v in entry.items() if k not in found}
        state[index] = entry
    return {**state_dict, "state": state}, strings


def restore_strings(opt, state_dict, strings):
    """Put the str values :func:`without_strings` took out back into ``opt.state``."""
    saved = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = itertools.chain.from_iterable(g["params"] for g in opt.param_groups)
    for index, p in zip(saved, params):
        if index in strings:
            opt.state[p].update(strings[index])


def keep_saved_dtypes(opt, state_dict):
    """Undo torch's cast of state tensors to the parameter dtype where the saved dtype differs
    (after ``torch.optim.Optimizer.load_state_dict`` accepted ``state_dict``): float32 state
    and masters of 16-bit parameters, 8-bit codes (uint8)."""
    saved = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = itertools.chain.from_iterable(g["params"] for g in opt.param_groups)
    for index, p in zip(saved, params):
        raw, loaded = state_dict["state"].get(index), opt.state.get(p)
        if not raw or not loaded:
            continue
        for name, v in raw.items():
            if (
                name not in SCALAR_STATE
                and isinstance(v, torch.Tensor)
                and v.dtype != loaded[name].dtype
            ):
                loaded[name] = v.to(p.device)


def install_state(opt, scalar_names=(), what="the state_dict", exact=None):
    """Check ``opt.state`` (as torch's loader left it, or as a user edited it) with the fastopt
    core and copy it into ``opt``'s flat state tensors, records and held names. Raises
    ValueError naming the problem before anything of ``opt``'s flat state changes.
    ``scalar_names``: 0-d tensor entries that hold scalar state (see :func:`_entry`);
    ``what``: the state's name in errors (``"opt.state"`` for an edited state, which must keep
    its ``"step"`` where torch keeps one); ``exact``: see :func:`_entry`.

    An entry may lack a :data:`LAZY_STATE` array its group's settings use (it starts at the
    parameter's next step, as in torch) and may hold an :data:`OPTIONAL_STATE` array they do not
    use (kept, unused, as torch keeps it): the core checks the rest."""
    pending = []
    int8 = precision.is_int8(opt._precision)
    name = opt.core_class.__name__
    lazy, optional = LAZY_STATE.get(name, frozenset()), OPTIONAL_STATE.get(name, frozenset())
    if name in NO_TORCH_STEP:
        step = "past_first"
    else:
        step = "default" if what == "the state_dict" else "required"
    for k, (gi, buf) in enumerate(opt._buckets):
        tg = opt.param_groups[gi]
        missing = [n for n in opt._hyper_names if n not in tg]
        if missing:
            raise ValueError(
                f"{what} does not fit {type(opt).__name__}: its param_groups[{gi}] has no {missing}"
            )
        hyper = {n: plain_value(tg[n]) for n in opt._hyper_names}
        per_tensor = opt.core_class.tensor_state
        entries = [
            _entry(p, opt.state.get(p), label, per_tensor, scalar_names, step, exact)
            for p, label in zip(buf.params, buf.names)
        ]
        extras = [{} for _ in entries]  # m -> {name: value to keep} (OPTIONAL_STATE, unused)
        starting = [frozenset()] * len(entries)  # m -> LAZY_STATE names started at its next step
        if lazy or optional:
            probe = opt._probe(hyper)
            used = frozenset(probe._state_names(probe.param_groups[0]))
            for m, (record, slots) in enumerate(entries):
                if record is None:
                    continue
                slots = dict(slots)
                starting[m] = frozenset(n for n in lazy & used if n not in slots)
                for n in starting[m]:  # for the core's check only; not kept
                    slots.pop(n + "_absmax", None)  # what is left of a deleted 8-bit slot
                    slots.pop(n + "_qmap", None)
                    slots[n] = torch.zeros_like(buf.params[m])
                for n in sorted((optional - used) & set(slots)):
                    parts = {x: slots.pop(x) for x in (n, n + "_absmax", n + "_qmap") if x in slots}
                    extras[m][n] = _unused_state(opt, k, m, n, parts)
                entries[m] = record, slots
        if opt.core_class.tensor_state:
            entries = [_tensor_state_shares(opt, k, m, e) for m, e in enumerate(entries)]
        if opt._quantized[k]:
            entries = [_quantized_slots(e, opt.core_class.tensor_state) for e in entries]
        if int8:  # one unit per parameter: the core decides 8-bit or float32 state by its size
            runs = [(i, i + 1) for i in range(len(entries))]
        else:
            keys = [
                (_run_key(e), tuple(sorted(x)), s) for e, x, s in zip(entries, extras, starting)
            ]
            runs, start = [], 0
            for i in range(1, len(entries) + 1):
                if i == len(entries) or keys[i] != keys[start]:
                    runs.append((start, i))
                    start = i
        groups, states = [], {}
        for r, (i, j) in enumerate(runs):
            groups.append({"params": buf.slice(i, j), **hyper})
            record, slots = entries[i]
            if record is None:
                continue
            state = dict(record)
            for name in slots:
                if isinstance(slots[name], (str, np.ndarray)):  # from _quantized_slots
                    state[name] = slots[name]
                    continue
                try:
                    parts = [entries[m][1][name].reshape(-1) for m in range(i, j)]
                except KeyError:
                    raise ValueError(
                        f"state of {buf.names[i]}..{buf.names[j - 1]} differs"
                    ) from None
                state[name] = arrays.to_host(torch.cat(parts))
            states[r] = state
        core = opt.core_class(groups, **opt._options)
        for r, unit in enumerate(core.units()):
            state = states.get(r)
            if state and precision.MASTER not in state:
                if precision.has_master(core.precision, unit.param):  # a state from torch.optim
                    state[precision.MASTER] = arrays.to_host(unit.param).astype("float32")
        saved = core.state_dict()
        saved["state"] = states
        try:
            core.load_state_dict(saved)
        except (ValueError, TypeError) as exc:
            # the core numbers the runs of parameters; name the parameters instead
            message = re.sub(r"state\[(\d+)\]", functools.partial(_run_label, buf, runs), str(exc))
            raise ValueError(
                f"{what} does not fit {type(opt).__name__} (param_groups[{gi}]): {message}"
            ) from exc
        pending.append((k, runs, core, entries, extras, starting))
    for k, runs, core, entries, extras, starting in pending:
        for u, (i, j) in zip(core.units(), runs):
            record = entries[i][0]
            opt._records[k][i:j] = [record] * (j - i)
            if record is None:
                opt._held[k][i:j] = [None] * (j - i)
                continue
            kept = {n: a for n, a in u.state.items() if n not in starting[i]}
            opt._store_state(k, i, j, kept)
            for m in range(i, j):
                for n, value in extras[m].items():
                    opt._store_state(k, m, m + 1, {n: value})
            held = frozenset(n for n, a in kept.items() if is_state_array(a)) | set(extras[i])
            opt._held[k][i:j] = [held] * (j - i)


def is_state_array(v):
    """Whether a core state value is a per-element array (or an 8-bit slot), not a scalar."""
    return hasattr(v, "shape") or isinstance(v, precision.Quantized)


def _unused_state(opt, k, m, name, parts):
    """The value to keep of state ``name`` of param ``m`` of bucket ``k``, which its group's
    settings do not use (an :data:`OPTIONAL_STATE` array): a tensor in the dtype the bucket keeps
    that state in, or for an 8-bit bucket a :class:`~fastopt.optim.precision.Quantized` of the
    parameter's own blocks (fastopt's saved codes, or quantized from torch's floats).
    ``parts``: the entry's values under ``name`` (and ``name + "_absmax"``, ``"_qmap"``)."""
    buf = opt._buckets[k][1]
    p, label = buf.params[m], buf.names[m]
    v = parts[name]
    where = f"state {name!r} of {label}"
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{where} is a {type(v).__name__}, not a tensor")
    if opt._quantized[k]:
        signed = precision.INT8_SIGNED[name]
        if v.dtype == torch.uint8:
            absmax, qmap = parts.get(name + "_absmax"), parts.get(name + "_qmap")
            blocks = precision.int8_block_count(p.numel())
            if not isinstance(absmax, torch.Tensor) or absmax.numel() != blocks:
                raise ValueError(
                    f"{where} holds 8-bit codes without the absmax of its {blocks} blocks"
                )
            if qmap != ("signed" if signed else "unsigned"):
                raise ValueError(
                    f"{where} has map {qmap!r}, expected {'signed' if signed else 'unsigned'!r}"
                )
            return precision.Quantized(
                arrays.to_host(v.reshape(-1)),
                arrays.to_host(absmax.reshape(-1).float()),
                signed,
            )
        if not v.is_floating_point():
            raise ValueError(f"{where} has dtype {v.dtype}, expected floats")
        values = arrays.to_host(v.detach().reshape(-1).float())
        return precision.int8_from_values(values, signed)
    if not v.is_floating_point():
        raise ValueError(f"{where} has dtype {v.dtype}, expected floats")
    t = opt._tensors[k].get(name)
    if t is not None:
        dtype = t.dtype
    else:
        host = arrays.torch_numpy(torch.empty(0, dtype=p.dtype))
        dtype = torch_dtype(precision.state_dtype(opt._precision, host))
    return v.detach().reshape(-1).to(dtype)


def _run_label(buf, runs, match):
    """The parameters of run ``match.group(1)`` of ``runs`` (in a core's error message)."""
    r = int(match.group(1))
    if r >= len(runs):
        return match.group(0)
    i, j = runs[r]
    names = buf.names[i] if j == i + 1 else f"{buf.names[i]} .. {buf.names[j - 1]}"
    return f"the state of {names}"


def _tensor_state_shares(opt, k, m, entry):
    """Param ``m``'s entry with its shares of the core's ``tensor_state`` (Adafactor's factors,
    NovoGrad's per-tensor moment) checked against their torch shapes, and an empty one for
    each name the parameter has no share of (a vector's ``row_var``), so that the entries of a
    run of parameters concatenate as the core lays them out."""
    record, slots = entry
    if record is None:
        return entry
    slots = dict(slots)
    name_of = opt._buckets[k][1].names[m]
    for name in opt.core_class.tensor_state:
        shape = opt._layout(k, name).shapes[m]
        v = slots.get(name)
        if shape is None:
            if v is not None and v.numel():
                raise ValueError(f"state of {name_of} has {name!r}, which it does not keep")
            slots[name] = torch.zeros(0)
        elif v is not None and tuple(v.shape) != tuple(shape):
            raise ValueError(
                f"state {name!r} of {name_of} has shape {tuple(v.shape)}, expected {tuple(shape)}"
            )
    return record, slots


def _quantized_slots(entry, unquantized=()):
    """One parameter's entry (record, slots) of an 8-bit bucket with its float moments (a state
    saved by torch.optim, or a float tensor assigned into ``opt.state[p]``) quantized in its own
    blocks as the kernels would; 8-bit slots saved by
    fastopt (codes, ``_absmax``, ``_qmap``) and the float32 master copy stay as they are, for
    the core to check."""
    record, slots = entry
    out = dict(slots)
    for name, v in slots.items():
        if name in unquantized:  # per-tensor state (NovoGrad's moment) stays float32
            continue
        if getattr(v, "dtype", None) == torch.uint8 and name + "_absmax" not in slots:
            raise ValueError(
                f"state {name!r} holds 8-bit codes without {name + '_absmax'!r}: without the "
                "absmax of their blocks they have no values"
            )
        floats = isinstance(v, torch.Tensor) and v.is_floating_point()
        if name in precision.INT8_SIGNED and (floats or name + "_absmax" not in slots):
            # float values (torch's, or assigned to opt.state[p][name]): quantized, any
            # "_absmax" / "_qmap" left from the codes they replace ignored
            values = arrays.to_host(v).reshape(-1).astype(np.float32)
            q = precision.int8_from_values(values, precision.INT8_SIGNED[name])
            out[name] = q.codes
            out[name + "_absmax"] = q.absmax
            out[name + "_qmap"] = "signed" if q.signed else "unsigned"
    return record, out


def _run_key(entry):
    record, slots = entry
    return record, tuple(sorted(slots))
