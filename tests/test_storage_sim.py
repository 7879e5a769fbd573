"""Storage helpers (kernels/storage.py) as CUDA device functions under the Numba CUDA simulator,
and a whole storage loop (an optimizer step with stochastic rounding) against the CPU kernel.

The simulator tests run in their own process with the simulator switched on before numba is
imported::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_storage_sim.py -q -p no:cacheprovider

The plain test run starts that process itself (:func:`test_simulator_run`): the CI's simulator
step runs ``tests/test_cuda_sim.py`` and ``tests/test_dispatch.py`` only.

``compile_storage(cuda.jit(device=True), "cuda")`` keeps the plain-Python bit casts under the
simulator; one kernel applies every helper and its results must equal the njit-compiled helpers
and the reference casts (ml_dtypes, NumPy) bit for bit.
"""

# ruff: noqa: F821

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from elementwise import elementwise

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim_only = pytest.mark.skipif(
    not SIM, reason="CUDA simulator test: test_simulator_run runs it with NUMBA_ENABLE_CUDASIM=1"
)

if SIM:
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
    if not SIM:
        pytest.skip("CUDA simulator fixture")
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


@sim_only
def test_random_bits_match_cpu(results):
    _, _, rbits, _, _, _ = results
    cpu = storage.compile_storage(numba.njit, "cpu")["random_bits4"]
    expected = [[int(w) for w in cpu(SEED, 5, i)] for i in range(N)]
    assert rbits.tolist() == expected


@sim_only
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


@sim_only
def test_widening_matches_cpu_and_references(results):
    _, h, _, f, _, _ = results
    bf = h.view(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(f[:, 0].view(np.uint32), bf.view(np.uint32))
    np.testing.assert_array_equal(
        f[:, 1].view(np.uint32), _cpu("f16_to_f32", np.float32, h).view(np.uint32)
    )
    finite = np.isfinite(h.view(np.float16))
    np.testing.assert_array_equal(f[finite, 1], h[finite].view(np.float16).astype(np.float32))


@sim_only
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


@sim_only
@pytest.mark.parametrize(
    "names",
    [("bfloat16", "float32", "bfloat16", True), ("float16", "float16", "float16", False)],
    ids=["bf16-master", "fp16"],
)
def test_storage_loop_with_stochastic_rounding_matches_cpu(names):
    """One AdamW step of the storage loop (``kernels/loops.py``) compiled for the CUDA target:
    the rules as device functions, the element access of ``access.bind`` over the CUDA storage
    helpers. With stochastic rounding (bits from seed, step and element index) its parameters,
    master copy and state equal the CPU kernel's bit for bit, whatever the grid."""
    from fastopt.kernels import access, cpu_storage
    from fastopt.kernels import cuda as kcuda
    from fastopt.kernels.compile_rules import storage_loop_kernel

    storage_ = access.Storage(*names, True)
    device = cuda.jit(device=True)
    rules, indices = kcuda._device_functions()
    element_access = access.bind(storage_, storage.compile_storage(device, "cuda"), device)
    k = storage_loop_kernel("adam", storage_, rules, element_access, indices, cuda.jit, "_sim")
    n = 300  # more than the grid's 192 threads: the grid-stride loop takes two rounds
    rng = np.random.default_rng(1)
    dt = {n_: (ml_dtypes.bfloat16 if n_ == "bfloat16" else np.dtype(n_)) for n_ in names[:3]}
    p = rng.standard_normal(n).astype(dt["bfloat16" if names[0] == "bfloat16" else names[0]])
    g = rng.standard_normal(n).astype(dt[names[1]])
    m = (rng.standard_normal(n) * 0.1).astype(dt[names[2]])
    v = rng.random(n).astype(dt[names[2]])
    master = p.astype(np.float32) if names[3] else None
    f32 = np.float32
    h = tuple(f32(x) for x in (1.0, 0.1, 1.0, 0.9, 0.1, 0.999, 0.001, 0.1, 0.0316, 1e-8))
    gs, rs = (f32(1.0), f32(0.0)), (7, 3, 1000)
    host = [a.copy() for a in (p, g, m, v)]
    host_master = None if master is None else master.copy()
    cpu_storage.apply("adam", storage_, *host[:2], host[2:], host_master, h, gs, rs)
    b = cpu_storage.bits
    # device arrays: without a master copy the parameter is passed twice (p and w), and two
    # host arguments would be two device copies, each copied back
    sim = [cuda.to_device(b(a)) for a in (p, g, m, v)]
    w = sim[0] if master is None else cuda.to_device(master)
    k[3, 64](sim[0], w, sim[1], sim[2], sim[3], h, gs, rs)
    for got, want in zip([sim[0], sim[2], sim[3]], [host[0], host[2], host[3]]):
        assert np.array_equal(got.copy_to_host(), b(want))
    if master is not None:
        assert np.array_equal(w.copy_to_host(), host_master)
    assert not np.array_equal(host[0], p)  # the step moved the parameters


@pytest.mark.skipif(SIM, reason="the process it starts runs the simulator tests")
def test_simulator_run():
    """This file's simulator tests, in a process of their own with the simulator on."""
    here = pathlib.Path(__file__).resolve()
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    root = str(here.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(here),
            "-k",
            "not run",
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout
