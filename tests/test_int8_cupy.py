"""8-bit blockwise state (``state_dtype="int8"``) on the CuPy backend: the block kernels of
kernels/block_kernels.cu (quantizer of kernels/quantizer.cuh) launched by kernels/block_cupy.py.

Without a GPU: NVRTC compiles the modules CuPy would, for sm_90; a host harness
(tests/block_host_harness.cu, built once by nvcc) runs the kernels' own __host__ __device__ steps
with the block's threads emulated in order, and a fake CuPy routes every launch to it. The
quantizer helpers then equal block_loops' on every midpoint of both maps, its neighbours and
10**4 other values; each launch equals numba-cpu's block loop bit for bit (codes, absmax,
parameters, master weights; float32, bfloat16 with master weights, bfloat16 with stochastic
rounding; 1, 2 and 3 state slots; a partial last block, an all-zero block and a NaN block); the
optimizers over fake CuPy arrays follow numba-cpu bit for bit, through a state_dict round trip.
On a GPU (skipped here): CuPy and numba-cpu give the same bits.
"""

import ctypes
import pathlib

import ml_dtypes
import numpy as np
import pytest
from cupy_ptx import build_harness
from cupy_ptx import cuda_c as _cuda_c
from cupy_ptx import entry_body as _entry_body
from cupy_ptx import nvrtc_ptx as nvrtc_ptx_of
from cupy_ptx import same as _same
from fake_cupy import FakeDeviceArray, install
from test_lbfgs_cupy import FakeCupyArray, FakeVectorCuPy

import fastopt as fo
from fastopt import dispatch
from fastopt.kernels import block_cupy, block_loops
from fastopt.kernels import cupy as kcupy
from fastopt.kernels.access import Storage
from fastopt.kernels.storage import QUANT_BLOCK
from fastopt.optim import precision

HERE = pathlib.Path(__file__).resolve().parent
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = Storage("float32", "float32", "int8", False, False)
BF16_MASTER = Storage("bfloat16", "bfloat16", "int8", True, False)
BF16_SR = Storage("bfloat16", "bfloat16", "int8", False, True)
# The kernels the harness runs (tests/block_host_harness.cu, FO_HOST_BLOCKS): on the numba-cpu
# side the serial block loops that tests/test_int8_cuda_sim.py compiles too (same rules and
# storage), so that CI compiles them once for both files.
HOST_KERNELS = [
    ("adam", F32),
    ("sgd_momentum", F32),
    ("adam_amsgrad", F32),
]
"""Launch by launch; bf16 with master weights and with stochastic rounding go through the
optimizers below (each case compiles a CPU block loop of its own: CI time)."""
# NVRTC: every 8-bit rule in float32, and the other element types, master, rounding, float64
NVRTC_KERNELS = [(r, F32) for r in sorted(precision.INT8_RULES)] + [
    ("adam", BF16_MASTER),
    ("adam", BF16_SR),
    ("adam", Storage("bfloat16", "float32", "int8", True, True)),
    ("adam", Storage("float64", "float64", "int8", False, False)),
    ("sgd_momentum", Storage("float16", "float32", "int8", False, True)),
]
SM_COUNT = 2  # FakeVectorCuPy's
N = 3 * QUANT_BLOCK + 77  # a partial last block


# ---------------------------------------------------------------------------------------------
# The modules CuPy compiles: NVRTC, as cupy.RawModule does, for sm_90.


@pytest.fixture(scope="module")
def nvrtc_ptx():
    """The PTX of NVRTC_KERNELS in one module, compiled with block_cupy's options and CuPy's
    -ftz=true."""
    return nvrtc_ptx_of(block_cupy.source(NVRTC_KERNELS))


def test_nvrtc_compiles_every_kernel_ieee(nvrtc_ptx):
    """Every kernel is there; nothing flushed, approximated, fused or in local memory; the block
    maximum is a shared-memory integer max; the quantizer's float64 reciprocal and product are
    correctly rounded and narrowed by an explicit cvt."""
    names = {block_cupy.kernel_name(r, s) for r, s in NVRTC_KERNELS}
    assert _cuda_c()._entries(nvrtc_ptx) == names
    for forbidden in ("fma.", ".ftz", ".approx", ".local"):
        assert forbidden not in nvrtc_ptx, forbidden
    for name in names:
        body = _entry_body(nvrtc_ptx, name)
        assert "atom.shared.max.u32" in body and "bar.sync" in body, name
        assert "rcp.rn.f64" in body and "mul.rn.f64" in body, name
        assert "cvt.rn.f32.f64" in body, name


def test_kernel_names_and_bad_rules():
    sr = Storage("bfloat16", "float32", "int8", True, True)
    assert block_cupy.kernel_name("adam", sr) == "fo_block_adam_bf16_f32_f32_master_sr"
    assert block_cupy.kernel_name("adam", BF16_MASTER) == "fo_block_adam_bf16_bf16_f32_master"
    assert "fo::op_adam, float, fo::bf16_bits, float, true, true)" in (
        block_cupy.instantiation("adam", sr)
    )
    for bad in ("sgd", "nope"):  # no state to quantize; unknown
        with pytest.raises(KeyError):
            block_cupy.instantiation(bad, F32)


# ---------------------------------------------------------------------------------------------
# The host harness.


_p, _ll, _d, _u64 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_double, ctypes.c_uint64
_s = ctypes.c_char_p
ARGTYPES = {
    "fo_host_block": [_s, _p, _p, _p, _p, _p, _p, _p, _ll, _p, _d, _d, _u64, _u64, _u64],
    "fo_host_quantizer": [_p, _p, _ll, _p, _p, _p, _p, _p, _p],
    "fo_host_block_constant": [_s],
}
RESTYPES = {"fo_host_block_constant": _ll}


@pytest.fixture(scope="module")
def harness(nvcc, tmp_path_factory):
    """tests/block_host_harness.cu built once for this module (nvcc, a shared library)."""
    workdir = tmp_path_factory.mktemp("int8_cupy")
    return build_harness(nvcc, HERE / "block_host_harness.cu", workdir, ARGTYPES, RESTYPES)


def test_harness_constants_are_block_loops(harness):
    for name in ("KEY_LO", "KEY_HI", "BUCKETS", "QUANT_BLOCK"):
        want = QUANT_BLOCK if name == "QUANT_BLOCK" else getattr(block_loops, name)
        assert harness.fo_host_block_constant(name.encode()) == want, name


def _values(signed, rng):
    """Every midpoint of the map, its float32 neighbours, 10**4 random values over the
    magnitudes a normalized value takes (and beyond), and the special values."""
    q = block_loops.qmap(signed)
    mids = ((q[:-1] + q[1:]) * np.float32(0.5)).astype(np.float32)
    around = [mids, np.nextafter(mids, np.float32(-np.inf)), np.nextafter(mids, np.float32(np.inf))]
    mags = 10.0 ** rng.uniform(-9, 0.5, 10**4)
    rand = (mags * rng.choice([-1.0, 1.0], mags.size)).astype(np.float32)
    special = [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 2.0, np.inf, -np.inf, np.nan, 3e-8, -3e-8]
    return np.concatenate([*around, q, rand, np.array(special, np.float32)])


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantizer_helpers_equal_block_loops(harness, signed):
    """bucket_of, nearest_code, magnitude_bits and normalized (with the block's reciprocal) of
    the CUDA C quantizer equal block_loops' on every value of ``_values``: its compiled
    ``nearest_code``, the tables' bucket index, and ``normalized`` run as NumPy (its source,
    elementwise)."""
    rng = np.random.default_rng(11 + signed)
    x = _values(signed, rng)
    n = x.size
    scale = (10.0 ** rng.uniform(-30, 3, n)).astype(np.float32)
    scale[:5] = [0.0, 1e-42, np.nan, np.inf, 1.0]  # all-zero block, subnormal, NaN, Inf
    qm, lut = block_loops.tables(signed)
    out = dict(bucket=np.zeros(n, np.uint32), code=np.zeros(n, np.uint8))
    out.update(magnitude=np.zeros(n, np.uint32), xn=np.zeros(n, np.float32))
    harness.fo_host_quantizer(
        x.ctypes.data, scale.ctypes.data, n, qm.ctypes.data, lut.ctypes.data,
        *(out[k].ctypes.data for k in ("bucket", "code", "magnitude", "xn")),
    )  # fmt: skip
    bits = x.view(np.uint32)
    assert _same(out["bucket"], block_loops._bucket(bits).astype(np.uint32))  # the tables' index
    assert _same(out["magnitude"], bits & np.uint32(0x7FFFFFFF))
    inverse = 1.0 / np.where(scale > 0, scale, np.float32(1.0)).astype(np.float64)
    with np.errstate(over="ignore"):  # x / a subnormal scale overflows to Inf, as it should
        assert _same(out["xn"], block_loops.normalized(x, inverse))
    code = block_loops.helper("nearest_code")
    for k in range(n):
        assert out["code"][k] == code(x[k], qm, lut), x[k]
    if signed:  # the sign rule: -3e-8 (the last value) rounds to zero's code, keeps its sign
        assert out["code"][-1] == 126


# ---------------------------------------------------------------------------------------------
# A fake CuPy whose launches run on the harness.


class BlockArray(FakeCupyArray):
    """FakeCupyArray with what the optimizers' CuPy backend also uses."""

    __module__ = "cupy._fake"

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise TypeError("fake cupy arrays take slices only")
        return BlockArray(self.host[key])

    def __setitem__(self, key, value):
        self.host[key] = value.host if isinstance(value, FakeDeviceArray) else value

    def reshape(self, *shape):
        return BlockArray(self.host.reshape(*shape))

    def view(self, dtype):
        return BlockArray(self.host.view(dtype))

    def fill(self, value):
        self.host[...] = value


def _ptr(a):
    return a.host.ctypes.data if isinstance(a, FakeDeviceArray) else None


@pytest.fixture
def fake(harness, nvrtc_ptx, monkeypatch):
    """A fake CuPy over the harness; each launch's arguments are checked against the kernel's
    PTX signature and its configuration against block_cupy's contract."""
    sizes_of = _cuda_c()._param_sizes

    def run(name, grid, block, args):
        sizes = [8 if isinstance(a, (FakeDeviceArray, np.uint64)) else a.nbytes for a in args]
        assert sizes == sizes_of(nvrtc_ptx, name), name
        p, w, g, *slots = args[:15]
        n, hs, gscale, clip, seed, step, index0 = args[15:]
        assert type(n) is np.int64 and block == (QUANT_BLOCK,)
        assert grid == (min(-(-int(n) // QUANT_BLOCK), kcupy.BLOCKS_PER_SM * SM_COUNT),)
        assert type(gscale) is type(clip) and all(type(v) is np.uint64 for v in args[-3:])
        ptrs = [(ctypes.c_void_p * 3)(*map(_ptr, slots[k::4])) for k in range(4)]
        rc = harness.fo_host_block(
            name.encode(), _ptr(p), _ptr(w), _ptr(g), *ptrs, int(n), hs.ctypes.data,
            float(gscale), float(clip), int(seed), int(step), int(index0),
        )  # fmt: skip
        assert rc == 0, name

    fake = FakeVectorCuPy(run)
    fake.ndarray = BlockArray
    fake.zeros = lambda n, dtype: BlockArray(np.zeros(n, dtype))
    fake.empty = lambda n, dtype: BlockArray(  # NaN (or -1): an element never written shows
        np.full(n, np.nan if np.dtype(dtype).kind == "f" else -1, dtype)
    )
    fake.asnumpy = lambda a: a.host.copy()
    install(monkeypatch, fake)
    monkeypatch.setattr(block_cupy, "_modules", {})  # nothing compiled by another fake
    monkeypatch.setattr(block_cupy, "_tables", {})
    monkeypatch.setattr(kcupy, "_streams", {})
    monkeypatch.setattr(dispatch, "_INSTANCES", {})  # no backend keeps the fake module
    return fake


# ---------------------------------------------------------------------------------------------
# Launch by launch: the numba-cpu block loops' bits.


def _slot_values(rng, n, signed):
    """State values over blocks of varied scales: block 1 all zero, block 2 holding a NaN."""
    v = rng.standard_normal(n) * 10.0 ** rng.integers(-4, 2, n)
    v = v if signed else np.abs(v)
    v[QUANT_BLOCK : 2 * QUANT_BLOCK] = 0.0
    v[2 * QUANT_BLOCK + 5] = np.nan
    return v.astype(np.float32)


def _h(rule, dtype):
    return tuple(np.dtype(dtype).type(x) for x in _cuda_c().H64[rule][-1])


def _slot_names(rule):
    return {
        "adam": ("exp_avg", "exp_avg_sq"),
        "sgd_momentum": ("momentum_buffer",),
        "adam_amsgrad": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    }[rule]


@pytest.mark.parametrize(
    "rule, storage", HOST_KERNELS, ids=[block_cupy.kernel_name(*k) for k in HOST_KERNELS]
)
def test_each_launch_equals_numba_cpus_block_loop(fake, rule, storage):
    """Two launches (the state written by the first read by the second), gradient scaled and
    clipped: codes, absmax, parameters and master copy equal numba-cpu's bit for bit."""
    rng = np.random.default_rng(5)
    pdt = BF16 if storage.param == "bfloat16" else np.float32
    p = rng.standard_normal(N).astype(np.float32)
    g = (rng.standard_normal(N) * 10.0 ** rng.integers(-3, 2, N)).astype(np.float32)
    g[QUANT_BLOCK : 2 * QUANT_BLOCK] = 0  # with zero state: an all-zero block (no weight decay)
    signs = [precision.INT8_SIGNED[k] for k in _slot_names(rule)]
    host = dict(p=p.astype(pdt), g=g.astype(pdt), w=p.copy() if storage.master else None)
    host["s"] = [precision.int8_from_values(_slot_values(rng, N, s), s) for s in signs]
    dev = dict(p=BlockArray(host["p"].copy()), g=BlockArray(host["g"].copy()))
    dev["w"] = BlockArray(host["w"].copy()) if storage.master else None
    dev["s"] = [
        precision.Quantized(BlockArray(s.codes.copy()), BlockArray(s.absmax.copy()), s.signed)
        for s in host["s"]
    ]
    h, gs = _h(rule, np.float32), (np.float32(0.5), np.float32(0.8))
    for step in (1, 2):
        rs = (123, step, 1000)
        block_loops.apply(rule, storage, host["p"], host["g"], host["s"], host["w"], h, gs, rs)
        block_cupy.apply(rule, storage, dev["p"], dev["g"], dev["s"], dev["w"], h, gs, rs)
        assert _same(dev["p"].host.view(np.uint8), host["p"].view(np.uint8)), (rule, step)
        if storage.master:
            assert _same(dev["w"].host, host["w"]), (rule, step)
        for k, (a, b) in enumerate(zip(dev["s"], host["s"], strict=True)):
            assert _same(a.codes.host, b.codes) and _same(a.absmax.host, b.absmax), (rule, k)
    assert np.isnan(host["s"][0].absmax[2])  # the NaN block stays NaN
    if rule != "sgd_momentum":  # its case decays the weights into the gradient
        zero = block_loops.code_of(0.0, True)
        assert host["s"][0].absmax[1] == 0 and set(host["s"][0].codes[QUANT_BLOCK:512]) == {zero}
    assert len(fake.launches) == 2


def test_bad_input_is_refused_before_any_launch(fake):
    """Wrong slots, wrong dtypes and sizes, host arrays: clear errors, nothing launched."""
    p, g = BlockArray(np.ones(N, np.float32)), BlockArray(np.ones(N, np.float32))
    m = precision.Quantized(
        BlockArray(np.zeros(N, np.uint8)), BlockArray(np.zeros(4, np.float32)), True
    )
    short = precision.Quantized(m.codes, BlockArray(np.zeros(3, np.float32)), False)
    hs = (_h("adam", np.float32), (np.float32(1), np.float32(0)), (0, 1, 0))
    for states, g_, exc, match in (
        ([m], g, ValueError, "adam takes 2 state slots, got 1"),
        ([m, short], g, ValueError, "absmax of state slot 1 must be a flat contiguous array of 4"),
        ([m, p], g, TypeError, "state slot 1 of adam must be an 8-bit slot"),
        ([m, m], np.ones(N, np.float32), TypeError, "the gradient is a ndarray"),
        ([m, m], BlockArray(np.ones(N, np.float64)), TypeError, "gradient must be float32"),
    ):
        with pytest.raises(exc, match=match):
            block_cupy.apply("adam", F32, p, g_, states, None, *hs)
    with pytest.raises(ValueError, match="master copy was given"):
        block_cupy.apply("adam", F32, p, g, [m, m], p, *hs)
    assert not fake.launches and p.host.tolist() == [1.0] * N


# ---------------------------------------------------------------------------------------------
# The optimizers over fake CuPy arrays follow numba-cpu.

SHAPES = ((N,), (QUANT_BLOCK + 3,))


def _grads(t, dtype=np.float32):
    return [
        np.random.default_rng(10 * t + i).standard_normal(s).astype(np.float32).astype(dtype)
        for i, s in enumerate(SHAPES)
    ]


def _host_state(opt):
    """Every state value of ``opt`` on the host (8-bit slots as (codes, absmax))."""
    out = {}
    for key, entry in opt.state_dict()["state"].items():
        for name, v in entry.items():
            out[(key, name)] = np.asarray(v.host if isinstance(v, FakeDeviceArray) else v)
    return out


@pytest.mark.parametrize(
    "cls, kw, dtype",
    [
        (fo.Adam, dict(lr=1e-2), np.float32),
        (fo.AdamW, dict(lr=1e-2, weight_decay=0.1, master_weights=True), BF16),
        (fo.AdamW, dict(lr=1e-2, stochastic_rounding=True, seed=5), BF16),
    ],
    ids=["adam_f32", "adamw_bf16_master", "adamw_bf16_sr"],
)
def test_optimizer_on_cupy_follows_numba_cpu(fake, monkeypatch, cls, kw, dtype):
    """Three steps over two tensors (one with a partial last block): parameters and every
    state value (codes, absmax, master copy) equal numba-cpu's bit for bit; the CuPy state's
    state_dict loads into a numba-cpu optimizer and the next step agrees."""
    monkeypatch.setattr(precision, "MIN_8BIT_SIZE", QUANT_BLOCK)
    init = [
        np.random.default_rng(3 + i).standard_normal(s).astype(dtype) for i, s in enumerate(SHAPES)
    ]
    hp = [a.copy() for a in init]
    dp = [BlockArray(a.copy()) for a in init]
    opt_h = cls(hp, backend="numba-cpu", state_dtype="int8", **kw)
    opt_d = cls(dp, backend="cupy", state_dtype="int8", **kw)
    assert opt_d.backend_name == "cupy"
    for t in range(3):
        opt_h.step(_grads(t, dtype))
        opt_d.step([BlockArray(a) for a in _grads(t, dtype)])
        for a, b in zip(dp, hp, strict=True):
            assert _same(a.host.view(np.uint8), b.view(np.uint8)), t
    sh, sd = _host_state(opt_h), _host_state(opt_d)
    assert sorted(sh) == sorted(sd)
    assert any(k[1].endswith("_absmax") for k in sh)  # 8-bit state
    for k in sh:
        assert _same(np.asarray(sd[k]), np.asarray(sh[k])), k
    kinds = [n for n, *_ in fake.launches]
    assert len(kinds) == 3 * len(SHAPES) and all(n.startswith("fo_block_adam") for n in kinds)
    # state_dict round trips, one more step each: the CuPy state into a fresh numba-cpu
    # optimizer, and the numba-cpu state into a fresh CuPy one
    hp2 = [a.host.copy() for a in dp]
    dp2 = [BlockArray(a.copy()) for a in hp]
    opt_h2 = cls(hp2, backend="numba-cpu", state_dtype="int8", **kw)
    opt_d2 = cls(dp2, backend="cupy", state_dtype="int8", **kw)
    opt_h2.load_state_dict(opt_d.state_dict())
    opt_d2.load_state_dict(opt_h.state_dict())
    for opt in (opt_d, opt_d2):
        opt.step([BlockArray(a) for a in _grads(3, dtype)])
    for opt in (opt_h, opt_h2):
        opt.step(_grads(3, dtype))
    for a, b, c, d in zip(dp, hp2, dp2, hp, strict=True):
        assert _same(a.host.view(np.uint8), b.view(np.uint8))
        assert _same(c.host.view(np.uint8), d.view(np.uint8))


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped here): CuPy gives numba-cpu's bits.


def test_cupy_int8_equals_numba_cpu_on_a_gpu(monkeypatch):
    ok, reason = kcupy.available()
    if not ok:
        pytest.skip(reason)
    import cupy

    monkeypatch.setattr(precision, "MIN_8BIT_SIZE", QUANT_BLOCK)
    for cls, kw in (
        (fo.Adam, dict(lr=1e-2)),
        (fo.Adam, dict(lr=1e-2, amsgrad=True)),
        (fo.SGD, dict(lr=1e-2, momentum=0.9)),
        (fo.Adam, dict(lr=1e-2, stochastic_rounding=True, seed=3)),
    ):
        init = [np.random.default_rng(3).standard_normal(s).astype(np.float32) for s in SHAPES]
        hp = [a.copy() for a in init]
        dp = [cupy.asarray(a) for a in init]
        opt_h = cls(hp, backend="numba-cpu", state_dtype="int8", **kw)
        opt_d = cls(dp, backend="cupy", state_dtype="int8", **kw)
        for t in range(5):
            opt_h.step(_grads(t))
            opt_d.step([cupy.asarray(a) for a in _grads(t)])
        for a, b in zip(dp, hp, strict=True):
            assert _same(cupy.asnumpy(a), b), (cls.__name__, kw)
        sh, sd = opt_h.state_dict()["state"], opt_d.state_dict()["state"]
        for key, entry in sh.items():
            for name, v in entry.items():
                assert _same(np.asarray(sd[key][name]), np.asarray(v)), (cls.__name__, name)
