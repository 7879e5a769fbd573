"""A ParamSet's layout as checkpoints and EMA states record it: its parameters' names and shapes
in packing order (each one's offsets in the flat buffer follow from those before it). An
optimizer or an average over a ParamSet keeps flat arrays laid out like it, so a state restored
into a ParamSet of another layout (other names, order or shapes) would give each parameter
another one's values: the layouts are compared first."""

import math

from .paramset import ParamSet


def paramset_layout(params):
    """``[[name, shape as a list], ...]`` of a ParamSet in packing order (each parameter's
    offsets in ``flat`` follow from those before it), the form checkpoints record; None for
    anything that is not a ParamSet."""
    if not isinstance(params, ParamSet):
        return None
    return [[name, list(shape)] for name, shape in params.shapes.items()]


def layout_mismatch(saved, here):
    """None when the ParamSet layouts ``saved`` (read from a state or file, checked here) and
    ``here`` (:func:`paramset_layout`) are the same, else a message naming the difference (names,
    order or shapes) and both layouts with their offsets. ValueError for a malformed ``saved``."""
    saved, here = _layout_entries(saved), _layout_entries(here)
    if saved == here:
        return None
    names_s, names_h = [n for n, _ in saved], [n for n, _ in here]
    if sorted(names_s) != sorted(names_h):
        what = (
            f"the parameter names differ (only saved: {sorted(set(names_s) - set(names_h))}, "
            f"only here: {sorted(set(names_h) - set(names_s))})"
        )
    elif names_s != names_h:
        what = "the parameters are packed in another order"
    else:
        what = "; ".join(
            f"{n!r} has shape {a} saved, {b} here" for (n, a), (_, b) in zip(saved, here) if a != b
        )
    return f"{what}; saved layout {_describe(saved)}, here {_describe(here)}"


def _layout_entries(layout):
    """``[(name, shape tuple)]`` of a layout, ValueError if it is not one."""
    entries = []
    if isinstance(layout, (list, tuple)):
        for entry in layout:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                break
            name, shape = entry
            if not (
                isinstance(name, str)
                and isinstance(shape, (list, tuple))
                and all(type(k) is int and k >= 0 for k in shape)
            ):
                break
            entries.append((name, tuple(shape)))
        else:
            return entries
    raise ValueError("malformed ParamSet layout: not a list of [name, shape] pairs")


def _describe(entries):
    parts, lo = [], 0
    for name, shape in entries:
        hi = lo + math.prod(shape)
        parts.append(f"{name!r} {shape} at [{lo}:{hi}]")
        lo = hi
    return "[" + ", ".join(parts) + "]"
