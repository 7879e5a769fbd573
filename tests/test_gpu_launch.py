"""Stream ordering, devices and per-launch host cost of the GPU backends, without a GPU.

- ``fastopt.streams``: stream arguments as handles; the current stream of the library owning an
  array (torch, CuPy, ``__cuda_array_interface__``), with fake torch/CuPy modules that record
  what they were asked.
- The numba-cuda launch plumbing (``kernels/cuda_launch.py``) with fake numba modules: handles
  become external streams (cached), devices are switched only when another GPU is needed.
- Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``): optimizers, clipping and EMA launch on
  the stream of a (fake) torch tensor or of ``stream=``, the norm is read back by synchronising
  that stream alone; state lands on the parameter's device and a gradient of another device is
  refused; repeated steps allocate nothing and configure no launch after the first.
- The clipping helpers on torch CPU tensors.
"""

import contextlib
import os
import sys
import types

import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo
from fastopt import streams

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim_only = pytest.mark.skipif(not SIM, reason="CUDA simulator test: NUMBA_ENABLE_CUDASIM=1")
no_sim = pytest.mark.skipif(SIM, reason="fakes numba.cuda itself: run without the simulator")


# ---------------------------------------------------------------------------------------------
# Fakes that record what they were given


class FakeTorchStream:
    def __init__(self, handle):
        self.cuda_stream = handle


class FakeTorch:
    """``torch.cuda.current_stream(device)``, recording the devices asked about."""

    def __init__(self, handle=0xBEEF):
        self.asked = []
        fake = self

        def current_stream(device=None):
            fake.asked.append(device)
            return FakeTorchStream(handle)

        self.cuda = types.SimpleNamespace(current_stream=current_stream)


def _torch_like(device_index=0):
    cls = type("Tensor", (), {})
    cls.__module__ = "torch"
    t = cls()
    t.device = types.SimpleNamespace(type="cuda", index=device_index)
    return t


class FakeCuPy:
    def __init__(self, ptr=0xC0FFEE):
        self.calls = 0
        fake = self

        def get_current_stream():
            fake.calls += 1
            return types.SimpleNamespace(ptr=ptr)

        self.cuda = types.SimpleNamespace(get_current_stream=get_current_stream)


def _cupy_like():
    cls = type("ndarray", (), {})
    cls.__module__ = "cupy._core.core"
    return cls()


class CAI:
    def __init__(self, stream="absent"):
        self.__cuda_array_interface__ = {
            "shape": (4,),
            "typestr": "<f4",
            "data": (0xDEAD0000, False),
            "version": 3,
        }
        if stream != "absent":
            self.__cuda_array_interface__["stream"] = stream


# ---------------------------------------------------------------------------------------------
# fastopt.streams


def test_handle_of_stream_arguments():
    assert streams.handle(None) is None
    assert streams.handle(0) == 0 and streams.handle(0x1234) == 0x1234
    assert streams.handle(FakeTorchStream(77)) == 77
    assert streams.handle(types.SimpleNamespace(ptr=88)) == 88  # cupy.cuda.Stream
    protocol = type("S", (), {"__cuda_stream__": lambda self: (0, 99)})()
    assert streams.handle(protocol) == 99
    with pytest.raises(TypeError, match="bool"):
        streams.handle(True)
    with pytest.raises(ValueError, match=">= 0"):
        streams.handle(-1)
    with pytest.raises(TypeError, match="CUDA stream"):
        streams.handle("s")


def test_current_stream_of_each_library(monkeypatch):
    torch = FakeTorch(0xBEEF)
    monkeypatch.setitem(sys.modules, "torch", torch)
    t = _torch_like(1)
    assert streams.current(t) == 0xBEEF
    assert torch.asked == [t.device]  # asked about the tensor's own device
    cupy = FakeCuPy(0xC0FFEE)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    assert streams.current(_cupy_like()) == 0xC0FFEE and cupy.calls == 1
    # __cuda_array_interface__ v3: the stream entry; None or absent: the backend's default
    assert streams.current(CAI(7)) == 7
    assert streams.current(CAI(2)) == 2  # the per-thread default stream
    assert streams.current(CAI(None)) is None
    assert streams.current(CAI()) is None
    assert streams.current(np.zeros(3)) is None


def test_step_streams_override_and_cache(monkeypatch):
    torch = FakeTorch(5)
    monkeypatch.setitem(sys.modules, "torch", torch)

    def unit(device):
        return types.SimpleNamespace(kind="cuda", device=device, source=_torch_like(0))

    per_step = streams.StepStreams()
    a, b = unit("cuda:0"), unit("cuda:0")
    assert per_step(a) == 5 and per_step(b) == 5
    assert len(torch.asked) == 1  # once per (kind, device) and step
    assert per_step(types.SimpleNamespace(kind="numpy", device=None, source=None)) is None
    assert streams.StepStreams(42)(a) == 42 and len(torch.asked) == 1


def test_optimizer_stream_option_is_checked():
    with pytest.raises(TypeError, match="CUDA stream"):
        fo.SGD([np.zeros(3)], lr=0.1, stream="default")
    opt = fo.SGD([np.zeros(3)], lr=0.1, stream=FakeTorchStream(9))
    opt.step([np.ones(3)])  # host arrays: the stream is not used


# ---------------------------------------------------------------------------------------------
# numba-cuda launch plumbing with a fake numba.cuda (no simulator, no GPU)


class FakeNumbaCUDA:
    """Records external streams made and devices entered; ``current`` is the current device."""

    def __init__(self, ngpus=2, current=0):
        self.external, self.entered = [], []
        fake = self
        self.current = current

        class Gpu:
            def __init__(self, i):
                self.i = i

            def __enter__(self):
                fake.entered.append(self.i)

            def __exit__(self, *exc):
                return False

        self.gpus = [Gpu(i) for i in range(ngpus)]

    def current_context(self):
        return types.SimpleNamespace(device=types.SimpleNamespace(id=self.current))

    def external_stream(self, ptr):
        self.external.append(ptr)
        return ("external", ptr)

    def legacy_default_stream(self):
        return "legacy"

    def per_thread_default_stream(self):
        return "per-thread"


@pytest.fixture
def fake_numba(monkeypatch):
    from fastopt.kernels import cuda_launch

    fake = FakeNumbaCUDA()
    monkeypatch.setattr(cuda_launch, "_cuda", lambda: fake)
    monkeypatch.setattr(cuda_launch, "_simulating", lambda: False)
    for cache in ("_GPU_COUNT", "_STREAMS", "_CONFIGURED", "_SM_COUNT", "_SCRATCH"):
        monkeypatch.setattr(cuda_launch, cache, type(getattr(cuda_launch, cache))())
    return fake


@no_sim
def test_streams_become_cached_external_streams(fake_numba):
    from fastopt.kernels import cuda_launch as launch

    assert launch.as_stream(fake_numba, 0) == 0 and launch.as_stream(fake_numba, None) == 0
    assert launch.as_stream(fake_numba, 0x77, 1) == ("external", 0x77)
    assert launch.as_stream(fake_numba, 0x77, 1) == ("external", 0x77)
    assert launch.as_stream(fake_numba, FakeTorchStream(0x77), 1) == ("external", 0x77)
    assert fake_numba.external == [0x77]  # made once per (device, handle)
    assert launch.as_stream(fake_numba, 0x77, 0) == ("external", 0x77)
    assert fake_numba.external == [0x77, 0x77]
    assert launch.as_stream(fake_numba, 1) == "legacy"
    assert launch.as_stream(fake_numba, 2) == "per-thread"


@no_sim
def test_device_switch_only_when_needed(fake_numba):
    from fastopt.kernels import cuda_launch as launch

    for device in (None, 0):
        with launch.on_device(device):
            pass
    assert fake_numba.entered == []
    with launch.on_device(1):
        pass
    assert fake_numba.entered == [1]
    launch._GPU_COUNT[:] = [1]  # one GPU: nothing is ever switched
    with launch.on_device(1):
        pass
    assert fake_numba.entered == [1]


@no_sim
def test_device_of_numba_arrays_and_pointers(fake_numba, monkeypatch):
    from fastopt.kernels import cuda as kcuda
    from fastopt.kernels import cuda_launch as launch

    ctx = types.SimpleNamespace(device=types.SimpleNamespace(id=3))
    assert launch.device_of(types.SimpleNamespace(gpu_data=types.SimpleNamespace(context=ctx))) == 3
    assert launch.device_of(object()) is None
    # a CAI-only array on a 2-GPU machine is viewed in the context of the pointer's device
    asked, viewed = [], []
    monkeypatch.setattr(launch, "pointer_device", lambda ptr: asked.append(ptr) or 1)
    fake_numba.as_cuda_array = lambda a, sync: viewed.append((list(fake_numba.entered), sync))
    monkeypatch.setattr(kcuda, "_cuda", lambda: fake_numba)
    kcuda.as_device_array(CAI())
    assert asked == [0xDEAD0000] and viewed == [([1], False)]
    kcuda.as_device_array(CAI(), device=0)  # known from torch/CuPy metadata: no driver query
    assert asked == [0xDEAD0000] and fake_numba.entered == [1]


# ---------------------------------------------------------------------------------------------
# Clipping helpers on torch CPU tensors


def test_clipping_helpers_on_torch_cpu_tensors():
    torch = import_or_skip("torch")
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (5,)]]
    tensors = [torch.from_numpy(h.copy()).requires_grad_(False) for h in host]
    assert fo.global_norm(tensors) == fo.global_norm(host)
    assert fo.all_finite(tensors) is True
    norm = fo.clip_grad_norm(tensors, 0.5)
    assert norm == fo.clip_grad_norm(host, 0.5)
    for t, h in zip(tensors, host):
        assert np.array_equal(t.numpy(), h)  # scaled in place, bit for bit
    fo.clip_grad_value(tensors, 0.01)
    fo.clip_grad_value(host, 0.01)
    for t, h in zip(tensors, host):
        assert np.array_equal(t.numpy(), h)
    tensors[1][2] = float("nan")
    assert fo.all_finite({"a": tensors[0], "b": tensors[1]}) is False
    with pytest.raises(ValueError, match="not C-contiguous"):
        fo.global_norm([torch.zeros(4, 4).t()])
    with pytest.raises(TypeError, match="dtype"):
        fo.global_norm([torch.zeros(4, dtype=torch.int32)])


# ---------------------------------------------------------------------------------------------
# Under the simulator: stream ordering, devices, no per-step allocation


class RecordingStream:
    """What ``numba.cuda.external_stream`` returns here: records synchronisations."""

    def __init__(self, handle):
        self.handle, self.syncs = handle, 0

    def __int__(self):
        return self.handle

    def synchronize(self):
        self.syncs += 1


@pytest.fixture
def sim_recorder(monkeypatch):
    """External streams and configured launches of the numba-cuda backend, recorded; device
    and legacy-stream synchronisations forbidden."""
    from numba import cuda

    from fastopt.kernels import cuda_launch

    rec = types.SimpleNamespace(streams={}, launches=[])

    def external_stream(ptr):
        return rec.streams.setdefault(ptr, RecordingStream(ptr))

    real_configured = cuda_launch.configured

    def configured(k, blocks, threads, stream=0, device=None):
        rec.launches.append(stream)
        return real_configured(k, blocks, threads, stream, device)

    def forbidden(*args, **kwargs):
        raise AssertionError("a device-wide or default-stream synchronisation")

    monkeypatch.setattr(cuda, "external_stream", external_stream)
    monkeypatch.setattr(cuda, "synchronize", forbidden)
    monkeypatch.setattr(cuda, "default_stream", forbidden)
    monkeypatch.setattr(cuda_launch, "configured", configured)
    monkeypatch.setattr(cuda_launch, "_STREAMS", {})
    return rec


def _sim_torch_tensor(host, device_index=0):
    """A simulated device array that calls itself a torch CUDA tensor (module ``torch``)."""
    from numba import cuda
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    cls = type("Tensor", (FakeCUDAArray,), {"__module__": "torch"})
    t = cls(cuda.to_device(host)._ary)
    t.device = types.SimpleNamespace(type="cuda", index=device_index)
    return t


@sim_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_optimizer_follows_torch_current_stream(monkeypatch, sim_recorder):
    torch = FakeTorch(0xBEEF)
    monkeypatch.setitem(sys.modules, "torch", torch)
    host = np.linspace(-1, 1, 10).astype(np.float32)
    p = _sim_torch_tensor(host)
    opt = fo.Adam([p], lr=0.1, max_grad_norm=0.5, skip_nonfinite=True)
    assert opt.units()[0].backend.name == "numba-cuda"
    for _ in range(2):
        opt.step([_sim_torch_tensor(np.ones(10, np.float32))])
    stream = sim_recorder.streams[0xBEEF]
    assert set(sim_recorder.streams) == {0xBEEF}
    assert sim_recorder.launches and all(s is stream for s in sim_recorder.launches)
    assert stream.syncs == 2  # one norm read-back per step, on torch's stream alone
    assert torch.asked and all(d is p.device for d in torch.asked)
    ref = fo.Adam([host.copy()], lr=0.1, max_grad_norm=0.5, skip_nonfinite=True)
    for _ in range(2):
        ref.step([np.ones(10, np.float32)])
    assert np.array_equal(p.copy_to_host(), ref.units()[0].param)


@sim_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_stream_option_overrides(monkeypatch, sim_recorder):
    from numba import cuda

    monkeypatch.setitem(sys.modules, "torch", FakeTorch(0xBEEF))
    p = _sim_torch_tensor(np.ones(6, np.float32))
    opt = fo.SGD([p], lr=0.1, momentum=0.9, max_grad_norm=1.0, stream=FakeTorchStream(0x5151))
    opt.step([cuda.to_device(np.ones(6, np.float32))])
    assert set(sim_recorder.streams) == {0x5151}
    assert all(s is sim_recorder.streams[0x5151] for s in sim_recorder.launches)
    assert sim_recorder.streams[0x5151].syncs == 1
    opt.zero_grad()  # no ParamSet: nothing launched, nothing synchronised
    # clipping and EMA take stream= too, and follow the tensor's library without it
    sim_recorder.launches.clear()
    g = _sim_torch_tensor(np.full(6, 3.0, np.float32))
    norm = fo.clip_grad_norm([g], 1.0, stream=0x6161)
    assert norm == pytest.approx(np.sqrt(54.0), rel=1e-6)
    assert sim_recorder.streams[0x6161].syncs == 1
    assert all(s is sim_recorder.streams[0x6161] for s in sim_recorder.launches)
    fo.clip_grad_value([g], 0.1)
    assert sim_recorder.launches[-1] is sim_recorder.streams[0xBEEF]
    ema = fo.EMA([cuda.to_device(np.ones(4, np.float32))], 0.9, stream=0x7171)
    ema.update()
    ema.update()
    assert sim_recorder.launches[-1] is sim_recorder.streams[0x7171]


@sim_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_clipping_on_numba_arrays_matches_numpy():
    from numba import cuda

    rng = np.random.default_rng(3)
    host = [rng.standard_normal(s).astype(np.float32) for s in [(3, 5), (7,)]]
    dev = [cuda.to_device(h) for h in host]
    assert fo.global_norm(dev) == fo.global_norm(host)
    assert fo.clip_grad_norm(dev, 0.5) == fo.clip_grad_norm(host, 0.5)
    fo.clip_grad_value(dev, 0.05)
    fo.clip_grad_value(host, 0.05)
    for d, h in zip(dev, host):
        assert np.array_equal(d.copy_to_host(), h)
    bad = cuda.to_device(np.array([1.0, np.nan], np.float32))
    assert fo.all_finite([dev[0], bad]) is False


@sim_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_state_on_the_parameters_device(monkeypatch):
    """Two fake GPUs: the parameter on device 1, state allocated and kernels launched there, and
    a gradient on device 0 refused before anything is written."""
    from numba import cuda

    from fastopt.kernels import cuda_launch

    on = {}  # id(array) -> its device; arrays allocated within on_device(d) are on d
    entered, current = [], [0]

    def device_of(a):
        return on.get(id(a), 0)

    @contextlib.contextmanager
    def on_device(device):
        entered.append(device)
        before = current[0]
        current[0] = before if device is None else device
        try:
            yield
        finally:
            current[0] = before

    def device_array(*args, _real=cuda.device_array, **kwargs):
        a = _real(*args, **kwargs)
        on[id(a)] = current[0]
        return a

    monkeypatch.setattr(cuda_launch, "_GPU_COUNT", [2])
    monkeypatch.setattr(cuda_launch, "device_of", device_of)
    monkeypatch.setattr(cuda_launch, "on_device", on_device)
    monkeypatch.setattr(cuda, "device_array", device_array)
    p = cuda.to_device(np.ones(5, np.float32))
    g1 = cuda.to_device(np.ones(5, np.float32))
    g0 = cuda.to_device(np.ones(5, np.float32))
    on[id(p)] = on[id(g1)] = 1
    opt = fo.Adam([p], lr=0.1)
    assert opt.units()[0].device == "cuda:1"
    with pytest.raises(ValueError, match="cuda:0, the parameter on cuda:1"):
        opt.step([g0])
    assert np.array_equal(p.copy_to_host(), np.ones(5, np.float32)) and not opt.state
    opt.step([g1])
    assert entered and set(entered) == {1}  # allocation, fill and update on device 1
    assert all(on[id(v)] == 1 for v in opt.state[0].values() if not isinstance(v, int))


@sim_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_no_allocation_or_configuration_after_first_step(monkeypatch):
    from numba import cuda

    from fastopt.kernels import cuda_launch

    host = [np.linspace(-1, 1, 12).astype(np.float32), np.ones(5, np.float32)]
    dev = [cuda.to_device(h) for h in host]
    grads = [cuda.to_device(h * 0.5) for h in host]
    opt = fo.Adam(dev, lr=0.1, max_grad_norm=0.5, skip_nonfinite=True)
    opt.step(grads)
    counts = {"device_array": 0, "pinned_array": 0, "configure": 0, "get_current_device": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in ("device_array", "pinned_array", "get_current_device"):
        monkeypatch.setattr(cuda, name, counting(name, getattr(cuda, name)))
    monkeypatch.setattr(cuda_launch, "_configure", counting("configure", cuda_launch._configure))
    for _ in range(3):
        opt.step(grads)
    assert counts == {"device_array": 0, "pinned_array": 0, "configure": 0, "get_current_device": 0}
    assert opt.state[0]["step"] == 4


_TRANSFORM_PTX = """from fastopt.kernels import cuda as kc

for dt in (types.float32, types.float64):
    sig = (types.Array(dt, 1, "C"), dt, dt)
    ptx, _ = cuda.compile_ptx(kc.transform_kernel().py_func, sig, cc=(9, 0))
    assert ("mul.f" in ptx or "mul.rn.f" in ptx) and "fma" not in ptx, dt
    print("ok", dt)
"""


@no_sim
def test_transform_kernel_compiles_to_ptx():
    """The scaling/clamping kernel of the clipping functions compiles for a real GPU, and its
    multiply is a plain rounded one (no FMA), as torch's ``mul_``."""

    from ptx_without_gpu import PREAMBLE, run_ptx_script

    assert run_ptx_script(PREAMBLE + _TRANSFORM_PTX).count("ok") == 2


@sim_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_gradient_accumulator_follows_torch_current_stream(monkeypatch, sim_recorder):
    """The accumulator's buffer allocation, adds and reset go on the stream the optimizer uses
    (torch's current stream here), never the legacy default stream."""
    monkeypatch.setitem(sys.modules, "torch", FakeTorch(0xACC))
    host = np.linspace(-1, 1, 8).astype(np.float32)
    p = _sim_torch_tensor(host)
    opt = fo.SGD([p], lr=0.1)
    acc = fo.GradientAccumulator(opt, steps=2)
    for k in range(4):
        acc.add([_sim_torch_tensor(np.full(8, float(k), np.float32))])
    assert set(sim_recorder.streams) == {0xACC}
    assert sim_recorder.launches and all(
        s is sim_recorder.streams[0xACC] for s in sim_recorder.launches
    )
    ref = fo.SGD([host.copy()], lr=0.1)
    ref_acc = fo.GradientAccumulator(ref, steps=2)
    for k in range(4):
        ref_acc.add([np.full(8, float(k), np.float32)])
    assert np.array_equal(p.copy_to_host(), ref.units()[0].param)


_STORAGE_PTX = """from fastopt.kernels import access, cuda_storage, rules
from fastopt.kernels import cuda as kc
from fastopt.kernels.compile_rules import ARITY

u16, f32 = types.Array(types.uint16, 1, "C"), types.Array(types.float32, 1, "C")
arr = {"float32": f32, "bfloat16": u16, "float16": u16}
S = access.Storage
for rule, st in [
    ("adam", S("bfloat16", "bfloat16", "bfloat16", False, True)),
    ("sgd_momentum", S("float16", "float32", "float32", True, False)),
]:
    k = cuda_storage.kernel(rule, st).py_func
    p = arr[st.param]
    sig = (p, f32 if st.master else p, arr[st.grad]) + (arr[st.state],) * ARITY[rule]
    sig += (types.UniTuple(types.float32, len(rules.SCALARS[rule]) + 2),)
    sig += (types.UniTuple(types.int64, 3),)
    ptx, _ = cuda.compile_ptx(k, sig, cc=(9, 0))
    assert "call." not in ptx and "st.global.u16" in ptx, rule  # helpers inlined, 16-bit stores
    # whole packs of the 16-bit arrays as one 8-byte load and store each (p, g, the states), the
    # packs' locals in registers (no local memory)
    sixteen = 1 + (st.grad != "float32") + (st.state != "float32") * ARITY[rule]
    assert ptx.count("ld.global.u64") == sixteen and ".local" not in ptx, rule
    assert ptx.count("st.global.u64") == sixteen - (st.grad != "float32"), rule
    print("ok", rule)
f64, i32 = types.Array(types.float64, 1, "C"), types.Array(types.int32, 1, "C")
partials, _ = kc.reduction_kernels(256, "bfloat16")
ptx, _ = cuda.compile_ptx(partials.py_func, (u16, types.int64, f64, i32), cc=(9, 0))
assert "fma" not in ptx and "call." not in ptx and "ld.global.u16" in ptx
print("ok partials")
"""


@no_sim
def test_storage_kernels_compile_to_ptx():
    """The numba-cuda storage kernels (16-bit loads and rounded stores, master weights,
    stochastic rounding) and the 16-bit reduction compile for a real GPU with every storage
    helper inlined, the 16-bit arrays read and written in packs of 8 bytes
    (kernels/packed_loops.py) with the packs in registers (two kernels only: NVVM is slow on the
    Philox rounds)."""
    from ptx_without_gpu import PREAMBLE, run_ptx_script

    assert run_ptx_script(PREAMBLE + _STORAGE_PTX).count("ok") == 3


def test_numba_cuda_gets_numpy_row_stack_back(monkeypatch):
    """NumPy 2.5 removed ``row_stack``; numba-cuda 0.30 overloads it at its first kernel compile
    and fails without it (found on an H200). Taking numba.cuda through the launch plumbing
    restores the alias, and leaves a NumPy that has it alone."""
    from fastopt.kernels import cuda_launch

    monkeypatch.delattr(np, "row_stack", raising=False)
    cuda_launch.restore_numpy_row_stack()
    assert np.row_stack is np.vstack  # noqa: NPY201
    mine = lambda tup: tup  # noqa: E731
    monkeypatch.setattr(np, "row_stack", mine, raising=False)
    cuda_launch._cuda()
    assert np.row_stack is mine  # noqa: NPY201
