"""Backend registry: picks the kernel backend from the arrays an update touches.

A backend applies a named rule of ``kernels/rules.py`` to flat 1-D arrays in place. NumPy arrays go
to the Numba CPU kernels; ``backend="numpy"`` forces the NumPy reference (the spec, for checking).
GPU backends register themselves here too; the optimizer classes never name a backend.
"""

import numpy as np

from . import reference


class Backend:
    """One way of running the update rules. Subclasses set ``name`` and implement the methods."""

    name = ""
    array_kind = ""
    """The kind of array this backend updates (see :func:`array_kind`)."""

    def available(self):
        """(bool, reason): whether it can run here, and why not."""
        return True, ""

    def update(self, rule, p, g, states, h, gs, spec):
        """Apply ``rule`` in place to flat arrays; ``states`` in the rule's slot order, ``h`` its
        scalars and ``gs`` = (gradient scale, clip value or 0), cast to the parameter dtype.
        ``spec`` = (optimizer, group, state, lr, step), for backends that work from the
        hyperparameters instead (the reference)."""
        raise NotImplementedError

    def sumsq_and_finite(self, g):
        """(sum of squares in float64, every element finite?) of a flat array, deterministic."""
        raise NotImplementedError

    def scalar_type(self, dtype):
        """The constructor that casts host float64 scalars to the parameter dtype."""
        return np.float32 if dtype == np.float32 else float

    def zeros(self, n, dtype):
        """A zeroed flat state array on this backend's device."""
        from .paramset import aligned_zeros

        return aligned_zeros(n, dtype)

    def to_numpy(self, a):
        return np.array(a, copy=True)


class NumbaCPU(Backend):
    name = "numba-cpu"
    array_kind = "numpy"

    def __init__(self):
        from .kernels import cpu

        self._apply = cpu.apply
        self.sumsq_and_finite = cpu.sumsq_and_finite

    def update(self, rule, p, g, states, h, gs, spec):
        self._apply(rule, p, g, states, h, gs)


class NumPyReference(Backend):
    """The whole-array NumPy reference of ``fastopt/reference.py``: slow, readable, independent."""

    name = "numpy"
    array_kind = "numpy"

    def update(self, rule, p, g, states, h, gs, spec):
        optimizer, group, state, lr, step = spec
        g = reference.transformed_grad(g, gs[0], gs[1])
        # The reference advances scalar state (NAdam's mu_product) itself; the optimizer owns the
        # committed value, so hand it a shallow copy.
        rule_fn = getattr(reference, optimizer.algorithm)
        rule_fn(p, g, dict(state), step=step, **optimizer.hyperparameters(group, lr))

    def sumsq_and_finite(self, g):
        g64 = g.astype(np.float64)
        return float(np.dot(g64, g64)), bool(np.isfinite(g).all())


_FACTORIES = {"numba-cpu": NumbaCPU, "numpy": NumPyReference}
_DEFAULT_FOR_KIND = {"numpy": "numba-cpu"}
_INSTANCES = {}


def register_backend(name, factory, *, default_for=None):
    """Add a backend (``factory()`` builds it lazily); optionally the default for an array kind."""
    _FACTORIES[name] = factory
    if default_for is not None:
        _DEFAULT_FOR_KIND[default_for] = name


def get_backend(name):
    """The backend called ``name``; ValueError for unknown names, RuntimeError if unavailable."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(_FACTORIES)}")
    backend = _INSTANCES.get(name)
    if backend is None:
        backend = _FACTORIES[name]()
        ok, why = backend.available()
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {why}")
        _INSTANCES[name] = backend
    return backend


def array_kind(a):
    """'numpy' for NumPy arrays; ValueError/TypeError naming the type for anything unsupported."""
    if isinstance(a, np.ndarray):
        return "numpy"
    raise TypeError(
        f"unsupported array type {type(a).__module__}.{type(a).__name__}; "
        "fastopt updates NumPy arrays on the CPU"
    )


def backend_for(arrays, name=None):
    """The backend for a group of arrays that must all live on one device with one dtype."""
    kinds = {array_kind(a) for a in arrays}
    if len(kinds) != 1:
        raise ValueError(f"arrays live on different devices/libraries: {sorted(kinds)}")
    (kind,) = kinds
    if name is None:
        name = _DEFAULT_FOR_KIND.get(kind)
        if name is None:
            raise TypeError(f"no backend handles {kind} arrays")
    backend = get_backend(name)
    if backend.array_kind != kind:
        raise ValueError(f"backend {name!r} updates {backend.array_kind} arrays, got {kind} arrays")
    return backend


def backends():
    """[(name, available, reason)] for every registered backend."""
    out = []
    for name, factory in _FACTORIES.items():
        try:
            ok, why = factory().available()
        except Exception as exc:  # a broken optional dependency must not break the listing
            ok, why = False, f"{type(exc).__name__}: {exc}"
        out.append((name, ok, why))
    return out
