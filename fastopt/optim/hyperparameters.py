"""Declarative hyperparameters: each optimizer class lists its hyperparameters once, as a table of
:class:`Hyper` rows in torch's argument order (``hyperparameter_table``), and the base class
builds from it the constructor (with a real signature, so positional calls and
``inspect.signature`` work as for a hand-written one), the defaults and the checks.

The rows every family shares are made here, once: ``lr``, ``betas``, ``eps``, ``weight_decay``,
``MAXIMIZE``, the Adam family's four leading rows (:func:`adam_family`), flags and ranges.
"""

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

from ..validation import (
    check_betas,
    check_bool,
    check_interval,
    check_lr,
    check_nonnegative,
    check_real,
)


class Hyper(NamedTuple):
    """One hyperparameter of an optimizer class.

    ``check(name, value)`` raises TypeError (wrong type) or ValueError (out of range) naming it.
    ``keyword_only`` puts it after the ``*`` of the constructor. A ``fixed`` row is no
    constructor argument: every param group starts with its ``default`` (AdamW's
    ``decoupled_weight_decay=True``), and it is checked like the others when a group sets it.
    """

    name: str
    default: object
    check: Callable
    keyword_only: bool = False
    fixed: bool = False


def _check_lr(name, value):
    check_lr(value, name)


def _check_betas(name, value):
    check_betas(value, name)


check_unit_interval = functools.partial(check_interval, lo=0.0, hi=1.0, hi_closed=True)
"""``check(name, value)``: a real number in [0, 1] (RMSprop's alpha, Adadelta's rho, dampening)."""


def lr(default):
    """The learning rate: a float >= 0 or a schedule ``k -> lr``."""
    return Hyper("lr", default, _check_lr)


def betas(default=(0.9, 0.999)):
    """A pair of moment coefficients, each in [0, 1)."""
    return Hyper("betas", default, _check_betas)


def eps(default=1e-8):
    """The denominator's ε, >= 0, as torch checks it (``eps = 0`` divides by the bare root: a
    zero second moment then gives NaN, in torch too)."""
    return Hyper("eps", default, check_nonnegative)


def weight_decay(default=0.0):
    """The weight decay λ, >= 0."""
    return Hyper("weight_decay", default, check_nonnegative)


def nonnegative(name, default, *, keyword_only=False):
    """A real number >= 0."""
    return Hyper(name, default, check_nonnegative, keyword_only)


def unit_interval(name, default):
    """A real number in [0, 1]."""
    return Hyper(name, default, check_unit_interval)


def real(name, default, *, keyword_only=False, **bounds):
    """A real number within ``bounds`` (``check_real``'s ``lo``, ``hi``, ``lo_open``, ``hi_open``)."""
    return Hyper(name, default, functools.partial(check_real, **bounds), keyword_only)


def flag(name, default=False, *, keyword_only=False):
    """A bool."""
    return Hyper(name, default, check_bool, keyword_only)


MAXIMIZE = flag("maximize", keyword_only=True)
"""``maximize``: ascend instead of descend (keyword-only, as in torch)."""


def adam_family(lr_default=1e-3):
    """The four leading rows of torch's Adam family: ``lr, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=0.0``."""
    return (lr(lr_default), betas(), eps(), weight_decay())


def revise(table, *, fixed=None, **defaults):
    """``table`` with new ``defaults`` (name -> value) and the rows named in ``fixed``
    (name -> value) made fixed at that value; KeyError for a name the table lacks."""
    fixed = fixed or {}
    names = {row.name for row in table}
    for name in (*defaults, *fixed):
        if name not in names:
            raise KeyError(f"no hyperparameter {name!r} to revise")
    out = []
    for row in table:
        if row.name in fixed:
            row = row._replace(default=fixed[row.name], fixed=True)
        elif row.name in defaults:
            row = row._replace(default=defaults[row.name])
        out.append(row)
    return tuple(out)


def check_table(table, group):
    """Run every row's check on ``group``'s value, in table order."""
    for row in table:
        row.check(row.name, group[row.name])


def constructor(cls):
    """The ``__init__`` of ``cls`` built from ``cls.hyperparameter_table``: signature
    ``(self, params, <rows in order, keyword-only ones after *>, **options)``. It collects the
    rows' values (fixed rows at their default) into the defaults dict, in table order, and hands
    it to the nearest hand-written ``__init__`` up the class's MRO (``Optimizer``'s or e.g.
    ``SegmentedOptimizer``'s), which takes ``(params, defaults, **options)``."""
    table = cls.hyperparameter_table
    P = inspect.Parameter
    parameters = [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
    for row in table:
        if not row.fixed:
            kind = P.KEYWORD_ONLY if row.keyword_only else P.POSITIONAL_OR_KEYWORD
            parameters.append(P(row.name, kind, default=row.default))
    parameters.append(P("options", P.VAR_KEYWORD))
    signature = inspect.Signature(
        parameters
    )  # ValueError if a positional row follows a keyword one
    base_init = next(
        k.__dict__["__init__"]
        for k in cls.__mro__[1:]
        if "__init__" in k.__dict__ and not hasattr(k.__dict__["__init__"], "built_from_table")
    )

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        defaults = {row.name: row.default if row.fixed else given[row.name] for row in table}
        base_init(self, given["params"], defaults, **given["options"])

    __init__.__signature__ = signature
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    __init__.__doc__ = (
        f"Construct {cls.__name__}; its arguments are the rows of ``hyperparameter_table``."
    )
    __init__.built_from_table = cls
    return __init__
