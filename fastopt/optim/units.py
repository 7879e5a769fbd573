"""Units: the arrays one kernel call updates, built from what an optimizer is given, and the
gradient structures that mirror them (checked, split per unit, and put back together).

A param group's ``params`` is a ParamSet (one unit over its flat buffer), one array, or a
list/tuple/dict of arrays (one unit each). Gradients come in the same structure.
"""

from collections.abc import Mapping

import numpy as np

from .. import arrays, dispatch
from ..paramset import ParamSet


class Unit:
    """One kernel call's worth of parameters: a ParamSet's flat buffer or one plain array.

    ``param`` is the flat 1-D view the kernels update (the backend's native array); ``source``
    the user's array (its flags say if it is writable); ``shape`` the shape gradients and state
    arrays have; ``default_grad`` the ParamSet's flat gradient buffer (None for plain arrays);
    ``state`` the optimizer state of this unit (``"step"`` and the arrays by torch's names);
    ``backend`` the ``fastopt.dispatch`` backend that runs it (picked at construction for device
    arrays, at the first step otherwise) and ``scalar_type`` the cast of host scalars to its
    dtype; ``kind`` its ``fastopt.arrays.array_kind``; ``device`` None for host memory, else
    ``"cuda:<i>"`` (``"cuda"`` when the ordinal is not known); ``label`` names it in errors.
    """

    __slots__ = (
        "param",
        "source",
        "shape",
        "default_grad",
        "state",
        "backend",
        "label",
        "scalar_type",
        "kind",
        "device",
        "storage_memo",
        "tensor",
    )

    def __init__(self, param, source, shape, default_grad, label):
        self.param = param
        self.source = source
        self.shape = shape
        self.default_grad = default_grad
        self.label = label
        self.state = {}
        self.backend = None
        self.scalar_type = None
        self.kind = "numpy"
        self.device = None
        self.storage_memo = None  # Optimizer._storage's last answer and what it depends on
        self.tensor = None  # a torch tensor's (tensor, data_ptr, dtype) when built: see check_grad

    def use_backend(self, backend):
        self.backend = backend
        self.scalar_type = backend.scalar_type(self.param.dtype)

    def memory_span(self):
        """(device, first byte, end byte): a parameter must not be in two groups, while disjoint
        views of one buffer (weights and biases of a ParamSet) may be."""
        p = self.param
        start = p.ctypes.data if self.device is None else arrays.data_ptr(p)
        return (self.device or "cpu", start, start + p.size * p.dtype.itemsize)


def overlaps(a, b):
    """Whether two memory spans of :meth:`Unit.memory_span` share a byte."""
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


# ------------------------------------------------------------------------------------------
# Building units


def units_of(params, where, backend_name=None):
    """(structure, units, keys) of one group's ``params``; structure is ``"paramset"``,
    ``"dict"`` (keys in order), ``"list"`` or ``"array"``."""
    if isinstance(params, ParamSet):
        label = f"{where} ParamSet"
        if isinstance(params.flat, np.ndarray):
            unit = Unit(params.flat, params.flat, (params.size,), params.grad_flat, label)
        else:
            unit = _device_unit(params.flat, label, backend_name, default_grad=params.grad_flat)
            unit.shape = (params.size,)
        return "paramset", [unit], None
    if isinstance(params, Mapping):
        keys = list(params)
        units = [_unit(a, f"{where} param {k!r}", backend_name) for k, a in params.items()]
        return "dict", units, keys
    if isinstance(params, (list, tuple)):
        units = [_unit(a, f"{where} param [{i}]", backend_name) for i, a in enumerate(params)]
        return "list", units, None
    if hasattr(params, "shape") or hasattr(params, "__dlpack_device__"):
        return "array", [_unit(params, f"{where} param", backend_name)], None
    raise TypeError(
        f"{where} params must be a ParamSet, an array, a list/tuple/dict of arrays, "
        f"got {type(params).__name__}"
    )


def _unit(a, label, backend_name):
    if isinstance(a, np.ndarray):  # the common case first
        return Unit(_flat_view(a, label), a, a.shape, None, label)
    if arrays.is_device_kind(arrays.array_kind(a)):
        return _device_unit(a, label, backend_name)
    view = arrays.host_view(a)  # a torch CPU tensor: the kernels update a NumPy view of it
    unit = Unit(_flat_view(view, label), view, tuple(view.shape), None, label)
    unit.kind = arrays.array_kind(a)
    _remember_tensor(unit, a)
    return unit


def _remember_tensor(unit, a):
    """For a torch tensor: the tensor, its data pointer and dtype, so that a step after
    ``t.data = ...`` (``model.half()``, ``model.to(dtype)``) refuses instead of updating the
    memory the tensor no longer uses."""
    data_ptr = getattr(a, "data_ptr", None)  # (test stand-ins for torch CUDA tensors have none)
    if arrays.root_module(a) == "torch" and callable(data_ptr):
        unit.tensor = (a, data_ptr(), a.dtype)


def _flat_view(a, label):
    arrays.check_storage_dtype(a.dtype, label)
    arrays.check_contiguous(a.flags.c_contiguous, label)
    arrays.check_writable(a.flags.writeable, label)
    return a.reshape(-1)


def _device_unit(a, label, backend_name, default_grad=None):
    """A unit over a CUDA array (CuPy, torch CUDA tensor, ``__cuda_array_interface__`` or DLPack):
    the backend is fixed here, so an unavailable one fails at construction, before any write.
    ``param``/``default_grad`` are the backend's native flat views of the same memory."""
    kind = arrays.array_kind(a)
    backend = dispatch.backend_for_kind(kind, backend_name)
    native = backend.native(a)
    arrays.check_storage_dtype(native.dtype, label)
    arrays.check_contiguous(backend.is_c_contiguous(native), label)
    arrays.check_writable(not arrays.is_readonly(a), label)
    if default_grad is not None:
        default_grad = backend.flat(backend.native(default_grad))
    unit = Unit(backend.flat(native), a, tuple(native.shape), default_grad, label)
    unit.kind = kind
    _remember_tensor(unit, a)
    index = arrays.device_index(a, kind)
    if index is None:  # numba device arrays, CAI-only arrays: ask the backend
        index = backend.device_of(unit.param)
    unit.device = "cuda" if index is None else f"cuda:{index}"
    unit.use_backend(backend)
    return unit


# ------------------------------------------------------------------------------------------
# Gradients


def check_grad(unit, grad):
    """The backend's flat view of ``grad`` after checking it fits ``unit``: same kind of array
    and device, same dtype, the parameter's shape (or flat, for a ParamSet), C-contiguous; and
    the parameter still writable. Raises naming the mismatch; writes nothing."""
    if grad is unit.default_grad:  # the ParamSet's own buffer: it fits by construction
        _check_still_writable(unit)
        return grad
    g = _native_grad(unit, grad)
    p = unit.param
    if g.dtype != p.dtype:
        arrays.check_storage_dtype(g.dtype, f"gradient for {unit.label}")
        if not unit.backend.mixed_storage:
            raise TypeError(
                f"gradient for {unit.label} has dtype {g.dtype}, the parameter {p.dtype}; "
                f"backend {unit.backend.name!r} needs gradients of the parameter's dtype"
            )
    shape = tuple(g.shape)
    if shape != unit.shape and not (unit.default_grad is not None and shape == (p.size,)):
        raise ValueError(f"gradient for {unit.label} has shape {shape}, expected {unit.shape}")
    if not unit.backend.is_c_contiguous(g):
        raise ValueError(f"gradient for {unit.label} is not C-contiguous")
    _check_still_writable(unit)
    return unit.backend.flat(g)


def _check_still_writable(unit):
    # Host arrays can be made read-only after construction; device arrays were checked then.
    if unit.device is None:
        arrays.check_writable(unit.source.flags.writeable, unit.label)
    if unit.tensor is not None:
        t, ptr, dtype = unit.tensor
        if t.data_ptr() != ptr or t.dtype != dtype:
            raise RuntimeError(
                f"{unit.label} no longer uses the memory the optimizer was built over (its "
                f".data was replaced: model.half(), model.to(dtype), t.data = ...); build a "
                "new optimizer over it and load this one's state_dict()"
            )


def _native_grad(unit, grad):
    """``grad`` as the unit's backend's native array, or an error naming the mismatch of kind
    or device."""
    if unit.device is None:
        if type(grad) is type(unit.param):
            return grad
        if isinstance(grad, np.ndarray):
            raise TypeError(
                f"gradient for {unit.label} is a {type(grad).__name__}, the parameter a "
                f"{type(unit.param).__name__}"
            )
        kind = arrays.array_kind(grad)  # TypeError for unsupported types
        if kind == "torch-cpu":
            return arrays.host_view(grad)  # host memory either way
        raise ValueError(
            f"gradient for {unit.label} is {arrays.describe(grad, kind)}, the parameter "
            f"{arrays.describe(unit.source)}: they live on different devices/libraries"
        )
    kind = arrays.array_kind(grad)  # TypeError for unsupported types
    if kind != unit.kind:
        raise ValueError(
            f"gradient for {unit.label} is {arrays.describe(grad, kind)}, the parameter "
            f"{arrays.describe(unit.source, unit.kind)}: they live on different devices/libraries"
        )
    index = arrays.device_index(grad, kind)
    native = unit.backend.native(grad)
    if index is None:  # numba device arrays, CAI-only arrays: ask the backend
        index = unit.backend.device_of(native)
    if index is not None and unit.device != "cuda" and unit.device != f"cuda:{index}":
        raise ValueError(
            f"gradient for {unit.label} is on cuda:{index}, the parameter on {unit.device}"
        )
    return native


def split_grads(structure, units, keys, grads, where):
    """The per-unit gradients (None = skip that unit) of one group's ``grads``, which follow the
    group's params ``structure``; ``grads=None`` means the ParamSet's own gradient buffer."""
    if grads is None:
        if structure != "paramset":
            raise ValueError(
                f"step() without gradients needs a ParamSet; {where} holds plain arrays"
            )
        return [units[0].default_grad]
    if structure == "paramset":
        if isinstance(grads, ParamSet):
            grads = grads.grad_flat
        if not hasattr(grads, "shape"):
            raise TypeError(f"gradient for the ParamSet in {where} must be a flat array or None")
        return [grads]
    if structure == "array":
        return [grads]
    if structure == "dict":
        if not isinstance(grads, Mapping):
            raise TypeError(
                f"{where} params are a dict; pass gradients as a dict with the same keys"
            )
        if set(grads) != set(keys):
            missing = sorted(set(keys) - set(grads))
            extra = sorted(set(grads) - set(keys))
            raise ValueError(
                f"gradient keys do not match {where}: missing {missing}, unexpected {extra}"
            )
        return [grads[k] for k in keys]
    if not isinstance(grads, (list, tuple)) or len(grads) != len(units):
        raise ValueError(
            f"{where} has {len(units)} arrays; pass a list/tuple of {len(units)} gradients"
        )
    return list(grads)


def join_grads(structure, keys, per_unit):
    """The inverse of :func:`split_grads`: one group's gradient entry from its per-unit arrays."""
    if structure == "dict":
        return dict(zip(keys, per_unit))
    if structure in ("paramset", "array"):
        return per_unit[0]
    return list(per_unit)
