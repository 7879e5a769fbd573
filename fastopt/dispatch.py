"""Backend registry: picks the kernel backend from the arrays an update touches.

A backend applies a named rule of ``kernels/rules.py`` to flat 1-D arrays in place. Which one runs
is decided by the kind of array (:func:`fastopt.arrays.array_kind`), unless the caller names a backend:

============  =============================================  ==========================
kind          arrays                                          default backend (others)
============  =============================================  ==========================
``numpy``     ``numpy.ndarray``                               ``numba-cpu`` (``numpy``)
``torch-cpu`` torch CPU tensors (a zero-copy NumPy view is     ``numba-cpu`` (``numpy``)
              updated, so the tensor changes in place)
``cupy``      ``cupy.ndarray``                                ``cupy`` (``numba-cuda``)
``cuda``      anything else on a CUDA device: objects with    ``numba-cuda`` (``cupy``)
              ``__cuda_array_interface__`` (torch CUDA
              tensors, numba device arrays, JAX arrays) or a
              DLPack ``__dlpack_device__`` of kDLCUDA (2)
============  =============================================  ==========================

``backend="numpy"`` forces the NumPy reference (the spec, for checking). Device arrays are viewed
zero-copy and updated in place. Nothing here imports CuPy, numba.cuda or torch at import time:
kinds are told apart by duck typing and module names, and the GPU backends import their
libraries when first built, so ``import fastopt`` and every CPU path work on machines without
them. The optimizer classes never name a backend.
"""

import numpy as np

from . import arrays, reference


class Backend:
    """One way of running the update rules. Subclasses set ``name`` and implement the methods.

    Arrays handed to ``update``, ``sumsq_and_finite``, ``fill``, ``to_numpy`` are the backend's
    native flat arrays (what :meth:`native` and :meth:`flat` return: NumPy arrays for the CPU
    backends, ``cupy.ndarray`` for ``cupy``, numba device arrays for ``numba-cuda``).

    ``update`` only launches work: on a GPU it is asynchronous and never synchronises.
    ``sumsq_and_finite`` returns host Python values, so on a GPU it waits for its own two
    kernels (a device-to-host copy of two numbers, synchronising the launch stream alone): the
    optimizers call it only when asked for gradient clipping by norm (``max_grad_norm``) or
    non-finite skipping (``skip_nonfinite``).

    ``stream``: the ``cudaStream_t`` handle (an int, see :mod:`fastopt.streams`) the GPU
    backends launch on; None for the backend's default (numba-cuda: the legacy default stream;
    CuPy: its current stream). The CPU backends ignore it. Launches go to the arrays' device.
    """

    name = ""
    array_kind = ""
    """The kind of array this backend updates by default (see :func:`fastopt.arrays.array_kind`)."""
    kinds = ()
    """Every kind it accepts (``array_kind`` first); empty means ``(array_kind,)``."""
    storage_names = ("float32", "float64")
    """Storage dtypes it updates (``fastopt.arrays.STORAGE_NAMES``)."""
    mixed_storage = False
    """Whether it runs ``update_storage``: 16-bit arrays, gradients or state in another dtype
    than the parameter, float32 master weights, stochastic rounding."""

    def available(self):
        """(bool, reason): whether it can run here, and why not."""
        return True, ""

    def update(self, rule, p, g, states, h, gs, spec, stream=None):
        """Apply ``rule`` in place to flat arrays; ``states`` in the rule's slot order, ``h`` its
        scalars and ``gs`` = (gradient scale, clip value or 0), cast to the parameter dtype.
        ``spec`` = (optimizer, group, state, lr, step), for backends that work from the
        hyperparameters instead (the reference)."""
        raise NotImplementedError

    def update_storage(self, rule, storage, p, g, states, master, h, gs, rs, stream=None):
        """``update`` for arrays stored as ``storage`` (a ``kernels.access.Storage``) says:
        ``master`` the float32 master copy of ``p`` or None, ``h``/``gs`` cast to the compute
        dtype, ``rs`` = (seed, step, index of ``p[0]`` among the optimizer's parameters) for
        stochastic rounding. Only backends with ``mixed_storage``."""
        raise NotImplementedError

    def convert(self, dst, src, rs=None, word=0, stream=None):
        """``dst[...] = src`` for flat native arrays of equal size and storage dtypes (float32,
        float64, bfloat16, float16): exact where ``dst`` holds ``src``'s values, else rounded as
        the storage kernels round: to nearest even, or with ``rs`` = (seed, step, index of
        ``src[0]`` among the optimizer's parameters) stochastically with word ``word`` of each
        element's random bits (0 the parameter, 1 + j state slot j). Only backends with
        ``mixed_storage``; the staging of ``fastopt/optim/staging.py`` runs on it."""
        raise NotImplementedError

    def dequantize(self, slot, out, stream=None):
        """``out[...]`` = the float32 values of 8-bit slot ``slot`` (``qmap[code] * absmax``)."""
        raise NotImplementedError

    def quantize(self, slot, values, stream=None):
        """Store float32 ``values`` into 8-bit slot ``slot`` as the block kernels requantize."""
        raise NotImplementedError

    def sumsq_and_finite(self, g, stream=None):
        """(sum of squares in float64, every element finite?) of a flat array, deterministic.
        Host values: on a GPU this synchronises (see the class docstring)."""
        raise NotImplementedError

    def scalar_type(self, dtype):
        """The constructor that casts host float64 scalars to the compute dtype of parameters of
        ``dtype`` (float64 for float64, float32 for everything else)."""
        return float if dtype == np.float64 else np.float32

    def zeros(self, n, dtype, like=None, stream=None):
        """A zeroed flat state array on this backend's device (``like``'s device when given)."""
        from .memory import aligned_zeros

        return aligned_zeros(n, dtype)

    def fill(self, a, value, stream=None):
        """Set every element of a native array to ``value``."""
        a.fill(value)

    def add(self, dst, src, stream=None):
        """``dst += src`` for native flat arrays of one dtype (gradient accumulation)."""
        dst += src

    def scale(self, a, factor, stream=None):
        """``a *= factor`` in place (``factor`` cast to ``a``'s dtype, as torch's ``mul_``)."""
        a *= a.dtype.type(factor)

    def clamp(self, a, limit, stream=None):
        """Clip every element of ``a`` to [-limit, limit] in place (NaN stays NaN)."""
        np.clip(a, -limit, limit, out=a)

    def device_of(self, a):
        """The CUDA device ordinal of a native array (None for host memory or when unknown)."""
        return None

    def to_numpy(self, a, stream=None):
        """A NumPy copy of a native array; on a GPU read on ``stream`` (a handle; None the
        backend's default), which it synchronises."""
        return np.array(a, copy=True)

    def copy(self, dst, src, stream=None):
        """``dst[...] = src`` for native flat arrays of this backend, of equal size and storage
        dtypes: exact for equal dtypes (the bits), else as :meth:`convert` rounds (to nearest
        even). On a GPU a device-to-device copy or one conversion kernel on ``stream`` (a
        handle, as for :meth:`update`), asynchronous, never through the host nor a kernel the
        array library compiles for the dtype (numba cannot type bfloat16)."""
        dst[...] = src

    def clone(self, a, stream=None):
        """A new native flat array holding ``a``'s values (bits), on ``a``'s device, made on
        ``stream`` (:meth:`copy`; device arrays need not have ``copy()``)."""
        out = self.zeros(a.size, a.dtype, like=a, stream=stream)
        self.copy(out, a, stream)
        return out

    def assign(self, dst, src, stream=None):
        """Copy ``src`` (NumPy or a device array, any float dtype, same size) into native ``dst``.
        On a GPU backend the copy is ordered on ``stream`` (a handle, as for :meth:`update`;
        None the backend's default): a host source is uploaded on it, a device source copied
        device to device on it (CuPy: a casting copy; numba-cuda, given a stream: a copy, or
        :meth:`convert` where the storage dtypes differ, else through the host as for a
        checkpoint load). A step passes its stream (the master copy of its first step)."""
        dst[...] = arrays.to_host(src).reshape(dst.shape)

    # -- arrays of the kinds the backend accepts
    def native(self, a):
        """A zero-copy view of ``a`` as this backend's native array type (same shape)."""
        return arrays.host_view(a)

    def flat(self, a):
        """A flat 1-D view of a contiguous native array."""
        return a if a.ndim == 1 else a.reshape(a.size)

    def is_c_contiguous(self, a):
        return bool(a.flags.c_contiguous)


class NumbaCPU(Backend):
    name = "numba-cpu"
    array_kind = "numpy"
    kinds = ("numpy", "torch-cpu")
    storage_names = arrays.STORAGE_NAMES
    mixed_storage = True

    def __init__(self):
        from .kernels import cpu, cpu_storage

        self._apply = cpu.apply
        self._sumsq = cpu.sumsq_and_finite
        self._storage = cpu_storage

    def update(self, rule, p, g, states, h, gs, spec, stream=None):
        self._apply(rule, p, g, states, h, gs)

    def update_storage(self, rule, storage, p, g, states, master, h, gs, rs, stream=None):
        self._storage.apply(rule, storage, p, g, states, master, h, gs, rs)

    def convert(self, dst, src, rs=None, word=0, stream=None):
        self._storage.convert(dst, src, rs, word)

    def dequantize(self, slot, out, stream=None):
        from .kernels import block_loops

        block_loops.dequantize_into(slot, out)

    def quantize(self, slot, values, stream=None):
        from .kernels import block_loops

        block_loops.quantize_from(slot, values)

    def sumsq_and_finite(self, g, stream=None):
        if g.dtype.itemsize == 2:
            return self._storage.sumsq_and_finite(g)
        return self._sumsq(g)


class NumPyReference(Backend):
    """The whole-array NumPy reference of ``fastopt/reference.py``: slow, readable, independent."""

    name = "numpy"
    array_kind = "numpy"
    kinds = ("numpy", "torch-cpu")

    def update(self, rule, p, g, states, h, gs, spec, stream=None):
        optimizer, group, state, lr, step = spec
        g = reference.transformed_grad(g, gs[0], gs[1])
        # The reference advances scalar state (NAdam's mu_product) itself; the optimizer owns the
        # committed value, so hand it a shallow copy.
        rule_fn = getattr(reference, optimizer.algorithm)
        rule_fn(p, g, dict(state), step=step, **optimizer.hyperparameters(group, lr))

    def sumsq_and_finite(self, g, stream=None):
        g64 = g.astype(np.float64)
        return float(np.dot(g64, g64)), bool(np.isfinite(g).all())


class CuPyBackend(Backend):
    """The CUDA C rules (``kernels/rules.cuh``) as CuPy raw kernels: bit-identical to the Numba
    CPU kernels (explicitly rounded IEEE operations). Launches on ``stream`` (a handle: CuPy's
    current stream when None), on the arrays' device. Other CUDA arrays (torch CUDA tensors,
    ...) are viewed as CuPy arrays, zero-copy.

    16-bit and mixed storage run the storage kernels of ``kernels/optim_kernels.cu`` over
    ``uint16`` views of the bits. float16 is a CuPy dtype; bfloat16 arrays need CuPy >= 14 with
    ml_dtypes (``ml_dtypes.bfloat16`` CuPy arrays): a torch bfloat16 tensor is viewed through
    ``t.view(torch.int16)`` and then as bfloat16, a TypeError naming the way out where CuPy
    cannot (the numba-cuda backend takes bfloat16 with any CuPy)."""

    name = "cupy"
    array_kind = "cupy"
    kinds = ("cupy", "cuda")
    storage_names = arrays.STORAGE_NAMES
    mixed_storage = True

    def __init__(self):
        from .kernels import cupy as kernels

        self._kernels = kernels
        self._cupy = None

    def _cp(self):
        if self._cupy is None:
            import cupy

            self._cupy = cupy
        return self._cupy

    def available(self):
        return self._kernels.available()

    def update(self, rule, p, g, states, h, gs, spec, stream=None):
        self._kernels.apply(rule, p, g, states, h, gs, stream, check=False)

    def update_storage(self, rule, storage, p, g, states, master, h, gs, rs, stream=None):
        self._kernels.apply_storage(rule, storage, p, g, states, master, h, gs, rs, stream)

    def convert(self, dst, src, rs=None, word=0, stream=None):
        self._kernels.convert(dst, src, rs, word, stream)

    def dequantize(self, slot, out, stream=None):
        from .kernels import block_cupy

        block_cupy.dequantize_into(slot, out, stream)

    def quantize(self, slot, values, stream=None):
        from .kernels import block_cupy

        block_cupy.quantize_from(slot, values, stream)

    def sumsq_and_finite(self, g, stream=None):
        return self._kernels.sumsq_and_finite(g, stream)

    def _on(self, a, stream):
        """Context for CuPy operations on ``a``: its device and ``stream`` (None: the current)."""
        import contextlib

        cupy = self._cp()
        ctx = contextlib.ExitStack()
        ctx.enter_context(cupy.cuda.Device(a.data.device_id))
        s = self._kernels.as_stream(stream, a.data.device_id)
        if s is not None:
            ctx.enter_context(s)
        return ctx

    def zeros(self, n, dtype, like=None, stream=None):
        from .memory import aligned_zeros

        cupy = self._cp()
        if like is not None and isinstance(like, cupy.ndarray):
            with self._on(like, stream):
                return aligned_zeros(n, dtype, cupy)
        s = self._kernels.as_stream(stream, cupy.cuda.runtime.getDevice())
        if s is None:
            return aligned_zeros(n, dtype, cupy)
        with s:  # the zero-fill on ``stream``, on the current device
            return aligned_zeros(n, dtype, cupy)

    def fill(self, a, value, stream=None):
        with self._on(a, stream):
            a.fill(value)

    def add(self, dst, src, stream=None):
        if dst.dtype == src.dtype and dst.dtype.itemsize != 2:
            with self._on(dst, stream):
                dst += src
            return
        # 16-bit or mixed: the float32 sum rounded once, as NumbaCUDA.add (the SGD rule, lr -1)
        from .kernels.access import Storage

        d, s = arrays.storage_name(dst.dtype), arrays.storage_name(src.dtype)
        st = self.scalar_type(dst.dtype)
        h, gs = (st(-1.0), st(0.0), st(1.0)), (st(1.0), st(0.0))
        storage = Storage(d, s, d, False, False)
        self.update_storage("sgd", storage, dst, src, [], None, h, gs, (0, 0, 0), stream)

    def scale(self, a, factor, stream=None):
        with self._on(a, stream):
            a *= a.dtype.type(factor)

    def clamp(self, a, limit, stream=None):
        with self._on(a, stream):
            self._cp().clip(a, -limit, limit, out=a)

    def device_of(self, a):
        return int(a.data.device_id)

    def to_numpy(self, a, stream=None):
        cupy = self._cp()
        if stream is None:
            return cupy.asnumpy(a)
        with self._on(a, stream):  # read on ``stream`` (asnumpy waits for it)
            return cupy.asnumpy(a, stream=cupy.cuda.get_current_stream())

    def copy(self, dst, src, stream=None):
        if _converts(dst, src):
            self.convert(dst, src, stream=stream)
            return
        with self._on(dst, stream):  # the bits, device to device, on ``stream``
            if dst.dtype.itemsize == 2:
                dst.view(np.uint16)[...] = src.view(np.uint16)
            else:
                dst[...] = src

    def assign(self, dst, src, stream=None):
        if isinstance(src, np.ndarray):
            with self._on(dst, stream):  # the upload on ``stream`` (None: CuPy's current)
                dst.set(np.ascontiguousarray(src.reshape(dst.shape), dtype=dst.dtype))
            return
        kind = arrays.array_kind(src)
        if kind in arrays.HOST_KINDS:
            self.assign(dst, arrays.host_view(src), stream)
            return
        with self._on(dst, stream):  # device to device, casting, on ``stream``
            dst[...] = self.native(src).reshape(dst.shape)

    def native(self, a):
        cupy = self._cp()
        if isinstance(a, cupy.ndarray):
            return a
        a = arrays.detached(a)
        device = arrays.device_index(a)
        if arrays.root_module(a) == "torch" and str(a.dtype) == "torch.bfloat16":
            import torch

            with arrays.on_device(cupy, device):
                bits = cupy.asarray(a.view(torch.int16))
            try:
                return bits.view(arrays.bfloat16())
            except Exception as exc:
                raise TypeError(
                    f"this CuPy ({getattr(cupy, '__version__', '?')}) cannot hold bfloat16 "
                    f"arrays ({type(exc).__name__}: {exc}); CuPy >= 14 with ml_dtypes can, or "
                    "use backend='numba-cuda'"
                ) from exc
        with arrays.on_device(cupy, device):
            if hasattr(a, "__cuda_array_interface__"):
                return cupy.asarray(a)  # zero-copy view
            return cupy.from_dlpack(a)


class NumbaCUDA(Backend):
    """The rules of ``kernels/rules.py`` as ``numba.cuda`` kernels (``kernels/cuda.py``; 16-bit
    and mixed storage through ``kernels/cuda_storage.py``, which hands 8-bit blockwise state to
    ``kernels/block_cuda.py``). Launches on ``stream`` (a handle;
    the legacy default stream when None) and on the arrays' device; CUDA arrays are viewed as
    numba device arrays, zero-copy, in their device's context, without synchronising the stream
    they name (the optimizers launch on it instead).

    bfloat16: numba has no bfloat16 type, so a bfloat16 array is a numba device array of dtype
    ``ml_dtypes.bfloat16`` (it is never typed in a kernel: the kernels take ``uint16`` views).
    A torch bfloat16 tensor is viewed through ``t.view(torch.int16)`` (its own
    ``__cuda_array_interface__`` says ``<V2`` in recent torch and refuses bfloat16 in older
    releases); a CuPy bfloat16 array (CuPy >= 14 with ml_dtypes) keeps its dtype."""

    name = "numba-cuda"
    array_kind = "cuda"
    kinds = ("cuda", "cupy")
    storage_names = arrays.STORAGE_NAMES
    mixed_storage = True

    def __init__(self):
        from .kernels import cuda as kernels
        from .kernels import cuda_launch, cuda_storage

        self._kernels = kernels
        self._launch = cuda_launch
        self._storage = cuda_storage

    def available(self):
        return self._kernels.available()

    def update(self, rule, p, g, states, h, gs, spec, stream=None):
        self._kernels.apply(rule, p, g, states, h, gs, stream)

    def update_storage(self, rule, storage, p, g, states, master, h, gs, rs, stream=None):
        self._storage.apply(rule, storage, p, g, states, master, h, gs, rs, stream)

    def convert(self, dst, src, rs=None, word=0, stream=None):
        self._storage.convert(dst, src, rs, word, stream)

    def dequantize(self, slot, out, stream=None):
        from .kernels import block_cuda

        block_cuda.dequantize_into(slot, out, stream)

    def quantize(self, slot, values, stream=None):
        from .kernels import block_cuda

        block_cuda.quantize_from(slot, values, stream)

    def sumsq_and_finite(self, g, stream=None):
        if g.dtype.itemsize == 2:
            return self._storage.sumsq_and_finite(g, stream)
        return self._kernels.sumsq_and_finite(g, stream)

    def zeros(self, n, dtype, like=None, stream=None):
        device = None if like is None else self.device_of(like)
        if np.dtype(dtype).itemsize == 2:
            return self._storage.zeros(n, dtype, stream, device)
        return self._kernels.zeros(n, dtype, stream, device)

    def fill(self, a, value, stream=None):
        if a.dtype.itemsize == 2:
            self._storage.fill(a, value, stream)
        else:
            self._kernels.fill(a, value, stream)

    def add(self, dst, src, stream=None):
        # numba device arrays have no in-place arithmetic: the SGD rule with lr = -1 is
        # dst - (-1) * src = dst + src exactly (rounded once to dst's dtype), one kernel launch
        st = self.scalar_type(dst.dtype)
        h, gs = (st(-1.0), st(0.0), st(1.0)), (st(1.0), st(0.0))
        if dst.dtype == src.dtype and dst.dtype.itemsize != 2:
            self.update("sgd", dst, src, [], h, gs, None, stream)
            return
        from .kernels.access import Storage

        d, s = arrays.storage_name(dst.dtype), arrays.storage_name(src.dtype)
        storage = Storage(d, s, d, False, False)
        self.update_storage("sgd", storage, dst, src, [], None, h, gs, (0, 0, 0), stream)

    def scale(self, a, factor, stream=None):
        if a.dtype.itemsize == 2:
            self._storage.transform(a, factor, 0.0, stream)
        else:
            self._kernels.transform(a, factor, 0.0, stream)

    def clamp(self, a, limit, stream=None):
        if a.dtype.itemsize == 2:
            self._storage.transform(a, 1.0, limit, stream)
        else:
            self._kernels.transform(a, 1.0, limit, stream)

    def device_of(self, a):
        return self._launch.device_of(a)

    def to_numpy(self, a, stream=None):
        if not stream:
            return a.copy_to_host()
        launch = self._launch
        device = self.device_of(a)
        with launch.on_device(device):
            s = launch.as_stream(launch._cuda(), stream, device)
            host = a.copy_to_host(stream=s)
            s.synchronize()  # this stream alone
        return host

    def copy(self, dst, src, stream=None):
        if _converts(dst, src):
            self.convert(dst, src, stream=stream)
            return
        launch = self._launch
        device = self.device_of(dst)
        if dst.dtype.itemsize == 2:  # numba cannot type bfloat16: copy the bits
            dst, src = dst.view(np.uint16), src.view(np.uint16)
        with launch.on_device(device):  # device to device (cudaMemcpyAsync) on ``stream``
            dst.copy_to_device(src, stream=launch.as_stream(launch._cuda(), stream, device))

    def assign(self, dst, src, stream=None):
        launch = self._launch
        cuda = launch._cuda()
        device = self.device_of(dst)
        if stream is not None and arrays.is_device_array(src):
            # a step's first-step copy (the float32 master of a 16-bit parameter): on the
            # device, ordered on the step's stream after the zero-fill there, before the update
            d = self.native(src)
            if self.is_c_contiguous(d) and _converts(dst, d):
                self.convert(dst, self.flat(d), stream=stream)
                return
            if self.is_c_contiguous(d) and d.dtype == dst.dtype:
                with launch.on_device(device):
                    dst.copy_to_device(self.flat(d), stream=launch.as_stream(cuda, stream, device))
                return
        # a checkpoint load (or arrays that name no stream): a host round trip keeps this
        # simple; the upload on ``stream`` (None: the legacy default stream)
        host = np.ascontiguousarray(arrays.to_host(src).reshape(dst.shape), dtype=dst.dtype)
        with launch.on_device(device):
            dst.copy_to_device(host, stream=launch.as_stream(cuda, stream, device))

    def native(self, a):
        a = arrays.detached(a)
        bf16 = arrays.root_module(a) == "torch" and str(a.dtype) == "torch.bfloat16"
        if bf16:
            import torch

            a = a.view(torch.int16)
        d = self._kernels.as_device_array(a, arrays.device_index(a))
        src = getattr(a, "dtype", None)  # a CuPy bfloat16 array exports "<V2" too
        if bf16 or (isinstance(src, np.dtype) and src.name == "bfloat16" and d.dtype != src):
            d = d.view(arrays.bfloat16())
        return d

    def is_c_contiguous(self, a):
        return bool(a.is_c_contiguous())


def _converts(dst, src):
    """Whether ``dst[...] = src`` is a conversion between two storage dtypes (float32, float64,
    bfloat16, float16): the backends' ``convert`` kernel does it, on the given stream."""
    a, b = arrays.storage_name(dst.dtype), arrays.storage_name(src.dtype)
    return a is not None and b is not None and a != b


_FACTORIES = {
    "numba-cpu": NumbaCPU,
    "numpy": NumPyReference,
    "cupy": CuPyBackend,
    "numba-cuda": NumbaCUDA,
}
_DEFAULT_FOR_KIND = {
    "numpy": "numba-cpu",
    "torch-cpu": "numba-cpu",
    "cupy": "cupy",
    "cuda": "numba-cuda",
}
_INSTANCES = {}


def get_backend(name):
    """The backend called ``name``; ValueError for unknown names, RuntimeError if unavailable."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(_FACTORIES)}")
    backend = _INSTANCES.get(name)
    if backend is None:
        try:
            backend = _FACTORIES[name]()
            ok, why = backend.available()
        except Exception as exc:  # a broken optional dependency
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {why}")
        _INSTANCES[name] = backend
    return backend


def _kinds_of(factory_or_backend):
    kinds = getattr(factory_or_backend, "kinds", ()) or ()
    primary = getattr(factory_or_backend, "array_kind", "")
    return tuple(kinds) or ((primary,) if primary else ())


def backend_for_kind(kind, name=None):
    """The backend for arrays of ``kind``: ``name`` if given (checked to accept that kind), else
    the kind's default. ValueError for a backend that does not take the kind, RuntimeError
    naming why for one that cannot run here."""
    if name is None:
        name = _DEFAULT_FOR_KIND.get(kind)
        if name is None:
            raise TypeError(f"no backend handles {kind} arrays")
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(_FACTORIES)}")
    kinds = _kinds_of(_FACTORIES[name])
    if kinds and kind not in kinds:
        raise ValueError(
            f"backend {name!r} updates {' or '.join(kinds)} arrays, got {arrays.DESCRIPTIONS.get(kind, kind)}"
        )
    backend = get_backend(name)
    if not kinds and kind not in _kinds_of(backend):
        raise ValueError(f"backend {name!r} updates {backend.array_kind} arrays, got {kind} arrays")
    return backend


def backend_for(group, name=None):
    """The backend for a group of arrays that must all live on one device with one dtype.

    NumPy arrays and torch CPU tensors mix (both host memory); otherwise every array must be of
    one kind, and device arrays on one device: ValueError naming the first two that differ."""
    group = list(group)
    if not group:
        raise ValueError("backend_for needs at least one array")
    kinds = [arrays.array_kind(a) for a in group]
    kind0 = kinds[0]
    for a, k in zip(group, kinds):
        if k != kind0 and not (k in arrays.HOST_KINDS and kind0 in arrays.HOST_KINDS):
            raise ValueError(
                f"arrays live on different devices/libraries: {arrays.describe(group[0], kind0)} and "
                f"{arrays.describe(a, k)}; parameters, gradients and state must live on one device"
            )
    if kind0 not in arrays.HOST_KINDS:
        devs = [(a, arrays.device_index(a, k)) for a, k in zip(group, kinds)]
        known = [(a, d) for a, d in devs if d is not None]
        for a, d in known[1:]:
            if d != known[0][1]:
                raise ValueError(
                    f"arrays live on different devices/libraries: {arrays.describe(known[0][0])} and "
                    f"{arrays.describe(a)}"
                )
    kind = "numpy" if "numpy" in kinds else kind0
    return backend_for_kind(kind, name)


def backends():
    """[(name, available, reason)] for every registered backend (``reason`` says what the
    backend runs on when available, why not otherwise). Never raises."""
    out = []
    for name, factory in _FACTORIES.items():
        try:
            ok, why = factory().available()
            ok, why = bool(ok), str(why)
        except Exception as exc:  # a broken optional dependency must not break the listing
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if ok and not why:
            why = {"numba-cpu": "Numba CPU kernels", "numpy": "NumPy reference"}.get(name, "")
        out.append((name, ok, why))
    return out
