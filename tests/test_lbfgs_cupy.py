"""L-BFGS on the CuPy backend: the vector kernels of kernels/vector_kernels.cu (kernels/vector_cupy.py).

Without a GPU: NVRTC compiles the module CuPy would (the fused multiply-adds kept, nothing
flushed or approximated); a host harness (tests/vector_host_harness.cu, built once by nvcc) runs
the kernels' lane and tree functions with the block's threads emulated in order, and a fake CuPy
routes every launch of kernels/vector_cupy.py to it. Each reduction then equals a NumPy model of
the documented order bit for bit, and L-BFGS over fake CuPy arrays follows the numba-cpu run
with the same closure calls. On a GPU (skipped here): CuPy and numba-cuda give the same bits.
"""

import ctypes
import math
import pathlib
import types

import numpy as np
import pytest
from cupy_ptx import build_harness
from cupy_ptx import cuda_c as _cuda_c
from cupy_ptx import entry_body as _entry_body
from cupy_ptx import nvrtc_ptx as nvrtc_ptx_of
from fake_cupy import FakeCuPy, FakeDeviceArray, FakeStream, install

import fastopt as fo
from fastopt import dispatch
from fastopt.kernels import cuda_launch, vector, vector_cupy
from fastopt.kernels import cupy as kcupy
from fastopt.kernels.layout import REDUCTION_CHUNK, REDUCTION_THREADS
from fastopt.optim import lbfgs

CHUNK, T = REDUCTION_CHUNK, REDUCTION_THREADS
HERE = pathlib.Path(__file__).resolve().parent
DTYPES = (np.float32, np.float64)
REDUCING = ("dot", "update_dot", "scale_dot", "pair", "abs", "axpy_absmax")
WITH_FMA = ("dot", "update_dot", "scale_dot", "pair", "axpy_absmax")


# ---------------------------------------------------------------------------------------------
# The module CuPy compiles: NVRTC, as cupy.RawModule does, for sm_90.


@pytest.fixture(scope="module")
def nvrtc_ptx():
    return nvrtc_ptx_of(vector_cupy.source())


def test_source_inlines_the_headers():
    code = vector_cupy.source()
    assert '#include "' not in code.replace('#include "vector_kernels.cu"', "")
    assert "#define FO_ENABLE_RULES 0" in code and "FO_REDUCTION_CHUNK" in code


def test_nvrtc_compiles_every_kernel_keeping_the_fma(nvrtc_ptx):
    h = _cuda_c()
    names = {vector_cupy.kernel_name(op, dt) for op in vector_cupy.OPS for dt in DTYPES}
    assert h._entries(nvrtc_ptx) == names
    for forbidden in (".ftz", ".approx", ".local", "mul.f64", "add.f64"):
        assert forbidden not in nvrtc_ptx, forbidden  # every operation explicitly rounded
    for op in vector_cupy.OPS:
        for dt in DTYPES:
            body = _entry_body(nvrtc_ptx, vector_cupy.kernel_name(op, dt))
            assert ("fma.rn.f64" in body) == (op in WITH_FMA), (op, dt)
            assert ("bar.sync" in body) == (op in REDUCING), (op, dt)


# ---------------------------------------------------------------------------------------------
# The host harness, and a NumPy model of the documented order.


_p, _i, _ll, _d = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_double
ARGTYPES = {"fo_host_vector": [ctypes.c_char_p, _i, _ll, *[_p] * 6, _d, _d]}
RESTYPES = {"fo_host_vector": _i}


@pytest.fixture(scope="module")
def harness(nvcc, tmp_path_factory):
    """tests/vector_host_harness.cu built once for this module (nvcc, a shared library)."""
    workdir = tmp_path_factory.mktemp("vector_cupy")
    return build_harness(nvcc, HERE / "vector_host_harness.cu", workdir, ARGTYPES, RESTYPES)


def _libm_fma():
    fn = getattr(math, "fma", None)  # Python >= 3.13
    if fn is None:
        libm = ctypes.CDLL(None)
        fn = libm.fma
        fn.restype = ctypes.c_double
        fn.argtypes = [ctypes.c_double] * 3
    return np.frompyfunc(fn, 3, 1)


_FMA = _libm_fma()


def fma(a, b, c):
    """a*b + c rounded once, elementwise (float64)."""
    return _FMA(a, b, c).astype(np.float64)


def model_partials(n, lanes_of, max_second):
    """The (2, nchunks) partials of the documented order: per chunk, thread t folds its
    elements lo + t, lo + t + T, ... into two running sums with ``lanes_of(idx, acc0, acc1)``
    (vectorised over the threads), then the pairwise tree over the T threads."""
    nchunks = max(1, -(-n // CHUNK))
    out = np.zeros((2, nchunks))
    for c in range(-(-n // CHUNK)):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, n)
        acc0, acc1 = np.zeros(T), np.zeros(T)
        for start in range(lo, hi, T):
            idx = np.arange(start, min(start + T, hi))
            k = idx.size
            acc0[:k], acc1[:k] = lanes_of(idx, acc0[:k], acc1[:k])
        half = T // 2
        while half:
            acc0[:half] = acc0[:half] + acc0[half : 2 * half]
            if max_second:
                left, right = acc1[:half], acc1[half : 2 * half]
                acc1[:half] = np.where(right > left, right, left)
            else:
                acc1[:half] = acc1[:half] + acc1[half : 2 * half]
            half //= 2
        out[:, c] = acc0[0], acc1[0]
    return out


def model(op, arrays, s, u):
    """NumPy model of ``op``: the updated arrays (in place) and the partials."""
    a = arrays
    w = lambda x: x.astype(np.float64)  # noqa: E731
    dt = a[0].dtype.type
    if op == "dot":
        return model_partials(a[0].size, lambda i, p, q: (fma(w(a[0][i]), w(a[1][i]), p), q), False)
    if op == "update_dot":
        a[0][...] = fma(s, w(a[1]), w(a[0])).astype(dt)
        a[0][...] = (u * w(a[0])).astype(dt)
        return model_partials(a[0].size, lambda i, p, q: (fma(w(a[2][i]), w(a[0][i]), p), q), False)
    if op == "scale_dot":
        a[0][...] = (s * w(a[1])).astype(dt)
        return model_partials(a[0].size, lambda i, p, q: (fma(w(a[2][i]), w(a[0][i]), p), q), False)
    if op == "pair":
        a[3][...] = a[0] - a[1]
        a[4][...] = (w(a[2]) * s).astype(dt)
        y, e = w(a[3]), w(a[4])
        return model_partials(
            a[0].size, lambda i, p, q: (fma(y[i], e[i], p), fma(y[i], y[i], q)), False
        )
    if op == "abs":
        v = np.abs(w(a[0]))
        return model_partials(
            a[0].size, lambda i, p, q: (p + v[i], np.where(v[i] > q, v[i], q)), True
        )
    if op == "axpy_absmax":
        v = np.abs(w(a[1]))
        a[0][...] = fma(s, w(a[1]), w(a[0])).astype(dt)
        return model_partials(a[0].size, lambda i, p, q: (p, np.where(v[i] > q, v[i], q)), True)
    if op == "scale":
        a[0][...] = (s * w(a[1])).astype(dt)
    elif op == "copy":
        a[0][...] = a[1]
    elif op == "fill":
        a[0][...] = dt(s)
    return None


ARITY = {"dot": 2, "update_dot": 3, "scale_dot": 3, "pair": 5, "abs": 1, "axpy_absmax": 2}
ARITY.update(scale=2, copy=2, fill=1)


def _inputs(op, n, dtype, seed):
    rng = np.random.default_rng(seed)
    out = [(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(dtype)]
    return out + [rng.standard_normal(n).astype(dtype) for _ in range(ARITY[op] - 1)]


# ---------------------------------------------------------------------------------------------
# A fake CuPy whose launches run on the harness, with arrays L-BFGS can work on.


class FakeCupyArray(FakeDeviceArray):
    """A 1-D ``cupy.ndarray`` stand-in (module ``cupy``, so fastopt takes it for one): slices
    are views, ``get``/``set`` copy to and from the host and record the stream they ran on."""

    __module__ = "cupy._fake"
    fake = None  # the FakeVectorCuPy in use

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise TypeError("fake cupy arrays take slices only")
        return FakeCupyArray(self.host[key])

    def reshape(self, *shape):
        return FakeCupyArray(self.host.reshape(*shape))

    def get(self, stream=None):
        self.fake.reads.append(self.fake.current_stream)
        return self.host.copy()

    def set(self, host, stream=None):
        self.host[...] = host


class FakeVectorCuPy(FakeCuPy):
    """FakeCuPy with arrays and streams: launches run ``run``; ``current_ptr`` is CuPy's
    current stream; ``streams`` and ``reads`` record the stream of every launch and read."""

    ndarray = FakeCupyArray

    def __init__(self, run):
        self.streams, self.reads, self.stream_stack, self.current_ptr = [], [], [], 0
        fake = self

        def launch(name, grid, block, args):
            fake.streams.append(fake.current_stream)
            run(name, grid, block, args)

        super().__init__(launch, lambda code, options: None, sm_count=2)
        FakeCupyArray.fake = self
        self.cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=fake.current_ptr)
        self.cuda.Stream = types.SimpleNamespace(null=FakeStream(self, 0))
        self.cuda.ExternalStream = lambda handle, device: FakeStream(fake, handle)

    @property
    def current_stream(self):
        return self.stream_stack[-1] if self.stream_stack else self.current_ptr

    def empty(self, n, dtype):
        host = np.empty(n, dtype)
        host[...] = np.nan
        return FakeCupyArray(host)

    def asarray(self, a):
        return FakeCupyArray(np.array(a))


@pytest.fixture
def fake(harness, nvrtc_ptx, monkeypatch):
    """A fake CuPy over the harness; each launch's arguments are checked against the kernel's
    PTX signature, and ``fake.partials`` keeps the partials of the last reduction."""
    h = _cuda_c()

    def run(name, grid, block, args):
        assert block == (T,)
        sizes = [8 if isinstance(a, (FakeDeviceArray, np.uint64)) else a.itemsize for a in args]
        assert sizes == h._param_sizes(nvrtc_ptx, name)
        n, out, *slots, s, u = args
        assert type(n) is np.int64 and type(s) is type(u) is np.float64
        nchunks = -(-int(n) // CHUNK)
        assert grid == (min(nchunks, vector_cupy.BLOCKS),)
        ptrs = [a.host.ctypes.data if isinstance(a, FakeDeviceArray) else None for a in slots]
        op, suffix = name.removeprefix("fo_vec_").rsplit("_", 1)
        partials = out.host if isinstance(out, FakeDeviceArray) else None
        rc = harness.fo_host_vector(
            op.encode(), int(suffix == "f64"), int(n),
            None if partials is None else partials.ctypes.data, *ptrs, float(s), float(u),
        )  # fmt: skip
        assert rc == 0
        if partials is not None:
            fake.partials = partials[: 2 * nchunks].reshape(2, nchunks).copy()

    fake = FakeVectorCuPy(run)
    install(monkeypatch, fake)
    fresh = kcupy.RawModuleCache(vector_cupy.source, kcupy.COMPILE_OPTIONS)
    monkeypatch.setattr(vector_cupy, "_module", fresh)  # nothing compiled by another fake
    monkeypatch.setattr(vector_cupy, "_local", __import__("threading").local())
    monkeypatch.setattr(kcupy, "_streams", {})
    monkeypatch.setattr(dispatch, "_INSTANCES", {})  # no backend keeps the fake module
    return fake


def _same(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


CALLS = {
    "dot": lambda a, s, u: vector_cupy.dot(*a),
    "update_dot": lambda a, s, u: vector_cupy.update_dot(a[0], s, a[1], u, a[2]),
    "scale_dot": lambda a, s, u: vector_cupy.scale_dot(a[0], s, a[1], a[2]),
    "pair": lambda a, s, u: vector_cupy.curvature_pair(a[0], a[1], a[2], s, a[3], a[4]),
    "abs": lambda a, s, u: vector_cupy.abs_sum_max(a[0]),
    "axpy_absmax": lambda a, s, u: vector_cupy.axpy_absmax(a[0], s, a[1]),
    "scale": lambda a, s, u: vector_cupy.scale(a[0], s, a[1]),
    "copy": lambda a, s, u: vector_cupy.copy(a[0], a[1]),
    "fill": lambda a, s, u: vector_cupy.fill(a[0], s),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_each_operation_equals_the_model_bit_for_bit(fake, dtype):
    """Two chunks (the second partial, lanes past the end of the chunk): the arrays written and
    the partials equal the NumPy model of the documented order, and the returned floats are
    the partials summed by NumPy in index order."""
    n = CHUNK + 3 * T + 5
    s, u = -0.7306, 1.9
    for op in vector_cupy.OPS:
        host = _inputs(op, n, dtype, seed=len(op))
        if op == "pair":
            host[3][...] = np.nan  # outputs
            host[4][...] = np.nan
        dev = [FakeCupyArray(a.copy()) for a in host]
        fake.partials = None
        got = CALLS[op]([*dev], s, u)
        partials = model(op, host, s, u)
        for j, (d, m) in enumerate(zip(dev, host, strict=True)):
            assert _same(d.host, m), f"{op} {dtype.__name__}: array {j}"
        if partials is None:
            assert got is None and fake.partials is None
            continue
        assert _same(fake.partials, partials), f"{op} {dtype.__name__}: partials"
        sums, maxes = float(np.sum(partials[0])), float(np.max(partials[1]))
        expected = {
            "pair": (sums, float(np.sum(partials[1]))),
            "abs": (sums, maxes),
            "axpy_absmax": maxes,
        }.get(op, sums)
        assert got == expected, op
    # the model is the CPU kernels' arithmetic up to the summation order
    x, y = _inputs("dot", n, dtype, 3)
    assert vector_cupy.dot(FakeCupyArray(x), FakeCupyArray(y)) == pytest.approx(
        vector.dot(x, y), rel=1e-12
    )


def test_reductions_reuse_one_buffer_and_read_back_on_the_launch_stream(fake):
    x = FakeCupyArray(np.arange(1.0, 2 * CHUNK + 2))
    fake.current_ptr = 77  # CuPy's current stream
    vector_cupy.abs_sum_max(x, stream=1234)
    vector_cupy.dot(x, x)
    buffers = dict(vector_cupy._local.partials)
    vector_cupy.scale(x, 2.0, x, stream=5)  # no reduction: no read, no wait
    vector_cupy.dot(x[: CHUNK + 1], x[: CHUNK + 1], stream=1234)
    assert vector_cupy._local.partials == buffers and len(buffers) == 1
    assert fake.streams == [1234, 77, 5, 1234] and fake.reads == [1234, 77, 1234]
    assert vector_cupy.dot(x[:0], x[:0]) == 0.0 and vector_cupy.abs_sum_max(x[:0]) == (0, 0)
    assert len(fake.streams) == 4  # nothing launched for empty vectors


def test_bad_vector_arguments_are_refused_before_any_launch(fake):
    x = FakeCupyArray(np.ones(8))
    bad = [
        (lambda: vector_cupy.dot(x, np.ones(8)), TypeError, "cupy.ndarray, argument 1"),
        (lambda: vector_cupy.dot(x, FakeCupyArray(np.ones(8, np.float32))), TypeError, "one dtype"),
        (lambda: vector_cupy.copy(x, FakeCupyArray(np.ones(9))), ValueError, "8 elements"),
        (lambda: vector_cupy.fill(FakeCupyArray(np.ones(8, np.int32)), 0), TypeError, "int32"),
        (lambda: vector_cupy.dot(x, FakeCupyArray(np.ones((8, 2))[:, 0])), ValueError, "contig"),
    ]
    for call, error, match in bad:
        with pytest.raises(error, match=match):
            call()
    assert not fake.launches and (x.host == 1).all()


# ---------------------------------------------------------------------------------------------
# L-BFGS over fake CuPy arrays follows the numba-cpu run.


def rosenbrock(x):
    """The chained Rosenbrock function and its gradient (float64)."""
    a, b = x[:-1], x[1:]
    f = float(np.sum(100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2))
    g = np.zeros_like(x)
    g[:-1] = -400.0 * a * (b - a * a) - 2.0 * (1.0 - a)
    g[1:] += 200.0 * (b - a * a)
    return f, g


def _lbfgs_run(params, to_host, make_grads, line_search_fn, steps=20, backend=None):
    sizes = [p.size for p in params]
    calls = [0]

    def closure():
        calls[0] += 1
        f, g = rosenbrock(np.concatenate([to_host(p) for p in params]))
        return f, make_grads(np.split(g, np.cumsum(sizes)[:-1]))

    kw = {"max_iter": 5, "history_size": 4, "line_search_fn": line_search_fn, "backend": backend}
    opt = fo.LBFGS(params, **kw)
    losses = [opt.step(closure) for _ in range(steps)]
    return losses, np.concatenate([to_host(p) for p in params]), calls[0], opt


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_on_fake_cupy_follows_numba_cpu(fake, line_search_fn):
    """Two parameters (3 + 2 elements of a 5-D Rosenbrock), 20 steps of 5 iterations: the
    same closure calls, the iterates to 1e-12 relative, the losses to 1e-12 of the first (the
    reductions add in another order than the CPU kernels', so the last bits differ)."""
    x0 = np.random.default_rng(0).uniform(-1.5, 1.5, 5)
    kw = {"line_search_fn": line_search_fn}
    ref = _lbfgs_run([x0[:3].copy(), x0[3:].copy()], np.asarray, list, **kw)
    dev = [FakeCupyArray(x0[:3].copy()), FakeCupyArray(x0[3:].copy())]
    fake.current_ptr = 42
    got = _lbfgs_run(dev, lambda p: p.host, lambda gs: [FakeCupyArray(g) for g in gs], **kw)
    opt = got[3]
    assert (
        opt.units()[0].backend.name == "cupy"
        and isinstance(opt._vec, lbfgs._DeviceVectors)
        and opt._vec.k.__name__.endswith(".vector_cupy")
    )
    assert got[2] == ref[2]  # closure calls
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-12)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-12, atol=1e-12 * ref[0][0])
    assert ref[0][-1] < 1e-8 * ref[0][0]  # it did converge
    assert set(fake.streams) == {42} and set(fake.reads) == {42}
    # the state is torch's layout in NumPy, and restores onto the fake device
    sd = opt.state_dict()
    assert isinstance(sd["state"][0]["d"], np.ndarray) and sd["state"][0]["old_dirs"]
    again = fo.LBFGS([FakeCupyArray(got[1][:3].copy()), FakeCupyArray(got[1][3:].copy())])
    again.load_state_dict(sd)
    assert _same(again.units()[0].state["d"].host, sd["state"][0]["d"])


def test_lbfgs_state_dict_waits_for_the_given_stream(fake, monkeypatch):
    """A ``stream=`` other than CuPy's current one: the steps launch and read on it, and
    ``state_dict`` synchronises it before copying the vectors to the host on the current
    stream (before, those copies could overtake the stream's last launches)."""
    x0 = np.random.default_rng(1).uniform(-1.5, 1.5, 5)
    fake.current_ptr = 7
    events = []
    get = FakeCupyArray.get
    monkeypatch.setattr(
        FakeCupyArray,
        "get",
        lambda a, stream=None: events.append(("read", fake.current_stream)) or get(a),
    )
    monkeypatch.setattr(FakeStream, "synchronize", lambda s: events.append(("sync", s.ptr)))
    dev = [FakeCupyArray(x0[:3].copy()), FakeCupyArray(x0[3:].copy())]

    def closure():
        f, g = rosenbrock(np.concatenate([p.host for p in dev]))
        return f, [FakeCupyArray(g[:3].copy()), FakeCupyArray(g[3:].copy())]

    opt = fo.LBFGS(dev, max_iter=5, history_size=4, stream=1234)
    opt.step(closure)
    assert set(fake.streams) == {1234} and {e for e in events} == {("read", 1234)}
    events.clear()
    sd = opt.state_dict()
    assert events[0] == ("sync", 1234) and ("sync", 1234) not in events[1:]
    assert {e for e in events[1:]} == {("read", 7)}  # the host copies, after the wait
    assert sd["state"][0]["n_iter"] == 5 and len(sd["state"][0]["old_dirs"]) == 4


def test_lbfgs_on_fake_cupy_refuses_bad_input_before_any_write(fake):
    p = FakeCupyArray(np.array([-1.5, 2.0]))
    with pytest.raises(TypeError, match="all on one GPU"):
        fo.LBFGS([p, np.zeros(2)])
    other = FakeCupyArray(np.zeros(2))
    other.data.device_id = 1
    with pytest.raises(TypeError, match="all on one GPU"):
        fo.LBFGS([p, other])
    opt = fo.LBFGS([p])
    host_grads = lambda: (1.0, [np.ones(2)])  # noqa: E731
    with pytest.raises(ValueError, match="different devices/libraries"):
        opt.step(host_grads)
    f32 = lambda: (1.0, [FakeCupyArray(np.ones(2, np.float32))])  # noqa: E731
    with pytest.raises(TypeError, match="dtype"):
        opt.step(f32)
    assert p.host.tolist() == [-1.5, 2.0] and not fake.launches


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped here): CuPy and numba-cuda give the same bits.


def test_cupy_and_numba_cuda_vector_kernels_agree_bit_for_bit_on_a_gpu():
    ok, reason = kcupy.available()
    if not ok:
        pytest.skip(reason)
    if cuda_launch._simulating():  # numba-cuda imports its simulator package in any case
        pytest.skip("the CUDA simulator is enabled")
    import cupy

    from fastopt.kernels import vector_cuda

    rng = np.random.default_rng(1)
    n = 3 * CHUNK + 11
    for dtype in DTYPES:
        host = [rng.standard_normal(n).astype(dtype) for _ in range(5)]
        a = [cupy.asarray(h) for h in host]
        b = [cupy.asarray(h) for h in host]
        for fn, args in [
            ("dot", lambda v: (v[0], v[1])),
            ("update_dot", lambda v: (v[0], -0.3, v[1], 1.7, v[2])),
            ("scale_dot", lambda v: (v[3], -1.0, v[1], v[2])),
            ("curvature_pair", lambda v: (v[0], v[1], v[2], 0.37, v[3], v[4])),
            ("abs_sum_max", lambda v: (v[0],)),
            ("axpy_absmax", lambda v: (v[0], 0.25, v[1])),
        ]:
            assert getattr(vector_cupy, fn)(*args(a)) == getattr(vector_cuda, fn)(*args(b)), fn
            for x, y in zip(a, b, strict=True):
                assert _same(x.get(), y.get()), fn


def test_lbfgs_on_cupy_and_on_numba_cuda_gives_the_same_bits_on_a_gpu():
    """600-D Rosenbrock (lanes of up to three elements), strong Wolfe, 20 steps."""
    ok, reason = kcupy.available()
    if not ok:
        pytest.skip(reason)
    if cuda_launch._simulating():  # numba-cuda imports its simulator package in any case
        pytest.skip("the CUDA simulator is enabled")
    import cupy

    x0 = np.random.default_rng(2).uniform(-1.5, 1.5, 600)
    runs = []
    for backend in ("cupy", "numba-cuda"):
        params = [cupy.asarray(x0[:400]), cupy.asarray(x0[400:])]
        runs.append(
            _lbfgs_run(
                params,
                lambda p: p.get(),
                lambda gs: [cupy.asarray(g) for g in gs],
                "strong_wolfe",
                backend=backend,
            )
        )
    assert runs[0][0] == runs[1][0] and runs[0][2] == runs[1][2]
    assert _same(runs[0][1], runs[1][1])
