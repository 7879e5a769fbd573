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
    # blocks of 8 threads: the kernel uses no block-level feature, and the simulator's cost grows
    # with the square of the threads per block (tests/cudasim.py): 128 took 83-420 s here
    kernel[N // 8, 8](x, h, rbits, f, o, c, qmap)
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


# ---------------------------------------------------------------------------------------------
# The numba-cuda storage kernels (kernels/cuda_storage.py) against the numba-cpu ones: the same
# optimizer over simulated device arrays and over NumPy arrays, bit for bit (the simulator runs
# the rules as Python on NumPy float32 scalars, which the CPU kernels compute identically).

BF16 = "bfloat16"
F32 = "float32"
F16 = "float16"


def _dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == BF16 else np.dtype(name)


# (id, optimizer, kwargs, parameter dtype, gradient dtype)
STORAGE_CASES = [
    ("adamw-bf16", "AdamW", dict(lr=1e-2, weight_decay=0.1), BF16, BF16),
    ("sgdm-bf16", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True), BF16, BF16),
    ("adamw-fp16", "AdamW", dict(lr=1e-2, weight_decay=0.1), F16, F16),
    ("adamw-bf16-fp32-grads", "AdamW", dict(lr=1e-2), BF16, F32),
    ("adamw-fp32-bf16-grads", "AdamW", dict(lr=1e-2), F32, BF16),
    ("adamw-bf16-master", "AdamW", dict(lr=1e-2, master_weights=True), BF16, BF16),
    (
        "sgdm-fp16-master-sr",
        "SGD",
        dict(lr=0.1, momentum=0.9, master_weights=True, stochastic_rounding=True, seed=9),
        F16,
        F16,
    ),
    ("adamw-bf16-sr", "AdamW", dict(lr=1e-2, stochastic_rounding=True, seed=11), BF16, BF16),
    (
        "adamw-fp32-bf16-state-sr",
        "AdamW",
        dict(lr=1e-2, state_dtype="bfloat16", stochastic_rounding=True, seed=3),
        F32,
        F32,
    ),
]

SIZES = (37, 11)  # two parameters: the second one's random bits start at index 37


def _pair(cls_name, kwargs, pdt, seed=0):
    import fastopt as fo

    rng = np.random.default_rng(seed)
    host = [rng.standard_normal(n).astype(_dtype(pdt)) for n in SIZES]
    dev = [cuda.to_device(a.copy()) for a in host]
    cls = getattr(fo, cls_name)
    return host, dev, cls(host, **kwargs), cls(dev, **kwargs)


def _grads(gdt, t):
    rng = np.random.default_rng(100 + t)
    return [(rng.standard_normal(n) * 3).astype(_dtype(gdt)) for n in SIZES]


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype
    view = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return np.array_equal(a.view(view), b.view(view))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case", STORAGE_CASES, ids=[c[0] for c in STORAGE_CASES])
def test_sim_storage_kernels_match_cpu(case):
    _, cls_name, kwargs, pdt, gdt = case
    host, dev, opt_h, opt_d = _pair(cls_name, kwargs, pdt)
    unit = opt_d._groups[0]["units"][0]
    assert unit.backend.name == "numba-cuda" and unit.param.dtype == _dtype(pdt)
    for t in range(2):
        grads = _grads(gdt, t)
        opt_h.step(grads)
        opt_d.step([cuda.to_device(g) for g in grads])
    for d, h in zip(dev, host):
        assert _same_bits(d.copy_to_host(), h), case[0]
    sd, sh = opt_d.state_dict()["state"], opt_h.state_dict()["state"]
    for i in sh:
        for k, v in sh[i].items():
            if isinstance(v, np.ndarray):
                assert _same_bits(sd[i][k], v), (case[0], i, k)
    if "master_weights" in kwargs:
        assert sd[0]["master_param"].dtype == np.float32
    if kwargs.get("state_dtype") == "bfloat16":
        assert sd[0]["exp_avg"].dtype == _dtype(BF16)


def _device_view(values, offset):
    """``values`` (a 16-bit array) on the device, starting ``offset`` elements past the start of
    a larger (8-byte aligned) allocation."""
    bits = values.view(np.uint16)
    big = cuda.to_device(np.zeros(bits.size + 8, np.uint16))
    view = big[offset : offset + bits.size]
    view.copy_to_device(bits)
    return view.view(values.dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_sim_packs_at_every_alignment_match_cpu(offset):
    """Parameters and gradients starting ``offset`` elements past an 8-byte boundary (views into
    larger device allocations; the state allocated by the optimizer): the storage kernel reads
    whole packs as 8-byte words where every 16-bit array is aligned (offset 0) and element by
    element where not (kernels/packed_loops.py), with the CPU's bits either way (bfloat16
    AdamW, stochastic rounding, 41 elements: 10 packs and 1)."""
    import fastopt as fo
    from fastopt.kernels import packed_loops

    assert packed_loops.aligned_bits16(_device_view(np.zeros(4, np.float16), offset)) == (
        offset == 0
    )
    bf16 = _dtype(BF16)
    rng = np.random.default_rng(offset)
    host = rng.standard_normal(41).astype(bf16)
    dev = _device_view(host, offset)
    kwargs = dict(lr=1e-2, weight_decay=0.1, stochastic_rounding=True, seed=5)
    opt_h, opt_d = fo.AdamW([host], **kwargs), fo.AdamW([dev], **kwargs)
    assert opt_d._groups[0]["units"][0].backend.name == "numba-cuda"
    for t in range(2):
        g = (np.random.default_rng(50 + t).standard_normal(41) * 3).astype(bf16)
        opt_h.step([g])
        opt_d.step([_device_view(g, offset)])
    assert _same_bits(dev.copy_to_host(), host)
    sd, sh = opt_d.state_dict()["state"][0], opt_h.state_dict()["state"][0]
    assert _same_bits(sd["exp_avg"], sh["exp_avg"]) and _same_bits(
        sd["exp_avg_sq"], sh["exp_avg_sq"]
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_stochastic_rounding_depends_on_the_seed_only():
    """The same seed gives the CPU's bits (test above); another seed other bits, so the
    random bits do reach the stores."""
    kwargs = dict(lr=1e-2, stochastic_rounding=True)
    _, dev_a, _, opt_a = _pair("AdamW", dict(kwargs, seed=1), BF16)
    _, dev_b, _, opt_b = _pair("AdamW", dict(kwargs, seed=2), BF16)
    grads = _grads(BF16, 0)
    opt_a.step([cuda.to_device(g) for g in grads])
    opt_b.step([cuda.to_device(g) for g in grads])
    assert not _same_bits(dev_a[0].copy_to_host(), dev_b[0].copy_to_host())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_16bit_gradient_norm_clipping_and_skipping():
    """max_grad_norm / skip_nonfinite over bfloat16 device gradients: the widening reduction of
    kernels/cuda.py over the bits gives the CPU's norm and the same updates."""
    kwargs = dict(lr=1e-2, max_grad_norm=0.5, skip_nonfinite=True)
    host, dev, opt_h, opt_d = _pair("AdamW", kwargs, BF16)
    grads = _grads(BF16, 0)
    opt_h.step(grads)
    opt_d.step([cuda.to_device(g) for g in grads])
    np.testing.assert_allclose(opt_d.last_grad_norm, opt_h.last_grad_norm, rtol=1e-13)
    assert opt_d.last_grad_norm > 0.5  # the clipping scaled the gradients
    for d, h in zip(dev, host):
        assert _same_bits(d.copy_to_host(), h)
    bad = _grads(BF16, 1)
    bad[1][3] = np.inf
    before = [d.copy_to_host() for d in dev]
    opt_d.step([cuda.to_device(g) for g in bad])
    assert opt_d.last_step_taken is False
    assert all(_same_bits(d.copy_to_host(), b) for d, b in zip(dev, before))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_float16_sum_of_squares_matches_cpu():
    """The float16 widening reduction (32 threads per block: the simulator runs each thread as a
    Python thread) against the CPU's, and its non-finite flag."""
    from fastopt.kernels import cpu_storage, cuda_storage

    x = (np.random.default_rng(2).standard_normal(300) * 50).astype(np.float16)
    total, finite = cuda_storage.sumsq_and_finite(cuda.to_device(x), threads=32)
    want, want_finite = cpu_storage.sumsq_and_finite(x)
    assert finite is want_finite is True
    np.testing.assert_allclose(total, want, rtol=1e-13)
    x[123] = np.nan
    assert cuda_storage.sumsq_and_finite(cuda.to_device(x), threads=32)[1] is False


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("pdt", [BF16, F16])
def test_sim_16bit_backend_array_helpers_match_cpu(pdt):
    """zeros, fill, add (gradient accumulation, also from float32), scale and clamp (the clipping
    functions) on 16-bit device arrays give the CPU backend's bits."""
    from fastopt import dispatch

    gpu, cpu = dispatch.get_backend("numba-cuda"), dispatch.get_backend("numba-cpu")
    dt = _dtype(pdt)
    rng = np.random.default_rng(4)
    a = (rng.standard_normal(29) * 4).astype(dt)
    b = rng.standard_normal(29).astype(dt)
    b32 = rng.standard_normal(29).astype(np.float32)
    z = gpu.zeros(29, dt)
    assert z.dtype == dt and _same_bits(z.copy_to_host(), np.zeros(29, dt))
    gpu.fill(z, 0.1)
    assert _same_bits(z.copy_to_host(), np.full(29, 0.1, dt))
    d, h = cuda.to_device(a.copy()), a.copy()
    for op, args in [
        ("add", (cuda.to_device(b),)),
        ("add", (cuda.to_device(b32),)),
        ("scale", (0.3,)),
        ("clamp", (0.7,)),
    ]:
        getattr(gpu, op)(d, *args)
        host_args = [x.copy_to_host() if hasattr(x, "copy_to_host") else x for x in args]
        if op == "add" and host_args[0].dtype != dt:  # the float32 sum, rounded once
            h[...] = (h.astype(np.float32) + host_args[0]).astype(dt)
        else:
            getattr(cpu, op)(h, *host_args)
        assert _same_bits(d.copy_to_host(), h), op
