"""The CUDA stream that work on an array is ordered on, as a raw ``cudaStream_t`` handle.

fastopt launches its kernels on the stream of the library that owns the arrays, so an update
inside ``with torch.cuda.stream(s):`` (or a CuPy ``with stream:``) reads gradients after the
work queued before it on ``s`` and is seen by the work queued after it:

==================  ==========================================================================
array               stream (:func:`current`)
==================  ==========================================================================
torch CUDA tensor   ``torch.cuda.current_stream(tensor.device)``
CuPy array          ``cupy.cuda.get_current_stream()`` (CuPy's current stream, this thread)
other CUDA arrays   the ``stream`` entry of ``__cuda_array_interface__`` (v3: 1 the legacy
                    default stream, 2 the per-thread default stream, else a handle); None when
                    absent or None (the backend's default stream)
host arrays         None
==================  ==========================================================================

A ``stream=`` option (optimizers, clipping, EMA) overrides it (:func:`handle`). Handles are ints:
0 is the default stream, 1 ``cudaStreamLegacy``, 2 ``cudaStreamPerThread``; None means "the
backend's default" (numba-cuda: the legacy default stream; CuPy: its current stream).
Nothing here imports torch or CuPy: they are reached through the arrays' own modules.
"""

import sys

from . import arrays


def handle(stream):
    """A ``stream=`` argument as an int handle: None stays None; ints >= 0 as they are;
    ``torch.cuda.Stream`` (``cuda_stream``), ``cupy.cuda.Stream`` (``ptr``), numba streams
    (``int()``) and objects with the ``__cuda_stream__`` protocol by their handle.
    TypeError for anything else, ValueError for a negative int."""
    if stream is None:
        return None
    if isinstance(stream, bool):
        raise TypeError("stream must be a CUDA stream or a cudaStream_t handle, got a bool")
    if isinstance(stream, int):
        if stream < 0:
            raise ValueError(f"stream handle must be >= 0, got {stream}")
        return stream
    for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        value = getattr(stream, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    protocol = getattr(stream, "__cuda_stream__", None)
    if callable(protocol):  # the CUDA stream protocol: (version, handle)
        return int(protocol()[1])
    if type(stream).__name__ == "Stream" and hasattr(stream, "handle"):  # numba-cuda
        return int(stream)
    raise TypeError(
        f"stream must be a CUDA stream (torch, CuPy, numba) or a cudaStream_t handle, "
        f"got {type(stream).__name__}"
    )


def current(a, kind=None):
    """The stream handle work on ``a`` is ordered on (the module docstring has the table)."""
    kind = arrays.array_kind(a) if kind is None else kind
    if kind in arrays.HOST_KINDS:
        return None
    root = arrays.root_module(a)
    if root == "torch":
        return int(sys.modules["torch"].cuda.current_stream(a.device).cuda_stream)
    if kind == "cupy":
        return int(sys.modules["cupy"].cuda.get_current_stream().ptr)
    try:
        cai = getattr(a, "__cuda_array_interface__", None)
    except Exception:
        cai = None
    value = None if cai is None else cai.get("stream")
    return None if value is None else int(value)


class StepStreams:
    """The stream of each unit of one optimizer step: ``override`` (a :func:`handle`) when
    given, else :func:`current` of the unit's array, looked up once per (kind, device)."""

    __slots__ = ("override", "_seen")

    def __init__(self, override=None):
        self.override = override
        self._seen = {}

    def __call__(self, unit):
        if self.override is not None or unit.device is None:
            return self.override
        key = (unit.kind, unit.device)
        s = self._seen.get(key, self)
        if s is self:
            s = self._seen[key] = current(unit.source, unit.kind)
        return s
