"""Array kinds, devices, host copies and the contiguity/writability checks: the one place for them.

fastopt accepts these arrays (``array_kind`` tells them apart by duck typing and module names, so
nothing here imports CuPy, numba.cuda or torch):

============  =============================================
kind          arrays
============  =============================================
``numpy``     ``numpy.ndarray``
``torch-cpu`` torch CPU tensors (updated through a zero-copy NumPy view)
``cupy``      ``cupy.ndarray``
``cuda``      anything else on a CUDA device: objects with ``__cuda_array_interface__`` (torch
              CUDA tensors, numba device arrays, JAX arrays) or a DLPack ``__dlpack_device__``
              of kDLCUDA (2)
============  =============================================

Device strings are ``"cpu"``, ``"cuda"`` (the current device) and ``"cuda:<index>"``
(:func:`parse_device`).
"""

import contextlib
import re

import numpy as np

KDLCUDA = 2
"""DLPack device type of CUDA device memory (``__dlpack_device__()[0]``)."""
KDLCPU = 1

HOST_KINDS = frozenset(("numpy", "torch-cpu"))
DESCRIPTIONS = {
    "numpy": "a NumPy array (host memory)",
    "torch-cpu": "a torch CPU tensor (host memory)",
    "cupy": "a CuPy array (CUDA device memory)",
    "cuda": "a CUDA device array",
}


def type_name(a):
    cls = type(a)
    return f"{cls.__module__}.{cls.__qualname__}"


def root_module(a):
    return (type(a).__module__ or "").partition(".")[0]


def _dlpack_device(a):
    """``__dlpack_device__()`` as (int type, int id), or None."""
    fn = getattr(a, "__dlpack_device__", None)
    if fn is None:
        return None
    try:
        dev_type, dev_id = fn()
        return int(dev_type), int(dev_id)
    except Exception:
        return None


def _has_cai(a):
    try:
        return getattr(a, "__cuda_array_interface__", None) is not None
    except Exception:  # e.g. a CPU-resident array whose property raises something else
        return False


def array_kind(a):
    """The kind of array ``a`` is: ``"numpy"``, ``"torch-cpu"``, ``"cupy"`` or ``"cuda"``
    (the module docstring has the table). TypeError naming the type for anything unsupported."""
    if isinstance(a, np.ndarray):
        return "numpy"
    root = root_module(a)
    if root == "cupy" or root == "cupyx":
        return "cupy"
    if root == "torch":
        device = getattr(getattr(a, "device", None), "type", None)
        if device == "cpu":
            return "torch-cpu"
        if device == "cuda":
            return "cuda"
        raise TypeError(
            f"unsupported array type {type_name(a)} on device {device!r}; fastopt updates torch "
            "tensors on the CPU or on a CUDA device"
        )
    if getattr(a, "__cuda_ndarray__", False) or _has_cai(a):
        return "cuda"  # numba device arrays (also the simulator's), CAI exporters
    dev = _dlpack_device(a)
    if dev is not None and dev[0] == KDLCUDA:
        return "cuda"
    where = ""
    if dev is not None:
        where = " in host memory" if dev[0] == KDLCPU else f" on DLPack device type {dev[0]}"
    raise TypeError(
        f"unsupported array type {type_name(a)}{where}; fastopt updates NumPy arrays and torch "
        "CPU tensors on the CPU, and CuPy arrays, torch CUDA tensors or other CUDA arrays "
        "(__cuda_array_interface__ / DLPack) on a GPU"
    )


def describe(a, kind=None):
    """``a`` in words for error messages: its kind, type and device."""
    kind = array_kind(a) if kind is None else kind
    dev = device_index(a, kind)
    where = f" on cuda:{dev}" if dev is not None else ""
    return f"{DESCRIPTIONS.get(kind, kind)}{where} ({type_name(a)})"


def is_device_kind(kind):
    return kind not in HOST_KINDS


def device_index(a, kind=None):
    """The CUDA device ordinal of a device array when it can be told cheaply, else None
    (host arrays, numba device arrays, objects with only ``__cuda_array_interface__``)."""
    kind = array_kind(a) if kind is None else kind
    if kind in HOST_KINDS:
        return None
    if kind == "cupy":
        try:
            return int(a.data.device_id)
        except Exception:
            return None
    if root_module(a) == "torch":
        idx = a.device.index
        return 0 if idx is None else int(idx)
    if getattr(a, "__cuda_ndarray__", False):
        return None
    dev = _dlpack_device(a)
    return dev[1] if dev is not None and dev[0] == KDLCUDA else None


def is_readonly(a):
    """True when a device array says it is read-only (``__cuda_array_interface__`` data flag)."""
    try:
        cai = getattr(a, "__cuda_array_interface__", None)
    except Exception:
        return False
    if cai is None:
        return False
    data = cai.get("data")
    return bool(data[1]) if data is not None and len(data) > 1 else False


def data_ptr(a):
    """Address of the first element of a device array (for telling arrays apart)."""
    if root_module(a) == "cupy":
        return int(a.data.ptr)
    try:
        cai = getattr(a, "__cuda_array_interface__", None)
    except Exception:
        cai = None
    if cai is not None:
        return int(cai["data"][0])
    return int(a.ctypes.data)  # NumPy, and the CUDA simulator's arrays (backed by NumPy)


def detached(a):
    """A torch tensor without autograd tracking (shares memory); anything else unchanged."""
    if root_module(a) == "torch" and getattr(a, "requires_grad", False):
        return a.detach()
    return a


def host_view(a):
    """A zero-copy NumPy view of a host array (NumPy array or torch CPU tensor)."""
    if isinstance(a, np.ndarray):
        return a
    if root_module(a) == "torch":
        return torch_numpy(detached(a))
    raise TypeError(f"{describe(a)} is not in host memory")


def to_host(a):
    """A NumPy array holding ``a``'s values (a view for host arrays, a copy of device arrays)."""
    if isinstance(a, np.ndarray):
        return a
    root = root_module(a)
    if root == "cupy":
        return a.get()
    if root == "torch":
        return torch_numpy(detached(a).cpu())
    if getattr(a, "__cuda_ndarray__", False):
        return a.copy_to_host()
    return np.asarray(a)


def is_device_array(a):
    """True for an array in CUDA device memory (any kind but ``numpy`` and ``torch-cpu``); False
    for host arrays and for objects that are not arrays at all."""
    if isinstance(a, np.ndarray):
        return False
    try:
        return is_device_kind(array_kind(a))
    except TypeError:
        return False


# ------------------------------------------------------------------------------------------
# Device strings


def parse_device(device):
    """``"cpu"`` -> None; ``"cuda"`` -> -1 (the current device); ``"cuda:<i>"`` -> i.
    ValueError naming the accepted forms for anything else."""
    if device == "cpu":
        return None
    if isinstance(device, str):
        m = re.fullmatch(r"cuda(?::(\d+))?", device)
        if m:
            return -1 if m.group(1) is None else int(m.group(1))
    raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:<index>'")


def import_cupy(purpose):
    """The ``cupy`` module, or RuntimeError saying that ``purpose`` needs CuPy."""
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(f"{purpose} needs CuPy, which is not installed") from exc
    return cupy


def array_module(device, owner="array_module"):
    """(array module, CUDA device ordinal or None) for a device string: NumPy for ``"cpu"``,
    CuPy for ``"cuda"`` (its current device: ordinal None) and ``"cuda:<i>"``. RuntimeError when
    CuPy or the device is missing, ValueError for an unknown string. ``owner`` names the caller
    in messages (``"ParamSet"`` reads "ParamSet(device='cuda:1') needs CuPy ...")."""
    index = parse_device(device)
    if index is None:
        return np, None
    label = f"{owner}(device={device!r})"
    cupy = import_cupy(label)
    if index >= 0:
        count = cupy.cuda.runtime.getDeviceCount()
        if index >= count:
            raise RuntimeError(f"{label}: CuPy sees {count} CUDA device(s)")
    return cupy, (None if index < 0 else index)


def on_device(xp, index):
    """Context in which CuPy allocates on device ``index`` (a no-op for NumPy or index None)."""
    if xp is np or index is None:
        return contextlib.nullcontext()
    return xp.cuda.Device(index)


# ------------------------------------------------------------------------------------------
# Checks on arrays the optimizers update

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
"""Storage dtypes the update kernels accept."""


def check_float_dtype(dtype, label):
    """TypeError unless ``dtype`` is one the kernels update."""
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{label} has dtype {dtype}; fastopt updates float32 or float64 arrays")


def check_contiguous(is_contiguous, label):
    """ValueError unless the array ``label`` names is C-contiguous."""
    if not is_contiguous:
        raise ValueError(
            f"{label} is not C-contiguous; pass a contiguous array (np.ascontiguousarray)"
        )


def check_writable(is_writable, label):
    """ValueError unless the array ``label`` names may be written."""
    if not is_writable:
        raise ValueError(f"{label} is read-only; the optimizer updates parameters in place")


# ------------------------------------------------------------------------------------------
# Storage dtypes (the precision issue): what parameters, gradients and state may be stored in.

STORAGE_NAMES = ("float32", "float64", "bfloat16", "float16")
"""Storage dtypes of parameters and gradients, by name: the Numba CPU kernels load them into
float32 (float64 stays float64), run the rule and round on store."""


def bfloat16():
    """The NumPy dtype of ``ml_dtypes.bfloat16`` (what JAX and TensorFlow use for bfloat16)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


_STORAGE_NAMES_BY_DTYPE = {}
"""dtype -> storage name (or None), filled on first use: every step asks for each array's, and
``dtype.name`` costs microseconds."""


def storage_name(dtype):
    """The name in ``STORAGE_NAMES`` of a NumPy dtype (CuPy and numba arrays have NumPy dtypes),
    or None for any other dtype (integers, complex, ...)."""
    dtype = np.dtype(dtype)
    try:
        return _STORAGE_NAMES_BY_DTYPE[dtype]
    except KeyError:
        pass
    name = None
    if dtype.kind == "f" and dtype.name in STORAGE_NAMES:
        name = dtype.name
    elif dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16":
        name = "bfloat16"
    _STORAGE_NAMES_BY_DTYPE[dtype] = name
    return name


def storage_dtype(value, what="dtype"):
    """The NumPy dtype named by ``value``: a name in ``STORAGE_NAMES`` (``"bf16"``/``"fp16"``/
    ``"fp32"`` too), ``ml_dtypes.bfloat16``, ``np.float16``/``np.float32``/``np.float64`` or their
    dtypes. ValueError naming ``what`` and the accepted values otherwise."""
    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
    if isinstance(value, str):
        name = aliases.get(value, value)
        if name == "bfloat16":
            return bfloat16()
        if name in STORAGE_NAMES:
            return np.dtype(name)
    else:
        try:
            dtype = np.dtype(value)
        except TypeError:
            dtype = None
        if dtype is not None and storage_name(dtype) is not None:
            return dtype
    raise ValueError(
        f"{what} must be one of {', '.join(STORAGE_NAMES)} (a name, a NumPy dtype or "
        f"ml_dtypes.bfloat16), got {value!r}"
    )


def check_storage_dtype(dtype, label):
    """TypeError unless ``dtype`` is a storage dtype (float32, float64, bfloat16, float16)."""
    if storage_name(dtype) is None:
        raise TypeError(
            f"{label} has dtype {dtype}; fastopt updates float32, float64, bfloat16 "
            "(ml_dtypes.bfloat16) or float16 arrays"
        )


def torch_numpy(t):
    """A zero-copy NumPy view of a torch CPU tensor; a bfloat16 tensor (which torch cannot hand
    to NumPy) as an ``ml_dtypes.bfloat16`` view of the same memory."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(bfloat16())
    return t.numpy()
