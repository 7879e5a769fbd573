"""The array structures fastopt accepts (ParamSet, array, list/tuple/dict of arrays), flattened."""

from collections.abc import Mapping

from .arrays import storage_name
from .paramset import ParamSet


def flat_arrays(tree, what="arrays"):
    """The 1-D views of every array in ``tree``, in a fixed order (a ParamSet's gradient buffer).

    The views share memory with the originals, so in-place changes reach them."""
    if isinstance(tree, ParamSet):
        return [tree.grad_flat]
    if isinstance(tree, Mapping):
        items = list(tree.values())
    elif isinstance(tree, (list, tuple)):
        items = list(tree)
    elif hasattr(tree, "shape"):
        items = [tree]
    else:
        raise TypeError(
            f"{what} must be a ParamSet, an array or a list/tuple/dict of arrays, "
            f"got {type(tree).__name__}"
        )
    out = []
    for i, a in enumerate(items):
        if a is None:
            continue
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{what}[{i}] is a {type(a).__name__}, not an array")
        if storage_name(a.dtype) is None:
            raise TypeError(f"{what}[{i}] has dtype {a.dtype}; expected floats")
        if not a.flags.c_contiguous:
            raise ValueError(f"{what}[{i}] is not C-contiguous")
        out.append(a.reshape(-1))
    return out
