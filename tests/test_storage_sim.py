"""Storage helpers (kernels/storage.py) as CUDA device functions under the Numba CUDA simulator.

Run in its own process with the simulator switched on before numba is imported::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_storage_sim.py -q -p no:cacheprovider

``compile_storage(cuda.jit(device=True), "cuda")`` keeps the plain-Python bit casts under the
simulator; one kernel applies every helper and its results must equal the njit-compiled helpers
and the reference casts (ml_dtypes, NumPy) bit for bit.
"""

# ruff: noqa: F821

import os

import numpy as np
import pytest
from elementwise import elementwise

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
    reason="CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 in their own process",
)

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    import ml_dtypes
    import numba
    from numba import cuda

    from fastopt.kernels import storage
else:  # keep collection free of numba.cuda imports outside the simulator
    ml_dtypes = numba = cuda = storage = None

N = 512
SEED = 123456789012


# The storage helpers in _kernel are globals it gets from compile_storage's dict (see results).
def _kernel(x, h, rbits, f, o, c, qmap):
    i = cuda.grid(1)
    if i < x.size:
        r0, r1, r2, r3 = random_bits4(SEED, 5, i)
        rbits[4 * i], rbits[4 * i + 1], rbits[4 * i + 2], rbits[4 * i + 3] = r0, r1, r2, r3
        o[4 * i] = f32_to_bf16_rne(x[i])
        o[4 * i + 1] = f32_to_bf16_sr(x[i], r0)
        o[4 * i + 2] = f32_to_f16_rne(x[i])
        o[4 * i + 3] = f32_to_f16_sr(x[i], r1)
        f[3 * i] = bf16_to_f32(h[i])
        f[3 * i + 1] = f16_to_f32(h[i])
        start = i - i % QUANT_BLOCK
        m = block_absmax(x, start, min(start + QUANT_BLOCK, x.size))
        c[i] = quantize_value(x[i], m, qmap)
        f[3 * i + 2] = dequantize(c[i], m, qmap)


def _inputs():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(N) * 2.0 ** rng.integers(-30, 20, N)).astype(np.float32)
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 65520.0, 65504.0, 2.0**-25, 3 * 2.0**-25]
    x[256 : 256 + len(specials)] = specials  # the second quantization block: Inf, NaN
    x[1:2] = np.array([0x3F808000], np.uint32).view(np.float32)  # a bf16 tie
    h = rng.integers(0, 1 << 16, N, dtype=np.uint16)
    h[:6] = [0x0001, 0x7C00, 0x7C01, 0xFE00, 0x8000, 0x7F81]
    return x, h


@pytest.fixture(scope="module")
def results():
    helpers = storage.compile_storage(cuda.jit(device=True), "cuda")
    glb = dict(helpers, cuda=cuda, SEED=SEED, QUANT_BLOCK=storage.QUANT_BLOCK, min=min)
    kernel = cuda.jit(type(_kernel)(_kernel.__code__, glb, "storage_sim_kernel"))
    x, h = _inputs()
    rbits = np.zeros(4 * N, np.int64)
    f = np.zeros(3 * N, np.float32)
    o = np.zeros(4 * N, np.uint16)
    c = np.zeros(N, np.uint8)
    qmap = storage.DYNAMIC_MAP_SIGNED.copy()  # read-only; a kernel argument is copied back
    kernel[N // 128, 128](x, h, rbits, f, o, c, qmap)
    return x, h, rbits.reshape(N, 4), f.reshape(N, 3), o.reshape(N, 4), c


def _cpu(name, out_dtype, *arrays):
    f = storage.compile_storage(numba.njit, "cpu")[name]
    return elementwise(f, len(arrays), out_dtype)(*arrays)


def test_random_bits_match_cpu(results):
    _, _, rbits, _, _, _ = results
    cpu = storage.compile_storage(numba.njit, "cpu")["random_bits4"]
    expected = [[int(w) for w in cpu(SEED, 5, i)] for i in range(N)]
    assert rbits.tolist() == expected


def test_roundings_match_cpu_and_references(results):
    x, _, rbits, _, o, _ = results
    with np.errstate(invalid="ignore", over="ignore"):
        np.testing.assert_array_equal(o[:, 0], x.astype(ml_dtypes.bfloat16).view(np.uint16))
        finite16 = ~np.isnan(x)
        np.testing.assert_array_equal(
            o[finite16, 2], x[finite16].astype(np.float16).view(np.uint16)
        )
    np.testing.assert_array_equal(o[:, 2], _cpu("f32_to_f16_rne", np.uint16, x))
    np.testing.assert_array_equal(o[:, 1], _cpu("f32_to_bf16_sr", np.uint16, x, rbits[:, 0]))
    np.testing.assert_array_equal(o[:, 3], _cpu("f32_to_f16_sr", np.uint16, x, rbits[:, 1]))
    assert o[1, 0] == 0x3F80  # the tie went to even


def test_widening_matches_cpu_and_references(results):
    _, h, _, f, _, _ = results
    bf = h.view(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(f[:, 0].view(np.uint32), bf.view(np.uint32))
    np.testing.assert_array_equal(
        f[:, 1].view(np.uint32), _cpu("f16_to_f32", np.float32, h).view(np.uint32)
    )
    finite = np.isfinite(h.view(np.float16))
    np.testing.assert_array_equal(f[finite, 1], h[finite].view(np.float16).astype(np.float32))


def test_quantization_matches_cpu(results):
    x, _, _, f, _, c = results
    qmap = storage.DYNAMIC_MAP_SIGNED
    cpu = storage.compile_storage(numba.njit, "cpu")
    absmax = np.array([cpu["block_absmax"](x, b, b + 256) for b in (0, 256)], np.float32)
    assert np.isnan(absmax[1]) and absmax[0] == np.abs(x[:256]).max()
    per = absmax.repeat(256)
    codes = np.array([cpu["quantize_value"](x[i], per[i], qmap) for i in range(N)])
    np.testing.assert_array_equal(c, codes)
    expected = qmap[codes] * per
    np.testing.assert_array_equal(f[:, 2].view(np.uint32), expected.view(np.uint32))
    assert np.isnan(f[256:, 2]).all() and np.isfinite(f[:256, 2]).all()
