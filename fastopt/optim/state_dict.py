"""An optimizer's state as a plain dict (torch.optim's layout) and back, checked before it is
restored: ``Optimizer.state_dict`` and ``Optimizer.load_state_dict`` call these."""

import math
from collections.abc import Mapping

import numpy as np

from .. import arrays
from ..validation import check_lr
from . import precision


def state_dict(opt):
    """Plain-dict snapshot (NumPy copies and Python scalars) of ``opt``, torch.optim's layout:
    ``{"algorithm", "state": {i: {"step", <arrays shaped like param i>...}}, "param_groups",
    "skipped_steps"}``. An 8-bit slot ``name`` (``state_dtype="int8"``) is three entries: its
    uint8 codes shaped like the parameter under ``name``, its float32 block absmax under
    ``name + "_absmax"`` (one per block of 256 elements of the flat state) and its map,
    ``"signed"`` or ``"unsigned"``, under ``name + "_qmap"``."""
    state, groups = {}, []
    base = opt._index_base()
    for gi, (group, g_int) in enumerate(zip(opt.param_groups, opt._groups)):
        for j, u in enumerate(g_int["units"]):
            if not u.state:
                continue
            entry = {}
            for k, v in u.state.items():
                if k == "step":
                    entry[k] = int(v)
                elif isinstance(v, float):
                    entry[k] = v
                elif isinstance(v, precision.Quantized):
                    entry.update(_int8_entry(u, k, v))
                else:
                    entry[k] = u.backend.to_numpy(v).reshape(opt._state_shape(g_int, u, k))
            state[base[gi] + j] = entry
        saved = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in group.items() if k != "params"
        }
        saved["params"] = list(range(base[gi], base[gi] + len(g_int["units"])))
        saved["steps"] = g_int["steps"]
        groups.append(saved)
    return {
        "algorithm": type(opt).__name__,
        "state": state,
        "param_groups": groups,
        "skipped_steps": opt.skipped_steps,
    }


def load_state_dict(opt, sd):
    """Restore a :func:`state_dict` of the same optimizer class over parameters of the same
    shapes into ``opt``. Everything is checked before anything changes."""
    if not isinstance(sd, Mapping) or not {"state", "param_groups"} <= set(sd):
        raise ValueError("not an optimizer state_dict: expected keys 'state' and 'param_groups'")
    name = type(opt).__name__
    algo = sd.get("algorithm", name)
    if algo != name:
        raise ValueError(f"state_dict is for {algo}, this optimizer is {name}")
    groups = sd["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"state_dict has {len(groups)} param groups, this optimizer {len(opt.param_groups)}"
        )
    base = opt._index_base()
    new_groups, new_steps, new_states = [], [], {}
    for gi, (saved, g_int) in enumerate(zip(groups, opt._groups)):
        idx = list(range(base[gi], base[gi] + len(g_int["units"])))
        if list(saved.get("params", [])) != idx:
            raise ValueError(
                f"param_groups[{gi}] has {len(saved.get('params', []))} parameters in the "
                f"state_dict, {len(idx)} here"
            )
        unknown = set(saved) - set(opt.defaults) - {"params", "initial_lr", "steps"}
        if unknown:
            raise ValueError(f"param_groups[{gi}] has unknown hyperparameters {sorted(unknown)}")
        group = {
            **opt.param_groups[gi],
            **{k: v for k, v in saved.items() if k not in ("params", "steps")},
        }
        group["params"] = opt.param_groups[gi]["params"]
        new_steps.append(_count(saved.get("steps", 0), f"param_groups[{gi}]['steps']"))
        check_lr(group["lr"])
        opt._check(group)
        names = opt._state_names(group)
        for j, u in enumerate(g_int["units"]):
            entry = sd["state"].get(base[gi] + j)
            if entry is None:
                continue
            new_states[(gi, j)] = _checked_entry(opt, entry, names, group, g_int, u, base[gi] + j)
        new_groups.append(group)
    skipped = _count(sd.get("skipped_steps", 0), "skipped_steps")
    # commit: nothing below may raise
    opt.skipped_steps = skipped
    for gi, group in enumerate(new_groups):
        opt.param_groups[gi].clear()
        opt.param_groups[gi].update(group)
        opt._groups[gi]["steps"] = new_steps[gi]
        opt._groups[gi]["checked"] = None
        for j, u in enumerate(opt._groups[gi]["units"]):
            u.state = new_states.get((gi, j), {})


def _count(value, where):
    """``value`` as a Python int: ValueError naming ``where`` unless it is an int >= 0 (bools
    and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{where} must be an int >= 0, got {value!r}")
    return int(value)


def _checked_entry(opt, entry, names, group, g_int, unit, index):
    """One unit's state entry, checked and copied into fresh state arrays of its backend."""
    if not isinstance(entry, Mapping) or "step" not in entry:
        raise ValueError(f"state[{index}] is not a state entry with a 'step'")
    opt._ensure_backend(unit)
    slots = precision.slot_dtypes(opt.precision, unit.param, names)
    per_tensor = getattr(opt, "segment_state", None)  # NovoGrad's one value per tensor
    if per_tensor is not None:
        slots[per_tensor] = opt.state_array_dtype(per_tensor, unit.param)
    int8 = {k: v for k, v in slots.items() if precision.is_quantized(v)}
    expected = set(slots) | set(opt._initial_scalar_state(group)) | {"step"}
    expected |= {k + suffix for k in int8 for suffix in INT8_SUFFIXES}
    if set(entry) != expected:
        raise ValueError(
            f"state[{index}] holds {sorted(entry)}, {type(opt).__name__} with these settings "
            f"needs {sorted(expected)}"
        )
    out = {"step": _count(entry["step"], f"state[{index}]['step']")}
    for k, v in entry.items():
        if k == "step" or k.endswith(INT8_SUFFIXES) and k.rsplit("_", 1)[0] in int8:
            continue
        if k in int8:
            out[k] = _int8_slot(entry, k, int8[k], unit, index)
            continue
        if k not in slots:
            if not isinstance(v, (float, int)) or not math.isfinite(v):
                raise ValueError(f"state[{index}][{k!r}] must be a finite float, got {v!r}")
            out[k] = float(v)
            continue
        a = _state_array(v)
        if arrays.storage_name(a.dtype) is None:
            raise TypeError(f"state[{index}][{k!r}] has dtype {a.dtype}, expected floats")
        shape = tuple(opt._state_shape(g_int, unit, k))
        size = math.prod(shape)
        if a.size != size or tuple(a.shape) not in (shape, (size,)):
            raise ValueError(f"state[{index}][{k!r}] has shape {a.shape}, expected {shape}")
        dst = unit.backend.zeros(size, slots[k], like=unit.param)
        unit.backend.assign(dst, a.reshape(a.size))  # host or device source, cast
        out[k] = dst
    return out


INT8_SUFFIXES = ("_absmax", "_qmap")
"""Keys of an 8-bit slot's block absmax and map name, after the slot's name."""


def _qmap_name(signed):
    return "signed" if signed else "unsigned"


def _int8_entry(unit, name, slot):
    """The state_dict entries of 8-bit slot ``name`` of ``unit``."""
    return {
        name: unit.backend.to_numpy(slot.codes).reshape(unit.shape),
        name + "_absmax": unit.backend.to_numpy(slot.absmax),
        name + "_qmap": _qmap_name(slot.signed),
    }


def _int8_slot(entry, name, slot, unit, index):
    """A checked copy of 8-bit slot ``name`` of a state entry: ValueError/TypeError naming it
    when its codes, block layout or map do not fit ``unit``."""
    where = f"state[{index}][{name!r}]"
    codes, absmax = _state_array(entry[name]), _state_array(entry[name + "_absmax"])
    qmap = entry[name + "_qmap"]
    n = unit.param.size
    if codes.dtype != np.uint8:
        raise TypeError(f"{where} holds 8-bit codes: dtype uint8 expected, got {codes.dtype}")
    if codes.size != n or tuple(codes.shape) not in (tuple(unit.shape), (n,)):
        raise ValueError(f"{where} has shape {codes.shape}, the parameter {tuple(unit.shape)}")
    blocks = precision.int8_block_count(n)
    if absmax.dtype != np.float32 or tuple(absmax.shape) != (blocks,):
        raise ValueError(
            f"state[{index}][{name + '_absmax'!r}] must be float32 of shape ({blocks},) (one absmax per block of "
            f"{precision.QUANT_BLOCK} elements of {n}); got {absmax.dtype} of shape "
            f"{tuple(absmax.shape)}: another block layout"
        )
    if bool(np.any(arrays.to_host(absmax) < 0)):
        raise ValueError(f"state[{index}][{name + '_absmax'!r}] holds negative values")
    if not isinstance(qmap, str) or qmap != _qmap_name(slot.signed):
        raise ValueError(
            f"state[{index}][{name + '_qmap'!r}] is {qmap!r}; this optimizer keeps {name!r} in the "
            f"{_qmap_name(slot.signed)!r} dynamic map"
        )
    dst = precision.int8_zeros(unit.backend, n, slot, like=unit.param)
    unit.backend.assign(dst.codes, codes.reshape(n))
    unit.backend.assign(dst.absmax, absmax)
    return dst


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
