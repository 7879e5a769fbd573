"""The standalone 8-bit passes in CUDA C (``fo_block_dequantize`` / ``fo_block_quantize`` of
kernels/block_kernels.cu, launched by ``block_cupy.dequantize_into`` / ``quantize_from``), without
a GPU.

- NVRTC compiles the passes' module (``block_cupy.pass_source()``) as ``cupy.RawModule`` does
  (sm_90, CuPy's ``-ftz=true``); nvcc compiles it with CuPy's flags and FMA contraction on, and
  ptxas assembles it: no fused, flushed or approximate arithmetic, no local memory, no stack
  frame; the quantize pass takes its block maximum with a shared-memory integer max.
- A host harness (built by nvcc here from the text below) runs the kernels' per-block bodies,
  the threads of a block in order (``block_dequantize`` per element; the largest
  ``magnitude_bits``, then ``block_requantize`` per element): the bits of the numba-cpu passes
  (``block_loops``) on tests/test_int8_convert.py's inputs.
- ``block_cupy``'s launchers (and ``CuPyBackend.dequantize`` / ``quantize``) over a fake CuPy
  whose kernels run on the harness: arguments that match the PTX signatures, the block kernels'
  launch shape, the given stream, the CPU's bits; bad arguments refused before any launch.
- numba-cuda's passes (``block_cuda.pass_kernel``) compile to PTX for a real GPU.

NVRTC / nvcc / libNVVM missing: skipped, or failures under FASTOPT_REQUIRE_NVRTC=1,
FASTOPT_REQUIRE_NVCC=1, FASTOPT_REQUIRE_NVVM=1.
"""

import ctypes
import pathlib
import re

import numpy as np
import pytest
from cupy_ptx import build_harness, entry_body, nvrtc_ptx
from fake_cupy import FakeDeviceArray, FakeStream, install
from ptx_without_gpu import PREAMBLE, run_ptx_script
from test_cuda_c import _entries, _param_sizes, _run
from test_int8_convert import empty_slot, values_of
from test_int8_cupy import BlockArray
from test_lbfgs_cupy import FakeVectorCuPy

from fastopt import dispatch
from fastopt.kernels import block_cupy, block_loops
from fastopt.kernels import cupy as kcupy
from fastopt.kernels.storage import QUANT_BLOCK
from fastopt.optim import precision

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = ("fma.", ".ftz", ".approx", ".local", "__local_depot")
SIGNS = pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
SIZES = (1, 255, 256, 257, 4096 + 3, 9 * QUANT_BLOCK + 44)
SM_COUNT = 2  # FakeVectorCuPy's

HARNESS = r"""
// The per-block bodies of fo_block_dequantize / fo_block_quantize (kernels/block_kernels.cu) over
// host arrays, a block's threads in order (tests/test_int8_convert_cuda_c.py).
#include "block_kernels.cu"

extern "C" void fo_host_dequantize(const unsigned char* codes, const float* absmax,
                                   const float* qmap, float* out, long long n) {
    for (long long i = 0; i < n; ++i) fo::block_dequantize(codes, absmax, qmap, i, i / FO_QUANT_BLOCK, out);
}

extern "C" void fo_host_quantize(unsigned char* codes, float* absmax, const float* qmap,
                                 const int* lut, const float* values, long long n) {
    const fo::quant_slot s = {codes, absmax, qmap, lut};
    for (long long b = 0; b * FO_QUANT_BLOCK < n; ++b) {
        const long long lo = b * FO_QUANT_BLOCK;
        const long long hi = lo + FO_QUANT_BLOCK < n ? lo + FO_QUANT_BLOCK : n;
        unsigned int top = 0u;  // the shared atomicMax
        for (long long i = lo; i < hi; ++i) {
            const unsigned int m = fo::magnitude_bits(values[i]);
            top = m > top ? m : top;
        }
        for (long long i = lo; i < hi; ++i) fo::block_requantize(s, i, b, top, values[i], i == lo);
    }
}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("int8_convert_c")


@pytest.fixture(scope="module")
def pass_ptx():
    """The PTX NVRTC makes of the passes' module, as CuPy compiles it (sm_90, -ftz=true)."""
    return nvrtc_ptx(block_cupy.pass_source(), block_cupy.COMPILE_OPTIONS)


def test_passes_compile_with_nvrtc(pass_ptx):
    """Exactly the two pass kernels (the per-rule block kernels are not instantiated), IEEE and
    in registers; the quantize pass: a shared-memory integer max, barriers, the quantizer's
    correctly rounded float64 reciprocal and product narrowed by an explicit cvt."""
    assert _entries(pass_ptx) == set(block_cupy.PASS_KERNELS)
    for forbidden in FORBIDDEN:
        assert forbidden not in pass_ptx, forbidden
    body = entry_body(pass_ptx, "fo_block_quantize")
    assert "atom.shared.max.u32" in body and "bar.sync" in body
    assert "rcp.rn.f64" in body and "mul.rn.f64" in body and "cvt.rn.f32.f64" in body
    assert "mul.rn.f32" in entry_body(pass_ptx, "fo_block_dequantize")
    assert _param_sizes(pass_ptx, "fo_block_dequantize") == [8, 8, 8, 8, 8]
    assert _param_sizes(pass_ptx, "fo_block_quantize") == [8, 8, 8, 8, 8, 8]


def test_passes_compile_ieee_under_cupy_flags(nvcc, workdir):
    """nvcc with CuPy's -ftz=true and FMA contraction on, every warning an error; ptxas
    assembles both kernels without stack frame or spills."""
    (workdir / "passes.cu").write_text(block_cupy.pass_source())
    flags = ["-ftz=true", "-fmad=true", "-Werror", "all-warnings"]
    _run([nvcc, "-arch=sm_90", "-ptx", *flags, "passes.cu", "-o", "passes.ptx"], workdir)
    text = (workdir / "passes.ptx").read_text()
    assert _entries(text) == set(block_cupy.PASS_KERNELS)
    for forbidden in FORBIDDEN:
        assert forbidden not in text, forbidden
    ptxas = pathlib.Path(nvcc).with_name("ptxas")
    info = _run(
        [str(ptxas), "-arch=sm_90", "-v", "--warning-as-error", "passes.ptx", "-o", "p.cubin"],
        workdir,
    )
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", info)
    assert len(frames) == 2 and all(f == ("0", "0") for f in frames), info


@pytest.fixture(scope="module")
def harness(nvcc, workdir):
    path = workdir / "int8_convert_host_harness.cu"
    path.write_text(HARNESS)
    p, ll = ctypes.c_void_p, ctypes.c_longlong
    argtypes = {"fo_host_dequantize": [p] * 4 + [ll], "fo_host_quantize": [p] * 5 + [ll]}
    return build_harness(nvcc, path, workdir, argtypes)


def _host_quantize(harness, slot, values):
    qm, lut = block_loops.tables(slot.signed)
    harness.fo_host_quantize(
        slot.codes.ctypes.data, slot.absmax.ctypes.data, qm.ctypes.data, lut.ctypes.data,
        values.ctypes.data, values.size,
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@SIGNS
@pytest.mark.parametrize("n", SIZES)
def test_host_bodies_match_numba_cpu(harness, n, signed):
    """The per-block bodies built for the host give block_loops' bits: quantize (codes and
    absmax) and dequantize (of the quantized slot, and of one with zero, NaN and Inf absmax)."""
    values = values_of(n, signed, seed=n + 40)
    want, got = empty_slot(n, signed), empty_slot(n, signed)
    block_loops.quantize_from(want, values)
    _host_quantize(harness, got, values)
    assert got.codes.tobytes() == want.codes.tobytes()
    assert got.absmax.tobytes() == want.absmax.tobytes()
    rng = np.random.default_rng(n)
    odd = precision.Quantized(rng.integers(0, 256, n, dtype=np.uint8), want.absmax.copy(), signed)
    for b, scale in zip(range(1, odd.absmax.size, 3), (0.0, np.nan, np.inf, 1e-40)):
        odd.absmax[b] = scale
    qm, _ = block_loops.tables(signed)
    for slot in (want, odd):
        expected = np.full(n, 5.0, np.float32)
        block_loops.dequantize_into(slot, expected)
        out = np.full(n, 5.0, np.float32)
        harness.fo_host_dequantize(
            slot.codes.ctypes.data, slot.absmax.ctypes.data, qm.ctypes.data, out.ctypes.data, n
        )
        assert out.tobytes() == expected.tobytes()


# ---------------------------------------------------------------------------------------------
# block_cupy's launchers over a fake CuPy whose kernels are the harness.


@pytest.fixture
def fake(harness, pass_ptx, monkeypatch):
    """A fake CuPy: the passes' module must be ``pass_source()`` with the launcher's options;
    each launch's arguments must match its kernel's PTX signature and the block kernels' launch
    shape; then the harness runs it."""

    def run(name, grid, block, args):
        sizes = [8 if isinstance(a, FakeDeviceArray) else a.nbytes for a in args]
        assert sizes == _param_sizes(pass_ptx, name), name
        n = args[-1]
        assert type(n) is np.int64 and block == (QUANT_BLOCK,)
        assert grid == (max(1, min(-(-int(n) // QUANT_BLOCK), kcupy.BLOCKS_PER_SM * SM_COUNT)),)
        ptrs = [a.host.ctypes.data for a in args[:-1]]
        getattr(harness, name.replace("fo_block_", "fo_host_"))(*ptrs, int(n))

    fake = FakeVectorCuPy(run)
    fake.sources = []

    class RawModule:
        def __init__(self, code, options):
            assert tuple(options) == block_cupy.COMPILE_OPTIONS
            fake.sources.append(code)

        def get_function(self, name):
            def launch(grid, block, args):
                fake.launches.append((name, grid, block, args))
                fake.streams.append(fake.current_stream)
                run(name, grid, block, args)

            return launch

    fake.RawModule = RawModule
    fake.ndarray = BlockArray
    fake.empty = lambda n, dtype: BlockArray(  # NaN (or -1): an element never written shows
        np.full(n, np.nan if np.dtype(dtype).kind == "f" else -1, dtype)
    )
    install(monkeypatch, fake)
    monkeypatch.setattr(block_cupy, "_modules", {})
    monkeypatch.setattr(block_cupy, "_tables", {})
    monkeypatch.setattr(kcupy, "_streams", {})
    monkeypatch.setattr(dispatch, "_INSTANCES", {})
    return fake


def _device(slot):
    return precision.Quantized(
        BlockArray(slot.codes.copy()), BlockArray(slot.absmax.copy()), slot.signed
    )


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_launchers_match_numba_cpu(fake):
    """quantize then dequantize through block_cupy (on a stream) and through CuPyBackend's
    methods (CuPy's current stream): one launch each, the CPU's bits; the module compiled once;
    nothing launched for an empty slot."""
    backend = dispatch.CuPyBackend()
    for k, (n, signed) in enumerate([(9 * QUANT_BLOCK + 44, True), (300, False), (1, True)]):
        values = values_of(n, signed, seed=k)
        want = empty_slot(n, signed)
        block_loops.quantize_from(want, values)
        want_back = np.empty(n, np.float32)
        block_loops.dequantize_into(want, want_back)
        slot, dv = _device(empty_slot(n, signed)), BlockArray(values.copy())
        back = BlockArray(np.zeros(n, np.float32))
        fake.launches.clear()
        fake.streams.clear()
        if k % 2:
            backend.quantize(slot, dv)
            backend.dequantize(slot, back)
            streams = [0, 0]
        else:
            block_cupy.quantize_from(slot, dv, FakeStream(fake, 0xBEEF))
            block_cupy.dequantize_into(slot, back, FakeStream(fake, 0xBEEF))
            streams = [0xBEEF, 0xBEEF]
        assert [name for name, *_ in fake.launches] == ["fo_block_quantize", "fo_block_dequantize"]
        assert fake.streams == streams
        assert slot.codes.host.tobytes() == want.codes.tobytes()
        assert slot.absmax.host.tobytes() == want.absmax.tobytes()
        assert back.host.tobytes() == want_back.tobytes()
        assert dv.host.tobytes() == values.tobytes()
    assert fake.sources == [block_cupy.pass_source()]
    fake.launches.clear()
    big = _device(empty_slot(300 * QUANT_BLOCK, False))
    block_cupy.quantize_from(big, BlockArray(np.ones(300 * QUANT_BLOCK, np.float32)))
    assert fake.launches[0][1] == (kcupy.BLOCKS_PER_SM * SM_COUNT,)  # block-stride beyond
    assert (big.absmax.host == 1).all() and (big.codes.host == 255).all()
    fake.launches.clear()
    empty = _device(empty_slot(0, True))
    block_cupy.quantize_from(empty, BlockArray(np.zeros(0, np.float32)))
    block_cupy.dequantize_into(empty, BlockArray(np.zeros(0, np.float32)))
    assert fake.launches == []


def test_launchers_refuse_bad_arguments_before_any_launch(fake):
    slot = _device(empty_slot(300, False))
    v = BlockArray(np.ones(300, np.float32))
    for fn, s, a, exc, match in (
        (
            block_cupy.quantize_from,
            slot,
            np.ones(300, np.float32),
            TypeError,
            "values is a ndarray",
        ),
        (block_cupy.quantize_from, slot, BlockArray(np.ones(299, np.float32)), ValueError, "300"),
        (block_cupy.dequantize_into, slot, BlockArray(np.ones(300)), TypeError, "float32"),
        (block_cupy.dequantize_into, (1, 2), v, TypeError, "8-bit slot"),
        (
            block_cupy.quantize_from,
            precision.Quantized(slot.codes, BlockArray(np.ones(1, np.float32)), False),
            v,
            ValueError,
            "absmax must be a flat contiguous array of 2",
        ),
    ):
        with pytest.raises(exc, match=match):
            fn(s, a)
    assert fake.launches == [] and (slot.codes.host == 77).all()


# ---------------------------------------------------------------------------------------------
# numba-cuda: the passes of block_cuda compile for a real GPU.

_NUMBA_PTX = """from fastopt.kernels import block_cuda

arr = lambda t: types.Array(t, 1, "C")
u8, f32 = arr(types.uint8), arr(types.float32)
sigs = {"dequantize": (u8, f32, f32, f32), "quantize": (u8, f32, f32, arr(types.int32), f32)}
for name, sig in sigs.items():
    ptx, _ = cuda.compile_ptx(block_cuda.pass_kernel(name).py_func, sig, cc=(9, 0))
    assert ".local" not in ptx and "call." not in ptx and "fma." not in ptx, name
    assert ("atom.shared.max.u32" in ptx) == (name == "quantize"), name
    print("ok", name)
"""


def test_numba_cuda_passes_compile_to_ptx():
    """Every helper inlined, nothing in local memory, nothing fused; the quantize pass takes its
    block maximum with a shared-memory integer max. Skipped where libNVVM is missing."""
    assert run_ptx_script(PREAMBLE + _NUMBA_PTX, path=ROOT).count("ok") == 2
