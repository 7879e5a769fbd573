"""``convert`` on numba-cuda (kernels/cuda_storage.py) against the numba-cpu one
(kernels/cpu_storage.py) under the Numba CUDA simulator, bit for bit.

Run in its own process with the simulator switched on before numba is imported::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_convert_sim.py -q -p no:cacheprovider

Both compile the same template (``loops.convert_loop`` with ``access.bind_convert``): exact
widening, rounding to nearest even, and stochastic rounding with one word of
``random_bits4(seed, step, index0 + i)``. The inputs hold NaNs (quiet, signalling, with payloads),
infinities, signed zeros, subnormals of every format, values at and one unit either side of the
rounding ties of bfloat16, float16 and float32, and the overflow thresholds. The simulator runs
each CUDA thread as a Python thread (tests/cudasim.py), so the launches use few threads per block.
"""

import os

import ml_dtypes
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
    reason="CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 in their own process",
)

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    from numba import cuda

    from fastopt import dispatch
    from fastopt.kernels import cuda_storage
else:  # keep collection free of numba.cuda imports outside the simulator (the inputs and CASES
    # below serve tests/test_convert_cuda_c.py too)
    cuda = dispatch = cuda_storage = None

BF16, F16, F32, F64 = "bfloat16", "float16", "float32", "float64"
RS = (2**62 + 987654321, 7, 5 * 2**32 - 500)  # a large seed; indices cross a 2**32 boundary
SIZES = (0, 1, 1000)
LAUNCH = dict(threads=32, blocks=4)  # grid-stride: 128 threads over 1000 elements


def _dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == BF16 else np.dtype(name)


def _f32(bits):
    return np.array(bits, np.uint32).view(np.float32)


def _f32_specials():
    """float32 values where conversions go wrong: specials, subnormals, ties and their
    neighbours, overflow thresholds of bfloat16 and float16."""
    nan = [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA00000, 0xFF812345, 0x7FFFFFFF]
    ties = []
    for upper in (0x3F80, 0x3F81, 0x4049, 0xC0C7, 0x0080, 0x8001, 0x7F7F, 0xFF7F):
        tie = (upper << 16) | 0x8000  # bfloat16: halfway, even and odd upper halves
        ties += [tie - 1, tie, tie + 1]
    for base in (0x3F800000, 0x3F802000, 0x477FE000, 0xC2F6C000, 0x38800000):
        tie = base | 0x1000  # float16 normals: halfway between neighbours
        ties += [tie - 1, tie, tie + 1]
    values = [
        0.0, -0.0, np.inf, -np.inf,
        1e-45, -1e-45, 1e-40, -3e-39, 1.1754942e-38, 1.17549435e-38,  # float32 subnormals
        2.0**-24, 2.0**-25, 3 * 2.0**-25, -(2.0**-25), 2.0**-26, 5 * 2.0**-26,  # float16 ones
        6.1e-5, 6.097555e-5, 2.0**-14, 2.0**-14 - 2.0**-25,
        65504.0, 65519.996, 65520.0, -65520.0, 65536.0, 3.3895314e38, 3.4028235e38,
        1.0, -1.0, 1.00390625, 1.0009765625, 0.1, -0.3333333,
    ]  # fmt: skip
    return np.concatenate([_f32(nan), _f32(ties), np.array(values, np.float32)])


def _f64_specials():
    """float64 values at float32 rounding boundaries: ties and neighbours, overflow, subnormals."""
    f32 = np.array([1.0, 1.0000001, -3.75, 1.1754944e-38, 1.4e-45, 3.4028235e38], np.float32)
    ulp = np.spacing(f32).astype(np.float64)
    ties = f32.astype(np.float64) + ulp / 2
    near = np.concatenate([ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf)])
    nan = np.array([0x7FF8000000000000, 0xFFF8000000000001, 0x7FF0000000000001], np.uint64)
    values = [0.0, -0.0, np.inf, -np.inf, 5e-324, -5e-324, 1e-310, 7e-46, 3.5e38, -1e39, 1e300]
    return np.concatenate([nan.view(np.float64), near, np.array(values)])


def source(name, n, seed=0):
    """``n`` values of storage dtype ``name``: the specials first, then random values over many
    binades (16-bit sources: random bit patterns, every class of value)."""
    rng = np.random.default_rng(seed)
    if name in (BF16, F16):
        bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
        specials = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x007F, 0x7C00, 0xFC00, 0x7F80]
        specials += [0xFF80, 0x7C01, 0x7E00, 0xFE01, 0x7F81, 0x7FC0, 0xFFFF, 0x3C00, 0x7BFF]
        k = min(n, len(specials))
        bits[:k] = specials[:k]
        return bits.view(_dtype(name))
    specials = _f64_specials() if name == F64 else _f32_specials()
    x = rng.standard_normal(n) * 2.0 ** rng.integers(-140, 128, n)
    with np.errstate(over="ignore"):
        x = x.astype(name)
    k = min(n, specials.size)
    x[:k] = specials[:k]
    return x


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    view = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(view), b.view(view))


def cpu_convert(dst_name, src, rs, word):
    from fastopt.kernels import cpu_storage

    want = np.zeros(src.size, _dtype(dst_name))
    with np.errstate(all="ignore"):
        cpu_storage.convert(want, src, rs, word)
    return want


def gpu_convert(dst_name, src, rs, word, **launch):
    if dst_name in (BF16, F16):  # numba allocates no bfloat16: a uint16 buffer viewed
        dst = cuda.to_device(np.full(src.size, 0x5555, np.uint16)).view(_dtype(dst_name))
    else:
        dst = cuda.to_device(np.full(src.size, 7, _dtype(dst_name)))
    with np.errstate(all="ignore"):
        cuda_storage.convert(dst, cuda.to_device(src), rs, word, **launch)
    return dst.copy_to_host()


def check(dst_name, src_name, n, rs=None, word=0, **launch):
    src = source(src_name, n, seed=n + word)
    got = gpu_convert(dst_name, src, rs, word, **launch)
    want = cpu_convert(dst_name, src, rs, word)
    if not _same_bits(got, want):
        bad = np.flatnonzero(got.view(np.uint8) != want.view(np.uint8))[:8]
        raise AssertionError(f"{src_name}->{dst_name} n={n} rs={rs} word={word}: bytes {bad}")
    return src, got


# (destination, source, stochastic word or None)
CASES = [
    (BF16, F32, None),
    *[(BF16, F32, w) for w in range(4)],
    (F16, F32, None),
    *[(F16, F32, w) for w in range(4)],
    (F32, BF16, None),
    (F32, F16, None),
    (F32, F64, None),
]


def _id(case):
    dst, src, word = case
    return f"{src}-{dst}" + ("" if word is None else f"-sr{word}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_sim_convert_matches_cpu(case, n):
    dst, src, word = case
    rs = None if word is None else RS
    check(dst, src, n, rs, word or 0, **LAUNCH)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_convert_inputs_cover_the_hard_cases():
    """The inputs hold what they claim: NaN, both infinities, -0, subnormal results, exact
    bfloat16 and float16 ties."""
    x = source(F32, 1000)
    assert np.isnan(x).sum() >= 6 and np.isposinf(x).any() and np.isneginf(x).any()
    assert (np.signbit(x) & (x == 0)).any()
    assert ((np.abs(x) < np.finfo(np.float32).tiny) & (x != 0)).any()
    bits = x.view(np.uint32)
    assert ((bits & 0xFFFF) == 0x8000).sum() >= 8 and ((bits & 0x1FFF) == 0x1000).sum() >= 5
    f64 = source(F64, 1000)
    assert np.isnan(f64).sum() == 3 and (f64.astype(np.float32) == 0).sum() > 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "launch",
    [dict(threads=1, blocks=1), dict(threads=8, blocks=3), dict(threads=32, blocks=None)],
    ids=["1x1", "3x8", "auto-blocks-x32"],
)
def test_sim_convert_any_launch_configuration(launch):
    """The bits depend on the element's index only, not on which thread converts it."""
    for dst, src, word in [(BF16, F32, 2), (F16, F32, 3), (F32, F64, None), (F32, BF16, None)]:
        check(dst, src, 1000, None if word is None else RS, word or 0, **launch)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_convert_other_pairs_match_cpu():
    """The other storage pairs the template takes: float64 to 16 bits (rounded to float32
    first), 16 bits to 16 bits, exact widening to float64, plain copies."""
    pairs = [(BF16, F64, 1), (F16, F64, None), (F16, BF16, None), (BF16, F16, 0)]
    pairs += [(F64, F32, None), (F64, BF16, None), (F32, F32, None), (BF16, BF16, 2)]
    for dst, src, word in pairs:
        check(dst, src, 300, None if word is None else RS, word or 0, **LAUNCH)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_stochastic_words_differ_and_rne_is_not_stochastic():
    """Each word gives its own bits; rs changes the rounding only of 16-bit destinations; a
    float32 destination ignores rs."""
    x = np.random.default_rng(1).standard_normal(200).astype(np.float32)
    words = [gpu_convert(BF16, x, RS, w, **LAUNCH) for w in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not _same_bits(words[a], words[b]), (a, b)
    rne = gpu_convert(BF16, x, None, 0, **LAUNCH)
    assert _same_bits(rne, x.astype(_dtype(BF16)))  # ml_dtypes rounds to nearest even
    f64 = x.astype(np.float64) * (1 + 2.0**-30)
    assert _same_bits(gpu_convert(F32, f64, RS, 3, **LAUNCH), f64.astype(np.float32))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_widening_is_exact_for_every_16bit_pattern():
    """bfloat16 and float16 -> float32 over all 65536 bit patterns (NaN payloads kept as the
    CPU keeps them), against the CPU kernels and ml_dtypes / NumPy."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for name in (BF16, F16):
        src = bits.view(_dtype(name))
        got = gpu_convert(F32, src, None, 0, threads=32, blocks=16)
        assert _same_bits(got, cpu_convert(F32, src, None, 0)), name
        finite = ~np.isnan(got)
        assert _same_bits(got[finite], src.astype(np.float32)[finite]), name


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sim_backend_convert_matches_numba_cpu():
    """``Backend.convert`` of numba-cuda (default launch configuration) and of numba-cpu."""
    gpu, cpu = dispatch.get_backend("numba-cuda"), dispatch.get_backend("numba-cpu")
    src = source(F32, 40, seed=3)
    for dst_name, rs, word in [(BF16, None, 0), (F16, RS, 1)]:
        d = cuda.to_device(np.zeros(40, np.uint16)).view(_dtype(dst_name))
        h = np.zeros(40, _dtype(dst_name))
        with np.errstate(all="ignore"):
            gpu.convert(d, cuda.to_device(src), rs, word)
            cpu.convert(h, src, rs, word)
        assert _same_bits(d.copy_to_host(), h), dst_name


def test_sim_convert_refuses_bad_arguments():
    x = cuda.to_device(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="elements"):
        cuda_storage.convert(cuda.to_device(np.zeros(5, np.float32)), x)
    with pytest.raises(ValueError, match="word"):
        cuda_storage.convert(cuda.to_device(np.zeros(4, np.uint16)).view(np.float16), x, RS, 4)
    with pytest.raises(ValueError, match="storage dtype"):
        cuda_storage.convert(cuda.to_device(np.zeros(4, np.int32)), x)
