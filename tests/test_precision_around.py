"""Everything around the step with bfloat16/float16 parameters (the precision issue, item 6):
clipping, non-finite skipping, ``grad_scale``, EMA, gradient accumulation, DataParallel and
ZeRO-1 over MPI; stochastic rounding's statistics and reproducibility; bad input.

The references are float32 runs over the same (16-bit representable) values: with master
weights the rule updates a float32 copy, so that copy must equal the float32 optimizer's
parameter bit for bit wherever both compute the same float32 operations.
"""

import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numba
import numpy as np
import pytest

import fastopt as fo
from fastopt import clipping

SCRIPTS = pathlib.Path(__file__).resolve().parent / "mpi_scripts"
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.float32
DTYPES = pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])


def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def snapshot(arrays, opt):
    """Bytes of ``arrays`` and of every state entry of ``opt``."""
    state = {i: {k: np.asarray(v).tobytes() for k, v in e.items()} for i, e in opt.state.items()}
    return [bits(a).tobytes() for a in arrays], state


# ---------------------------------------------------------------------------------------------
# clipping, grad_scale, non-finite skipping


@DTYPES
def test_clip_functions_on_16bit_gradients(dtype):
    """The norm in float64 of the widened values; the scaling multiplies by the coefficient
    rounded to the gradient's dtype, as ``a.mul_(coef)`` on a 16-bit tensor (one rounding: the
    product of two 16-bit values is exact in float32)."""
    rng = np.random.default_rng(0)
    g = (rng.standard_normal(5000) * 3).astype(dtype)
    g32 = g.astype(F32)
    norm = clipping.clip_grad_norm([g], 1.0)
    assert norm == pytest.approx(np.linalg.norm(g32.astype(np.float64)), rel=1e-12)
    coef = np.float32(clipping.clip_coefficient(norm, 1.0)).astype(dtype).astype(F32)
    assert np.array_equal(bits(g), bits((g32 * coef).astype(dtype)))
    h = (rng.standard_normal(5000) * 3).astype(dtype)
    want = np.clip(h.astype(F32), -0.5, 0.5).astype(dtype)
    clipping.clip_grad_value([h], 0.5)
    assert np.array_equal(bits(h), bits(want))


# One storage combination per dtype for the AdamW tests below (16-bit parameters and gradients,
# float32 master weights and state, stochastic rounding): each new combination is a kernel to
# compile. The master copy is stored exactly, so it must equal the float32 run bit for bit.
SR_MASTER = dict(master_weights=True, stochastic_rounding=True, seed=2)


def _near(w, master):
    """Every 16-bit value is within one of its dtype's ulps of its float32 master value (one
    of the two neighbours: stochastic rounding)."""
    m = master.astype(np.float64)
    return bool(np.all(np.abs(w.astype(np.float64) - m) < _ulp(m, w.dtype)))


@DTYPES
def test_grad_scale_and_value_clipping_with_master_weights_follow_float32(dtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(3000).astype(dtype)
    ref = w.astype(F32)
    opt = fo.AdamW([w], lr=1e-2, max_grad_value=0.5, **SR_MASTER)
    ropt = fo.AdamW([ref], lr=1e-2, max_grad_value=0.5)
    for _ in range(4):
        g = (rng.standard_normal(3000) * 2).astype(dtype)
        opt.step([g], grad_scale=0.25)
        ropt.step([g.astype(F32)], grad_scale=0.25)
    assert np.array_equal(opt.state[0]["master_param"], ref)
    assert _near(w, ref) and not np.array_equal(bits(w), bits(ref.astype(dtype)))


@DTYPES
def test_fused_norm_clipping_of_16bit_gradients(dtype):
    rng = np.random.default_rng(2)
    w = rng.standard_normal(3000).astype(dtype)
    ref = w.astype(F32)
    opt = fo.AdamW([w], lr=1e-2, max_grad_norm=1.0, **SR_MASTER)
    ropt = fo.AdamW([ref], lr=1e-2, max_grad_norm=1.0)
    for _ in range(4):
        g = (rng.standard_normal(3000) * 2).astype(dtype)
        opt.step([g])
        ropt.step([g.astype(F32)])
        # the same float64 sum over other SIMD lanes: equal to ~1e-15
        assert opt.last_grad_norm == pytest.approx(ropt.last_grad_norm, rel=1e-12)
    np.testing.assert_allclose(opt.state[0]["master_param"], ref, rtol=1e-6, atol=1e-7)
    assert opt.last_grad_norm > 1.0  # the clipping was active


@DTYPES
def test_nonfinite_skip_leaves_params_master_and_state_and_the_random_stream(dtype):
    """A skipped step changes no bit and does not advance the step counter, so stochastic
    rounding's random bits (from seed, step, index) continue as if it never happened."""
    rng = np.random.default_rng(3)
    start = rng.standard_normal(2000).astype(dtype)
    grads = [rng.standard_normal(2000).astype(dtype) for _ in range(3)]
    bad = grads[0].copy()
    bad[17] = np.inf
    kw = dict(lr=1e-2, skip_nonfinite=True, **SR_MASTER)
    w, clean = start.copy(), start.copy()
    opt, copt = fo.AdamW([w], **kw), fo.AdamW([clean], **kw)
    opt.step([grads[0]])
    copt.step([grads[0]])
    before = snapshot([w], opt)
    opt.step([bad])
    assert opt.skipped_steps == 1 and opt.last_step_taken is False
    assert snapshot([w], opt) == before
    for g in grads[1:]:
        opt.step([g])
        copt.step([g])
    assert np.array_equal(bits(w), bits(clean))
    assert np.array_equal(opt.state[0]["master_param"], copt.state[0]["master_param"])


# ---------------------------------------------------------------------------------------------
# EMA


@DTYPES
def test_ema_of_16bit_parameters_averages_in_float32(dtype):
    rng = np.random.default_rng(4)
    w = rng.standard_normal(700).astype(dtype)
    ref = w.astype(F32)
    ema, rema = fo.EMA([w], decay=0.99), fo.EMA([ref], decay=0.99)
    for _ in range(30):
        new = rng.standard_normal(700).astype(dtype)
        w[...] = new
        ref[...] = new.astype(F32)
        ema.update()
        rema.update()
    avg = ema.averages[0]
    assert avg.dtype == F32 and np.array_equal(avg, rema.averages[0])
    trained = w.copy()
    with ema.swapped():
        assert np.array_equal(bits(w), bits(avg.astype(dtype)))  # rounded to nearest even
    assert np.array_equal(bits(w), bits(trained)) and np.array_equal(ema.averages[0], avg)
    ema.copy_to_params()
    assert np.array_equal(bits(w), bits(avg.astype(dtype)))
    other = fo.EMA([w.copy()], decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert np.array_equal(other.averages[0], avg) and other.num_updates == 30


def test_a_16bit_average_would_stall_the_float32_one_moves():
    w = np.ones(8, BF16)
    ema = fo.EMA([w], decay=0.999)
    ema.update()
    w[...] = 2
    ema.update()
    # the step 0.001 is below half a bfloat16 ulp of 1 (2^-8): round to nearest keeps 1
    assert np.float32(1 + 0.001).astype(BF16) == 1
    assert np.all(ema.averages[0] == np.float32(1) + np.float32(0.001) * np.float32(1))


def test_ema_refuses_16bit_parameters_on_a_backend_without_16bit_kernels(monkeypatch):
    reference = fo.dispatch.get_backend("numpy")
    monkeypatch.setattr(fo.dispatch, "backend_for", lambda arrays, name=None: reference)
    with pytest.raises(TypeError, match=r"EMA params\[0\]: backend 'numpy' cannot store"):
        fo.EMA([np.ones(4, BF16)])


# ---------------------------------------------------------------------------------------------
# gradient accumulation


@pytest.mark.parametrize("layout", ["arrays", "paramset"])
def test_16bit_gradients_accumulate_in_float32(layout):
    """The sum of the micro-batch gradients (float32 ones here) is float32 (a bfloat16 running
    sum rounds at every addition), the step's mean the float32 optimizer's."""
    rng = np.random.default_rng(5)
    start = rng.standard_normal(300).astype(BF16)
    grads = [(1 + rng.random(300) * 2.0**-4).astype(F32) for _ in range(4)]
    if layout == "paramset":
        ps = fo.ParamSet({"w": start.astype(F32)}, dtype="bfloat16")
        opt, target = fo.SGD(ps, lr=0.5, master_weights=True), ps["w"]
    else:
        target = start.copy()
        opt = fo.SGD([target], lr=0.5, master_weights=True)
    acc = fo.GradientAccumulator(opt, 4)
    for g in grads:
        acc.add(g if layout == "paramset" else [g])
    total = np.zeros(300, F32)
    running16 = np.zeros(300, BF16)
    for g in grads:
        total += g
        running16 = (running16.astype(F32) + g).astype(BF16)
    assert not np.array_equal(running16.astype(F32), total)  # why the sum is float32
    ref = start.astype(F32)
    fo.SGD([ref], lr=0.5).step([total], grad_scale=0.25)
    assert np.array_equal(opt.state[0]["master_param"], ref)
    assert np.array_equal(bits(target), bits(ref.astype(BF16)))


def test_16bit_paramset_buffer_joins_the_float32_sum():
    """``add()`` without gradients counts what the caller put into the 16-bit ParamSet buffer."""
    ps = fo.ParamSet({"w": np.zeros(6, F32)}, dtype="bfloat16")
    opt = fo.SGD(ps, lr=1.0, master_weights=True)
    acc = fo.GradientAccumulator(opt, 3)
    acc.add(np.full(6, 0.25, BF16))
    ps.grads["w"][...] = 0.5
    acc.add()
    with pytest.raises(TypeError, match="dtype int32"):
        acc.add(np.ones(6, np.int32))  # refused before anything is added
    assert acc.add(np.full(6, 1.0, BF16))
    assert np.all(opt.state[0]["master_param"] == -(F32(1.75) * F32(1 / 3)))
    assert np.all(ps.grad_flat == 0)


# ---------------------------------------------------------------------------------------------
# stochastic rounding through a real step: SGD with exactly known float32 results


def _exact_sgd_case(n, dtype, seed=0):
    """Parameters in [1, 2) and updates lr * g with |g| in [0.5, 1), lr = 2^-10: the float32
    result p - lr * g is exact (at most 22 significant bits) and known in float64."""
    rng = np.random.default_rng(seed)
    p = (1 + rng.random(n)).astype(dtype)
    g = ((0.5 + 0.5 * rng.random(n)) * rng.choice([-1.0, 1.0], n)).astype(dtype)
    lr = 2.0**-10
    exact = p.astype(np.float64) - lr * g.astype(np.float64)
    assert np.array_equal(exact.astype(F32).astype(np.float64), exact)
    return p, g, lr, exact


def _ulp(x, dtype):
    """The spacing of ``dtype`` at |x| (normal numbers)."""
    mant = 7 if dtype == BF16 else 10
    return 2.0 ** (np.floor(np.log2(np.abs(x))) - mant)


def _rounding_errors(dtype, n, steps):
    """Rounding errors (in ulps of the exact value) of ``steps`` stochastically rounded SGD
    steps from the same ``n`` parameters (put back before each step; the step number changes
    the random bits)."""
    p0, g, lr, exact = _exact_sgd_case(n, dtype)
    p = p0.copy()
    opt = fo.SGD([p], lr=lr, stochastic_rounding=True, seed=11)
    errs = []
    for _ in range(steps):
        p[...] = p0
        opt.step([g])
        errs.append((p.astype(np.float64) - exact) / _ulp(exact, dtype))
    return np.concatenate(errs)


SERIAL = (1 << 15) - 1
"""Elements below the parallel threshold: the serial kernel (one variant less to compile)."""


@pytest.mark.parametrize(
    "dtype,n,steps", [(BF16, 1_000_000, 1), (F16, SERIAL, 31)], ids=["bf16", "fp16"]
)
def test_stochastic_rounding_is_unbiased(dtype, n, steps):
    """10^6 stochastically rounded results of SGD steps (bf16: one step over 10^6 elements, the
    parallel kernel of the thread test below; fp16: 31 steps over 32767): the mean rounding
    error in ulps within 3 standard errors of 0, each result one of the two neighbours of the
    exact value. Round to nearest on a constant fractional update is biased by the whole
    fraction."""
    err = _rounding_errors(dtype, n, steps)
    assert err.size >= 1_000_000
    assert np.abs(err).max() < 1
    assert abs(err.mean()) < 3 * err.std() / np.sqrt(err.size)
    assert err.std() > 0.2  # it does round both ways
    # a constant update of 0.3 of the spacing below 1: round to nearest never moves,
    # stochastic rounding moves 30% of the elements down one step
    q, r = np.ones(1000, dtype), np.ones(SERIAL, dtype)
    step = 0.3 * float(_ulp(np.float64(0.75), dtype))
    fo.SGD([q], lr=step).step([np.ones(1000, dtype)])
    fo.SGD([r], lr=step, stochastic_rounding=True, seed=12).step([np.ones(SERIAL, dtype)])
    assert np.all(q == 1)
    moved = np.mean(r != 1)
    assert abs(moved - 0.3) < 3 * np.sqrt(0.3 * 0.7 / SERIAL)


def _sr_run(seed, threads, n=1 << 17):
    """Three SGD steps with stochastic rounding (the parallel kernel of the unbiasedness test)."""
    p, g, lr, _ = _exact_sgd_case(n, BF16, seed=1)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        opt = fo.SGD([p], lr=lr, stochastic_rounding=True, seed=seed)
        for _ in range(3):
            opt.step([g])
    finally:
        numba.set_num_threads(previous)
    return bits(p).tobytes()


def test_stochastic_rounding_bits_depend_on_the_seed_not_on_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.fail("needs NUMBA_NUM_THREADS >= 2 to compare 1 and 2 threads")
    one = _sr_run(5, 1)
    assert _sr_run(5, 2) == one  # 1 and 2 threads, the parallel kernel (2^17 elements)
    assert _sr_run(5, 1) == one  # the same seed again
    assert _sr_run(6, 1) != one  # another seed


# ---------------------------------------------------------------------------------------------
# bad input: refused by name, nothing written


def _two_dtype_optimizer():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((20, 30)).astype(BF16)
    b = rng.standard_normal(30).astype(F16)
    opt = fo.AdamW([w, b], lr=1e-2, **SR_MASTER)
    for _ in range(2):
        opt.step([rng.standard_normal(w.shape).astype(BF16), rng.standard_normal(30).astype(F16)])
    return w, b, opt


BAD = {
    "int": (lambda w, b: [np.ones(w.shape, np.int32), np.ones_like(b)], TypeError, "int32"),
    "complex": (lambda w, b: [np.ones_like(w), np.ones(30, np.complex64)], TypeError, "complex"),
    "uint16 bits": (
        lambda w, b: [np.ones(w.shape, np.uint16), np.ones_like(b)],
        TypeError,
        "uint16",
    ),
    "second shape": (lambda w, b: [np.ones_like(w), np.ones(31, F16)], ValueError, "shape"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_gradients_leave_16bit_params_master_and_state_bit_identical(name):
    make, exc, match = BAD[name]
    w, b, opt = _two_dtype_optimizer()
    before = snapshot([w, b], opt)
    with pytest.raises(exc, match=match):
        opt.step(make(w, b))
    assert snapshot([w, b], opt) == before


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint16, np.complex64, np.complex128])
def test_integer_and_complex_parameters_are_refused_by_name(dtype):
    with pytest.raises(TypeError, match=rf"param \[1\] has dtype {np.dtype(dtype).name}"):
        fo.Adam([np.ones(3, BF16), np.ones(3, dtype)], master_weights=True)
    with pytest.raises(TypeError, match="parameter 'x' has dtype"):
        fo.ParamSet({"w": np.ones(3), "x": np.ones(3, dtype)}, dtype="bfloat16")


def test_float16_on_a_backend_without_16bit_kernels_is_refused_before_writing():
    with pytest.raises(TypeError, match=r"param \[0\] has dtype float16; backend 'numpy'"):
        fo.SGD([np.ones(3, F16)], lr=0.1, backend="numpy")
    w = np.ones(3, F32)
    opt = fo.Adam([w], backend="numpy", state_dtype="float16")
    with pytest.raises(TypeError, match=r"param \[0\]: backend 'numpy' cannot store float16"):
        opt.step([np.ones(3, F32)])
    assert np.all(w == 1) and not opt.state


# ---------------------------------------------------------------------------------------------
# DataParallel and ZeRO-1 over MPI (2 ranks)


def _mpirun(n, script, *args):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import launch
    finally:
        sys.path.remove(str(SCRIPTS))
    launcher, reason = launch.launcher()
    if launcher is None:
        if os.environ.get("FASTOPT_REQUIRE_MPI") == "1":
            pytest.fail(f"FASTOPT_REQUIRE_MPI=1 but: {reason}")
        pytest.skip(reason)
    argv = launch.argv(n, SCRIPTS / script, *args)
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=launch.TIMEOUT, env=launch.env()
    )
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def precision16():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import precision16 as script
    finally:
        sys.path.remove(str(SCRIPTS))
    return script


def test_data_parallel_and_zero_on_bfloat16_equal_one_process(tmp_path, precision16):
    """2 ranks: DataParallel (master weights, clipping) and ZeRO-1 (master weights, bf16 state,
    stochastic rounding) end on the bits of one process stepping on the float32 sum of the
    ranks' gradients; the ZeRO checkpoint holds the float32 master and the bf16 state and
    resumes to the same bits; integer gradients and state are refused on every rank; the
    Trainer with bf16 parameters trains alike on 2 ranks (both strategies) and in one."""
    _mpirun(2, "precision16.py", tmp_path)
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    for k in ("dp", "zero", "resumed"):
        assert np.array_equal(ranks[0][k], ranks[1][k]), k
    for kind in ("dp", "zero"):
        ref, _ = precision16.reference(kind)
        assert np.array_equal(ranks[0][kind], ref), kind
    assert np.array_equal(ranks[0]["resumed"], ranks[0]["zero"])
    # allreduce_grads of bf16 gradients: the float32 mean, rounded once into the buffer
    X, Y = precision16.P.data()
    start = precision16.params()
    g = [precision16.rank_grad(start, X, Y, 0, r, 2, BF16).astype(F32) for r in range(2)]
    for r in ranks:
        assert np.array_equal(r["allreduced"], bits(((g[0] + g[1]) * F32(0.5)).astype(BF16)))
    _, opt = precision16.reference("zero", precision16.SAVE_AT)
    state = opt.state[0]
    assert ranks[0]["state_master_param"].dtype == np.float32
    assert np.array_equal(ranks[0]["state_master_param"], state["master_param"])
    for k in ("exp_avg", "exp_avg_sq"):
        assert state[k].dtype == BF16
        assert np.array_equal(ranks[0][f"state_{k}"], bits(state[k])), k
    ckpt = fo.load(tmp_path / "ckpt.fo")
    assert ckpt.params["W"].dtype == BF16
    assert ckpt.optimizer_state["state"][0]["master_param"].dtype == np.float32
    for r in ranks:
        assert "dtype int32" in str(r["int_grad"]) and "int32" in str(r["int_state"])
        assert bool(r["unchanged"])
    # the Trainer with precision="bf16": data parallel and ZeRO-1 end on the same bits as one
    # process (two ranks: the float32 gradient sums are exact in any order)
    one = precision16.train_bf16().model.params.flat
    for r in ranks:
        assert np.array_equal(r["trainer_dp"], one)
        assert np.array_equal(r["trainer_zero"], one)
