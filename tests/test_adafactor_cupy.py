"""Adafactor's kernels on the CuPy backend: kernels/factored_kernels.cu launched by
kernels/factored_cupy.py, against the numba-cpu kernel of kernels/factored.py.

Without a GPU: NVRTC compiles the module CuPy would, for sm_90; a host harness
(tests/factored_host_harness.cu, built once by nvcc) runs the kernels' own __host__ __device__
functions with the block's threads emulated in order. Each of the five phases then equals the
numba-cpu kernel's bit for bit (rowpart/colpart, the factors and bmean, the update, variance
and item sums, the step sizes, the parameter; float32 and float64; a 3-D tensor, a matrix of
several tiles, a vector of two pieces, a scalar, empty tensors; maximize, weight decay,
clipping, both branches of lerp), and the launch sequence of factored_cupy.step over a fake
CuPy gives factored.step's bits. On a GPU (skipped here): CuPy gives numba-cpu's bits.
"""

import ctypes
import pathlib
import re

import numpy as np
import pytest
from cupy_ptx import build_harness
from cupy_ptx import cuda_c as _cuda_c
from cupy_ptx import entry_body as _entry_body
from cupy_ptx import nvrtc_ptx as nvrtc_ptx_of
from cupy_ptx import same as _same
from fake_cupy import FakeDeviceArray, install
from test_lbfgs_cupy import FakeVectorCuPy
from test_segments_cupy import SegmentArray

import fastopt as fo
from fastopt import dispatch
from fastopt.kernels import cupy as kcupy
from fastopt.kernels import factored, factored_cupy
from fastopt.kernels.layout import REDUCTION_CHUNK

HERE = pathlib.Path(__file__).resolve().parent
DTYPES = (np.float32, np.float64)
# A 3-D tensor (3 matrices of two column tiles), a matrix of two row tiles, a vector of two
# pieces, a short vector, a scalar, an empty vector and a matrix of no rows. Under
# factored.PARALLEL_THRESHOLD elements: the serial numba kernel.
SHAPES = (
    (3, 2, 300),
    (factored.TILE_ROWS + 2, 20),
    (REDUCTION_CHUNK + 40,),
    (40,),
    (),
    (0,),
    (2, 0, 3),
)
# Per step: (maximize, weight decay, d, (gradient scale, clip)). Steps 1, 2, 3: w = 1, 0.57,
# 0.42 (both branches of lerp); d = 0.25 makes RMS(u) / d > 1 (the clipped update).
STEPS = (
    (True, 0.1, 1.0, (0.5, 0.8)),
    (False, 0.0, 0.25, (1.0, 0.0)),
    (False, 0.2, 1.0, (2.0, 1.5)),
)


# ---------------------------------------------------------------------------------------------
# The module CuPy compiles: NVRTC, as cupy.RawModule does, for sm_90.


@pytest.fixture(scope="module")
def nvrtc_ptx():
    """The PTX of factored_cupy's module, compiled with its options (and CuPy's -ftz=true)."""
    return nvrtc_ptx_of(factored_cupy.source(), factored_cupy.COMPILE_OPTIONS)


def test_nvrtc_compiles_every_phase_with_explicit_roundings(nvrtc_ptx):
    """Every kernel is there; no fused multiply-add, nothing flushed to zero or approximated,
    no stack frame; the block phases synchronise and sum in shared memory."""
    assert _cuda_c()._entries(nvrtc_ptx) == factored_cupy.kernel_names()
    for forbidden in ("fma.", ".ftz", ".approx", ".local"):
        assert forbidden not in nvrtc_ptx, forbidden
    for dt in DTYPES:
        for phase in ("tiles", "items"):
            body = _entry_body(nvrtc_ptx, factored_cupy.kernel_name(phase, dt))
            assert "bar.sync" in body and "ld.shared.f64" in body and "add.rn.f64" in body
        body = _entry_body(nvrtc_ptx, factored_cupy.kernel_name("factors", dt))
        assert "bar.sync" in body and "div.rn.f64" in body
        body = _entry_body(nvrtc_ptx, factored_cupy.kernel_name("items", dt))
        s = "f32" if dt == np.float32 else "f64"
        assert f"sqrt.rn.{s}" in body and f"div.rn.{s}" in body
        assert "sqrt.rn.f64" in _entry_body(nvrtc_ptx, factored_cupy.kernel_name("scales", dt))


# ---------------------------------------------------------------------------------------------
# The host harness.


_p, _i, _ll, _d = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_double
ARGTYPES = {
    "fo_host_af_tiles": [_i, _p, _d, _d, _p, _ll, _p, _p],
    "fo_host_af_factors": [_i, _p, _ll, _p, _p, _p, _p, _p, _p],
    "fo_host_af_items": [_i, _p, _p, _p, _d, _d, _p, _ll, _p, _p, _p, _p, _p, _p],
    "fo_host_af_scales": [_i, _p, _p, _ll, _p, _p, _p],
    "fo_host_af_apply": [_i, _p, _p, _p, _ll, _p, _p],
    "fo_host_af_constant": [ctypes.c_char_p],
}
RESTYPES = {"fo_host_af_constant": _ll}


@pytest.fixture(scope="module")
def harness(nvcc, tmp_path_factory):
    """tests/factored_host_harness.cu built once for this module (nvcc, a shared library)."""
    workdir = tmp_path_factory.mktemp("factored_cupy")
    return build_harness(nvcc, HERE / "factored_host_harness.cu", workdir, ARGTYPES, RESTYPES)


def test_harness_constants_are_factored_py(harness):
    """The table columns, the tile width and the scalar indices are factored.py's."""
    names = (
        "KIND",
        "SEG",
        "LO",
        "ROWS",
        "COLS",
        "LD",
        "RV",
        "CV",
        "BATCH",
        "RP",
        "CP",
        "NCB",
        "NRB",
        "VO",
        "ITEM_FIELDS",
        "B_RV",
        "B_M",
        "B_CV",
        "B_N",
        "B_RP",
        "B_CP",
        "B_NCB",
        "B_NRB",
        "BATCH_FIELDS",
        "TILE_COLS",
    )
    for name in names:
        assert harness.fo_host_af_constant(name.encode()) == getattr(factored, name), name
    for k, field in enumerate(factored.H_FIELDS + factored.H64_FIELDS):
        want = k if k < len(factored.H_FIELDS) else k - len(factored.H_FIELDS)
        assert harness.fo_host_af_constant(field.upper().encode()) == want, field
    assert harness.fo_host_af_constant(b"H_FIELDS") == len(factored.H_FIELDS)


# ---------------------------------------------------------------------------------------------
# The case: a flat buffer of SHAPES, three steps of STEPS.


def _scalars(dtype, t, maximize, wd, d, lr=0.05):
    """(h, h64) as fastopt.optim.Adafactor builds them for step ``t``."""
    st = np.dtype(dtype).type
    w = float(t) ** -0.8
    eps1 = float(np.finfo(dtype).eps)
    decay = 1 - lr * wd if wd != 0 else 1.0
    h = (
        st(-1.0 if maximize else 1.0),
        st(w),
        st(1.0) - st(w),
        st(eps1),
        st(eps1 * eps1),
        st(decay),
        st(1.0),
    )
    return h, (1e-3, min(lr, 1 / float(t) ** 0.5), d)


def _case(dtype):
    rng = np.random.default_rng(11)
    layout = factored.plan(SHAPES)
    n = int(layout["numel"].sum())
    p = rng.standard_normal(n).astype(dtype)
    p[1800 + 1320 + REDUCTION_CHUNK + 40 :][:40] = 0  # the short vector: RMS(p) = 0 < eps2
    grads = [(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 2, n)).astype(dtype) for _ in STEPS]
    states = [np.zeros(k, dtype) for k in factored.state_sizes(SHAPES)]
    return layout, p, grads, states


def _step_args(dtype, t):
    maximize, wd, d, gs = STEPS[t - 1]
    h, h64 = _scalars(dtype, t, maximize, wd, d)
    st = np.dtype(dtype).type
    return h, h64, (st(gs[0]), st(gs[1]))


def _arg(a):
    """A launch argument as the harness takes it: an array's address, a float, an int."""
    if isinstance(a, (FakeDeviceArray, np.ndarray)):
        return (a.host if isinstance(a, FakeDeviceArray) else a).ctypes.data
    return float(a) if isinstance(a, (float, np.floating)) else int(a)


def _host_launcher(harness, dtype):
    """``run(phase, *args)``: the harness's launch of ``phase`` over arrays of ``dtype``."""

    def run(phase, *args):
        getattr(harness, f"fo_host_af_{phase}")(int(dtype == np.float64), *map(_arg, args))

    return run


# ---------------------------------------------------------------------------------------------
# Phase by phase: the numba-cpu kernel's bits.


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_each_phase_equals_the_numba_cpu_kernel(harness, dtype):
    """Three steps (the factors of one read by the next); after each phase of the harness, what
    it wrote equals what the numba-cpu kernel left in its scratch and state, bit for bit."""
    layout, p, grads, states = _case(dtype)
    host = dict(p=p.copy(), states=[s.copy() for s in states])
    dev = dict(p=p.copy(), states=[s.copy() for s in states])
    cpu = factored.scratch(layout, dtype)
    nan = {k: np.full(v.size, np.nan, v.dtype) for k, v in cpu.items()}  # unwritten shows
    items, batches = layout["items"], layout["batches"]
    nitems, nbatches, nseg = items.shape[0], batches.shape[0], layout["numel"].size
    for t, g in enumerate(grads, 1):
        h, h64, gs = _step_args(dtype, t)
        factored.step(host["p"], g, *host["states"], h, h64, gs, layout, cpu)
        w = {k: v.copy() for k, v in nan.items()}
        row_var, col_var, variance = dev["states"]
        hs = kcupy._scalars(h, np.dtype(dtype))
        h64s = np.array(h64, np.float64)
        clip = gs[1] if gs[1] > 0 else np.inf
        run = _host_launcher(harness, dtype)
        rp, cp, bmean, update, part, scale = (w[k] for k in factored_cupy.SCRATCH)
        run("tiles", g, gs[0], clip, items, nitems, rp, cp)
        assert _same(rp, cpu["rowpart"]) and _same(cp, cpu["colpart"]), t
        run("factors", batches, nbatches, rp, cp, row_var, col_var, bmean, hs)
        assert _same(bmean, cpu["bmean"]), (t, "bmean")
        for a, b in zip(dev["states"][:2], host["states"][:2], strict=True):
            assert _same(a, b), (t, "factors")
        assert np.isnan(col_var[-6:]).all() and np.isfinite(col_var[:-6]).all()  # (2, 0, 3)
        args = (row_var, col_var, bmean, variance, update, part)
        run("items", dev["p"], g, hs, gs[0], clip, items, nitems, *args)
        assert _same(update, cpu["update"]), (t, "update")
        assert _same(part, cpu["part"].ravel()), (t, "part")
        assert _same(variance, host["states"][2]), (t, "variance")
        run("scales", layout["first"], layout["numel"], nseg, part, h64s, scale)
        assert _same(scale, cpu["scale"]), (t, "scale")
        run("apply", dev["p"], hs, items, nitems, update, scale)
        assert _same(dev["p"], host["p"]), (t, "p")
    clipped = np.abs(grads[0] * np.dtype(dtype).type(0.5)) > 0.8
    assert clipped.any() and not clipped.all()
    assert not _same(host["p"], p)


# ---------------------------------------------------------------------------------------------
# The launch sequence through a fake CuPy whose launches run on the harness.


@pytest.fixture
def fake(harness, nvrtc_ptx, monkeypatch):
    """A fake CuPy over the harness; each launch's arguments are checked against the kernel's
    PTX signature and its configuration against the kernels' contract."""
    sizes_of = _cuda_c()._param_sizes

    def run(name, grid, block, args):
        sizes = [8 if isinstance(a, FakeDeviceArray) else a.nbytes for a in args]
        assert sizes == sizes_of(nvrtc_ptx, name), name
        phase, sfx = re.fullmatch(r"fo_af_(\w+)_(f32|f64)", name).groups()
        floats = [a for a in args if isinstance(a, np.floating)]
        assert all(type(a) is (np.float64 if sfx == "f64" else np.float32) for a in floats)
        threads = {"tiles": factored.TILE_COLS, "items": factored.TILE_COLS}
        if phase in threads:
            assert block == (threads[phase],), name
        _host_launcher(harness, np.float64 if sfx == "f64" else np.float32)(phase, *args)

    fake = FakeVectorCuPy(run)
    fake.ndarray = SegmentArray
    fake.zeros = lambda n, dtype: SegmentArray(np.zeros(n, dtype))
    fake.empty = lambda n, dtype: SegmentArray(  # NaN (or -1): an element never written shows
        np.full(n, np.nan if np.dtype(dtype).kind == "f" else -1, dtype)
    )
    install(monkeypatch, fake)
    fresh = kcupy.RawModuleCache(factored_cupy.source, factored_cupy.COMPILE_OPTIONS)
    monkeypatch.setattr(factored_cupy, "_module", fresh)  # nothing compiled by another fake
    monkeypatch.setattr(kcupy, "_streams", {})
    monkeypatch.setattr(dispatch, "_INSTANCES", {})
    return fake


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_cupy_step_follows_factored_step(fake, dtype):
    """factored_cupy.step over fake CuPy arrays, three steps: the parameter and the states equal
    factored.step's bit for bit; five launches per step, in phase order, on CuPy's current
    stream; a buffer without matrices takes three."""
    layout, p, grads, states = _case(dtype)
    host = dict(p=p.copy(), states=[s.copy() for s in states])
    cpu = factored.scratch(layout, dtype)
    dp = SegmentArray(p.copy())
    dstates = [SegmentArray(s.copy()) for s in states]
    dlayout = factored_cupy.device_layout(layout, dp)
    assert dlayout["items"].shape == layout["items"].shape and dlayout["size"] == p.size
    assert all(dlayout[k] == layout[k] for k in ("rows", "cols", "vector", "rowpart", "colpart"))
    work = factored_cupy.scratch(dlayout, dtype, dp)
    fake.launches.clear()
    fake.current_ptr = 7
    for t, g in enumerate(grads, 1):
        h, h64, gs = _step_args(dtype, t)
        factored.step(host["p"], g, *host["states"], h, h64, gs, layout, cpu)
        factored_cupy.step(dp, SegmentArray(g), *dstates, h, h64, gs, dlayout, work)
        assert _same(dp.host, host["p"]), t
        for a, b in zip(dstates, host["states"], strict=True):
            assert _same(a.host, b), t
    names = [n for n, *_ in fake.launches]
    assert names == [factored_cupy.kernel_name(ph, dtype) for ph in factored_cupy.PHASES] * 3
    assert fake.streams == [7] * 15
    # a vector-only buffer: no tiles, no factors; its update in a larger shared buffer
    vlayout = factored_cupy.device_layout(factored.plan([(5,), (3,)]), dp)
    vwork = factored_cupy.scratch(vlayout, dtype, dp, update=work["update"])
    assert vwork["update"].size == 8 and vwork["update"].host.base is work["update"].host.base
    fake.launches.clear()
    v = SegmentArray(np.ones(8, dtype))
    h, h64, gs = _step_args(dtype, 1)
    factored_cupy.step(
        v,
        v,
        SegmentArray(np.zeros(0, dtype)),
        SegmentArray(np.zeros(0, dtype)),
        SegmentArray(np.zeros(8, dtype)),
        h,
        h64,
        gs,
        vlayout,
        vwork,
    )
    assert [n.split("_")[2] for n, *_ in fake.launches] == ["items", "scales", "apply"]


def test_optimizer_on_cupy_follows_numba_cpu(fake):
    """fastopt.Adafactor over fake CuPy arrays (a matrix of two row tiles, a 3-D tensor, a
    vector; weight decay and clipping), two steps: every parameter equal to numba-cpu's bit for
    bit, five launches per matrix unit and step, on CuPy's current stream."""
    rng = np.random.default_rng(5)
    shapes = [(70, 20), (2, 3, 5), (9,)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(2)]
    kw = dict(lr=0.05, weight_decay=0.1, max_grad_value=1.5)
    results = []
    for make, backend in ((np.copy, "numba-cpu"), (SegmentArray, "cupy")):
        params = [make(a.copy()) for a in init]
        opt = fo.Adafactor(params, backend=backend, **kw)
        fake.launches.clear()
        fake.current_ptr = 11
        for g in grads:
            opt.step([make(a.copy()) for a in g])
        assert opt.backend_name == backend
        results.append([a.host.copy() if backend == "cupy" else a for a in params])
    for got, want in zip(results[1], results[0], strict=True):
        assert _same(got, want)
    phases = [n.split("_")[2] for n, *_ in fake.launches]
    assert phases == (list(factored_cupy.PHASES) * 2 + ["items", "scales", "apply"]) * 2
    assert set(fake.streams) == {11}


def test_bad_input_is_refused_before_any_launch(fake):
    """Another dtype, another length, a host array or a host layout: clear errors, nothing
    launched, nothing written."""
    layout = factored.plan([(4, 3), (5,)])
    p = SegmentArray(np.ones(17, np.float32))
    dl = factored_cupy.device_layout(layout, p)
    work = factored_cupy.scratch(dl, np.float32, p)
    states = [SegmentArray(np.zeros(n, np.float32)) for n in factored.state_sizes([(4, 3), (5,)])]
    h, h64, gs = _step_args(np.float32, 1)
    bad = {
        "g dtype": ((p, SegmentArray(np.ones(17, np.float64)), *states, dl), TypeError),
        "g size": ((p, SegmentArray(np.ones(16, np.float32)), *states, dl), ValueError),
        "g host": ((p, np.ones(17, np.float32), *states, dl), TypeError),
        "row_var size": (
            (p, p, SegmentArray(np.zeros(3, np.float32)), *states[1:], dl),
            ValueError,
        ),
        "col_var dtype": (
            (p, p, states[0], SegmentArray(np.zeros(3, np.float64)), states[2], dl),
            TypeError,
        ),
        "host layout": ((p, p, *states, layout), TypeError),
    }
    for what, (args, err) in bad.items():
        *arrays, lay = args
        with pytest.raises(err):
            factored_cupy.step(*arrays, h, h64, gs, lay, work)
        assert not fake.launches, what
    assert p.host.tolist() == [1.0] * 17


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped here): CuPy gives numba-cpu's bits.


def test_cupy_kernels_give_numba_cpus_bits_on_a_gpu():
    ok, reason = kcupy.available()
    if not ok:
        pytest.skip(reason)
    import cupy

    for dtype in DTYPES:
        layout, p, grads, states = _case(dtype)
        host = dict(p=p.copy(), states=[s.copy() for s in states])
        cpu = factored.scratch(layout, dtype)
        dp = cupy.asarray(p)
        dstates = [cupy.asarray(s) for s in states]
        dlayout = factored_cupy.device_layout(layout, dp)
        work = factored_cupy.scratch(dlayout, dtype, dp)
        for t, g in enumerate(grads, 1):
            h, h64, gs = _step_args(dtype, t)
            factored.step(host["p"], g, *host["states"], h, h64, gs, layout, cpu)
            factored_cupy.step(dp, cupy.asarray(g), *dstates, h, h64, gs, dlayout, work)
        assert _same(dp.get(), host["p"]), dtype
        for a, b in zip(
            dstates[:1] + dstates[2:], host["states"][:1] + host["states"][2:], strict=True
        ):
            assert _same(a.get(), b), dtype
        # col_var: the empty matrix's NaN may differ in payload on the GPU
        assert _same(dstates[1].get()[:-6], host["states"][1][:-6]), dtype
