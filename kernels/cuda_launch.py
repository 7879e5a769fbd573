"""Launch plumbing of the numba.cuda kernels (``kernels/cuda.py``): devices, streams, configured
launches and reduction scratch buffers, each looked up once and cached, so that a launch costs a
dictionary lookup and the kernel call: no device query, no new launch configuration (numba builds
one, and for grids under 128 blocks a ``NumbaPerformanceWarning``, on every ``kernel[...]``), no
``cudaMalloc`` per reduction (whose deferred ``cudaFree`` synchronises the device).

Streams: launches take 0/None (the default stream), a raw ``cudaStream_t`` handle (1 the legacy,
2 the per-thread default stream), a numba stream, or a CuPy/torch stream; handles become numba
external streams, cached per (device, handle). Devices: on a machine with several GPUs a launch
or allocation makes the arrays' device current (``on_device``); with one GPU nothing is switched.

Nothing here touches a device before it is called; ``numba.cuda`` is imported on first use.
"""

import contextlib
import threading
import warnings

SIMULATOR_SM_COUNT = 1
"""SM count assumed under the CUDA simulator (every simulated thread is a Python thread)."""

_SM_COUNT = {}


def _cuda():
    restore_numpy_row_stack()
    from numba import cuda

    return cuda


def restore_numpy_row_stack():
    """Give NumPy >= 2.5 back ``numpy.row_stack`` (the alias of ``vstack`` it removed).

    numba-cuda 0.30 (in maintenance: NVIDIA/numba-cuda#907 was closed unfixed) registers an
    overload of ``np.row_stack`` when it builds its typing context, at the first kernel compile;
    without the alias every compile raises ``AttributeError: module 'numpy' has no attribute
    'row_stack'`` (seen on an H200 with NumPy 2.5.2 and numba-cuda 0.30.4). The alias is the
    function NumPy itself had, so nothing else changes."""
    import numpy as np

    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack  # noqa: NPY201 (the alias this restores)


def _simulating():
    try:
        from numba.cuda.core import config
    except Exception:  # pragma: no cover - very old numba-cuda
        import os

        return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    return bool(config.ENABLE_CUDASIM)


def sm_count(cuda, device=None):
    """Streaming multiprocessors of ``device`` (None: the current device), cached per device."""
    if _simulating():
        return SIMULATOR_SM_COUNT
    if device is None:
        n = _SM_COUNT.get("current") if gpu_count(cuda) == 1 else None
        if n is not None:
            return n
        device = cuda.get_current_device().id
    n = _SM_COUNT.get(device)
    if n is None:
        n = _SM_COUNT[device] = int(cuda.gpus[device].MULTIPROCESSOR_COUNT)
        if gpu_count(cuda) == 1:
            _SM_COUNT["current"] = n
    return n


_GPU_COUNT = []
_STREAMS = {}  # (device, handle) -> numba Stream
_CONFIGURED = {}  # (kernel, blocks, threads, device, stream key) -> configured launch
_CACHE_LIMIT = 4096
_NO_DEVICE = contextlib.nullcontext()


def gpu_count(cuda):
    if not _GPU_COUNT:
        _GPU_COUNT.append(1 if _simulating() else len(cuda.gpus))
    return _GPU_COUNT[0]


def device_of(a):
    """The CUDA device ordinal of a numba device array (from its memory's context), or None
    when it cannot be told (0 under the simulator, which has one device)."""
    if _simulating():
        return 0
    data = getattr(a, "gpu_data", None)
    ctx = getattr(data, "context", None)
    dev = getattr(ctx, "device", None)
    return None if dev is None else int(dev.id)


def pointer_device(ptr):
    """The ordinal of the device that owns device pointer ``ptr`` (the driver's
    ``CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL``); 0 under the simulator."""
    if _simulating():
        return 0
    from numba.cuda.cudadrv.driver import binding, driver

    attr = binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    return int(driver.cuPointerGetAttribute(attr, binding.CUdeviceptr(int(ptr))))


def on_device(device):
    """Context that makes ``device`` current for a launch or allocation: a no-op for None, on a
    machine with one GPU, or when it is current already."""
    if device is None:
        return _NO_DEVICE
    cuda = _cuda()
    if gpu_count(cuda) == 1 or cuda.current_context().device.id == device:
        return _NO_DEVICE
    return cuda.gpus[device]


def _stream_key(stream):
    """Hashable key of a launch's stream argument: its handle (the same handle is the same
    stream); under the simulator the object itself (the cached launch keeps it alive)."""
    if not stream:
        return 0
    if isinstance(stream, int):
        return stream
    return ("sim", id(stream)) if _simulating() else int(stream)


def as_stream(cuda, stream, device=None):
    """A numba stream for a launch: 0/None -> 0 (the default stream), a raw handle (int: 1 the
    legacy, 2 the per-thread default stream) or a CuPy/torch stream -> a numba stream (external,
    cached per device and handle), a numba Stream as it is."""
    if not stream:
        return 0
    if not isinstance(stream, int):
        for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
            handle = getattr(stream, attr, None)
            if isinstance(handle, int):
                return as_stream(cuda, handle, device)
        return stream
    key = (device, stream)
    s = _STREAMS.get(key)
    if s is None:
        if stream == 1:
            s = cuda.legacy_default_stream()
        elif stream == 2:
            s = cuda.per_thread_default_stream()
        else:
            s = cuda.external_stream(stream)
        if len(_STREAMS) >= _CACHE_LIMIT:
            _STREAMS.clear()
        _STREAMS[key] = s
    return s


def _configure(k, blocks, threads, stream):
    """``k[blocks, threads, stream]`` with numba's low-occupancy warning silenced (it would be
    built on every launch of a grid under 128 blocks; our grids are sized on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return k[blocks, threads, stream]


class _SimLaunch:
    """Under the simulator ``k[...]`` returns ``k`` itself, reconfigured: configure per call."""

    __slots__ = ("args",)

    def __init__(self, *args):
        self.args = args

    def __call__(self, *kernel_args):
        k, blocks, threads, stream = self.args
        return k[blocks, threads, stream](*kernel_args)


def configured(k, blocks, threads, stream=0, device=None):
    """The launch ``k[blocks, threads, stream]``, configured once per (kernel, grid, device,
    stream) and reused: numba builds a new launch configuration on every ``k[...]``."""
    key = (k, blocks, threads, device, _stream_key(stream))
    launch = _CONFIGURED.get(key)
    if launch is None:
        if _simulating():
            _configure(k, blocks, threads, stream)
            launch = _SimLaunch(k, blocks, threads, stream)
        else:
            launch = _configure(k, blocks, threads, stream)
        if len(_CONFIGURED) >= _CACHE_LIMIT:
            _CONFIGURED.clear()
        _CONFIGURED[key] = launch
    return launch


def launch_device(p):
    """The device a launch over ``p`` goes to: None (the current one) on a one-GPU machine."""
    return device_of(p) if gpu_count(_cuda()) > 1 else None


class _Scratch:
    """A reduction's device buffers (partials, flags, result) and pinned host result, kept per
    (device, stream, thread) and grown when a longer array comes: no cudaMalloc (nor the
    device-wide synchronisation of its deferred cudaFree) per norm or finiteness check."""

    __slots__ = ("capacity", "sq", "bad", "out", "host")

    def __init__(self, cuda, capacity):
        import numpy as np

        self.capacity = capacity
        self.sq = cuda.device_array(capacity, dtype=np.float64)
        self.bad = cuda.device_array(capacity, dtype=np.int32)
        self.out = cuda.device_array(2, dtype=np.float64)
        self.host = cuda.pinned_array(2, dtype=np.float64)


_SCRATCH = {}


def scratch(cuda, nchunks, device, stream):
    """The scratch buffers for ``nchunks`` partials on ``device`` and ``stream``."""
    key = (device, _stream_key(stream), threading.get_ident())
    sc = _SCRATCH.get(key)
    if sc is None or sc.capacity < nchunks:
        capacity = 1 << max(int(nchunks) - 1, 0).bit_length()
        sc = _SCRATCH[key] = _Scratch(cuda, capacity)
    return sc


def read_back(sc, stream):
    """The two result values on the host: an async copy on ``stream`` into pinned memory and a
    synchronisation of that stream alone (a plain copy on the default stream for 0)."""
    if stream:
        sc.out.copy_to_host(sc.host, stream=stream)
        stream.synchronize()
    else:
        sc.out.copy_to_host(sc.host)
    return sc.host
