"""A fake CuPy for testing kernels/cupy.py's launchers without a GPU (tests/test_cuda_c.py,
tests/test_dispatch.py): device arrays are NumPy arrays, and each kernel launch is recorded and
handed to the test, which runs it on the host (the nvcc-built harness) and checks its arguments.
:class:`FakeStream` is a CuPy stream for the fakes that record which stream work ran on
(tests/test_lbfgs_cupy.py, tests/test_muon_device.py).
"""

import sys
import types

import numpy as np


class FakeDeviceArray:
    """A ``cupy.ndarray`` stand-in over the NumPy array ``host``: the attributes the launchers
    read (dtype, shape, contiguity, the data pointer) and ``get()``."""

    def __init__(self, host):
        self.host = host
        self.dtype, self.ndim, self.size, self.shape = host.dtype, host.ndim, host.size, host.shape
        self.flags = types.SimpleNamespace(c_contiguous=host.flags.c_contiguous)
        self.data = types.SimpleNamespace(ptr=host.ctypes.data, device_id=0)

    def get(self):
        return self.host.copy()


class FakeStream:
    """A ``cupy.cuda.Stream`` stand-in with handle ``ptr``: ``with`` it pushes ``ptr`` on
    ``fake.stream_stack`` (the fake's current stream is the top, as CuPy's is) and pops it."""

    def __init__(self, fake, ptr):
        self.fake, self.ptr = fake, ptr

    def __enter__(self):
        self.fake.stream_stack.append(self.ptr)

    def __exit__(self, *exc):
        self.fake.stream_stack.pop()
        return False

    def synchronize(self):
        """Recorded in ``fake.synchronized`` (created on first use)."""
        self.fake.__dict__.setdefault("synchronized", []).append(self.ptr)


class FakeCuPy:
    """Just enough of the ``cupy`` module for kernels/cupy.py, on one device with ``sm_count``
    multiprocessors. ``RawModule(code, options)`` hands its source to ``check_source(code,
    options)``; every launch of one of its functions is appended to ``launches`` as ``(name,
    grid, block, args)`` and run by ``run(name, grid, block, args)``."""

    ndarray = FakeDeviceArray

    def __init__(self, run, check_source, sm_count):
        self.launches = []
        fake = self

        class Device:
            def __init__(self, device_id=0):
                self.attributes = {"MultiProcessorCount": sm_count}

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class RawModule:
            def __init__(self, code, options):
                check_source(code, options)

            def get_function(self, name):
                def launch(grid, block, args):
                    fake.launches.append((name, grid, block, args))
                    run(name, grid, block, args)

                return launch

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(
            Device=Device,
            runtime=types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1),
        )

    def empty(self, n, dtype):
        """Device scratch, filled with NaN (or -1) so a kernel that skips an element shows."""
        host = np.empty(n, dtype)
        host[...] = np.nan if host.dtype.kind == "f" else -1
        return FakeDeviceArray(host)


def install(monkeypatch, fake):
    """Make ``import cupy`` give ``fake`` for this test, with kernels/cupy.py's caches empty."""
    from fastopt.kernels import cupy as kcupy

    monkeypatch.setitem(sys.modules, "cupy", fake)
    for cache in ("_modules", "_kernels", "_sm_counts"):
        monkeypatch.setattr(kcupy, cache, {})
