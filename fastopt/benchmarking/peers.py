"""What a case is timed against, built over the same arrays as fastopt's step: the roofline
kernel (on a GPU a device-to-device copy of the same bytes), the naive NumPy update, torch.optim
with ``foreach=True`` and ``fused=True`` (CPU tensors, or CUDA tensors over the same device
memory), and, for the many-parameter layout, fastopt over one parameter and over a plain list.

:func:`build_cpu` and :func:`build_gpu` return everything :func:`fastopt.benchmarking.run_case`
times; a combination that cannot run here raises :class:`Unavailable` with the reason.
"""

import numpy as np

from .. import arrays
from ..optim.precision import MASTER
from ..optim.segmented import SegmentedOptimizer
from ..paramset import ParamSet
from . import roofline
from .settings import CPU_BACKEND, env_many
from .timing import CudaEventTimer, PerfCounterTimer


def import_torch():
    """The torch module, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


class Unavailable(Exception):
    """A (backend, case) combination that cannot run here; the message says why."""


def _state_arrays(opt, size):
    """The per-element state arrays (``size`` elements each: the unit's parameter's) of an
    optimizer's only unit (after its first step), without the float32 master copy of 16-bit
    parameters (see :func:`_master_array`) and arrays of another size: empty ones (Adafactor's
    row factors of a vector) and one value per tensor (NovoGrad's second moments)."""
    (state,) = opt.state.values()
    return [
        a
        for k, a in state.items()
        if k != MASTER and len(getattr(a, "shape", ())) >= 1 and a.size == size
    ]


def _master_array(opt):
    """The float32 master copy of the first unit's parameter, or None without master weights."""
    (state,) = opt.state.values()
    return state.get(MASTER)


def _state_bytes(states, master=None):
    """Bytes of optimizer state per parameter element (the master copy included)."""
    return sum(a.dtype.itemsize for a in states) + (0 if master is None else master.dtype.itemsize)


def _is_16bit(dtype):
    return arrays.storage_name(dtype) in ("bfloat16", "float16")


def _naive_numpy_step(case, params, grads):
    """Whole-array NumPy updates with fastopt.reference, looping over the parameters in Python."""
    import inspect

    from .. import reference

    cls = case.optimizer_class
    fn = getattr(reference, cls.algorithm)
    if issubclass(cls, SegmentedOptimizer):
        # reference.lamb, .lars, .novograd take the tensors' segments and masks: the optimizer's
        # own reference backend passes them (one segment per array here)
        opt = cls(list(params), backend="numpy", **case.kwargs)
        grads = list(grads)
        return lambda: opt.step(grads)
    if getattr(cls, "matrices_only", False):
        # Muon has no reference backend (reference.muon takes one matrix): its hyperparameters
        # from an unstepped optimizer, its momentum buffers zero as torch's
        group = cls(list(params), **case.kwargs).param_groups[0]
        hyper = {k: group[k] for k in inspect.signature(fn).parameters if k in group}
        states = [{"momentum_buffer": np.zeros_like(p)} for p in params]
        counter = [0]
    else:
        # A reference-backend optimizer only to build torch-default hyperparameters and state.
        init = cls(list(params), backend="numpy", **case.kwargs)
        init.step(list(grads))
        group = init.param_groups[0]
        hyper = {k: group[k] for k in init.defaults}
        states = [dict(init.state[i]) for i in range(len(params))]
        counter = [states[0]["step"]]
    work = list(zip(params, grads, states, strict=True))

    def step():
        counter[0] += 1
        t = counter[0]
        for p, g, s in work:
            fn(p, g, s, step=t, **hyper)

    return step


def _as_torch(torch, a, copy):
    """A torch tensor over ``a`` (NumPy: CPU tensor; CuPy/numba device array: CUDA tensor). A
    NumPy ``ml_dtypes.bfloat16`` array becomes a ``torch.bfloat16`` tensor over the same bits."""
    if isinstance(a, np.ndarray):
        a = np.array(a) if copy else a
        if arrays.storage_name(a.dtype) == "bfloat16":
            return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    t = torch.as_tensor(a, device="cuda")  # __cuda_array_interface__: zero-copy
    return t.clone() if copy else t


def _torch_step(case, params, grads, variant, *, share, device="cpu"):
    """(step, None) or (None, reason): torch.optim.<Algo>(<variant>=True) over the arrays
    (``variant`` "": the class without flags)."""
    torch = import_torch()
    if torch is None:
        return None, "torch is not installed"
    if case.torch_name is None:
        return None, f"torch.optim has no {case.algorithm}"
    cls = getattr(torch.optim, case.torch_class, None)
    if cls is None:
        return None, f"torch {torch.__version__} has no torch.optim.{case.torch_class}"
    if device != "cpu":
        try:
            ok = torch.cuda.is_available()
        except Exception:  # a broken CUDA install
            ok = False
        if not ok:
            return None, f"torch {torch.__version__} has no CUDA device"
    try:
        tensors = [_as_torch(torch, p, copy=not share) for p in params]
        tgrads = [_as_torch(torch, g, copy=not share) for g in grads]
    except Exception as exc:
        return None, f"cannot hand the arrays to torch: {type(exc).__name__}: {exc}"
    for t, g in zip(tensors, tgrads, strict=True):
        t.grad = g
    try:
        opt = cls(tensors, **case.kwargs, **({variant: True} if variant else {}))
        opt.step()
    except (TypeError, RuntimeError, ValueError) as exc:
        msg = str(exc).splitlines()[0][:160] if str(exc) else ""
        return None, (
            f"torch.optim.{case.torch_class}({f'{variant}=True' if variant else ''}) unavailable "
            f"(torch {torch.__version__}): {type(exc).__name__}: {msg}"
        )
    return opt.step, None


def _layout(case, n, many):
    """(count, size) of the case's parameters."""
    if case.layout == "many":
        return many if many is not None else env_many()
    return 1, (case.n if case.n is not None else n)


def _check_slots(case, states):
    """AssertionError unless the optimizer keeps as many state arrays as the case declares."""
    if len(states) != case.state_slots:
        raise AssertionError(
            f"case {case.name}: {case.algorithm}({case.kwargs}) keeps {len(states)} state arrays, "
            f"the case says {case.state_slots}: fix the case's state_slots (and bytes/element)"
        )


def build_cpu(case, n, dtype, seed, many=None):
    """CPU: (elements, params, fastopt step, peer steps, skipped peers, keep-alive, timer,
    {bytes_per_element, state_bytes_per_element}). ``dtype`` may be a 16-bit storage dtype: the optimizer keeps its state in it
    (as torch does), the roofline moves the same bytes, torch gets the same 16-bit tensors and
    the NumPy peer is skipped."""
    rng = np.random.default_rng(seed)
    cls = case.optimizer_class
    if case.layout == "matrices":
        count, shapes = len(case.shapes), case.shapes
    else:
        count, size = _layout(case, n, many)
        shapes = [(size,)] * count
    ps = ParamSet({f"p{i}": np.zeros(s, dtype) for i, s in enumerate(shapes)}, dtype=dtype)
    ps.flat[...] = rng.standard_normal(ps.size, dtype=np.float32)
    ps.grad_flat[...] = rng.standard_normal(ps.size, dtype=np.float32)
    try:
        opt = cls(ps, backend=CPU_BACKEND, **case.kwargs)
        opt.step()  # compile (or load from the disk cache) and allocate the state
    except Exception as exc:
        if not _is_16bit(ps.dtype):
            raise
        msg = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise Unavailable(
            f"fastopt's {case.algorithm} cannot step {arrays.storage_name(ps.dtype)} parameters "
            f"on the CPU: {type(exc).__name__}: {msg}"
        ) from None
    states = _state_arrays(opt, ps.size)
    _check_slots(case, states)
    peers, skipped, keep = {}, {}, [ps, opt]
    master = _master_array(opt)
    peers["roofline"] = roofline.roofline_step(ps.grad_flat, ps.flat, states, master)
    traffic = {
        "bytes_per_element": roofline.traffic(ps.grad_flat, ps.flat, states, master),
        "state_bytes_per_element": _state_bytes(states, master),
    }

    if case.layout == "many":
        params = [ps[name] for name in ps.names]
        grads = [ps.grads[name] for name in ps.names]
        sep_params = [np.array(p) for p in params]
        sep_grads = [np.array(g) for g in grads]
        single = ParamSet({"w": np.array(ps.flat)})
        single.grad_flat[...] = ps.grad_flat
        single_opt = cls(single, **case.kwargs)
        peers["single_param"] = single_opt.step
        list_opt = cls(sep_params, **case.kwargs)
        peers["fastopt_list"] = lambda: list_opt.step(sep_grads)
        numpy_arrays = [np.array(p) for p in params], [np.array(g) for g in grads]
        keep += [single, single_opt, list_opt, sep_params, sep_grads]
        torch_params, torch_grads, share = params, grads, False
    elif case.layout == "matrices":  # the same matrices (views of the buffers), own state
        numpy_arrays = [ps[k] for k in ps.names], [ps.grads[k] for k in ps.names]
        torch_params, torch_grads, share = *numpy_arrays, True
    else:
        # The naive NumPy step and torch update the same parameter buffer (own state).
        numpy_arrays = [ps.flat], [ps.grad_flat]
        torch_params, torch_grads, share = [ps.flat], [ps.grad_flat], True
    if _is_16bit(ps.dtype):
        skipped["numpy"] = (
            "the NumPy reference computes in the parameter dtype: it has no 16-bit storage"
        )
    else:
        peers["numpy"] = _naive_numpy_step(case, *numpy_arrays)
    for variant in case.torch_variants:
        step, why = _torch_step(case, torch_params, torch_grads, variant, share=share)
        name = f"torch_{variant}" if variant else "torch"
        if step is None:
            skipped[name] = why
        else:
            peers[name] = step
    return ps.size, count, opt.step, peers, skipped, keep, PerfCounterTimer(), traffic


def _cupy_usable():
    """True when CuPy is installed and sees a CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def build_gpu(case, n, dtype, seed, backend, many=None):
    """GPU (``cupy`` or ``numba-cuda`` backend): same tuple as :func:`build_cpu`.

    With CuPy the parameters are a device ParamSet (``device="cuda"``); with numba-cuda alone they
    are a list of numba device arrays (so the "many" layout needs CuPy). Peers: the device copy
    roofline and torch on CUDA tensors over the same memory; the NumPy peer is host-only.
    """
    if case.layout == "matrices":
        raise Unavailable(f"the {case.name} case runs on the numba-cpu backend only")
    rng = np.random.default_rng(seed)
    cls = case.optimizer_class
    count, size = _layout(case, n, many)
    host_p = rng.standard_normal(count * size, dtype=np.float32).astype(dtype)
    host_g = rng.standard_normal(count * size, dtype=np.float32).astype(dtype)
    keep = []
    if _cupy_usable():
        import cupy

        library = "cupy"
        ps = ParamSet(
            {f"p{i}": np.zeros(size, dtype) for i in range(count)}, dtype=dtype, device="cuda"
        )
        ps.flat[...] = cupy.asarray(host_p)
        ps.grad_flat[...] = cupy.asarray(host_g)
        opt = cls(ps, backend=backend, **case.kwargs)
        step = opt.step
        params = [ps[name] for name in ps.names]
        grads = [ps.grads[name] for name in ps.names]
        keep += [ps]
    else:
        if backend == "cupy":
            raise Unavailable("CuPy cannot see a CUDA device")
        if count > 1:
            raise Unavailable("the many-parameter case on a GPU needs CuPy (a device ParamSet)")
        from numba import cuda

        library = "numba-cuda"
        p, g = cuda.to_device(host_p), cuda.to_device(host_g)
        opt = cls([p], backend=backend, **case.kwargs)

        def step():
            opt.step([g])

        params, grads = [p], [g]
    step()  # compile and allocate the state
    states = _state_arrays(opt, count * size)
    _check_slots(case, states)
    keep += [opt, params, grads]
    elements = count * size
    bpe = case.bytes_per_element(np.dtype(dtype).itemsize)
    traffic = {"bytes_per_element": bpe, "state_bytes_per_element": _state_bytes(states)}
    peers = {"roofline": roofline.device_copy_step(bpe * elements, library)}
    skipped = {"numpy": "the NumPy peer runs on the host only"}
    share = case.layout != "many"
    for variant in ("foreach", "fused"):
        tstep, why = _torch_step(case, params, grads, variant, share=share, device="cuda")
        if tstep is None:
            skipped[f"torch_{variant}"] = why
        else:
            peers[f"torch_{variant}"] = tstep
    return elements, count, step, peers, skipped, keep, CudaEventTimer(library), traffic
