"""Compile ``kernels/rules.py`` for one target by rebinding its helpers to compiled versions.

The rules call each other by global name (``adam`` calls ``adam_moments``). A decorated copy of
each function gets a globals dict in which every other rule/helper is the decorated copy too, so
``numba.njit`` and ``numba.cuda.jit(device=True)`` can both compile the same plain-Python source.
The loop templates of ``kernels/loops.py`` and the CUDA reduction templates are bound the same
way (:func:`rebind`): one mechanism for every function compiled from Python here.
"""

import hashlib
import pathlib
import types

from . import access, layout, loops, rules
from .layout import ARITY

__all__ = [
    "ARITY",
    "SOURCE_TAG",
    "compile_rules",
    "loop_kernel",
    "rebind",
    "specialize",
    "storage_loop_kernel",
]

SOURCE_TAG = hashlib.sha256(
    b"".join(
        (pathlib.Path(__file__).parent / f).read_bytes()
        for f in (
            "rules.py",
            "compile_rules.py",
            "loops.py",
            "cpu.py",
            "cuda.py",
            "storage.py",
            "access.py",
            "cpu_storage.py",
            "packed_loops.py",
            "cpu_math.py",
        )
        if (pathlib.Path(__file__).parent / f).exists()
    )
).hexdigest()[:12]
"""Tag of the kernel sources, part of every cached kernel's name: Numba's on-disk cache only
watches the file a kernel is defined in, so a change to a rule must change the kernel's name."""


def rebind(fn, glb, name=None):
    """A copy of function ``fn`` whose globals are ``glb`` (and whose name is ``name``)."""
    name = fn.__name__ if name is None else name
    copy = types.FunctionType(fn.__code__, glb, name, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = name if name != fn.__name__ else fn.__qualname__
    copy.__module__ = fn.__module__
    return copy


def compile_rules(decorate, overrides=None):
    """Return {name: decorate(copy of rules.name)} for every function defined in ``rules``
    (``_``-prefixed module-level declarations excepted), after :func:`layout.check_rules`.
    ``overrides`` maps helper names to a target's own bit-identical versions
    (``cpu_math.RULE_HELPERS``), used as they are instead of the copy."""
    layout.check_rules()
    overrides = overrides or {}
    namespace = dict(vars(rules))
    for name, fn in vars(rules).items():
        if name in overrides:
            namespace[name] = overrides[name]
        elif (
            isinstance(fn, types.FunctionType)
            and fn.__module__ == rules.__name__
            and not name.startswith("_")
        ):
            namespace[name] = decorate(rebind(fn, namespace))
    return {name: namespace[name] for name in vars(rules) if name in namespace}


def specialize(template, rule_name, rule, extra_globals, decorate, variant=""):
    """A copy of a loop ``template`` whose global ``rule`` is ``rule``, with a unique, cacheable name
    (``variant`` tells apart copies of one template and rule compiled differently)."""
    name = f"{template.__name__.lstrip('_')}_{rule_name}{variant}_{SOURCE_TAG}"
    return decorate(rebind(template, dict(extra_globals, rule=rule), name))


def loop_kernel(rule_name, compiled_rules, indices, decorate, variant=""):
    """The elementwise loop of one rule for a target: the template of ``kernels/loops.py`` for its
    number of state slots, with ``rule`` and ``transformed_grad`` from ``compiled_rules`` (what
    :func:`compile_rules` returned for the target) and ``indices`` the target's index range."""
    return specialize(
        loops.TEMPLATES[ARITY[rule_name]],
        rule_name,
        compiled_rules[rule_name],
        {"indices": indices, "transformed_grad": compiled_rules["transformed_grad"]},
        decorate,
        variant,
    )


def storage_loop_kernel(
    rule_name,
    storage,
    compiled_rules,
    element_access,
    indices,
    decorate,
    variant="",
    templates=loops.STORAGE_TEMPLATES,
):
    """The storage loop of one rule and storage combination for a target: the template of
    ``templates`` (``loops.STORAGE_TEMPLATES``, or numba-cuda's ``packed_loops.PACKED_TEMPLATES``)
    for its number of state slots, with ``rule`` and ``transformed_grad`` from ``compiled_rules``
    and the element access of ``element_access`` (what ``access.bind`` returned for ``storage``,
    with the pack helpers for the packed templates)."""
    return specialize(
        templates[ARITY[rule_name]],
        rule_name,
        compiled_rules[rule_name],
        {
            "indices": indices,
            "transformed_grad": compiled_rules["transformed_grad"],
            **element_access,
        },
        decorate,
        access.variant_name(storage) + variant,
    )


def convert_kernel(dst, src, stochastic, element_access, indices, decorate, variant=""):
    """``loops.convert_loop`` from storage ``src`` to ``dst`` (dtype names) for a target, with
    the element access of ``access.bind_convert``."""
    sr = "_sr" if stochastic else ""
    name = f"_{access.SHORT[dst]}_from_{access.SHORT[src]}{sr}{variant}"
    extra = {"indices": indices, **element_access}
    return specialize(loops.convert_loop, "convert", None, extra, decorate, name)
