"""Compile ``kernels/rules.py`` for one target by rebinding its helpers to compiled versions.

The rules call each other by global name (``adam`` calls ``adam_moments``). A decorated copy of
each function gets a globals dict in which every other rule/helper is the decorated copy too, so
``numba.njit`` and ``numba.cuda.jit(device=True)`` can both compile the same plain-Python source.
"""

import hashlib
import inspect
import pathlib
import types

from . import rules

ARITY = {name: len(inspect.signature(getattr(rules, name)).parameters) - 3 for name in rules.RULES}
"""Number of optimizer-state slots of each rule: ``rule(p, g, *state, h)``."""

SOURCE_TAG = hashlib.sha256(
    b"".join(
        (pathlib.Path(__file__).parent / f).read_bytes()
        for f in ("rules.py", "compile_rules.py", "cpu.py", "cuda.py")
        if (pathlib.Path(__file__).parent / f).exists()
    )
).hexdigest()[:12]
"""Tag of the kernel sources, part of every cached kernel's name: Numba's on-disk cache only
watches the file a kernel is defined in, so a change to a rule must change the kernel's name."""


def compile_rules(decorate):
    """Return {name: decorate(copy of rules.name)} for every function defined in ``rules``."""
    namespace = dict(vars(rules))
    for name, fn in vars(rules).items():
        if isinstance(fn, types.FunctionType) and fn.__module__ == rules.__name__:
            copy = types.FunctionType(fn.__code__, namespace, name, fn.__defaults__)
            namespace[name] = decorate(copy)
    return {name: namespace[name] for name in vars(rules) if name in namespace}


def specialize(template, rule_name, rule, extra_globals, decorate, variant=""):
    """A copy of a loop ``template`` whose global ``rule`` is ``rule``, with a unique, cacheable name
    (``variant`` tells apart copies of one template and rule compiled differently)."""
    glb = dict(extra_globals, rule=rule)
    name = f"{template.__name__.lstrip('_')}_{rule_name}{variant}_{SOURCE_TAG}"
    fn = types.FunctionType(template.__code__, glb, name)
    fn.__qualname__ = name
    fn.__module__ = template.__module__
    return decorate(fn)
