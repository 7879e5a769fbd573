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
"""

import functools
import itertools
import re

import numpy as np
import torch

from .. import arrays
from ..optim import precision
from .dropin import plain_value

SCALAR_STATE = ("step", "mu_product", "eta", "mu")
"""The state entries torch keeps as 0-d tensors (NAdam's running product of momentum factors,
ASGD's eta and mu); every other tensor entry is a per-element array."""


def _entry(p, raw, label, per_tensor=()):
    """(record, arrays) of one parameter's torch state: scalar state as sorted (name, value)
    pairs and the state arrays; (None, {}) for a parameter without state. torch.optim.SGD keeps
    no ``step``: a momentum buffer means the first step is behind it. ValueError naming the
    parameter (``label``) for a step that is not a finite count, or a state array that is not
    shaped like the parameter (other than the core's ``per_tensor`` state and 8-bit absmax)."""
    slots, scalars = {}, {}
    for name, v in (raw or {}).items():
        if v is None:  # torch.optim.SGD without momentum stores momentum_buffer=None
            continue
        if isinstance(v, str):  # an 8-bit slot's map name: the core checks it
            slots[name] = v
        elif name in SCALAR_STATE or not isinstance(v, torch.Tensor):
            value = float(v)
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


def install_state(opt):
    """Check ``opt.state`` (as torch's loader left it) with the fastopt core and copy it into
    ``opt``'s flat state tensors and records. Raises ValueError naming the problem before
    anything of ``opt``'s flat state changes."""
    pending = []
    int8 = precision.is_int8(opt._precision)
    for k, (gi, buf) in enumerate(opt._buckets):
        per_tensor = opt.core_class.tensor_state
        entries = [
            _entry(p, opt.state.get(p), label, per_tensor)
            for p, label in zip(buf.params, buf.names)
        ]
        if opt.core_class.tensor_state:
            entries = [_tensor_state_shares(opt, k, m, e) for m, e in enumerate(entries)]
        if opt._quantized[k]:
            entries = [_quantized_slots(e, opt.core_class.tensor_state) for e in entries]
        if int8:  # one unit per parameter: the core decides 8-bit or float32 state by its size
            runs = [(i, i + 1) for i in range(len(entries))]
        else:
            runs, start = [], 0
            for i in range(1, len(entries) + 1):
                if i == len(entries) or _run_key(entries[i]) != _run_key(entries[start]):
                    runs.append((start, i))
                    start = i
        tg = opt.param_groups[gi]
        missing = [n for n in opt._hyper_names if n not in tg]
        if missing:
            raise ValueError(
                f"the state_dict does not fit {type(opt).__name__}: its param_groups[{gi}] has "
                f"no {missing}"
            )
        groups, states = [], {}
        for r, (i, j) in enumerate(runs):
            groups.append(
                {"params": buf.slice(i, j), **{n: plain_value(tg[n]) for n in opt._hyper_names}}
            )
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
                f"the state_dict does not fit {type(opt).__name__} (param_groups[{gi}]): {message}"
            ) from exc
        pending.append((k, runs, core, entries))
    for k, runs, core, entries in pending:
        for u, (i, j) in zip(core.units(), runs):
            record = entries[i][0]
            opt._records[k][i:j] = [record] * (j - i)
            if record is not None:
                opt._store_state(k, i, j, u.state)


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
    saved by torch.optim) quantized in its own blocks as the kernels would; 8-bit slots saved by
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
        if name in precision.INT8_SIGNED and name + "_absmax" not in slots:
            values = arrays.to_host(v).reshape(-1).astype(np.float32)
            q = precision.int8_from_values(values, precision.INT8_SIGNED[name])
            out[name] = q.codes
            out[name + "_absmax"] = q.absmax
            out[name + "_qmap"] = "signed" if q.signed else "unsigned"
    return record, out


def _run_key(entry):
    record, slots = entry
    return record, tuple(sorted(slots))
