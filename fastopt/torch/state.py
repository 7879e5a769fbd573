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

8-bit state (``state_dtype="int8"``): a flat buffer of at least ``MIN_8BIT_SIZE`` elements keeps
each slot as uint8 codes and one float32 absmax per block of 256 elements of the WHOLE buffer
(the block grid of a fastopt ParamSet over the same parameters). ``state_dict()`` gives each
parameter its codes under the slot's name, the absmax of the blocks its elements lie in under
``name + "_absmax"`` (a block shared with a neighbour is in both) and the map under
``name + "_qmap"``: fastopt's keys, which torch.optim cannot load. Loading joins them back
(:func:`_whole_bucket`; the optimizer must have the same parameters in the same order) or, from a
float state such as torch.optim's, quantizes it (``precision.int8_from_values``).
"""

import itertools

import numpy as np
import torch

from .. import arrays
from ..optim import precision
from .flat import as_tensor

SCALAR_STATE = ("step", "mu_product", "eta", "mu")
"""The state entries torch keeps as 0-d tensors (NAdam's running product of momentum factors,
ASGD's eta and mu); every other tensor entry is a per-element array."""


def _entry(p, raw):
    """(record, arrays) of one parameter's torch state: scalar state as sorted (name, value)
    pairs and the state arrays; (None, {}) for a parameter without state. torch.optim.SGD keeps
    no ``step``: a momentum buffer means the first step is behind it."""
    slots, scalars = {}, {}
    for name, v in (raw or {}).items():
        if v is None:  # torch.optim.SGD without momentum stores momentum_buffer=None
            continue
        if isinstance(v, str):  # an 8-bit slot's map name: the core checks it
            slots[name] = v
        elif name in SCALAR_STATE or not isinstance(v, torch.Tensor):
            scalars[name] = int(float(v)) if name == "step" else float(v)
        else:
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
    for k, (gi, buf) in enumerate(opt._buckets):
        entries = [_entry(p, opt.state.get(p)) for p in buf.params]
        if opt._quantized[k]:
            entries = _whole_bucket(buf, entries)
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
                {"params": buf.slice(i, j), **{n: _value(tg[n]) for n in opt._hyper_names}}
            )
            record, slots = entries[i]
            if record is None:
                continue
            state = dict(record)
            for name in slots:
                if isinstance(slots[name], (str, np.ndarray)):  # merged by _whole_bucket
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
            raise ValueError(
                f"the state_dict does not fit {type(opt).__name__} (param_groups[{gi}], params "
                f"{', '.join(buf.names[:3])}{'...' if len(buf.names) > 3 else ''}): {exc}"
            ) from exc
        pending.append((k, buf, runs, core, entries))
    for k, buf, runs, core, entries in pending:
        for u, (i, j) in zip(core.units(), runs):
            record = entries[i][0]
            opt._records[k][i:j] = [record] * (j - i)
            if record is None:
                continue
            lo, hi = buf.offsets[i][0], buf.offsets[j - 1][1]
            for name, a in u.state.items():
                if isinstance(a, precision.Quantized):
                    opt._store_quantized(k, name, a)
                elif hasattr(a, "shape"):
                    dst = opt._state_tensor(k, name, a.dtype)[lo:hi]
                    dst.copy_(as_tensor(a, dst.device))


def _whole_bucket(buf, entries):
    """The entries of an 8-bit bucket (``state_dtype="int8"``, one block grid over the whole
    buffer) as ONE state, in the first entry (the others repeat its run key), so that the
    bucket is one run. 8-bit slots saved by fastopt (codes, per-parameter block
    absmax, map) are joined into the bucket's (a block shared by two parameters must hold the
    same absmax in both: ValueError otherwise, e.g. a state saved over another layout); float
    slots (a state saved by torch.optim) are quantized as the kernels would."""
    if all(record is None for record, _ in entries):
        return entries
    where = f"params {buf.names[0]}..{buf.names[-1]}"
    records = {record for record, _ in entries}
    if len(records) != 1:
        raise ValueError(
            f"state_dtype='int8' keeps one state for a whole flat buffer ({where}): its "
            "parameters must all have state, with the same step count"
        )
    names = set(entries[0][1])
    if any(set(slots) != names for _, slots in entries):
        raise ValueError(f"the state entries of {where} hold different state names")
    joined = {}
    for name in sorted(names):
        if name.endswith(("_absmax", "_qmap")):
            continue
        if name + "_absmax" in names:
            joined[name] = _joined_codes(buf, entries, name)
            joined[name + "_absmax"] = _joined_absmax(buf, entries, name)
            qmaps = {str(slots.get(name + "_qmap")) for _, slots in entries}
            if len(qmaps) != 1:
                raise ValueError(f"the state entries of {where} name maps {sorted(qmaps)}")
            joined[name + "_qmap"] = qmaps.pop()
            continue
        values = np.concatenate(
            [arrays.to_host(slots[name]).reshape(-1) for _, slots in entries]
        ).astype(np.float32)
        if name in precision.INT8_SIGNED:  # a float state (torch.optim's): quantize it
            slot = precision.int8_from_values(values, precision.INT8_SIGNED[name])
            joined[name] = slot.codes
            joined[name + "_absmax"] = slot.absmax
            joined[name + "_qmap"] = "signed" if slot.signed else "unsigned"
        else:  # the float32 master copy
            joined[name] = values
    # one run: the others repeat the first's key; their slots are never read
    return [(entries[0][0], joined)] + [(entries[0][0], dict.fromkeys(joined))] * (len(entries) - 1)


def _joined_codes(buf, entries, name):
    parts = []
    for p, n, (_, slots) in zip(buf.params, buf.names, entries):
        codes = arrays.to_host(slots[name])
        if codes.dtype != np.uint8 or codes.size != p.numel():
            raise ValueError(
                f"state of {n}[{name!r}] must hold {p.numel()} uint8 codes, got {codes.size} "
                f"{codes.dtype}"
            )
        parts.append(codes.reshape(-1))
    return np.concatenate(parts)


def _joined_absmax(buf, entries, name):
    block = precision.QUANT_BLOCK
    out = np.full(precision.int8_block_count(buf.flat.numel()), np.nan, np.float32)
    done = -1  # the last block filled
    for (lo, hi), n, (_, slots) in zip(buf.offsets, buf.names, entries):
        b0, b1 = lo // block, -(-hi // block)
        a = arrays.to_host(slots[name + "_absmax"]).reshape(-1)
        if a.dtype != np.float32 or a.size != b1 - b0:
            raise ValueError(
                f"state of {n}[{name + '_absmax'!r}] must hold {b1 - b0} float32 block absmax "
                f"(blocks {b0}..{b1 - 1} of its flat buffer), got {a.size} {a.dtype}: a state "
                "saved over another layout of parameters"
            )
        if b0 == done and a[:1].view(np.uint32) != out[b0 : b0 + 1].view(np.uint32):
            raise ValueError(
                f"state of {n}[{name + '_absmax'!r}]: block {b0}, shared with the previous "
                "parameter, holds another absmax there: a state saved over another layout"
            )
        out[b0:b1] = a
        done = b1 - 1
    return out


def _run_key(entry):
    record, slots = entry
    return record, tuple(sorted(slots))


def _value(v):
    return v.item() if isinstance(v, torch.Tensor) else v
