"""The tagged-JSON encoding of checkpoint contents (no pickle anywhere).

Dicts with string keys, lists, strings, finite floats, ints, bools and None are plain JSON. Everything
else is a tagged object: ``{"__array__": name}`` (the file's tensor of that name; in checkpoint
format 1, ``{"__array__": i}``, the i-th array of the file),
``{"__tuple__": [...]}``, ``{"__dict__": [[key, value], ...]}`` (non-string keys),
``{"__float__": "nan"}``, ``{"__npscalar__": dtype, "value": v}`` and ``{"__schedule__": {...}}``
(a :mod:`fastopt.schedules` schedule, rebuilt by :func:`~fastopt.schedules.schedule_from_dict`).
Decoding parses data only; it never executes code from the file.
"""

import math
from collections.abc import Mapping

import numpy as np

from ..arrays import is_device_array, storage_name, to_host
from ..schedules import Schedule, schedule_from_dict, schedule_to_dict

ALLOWED_KINDS = "biufc"
"""NumPy dtype kinds a checkpoint stores (bool, signed/unsigned int, float, complex)."""
TAGS = ("__array__", "__tuple__", "__dict__", "__float__", "__npscalar__", "__schedule__")


def format_path(path):
    """A key path ``("optimizer", "state", 0)`` as ``"optimizer/state/0"``."""
    return "/".join(str(p) for p in path)


class Encoder:
    """Turns a tree of dicts/lists/tuples/scalars/arrays/schedules into tagged JSON values,
    collecting the arrays (host, little-endian, C-contiguous) in ``arrays``, a dict from a name
    made of their key path (:func:`format_path`) to the array."""

    def __init__(self):
        self.arrays = {}

    def encode(self, v, path):
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, np.generic):
            if v.dtype.kind not in ALLOWED_KINDS:
                raise TypeError(f"cannot save {format_path(path)}: NumPy scalar of dtype {v.dtype}")
            return {"__npscalar__": v.dtype.str, "value": self.encode(v.item(), path)}
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else {"__float__": repr(float(v))}
        if isinstance(v, Schedule):
            try:
                return {"__schedule__": schedule_to_dict(v)}
            except TypeError as exc:
                raise TypeError(f"cannot save {format_path(path)}: {exc}") from exc
        if isinstance(v, np.ndarray) or is_device_array(v):
            return {"__array__": self._add_array(v, path)}
        if callable(v):
            raise TypeError(
                f"cannot save {format_path(path)}: {v!r} is a plain callable; a lambda or function "
                "(e.g. a learning rate) cannot be stored in a checkpoint, since loading never "
                "executes code. Use a fastopt.schedules schedule (CosineAnnealing, warmup(), ...)"
            )
        if isinstance(v, tuple):
            return {"__tuple__": [self.encode(x, (*path, i)) for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [self.encode(x, (*path, i)) for i, x in enumerate(v)]
        if isinstance(v, Mapping):
            if all(isinstance(k, str) and k not in TAGS for k in v):
                return {k: self.encode(x, (*path, k)) for k, x in v.items()}
            items = []
            for k, x in v.items():
                if not isinstance(k, (str, int, float, bool, tuple, type(None))):
                    raise TypeError(
                        f"cannot save {format_path(path)}: dict key {k!r} is a {type(k).__name__}"
                    )
                items.append([self.encode(k, (*path, "<key>")), self.encode(x, (*path, k))])
            return {"__dict__": items}
        raise TypeError(
            f"cannot save {format_path(path)}: a {type(v).__name__} is not an array, number, string, "
            "list, tuple, dict or fastopt.schedules schedule"
        )

    def _add_array(self, a, path):
        a = to_host(a)
        if a.dtype.kind not in ALLOWED_KINDS and storage_name(a.dtype) != "bfloat16":
            raise TypeError(
                f"cannot save {format_path(path)}: arrays of dtype {a.dtype} are not supported"
            )
        a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d
        name = base = format_path(path)
        k = 1
        while name in self.arrays:  # paths joined by "/" can collide: {"a/b": x, "a": {"b": y}}
            k += 1
            name = f"{base}#{k}"
        self.arrays[name] = a
        return name


def plain(v):
    """Readable JSON form of an (already encodable) hyperparameter value."""
    if isinstance(v, Schedule):
        return v.to_dict()
    if isinstance(v, (tuple, list)):
        return [plain(x) for x in v]
    if isinstance(v, np.generic):
        return plain(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def decode(v, arrays):
    """The value a tagged JSON value ``v`` stands for; ``arrays`` is the file's dict tensor name ->
    array (a list in checkpoint format 1). ValueError for a malformed value."""
    if isinstance(v, list):
        return [decode(x, arrays) for x in v]
    if not isinstance(v, dict):
        return v
    tags = [k for k in v if k in TAGS]
    if not tags:
        return {k: decode(x, arrays) for k, x in v.items()}
    tag = tags[0]
    if len(tags) > 1 or set(v) != ({tag, "value"} if tag == "__npscalar__" else {tag}):
        raise ValueError(f"malformed tagged value with keys {sorted(v)}")
    x = v[tag]
    if tag == "__array__":
        if isinstance(arrays, Mapping):
            found = isinstance(x, str) and x in arrays
        else:
            found = type(x) is int and 0 <= x < len(arrays)
        if not found:
            raise ValueError(f"reference to a missing array {x!r}")
        return arrays[x]
    if tag == "__tuple__":
        if not isinstance(x, list):
            raise ValueError("malformed tuple")
        return tuple(decode(y, arrays) for y in x)
    if tag == "__dict__":
        if not isinstance(x, list) or not all(isinstance(p, list) and len(p) == 2 for p in x):
            raise ValueError("malformed dict")
        return {decode(k, arrays): decode(y, arrays) for k, y in x}
    if tag == "__float__":
        if x not in ("inf", "-inf", "nan"):
            raise ValueError(f"malformed float {x!r}")
        return float(x)
    if tag == "__npscalar__":
        dt = np.dtype(x) if isinstance(x, str) else None
        if dt is None or dt.kind not in ALLOWED_KINDS:
            raise ValueError(f"unsupported scalar dtype {x!r}")
        value = decode(v["value"], arrays)
        if not isinstance(value, (bool, int, float)):
            raise ValueError(f"scalar of dtype {dt} holds a {type(value).__name__}, not a number")
        try:
            return dt.type(value)
        except (OverflowError, ValueError) as exc:  # e.g. int8 1000, an int of NaN
            raise ValueError(f"scalar {value!r} does not fit dtype {dt}: {exc}") from None
    return schedule_from_dict(x)  # "__schedule__"
