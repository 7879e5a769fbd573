"""GPU-only tests: the CuPy and Numba CUDA backends on a real device.

Skipped as a whole (with the reason) without CuPy and a CUDA device, and under the CUDA
simulator. Run them on a GPU machine with the rest of the suite::

    pytest tests -q -p no:cacheprovider

- every optimizer case (tests/optimizer_cases.py) in float32 and float64, on CuPy arrays through
  both backends: the CuPy backend equals the Numba CPU kernels bit for bit (the CUDA C rules use
  explicitly rounded IEEE operations), both are within the kernel tolerance of the NumPy
  reference, and Numba CUDA (which contracts into FMAs) is within rtol 1e-5 / 1e-12 of the CPU;
- ParamSet(device="cuda"), zero_grad, plain numba device arrays, DLPack-only arrays;
- torch CUDA tensors updated in place through the dispatcher, against torch.optim on CUDA;
- gradient clipping and non-finite skipping on the device; the GPU reductions against the NumPy
  model of their summation order, bit for bit;
- state_dict round trips device <-> host; device/kind mismatches rejected before any write.
"""

import os

import numpy as np
import pytest
from optimizer_cases import CASES, grad_of

import fastopt as fo
from fastopt.kernels import cuda as kcuda
from fastopt.kernels import cupy as kcupy

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("GPU tests do not run under the CUDA simulator", allow_module_level=True)
_OK, _WHY = kcupy.available()
if not _OK:
    pytest.skip(f"GPU tests need CuPy and a CUDA device: {_WHY}", allow_module_level=True)

import cupy  # noqa: E402
from test_dispatch import CHUNK, _reduction_input, _same, model_sumsq  # noqa: E402

NUMBA_OK, NUMBA_WHY = kcuda.available()
needs_numba = pytest.mark.skipif(not NUMBA_OK, reason=f"numba-cuda unavailable: {NUMBA_WHY}")
DTYPES = (np.float32, np.float64)
IDS = ["f32", "f64"]
STEPS = 30
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
"""Numba CPU kernels vs the NumPy reference (tests/test_kernels_vs_reference.py)."""
FMA_TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
"""Numba CUDA (FMA-contracted) vs the Numba CPU kernels."""


def _params(dtype, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(7, 5), (13,), (2, 3, 4), (1000,)]]


def _host(a):
    if isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a)


def _lockstep(cls, kwargs, dtype, to_device, backend=None, steps=STEPS):
    """(device params, device optimizer, host params, host optimizer) after ``steps`` steps on the
    same gradients (computed from the host trajectory)."""
    host = _params(dtype)
    dev = [to_device(a) for a in host]
    opt_d = cls(dev, backend=backend, **kwargs)
    opt_h = cls(host, **kwargs)
    for t in range(steps):
        grads = grad_of(host, t)
        opt_h.step(grads)
        opt_d.step([to_device(g) for g in grads])
    return dev, opt_d, host, opt_h


def _compare(dev, opt_d, host, opt_h, exact, tol=None):
    check = _assert_same if exact else (lambda a, b, what: _assert_close(a, b, tol, what))
    for i, (d, h) in enumerate(zip(dev, host)):
        check(_host(d), h, f"param {i}")
    sd, sh = opt_d.state_dict(), opt_h.state_dict()
    assert sd["state"].keys() == sh["state"].keys()
    for i in sh["state"]:
        assert sd["state"][i].keys() == sh["state"][i].keys()
        for k, v in sh["state"][i].items():
            if isinstance(v, np.ndarray):
                assert isinstance(sd["state"][i][k], np.ndarray)
                check(sd["state"][i][k], v, f"state {i} {k}")
            elif exact or not isinstance(v, float):  # step counts are exact on every backend
                assert sd["state"][i][k] == v, (i, k)
            else:  # float scalars (NAdam's mu_product) are host arithmetic: equal up to rounding
                assert sd["state"][i][k] == pytest.approx(v, rel=tol["rtol"], abs=0), (i, k)


def _assert_same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    ai = a.view(np.int32 if a.dtype == np.float32 else np.int64)
    bi = b.view(np.int32 if b.dtype == np.float32 else np.int64)
    bad = np.flatnonzero(ai.reshape(-1) != bi.reshape(-1))
    assert bad.size == 0, (
        f"{what}: {bad.size} elements differ, first {a.reshape(-1)[bad[0]]!r} vs {b.reshape(-1)[bad[0]]!r}"
    )


def _assert_close(a, b, tol, what):
    np.testing.assert_allclose(a, b, err_msg=what, **tol)


# ---------------------------------------------------------------------------------------------
# Every optimizer on CuPy arrays, both backends


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cupy_backend_bit_identical_to_cpu_kernels(case, dtype):
    _, cls, kwargs = case
    dev, opt_d, host, opt_h = _lockstep(cls, kwargs, dtype, cupy.asarray)
    assert opt_d._groups[0]["units"][0].backend.name == "cupy"
    assert all(isinstance(d, cupy.ndarray) for d in dev)
    _compare(dev, opt_d, host, opt_h, exact=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cupy_backend_vs_reference(case, dtype):
    _, cls, kwargs = case
    host_ref = _params(dtype)
    opt_r = cls(host_ref, backend="numpy", **kwargs)
    dev = [cupy.asarray(a) for a in _params(dtype)]
    opt_d = cls(dev, **kwargs)
    for t in range(STEPS):
        opt_r.step(grad_of(host_ref, t))
        opt_d.step([cupy.asarray(g) for g in grad_of([_host(d) for d in dev], t)])
    for d, r in zip(dev, host_ref):
        np.testing.assert_allclose(_host(d), r, **TOL[dtype])


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_numba_cuda_backend_on_cupy_arrays(case, dtype):
    _, cls, kwargs = case
    dev, opt_d, host, opt_h = _lockstep(cls, kwargs, dtype, cupy.asarray, backend="numba-cuda")
    assert opt_d._groups[0]["units"][0].backend.name == "numba-cuda"
    _compare(dev, opt_d, host, opt_h, exact=False, tol=FMA_TOL[dtype])


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", CASES[::4], ids=[c[0] for c in CASES[::4]])
def test_numba_device_arrays_dispatch_to_numba_cuda(case, dtype):
    from numba import cuda

    _, cls, kwargs = case
    dev, opt_d, host, opt_h = _lockstep(cls, kwargs, dtype, cuda.to_device)
    assert opt_d._groups[0]["units"][0].backend.name == "numba-cuda"
    _compare(dev, opt_d, host, opt_h, exact=False, tol=FMA_TOL[dtype])


@pytest.mark.parametrize("backend", ["cupy", pytest.param("numba-cuda", marks=needs_numba)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_paramset_cuda(case, backend):
    _, cls, kwargs = case
    arrays = _params(np.float32)
    ps_h = fo.ParamSet({f"p{i}": a for i, a in enumerate(arrays)})
    ps_d = fo.ParamSet({f"p{i}": a for i, a in enumerate(arrays)}, device="cuda")
    assert isinstance(ps_d.flat, cupy.ndarray) and ps_d.device == "cuda"
    opt_h, opt_d = cls(ps_h, **kwargs), cls(ps_d, backend=backend, **kwargs)
    for t in range(STEPS):
        grads = grad_of([ps_h[n] for n in ps_h], t)
        for name, g in zip(ps_h, grads):
            ps_h.grads[name][...] = g
            ps_d.grads[name][...] = cupy.asarray(g)
        opt_h.step()
        opt_d.step()
        opt_d.zero_grad()
        assert not bool(cupy.any(ps_d.grad_flat))
    if backend == "cupy":
        _assert_same(cupy.asnumpy(ps_d.flat), ps_h.flat, "flat")
    else:
        _assert_close(cupy.asnumpy(ps_d.flat), ps_h.flat, FMA_TOL[np.float32], "flat")
    # explicit gradients: the flat buffer, or the ParamSet itself (whose .grads are used)
    g = np.random.default_rng(5).standard_normal(ps_h.grad_flat.size).astype(np.float32)
    ps_h.grad_flat[...] = g
    ps_d.grad_flat[...] = cupy.asarray(g)
    for opt, arg in (
        (opt_h, ps_h.grad_flat),
        (opt_d, ps_d.grad_flat),
        (opt_h, ps_h),
        (opt_d, ps_d),
    ):
        opt.step(arg)
    if backend == "cupy":
        _assert_same(cupy.asnumpy(ps_d.flat), ps_h.flat, "flat after explicit gradients")
    else:
        _assert_close(
            cupy.asnumpy(ps_d.flat), ps_h.flat, FMA_TOL[np.float32], "flat after explicit gradients"
        )


def test_paramset_cuda_device_index_and_inputs():
    ps = fo.ParamSet({"w": cupy.ones((2, 3)), "b": np.zeros(3)}, device="cuda:0")
    assert ps.device == "cuda:0" and ps.flat.dtype == np.float64
    assert isinstance(ps["w"], cupy.ndarray) and ps["w"].shape == (2, 3)
    host = fo.ParamSet({"w": cupy.ones(4)})  # device arrays copied to a host ParamSet
    assert isinstance(host.flat, np.ndarray) and host.flat.sum() == 4
    with pytest.raises(RuntimeError, match="CUDA device"):
        fo.ParamSet({"w": np.zeros(2)}, device=f"cuda:{cupy.cuda.runtime.getDeviceCount()}")


@needs_numba
def test_dlpack_only_array_updated_in_place():
    class DLPackOnly:
        def __init__(self, a):
            self._a = a
            self.shape = a.shape

        def __dlpack__(self, stream=None, **kwargs):
            return self._a.__dlpack__(stream=stream)  # an unversioned capsule is allowed

        def __dlpack_device__(self):
            return (2, int(self._a.data.device_id))  # kDLCUDA

    p = cupy.arange(10, dtype=cupy.float32)
    wrapped = DLPackOnly(p)
    opt = fo.SGD([wrapped], lr=0.5)
    opt.step([DLPackOnly(cupy.ones(10, dtype=cupy.float32))])
    np.testing.assert_array_equal(cupy.asnumpy(p), np.arange(10, dtype=np.float32) - 0.5)


# ---------------------------------------------------------------------------------------------
# torch CUDA tensors through the dispatcher vs torch.optim on CUDA

TORCH_CASES = [
    ("SGD", dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.05)),
    ("SGD", dict(lr=0.03, momentum=0.8, dampening=0.3, maximize=True)),
    ("Adagrad", dict(lr=0.2, lr_decay=0.01, initial_accumulator_value=0.1)),
    ("RMSprop", dict(lr=0.005, momentum=0.8, centered=True, weight_decay=0.01, eps=1e-6)),
    ("Adadelta", dict(lr=0.5, rho=0.95, eps=1e-5, weight_decay=0.01)),
    ("Adam", dict(lr=0.05, amsgrad=True, weight_decay=0.05)),
    ("AdamW", dict(lr=0.05, weight_decay=0.1, amsgrad=True)),
    ("Adamax", dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.05)),
    ("NAdam", dict(lr=0.05, momentum_decay=0.01, betas=(0.85, 0.99))),
    ("RAdam", dict(lr=0.05, weight_decay=0.05)),
    ("Rprop", dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-4, 0.2))),
]
TORCH_TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture(scope="module")
def torch_cuda():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device (CPU-only build?)")
    return torch


@pytest.mark.parametrize("backend", [None, "cupy"], ids=["default", "cupy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", TORCH_CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(TORCH_CASES)])
def test_torch_cuda_tensors_in_place_vs_torch_optim(torch_cuda, case, dtype, backend):
    torch = torch_cuda
    if backend is None and not NUMBA_OK:
        pytest.skip(f"torch CUDA tensors default to numba-cuda: {NUMBA_WHY}")
    name, kwargs = case
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    # torch keeps scalar state (step, NAdam's mu_product) in the default dtype: float64 runs need
    # float64 there too, as fastopt computes its per-step scalars in float64 on the host.
    default = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)
    try:
        _torch_lockstep(torch, name, kwargs, dtype, tdtype, backend)
    finally:
        torch.set_default_dtype(default)


def _torch_lockstep(torch, name, kwargs, dtype, tdtype, backend):
    gen = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", dtype=tdtype, generator=gen) for s in [(7, 5), (13,)]]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    ptrs = [p.data_ptr() for p in ours]
    opt = getattr(fo, name)(ours, backend=backend, **kwargs)
    ref = getattr(torch.optim, name)(theirs, **kwargs)
    for _ in range(20):
        noise = [torch.randn(t.shape, device="cuda", dtype=tdtype, generator=gen) for t in init]
        opt.step([(p.detach() - 0.5) * 0.3 + 0.1 * n for p, n in zip(ours, noise)])
        for p, n in zip(theirs, noise):
            p.grad = (p.detach() - 0.5) * 0.3 + 0.1 * n
        ref.step()
    torch.cuda.synchronize()
    for p, q, ptr in zip(ours, theirs, ptrs):
        assert p.data_ptr() == ptr and p.device.type == "cuda"
        np.testing.assert_allclose(
            p.detach().cpu().numpy(), q.detach().cpu().numpy(), **TORCH_TOL[dtype]
        )
    unit = opt._groups[0]["units"][0]
    assert unit.backend.name == (backend or "numba-cuda")


def test_torch_cuda_mismatches(torch_cuda):
    torch = torch_cuda
    p = torch.zeros(4, device="cuda")
    opt = fo.SGD([p], lr=0.1, backend="cupy")
    with pytest.raises(ValueError, match="different devices"):
        opt.step([cupy.ones(4, dtype=cupy.float32)])  # a CuPy grad for a torch param
    with pytest.raises(ValueError, match="different devices"):
        opt.step([torch.ones(4)])  # a CPU tensor
    with pytest.raises(TypeError, match="dtype"):
        opt.step([torch.ones(4, device="cuda", dtype=torch.int32)])
    assert not bool(torch.any(p))


# ---------------------------------------------------------------------------------------------
# Clipping, non-finite skipping, reductions


@pytest.mark.parametrize("backend", ["cupy", pytest.param("numba-cuda", marks=needs_numba)])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_clipping_and_skipping_on_gpu(backend, dtype):
    kw = dict(lr=0.05, max_grad_norm=0.7, max_grad_value=0.4, skip_nonfinite=True)
    host = _params(dtype)
    dev = [cupy.asarray(a) for a in host]
    opt_d, opt_h = fo.Adam(dev, backend=backend, **kw), fo.Adam(host, **kw)
    for t in range(10):
        grads = grad_of(host, t)
        opt_h.step(grads)
        opt_d.step([cupy.asarray(g) for g in grads])
        np.testing.assert_allclose(opt_d.last_grad_norm, opt_h.last_grad_norm, rtol=1e-12)
    for d, h in zip(dev, host):
        np.testing.assert_allclose(_host(d), h, **FMA_TOL[dtype])
    before = [_host(d) for d in dev]
    steps = opt_d.state[0]["step"]
    grads = [cupy.asarray(g) for g in grad_of(host, 3)]
    grads[2][0, 1, 2] = cupy.inf
    opt_d.step(grads)
    assert opt_d.last_step_taken is False and opt_d.skipped_steps == 1
    assert opt_d.state[0]["step"] == steps
    assert all(np.array_equal(_host(d), b) for d, b in zip(dev, before))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n", [1, 1000, CHUNK + 5, 300 * CHUNK + 1])
def test_reductions_match_model_bit_for_bit(n, dtype):
    x = _reduction_input(n, dtype, seed=n % 31)
    _, want, _ = model_sumsq(x)
    got, finite = kcupy.sumsq_and_finite(cupy.asarray(x))
    assert finite is True and _same(got, want)
    if NUMBA_OK:
        from numba import cuda

        for blocks in (None, 1, 7):
            got_n, finite_n = kcuda.sumsq_and_finite(cuda.to_device(x), blocks=blocks)
            assert finite_n is True and _same(got_n, want), blocks


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_reductions_subnormals_and_nonfinite(dtype):
    # No flush to zero anywhere: float32 inputs are subnormal (squared after widening to float64);
    # float64 inputs are normal with subnormal squares (a subnormal float64 squares to 0).
    finfo = np.finfo(dtype)
    value = finfo.tiny / 4 if dtype == np.float32 else np.sqrt(finfo.tiny) / 4
    tiny = np.full(1000, value, dtype)
    got, _ = kcupy.sumsq_and_finite(cupy.asarray(tiny))
    assert got > 0 and _same(got, model_sumsq(tiny)[1])
    for value in (np.nan, np.inf, -np.inf):
        x = _reduction_input(2 * CHUNK + 3, dtype)
        x[CHUNK + 1] = value
        assert kcupy.sumsq_and_finite(cupy.asarray(x))[1] is False
        if NUMBA_OK:
            from numba import cuda

            assert kcuda.sumsq_and_finite(cuda.to_device(x))[1] is False
    if NUMBA_OK:
        from numba import cuda

        got_n, _ = kcuda.sumsq_and_finite(cuda.to_device(tiny))
        assert got_n > 0 and _same(got_n, model_sumsq(tiny)[1])


# ---------------------------------------------------------------------------------------------
# state_dict round trips and errors


@pytest.mark.parametrize("backend", ["cupy", pytest.param("numba-cuda", marks=needs_numba)])
def test_state_dict_round_trip_device_host(backend):
    kw = dict(lr=0.01, amsgrad=True, weight_decay=0.01)
    host = _params(np.float64)
    dev = [cupy.asarray(a) for a in host]
    opt_d, opt_h = fo.Adam(dev, backend=backend, **kw), fo.Adam(host, **kw)
    for t in range(5):
        grads = grad_of(host, t)
        opt_h.step(grads)
        opt_d.step([cupy.asarray(g) for g in grads])
    sd = opt_d.state_dict()
    assert all(
        isinstance(v, np.ndarray) for e in sd["state"].values() for k, v in e.items() if k != "step"
    )
    # device -> host
    host2 = [_host(d) for d in dev]
    opt_h2 = fo.Adam(host2, **kw)
    opt_h2.load_state_dict(sd)
    # host -> device, and device state entries (CuPy arrays) -> device
    dev2 = [cupy.asarray(a) for a in host2]
    opt_d2 = fo.Adam(dev2, backend=backend, **kw)
    opt_d2.load_state_dict(opt_h2.state_dict())
    sd_cupy = opt_h2.state_dict()
    for entry in sd_cupy["state"].values():
        for k, v in entry.items():
            if isinstance(v, np.ndarray):
                entry[k] = cupy.asarray(v).astype(np.float32)  # cast on load, too
    dev3 = [cupy.asarray(a) for a in host2]
    opt_d3 = fo.Adam(dev3, backend=backend, **kw)
    opt_d3.load_state_dict(sd_cupy)
    # ... equals a host optimizer loaded with the same float32-rounded state
    sd_rounded = opt_h2.state_dict()
    for entry in sd_rounded["state"].values():
        for k, v in entry.items():
            if isinstance(v, np.ndarray):
                entry[k] = v.astype(np.float32)
    host3 = [a.copy() for a in host2]
    opt_h3r = fo.Adam(host3, **kw)
    opt_h3r.load_state_dict(sd_rounded)
    grads = grad_of(host2, 9)
    opt_h2.step(grads)
    opt_d2.step([cupy.asarray(g) for g in grads])
    opt_d3.step([cupy.asarray(g) for g in grads])
    exact = backend == "cupy"
    for a, b in zip(dev2, host2):
        if exact:
            _assert_same(_host(a), b, "round trip")
        else:
            _assert_close(_host(a), b, FMA_TOL[np.float64], "round trip")
    opt_h3r.step(grads)
    assert opt_d3.state_dict()["state"][0]["exp_avg"].dtype == np.float64  # cast on load
    for a, b in zip(dev3, host3):
        if exact:
            _assert_same(_host(a), b, "float32 CuPy state loaded")
        else:
            _assert_close(_host(a), b, FMA_TOL[np.float64], "float32 CuPy state loaded")
    assert not all(np.array_equal(_host(a), _host(b)) for a, b in zip(dev3, dev2))  # it was rounded
    # a host CPU optimizer loads CuPy state entries as well
    opt_h3 = fo.Adam([_host(d) for d in dev], **kw)
    opt_h3.load_state_dict(sd_cupy)
    assert opt_h3.state[0]["exp_avg"].dtype == np.float64


@pytest.mark.parametrize("backend", ["cupy", pytest.param("numba-cuda", marks=needs_numba)])
def test_bad_gradients_change_nothing_on_gpu(backend):
    p = cupy.ones((3, 4), dtype=cupy.float32)
    q = cupy.ones(4, dtype=cupy.float32)
    opt = fo.Adam([p, q], lr=0.1, backend=backend)
    opt.step([cupy.ones((3, 4), cupy.float32), cupy.ones(4, cupy.float32)])
    before = (_host(p), _host(q))
    good = cupy.ones((3, 4), cupy.float32)
    bad_cases = [
        (np.ones(4, np.float32), ValueError, "different devices"),
        (cupy.ones(4, cupy.int32), TypeError, "dtype"),
        (cupy.ones(5, cupy.float32), ValueError, "shape"),
        (cupy.ones((4, 2), cupy.float32)[:, 0], ValueError, "contiguous"),
    ]
    for bad, exc, match in bad_cases:
        with pytest.raises(exc, match=match):
            opt.step([good, bad])
    assert np.array_equal(_host(p), before[0]) and np.array_equal(_host(q), before[1])
    assert opt.state[0]["step"] == 1 and opt.state[1]["step"] == 1
    with pytest.raises(ValueError, match="one group only"):
        fo.SGD([{"params": [p]}, {"params": [p.reshape(12)]}], lr=0.1)


@pytest.mark.parametrize("backend", ["cupy", pytest.param("numba-cuda", marks=needs_numba)])
def test_checkpoint_load_on_cuda(tmp_path, backend):
    """fastopt.load(device="cuda") returns CuPy arrays with the saved bits; restoring them into a
    GPU optimizer continues the host run."""
    params = {f"p{i}": a for i, a in enumerate(_params(np.float64))}
    opt_h = fo.Adam(list(params.values()), lr=0.01, amsgrad=True)
    for t in range(3):
        opt_h.step(grad_of(list(params.values()), t))
    path = fo.save(tmp_path / "ckpt.fastopt", params=params, optimizer=opt_h)
    ckpt = fo.load(path, device="cuda")
    assert ckpt.device == "cuda" and ckpt.params.keys() == params.keys()
    for name, a in params.items():
        assert isinstance(ckpt.params[name], cupy.ndarray), name
        assert ckpt.params[name].device.id == 0
        _assert_same(cupy.asnumpy(ckpt.params[name]), a, name)
    saved = [v for e in ckpt.optimizer_state["state"].values() for v in e.values()]
    assert any(isinstance(v, cupy.ndarray) for v in saved)
    assert not any(isinstance(v, np.ndarray) for v in saved)
    dev = {name: cupy.zeros_like(a) for name, a in ckpt.params.items()}
    opt_d = fo.Adam(list(dev.values()), lr=0.01, amsgrad=True, backend=backend)
    ckpt.restore(params=dev, optimizer=opt_d)
    grads = grad_of(list(params.values()), 3)
    opt_h.step(grads)
    opt_d.step([cupy.asarray(g) for g in grads])
    for name, a in params.items():
        if backend == "cupy":
            _assert_same(cupy.asnumpy(dev[name]), a, name)
        else:
            _assert_close(cupy.asnumpy(dev[name]), a, FMA_TOL[np.float64], name)


# ---------------------------------------------------------------------------------------------
# Stream ordering: a producer delayed on a non-blocking stream, then step() ordered on it. Run on
# the legacy default stream, the update would read the gradient before it is written (and the
# norm read-back would return 0); work queued on the stream after step() must see the update.

RACE_N = 1 << 20
SPIN_CYCLES = 200_000_000  # ~0.1 s at ~2 GHz: far longer than any launch latency


def _cupy_spin():
    """Delay the current CuPy stream by SPIN_CYCLES clock cycles (one thread spinning)."""
    k = cupy.RawKernel(
        'extern "C" __global__ void fo_spin(long long cycles) {'
        " long long t0 = clock64(); while (clock64() - t0 < cycles) {} }",
        "fo_spin",
    )
    k((1,), (1,), (np.int64(SPIN_CYCLES),))


def _torch_backends():
    return [pytest.param(None, marks=needs_numba, id="default"), pytest.param("cupy", id="cupy")]


@pytest.mark.parametrize("backend", _torch_backends())
def test_step_follows_torch_side_stream(torch_cuda, backend):
    torch = torch_cuda
    p = torch.zeros(RACE_N, device="cuda")
    g = torch.zeros(RACE_N, device="cuda")
    opt = fo.SGD([p], lr=1.0, max_grad_norm=1e30, backend=backend)
    opt.step([torch.zeros_like(g)])  # compile first: the race is on the device, not in a compile
    torch.cuda.synchronize()
    s = torch.cuda.Stream()  # torch's pool streams are non-blocking
    with torch.cuda.stream(s):
        torch.cuda._sleep(SPIN_CYCLES)
        g.fill_(1.0)
        opt.step([g])  # p = 0 - 1 * 1
        p.add_(1.0)  # queued after the update: sees it
    s.synchronize()
    assert opt.last_grad_norm == pytest.approx(np.sqrt(RACE_N))
    assert bool(torch.all(p == 0.0))


SIDE_STREAM_CASES = {
    # name: (optimizer class, keyword arguments, parameter shape, torch dtype name)
    "lamb": (fo.LAMB, {"lr": 0.1}, (RACE_N,), "float32"),
    "lamb-bf16-master": (fo.LAMB, {"lr": 0.1, "master_weights": True}, (RACE_N,), "bfloat16"),
    "adafactor": (fo.Adafactor, {"lr": 0.1}, (1024, 1024), "float32"),
    "muon": (
        fo.Muon,
        {"lr": 0.2, "ns_dtype": "float32", "weight_decay": 0.0},
        (1024, 1024),
        "float32",
    ),
}


def _side_stream_cases():
    out = []
    for name in SIDE_STREAM_CASES:
        for backend in _torch_backends():
            if name.endswith("bf16-master") and backend.values[0] == "cupy":
                continue  # torch bfloat16 on CuPy needs CuPy >= 14 with ml_dtypes
            out.append(
                pytest.param(name, *backend.values, marks=backend.marks, id=f"{name}-{backend.id}")
            )
    return out


@pytest.mark.parametrize(("name", "backend"), _side_stream_cases())
def test_first_step_of_per_tensor_and_matrix_rules_follows_torch_side_stream(
    torch_cuda, name, backend
):
    """LAMB (float32; bfloat16 with master weights: the master copy, the float32 stage and the
    conversion back to bfloat16), Adafactor and Muon: a FIRST step (state, master copy, layout
    uploads and scratch made inside it) on a non-blocking side stream delayed by a spin, its
    gradient written there after the spin. Every launch, copy and fill of the step must be on
    that stream: one on the legacy default stream would run before the gradient is written (or
    before the master copy / stage it reads), and the parameter would miss the update. The
    kernels are compiled beforehand by another optimizer of the same class, so that the race is
    on the device. The parameter then equals a numba-cpu step's (to the GPU's rounding)."""
    import ml_dtypes

    torch = torch_cuda
    cls, kw, shape, dtype_name = SIDE_STREAM_CASES[name]
    dtype = getattr(torch, dtype_name)
    host_dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.float32
    rng = np.random.default_rng(3)
    init = rng.standard_normal(shape).astype(np.float32).astype(host_dtype)
    grad = rng.standard_normal(shape).astype(np.float32).astype(host_dtype)
    ref = init.copy()
    cls([ref], **kw).step([grad.copy()])

    def plus_one(a):  # p.add_(1.0) in the parameter's dtype
        return (a.astype(np.float32) + np.float32(1.0)).astype(host_dtype).astype(np.float32)

    want = plus_one(ref)

    def device(a):
        return torch.from_numpy(a.astype(np.float32)).to(device="cuda", dtype=dtype)

    warm = device(init)
    cls([warm], backend=backend, **kw).step([device(grad)])  # compile first
    p, g, g_src = device(init), torch.zeros(shape, device="cuda", dtype=dtype), device(grad)
    opt = cls([p], backend=backend, **kw)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()  # torch's pool streams are non-blocking
    with torch.cuda.stream(s):
        torch.cuda._sleep(SPIN_CYCLES)
        g.copy_(g_src)
        opt.step([g])  # the first step: its state made here too
        p.add_(1.0)  # queued after the update: sees it
    s.synchronize()
    got = p.float().cpu().numpy()
    assert float(np.median(np.abs(want - plus_one(init)))) > 1e-3  # far above the tolerance
    if dtype_name == "bfloat16":
        np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)  # one bfloat16 ulp
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", _torch_backends())
def test_stream_option_orders_on_the_given_stream(torch_cuda, backend):
    torch = torch_cuda
    p = torch.zeros(RACE_N, device="cuda")
    g = torch.zeros(RACE_N, device="cuda")
    s = torch.cuda.Stream()
    opt = fo.Adam([p], lr=1.0, skip_nonfinite=True, backend=backend, stream=s)
    ref = fo.Adam([np.zeros(RACE_N, np.float32)], lr=1.0)
    opt.step([torch.zeros_like(g)])  # compile first
    ref.step([np.zeros(RACE_N, np.float32)])
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(SPIN_CYCLES)
        g.fill_(float("nan"))
    opt.step([g])  # outside the context: stream= keeps it on s, so the NaN is seen
    assert opt.last_step_taken is False and opt.skipped_steps == 1
    with torch.cuda.stream(s):
        torch.cuda._sleep(SPIN_CYCLES)
        g.fill_(1.0)
    opt.step([g])
    ref.step([np.ones(RACE_N, np.float32)])
    with torch.cuda.stream(s):
        p.add_(1.0)
    s.synchronize()
    assert opt.last_step_taken is True and opt.state[0]["step"] == 2
    np.testing.assert_allclose(p.cpu().numpy(), ref.units()[0].param + 1.0, rtol=1e-6)


def test_clipping_follows_torch_side_stream(torch_cuda):
    torch = torch_cuda
    if not NUMBA_OK:
        pytest.skip(f"torch CUDA tensors default to numba-cuda: {NUMBA_WHY}")
    g = torch.zeros(RACE_N, device="cuda")
    fo.clip_grad_norm([g], 1.0)  # compile first
    fo.clip_grad_value([g], 1.0)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(SPIN_CYCLES)
        g.fill_(2.0)
        norm = fo.clip_grad_norm([g], 1.0)
        fo.clip_grad_value([g], 1e-4)
        g.mul_(2.0)
    s.synchronize()
    assert norm == pytest.approx(2.0 * np.sqrt(RACE_N))
    assert bool(torch.all(g == torch.tensor(2e-4, device="cuda")))


@pytest.mark.parametrize("backend", ["cupy", pytest.param("numba-cuda", marks=needs_numba)])
def test_step_follows_cupy_nonblocking_stream(backend):
    p = cupy.zeros(RACE_N, dtype=cupy.float32)
    g = cupy.zeros(RACE_N, dtype=cupy.float32)
    opt = fo.SGD([p], lr=1.0, max_grad_norm=1e30, backend=backend)
    opt.step([cupy.zeros_like(g)])  # compile first
    _cupy_spin()  # and the spin kernel
    cupy.cuda.Device().synchronize()
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        _cupy_spin()
        g.fill(1.0)
        opt.step([g])
        p += 1.0
    s.synchronize()
    assert opt.last_grad_norm == pytest.approx(np.sqrt(RACE_N))
    assert bool(cupy.all(p == 0.0))


@needs_numba
@pytest.mark.skipif(cupy.cuda.runtime.getDeviceCount() < 2, reason="needs two CUDA devices")
def test_numba_cuda_state_and_launches_on_the_parameters_device(torch_cuda):
    from fastopt.kernels import cuda_launch

    torch = torch_cuda
    gen = torch.Generator().manual_seed(0)
    host, grad = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    p = host.to("cuda:1")
    opt = fo.Adam([p], lr=0.1)  # numba-cuda, the default for torch tensors
    ref = fo.Adam([host.numpy().copy()], lr=0.1)
    with torch.cuda.device(0):  # another device current: state and launches still on cuda:1
        opt.step([grad.to("cuda:1")])
        ref.step([grad.numpy()])
        assert cuda_launch.device_of(opt.state[0]["exp_avg"]) == 1
        torch.cuda.synchronize(1)
        np.testing.assert_allclose(p.cpu().numpy(), ref.units()[0].param, **FMA_TOL[np.float32])
        before = p.cpu().numpy()
        with pytest.raises(ValueError, match="cuda:0"):
            opt.step([grad.to("cuda:0")])
        assert np.array_equal(p.cpu().numpy(), before)


# -- GPU audit fixes: EMA over numba-cuda arrays (bfloat16 too), vector_cuda per thread/stream


@needs_numba
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_ema_on_numba_cuda_matches_cpu_bit_for_bit(dtype):
    """numba's DeviceNDArray has no copy() and cannot assign bfloat16 (``a[...] = b`` types
    the dtype): update, swapped, copy_to_params and a state_dict round trip go through the
    backend, bit for bit the CPU EMA, without CuPy in the numba path."""
    import ml_dtypes
    from numba import cuda

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(3)
    host = [rng.standard_normal(s).astype(np.float32).astype(dt) for s in [(7, 5), (1000,)]]
    dev = [cuda.to_device(h.view(np.uint16) if dt.itemsize == 2 else h) for h in host]
    if dt.itemsize == 2:
        dev = [d.view(dt) for d in dev]
    ema_h, ema_d = fo.EMA(host, 0.9), fo.EMA(dev, 0.9)
    for _ in range(3):
        ema_h.update()
        ema_d.update()
        for h, d in zip(host, dev):
            new = (rng.standard_normal(h.shape) * 0.1).astype(np.float32).astype(dt)
            h[...] = new
            (d.view(np.uint16) if dt.itemsize == 2 else d).copy_to_device(
                new.view(np.uint16) if dt.itemsize == 2 else new
            )

    def bits(a):
        a = (
            a.view(np.uint16).copy_to_host()
            if hasattr(a, "copy_to_host") and dt.itemsize == 2
            else a
        )
        return np.asarray(_host(a)).view(np.uint8).tobytes()

    for a, b in zip(ema_h.averages, ema_d.averages):
        assert _host(a).tobytes() == _host(b).tobytes()
    with ema_h.swapped(), ema_d.swapped():
        for h, d in zip(host, dev):
            assert h.view(np.uint8).tobytes() == bits(d)
    for h, d in zip(host, dev):
        assert h.view(np.uint8).tobytes() == bits(d)
    sd = ema_d.state_dict()
    again = fo.EMA(dev, 0.9)
    again.load_state_dict(sd)
    for a, b in zip(ema_h.averages, again.averages):
        assert _host(a).tobytes() == _host(b).tobytes()
    ema_h.copy_to_params()
    ema_d.copy_to_params()
    for h, d in zip(host, dev):
        assert h.view(np.uint8).tobytes() == bits(d)


def test_ema_follows_torch_side_stream(torch_cuda):
    """The EMA's first copy and lerp on the torch current (non-blocking) stream: queued after
    a spin and a fill there, they see the fill."""
    torch = torch_cuda
    p = torch.zeros(RACE_N, device="cuda")
    ema = fo.EMA([p], 0.5)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(SPIN_CYCLES)
        p.fill_(2.0)
        ema.update()  # average = 2
        sd = ema.state_dict()  # read after this stream
    assert np.all(sd["averages"][0] == 2.0)


@needs_numba
def test_vector_cuda_threads_and_stream():
    """Two threads reducing vectors of one length at once get their own sums (the partials
    buffer is per thread), on the stream they name."""
    import threading

    from numba import cuda

    from fastopt.kernels import vector_cuda as vc

    n = 1 << 20
    xs = {k: cuda.to_device(np.full(n, float(k), np.float32)) for k in (1, 2)}
    streams = {k: cuda.stream() for k in (1, 2)}
    bad = []

    def work(k):
        for _ in range(50):
            got = vc.dot(xs[k], xs[k], streams[k])
            if got != float(k * k * n):
                bad.append((k, got))

    ts = [threading.Thread(target=work, args=(k,)) for k in (1, 2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert bad == []


@needs_numba
def test_lbfgs_numba_cuda_stream_option(torch_cuda):
    """LBFGS on torch CUDA tensors (numba-cuda) with ``stream=`` a torch side stream: the same
    iterates as without it."""
    torch = torch_cuda
    x0 = np.linspace(-1.2, 1.0, 64)

    def run(stream):
        x = torch.tensor(x0, device="cuda")

        def closure():
            h = x.cpu().numpy()
            a, b = h[:-1], h[1:]
            g = np.zeros_like(h)
            g[:-1] = -400.0 * a * (b - a * a) - 2 * (1 - a)
            g[1:] += 200.0 * (b - a * a)
            return float(np.sum(100.0 * (b - a * a) ** 2 + (1 - a) ** 2)), [
                torch.tensor(g, device="cuda")
            ]

        opt = fo.LBFGS([x], lr=1.0, max_iter=5, line_search_fn="strong_wolfe", stream=stream)
        for _ in range(3):
            opt.step(closure)
        torch.cuda.synchronize()
        return x.cpu().numpy()

    s = torch.cuda.Stream()
    np.testing.assert_array_equal(run(s), run(None))
