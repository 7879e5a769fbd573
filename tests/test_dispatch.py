"""The dispatcher and the device handling of the optimizers, without a GPU.

- Array kinds and backend choice with fake array objects for devices that are not here (an
  object exposing ``__cuda_array_interface__``, one exposing a DLPack CUDA device, a class from a
  module named like CuPy); mixed kinds are errors naming both; a CUDA array on a machine without
  CUDA is a clear RuntimeError before anything is written.
- torch CPU tensors are updated in place through the CPU backend, bit-identical to NumPy.
- ``fastopt.backends()`` and lazy imports.
- The GPU reductions (``sumsq_and_finite`` of both GPU backends) without a GPU: the CUDA C kernels
  compile to PTX (nvcc, NVRTC), a host harness built from the same source equals a NumPy model of
  the summation order bit for bit, and the CuPy launcher's marshalling is checked against a fake
  CuPy; the numba.cuda kernels compile to PTX for a real GPU.

Tests marked for the CUDA simulator run with ``NUMBA_ENABLE_CUDASIM=1`` in their own process::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_cuda_sim.py tests/test_dispatch.py -q -p no:cacheprovider

There the numba-cuda backend runs every optimizer on (simulated) device arrays.
"""

import ctypes
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from cupy_ptx import build_harness
from fake_cupy import FakeCuPy, FakeDeviceArray, install
from optimizer_cases import CASES, grad_of
from oracle import import_or_skip
from ptx_without_gpu import PREAMBLE, run_ptx_script

import fastopt as fo
from fastopt import arrays, dispatch

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim_only = pytest.mark.skipif(not SIM, reason="CUDA simulator test: NUMBA_ENABLE_CUDASIM=1")
default_run_only = pytest.mark.skipif(
    SIM, reason="does not depend on the simulator: checked once, in the default run"
)
"""For the checks whose outcome cannot depend on NUMBA_ENABLE_CUDASIM (host tensors, child processes
started without it, nvcc/NVRTC compiles): the simulator run would repeat them at full cost. Two
cheap torch CPU tensor tests stay in both runs: with numba-cuda available, host tensors must still
go to numba-cpu."""
CHUNK = 1 << 14
DTYPES = (np.float32, np.float64)


# ---------------------------------------------------------------------------------------------
# Fake arrays


class FakeCAI:
    """A device array of another library: only ``__cuda_array_interface__`` (no memory behind
    the pointer; nothing may ever dereference it)."""

    def __init__(self, shape=(4,), typestr="<f4", readonly=False):
        self.shape = tuple(shape)
        self.__cuda_array_interface__ = {
            "shape": self.shape,
            "typestr": typestr,
            "data": (0xDEAD0000, readonly),
            "strides": None,
            "version": 3,
        }


class FakeDLPack:
    """An array exposing only DLPack: ``__dlpack_device__`` = (device type, id)."""

    def __init__(self, device_type=2, device_id=0):
        self._device = (device_type, device_id)

    def __dlpack_device__(self):
        return self._device

    def __dlpack__(self, stream=None):
        raise BufferError("fake: no memory")


def _cupy_like_class():
    cls = type("ndarray", (), {"shape": (4,), "dtype": np.dtype(np.float32)})
    cls.__module__ = "cupy._core.core"
    return cls


FakeCuPyArray = _cupy_like_class()


class CPUOnlyCAI:
    """Like a torch CPU tensor: the interface property raises AttributeError."""

    @property
    def __cuda_array_interface__(self):
        raise AttributeError("not on a CUDA device")


def _numba_cuda_available():
    from fastopt.kernels import cuda as kcuda

    return kcuda.available()[0]


def _cupy_available():
    from fastopt.kernels import cupy as kcupy

    return kcupy.available()[0]


# ---------------------------------------------------------------------------------------------
# array_kind


def test_array_kind_of_fakes():
    assert arrays.array_kind(np.zeros(3)) == "numpy"
    assert arrays.array_kind(np.zeros(3).view(np.memmap)) == "numpy"  # subclasses too
    assert arrays.array_kind(FakeCAI()) == "cuda"
    assert arrays.array_kind(FakeDLPack(2, 0)) == "cuda"
    assert arrays.array_kind(FakeDLPack(2, 3)) == "cuda"
    assert arrays.array_kind(FakeCuPyArray()) == "cupy"
    assert arrays.device_index(FakeDLPack(2, 3)) == 3
    assert arrays.device_index(FakeCAI()) is None  # not cheaply known


@pytest.mark.parametrize(
    "obj, match",
    [
        ([1.0, 2.0], "unsupported array type builtins.list"),
        (3.0, "unsupported array type builtins.float"),
        (FakeDLPack(1, 0), "in host memory"),
        (FakeDLPack(4, 0), "DLPack device type 4"),
        (CPUOnlyCAI(), "unsupported array type"),
    ],
    ids=["list", "float", "dlpack-cpu", "dlpack-opencl", "cai-raises"],
)
def test_array_kind_rejects(obj, match):
    with pytest.raises(TypeError, match=match):
        arrays.array_kind(obj)


def test_array_kind_torch():
    torch = import_or_skip("torch")
    assert arrays.array_kind(torch.zeros(3)) == "torch-cpu"
    assert arrays.array_kind(torch.nn.Parameter(torch.zeros(3))) == "torch-cpu"
    with pytest.raises(TypeError, match="device 'meta'"):
        arrays.array_kind(torch.zeros(3, device="meta"))


# ---------------------------------------------------------------------------------------------
# backend_for


def test_backend_for_numpy_and_named():
    a = np.zeros(3)
    assert dispatch.backend_for([a]).name == "numba-cpu"
    assert dispatch.backend_for([a], "numpy").name == "numpy"
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.backend_for([a], "tpu")


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: [np.zeros(4, np.float32), FakeCAI()], ("NumPy array", "CUDA device array")),
        (lambda: [FakeCAI(), np.zeros(4, np.float32)], ("CUDA device array", "NumPy array")),
        (lambda: [FakeCuPyArray(), FakeCAI()], ("CuPy array", "CUDA device array")),
        (lambda: [np.zeros(4), FakeCuPyArray()], ("NumPy array", "CuPy array")),
        (lambda: [FakeDLPack(2, 0), FakeDLPack(2, 1)], ("cuda:0", "cuda:1")),
    ],
    ids=["numpy-cai", "cai-numpy", "cupy-cai", "numpy-cupy", "two-gpus"],
)
def test_backend_for_mixed_is_a_value_error_naming_both(make, words):
    with pytest.raises(ValueError, match="different devices") as info:
        dispatch.backend_for(make())
    for w in words:
        assert w in str(info.value)


def test_backend_for_host_kinds_mix():
    torch = import_or_skip("torch")
    assert dispatch.backend_for([np.zeros(2), torch.zeros(2)]).name == "numba-cpu"
    assert dispatch.backend_for([torch.zeros(2)]).name == "numba-cpu"


def test_backend_kind_mismatch():
    with pytest.raises(ValueError, match="backend 'numpy' updates numpy or torch-cpu arrays"):
        dispatch.backend_for([FakeCuPyArray()], "numpy")
    with pytest.raises(ValueError, match="backend 'numba-cpu'"):
        dispatch.backend_for([FakeCAI()], "numba-cpu")
    with pytest.raises(ValueError, match="backend 'cupy' updates cupy or cuda arrays"):
        dispatch.backend_for([np.zeros(2)], "cupy")


def test_cuda_array_without_cuda_is_a_runtime_error():
    if _numba_cuda_available():
        pytest.skip("numba-cuda is available here")
    with pytest.raises(RuntimeError, match="backend 'numba-cuda' is not available: .+"):
        dispatch.backend_for([FakeCAI()])
    with pytest.raises(RuntimeError, match="backend 'numba-cuda' is not available"):
        dispatch.backend_for([FakeDLPack(2, 0)])


def test_cupy_array_without_cupy_is_a_runtime_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(RuntimeError, match="backend 'cupy' is not available: CuPy is not"):
        dispatch.backend_for([FakeCuPyArray()])


def test_unavailable_backend_is_not_cached(monkeypatch):
    class Broken(dispatch.Backend):
        name = "broken"
        array_kind = "numpy"

        def available(self):
            return False, "it is broken"

    monkeypatch.setitem(dispatch._FACTORIES, "broken", Broken)
    with pytest.raises(RuntimeError, match="backend 'broken' is not available: it is broken"):
        dispatch.get_backend("broken")
    assert "broken" not in dispatch._INSTANCES


# ---------------------------------------------------------------------------------------------
# Optimizers over device arrays on a machine without the device


def test_optimizer_over_fake_cuda_array_fails_at_construction():
    if _numba_cuda_available():
        pytest.skip("numba-cuda is available here")
    for params in ([FakeCAI()], {"w": FakeCAI((2, 3))}, FakeDLPack(2, 0)):
        with pytest.raises(RuntimeError, match="'numba-cuda' is not available"):
            fo.Adam(params, lr=0.1)
    with pytest.raises(RuntimeError, match="'numba-cuda' is not available"):
        fo.SGD([np.zeros(3), FakeCAI()], lr=0.1)


def test_optimizer_over_fake_cupy_array_fails_at_construction(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(RuntimeError, match="'cupy' is not available"):
        fo.Adam([FakeCuPyArray()], lr=0.1)
    with pytest.raises(RuntimeError, match="'cupy' is not available"):
        fo.Adam([FakeCuPyArray()], lr=0.1, backend="cupy")


def test_forced_gpu_backend_for_numpy_arrays():
    for name in ("cupy", "numba-cuda"):
        try:
            dispatch.get_backend(name)
        except RuntimeError as exc:  # unavailable here: the constructor says so
            with pytest.raises(RuntimeError, match=str(exc)[:30]):
                fo.Adam([np.zeros(3)], lr=0.1, backend=name)
        else:  # available (simulator / GPU machine): NumPy arrays are the wrong kind
            with pytest.raises(ValueError, match=f"backend '{name}' updates"):
                fo.Adam([np.zeros(3)], lr=0.1, backend=name)


@pytest.mark.parametrize(
    "grad, words",
    [
        (lambda: FakeCAI((3, 4)), ("CUDA device array", "NumPy array")),
        (lambda: FakeCuPyArray(), ("CuPy array", "NumPy array")),
        (lambda: FakeDLPack(2, 0), ("CUDA device array", "NumPy array")),
    ],
    ids=["cai", "cupy", "dlpack"],
)
def test_device_gradient_for_host_param_changes_nothing(grad, words):
    w = np.ones((3, 4), np.float32)
    b = np.ones(4, np.float32)
    opt = fo.Adam([w, b], lr=0.1)
    opt.step([np.ones_like(w), np.ones_like(b)])
    snap = (w.copy(), b.copy(), {k: v.copy() for k, v in opt.state[1].items() if k != "step"})
    with pytest.raises(ValueError, match="different devices") as info:
        opt.step([np.ones_like(w), grad()])  # the bad one is second: nothing may be written
    for word in words:
        assert word in str(info.value)
    assert np.array_equal(w, snap[0]) and np.array_equal(b, snap[1])
    assert opt.state[0]["step"] == 1 and opt.state[1]["step"] == 1
    for k, v in snap[2].items():
        assert np.array_equal(opt.state[1][k], v)


def test_paramset_cuda_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(RuntimeError, match="needs CuPy, which is not installed"):
        fo.ParamSet({"w": np.zeros(3)}, device="cuda")
    with pytest.raises(RuntimeError, match="needs CuPy"):
        fo.ParamSet({"w": np.zeros(3)}, device="cuda:1")
    with pytest.raises(ValueError, match="unknown device"):
        fo.ParamSet({"w": np.zeros(3)}, device="cuda:x")


def test_paramset_cuda_without_gpu(monkeypatch):
    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 0, getDevice=lambda: 0)
        )
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(RuntimeError, match="needs a CUDA device: CuPy sees no CUDA device"):
        fo.ParamSet({"w": np.zeros(3)}, device="cuda")


# ---------------------------------------------------------------------------------------------
# torch CPU tensors: zero-copy NumPy views on the CPU backend, updated in place


def _params(dtype, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(7, 5), (13,), (2, 3, 4)]]


@default_run_only
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_cpu_tensors_match_numpy_bit_for_bit(case, dtype):
    torch = import_or_skip("torch")
    _, cls, kwargs = case
    ref = _params(dtype)
    tensors = [torch.tensor(a.copy()) for a in ref]
    tensors[0] = torch.nn.Parameter(tensors[0])  # requires_grad: still updated in place
    ptrs = [t.data_ptr() for t in tensors]
    opt_t, opt_n = cls(tensors, **kwargs), cls(ref, **kwargs)
    for t in range(6):
        grads = grad_of(ref, t)
        opt_n.step(grads)
        # grads as tensors, one of them as a NumPy array (both host memory)
        opt_t.step([torch.from_numpy(grads[0]), grads[1], torch.from_numpy(grads[2])])
    for tensor, a, ptr in zip(tensors, ref, ptrs):
        assert tensor.data_ptr() == ptr
        assert np.array_equal(tensor.detach().numpy(), a)
    st, sn = opt_t.state_dict()["state"], opt_n.state_dict()["state"]
    for i in sn:
        for k in sn[i]:
            assert np.array_equal(np.asarray(st[i][k]), np.asarray(sn[i][k])), (i, k)


def test_torch_cpu_dict_state_dict_and_errors():
    torch = import_or_skip("torch")
    w = torch.randn(3, 4, dtype=torch.float64)
    opt = fo.Adam({"w": w}, lr=0.1)
    opt.step({"w": torch.ones(3, 4, dtype=torch.float64)})
    sd = opt.state_dict()
    assert isinstance(sd["state"][0]["exp_avg"], np.ndarray)
    # state entries given as torch tensors load too
    sd["state"][0]["exp_avg"] = torch.from_numpy(sd["state"][0]["exp_avg"])
    opt.load_state_dict(sd)
    before = w.clone()
    with pytest.raises(TypeError, match="dtype torch.int32|dtype int32"):
        opt.step({"w": torch.ones(3, 4, dtype=torch.int32)})
    with pytest.raises(ValueError, match="contiguous"):
        opt.step({"w": torch.ones(4, 3, dtype=torch.float64).T})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"w": torch.ones(12, dtype=torch.float64)})
    assert torch.equal(w, before)
    with pytest.raises(TypeError, match="dtype"):
        fo.SGD([torch.zeros(3, dtype=torch.int16)], lr=0.1)
    with pytest.raises(ValueError, match="contiguous"):
        fo.SGD([torch.zeros(4, 3).T], lr=0.1)
    t = torch.zeros(3)
    with pytest.raises(ValueError, match="one group only"):
        fo.SGD([{"params": [t]}, {"params": [t]}], lr=0.1)


def test_torch_cpu_paramset_values():
    torch = import_or_skip("torch")
    w = torch.nn.Parameter(torch.randn(2, 3))
    ps = fo.ParamSet({"w": w, "b": torch.zeros(3)})
    assert np.array_equal(ps["w"], w.detach().numpy())


# ---------------------------------------------------------------------------------------------
# backends() and lazy imports


def test_backends_lists_four_with_reasons():
    out = fo.backends()
    assert [name for name, _, _ in out][:4] == ["numba-cpu", "numpy", "cupy", "numba-cuda"]
    for name, ok, why in out:
        assert isinstance(ok, bool) and isinstance(why, str) and why, (name, ok, why)
    status = {name: ok for name, ok, _ in out}
    assert status["numba-cpu"] and status["numpy"]
    assert status["cupy"] == _cupy_available()
    assert status["numba-cuda"] == _numba_cuda_available()


def test_backends_never_raises(monkeypatch):
    def broken():
        raise OSError("libcuda.so: cannot open shared object file")

    monkeypatch.setitem(dispatch._FACTORIES, "broken", broken)
    (entry,) = [e for e in fo.backends() if e[0] == "broken"]
    assert entry == ("broken", False, "OSError: libcuda.so: cannot open shared object file")


@default_run_only
def test_import_is_lazy():
    code = (
        "import sys, numpy as np, fastopt as fo\n"
        "w = np.ones(5, np.float32); opt = fo.Adam([w], lr=0.1, max_grad_norm=1.0)\n"
        "opt.step([np.ones(5, np.float32)]); opt.state_dict()\n"
        "ps = fo.ParamSet({'w': np.ones(3)}); fo.SGD(ps, lr=0.1).step()\n"
        "bad = [m for m in ('cupy', 'numba.cuda', 'torch', 'jax', 'cuda') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------
# The GPU reductions: a NumPy model of the summation order


def _tree(s):
    """The block's tree on the last axis: s[t] += s[t + half] for half = T/2, ..., 1."""
    s = s.copy()
    half = s.shape[-1] // 2
    while half > 0:
        s[..., :half] = s[..., :half] + s[..., half : 2 * half]
        half //= 2
    return s[..., 0]


def _lanes(v, threads):
    """Sum v[t], v[t + T], ... in index order for each t (rows = chunks)."""
    rows, length = v.shape
    k = -(-length // threads)
    padded = np.zeros((rows, k * threads))  # + 0.0 leaves every partial sum unchanged
    padded[:, :length] = v
    acc = np.zeros((rows, threads))
    for j in range(k):
        acc = acc + padded[:, j * threads : (j + 1) * threads]
    return acc


def model_sumsq(x, threads=256):
    """(partials, sum, all finite) exactly as the GPU reductions order their additions."""
    x = np.asarray(x, np.float64).reshape(-1)
    n = x.size
    nchunks = max(1, -(-n // CHUNK))
    sq = np.zeros(nchunks * CHUNK)
    with np.errstate(invalid="ignore", over="ignore"):
        sq[:n] = x * x
        partials = _tree(_lanes(sq.reshape(nchunks, CHUNK), threads))
        total = _tree(_lanes(partials.reshape(1, -1), threads))[0]
    return partials, float(total), bool(np.isfinite(x).all())


def _reduction_input(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 20, n))).astype(dtype)
    if n > 3:
        x[3] = np.finfo(dtype).tiny / 8  # a subnormal: must not be flushed
    return x


@default_run_only
def test_model_is_close_to_numpy():
    x = _reduction_input(3 * CHUNK + 17, np.float64)
    _, total, finite = model_sumsq(x)
    assert finite
    np.testing.assert_allclose(total, float(np.dot(x, x)), rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# CUDA C reductions: PTX, NVRTC, host harness, CuPy launcher marshalling (nvcc, no GPU)

_cuda_c = None


def _cuda_c_helpers():
    global _cuda_c
    if _cuda_c is None:
        import test_cuda_c

        _cuda_c = test_cuda_c
    return _cuda_c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("reductions")


REDUCTION_ENTRIES = {"fo_sumsq_partials_f32", "fo_sumsq_partials_f64", "fo_sumsq_finish"}


@pytest.fixture(scope="module")
def reduction_ptx(nvcc, workdir):
    """PTX of the CuPy reduction module, with the flags CuPy adds (-ftz=true) and FMA on."""
    from fastopt.kernels import cupy as kcupy

    h = _cuda_c_helpers()
    src = workdir / "reduce.cu"
    src.write_text(kcupy.reduction_source())
    ptx = workdir / "reduce.ptx"
    flags = ["-ftz=true", "-fmad=true", "-Werror", "all-warnings"]
    h._run([nvcc, "-arch=sm_90", "-ptx", *flags, str(src), "-o", str(ptx)], workdir)
    return ptx.read_text()


@default_run_only
def test_reduction_source_is_separate():
    from fastopt.kernels import cupy as kcupy

    code = kcupy.reduction_source()
    assert "#define FO_ENABLE_RULES 0" in code and "#define FO_ENABLE_REDUCTIONS 1" in code
    assert "FO_ENABLE_REDUCTIONS 1" not in kcupy.source()  # the rule modules stay as they were
    assert kcupy.REDUCTION_CHUNK == CHUNK


@default_run_only
def test_reduction_ptx_is_ieee_and_spill_free(reduction_ptx, nvcc, workdir):
    h = _cuda_c_helpers()
    assert h._entries(reduction_ptx) == REDUCTION_ENTRIES
    for forbidden in ("fma.", ".ftz", ".approx", ".local", "__local_depot"):
        assert forbidden not in reduction_ptx, forbidden
    assert "cvt.f64.f32" in reduction_ptx  # the float32 widening, without .ftz
    ptxas = os.path.join(os.path.dirname(nvcc), "ptxas")
    (workdir / "reduce_in.ptx").write_text(reduction_ptx)
    info = h._run(
        [ptxas, "-arch=sm_90", "-v", "--warning-as-error", "reduce_in.ptx", "-o", "r.cubin"],
        workdir,
    )
    frames = [line for line in info.splitlines() if "stack frame" in line]
    assert len(frames) == 3 and all("0 bytes stack frame, 0 bytes spill" in f for f in frames)


@default_run_only
def test_reduction_compiles_with_nvrtc():
    from fastopt.kernels import cupy as kcupy

    h = _cuda_c_helpers()
    text, _ = h._nvrtc_compile(h.nvrtc_or_skip(), kcupy.reduction_source())
    assert h._entries(text) == REDUCTION_ENTRIES


HARNESS = r"""
// Host emulation of the reduction kernels of optim_kernels.cu: the same lane and tree functions,
// called for every thread of a block in turn (one tree level at a time, as __syncthreads does).
#define FO_ENABLE_RULES 0
#define FO_ENABLE_REDUCTIONS 1
#include "optim_kernels.cu"

namespace {
const int T = FO_REDUCTION_THREADS;

template <typename F>
void partials(const F* x, long long n, double* sq, int* bad) {
    double s[T];
    int b[T];
    const long long nchunks = (n + FO_REDUCTION_CHUNK - 1) / FO_REDUCTION_CHUNK;
    for (long long c = 0; c < nchunks; ++c) {
        const long long lo = c * FO_REDUCTION_CHUNK;
        const long long hi = lo + FO_REDUCTION_CHUNK < n ? lo + FO_REDUCTION_CHUNK : n;
        for (int t = 0; t < T; ++t) fo::sumsq_lane(x, lo, hi, t, s[t], b[t]);
        for (int half = T / 2; half > 0; half >>= 1)
            for (int t = 0; t < T; ++t) fo::tree_level(s, b, t, half);
        sq[c] = s[0];
        bad[c] = b[0];
    }
}
}  // namespace

extern "C" void fo_host_sumsq_partials_f32(const float* x, long long n, double* sq, int* bad) {
    partials<float>(x, n, sq, bad);
}
extern "C" void fo_host_sumsq_partials_f64(const double* x, long long n, double* sq, int* bad) {
    partials<double>(x, n, sq, bad);
}
extern "C" void fo_host_sumsq_finish(const double* sq, const int* bad, long long m, double* out) {
    double s[T];
    int b[T];
    for (int t = 0; t < T; ++t) fo::sum_lane(sq, bad, m, t, s[t], b[t]);
    for (int half = T / 2; half > 0; half >>= 1)
        for (int t = 0; t < T; ++t) fo::tree_level(s, b, t, half);
    out[0] = s[0];
    out[1] = b[0] != 0 ? 1.0 : 0.0;
}
extern "C" int fo_host_reduction_threads() { return T; }
extern "C" long long fo_host_reduction_chunk() { return FO_REDUCTION_CHUNK; }
"""


@pytest.fixture(scope="module")
def reduction_harness(nvcc, workdir):
    src = workdir / "reduce_harness.cu"
    src.write_text(HARNESS)
    partials = [ctypes.c_void_p, ctypes.c_longlong] + [ctypes.c_void_p] * 2
    argtypes = {f"fo_host_sumsq_partials_{s}": partials for s in ("f32", "f64")}
    argtypes["fo_host_sumsq_finish"] = [ctypes.c_void_p] * 2 + [ctypes.c_longlong, ctypes.c_void_p]
    restypes = {"fo_host_reduction_chunk": ctypes.c_longlong}
    return build_harness(nvcc, src, workdir, argtypes, restypes)


def harness_sumsq(dll, x):
    suffix = "f32" if x.dtype == np.float32 else "f64"
    nchunks = -(-x.size // CHUNK)
    sq = np.full(nchunks, np.nan)
    bad = np.full(nchunks, -1, np.int32)
    out = np.full(2, np.nan)
    getattr(dll, f"fo_host_sumsq_partials_{suffix}")(
        x.ctypes.data, x.size, sq.ctypes.data, bad.ctypes.data
    )
    dll.fo_host_sumsq_finish(sq.ctypes.data, bad.ctypes.data, nchunks, out.ctypes.data)
    return sq, bad, out


def _same(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


@default_run_only
def test_harness_constants(reduction_harness):
    from fastopt.kernels import cpu
    from fastopt.kernels import cupy as kcupy

    assert reduction_harness.fo_host_reduction_threads() == kcupy.REDUCTION_THREADS == 256
    assert (
        reduction_harness.fo_host_reduction_chunk() == kcupy.REDUCTION_CHUNK == cpu.REDUCTION_CHUNK
    )


@default_run_only
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 255, 256, 257, CHUNK - 1, CHUNK, 3 * CHUNK + 5, 300 * CHUNK + 1])
def test_harness_matches_model_bit_for_bit(reduction_harness, n, dtype):
    x = _reduction_input(n, dtype, seed=n % 97)
    sq, bad, out = harness_sumsq(reduction_harness, x)
    partials, total, finite = model_sumsq(x)
    assert _same(sq, partials) and _same(out[0], total)
    assert not bad.any() and out[1] == 0.0 and finite
    np.testing.assert_allclose(out[0], float(np.dot(x.astype(np.float64), x)), rtol=1e-12)


@default_run_only
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_harness_flags_nonfinite(reduction_harness, dtype, bad_value):
    x = _reduction_input(2 * CHUNK + 9, dtype)
    x[CHUNK + 100] = bad_value
    sq, bad, out = harness_sumsq(reduction_harness, x)
    assert list(bad) == [0, 1, 0] and out[1] == 1.0
    assert _same(out[0], model_sumsq(x)[1])
    # A huge finite float32 squares to a finite double: not flagged.
    y = np.full(5, np.finfo(np.float32).max, dtype)
    assert harness_sumsq(reduction_harness, y)[2][1] == 0.0


def _reduction_launch(dll, ptx):
    """Run a launch of the CuPy reduction kernels on the host harness ``dll``, checking its
    arguments against the kernel's PTX signature."""

    def run(name, grid, block, args):
        assert block == (256,)
        sizes = [8 if isinstance(a, FakeDeviceArray) else a.itemsize for a in args]
        assert sizes == _cuda_c_helpers()._param_sizes(ptx, name)
        assert type(args[1 if name != "fo_sumsq_finish" else 2]) is np.int64
        ptrs = [a.host.ctypes.data if isinstance(a, FakeDeviceArray) else a for a in args]
        if name == "fo_sumsq_finish":
            assert grid == (1,)
            dll.fo_host_sumsq_finish(*ptrs[:2], int(ptrs[2]), ptrs[3])
        else:
            getattr(dll, name.replace("fo_", "fo_host_"))(ptrs[0], int(ptrs[1]), *ptrs[2:])

    return run


def _check_reduction_source(code, options):
    assert "#define FO_ENABLE_REDUCTIONS 1" in code


@default_run_only
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_cupy_sumsq_marshalling(reduction_harness, reduction_ptx, monkeypatch, dtype):
    from fastopt.kernels import cupy as kcupy

    fake = FakeCuPy(_reduction_launch(reduction_harness, reduction_ptx), _check_reduction_source, 2)
    install(monkeypatch, fake)
    for n in (0, 5, CHUNK, 70 * CHUNK + 3):
        x = _reduction_input(n, dtype, seed=n)
        fake.launches.clear()
        total, finite = kcupy.sumsq_and_finite(FakeDeviceArray(x))
        assert finite is True and isinstance(total, float)
        if n == 0:
            assert total == 0.0 and not fake.launches
            continue
        assert _same(total, model_sumsq(x)[1])
        (p_name, p_grid, _, _), (f_name, _, _, _) = fake.launches
        suffix = "f32" if dtype == np.float32 else "f64"
        assert (p_name, f_name) == (f"fo_sumsq_partials_{suffix}", "fo_sumsq_finish")
        assert p_grid == (min(-(-n // CHUNK), kcupy.BLOCKS_PER_SM * 2),)
    x = _reduction_input(CHUNK + 1, dtype)
    x[-1] = np.nan
    assert kcupy.sumsq_and_finite(FakeDeviceArray(x))[1] is False
    with pytest.raises(TypeError, match="cupy.ndarray"):
        kcupy.sumsq_and_finite(x)
    with pytest.raises(ValueError, match="1-D"):
        kcupy.sumsq_and_finite(FakeDeviceArray(np.zeros((2, 2), dtype)))


# ---------------------------------------------------------------------------------------------
# numba.cuda reductions compile for a real GPU (NVVM, no GPU needed)

_NUMBA_PTX = (
    PREAMBLE
    + """from fastopt.kernels import cuda as kc

partials, finish = (k.py_func for k in kc.reduction_kernels(256))
f64, i32 = types.Array(types.float64, 1, "C"), types.Array(types.int32, 1, "C")
for dt in (types.float32, types.float64):
    sig = (types.Array(dt, 1, "C"), types.int64, f64, i32)
    ptx, _ = cuda.compile_ptx(partials, sig, cc=(9, 0))
    assert "fma" not in ptx and "call." not in ptx and "add.rn.f64" in ptx, dt
    ptx, _ = cuda.compile_ptx(kc.fill_kernel().py_func, (sig[0], dt), cc=(9, 0))
    print("ok", dt)
ptx, _ = cuda.compile_ptx(finish, (f64, i32, types.int64, f64), cc=(9, 0))
assert "fma" not in ptx and "call." not in ptx
print("ok finish")
"""
)


@default_run_only
def test_numba_reduction_compiles_to_ptx_without_fma():
    assert run_ptx_script(_NUMBA_PTX).count("ok") == 3


# ---------------------------------------------------------------------------------------------
# Under the CUDA simulator: the numba.cuda reductions and the numba-cuda backend end to end


@sim_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_sim_reduction_matches_model(dtype):
    from numba import cuda

    from fastopt.kernels import cuda as kc

    for n, threads, blocks in [
        (0, 32, None),
        (1, 32, None),
        (100, 32, None),
        (CHUNK, 32, None),
        (2 * CHUNK + 7, 32, 1),
        (2 * CHUNK + 7, 32, 2),
        (2 * CHUNK + 7, 32, None),
        (CHUNK + 3, 256, None),
    ]:
        x = _reduction_input(n, dtype, seed=n)
        total, finite = kc.sumsq_and_finite(cuda.to_device(x), threads=threads, blocks=blocks)
        assert finite is True
        want = 0.0 if n == 0 else model_sumsq(x, threads)[1]
        assert _same(total, want), (n, threads, blocks)
    x = _reduction_input(CHUNK + 40, dtype)
    for value in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[CHUNK + 7] = value
        assert kc.sumsq_and_finite(cuda.to_device(y), threads=32)[1] is False


def _sim_params(dtype, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(3, 5), (7,)]]


@sim_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sim_numba_cuda_backend_matches_cpu(case, dtype):
    """Every optimizer on simulated device arrays (the numba-cuda backend, picked by the
    dispatcher) equals the Numba CPU kernels: the simulator runs the same Python rules."""
    from numba import cuda

    _, cls, kwargs = case
    host = _sim_params(dtype)
    dev = [cuda.to_device(a) for a in host]
    opt_d, opt_h = cls(dev, **kwargs), cls(host, **kwargs)
    assert opt_d._groups[0]["units"][0].backend.name == "numba-cuda"
    for t in range(3):
        grads = grad_of(host, t)
        opt_h.step(grads)
        opt_d.step([cuda.to_device(g) for g in grads])
    if hasattr(opt_h, "eval"):  # schedule-free: the swap to the averaged point, on the device
        opt_h.eval()
        opt_d.eval()
    # adadelta's plain-Python float32 evaluation divides in double (see test_cuda_sim.py)
    exact = not (dtype == np.float32 and cls is fo.Adadelta)
    for d, h in zip(dev, host):
        if exact:
            assert np.array_equal(d.copy_to_host(), h)
        else:
            np.testing.assert_allclose(d.copy_to_host(), h, rtol=1e-5)
    sd, sh = opt_d.state_dict()["state"], opt_h.state_dict()["state"]
    for i in sh:
        for k in sh[i]:
            assert np.allclose(sd[i][k], sh[i][k], rtol=1e-5, atol=0), (i, k)


@sim_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_clipping_skipping_state_dict():
    from numba import cuda

    host = _sim_params(np.float64)
    dev = [cuda.to_device(a) for a in host]
    kw = dict(lr=0.1, max_grad_norm=0.5, max_grad_value=0.3, skip_nonfinite=True)
    opt_d, opt_h = fo.Adam(dev, **kw), fo.Adam(host, **kw)
    for t in range(3):
        grads = grad_of(host, t)
        opt_h.step(grads)
        opt_d.step([cuda.to_device(g) for g in grads])
        np.testing.assert_allclose(opt_d.last_grad_norm, opt_h.last_grad_norm, rtol=1e-13)
    # a NaN gradient: the step is skipped on the device too, nothing written
    before = [d.copy_to_host() for d in dev]
    bad = grad_of(host, 5)
    bad[1][2] = np.nan
    opt_d.step([cuda.to_device(g) for g in bad])
    assert opt_d.last_step_taken is False and opt_d.skipped_steps == 1
    assert all(np.array_equal(d.copy_to_host(), b) for d, b in zip(dev, before))
    # state_dict: device -> host copies; load host state into a device optimizer and back
    sd = opt_d.state_dict()
    assert isinstance(sd["state"][0]["exp_avg"], np.ndarray)
    assert sd["state"][0]["exp_avg"].shape == (3, 5)
    dev2 = [cuda.to_device(d.copy_to_host()) for d in dev]
    opt_d2 = fo.Adam(dev2, **kw)
    opt_d2.load_state_dict(opt_h.state_dict())
    assert type(opt_d2.state[0]["exp_avg"]).__name__ == "FakeCUDAArray"
    host2 = [d.copy_to_host() for d in dev]
    opt_h2 = fo.Adam(host2, **kw)
    # device state entries (simulated device arrays) load into a host optimizer as well
    sd_dev = opt_h.state_dict()
    for entry in sd_dev["state"].values():
        for k, v in entry.items():
            if isinstance(v, np.ndarray):
                entry[k] = cuda.to_device(v)
    opt_h2.load_state_dict(sd_dev)
    grads = grad_of(host, 7)
    opt_d2.step([cuda.to_device(g) for g in grads])
    opt_h2.step(grads)
    for a, b in zip(dev2, host2):  # the norms (clipping) differ in the last bit at most
        np.testing.assert_allclose(a.copy_to_host(), b, rtol=1e-12)


@sim_only
def test_sim_device_errors_before_any_write():
    from numba import cuda

    host = _sim_params(np.float32)
    dev = [cuda.to_device(a) for a in host]
    opt = fo.SGD(dev, lr=0.1, momentum=0.9)
    opt.step([cuda.to_device(g) for g in grad_of(host, 0)])
    before = [d.copy_to_host() for d in dev]
    good = cuda.to_device(grad_of(host, 1)[0])
    cases = [
        (grad_of(host, 1)[1], ValueError, "NumPy array"),  # host grad for a device param
        # (a float64 gradient for a float32 parameter is mixed storage, which numba-cuda runs)
        (cuda.to_device(np.ones(7, np.int32)), TypeError, "dtype"),
        (cuda.to_device(np.ones(8, np.float32)), ValueError, "shape"),
        (cuda.to_device(np.ones((7, 2), np.float32))[:, 0], ValueError, "contiguous"),
        ([0.0] * 7, TypeError, "unsupported array type"),
    ]
    for bad, exc, match in cases:
        with pytest.raises(exc, match=match):
            opt.step([good, bad])
        assert all(np.array_equal(d.copy_to_host(), b) for d, b in zip(dev, before))
        assert opt.state[0]["step"] == 1
    with pytest.raises(ValueError, match="one group only"):
        fo.SGD([{"params": [dev[0]]}, {"params": [dev[0]]}], lr=0.1)
    with pytest.raises(TypeError, match="dtype"):
        fo.SGD([cuda.to_device(np.zeros(3, np.int32))], lr=0.1)
