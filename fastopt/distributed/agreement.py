"""What the ranks must agree on before they exchange buffers.

MPI collectives trust every rank to pass matching buffers: a rank whose ParamSet has another
layout, or that raises on a bad argument before its first collective, leaves the other ranks
waiting in that collective forever (or lets MPI truncate a message). Here each rank describes
its arguments (:func:`describe`: a small picklable value that never raises), one ``allgather``
compares them, and every rank raises the same error before anything is sent or written.

- :func:`agree_on_arguments`: at construction of :class:`~fastopt.distributed.DataParallel`
  and :class:`~fastopt.distributed.ZeroRedundancyOptimizer` (one small message, once).
- :func:`agree_on_outcome`: a step's local checks under ``debug=True`` (the step's own
  collectives stay one per step without it).
"""

import math
import numbers
import re
import zlib

import numpy as np

from ..arrays import is_device_array


def describe(value):
    """A picklable, comparable description of ``value`` that is equal on two ranks exactly when
    the ranks passed the same argument. Never raises (a rank must reach the comparison).

    Numbers, strings, None and bools stand for themselves (NaN as the string ``"nan"``, equal to
    itself); tuples, lists and dicts element by element; dtypes and types by name; a ParamSet
    by its layout (names, shapes, dtype, host or device); a NumPy array by its shape, dtype and
    a CRC-32 of its bytes; a function or method by its qualified name (``lambda``s alike: their
    code is the program's, the same on every rank); any other object by its type's qualified name and,
    where its class defines one, its ``repr`` without memory addresses."""
    try:
        return _describe(value)
    except Exception as exc:  # a description must not raise: compare the failure instead
        return ("undescribable", type(value).__qualname__, type(exc).__name__)


def _describe(value):
    from ..paramset import ParamSet  # the ParamSet imports the arrays module, as this one

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        return "nan" if math.isnan(v) else v
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_describe(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _describe(v)) for k, v in value.items())))
    if isinstance(value, np.dtype):
        return ("dtype", value.name)
    if isinstance(value, type):
        return ("type", f"{value.__module__}.{value.__qualname__}")
    if isinstance(value, ParamSet):
        layout = tuple((n, tuple(value.shapes[n])) for n in value.names)
        where = "device" if is_device_array(value.flat) else "host"
        return ("ParamSet", layout, np.dtype(value.dtype).name, where)
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
        return ("ndarray", value.shape, value.dtype.name, zlib.crc32(data))
    if callable(value) and isinstance(getattr(value, "__qualname__", None), str):
        # functions, lambdas, bound and built-in methods (``{...}.get``): by name
        return ("function", f"{getattr(value, '__module__', None)}.{value.__qualname__}")
    kind = type(value)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if kind.__repr__ is not object.__repr__:  # without addresses, which differ between ranks
        return ("object", name, _ADDRESS.sub("", repr(value)))
    return ("object", name)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _shown(description):
    """A description as a short text for an error message."""
    text = repr(description)
    return text if len(text) <= 200 else text[:197] + "..."


def agree_on_arguments(comm, who, arguments):
    """Compare ``arguments`` (name -> value, the same names on every rank) over the ranks of
    ``comm`` with one ``allgather`` of their descriptions; ValueError on every rank naming the
    first argument (in the order given) that differs, with each rank's description."""
    _raise_if_different(who, comm.allgather(_described(arguments)))


def agree_on_outcome(comm, who, check, agreed=None):
    """Run ``check()`` on every rank, then learn with one ``allgather`` whether any rank's
    raised: that rank re-raises its own exception, the others raise ValueError naming the
    rank(s) and their messages. ``agreed(result)`` (optional): name -> value that must be the
    same on every rank too (compared as :func:`agree_on_arguments` does, in the same message).
    Returns ``check()``'s value."""
    result, error, described = None, None, None
    try:
        result = check()
        described = _described(agreed(result)) if agreed is not None else []
    except Exception as exc:  # every rank must reach the allgather
        error = exc
    outcome = None if error is None else f"{type(error).__name__}: {error}"
    every = comm.allgather((outcome, described))
    failed = [(r, o) for r, (o, _) in enumerate(every) if o is not None]
    if failed:
        if error is not None:
            raise error
        raise ValueError(
            f"{who}: refused on "
            + "; ".join(f"rank {r} ({message})" for r, message in failed)
            + "; nothing was changed on any rank"
        )
    _raise_if_different(who, [d for _, d in every])
    return result


def _same(a, b):
    """Whether two descriptions are the same argument: compared by their ``repr``, so that
    ``True`` and ``1``, or ``3.0`` and ``3``, which Python finds equal but the argument checks
    tell apart, differ."""
    return repr(a) == repr(b)


def _described(arguments):
    return [(name, describe(value)) for name, value in arguments.items()]


def _raise_if_different(who, every):
    """ValueError unless the ranks' lists of (name, description) ``every`` are equal."""
    names = [name for name, _ in every[0]]
    if all(_same(rank_args, every[0]) for rank_args in every[1:]):
        return
    if any([name for name, _ in rank_args] != names for rank_args in every):
        raise ValueError(f"{who}: the ranks passed different arguments")
    for i, name in enumerate(names):
        seen = [rank_args[i][1] for rank_args in every]
        other = next((d for d in seen[1:] if not _same(d, seen[0])), None)
        if other is None:
            continue
        path = _difference_path(seen[0], other)
        where = name + "".join(f"[{step!r}]" for step in path)
        per_rank = "; ".join(f"rank {r}: {_shown(_at(d, path))}" for r, d in enumerate(seen))
        raise ValueError(
            f"{who}: the ranks passed different {where} ({per_rank}); every rank must pass the same"
        )


def _children(description):
    """``{key or index: child}`` of a container's description (``("dict", items)``, or a
    sequence's ``(type name, items)``), else None."""
    if not (isinstance(description, tuple) and len(description) == 2):
        return None
    kind, items = description
    if not (isinstance(kind, str) and isinstance(items, tuple)):
        return None  # ("type", name), ("object", name), ...: a leaf
    return dict(items) if kind == "dict" else dict(enumerate(items))


def _difference_path(a, b):
    """The keys and indices leading to the innermost part where descriptions ``a`` and ``b``
    differ (empty when they differ as a whole: other kinds or other lengths)."""
    path = []
    while True:
        ca, cb = _children(a), _children(b)
        if ca is None or cb is None or a[0] != b[0] or list(ca) != list(cb):
            return path
        key = next(k for k in ca if not _same(ca[k], cb[k]))
        path.append(key)
        a, b = ca[key], cb[key]


def _at(description, path):
    """The part of ``description`` at ``path`` (the whole description where it has none)."""
    part = description
    for key in path:
        children = _children(part)
        if children is None or key not in children:
            return description
        part = children[key]
    return part


def optimizer_arguments(optimizer):
    """What must match of an optimizer object over the ranks (its class, options of every
    param group, precision and clipping settings), for :func:`agree_on_arguments`."""
    if optimizer is None:
        return None
    return {
        "class": type(optimizer),
        "param_groups": group_options(optimizer),
        "precision": getattr(optimizer, "precision", None),
        **{k: getattr(optimizer, k, None) for k in CLIPPING},
    }


CLIPPING = ("max_grad_norm", "max_grad_value", "skip_nonfinite")


RANK_OWN_OPTIONS = frozenset({"params", "muon_params"})
"""Param-group entries that differ between ranks by design: a ZeRO rank's local optimizer holds
its shard and Muon's names among its own tensors."""


def group_options(optimizer):
    """The options of each of ``optimizer``'s param groups, without the rank's own entries."""
    return [
        {k: v for k, v in group.items() if k not in RANK_OWN_OPTIONS}
        for group in getattr(optimizer, "param_groups", ())
    ]
