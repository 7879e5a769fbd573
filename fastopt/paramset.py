"""ParamSet: many named parameters packed in one contiguous buffer, plus one gradient buffer.

An optimizer over a ParamSet updates every parameter with one kernel call over ``flat``.
"""

import math
from collections.abc import Mapping

import numpy as np

from . import arrays
from .memory import aligned_zeros


class GradientViews(Mapping):
    """Read-only mapping name -> gradient view into the ParamSet's gradient buffer."""

    def __init__(self, views):
        self._views = views

    def __getitem__(self, name):
        return self._views[name]

    def __iter__(self):
        return iter(self._views)

    def __len__(self):
        return len(self._views)

    def __setitem__(self, name, value):
        self._views[name][...] = value


class ParamSet(Mapping):
    """Named arrays of any shapes, packed densely (in the given order) into one aligned buffer.

    ``ParamSet({"w": w, "b": b})`` copies the values in; afterwards ``ps["w"]`` and
    ``ps.grads["w"]`` are views into ``ps.flat`` and ``ps.grad_flat``, which optimizers update in
    place. All parameters share one floating dtype (float32, float64, bfloat16 or float16; names,
    NumPy dtypes and ``ml_dtypes.bfloat16`` are accepted), the first array's unless ``dtype`` is
    given; values are converted with rounding to nearest even. ``device="cuda"`` (CuPy's current device) or ``"cuda:<i>"`` allocates
    the buffers with CuPy, on the GPU; the values may then come from NumPy arrays, CuPy arrays,
    torch tensors or other CUDA arrays. Optimizers over it run the GPU backends (CuPy by default).
    """

    def __init__(self, params, *, dtype=None, device="cpu"):
        items = list(params.items()) if isinstance(params, Mapping) else list(params)
        if not items:
            raise ValueError("ParamSet needs at least one parameter")
        names = [name for name, _ in items]
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(f"ParamSet parameter names must be non-empty strings, got {name!r}")
        if len(set(names)) != len(names):
            raise ValueError("ParamSet parameter names must be unique")
        xp, index = _array_module(device)
        with arrays.on_device(xp, index):
            self._init(items, names, dtype, device, xp)

    def _init(self, items, names, dtype, device, xp):
        arrays = [_as_host_or_device_array(a, name, xp) for name, a in items]
        explicit = dtype is not None
        dtype = _storage_dtype(dtype if explicit else arrays[0].dtype, xp)
        for (name, _), a in zip(items, arrays):
            if a.dtype != dtype and not explicit:
                raise TypeError(
                    f"parameter {name!r} has dtype {a.dtype}, the ParamSet is {dtype}; "
                    "pass dtype= to convert explicitly"
                )
        self.device = device
        self._xp = xp
        self._shapes = {name: tuple(a.shape) for name, a in zip(names, arrays)}
        sizes = [int(a.size) for a in arrays]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._offsets = {
            name: (int(offsets[i]), int(offsets[i + 1])) for i, name in enumerate(names)
        }
        n = int(offsets[-1])
        self._flat = aligned_zeros(n, dtype, xp)
        self._grad_flat = aligned_zeros(n, dtype, xp)
        self._views = {}
        grad_views = {}
        for name, a in zip(names, arrays):
            lo, hi = self._offsets[name]
            self._flat[lo:hi] = a.reshape(-1)
            self._views[name] = self._flat[lo:hi].reshape(self._shapes[name])
            grad_views[name] = self._grad_flat[lo:hi].reshape(self._shapes[name])
        self._grads = GradientViews(grad_views)

    @classmethod
    def from_buffers(cls, flat, grad_flat, segments):
        """A ParamSet that ADOPTS ``flat`` and ``grad_flat`` instead of copying into new buffers:
        the optimizer then updates the caller's memory in place (``fastopt.torch`` rebinds a
        model's parameters and gradients to views of such buffers).

        ``flat`` and ``grad_flat``: 1-D, C-contiguous, writable arrays of one floating dtype and
        size, both in host memory (NumPy arrays or torch CPU tensors, adopted as zero-copy NumPy
        views) or both on one CUDA device (CuPy arrays, torch CUDA tensors, any array with
        ``__cuda_array_interface__``). ``segments``: ``(name, shape)`` pairs (or a dict name ->
        shape), packed in order from element 0; their sizes must add up to ``flat.size``.
        """
        flat, grad_flat, device = _adopted_buffers(flat, grad_flat)
        items = list(segments.items()) if isinstance(segments, Mapping) else list(segments)
        self = cls.__new__(cls)
        self.device = device
        self._xp = None if device != "cpu" else np
        self._shapes, self._offsets, self._views = {}, {}, {}
        grad_views, lo = {}, 0
        for name, shape in items:
            if not isinstance(name, str) or not name or name in self._shapes:
                raise ValueError(f"segment names must be unique non-empty strings, got {name!r}")
            shape = tuple(int(d) for d in shape)
            hi = lo + math.prod(shape)
            self._shapes[name], self._offsets[name] = shape, (lo, hi)
            self._views[name] = flat[lo:hi].reshape(shape)
            grad_views[name] = grad_flat[lo:hi].reshape(shape)
            lo = hi
        if not items or lo != flat.shape[0]:
            raise ValueError(
                f"the segments cover {lo} elements, the buffers hold {flat.shape[0]}; "
                "they must cover them exactly"
            )
        self._flat, self._grad_flat = flat, grad_flat
        self._grads = GradientViews(grad_views)
        return self

    # mapping interface: name -> parameter view
    def __getitem__(self, name):
        return self._views[name]

    def __setitem__(self, name, value):
        self._views[name][...] = value

    def __iter__(self):
        return iter(self._views)

    def __len__(self):
        return len(self._views)

    def __repr__(self):
        shapes = ", ".join(f"{k}: {v}" for k, v in self._shapes.items())
        return (
            f"ParamSet({{{shapes}}}, dtype={self.dtype}, size={self.size}, device={self.device!r})"
        )

    @property
    def flat(self):
        """The parameter buffer (1-D, contiguous, aligned); every ``ps[name]`` is a view of it."""
        return self._flat

    @property
    def grad_flat(self):
        """The gradient buffer, laid out like ``flat``."""
        return self._grad_flat

    @property
    def grads(self):
        """Mapping name -> gradient view (assign with ``ps.grads[name][...] = g``)."""
        return self._grads

    @property
    def dtype(self):
        return self._flat.dtype

    @property
    def size(self):
        return int(self._flat.shape[0])

    @property
    def shapes(self):
        return dict(self._shapes)

    @property
    def offsets(self):
        """Mapping name -> (start, stop) element offsets in ``flat``."""
        return dict(self._offsets)

    @property
    def names(self):
        return list(self._views)

    def zero_grad(self):
        """Set every gradient to zero (one fill of the gradient buffer)."""
        if hasattr(self._grad_flat, "fill"):
            self._grad_flat.fill(0)
        else:  # an adopted torch CUDA tensor
            self._grad_flat.zero_()

    def to_dict(self):
        """Copies of the parameters, name -> array."""
        return {name: v.copy() for name, v in self._views.items()}


def _array_module(device):
    """(array module, CUDA device ordinal or None) for ``device``; the CuPy kernels must be able
    to run there."""
    xp, index = arrays.array_module(device, "ParamSet")
    if xp is not np:
        from .kernels import cupy as cupy_kernels

        ok, why = cupy_kernels.available()
        if not ok:
            raise RuntimeError(f"ParamSet(device={device!r}) needs a CUDA device: {why}")
    return xp, index


def _as_host_or_device_array(a, name, xp):
    if isinstance(a, np.ndarray):
        pass
    elif hasattr(a, "shape") and hasattr(a, "dtype"):
        try:
            kind = arrays.array_kind(a)
        except TypeError:
            kind = None
        if kind is not None and xp is np:
            a = arrays.to_host(a)  # a device array copied to the host; torch CPU: a view
        elif kind is not None and type(a).__module__.partition(".")[0] == "torch":
            a = a.detach()  # torch CUDA tensors refuse __cuda_array_interface__ otherwise
    a = np.asarray(a) if xp is np else xp.asarray(a)
    if arrays.storage_name(a.dtype) is None and a.dtype.kind != "f":
        raise TypeError(
            f"parameter {name!r} has dtype {a.dtype}; parameters must be floating point"
        )
    return a


def _adopted_buffers(flat, grad_flat):
    """(flat, grad_flat, device) of :meth:`ParamSet.from_buffers`, checked: host buffers as NumPy
    views, device buffers as given."""
    kinds = [arrays.array_kind(a) for a in (flat, grad_flat)]  # TypeError for non-arrays
    on_device = [arrays.is_device_kind(k) for k in kinds]
    if on_device[0] != on_device[1]:
        raise ValueError(
            f"flat is {arrays.describe(flat, kinds[0])}, grad_flat "
            f"{arrays.describe(grad_flat, kinds[1])}: both must be in host memory or on one device"
        )
    if on_device[0]:
        index = [arrays.device_index(a, k) for a, k in zip((flat, grad_flat), kinds)]
        if index[0] != index[1]:
            raise ValueError(f"flat is on cuda:{index[0]}, grad_flat on cuda:{index[1]}")
        device = "cuda" if index[0] is None else f"cuda:{index[0]}"
        flat, grad_flat = arrays.detached(flat), arrays.detached(grad_flat)
    else:
        device = "cpu"
        flat, grad_flat = arrays.host_view(flat), arrays.host_view(grad_flat)
    for label, a in (("flat", flat), ("grad_flat", grad_flat)):
        if len(a.shape) != 1:
            raise ValueError(f"{label} must be 1-D, got shape {tuple(a.shape)}")
        if device == "cpu":  # device buffers are checked when an optimizer takes them
            arrays.check_storage_dtype(a.dtype, label)
            arrays.check_contiguous(a.flags.c_contiguous, label)
            arrays.check_writable(a.flags.writeable, label)
    if flat.shape != grad_flat.shape or str(flat.dtype) != str(grad_flat.dtype):
        raise ValueError(
            f"flat ({flat.dtype}, {tuple(flat.shape)}) and grad_flat ({grad_flat.dtype}, "
            f"{tuple(grad_flat.shape)}) must have the same dtype and size"
        )
    return flat, grad_flat, device


def _storage_dtype(dtype, xp):
    """The ParamSet's dtype: TypeError unless it is a storage dtype the arrays of ``xp`` hold
    (CuPy has no bfloat16)."""
    try:
        dtype = arrays.storage_dtype(dtype, "ParamSet dtype")
    except ValueError as exc:
        raise TypeError(str(exc)) from None
    if xp is not np and arrays.storage_name(dtype) == "bfloat16":
        raise TypeError("ParamSet dtype bfloat16 is host-only: CuPy arrays cannot hold bfloat16")
    return dtype
