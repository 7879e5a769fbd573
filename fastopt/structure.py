"""The array structures fastopt accepts (ParamSet, array, list/tuple/dict of arrays), flattened."""

from collections.abc import Mapping

from . import arrays, dispatch
from .paramset import ParamSet


def _items(tree, what):
    """``[(label, array)]``: a dict's entries named by key, the others by position."""
    if isinstance(tree, ParamSet):
        return [(f"{what}[0]", tree.grad_flat)]
    if isinstance(tree, Mapping):
        return [(f"{what}[{k!r}]", a) for k, a in tree.items()]
    if isinstance(tree, (list, tuple)):
        return [(f"{what}[{i}]", a) for i, a in enumerate(tree)]
    if hasattr(tree, "shape") or hasattr(tree, "__dlpack_device__"):
        return [(f"{what}[0]", tree)]
    raise TypeError(
        f"{what} must be a ParamSet, an array or a list/tuple/dict of arrays, "
        f"got {type(tree).__name__}"
    )


def flat_units(tree, what="arrays", *, writable=False):
    """``[(backend, flat native view, array as given)]`` for every array in ``tree`` (None
    entries left out), in a fixed order (a ParamSet's gradient buffer). Each array is viewed
    through its default backend (:func:`fastopt.dispatch.backend_for`): NumPy views of NumPy
    arrays and torch CPU tensors, CuPy arrays as they are, numba device arrays for torch CUDA
    tensors and other CUDA arrays. The views share memory with the originals, so in-place
    changes reach them. TypeError/ValueError naming the entry (by position, a dict's by key)
    for non-arrays, non-float dtypes and non-contiguous arrays, and with ``writable`` for
    read-only ones: all checked before the caller writes any."""
    out = []
    for label, a in _items(tree, what):
        if a is None:
            continue
        try:
            kind = arrays.array_kind(a)
        except TypeError as exc:
            raise TypeError(f"{label} is a {type(a).__name__}, not an array ({exc})") from None
        backend = dispatch.backend_for_kind("numpy" if kind == "torch-cpu" else kind)
        native = backend.native(a)
        if arrays.storage_name(native.dtype) is None:
            raise TypeError(f"{label} has dtype {native.dtype}; expected floats")
        if not backend.is_c_contiguous(native):
            raise ValueError(f"{label} is not C-contiguous")
        if writable and not getattr(getattr(native, "flags", None), "writeable", True):
            raise ValueError(f"{label} is read-only; it is changed in place")
        if writable and arrays.is_readonly(native):
            raise ValueError(f"{label} is a read-only device array; it is changed in place")
        out.append((backend, backend.flat(native), a))
    return out


def flat_arrays(tree, what="arrays"):
    """The 1-D views of every array in ``tree`` (:func:`flat_units` without the backends)."""
    return [flat for _, flat, _ in flat_units(tree, what)]
