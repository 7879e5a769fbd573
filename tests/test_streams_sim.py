"""Every operation of an optimizer step on a GPU backend goes to the step's stream: the
``stream=`` given, else the current stream of the library owning the arrays (torch's current
stream for a torch CUDA tensor). Not only the update kernels: the first step's setup too (state
zero-fills and fills, the float32 master copy of a 16-bit parameter, 8-bit slots, the segment
and factor layouts uploaded, scratch, the 16-bit conversions around the per-tensor kernels).
torch's side streams are non-blocking, so work on any other stream (the legacy default stream
among them) is not ordered with the step: a master copy made there could be read before it is
written, a 16-bit parameter written back before its update.

numba-cuda, under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, in its own process): every
kernel launch (the simulator's kernel dispatch, whatever launcher configured it), every
``to_device`` upload and every ``copy_to_device``/``copy_to_host`` of a step is recorded with
its stream, for Adam with bfloat16 parameters and master weights, Adam with 8-bit state, LAMB,
LARS, NovoGrad (float32, bfloat16 staged, 8-bit staged), Adafactor (float32 and bfloat16 with
master weights) and Muon (its matrices through a fake CuPy over the simulator's memory, whose
calls are recorded with their stream too), with ``stream=`` given and under a fake torch
current stream. Two steps each (one for 8-bit state: each simulated step takes seconds).
Allocations (``device_array``) are not recorded: ``cudaMalloc`` orders nothing (the zero-fill
that follows one is a launch, recorded). The simulated tensors are viewed as plain simulator
arrays, as a GPU views a torch tensor as a numba device array.

CuPy, without a GPU (these run in the ordinary test process too, and need no CUDA toolchain:
the kernels' launches are recorded, not run): a fake CuPy records the launches, allocations,
uploads, fills, item assignments and copies of the CuPy backend with the stream current at the
time (or the one passed), for LAMB, LARS, NovoGrad, Adafactor (float32), Adam and LAMB with
float16 parameters and master weights and Adam with 8-bit state, with ``stream=`` given (not
CuPy's current stream) and without (CuPy's current stream).

Run the simulator part as CI does::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_streams_sim.py -q -p no:cacheprovider
"""

import os
import sys
import types

import ml_dtypes
import numpy as np
import pytest

import fastopt as fo

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim_only = pytest.mark.skipif(
    not SIM, reason="CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 in their own process"
)

CURRENT = 0xBEEF
"""The fake torch current stream of the simulated torch CUDA tensors."""
GIVEN = 0x5151
"""The ``stream=`` handle, which is not the current stream."""
MODES = [pytest.param(None, id="torch-current"), pytest.param(GIVEN, id="stream-given")]


def _handle(stream):
    """A recorded stream argument as a handle: a numba stream by its handle (the external
    streams here record theirs), 0 for the default stream (0 or None)."""
    if not stream:
        return 0
    if isinstance(stream, int):
        return stream
    return int(stream)


# ---------------------------------------------------------------------------------------------
# numba-cuda under the simulator


class SimStream:
    """What ``numba.cuda.external_stream(handle)`` returns here (the simulator has none):
    ``int()`` gives the handle; synchronisations are counted."""

    def __init__(self, handle):
        self.handle, self.syncs = handle, 0

    def __int__(self):
        return self.handle

    def __bool__(self):
        return True

    def synchronize(self):
        self.syncs += 1


class SimRecorder:
    """``ops``: (what, stream handle) of every launch, upload and copy while ``active``."""

    def __init__(self):
        self.ops, self.active, self.streams = [], False, {}

    def record(self, what, stream):
        if self.active:
            self.ops.append((what, _handle(stream)))

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        return False

    def off_stream(self, want):
        """The recorded operations that went to another stream than ``want``."""
        return [op for op in self.ops if op[1] != want]


@pytest.fixture
def sim(monkeypatch):
    """The recorder, with a fake torch whose current stream is CURRENT; the block kernels'
    tables and the cached launch configurations and streams dropped, so that what a first step
    does is seen again here."""
    from numba import cuda
    from numba.cuda.simulator import kernel as sim_kernel
    from numba.cuda.simulator.cudadrv import devicearray as sim_da
    from test_gpu_launch import FakeTorch

    from fastopt import dispatch
    from fastopt.kernels import block_cuda, cuda_launch

    rec = SimRecorder()
    native = dispatch.NumbaCUDA.native

    def device_array(self, a):
        d = native(self, a)
        if isinstance(d, sim_da.FakeCUDAArray) and type(d) is not sim_da.FakeCUDAArray:
            d = sim_da.FakeCUDAArray(d._ary)  # a simulated tensor: on a GPU, a numba array
        return d

    monkeypatch.setattr(dispatch.NumbaCUDA, "native", device_array)
    monkeypatch.setitem(sys.modules, "torch", FakeTorch(CURRENT))
    monkeypatch.setattr(cuda, "external_stream", lambda h: rec.streams.setdefault(h, SimStream(h)))
    monkeypatch.setattr(cuda_launch, "_STREAMS", {})
    monkeypatch.setattr(cuda_launch, "_CONFIGURED", {})
    monkeypatch.setattr(block_cuda, "_TABLES", {})

    kernel_cls = sim_kernel.FakeCUDAKernel
    getitem, call = kernel_cls.__getitem__, kernel_cls.__call__

    def configure(self, configuration):
        self.fastopt_stream = configuration[2] if len(configuration) > 2 else 0
        return getitem(self, configuration)

    def launch(self, *args):
        if not self._device and not sim_kernel._kernel_context:  # a launch, not a device call
            rec.record(f"launch {self.fn.__name__}", getattr(self, "fastopt_stream", 0))
            self.fastopt_stream = 0  # a launch without a configuration is on the default stream
        return call(self, *args)

    monkeypatch.setattr(kernel_cls, "__getitem__", configure)
    monkeypatch.setattr(kernel_cls, "__call__", launch)

    to_device = cuda.to_device

    def upload(ary, stream=0, copy=True, to=None):
        rec.record("to_device", stream)
        return to_device(ary, stream, copy, to)

    monkeypatch.setattr(cuda, "to_device", upload)
    array_cls = sim_da.FakeCUDAArray
    copy_to_device, copy_to_host = array_cls.copy_to_device, array_cls.copy_to_host

    def to_dev(self, ary, stream=0):
        rec.record("copy_to_device", stream)
        return copy_to_device(self, ary, stream)

    def to_host(self, ary=None, stream=0):
        rec.record("copy_to_host", stream)
        return copy_to_host(self, ary, stream)

    monkeypatch.setattr(array_cls, "copy_to_device", to_dev)
    monkeypatch.setattr(array_cls, "copy_to_host", to_host)
    return rec


def _tensor(host):
    from test_gpu_launch import _sim_torch_tensor

    return _sim_torch_tensor(np.ascontiguousarray(host))


def _run_steps(rec, make, shapes, dtype, steps=2):
    """``steps`` steps of ``make(params)`` over simulated torch CUDA tensors of ``shapes``,
    recorded; the optimizer."""
    rng = np.random.default_rng(0)
    params = [_tensor(rng.standard_normal(s).astype(dtype)) for s in shapes]
    opt = make(params)
    for _ in range(steps):
        grads = [_tensor(rng.standard_normal(s).astype(dtype)) for s in shapes]
        with rec:
            opt.step(grads)
    return opt


def _check(rec, stream, *expected):
    """Every recorded operation on the step's stream (``stream=`` when given, else the torch
    current stream), and among them the ones named in ``expected`` (prefixes)."""
    want = CURRENT if stream is None else stream
    assert rec.ops, "nothing recorded"
    off = rec.off_stream(want)
    assert not off, f"{len(off)} of {len(rec.ops)} operations off stream {want:#x}: {off}"
    for prefix in expected:
        assert any(what.startswith(prefix) for what, _ in rec.ops), (
            prefix,
            sorted({w for w, _ in rec.ops}),
        )
    for handle, s in rec.streams.items():  # a synchronisation only ever of the step's stream
        assert handle == want or s.syncs == 0, (handle, s.syncs)


BF16 = ml_dtypes.bfloat16


@sim_only
@pytest.mark.parametrize("stream", MODES)
def test_adam_bfloat16_master_weights(sim, stream):
    """The float32 master copy is made on the step's stream (a conversion kernel there, after
    the zero-fill there), then the update reads it there."""
    opt = _run_steps(
        sim,
        lambda ps: fo.Adam(ps, lr=0.1, master_weights=True, stream=stream),
        [(7,), (2, 3)],
        BF16,
    )
    assert all(u.state["master_param"].dtype == np.float32 for u in opt.units())
    _check(sim, stream, "launch fill", "launch convert", "launch packed_storage")


@sim_only
@pytest.mark.parametrize("stream", MODES)
def test_adam_int8_state(sim, stream):
    """The 8-bit slots are zero-filled, and the block kernels' tables uploaded, on the step's
    stream (the tables once per process: that stream alone is then synchronised)."""
    opt = _run_steps(
        sim,
        lambda ps: fo.Adam(ps, lr=0.1, state_dtype="int8", stream=stream),
        [(4100,)],
        np.float32,
        steps=1,
    )
    assert opt.units()[0].state["exp_avg"].codes.dtype == np.uint8
    _check(sim, stream, "launch fill", "to_device", "launch block")


SEGMENTED = [
    pytest.param(lambda ps, **kw: fo.LAMB(ps, lr=0.1, **kw), id="LAMB"),
    pytest.param(lambda ps, **kw: fo.LARS(ps, lr=0.1, **kw), id="LARS"),
    pytest.param(lambda ps, **kw: fo.NovoGrad(ps, lr=0.1, **kw), id="NovoGrad"),
]


@sim_only
@pytest.mark.parametrize("stream", MODES)
@pytest.mark.parametrize("make", SEGMENTED)
def test_per_tensor_rules(sim, make, stream):
    """The segment layout uploads, the state zero-fills and the three launches of each unit
    on the step's stream, with the gradient norm (``max_grad_norm``) read back there."""
    opt = _run_steps(
        sim, lambda ps: make(ps, max_grad_norm=1.0, stream=stream), [(5, 3), (4,)], np.float32
    )
    assert opt.last_grad_norm > 0
    _check(
        sim,
        stream,
        "to_device",
        "copy_to_host",
        "launch fill",
        "launch cuda_reduce",
        "launch _sumsq",
    )


@sim_only
@pytest.mark.parametrize("stream", MODES)
@pytest.mark.parametrize("make", SEGMENTED)
def test_per_tensor_rules_bfloat16_staged(sim, make, stream):
    """bfloat16 parameters with master weights: the float32 stage (scratch, conversions in and
    out) and the per-tensor kernels all on the step's stream, so the conversion back to
    bfloat16 is ordered after the update."""
    _run_steps(sim, lambda ps: make(ps, master_weights=True, stream=stream), [(5, 3)], BF16)
    _check(sim, stream, "to_device", "launch convert", "launch cuda_apply", "launch fill")


@sim_only
@pytest.mark.parametrize("stream", MODES)
def test_lamb_int8_staged(sim, stream):
    """8-bit LAMB state: dequantized and requantized around the float32 kernels, on the step's
    stream (its slots, the tables and the scratch made there)."""
    _run_steps(
        sim, lambda ps: fo.LAMB(ps, lr=0.1, state_dtype="int8", stream=stream), [(4100,)],
        np.float32, steps=1,
    )  # fmt: skip
    _check(sim, stream, "to_device", "launch dequantize", "launch quantize", "launch segment_pass")


@sim_only
@pytest.mark.parametrize("stream", MODES)
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16-master"])
def test_adafactor(sim, stream, dtype):
    """The factor layout tables uploaded, the scratch and state zero-filled, the five phases
    launched (and for bfloat16 the master copy and the stage's conversions) on the step's
    stream."""
    kw = {"master_weights": True} if dtype is BF16 else {}
    _run_steps(sim, lambda ps: fo.Adafactor(ps, lr=0.1, stream=stream, **kw), [(3, 4), (5,)], dtype)
    expected = ["to_device", "launch fill", "launch adafactor_"]
    _check(sim, stream, *expected, *(["launch convert"] if dtype is BF16 else []))


@pytest.fixture
def sim_cupy(sim, monkeypatch):
    """A fake CuPy over the simulator's memory (Muon's matrices on numba-cuda go through CuPy
    views): each call recorded with the stream current at the time (``calls``)."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    from test_muon_device import FakeArray, NumPyCuPy

    from fastopt import dispatch
    from fastopt.kernels import cupy as kcupy

    class SimCuPy(NumPyCuPy):
        def asarray(self, a):
            if isinstance(a, FakeCUDAArray):  # a zero-copy view of the simulated memory
                self.views.append(a)
                return FakeArray(a._ary)
            return super().asarray(a)

    fake = SimCuPy(current_ptr=7)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(kcupy, "_streams", {})
    monkeypatch.setattr(dispatch, "_INSTANCES", {})
    return fake


@sim_only
@pytest.mark.parametrize("stream", MODES)
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16-master"])
def test_muon(sim, sim_cupy, stream, dtype):
    """A matrix (Newton–Schulz through CuPy views) and a vector (the AdamW fallback, numba-cuda
    kernels): the numba-cuda launches and every CuPy call on the step's stream."""
    kw = {"master_weights": True} if dtype is BF16 else {}
    _run_steps(
        sim,
        lambda ps: fo.Muon(ps, lr=0.02, muon_params=[0], stream=stream, **kw),
        [(6, 4), (5,)],
        dtype,
    )
    _check(sim, stream, "launch fill", "launch loop2_adam")
    want = CURRENT if stream is None else stream
    assert sim_cupy.calls and {s for _, s in sim_cupy.calls} == {want}, sim_cupy.calls


# ---------------------------------------------------------------------------------------------
# CuPy, through a fake CuPy that records the stream of everything it is asked to do


class RecArray:
    """A ``cupy.ndarray`` stand-in over the NumPy array ``host`` (module ``cupy``, so fastopt
    takes it for one): slices and reshapes are views; ``fill``, ``set``, item assignment and
    ``get`` are recorded with their stream (``RecArray.fake``: the :class:`RecCuPy` in use)."""

    __module__ = "cupy._fake"
    fake = None

    def __init__(self, host):
        self.host = host
        self.dtype, self.ndim, self.size, self.shape = host.dtype, host.ndim, host.size, host.shape
        self.flags = types.SimpleNamespace(c_contiguous=host.flags.c_contiguous)
        self.data = types.SimpleNamespace(ptr=host.ctypes.data, device_id=0)

    def __getitem__(self, key):
        return RecArray(self.host[key])

    def __setitem__(self, key, value):
        self.fake.record("setitem")
        self.host[key] = value.host if isinstance(value, RecArray) else value

    def reshape(self, *shape):
        return RecArray(self.host.reshape(*shape))

    def view(self, dtype):
        return RecArray(self.host.view(dtype))

    def fill(self, value):
        self.fake.record("fill")
        self.host[...] = value

    def set(self, host, stream=None):
        self.fake.record("set", stream)
        self.host[...] = host

    def get(self, stream=None):
        self.fake.record("get", stream)
        return self.host.copy()


class RecCuPy(types.ModuleType):
    """Just enough of ``cupy`` for the CuPy backend's step, every launch (a no-op: only where
    it goes is looked at), allocation, fill and copy recorded in ``ops`` as (what, stream
    handle): the stream passed, else the current one (``with stream:`` pushes its handle;
    CuPy's current stream is ``current_ptr``)."""

    ndarray = RecArray

    def __init__(self, current_ptr):
        super().__init__("cupy")
        from fake_cupy import FakeStream

        self.ops, self.stream_stack, self.current_ptr = [], [], current_ptr
        fake = self
        RecArray.fake = self

        class Device:
            def __init__(self, device_id=0):
                self.attributes = {"MultiProcessorCount": 2}

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class RawModule:
            def __init__(self, code=None, options=(), name_expressions=(), **kw):
                self.names = {e: e for e in name_expressions}

            def get_function(self, name):
                # the fake in use: the kernels' modules keep the functions between tests
                return lambda grid, block, args: RecArray.fake.record(f"launch {name}")

            def get_lowered_name(self, name):
                return self.names.get(name, name)

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(
            Device=Device,
            Stream=types.SimpleNamespace(null=FakeStream(self, 0)),
            ExternalStream=lambda handle, device: FakeStream(fake, handle),
            get_current_stream=lambda: types.SimpleNamespace(ptr=fake.current),
            runtime=types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1),
        )

    @property
    def current(self):
        return self.stream_stack[-1] if self.stream_stack else self.current_ptr

    def record(self, what, stream=None):
        handle = self.current if stream is None else getattr(stream, "ptr", stream)
        self.ops.append((what, handle))

    def zeros(self, n, dtype=np.float64):
        self.record("zeros")
        return RecArray(np.zeros(n, dtype))

    def empty(self, n, dtype=np.float64):
        self.record("empty")
        return RecArray(np.zeros(n, dtype))


@pytest.fixture
def rec_cupy(monkeypatch):
    from fastopt import dispatch
    from fastopt.kernels import block_cupy
    from fastopt.kernels import cupy as kcupy

    fake = RecCuPy(current_ptr=7)  # CuPy's current stream: not the null stream
    monkeypatch.setitem(sys.modules, "cupy", fake)
    for cache in ("_modules", "_kernels", "_sm_counts", "_streams", "_convert_modules"):
        if hasattr(kcupy, cache):
            monkeypatch.setattr(kcupy, cache, {})
    monkeypatch.setattr(kcupy, "_storage_modules", {})
    monkeypatch.setattr(block_cupy, "_tables", {})
    monkeypatch.setattr(block_cupy, "_modules", {})
    monkeypatch.setattr(dispatch, "_INSTANCES", {})  # no backend keeps another cupy module
    return fake


CUPY_MODES = [pytest.param(None, id="cupy-current"), pytest.param(5, id="stream-given")]
SEGMENT_SETUP = ("set", "zeros", "launch fo_seg_")
"""The first step of a per-tensor rule: the layout uploaded, the state zero-filled, the kernels."""
CUPY_CASES = [
    pytest.param(fo.LAMB, np.float32, {}, SEGMENT_SETUP, id="LAMB"),
    pytest.param(fo.LARS, np.float32, {}, SEGMENT_SETUP, id="LARS"),
    pytest.param(fo.NovoGrad, np.float32, {}, SEGMENT_SETUP, id="NovoGrad"),
    pytest.param(
        fo.Adafactor, np.float32, {}, ("set", "empty", "zeros", "launch fo_af_"), id="Adafactor"
    ),
    pytest.param(
        fo.Adam,
        np.float16,
        {"master_weights": True},
        ("zeros", "setitem", "launch fo::storage"),
        id="Adam-f16-master",
    ),
    pytest.param(
        fo.LAMB,
        np.float16,
        {"master_weights": True},
        (*SEGMENT_SETUP, "launch fo::convert"),
        id="LAMB-f16-master",
    ),
    pytest.param(
        fo.Adam,
        np.float32,
        {"state_dtype": "int8"},
        ("zeros", "set", "launch fo_block_"),
        id="Adam-int8",
    ),
]


@pytest.mark.parametrize("stream", CUPY_MODES)
@pytest.mark.parametrize(("cls", "dtype", "kw", "setup"), CUPY_CASES)
def test_cupy_step_on_the_step_stream(rec_cupy, cls, dtype, kw, setup, stream):
    """CuPy arrays: every launch, allocation, upload, fill and copy of two steps (the first's
    setup among them: ``setup`` names some) on the step's stream: ``stream=`` when given, else
    CuPy's current stream."""
    rng = np.random.default_rng(0)
    shapes = [(4100,)] if kw.get("state_dtype") == "int8" else [(5, 3), (4,)]
    params = [RecArray(rng.standard_normal(s).astype(dtype)) for s in shapes]
    opt = cls(params, lr=0.1, stream=stream, **kw)
    assert {u.backend.name for u in opt.units()} == {"cupy"}
    want = rec_cupy.current_ptr if stream is None else stream
    for t in range(2):
        grads = [RecArray(rng.standard_normal(s).astype(dtype)) for s in shapes]
        rec_cupy.ops.clear()
        opt.step(grads)
        off = [op for op in rec_cupy.ops if op[1] != want]
        assert not off, f"step {t + 1}: {len(off)} of {len(rec_cupy.ops)} off stream {want}: {off}"
        for prefix in setup if t == 0 else ("launch",):
            assert any(what.startswith(prefix) for what, _ in rec_cupy.ops), (prefix, rec_cupy.ops)
