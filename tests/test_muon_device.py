"""Muon on the GPU backends: fastopt/optim/newton_schulz_device.py (the three steps per matrix
written once for an array module ``xp``) and its routing in fastopt/optim/muon.py.

Without a GPU: the device code runs with NumPy as ``xp`` and equals the numba-cpu path bit for
bit (float64, float32, the bfloat16 emulation; the Muon recipe with its AdamW fallback, a tall
and a wide matrix, 20 steps); its bfloat16 rounding equals ``newton_schulz.bfloat16_bits`` bit
for bit; a fake CuPy whose arrays wrap NumPy arrays (and refuse NumPy arrays as arguments, as
CuPy does) shows that a cupy unit, and a numba-cuda unit through zero-copy CuPy views, take the
device path on the arrays' stream with scratch allocated once, and that numba-cuda without CuPy
is refused by name before anything is written. On a GPU (skipped here): CuPy and numba-cuda
follow numba-cpu within the rounding of cuBLAS's products.
"""

import operator
import sys
import types

import numpy as np
import pytest
from fake_cupy import FakeStream

import fastopt as fo
from fastopt import dispatch
from fastopt.kernels import cuda_launch
from fastopt.kernels import cupy as kcupy
from fastopt.optim.newton_schulz import round_to_bfloat16 as cpu_round
from fastopt.optim.newton_schulz_device import DeviceNewtonSchulz, round_to_bfloat16

MLP_SHAPES = {"emb": (12, 5), "h1": (9, 4), "h1.bias": (4,), "h2": (4, 7), "out": (7, 3)}
"""The recipe gives Muon h1 (tall) and h2 (wide); the rest falls back to AdamW."""


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Both paths call the same NumPy BLAS on the same shapes: on one thread here, as in
    tests/test_muon.py (small products on a busy machine's thread pool crawl)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------
# bfloat16 rounding on device arrays


def test_bfloat16_rounding_equals_bfloat16_bits():
    """Random bits (NaN payloads of both signs among them), ties both ways, overflow to Inf,
    Inf, subnormals, zeros: the xp ufunc sequence gives the bits of the compiled rounding."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    special = np.array(
        [0x7F800001, 0xFFFFFFFF, 0x7FFF8000, 0xFF800001, 0x3F808000, 0x3F818000, 0x3F807FFF]
        + [0x7F7FFFFF, 0x7F7F8000, 0x7F800000, 0xFF800000, 0x00000001, 0x80008000, 0, 1 << 31],
        np.uint32,
    )
    x = np.concatenate([bits, special]).view(np.float32)
    want = x.copy()
    cpu_round(want)
    got = x.copy()
    scratch = (np.empty(x.size + 3, np.uint32), np.empty(x.size + 3, np.bool_))
    round_to_bfloat16(np, got, *scratch)
    assert _same(got.view(np.uint32), want.view(np.uint32))
    assert np.isnan(got).sum() == np.isnan(x).sum() > 100  # NaN kept, as the quiet NaN
    assert set(got.view(np.uint32)[np.isnan(got)] & 0x7FFFFFFF) == {0x7FC00000}


# ---------------------------------------------------------------------------------------------
# The device code with NumPy as xp against the numba-cpu path


def _mlp(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return fo.ParamSet({k: rng.standard_normal(s).astype(dtype) for k, s in MLP_SHAPES.items()})


def _run_recipe(dtype, ns_dtype, xp, steps=20, **kw):
    """(parameters, momentum buffer, optimizer) after ``steps`` of the Muon recipe; the
    matrices through the device code with ``xp`` when given (NumPy here), else numba-cpu's."""
    ps = _mlp(dtype)
    opt = fo.Muon(fo.muon_param_groups(ps, adamw_lr=3e-3), lr=0.02, ns_dtype=ns_dtype, **kw)
    if xp is not None:
        opt._device_module = lambda unit: xp
    rng = np.random.default_rng(1)
    for _ in range(steps):
        opt.step([rng.standard_normal(ps.size).astype(dtype)])
    return ps.flat.copy(), opt.state_dict()["state"][0]["momentum_buffer"], opt


CASES = [
    (np.float64, "float64", {}),
    (np.float32, "float32", {"nesterov": False, "adjust_lr_fn": "match_rms_adamw"}),
    (np.float32, "bfloat16", {"max_grad_norm": 1.0, "ns_steps": 3}),
    (np.float64, "bfloat16", {"momentum": 0.3, "max_grad_value": 0.5, "weight_decay": 0.0}),
]


@pytest.mark.parametrize(("dtype", "ns_dtype", "kw"), CASES)
def test_device_code_with_numpy_equals_numba_cpu(dtype, ns_dtype, kw):
    """Bit for bit (so well within float64 1e-12, float32 1e-5 and bfloat16 resolution): every
    cast, rounding and operation where the compiled passes have it; both Nesterov forms, both
    lerp branches, clipping, norm clipping, the iteration in the parameters' dtype and in a
    narrower one (float64 parameters, bfloat16 iteration: the casts)."""
    want, want_buf, _ = _run_recipe(dtype, ns_dtype, None, **kw)
    got, got_buf, opt = _run_recipe(dtype, ns_dtype, np, **kw)
    scratch = opt._scratch()
    device = [ns for ns in scratch.values() if isinstance(ns, DeviceNewtonSchulz)]
    assert len(device) == 2 and not any(
        type(ns).__name__ == "NewtonSchulz" for ns in scratch.values()
    )
    assert _same(got, want) and _same(got_buf, want_buf)
    assert not _same(got, _mlp(dtype).flat)


# ---------------------------------------------------------------------------------------------
# A fake CuPy over NumPy: the routing of cupy and numba-cuda units


class FakeArray:
    """A ``cupy.ndarray`` stand-in over the NumPy array ``host`` (module ``cupy``, so fastopt
    takes it for one): attributes and methods are the host array's, arrays coming back wrapped."""

    __module__ = "cupy._fake"

    def __init__(self, host):
        self.host = host

    def __getattr__(self, name):
        if name == "host":
            raise AttributeError(name)
        value = getattr(self.host, name)
        if callable(value):
            return lambda *a, **k: _wrap(value(*_unwrap(a), **_unwrap(k)))
        return _wrap(value)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.host.ctypes.data, device_id=0)

    def __getitem__(self, key):
        return _wrap(self.host[key])

    def __setitem__(self, key, value):
        self.host[key] = value.host if isinstance(value, FakeArray) else value

    def get(self):
        return self.host.copy()


def _wrap(v):
    return FakeArray(v) if isinstance(v, np.ndarray) else v


def _unwrap(v):
    if isinstance(v, FakeArray):
        return v.host
    if isinstance(v, np.ndarray):
        raise TypeError("a NumPy array passed to CuPy")  # CuPy refuses host arrays
    if isinstance(v, (tuple, list)):
        return type(v)(_unwrap(x) for x in v)
    if isinstance(v, dict):
        return {k: _unwrap(x) for k, x in v.items()}
    return v


class NumPyCuPy(types.ModuleType):
    """``cupy`` as NumPy functions over FakeArrays: each call is recorded with the stream it ran
    on (``calls``); ``asarray`` of a host array is a zero-copy view (a numba array's CAI view)."""

    def __init__(self, current_ptr):
        super().__init__("cupy")
        self.ndarray = FakeArray
        self.calls, self.views, self.stream_stack = [], [], []
        self.current_ptr = current_ptr
        fake = self

        class Device:
            def __init__(self, device_id=0):
                assert device_id == 0

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        self.cuda = types.SimpleNamespace(
            Device=Device,
            Stream=types.SimpleNamespace(null=FakeStream(self, 0)),
            ExternalStream=lambda handle, device: FakeStream(fake, handle),
            get_current_stream=lambda: types.SimpleNamespace(ptr=fake.current_ptr),
            runtime=types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1),
        )

    @property
    def stream(self):
        return self.stream_stack[-1] if self.stream_stack else self.current_ptr

    def asarray(self, a):
        if isinstance(a, FakeArray):
            return a
        self.views.append(a)
        return FakeArray(a)

    def __getattr__(self, name):
        fn = getattr(np, name)
        if not callable(fn) or isinstance(fn, type):
            return fn

        def call(*args, **kwargs):
            self.calls.append((name, self.stream))
            return _wrap(fn(*_unwrap(args), **_unwrap(kwargs)))

        return call


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = NumPyCuPy(current_ptr=7)  # CuPy's current stream: not the null stream
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(kcupy, "_streams", {})
    monkeypatch.setattr(dispatch, "_INSTANCES", {})  # no backend keeps another cupy module
    return fake


SHAPES = ((9, 4), (4, 7), (5, 5))


def _matrix_run(make, after_first=None, **kw):
    """Three bfloat16-mode steps over SHAPES as ``make`` arrays; ``after_first(opt)`` is called
    after the first."""
    rng = np.random.default_rng(4)
    params = [make(rng.standard_normal(s)) for s in SHAPES]
    opt = fo.Muon(params, lr=0.02, ns_dtype="bfloat16", **kw)
    for t in range(3):
        opt.step([make(rng.standard_normal(s)) for s in SHAPES])
        if t == 0 and after_first is not None:
            after_first(opt)
    return params, opt


@pytest.mark.parametrize("stream", [None, 5])
def test_cupy_unit_takes_the_device_path_on_its_stream(fake_cupy, stream):
    """Three matrices (tall, wide, square) as CuPy arrays: the cupy backend, every matrix
    product a ``cupy.matmul`` (3 per Newton–Schulz step), every call on CuPy's current stream
    (or ``stream=``), scratch allocated at the first step only; the parameters equal numba-cpu's
    bit for bit."""
    first = []

    def after_first(opt):
        first.append([name for name, _ in fake_cupy.calls])
        fake_cupy.calls.clear()

    want, _ = _matrix_run(np.copy)
    got, opt = _matrix_run(FakeArray, after_first, stream=stream)
    assert opt.units()[0].backend.name == "cupy"
    assert first[0].count("empty") == len(SHAPES) * 10  # x y a b c norm t d bits keep, per shape
    names = [name for name, _ in fake_cupy.calls]
    assert names.count("matmul") == 2 * len(SHAPES) * 5 * 3 and "empty" not in names
    assert {s for _, s in fake_cupy.calls} == {7 if stream is None else 5}
    for a, b in zip(got, want, strict=True):
        assert _same(a.host, b)


class NumbaCudaLike(dispatch.NumbaCPU):
    """numba-cpu's kernels under the name ``numba-cuda``: a unit that routes as numba-cuda one,
    its arrays host memory the fake CuPy views without copying."""

    name = "numba-cuda"


def _recipe_as_numba_cuda(dtype=np.float32):
    ps = _mlp(dtype)
    opt = fo.Muon(fo.muon_param_groups(ps, adamw_lr=3e-3), lr=0.02)
    opt.units()[0].use_backend(NumbaCudaLike())
    return ps, opt


def test_numba_cuda_unit_runs_through_zero_copy_cupy_views(fake_cupy):
    """The Muon recipe on a numba-cuda unit: the matrices through CuPy views of the unit's own
    parameter, gradient buffer and momentum (made once: the updates land in those arrays), on
    the null stream (numba-cuda's default: the arrays name no stream), the AdamW fallback by
    the backend's kernels; equal to numba-cpu bit for bit."""
    want, want_buf, _ = _run_recipe(np.float32, "bfloat16", None, steps=5)
    ps, opt = _recipe_as_numba_cuda()
    rng = np.random.default_rng(1)
    for _ in range(5):
        ps.grad_flat[...] = rng.standard_normal(ps.size).astype(np.float32)
        opt.step()
    unit = opt.units()[0]
    assert unit.backend.name == "numba-cuda"
    views = [unit.param, unit.default_grad, unit.state["momentum_buffer"]]
    assert len(fake_cupy.views) == 3 and all(map(operator.is_, fake_cupy.views, views))
    assert {s for _, s in fake_cupy.calls} == {0}
    assert _same(ps.flat, want) and _same(unit.state["momentum_buffer"], want_buf)


def test_numba_cuda_without_cupy_is_refused_by_name_before_any_write(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    ps, opt = _recipe_as_numba_cuda()
    before = ps.flat.copy()
    with pytest.raises(RuntimeError, match=r"numba-cuda backend.*cuBLAS.*needs CuPy"):
        opt.step([np.ones(ps.size, np.float32)])
    assert _same(ps.flat, before) and not opt.state


def test_16_bit_storage_on_cupy_runs_the_device_path_on_float32_copies(fake_cupy, monkeypatch):
    """A float16 Muon unit on CuPy (master weights, float32 state) runs the device path on
    its float32 stage (fastopt/optim/staging.py): the conversions are the backend's
    ``convert`` (here the CPU kernel on the fake arrays' host memory; on a GPU
    tests/test_gpu_staged.py), and the parameters end where the numba-cpu run of the same
    arrays does, to the rounding of the device path's products (its tests' tolerance)."""
    from fastopt.kernels import cpu_storage

    converted = []

    def convert(self, dst, src, rs=None, word=0, stream=None):
        converted.append((dst.dtype, src.dtype, stream))
        cpu_storage.convert(dst.host.reshape(-1), src.host.reshape(-1), rs, word)

    monkeypatch.setattr(dispatch.CuPyBackend, "convert", convert)
    rng = np.random.default_rng(2)
    host = [rng.standard_normal(s).astype(np.float16) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float16) for s in SHAPES] for _ in range(3)]
    dev = [FakeArray(a.copy()) for a in host]
    cpu = [a.copy() for a in host]
    o_dev = fo.Muon(dev, lr=0.02, ns_dtype="float32", master_weights=True)
    o_cpu = fo.Muon(cpu, lr=0.02, ns_dtype="float32", master_weights=True)
    for g in grads:
        o_dev.step([FakeArray(a.copy()) for a in g])
        o_cpu.step([a.copy() for a in g])
    assert {u.backend.name for u in o_dev.units()} == {"cupy"}
    assert (np.dtype(np.float16), np.dtype(np.float32), 7) in converted  # on CuPy's stream
    for d, c in zip(dev, cpu):
        np.testing.assert_allclose(d.host.astype(np.float32), c.astype(np.float32), rtol=2e-3)
    for ud, uc in zip(o_dev.units(), o_cpu.units()):
        np.testing.assert_allclose(
            ud.state["master_param"].host, uc.state["master_param"], rtol=1e-5, atol=1e-7
        )


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped here)


def test_cupy_and_numba_cuda_follow_numba_cpu_on_a_gpu():
    """The recipe, 20 steps, on CuPy and on numba-cuda arrays: within the rounding of cuBLAS's
    products of the numba-cpu run (float64 1e-10, float32 1e-5, bfloat16 2e-4 relative)."""
    ok, reason = kcupy.available()
    if not ok:
        pytest.skip(reason)
    if cuda_launch._simulating():
        pytest.skip("the CUDA simulator is enabled")
    import cupy

    for dtype, ns_dtype, tol in (
        (np.float64, "float64", 1e-10),
        (np.float32, "float32", 1e-5),
        (np.float32, "bfloat16", 2e-4),
    ):
        want, _, _ = _run_recipe(dtype, ns_dtype, None)
        for backend in ("cupy", "numba-cuda"):
            ps = fo.ParamSet(_mlp(dtype).to_dict(), device="cuda")
            groups = fo.muon_param_groups(ps, adamw_lr=3e-3)
            opt = fo.Muon(groups, lr=0.02, ns_dtype=ns_dtype, backend=backend)
            rng = np.random.default_rng(1)
            for _ in range(20):
                opt.step([cupy.asarray(rng.standard_normal(ps.size).astype(dtype))])
            got = ps.flat.get()
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err < tol, (backend, ns_dtype, err)
