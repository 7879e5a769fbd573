"""LAMB, LARS and NovoGrad on the CuPy backend: the segment kernels of kernels/segment_kernels.cu
(the rules of kernels/segment_rules.cuh) launched by kernels/segment_cupy.py.

Without a GPU: NVRTC compiles the module CuPy would, for sm_90; a host harness
(tests/segment_host_harness.cu, built once by nvcc) runs the kernels' own __host__ __device__
functions with the block's threads emulated in order, and a fake CuPy routes every launch to it.
The partial sums, per-segment sums and scalars then equal the numba-cpu segment kernels bit for
bit, and the three optimizers over fake CuPy arrays follow the numba-cpu ones bit for bit (float32
and float64, several pieces per segment, zero-norm segments). On a GPU (skipped here): CuPy and
numba-cuda give the same bits.
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
from test_lbfgs_cupy import FakeCupyArray, FakeVectorCuPy
from test_segments import CASES  # the same optimizer cases as the CPU segment tests

import fastopt as fo
from fastopt import dispatch
from fastopt.kernels import cuda_launch, rules, segment_cpu, segment_cupy, segment_loops
from fastopt.kernels import cupy as kcupy
from fastopt.kernels.layout import REDUCTION_CHUNK, REDUCTION_THREADS

HERE = pathlib.Path(__file__).resolve().parent
DTYPES = (np.float32, np.float64)
SHAPES = ((30, 40), (40,), (7,), (REDUCTION_CHUNK + 300,))  # the last: two pieces


# ---------------------------------------------------------------------------------------------
# The module CuPy compiles: NVRTC, as cupy.RawModule does, for sm_90.


@pytest.fixture(scope="module")
def nvrtc_ptx():
    """The PTX of segment_cupy's module, compiled with its options (and CuPy's -ftz=true)."""
    return nvrtc_ptx_of(segment_cupy.source(), segment_cupy.COMPILE_OPTIONS)


def test_nvrtc_compiles_every_kernel_with_numba_cudas_roundings(nvrtc_ptx):
    """Every kernel is there; nothing flushed to zero or approximated; the float64 sums are
    explicitly rounded and the rules' fused multiply-adds are where NVVM puts them for
    numba-cuda (LAMB's moments, LARS's momentum, NovoGrad's per-tensor moment)."""
    assert _cuda_c()._entries(nvrtc_ptx) == segment_cupy.kernel_names()
    for forbidden in (".ftz", ".approx", ".local"):
        assert forbidden not in nvrtc_ptx, forbidden
    for dt, s in ((np.float32, "f32"), (np.float64, "f64")):

        def body(rule, launch, dt=dt):
            return _entry_body(nvrtc_ptx, segment_cupy.kernel_name(rule, launch, dt))

        for rule in rules.SEGMENT_RULES:
            red = body(rule, "reduce")
            assert "bar.sync" in red and "add.rn.f64" in red and "mul.rn.f64" in red, rule
        assert f"fma.rn.{s}" not in body("segment_norms", "reduce")
        assert len(re.findall(rf"fma\.rn\.{s}", body("lamb", "apply"))) >= 3
        assert f"fma.rn.{s}" in body("lars", "apply") and f"fma.rn.{s}" in body("novograd", "apply")
        assert "fma.rn.f64" in body("novograd", "segment")
        assert "fma.rn.f64" not in body("lamb", "segment")


# ---------------------------------------------------------------------------------------------
# The host harness, and a fake CuPy whose launches run on it.


_p, _i, _ll, _d = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_double
_s = ctypes.c_char_p
ARGTYPES = {
    "fo_host_seg_reduce": [_s, _i, _p, _p, _p, _p, _p, _d, _d, _p, _p, _p, _p, _ll, _p],
    "fo_host_seg_segment": [_s, _i, _p, _p, _p, _ll, _p, _p, _p, _p],
    "fo_host_seg_apply": [_s, _i, _p, _p, _p, _p, _p, _d, _d, _p, _p, _p, _p, _ll, _p],
    "fo_host_seg_constant": [_s],
}


@pytest.fixture(scope="module")
def harness(nvcc, tmp_path_factory):
    """tests/segment_host_harness.cu built once for this module (nvcc, a shared library)."""
    workdir = tmp_path_factory.mktemp("segment_cupy")
    return build_harness(nvcc, HERE / "segment_host_harness.cu", workdir, ARGTYPES)


def test_harness_constants_are_rules_py(harness):
    assert harness.fo_host_seg_constant(b"decay") == rules.FLAG_DECAY
    assert harness.fo_host_seg_constant(b"trust") == rules.FLAG_TRUST
    assert harness.fo_host_seg_constant(b"threads") == segment_loops.LANES == REDUCTION_THREADS


class SegmentArray(FakeCupyArray):
    """FakeCupyArray with what the optimizers' CuPy backend also uses."""

    __module__ = "cupy._fake"

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise TypeError("fake cupy arrays take slices only")
        return SegmentArray(self.host[key])

    def reshape(self, *shape):
        return SegmentArray(self.host.reshape(*shape))

    def __setitem__(self, key, value):
        self.host[key] = value.host if isinstance(value, FakeDeviceArray) else value

    def fill(self, value):
        self.host[...] = value


def _ptr(a):
    return a.host.ctypes.data if isinstance(a, FakeDeviceArray) else None


@pytest.fixture
def fake(harness, nvrtc_ptx, monkeypatch):
    """A fake CuPy over the harness; each launch's arguments are checked against the kernel's
    PTX signature and its configuration against the kernels' contract."""
    sizes_of = _cuda_c()._param_sizes

    def run(name, grid, block, args):
        sizes = [8 if isinstance(a, (FakeDeviceArray, np.uint64)) else a.nbytes for a in args]
        assert sizes == sizes_of(nvrtc_ptx, name), name
        rule, launch, sfx = re.fullmatch(
            r"fo_seg_(\w+)_(reduce|segment|apply)_(f32|f64)", name
        ).groups()
        dbl = int(sfx == "f64")
        if launch == "segment":
            first, out, flags, nseg, st, r, sums, h = args
            assert block == (segment_cupy.SEGMENT_THREADS,) and type(nseg) is np.int64
            rc = harness.fo_host_seg_segment(
                rule.encode(), dbl, *map(_ptr, (first, out, flags)), int(nseg),
                *map(_ptr, (st, r, sums)), h.ctypes.data,
            )  # fmt: skip
        else:
            p, g, s0, s1, h, gscale, clip, flags, lo, hi, seg, npieces, last = args
            assert block == (REDUCTION_THREADS,) and grid == (min(int(npieces), 1024),)
            assert type(gscale) is type(clip) is (np.float64 if dbl else np.float32)
            fn = harness.fo_host_seg_reduce if launch == "reduce" else harness.fo_host_seg_apply
            rc = fn(
                rule.encode(), dbl, *map(_ptr, (p, g, s0, s1)), h.ctypes.data, float(gscale),
                float(clip), *map(_ptr, (flags, lo, hi, seg)), int(npieces), _ptr(last),
            )  # fmt: skip
        assert rc == 0

    fake = FakeVectorCuPy(run)
    fake.ndarray = SegmentArray
    fake.zeros = lambda n, dtype: SegmentArray(np.zeros(n, dtype))
    fake.empty = lambda n, dtype: SegmentArray(  # NaN (or -1): an element never written shows
        np.full(n, np.nan if np.dtype(dtype).kind == "f" else -1, dtype)
    )
    install(monkeypatch, fake)
    fresh = kcupy.RawModuleCache(segment_cupy.source, segment_cupy.COMPILE_OPTIONS)
    monkeypatch.setattr(segment_cupy, "_module", fresh)  # nothing compiled by another fake
    monkeypatch.setattr(kcupy, "_streams", {})
    monkeypatch.setattr(dispatch, "_INSTANCES", {})  # no backend keeps the fake module
    return fake


# ---------------------------------------------------------------------------------------------
# Launch by launch: the numba-cpu kernels' bits.


def _layout_case(dtype, rng):
    sizes = [int(np.prod(s)) for s in SHAPES] + [0]  # an empty segment too
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    n = int(bounds[-1])
    p = rng.standard_normal(n).astype(dtype)
    p[bounds[1] : bounds[2]] = 0  # a zero-norm segment
    g = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)).astype(dtype)
    flags = np.array([3, 2, 1, 0, 3], np.int32)
    return bounds, p, g, flags


H = {
    "segment_norms": lambda st: (-1.0,),
    "lamb": lambda st: (1.0, 0.9, 0.1, 0.999, 0.001, 0.1, 0.001, 1e-6, 1e-10, 0.01, 0.02),
    "lars": lambda st: (1.0, 0.01, 0.001, 1e-9, 0.1, 0.9, 1.0),
    "novograd": lambda st: (-1.0, 0.9, 0.99, 0.01, 1e-8, 0.0, 0.01, 0.05, 0.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_each_launch_equals_the_numba_cpu_kernels(fake, dtype):
    """Every rule, two steps (the state written by the first read by the second), gradient
    scaled and clipped: partials, segment sums, scalars, scalar state and every updated array
    equal numba-cpu's, bit for bit."""
    rng = np.random.default_rng(7)
    bounds, p, g, flags = _layout_case(dtype, rng)
    layout = segment_loops.pieces(bounds)
    nseg, npieces = flags.size, layout[0].size
    dt = np.dtype(dtype).type
    for rule, slots in rules.SEGMENT_RULES.items():
        host = dict(p=p.copy(), states=[rng.random(p.size).astype(dtype) for _ in range(slots)])
        host["st"] = rng.random(nseg).astype(dtype)
        dev = dict(p=SegmentArray(host["p"].copy()), g=SegmentArray(g.copy()))
        dev["states"] = [SegmentArray(s.copy()) for s in host["states"]]
        dev["st"] = SegmentArray(host["st"].copy())
        dlayout = tuple(segment_cupy.to_device(a, dev["p"]) for a in layout)
        dflags = segment_cupy.to_device(flags, dev["p"])
        scratch = lambda n, d, like=dev["p"]: segment_cupy.to_device(np.full(n, np.nan, d), like)  # noqa: E731
        dw = dict(out=scratch(2 * npieces, np.float64), r=scratch(2 * nseg, dtype))
        dw["sums"] = scratch(2 * nseg, np.float64)
        hw = dict(
            out=np.zeros((npieces, 2)), r=np.zeros((nseg, 2), dtype), sums=np.zeros((nseg, 2))
        )
        for step in range(2):
            h64 = H[rule](step)
            if rule == "novograd":
                h64 = h64[:-1] + (float(step == 0),)
            h, gs = tuple(dt(v) for v in h64), (dt(0.5), dt(0.8 if step else 0.0))
            segment_cpu.reduce(rule, host["p"], g, host["states"], h, gs, flags, layout, hw["out"])
            segment_cupy.reduce(
                rule, dev["p"], dev["g"], dev["states"], h, gs, dflags, dlayout, dw["out"]
            )
            assert _same(dw["out"].host, hw["out"].ravel()), (rule, step, "partials")
            segment_cpu.segment(
                rule, host["p"], flags, layout, hw["out"], host["st"], hw["r"], hw["sums"], h64
            )
            segment_cupy.segment(
                rule, dev["p"], dflags, dlayout, dw["out"], dev["st"], dw["r"], dw["sums"], h64
            )
            for k in ("r", "sums"):
                assert _same(dw[k].host, hw[k].ravel()), (rule, step, k)
            assert _same(dev["st"].host, host["st"]), (rule, step, "st")
            if rule == "lamb" and step == 0:
                assert hw["r"][1, 0] == dt(0.02)  # the zero-norm segment: trust ratio 1
            if slots:
                segment_cpu.apply(rule, host["p"], g, host["states"], h, gs, flags, layout, hw["r"])
                segment_cupy.apply(
                    rule, dev["p"], dev["g"], dev["states"], h, gs, dflags, dlayout, dw["r"]
                )
            for a, b in zip([dev["p"], *dev["states"]], [host["p"], *host["states"]], strict=True):
                assert _same(a.host, b), (rule, step, "arrays")


# ---------------------------------------------------------------------------------------------
# The optimizers over fake CuPy arrays follow numba-cpu.


def _run(name, dtype, make, read, *, steps=3, zero=False):
    cls, kw = CASES[name]
    rng = np.random.default_rng(3)
    init = [rng.standard_normal(s).astype(dtype).ravel() for s in SHAPES]
    if zero:
        init[1][...] = 0
    params = [make(a.copy()) for a in init]
    opt = cls(params, backend="numba-cpu" if make is np.copy else "cupy", **kw)
    for t in range(steps):
        grads = [
            np.random.default_rng(10 * t + i).standard_normal(a.size).astype(dtype)
            for i, a in enumerate(init)
        ]
        if zero:
            grads[2][...] = 0
        opt.step([make(g) for g in grads])
    return [read(p) for p in params], opt


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_optimizer_on_cupy_follows_numba_cpu(fake, name, dtype):
    """Three steps over four tensors (one of two pieces), a zero parameter and a zero gradient
    in the LAMB and LARS cases: every parameter equal bit for bit; three launches per step and
    tensor (the list path: one unit per tensor)."""
    zero = name in ("lamb", "lars")
    want, _ = _run(name, dtype, np.copy, np.copy, zero=zero)
    fake.launches.clear()
    got, opt = _run(name, dtype, SegmentArray, lambda a: a.host.copy(), zero=zero)
    assert opt.backend_name == "cupy"
    for a, b in zip(got, want, strict=True):
        assert _same(a, b), name
    kinds = [n.split("_")[-2] for n, *_ in fake.launches if n.startswith("fo_seg_")]
    assert kinds == ["reduce", "segment", "apply"] * 3 * len(SHAPES)  # per step and tensor


def test_bad_input_is_refused_before_any_launch(fake):
    """A float16 gradient, a gradient of another length, a non-CuPy gradient: clear errors,
    nothing launched, nothing written."""
    p = SegmentArray(np.ones(5, np.float32))
    opt = fo.LAMB([p], backend="cupy", lr=0.1)
    for bad, err in (
        (SegmentArray(np.ones(5, np.float64)), TypeError),
        (SegmentArray(np.ones(4, np.float32)), ValueError),
    ):
        with pytest.raises(err):
            opt.step([bad])
    assert not fake.launches and p.host.tolist() == [1.0] * 5
    with pytest.raises(TypeError, match="cupy.ndarray"):
        segment_cupy.check("lamb", p, np.ones(5, np.float32))
    with pytest.raises(ValueError, match="2 state arrays"):
        segment_cupy.check("lamb", p, p, [p])
    with pytest.raises(KeyError, match="per-segment rule"):
        segment_cupy.check("adam", p, p)
    assert not fake.launches


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped here): CuPy and numba-cuda give the same bits.


@pytest.mark.parametrize("name", ["lamb", "lars_nesterov", "novograd"])
def test_cupy_and_numba_cuda_segments_agree_bit_for_bit_on_a_gpu(name):
    ok, reason = kcupy.available()
    if not ok:
        pytest.skip(reason)
    if cuda_launch._simulating():  # numba-cuda imports its simulator package in any case
        pytest.skip("the CUDA simulator is enabled")
    import cupy

    for dtype in DTYPES:
        runs = []
        for backend in ("cupy", "numba-cuda"):
            cls, kw = CASES[name]
            rng = np.random.default_rng(3)
            params = [cupy.asarray(rng.standard_normal(s).astype(dtype).ravel()) for s in SHAPES]
            params[1][...] = 0
            opt = cls(params, backend=backend, **kw)
            for t in range(5):
                grads = [
                    cupy.asarray(
                        np.random.default_rng(10 * t + i).standard_normal(p.size).astype(dtype)
                    )
                    for i, p in enumerate(params)
                ]
                opt.step(grads)
            runs.append([p.get() for p in params])
        for a, b in zip(*runs, strict=True):
            assert _same(a, b), (name, dtype)


@pytest.mark.parametrize("name", ["lamb", "novograd"])
def test_paramset_on_cupy_follows_numba_cpu(fake, name):
    """One unit of four segments (one of two pieces, one zero): three launches per step."""
    cls, kw = CASES[name]
    rng = np.random.default_rng(5)
    init = {f"t{i}": rng.standard_normal(s) for i, s in enumerate(SHAPES)}
    init["t1"][...] = 0
    runs = []
    for device in ("cpu", "cuda"):
        fake.launches.clear()
        ps = fo.ParamSet(init, device=device)
        opt = cls(ps, **kw)
        for t in range(2):
            for i, k in enumerate(init):
                ps.grads[k][...] = np.random.default_rng(10 * t + i).standard_normal(SHAPES[i])
            opt.step()
        runs.append(ps)
    kinds = [n.split("_")[-2] for n, *_ in fake.launches if n.startswith("fo_seg_")]
    assert kinds == ["reduce", "segment", "apply"] * 2
    assert _same(runs[1].flat.host, runs[0].flat)
