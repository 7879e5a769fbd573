"""Specs of the playground and the command line: ``NAME`` or ``NAME:key=value,key=value``.

Values are Python literals (numbers, ``true``/``false``, ``none``, tuples such as
``betas=(0.9,0.99)``) or, failing that, plain strings. :func:`parse_optimizer` builds an
optimizer of the registry :data:`fastopt.optim.OPTIMIZERS` (``gd`` is ``sgd``) with its own keyword
arguments; :func:`parse_problem` a test function of the registry :data:`fastopt.problems.PROBLEMS`.
"""

import ast
import inspect
from dataclasses import dataclass

import numpy as np

from .. import problems as _problems
from ..optim import OPTIMIZERS as _REGISTRY
from .methods import METHODS


# --------------------------------------------------------------------------------- specs
def _split_top_level(text, sep=","):
    """Split on ``sep`` outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced {ch!r}")
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if depth or quote:
        raise ValueError("unbalanced brackets or quotes")
    parts.append("".join(cur))
    return parts


def _literal(text):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if low in ("inf", "+inf", "-inf", "nan"):
        return float(low)
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text.strip()  # a plain string, e.g. anneal_strategy=linear
    if isinstance(value, list):
        value = tuple(value)
    return value


def parse_spec(text, what="spec"):
    """``"name:k=v,k2=v2"`` -> ``("name", {"k": v, "k2": v2})``. ValueError with a readable
    message (naming ``what``) for an empty name, a missing ``=``, an empty or repeated key."""
    text = str(text).strip()
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"{what} {text!r} has no name (expected NAME or NAME:key=value,...)")
    kwargs = {}
    if sep and rest.strip():
        try:
            items = _split_top_level(rest)
        except ValueError as exc:
            raise ValueError(f"{what} {text!r}: {exc}") from None
        for item in items:
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise ValueError(
                    f"{what} {text!r}: {item.strip()!r} is not key=value "
                    f"(expected NAME:key=value,key=value)"
                )
            if not key.isidentifier():
                raise ValueError(f"{what} {text!r}: {key!r} is not a valid key")
            if key in kwargs:
                raise ValueError(f"{what} {text!r}: {key!r} given twice")
            kwargs[key] = _literal(value)
    elif sep:
        raise ValueError(f"{what} {text!r}: nothing after ':' (expected NAME:key=value,...)")
    return name, kwargs


OPTIMIZERS = (*_REGISTRY, *METHODS)
"""Optimizer names :func:`parse_optimizer` accepts (plus ``gd`` for ``sgd``): the names of the
registry :data:`fastopt.optim.OPTIMIZERS`, in its order, then the playground's own methods
(:data:`fastopt.playground.methods.METHODS`: ``newton``, ``armijo``)."""

_BASE_OPTIONS = ("backend", "max_grad_norm", "max_grad_value", "skip_nonfinite")


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer class with its keyword arguments and a label for plots."""

    name: str
    cls: type
    kwargs: dict
    label: str

    def build(self, params):
        return self.cls(params, **self.kwargs)


def parse_optimizer(text):
    """``"sgd:lr=0.4,momentum=0.5"`` -> OptimizerSpec, checked by building the optimizer on a
    dummy array (so a bad name, key or value fails here, with a ValueError saying what)."""
    name, kwargs = parse_spec(text, "optimizer")
    key = name.lower()
    cls = _REGISTRY.get("sgd" if key == "gd" else key) or METHODS.get(key)
    if cls is None:
        known = ", ".join(OPTIMIZERS)
        raise ValueError(f"unknown optimizer {name!r}; known: {known} (gd = sgd)")
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    allowed = [p for p in params if p != "options"]
    if key not in METHODS and not cls.requires_closure:
        allowed += list(_BASE_OPTIONS)
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"optimizer {name!r} has no argument {key!r}; its arguments: {', '.join(allowed)}"
            )
    try:
        cls(np.zeros((2, 2) if getattr(cls, "matrices_only", False) else 2), **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"optimizer {text!r}: {exc}") from None
    label = name.lower() + (
        " " + ", ".join(f"{k}={_fmt(v)}" for k, v in kwargs.items()) if kwargs else ""
    )
    return OptimizerSpec(name.lower(), cls, kwargs, label)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return str(v)


def parse_problem(text):
    """``"quadratic:a=1,b=4"`` -> a :class:`fastopt.problems.Problem` (ValueError if bad)."""
    name, kwargs = parse_spec(text, "problem")
    try:
        return _problems.get_problem(name, **kwargs)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        raise ValueError(
            msg if msg.startswith(("unknown", "problem")) else f"problem {text!r}: {msg}"
        ) from None
