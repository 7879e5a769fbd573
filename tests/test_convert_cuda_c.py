"""``convert`` in CUDA C (``fo::convert_kernel`` of kernels/optim_kernels.cu, launched by
``kernels/cupy.py``'s ``convert``) and the numba-cuda kernel, without a GPU.

- NVRTC compiles every instantiation the CuPy launcher can ask for, by name expression, as
  ``cupy.RawModule`` does; nvcc compiles them with CuPy's flags and ptxas assembles them: no
  fused, flushed or approximate arithmetic, no local memory, no stack frame.
- A host harness (built by nvcc here from the text below) runs ``fo::convert_element``, the
  kernel's loop body, and must give the bits of the Numba CPU ``cpu_storage.convert``
  (the inputs of tests/test_convert_sim.py: NaN, infinities, -0, subnormals, ties).
- ``kernels/cupy.py``'s ``convert`` runs over a fake CuPy whose kernels are the harness: its
  arguments match the kernel's PTX signature, and its results the CPU's.
- numba-cuda's kernel (``cuda_storage.converter``) compiles to PTX for a real GPU.

NVRTC / nvcc / libNVVM missing: skipped, or failures under FASTOPT_REQUIRE_NVRTC=1,
FASTOPT_REQUIRE_NVCC=1, FASTOPT_REQUIRE_NVVM=1.
"""

import ctypes
import pathlib
import re

import numpy as np
import pytest
from cupy_ptx import build_harness
from fake_cupy import FakeCuPy, FakeDeviceArray, FakeStream, install
from ptx_without_gpu import PREAMBLE, run_ptx_script
from test_convert_sim import CASES, RS, _dtype, _same_bits, cpu_convert, source
from test_cuda_c import _entries, _nvrtc_compile, _param_sizes, _run, nvrtc_or_skip

from fastopt import dispatch
from fastopt.kernels import cupy as kcupy

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ("float32", "float64", "bfloat16", "float16")  # the harness's type codes 0..3
C_TYPES = {"float": 0, "double": 1, "fo::bf16_bits": 2, "fo::f16_bits": 3}
# What the launcher instantiates: every pair, rounding stochastically into 16 bits only.
INSTANCES = [
    (d, s, sr)
    for d in NAMES
    for s in NAMES
    for sr in (False, True)
    if not sr or d in ("bfloat16", "float16")
]
FORBIDDEN = ("fma.", ".ftz", ".approx", ".local", "__local_depot")

HARNESS = r"""
// fo::convert_element of kernels/optim_kernels.cu over host arrays (tests/test_convert_cuda_c.py).
#define FO_ENABLE_RULES 0
#define FO_ENABLE_STORAGE 1
#include "optim_kernels.cu"

namespace {

typedef unsigned long long u64;
typedef void (*Runner)(long long, void*, const void*, u64, u64, u64, int);

template <typename D, typename S, bool SR>
void run(long long n, void* dst, const void* src, u64 seed, u64 step, u64 index0, int word) {
    for (long long i = 0; i < n; ++i) {
        fo::convert_element<D, S, SR>(i, static_cast<D*>(dst), static_cast<const S*>(src), seed,
                                      step, index0, word);
    }
}

template <typename D, typename S>
Runner with_source(int sr) {
    return sr ? run<D, S, true> : run<D, S, false>;
}

template <typename D>
Runner with_destination(int s, int sr) {
    switch (s) {
        case 0: return with_source<D, float>(sr);
        case 1: return with_source<D, double>(sr);
        case 2: return with_source<D, fo::bf16_bits>(sr);
        case 3: return with_source<D, fo::f16_bits>(sr);
    }
    return 0;
}

}  // namespace

// Type codes: 0 float, 1 double, 2 bfloat16 bits, 3 float16 bits. 0 on success.
extern "C" int fo_host_convert(int d, int s, int sr, long long n, void* dst, const void* src,
                               u64 seed, u64 step, u64 index0, int word) {
    Runner r = 0;
    switch (d) {
        case 0: r = with_destination<float>(s, sr); break;
        case 1: r = with_destination<double>(s, sr); break;
        case 2: r = with_destination<fo::bf16_bits>(s, sr); break;
        case 3: r = with_destination<fo::f16_bits>(s, sr); break;
    }
    if (r == 0) return 1;
    r(n, dst, src, seed, step, index0, word);
    return 0;
}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert_c")


def test_convert_expression_names():
    assert kcupy.convert_expression("bfloat16", "float32", True) == (
        "fo::convert_kernel<fo::bf16_bits, float, true>"
    )
    assert kcupy.convert_expression("float32", "float64", False) == (
        "fo::convert_kernel<float, double, false>"
    )
    assert len(INSTANCES) == 24


def test_convert_kernels_compile_with_nvrtc():
    """What the CuPy backend compiles: storage_source() with the conversions by name expression
    (sm_90, CuPy's options and -ftz=true), each one an entry, all IEEE and in registers."""
    exprs = [kcupy.convert_expression(*key) for key in INSTANCES]
    text, lowered = _nvrtc_compile(nvrtc_or_skip(), kcupy.storage_source(), exprs, "compute_90")
    assert _entries(text) == set(lowered.values()) and len(lowered) == len(INSTANCES)
    for forbidden in FORBIDDEN:
        assert forbidden not in text, forbidden


def _instantiation(dst, src, sr):
    expr = kcupy.convert_expression(dst, src, sr)
    d, s = expr[expr.index("<") + 1 :].split(", ")[:2]
    return (
        f"template __global__ void {expr}({d}*, const {s}*, long long, unsigned long long, "
        "unsigned long long, unsigned long long, int);"
    )


def test_convert_kernels_compile_ieee_under_cupy_flags(nvcc, workdir):
    """nvcc with CuPy's -ftz=true and FMA contraction on, every warning an error: no fused,
    flushed or approximate arithmetic, no local memory; ptxas assembles every kernel without
    stack frame or spills; the float64 source rounds with cvt.rn."""
    lines = [kcupy.storage_source(), *(_instantiation(*key) for key in INSTANCES)]
    (workdir / "convert.cu").write_text("\n".join(lines) + "\n")
    flags = ["-ftz=true", "-fmad=true", "-Werror", "all-warnings"]
    _run([nvcc, "-arch=sm_90", "-ptx", *flags, "convert.cu", "-o", "convert.ptx"], workdir)
    text = (workdir / "convert.ptx").read_text()
    entries = _entries(text)
    assert len(entries) == len(INSTANCES) and all("convert_kernel" in e for e in entries)
    for forbidden in FORBIDDEN:
        assert forbidden not in text, forbidden
    assert "cvt.rn.f32.f64" in text
    ptxas = pathlib.Path(nvcc).with_name("ptxas")
    info = _run(
        [str(ptxas), "-arch=sm_90", "-v", "--warning-as-error", "convert.ptx", "-o", "c.cubin"],
        workdir,
    )
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", info)
    assert len(frames) == len(INSTANCES) and all(f == ("0", "0") for f in frames), info


@pytest.fixture(scope="module")
def harness(nvcc, workdir):
    path = workdir / "convert_host_harness.cu"
    path.write_text(HARNESS)
    args = [ctypes.c_int] * 3 + [ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p]
    args += [ctypes.c_uint64] * 3 + [ctypes.c_int]
    dll = build_harness(
        nvcc, path, workdir, {"fo_host_convert": args}, {"fo_host_convert": ctypes.c_int}
    )
    return dll.fo_host_convert


def host_convert(harness, dst, src, sr, rs, word, n=None):
    """``fo::convert_element`` over every element of NumPy arrays ``dst`` and ``src``."""
    seed, step, index0 = rs
    n = src.size if n is None else n
    codes = (NAMES.index(dst.dtype.name), NAMES.index(src.dtype.name), int(sr))
    rc = harness(*codes, n, dst.ctypes.data, src.ctypes.data, seed, step, index0, word)
    assert rc == 0


# the pairs of tests/test_convert_sim.py, then the others the launcher instantiates
HOST_CASES = CASES + [(d, s, None) for d, s, _ in INSTANCES if (d, s, None) not in CASES]
HOST_CASES += [
    (d, s, w) for d, s in [("bfloat16", "float64"), ("float16", "bfloat16")] for w in (1, 3)
]


def _id(case):
    dst, src, word = case
    return f"{src}-{dst}" + ("" if word is None else f"-sr{word}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case", HOST_CASES, ids=[_id(c) for c in HOST_CASES])
def test_host_convert_matches_numba_cpu(harness, case):
    """The CUDA C loop body, built for the host, gives cpu_storage.convert's bits (1000
    elements: the specials, then random values or bit patterns)."""
    dst_name, src_name, word = case
    sr = word is not None and dst_name in ("bfloat16", "float16")
    rs = RS if word is not None else (0, 0, 0)
    src = source(src_name, 1000, seed=7 + (word or 0))
    got = np.zeros(src.size, _dtype(dst_name))
    host_convert(harness, got, src, sr, rs, word or 0)
    want = cpu_convert(dst_name, src, RS if word is not None else None, word or 0)
    assert _same_bits(got, want), case


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_host_widening_every_16bit_pattern(harness):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for name in ("bfloat16", "float16"):
        src = bits.view(_dtype(name))
        for dst_name in ("float32", "float64"):
            got = np.zeros(src.size, _dtype(dst_name))
            host_convert(harness, got, src, False, (0, 0, 0), 0)
            assert _same_bits(got, cpu_convert(dst_name, src, None, 0)), (name, dst_name)


# ---------------------------------------------------------------------------------------------
# kernels/cupy.py's convert over a fake CuPy whose kernels run on the harness.


class _Array(FakeDeviceArray):
    def view(self, dtype):
        return _Array(self.host.view(dtype))


@pytest.fixture
def fake(harness, monkeypatch):
    """A fake CuPy: each RawModule is compiled by NVRTC (its source must be storage_source()
    with the launcher's options), and each launch's arguments must match its kernel's PTX
    signature; then the harness runs it."""
    nvrtc = nvrtc_or_skip()
    fake = FakeCuPy(None, None, sm_count=3)
    fake.stream_stack = []
    fake.modules = []

    class RawModule:
        def __init__(self, code, options, name_expressions=()):
            assert code == kcupy.storage_source() and tuple(options) == kcupy.COMPILE_OPTIONS
            self.ptx, self.lowered = _nvrtc_compile(nvrtc, code, name_expressions, "compute_90")
            fake.modules.append(tuple(name_expressions))

        def get_function(self, expr):
            entry = self.lowered[expr]

            def launch(grid, block, args):
                sizes = [8 if isinstance(a, FakeDeviceArray) else a.nbytes for a in args]
                assert sizes == _param_sizes(self.ptx, entry), expr
                stream = fake.stream_stack[-1] if fake.stream_stack else None
                fake.launches.append((expr, grid, block, stream))
                d, s, sr = expr[expr.index("<") + 1 : -1].split(", ")
                dst, src, n, seed, step, index0, word = args
                assert type(n) is np.int64 and type(word) is np.int32
                assert all(type(v) is np.uint64 for v in (seed, step, index0))
                codes = (C_TYPES[d], C_TYPES[s], sr == "true")
                rc = harness(*codes, int(n), dst.data.ptr, src.data.ptr, int(seed), int(step),
                             int(index0), int(word))  # fmt: skip
                assert rc == 0

            return launch

    fake.RawModule = RawModule
    install(monkeypatch, fake)
    monkeypatch.setattr(kcupy, "_convert_modules", {})
    monkeypatch.setattr(kcupy, "_streams", {})
    return fake


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_cupy_convert_launches_match_numba_cpu(fake):
    """kernels/cupy.py's convert (and CuPyBackend.convert): one launch of the instantiation it
    names, 256 threads per block, grid min(ceil(n / 256), 32 * SMs), on the given stream; the
    bits of cpu_storage.convert; no launch for n = 0; a module per instantiation, compiled
    once."""
    backend = dispatch.CuPyBackend()
    cases = [("bfloat16", "float32", 2), ("float16", "float32", None), ("float32", "float64", None)]
    cases += [("float32", "bfloat16", None), ("float16", "float32", 0), ("bfloat16", "float32", 2)]
    for k, (dst_name, src_name, word) in enumerate(cases):
        rs = None if word is None else RS
        src = source(src_name, 1000, seed=k)
        dst = _Array(np.zeros(src.size, _dtype(dst_name)))
        fake.launches.clear()
        if k % 2:
            backend.convert(dst, _Array(src.copy()), rs, word or 0)
            stream = None
        else:
            with np.errstate(all="ignore"):
                kcupy.convert(dst, _Array(src.copy()), rs, word or 0, FakeStream(fake, 0xBEEF))
            stream = 0xBEEF
        expr = kcupy.convert_expression(dst_name, src_name, rs is not None)
        assert fake.launches == [(expr, (4,), (256,), stream)]
        assert _same_bits(dst.host, cpu_convert(dst_name, src, rs, word or 0)), (dst_name, word)
    assert len(fake.modules) == len(cases) - 1  # the last case's module is cached
    fake.launches.clear()
    big = _Array(np.zeros(300 * 256, np.float32))
    kcupy.convert(big, _Array(np.ones(300 * 256, _dtype("float16"))))
    assert fake.launches[0][1] == (32 * 3,)  # 32 blocks per SM at most
    assert (big.host == 1).all()
    fake.launches.clear()
    empty = _Array(np.zeros(0, np.float32))
    kcupy.convert(_Array(np.zeros(0, _dtype("bfloat16"))), empty, RS, 1)
    assert fake.launches == []


def test_cupy_convert_refuses_bad_arguments(fake):
    x = _Array(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="elements"):
        kcupy.convert(_Array(np.zeros(5, np.float32)), x)
    with pytest.raises(ValueError, match="word"):
        kcupy.convert(_Array(np.zeros(4, np.float16)), x, RS, 4)
    with pytest.raises(ValueError, match="storage dtype"):
        kcupy.convert(_Array(np.zeros(4, np.int32)), x)
    assert fake.launches == []


# ---------------------------------------------------------------------------------------------
# numba-cuda: the kernel of cuda_storage.convert compiles for a real GPU.

_NUMBA_PTX = """from fastopt.kernels import cuda_storage

arr = {n: types.Array(t, 1, "C") for n, t in
       [("float32", types.float32), ("float64", types.float64),
        ("bfloat16", types.uint16), ("float16", types.uint16)]}
for dst, src, sr in [("bfloat16", "float32", True), ("float16", "float64", False),
                     ("float32", "float16", False), ("float32", "float64", False)]:
    k = cuda_storage.converter(dst, src, sr).py_func
    sig = (arr[dst], arr[src], types.UniTuple(types.int64, 3), types.int64)
    ptx, _ = cuda.compile_ptx(k, sig, cc=(9, 0))
    assert ".local" not in ptx and "call." not in ptx, (dst, src, sr)
    assert ("st.global.u16" in ptx) == (dst in ("bfloat16", "float16")), (dst, src, sr)
    print("ok", dst, src, sr)
"""


def test_numba_cuda_convert_compiles_to_ptx():
    """The numba-cuda conversions (stochastic words indexed at run time included) compile with
    every helper inlined and nothing in local memory; skipped where libNVVM is missing."""
    assert run_ptx_script(PREAMBLE + _NUMBA_PTX, path=ROOT).count("ok") == 4
