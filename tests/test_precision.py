"""Storage precision: bfloat16/float16 parameters and gradients, mixed gradient dtypes, bfloat16
state, float32 master weights (the precision issue), on the Numba CPU backend.

Against torch's fused CPU optimizers (``fused=True``), which load 16-bit values into float32
(opmath), compute and round once per store, as fastopt's storage loops do. Where the two cannot
agree bit for bit, the reason is the operation order inside float32, which torch's fused kernels
choose differently from its single-tensor path (the one the rules follow):

- Adagrad: torch's fused kernel computes ``p - (clr * g) / std`` with ``clr`` and ``eps``
  rounded to the parameter dtype (vectorised body); the rule ``p - clr * (g / std)`` (torch's single-tensor ``addcdiv_``). A
  one-ulp float32 difference changes the 16-bit rounding now and then; with the tiny steps of
  Adagrad a 16-bit parameter then moves one step earlier or later, so the comparison is one step
  from a common state: the state bit for bit, few parameters differ, by the rounded clr at most.
- SGD with momentum: torch 2.13's fused CPU kernel leaves 16-bit parameters unchanged at the
  first momentum step in its vectorised body (it does update the tail elements); the comparison
  starts both from a momentum buffer, after which they agree bit for bit.
"""

import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

import fastopt as fo
from fastopt.checkpoint import load, save
from fastopt.kernels import access, cpu, cpu_storage

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)


def torch_or_skip():
    from oracle import torch_or_skip as get

    return get()


def bits(a):
    return np.asarray(a).view(np.uint16 if np.asarray(a).dtype.itemsize == 2 else np.uint32)


def ulps(a, b):
    """Largest distance in 16-bit ulps (same-sign values: the bit patterns are ordered)."""
    return int(np.abs(bits(a).astype(np.int64) - bits(b).astype(np.int64)).max())


# ---------------------------------------------------------------------------------------------
# torch fused=True on bf16 / fp16 CPU tensors


def _torch_dtype(torch, dtype):
    return torch.bfloat16 if dtype == BF16 else torch.float16


def _lockstep(torch, name, kwargs, dtype, n, steps, start_state=None):
    tdt = _torch_dtype(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=gen).to(tdt)
    q = p.clone()
    topt = getattr(torch.optim, name)([p], fused=True, **kwargs)
    fopt = getattr(fo, name)([q], **kwargs)
    if start_state is not None:
        start_state(torch, topt, fopt, p, gen)
    for _ in range(steps):
        g = torch.randn(n, generator=gen).to(tdt)
        p.grad = g.clone()
        topt.step()
        fopt.step([g])
    return p, q, topt, fopt


SIZES_AND_DTYPES = [
    pytest.param(4099, BF16, id="serial-bf16"),
    pytest.param((1 << 15) + 1, BF16, id="parallel-bf16"),
    pytest.param(4099, F16, id="serial-fp16"),
]
"""The serial loop (below the parallel threshold) and the parallel one for bfloat16; float16 in
the serial loop only: the loop templates load and store every 16-bit dtype the same way
(test_parallel_and_serial_loops_agree_bit_for_bit), and each float16 kernel takes several times
bfloat16's compile time, so a parallel float16 variant per rule cost over a minute of CI."""


@pytest.mark.oracle
@pytest.mark.parametrize("n,dtype", SIZES_AND_DTYPES)
@pytest.mark.parametrize(
    "name,kwargs",
    [("Adam", dict(lr=1e-2)), ("AdamW", dict(lr=1e-2, weight_decay=0.1))],
    ids=["Adam", "AdamW"],
)
def test_adam_matches_torch_fused(name, kwargs, dtype, n):
    """100 steps: all but a handful of elements bit-identical (measured: at most 4 of 32769
    parameters, 4 first moments, 1 second moment), the others a few 16-bit ulps apart (measured:
    at most 4, fp16 AdamW over 32769 elements; a first moment one ulp off at some step keeps
    moving its parameter slightly differently for the remaining steps). Why not all: torch's vectorised kernel computes ``exp_avg.lerp_(g, 1 - beta1)`` as
    one fused multiply-add ``fmadd(w, g - m, m)``, the rule as ``m + w * (g - m)`` (two roundings,
    torch's single-tensor lerp); near a 16-bit rounding boundary, or where m + w (g - m) nearly
    cancels, the float32 difference shows in the stored value."""
    torch = torch_or_skip()
    p, q, topt, fopt = _lockstep(torch, name, kwargs, dtype, n, 100)
    tp, fp = p.view(torch.int16).numpy(), q.view(torch.int16).numpy()
    assert (tp != fp).sum() <= max(2, n // 5000)
    assert ulps(tp, fp) <= 4
    st = topt.state[p]
    for k in ("exp_avg", "exp_avg_sq"):
        assert fopt.state[0][k].dtype == dtype  # state in the parameter's dtype, as torch
        assert (st[k].view(torch.int16).numpy() != fopt.state[0][k].view(np.int16)).sum() <= max(
            2, n // 5000
        )


def arr(torch, t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(BF16).copy()
    return t.numpy().copy()


@pytest.mark.oracle
@pytest.mark.parametrize("n,dtype", SIZES_AND_DTYPES)
def test_sgd_momentum_matches_torch_fused_float32_rounded_per_store(dtype, n):
    """torch 2.13's fused CPU SGD with momentum is no oracle on 16-bit tensors: its vectorised
    body leaves the parameter unchanged and its tail restarts the momentum buffer (seen with
    p = 0, buf = 1, g = 2, lr = momentum = 0.5: the bf16 result is p = 0, buf = 2.5 for the
    first 16 elements and buf = 2 for the rest; float32 gives p = -1.25, buf = 2.5). So the
    oracle is what it means to do: torch's fused float32 step on the widened values, rounded to
    the 16-bit dtype once per store, every step. bfloat16: bit for bit; float16: measured 2 of
    4099 elements apart (torch's vectorised float32 kernel rounds ``buf * momentum + g`` in
    another order)."""
    torch = torch_or_skip()
    tdt = _torch_dtype(torch, dtype)
    kwargs = dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=gen).to(tdt)
    q, buf = p.clone(), None
    fopt = fo.SGD([q], **kwargs)
    for _ in range(100):
        g = torch.randn(n, generator=gen).to(tdt)
        w = p.float()
        topt = torch.optim.SGD([w], fused=True, **kwargs)
        if buf is not None:
            topt.state[w]["momentum_buffer"] = buf.float()
        w.grad = g.float()
        topt.step()
        p, buf = w.to(tdt), topt.state[w]["momentum_buffer"].to(tdt)
        fopt.step([g])
    tp, fp = p.view(torch.int16).numpy(), q.view(torch.int16).numpy()
    tb, fb = buf.view(torch.int16).numpy(), fopt.state[0]["momentum_buffer"].view(np.int16)
    if dtype == BF16:
        assert np.array_equal(tp, fp) and np.array_equal(tb, fb)
    else:
        assert (tp != fp).sum() <= n // 1000 and (tb != fb).sum() <= n // 1000


@pytest.mark.oracle
@pytest.mark.parametrize("n,dtype", [SIZES_AND_DTYPES[1], SIZES_AND_DTYPES[2]])
def test_adagrad_one_step_matches_torch_fused_within_one_ulp(n, dtype):
    torch = torch_or_skip()
    tdt = _torch_dtype(torch, dtype)
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(n, generator=gen).to(tdt)
    acc = (torch.rand(n, generator=gen) * 5).to(tdt)
    q, p0 = p.clone(), p.clone()
    topt = torch.optim.Adagrad([p], lr=0.05, fused=True)
    topt.state[p]["sum"] = acc.clone()
    topt.state[p]["step"] = torch.tensor(4.0)
    fopt = fo.Adagrad([q], lr=0.05)
    sd = fopt.state_dict()
    sd["state"] = {0: {"step": 4, "sum": arr(torch, acc)}}
    fopt.load_state_dict(sd)
    g = torch.randn(n, generator=gen).to(tdt)
    p.grad = g.clone()
    topt.step()
    fopt.step([g])
    tb, fb = p.view(torch.int16).numpy(), q.view(torch.int16).numpy()
    assert np.array_equal(
        topt.state[p]["sum"].view(torch.int16).numpy(), bits(fopt.state[0]["sum"])
    )
    assert (tb != fb).mean() < 0.05  # measured: 2.0% (bf16, 32769), 3.9% (fp16, 4099)
    # torch's vectorised body also rounds clr and eps to the 16-bit dtype (fVec(scalar_t(clr))):
    # a relative 2^-9 change of the step, which moves large steps by more than one ulp.
    t, f, step = p.float().numpy(), q.float().numpy(), (p.float() - p0.float()).numpy()
    assert (np.abs(f - t) <= 2**-7 * (np.abs(step) + np.abs(t))).all()


# ---------------------------------------------------------------------------------------------
# The storage loops themselves


def _adam_h(dtype=np.float32):
    f = np.dtype(dtype).type
    vals = (1.0, 0.0, 1.0, 0.9, 0.1, 0.999, 0.001, 0.01 / 0.1, np.sqrt(0.001), 1e-8)
    return tuple(f(v) for v in vals)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_storage_loop_is_the_float32_rule_rounded_once(dtype):
    """Load, the unchanged float32 rule, round to nearest even on store: the float32 kernel on
    the widened arrays, then cast, gives the same bits."""
    rng = np.random.default_rng(1)
    n = 3000
    p, g = (rng.standard_normal(n).astype(dtype) for _ in range(2))
    m = (rng.standard_normal(n) * 0.1).astype(dtype)
    v = rng.random(n).astype(dtype)
    wide = [a.astype(np.float32) for a in (p, g, m, v)]
    h, gs = _adam_h(), (np.float32(1), np.float32(0))
    cpu.apply("adam", wide[0], wide[1], wide[2:], h, gs)
    s = access.Storage(dtype.name, dtype.name, dtype.name, False, False)
    cpu_storage.apply("adam", s, p, g, [m, v], None, h, gs, (0, 1, 0))
    for got, want in zip((p, m, v), (wide[0], wide[2], wide[3])):
        assert np.array_equal(bits(got), bits(want.astype(dtype)))


def _stepped(n, parallel_threshold=None):
    rng = np.random.default_rng(2)
    w = rng.standard_normal(n).astype(BF16)
    opt = fo.AdamW([w], lr=1e-2, master_weights=True)
    for _ in range(5):
        opt.step([rng.standard_normal(n).astype(np.float32)])
    return w, opt


def test_parallel_and_serial_loops_agree_bit_for_bit():
    n = (1 << 15) + 7
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(n).astype(BF16) for _ in range(4)]
    master = arrays[0].astype(np.float32)
    s = access.Storage("bfloat16", "bfloat16", "bfloat16", True, True)
    out = []
    for parallel in (True, False):
        p, g, m, v = (a.copy() for a in arrays)
        w = master.copy()
        k = cpu_storage.kernel("adam", s, parallel)
        b = cpu_storage.bits
        k(b(p), w, b(g), b(m), b(v), (*_adam_h(), np.float32(1), np.float32(0)), (9, 3, 11))
        out.append([p, m, v, w])
    for a, b_ in zip(*out):
        assert np.array_equal(bits(a), bits(b_))


# ---------------------------------------------------------------------------------------------
# Options: mixed gradients, master weights, state dtype


def test_float32_gradients_for_bfloat16_parameters():
    rng = np.random.default_rng(5)
    w = rng.standard_normal(100).astype(BF16)
    g = rng.standard_normal(100).astype(np.float32)
    ref = w.astype(np.float32)
    fo.SGD([ref], lr=0.1).step([g])
    fo.SGD([w], lr=0.1).step([g])
    assert np.array_equal(bits(w), bits(ref.astype(BF16)))


def test_gradient_dtype_may_change_between_steps():
    """The step keeps each unit's storage combination from the last step while the gradient's
    dtype and the precision options stay the same: float32, bfloat16, then float32 gradients
    for one bfloat16 parameter step as a new optimizer would each time, and a gradient dtype
    that cannot be stored is still refused by name, with nothing written, after steps that
    could."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal(300).astype(BF16)
    ref = w.copy()
    opt = fo.SGD([w], lr=0.1)
    for dtype in (np.float32, BF16, np.float32, BF16):
        g = rng.standard_normal(300).astype(dtype)
        opt.step([g])
        fo.SGD([ref], lr=0.1).step([g])
        assert np.array_equal(bits(w), bits(ref)), dtype
    with pytest.raises(TypeError, match="dtype complex64"):
        opt.step([np.ones(300, np.complex64)])
    assert np.array_equal(bits(w), bits(ref))


def test_master_weights_follow_the_float32_trajectory():
    """With master weights the rule updates a float32 copy: the float32 optimizer over the same
    (bf16-representable) start and gradients, and the bf16 parameter is that copy rounded."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal(500).astype(BF16)
    ref = w.astype(np.float32)
    opt = fo.AdamW([w], lr=1e-3, master_weights=True)
    ropt = fo.AdamW([ref], lr=1e-3)
    for _ in range(20):
        g = rng.standard_normal(500).astype(np.float32)
        opt.step([g])
        ropt.step([g])
    master = opt.state[0]["master_param"]
    assert master.dtype == np.float32 and opt.state[0]["exp_avg"].dtype == np.float32
    assert np.array_equal(master, ref)
    assert np.array_equal(bits(w), bits(ref.astype(BF16)))


def test_master_weights_do_nothing_for_float32_parameters():
    w = np.ones(10, np.float32)
    opt = fo.Adam([w], master_weights=True)
    opt.step([np.ones(10, np.float32)])
    assert "master_param" not in opt.state[0]


@pytest.mark.parametrize("state_dtype", ["bfloat16", ml_dtypes.bfloat16, "float32", np.float16])
def test_state_dtype_option(state_dtype):
    w = np.ones(10, np.float32)
    opt = fo.Adam([w], state_dtype=state_dtype)
    opt.step([np.full(10, 0.5, np.float32)])
    want = np.dtype(ml_dtypes.bfloat16 if state_dtype == "bfloat16" else state_dtype)
    assert opt.state[0]["exp_avg"].dtype == want
    ref = np.ones(10, np.float32)
    fo.Adam([ref]).step([np.full(10, 0.5, np.float32)])
    assert np.array_equal(w, ref)  # the first step does not depend on the stored moments


def test_torch_bfloat16_tensor_is_updated_in_place():
    torch = torch_or_skip()
    t = torch.randn(64).to(torch.bfloat16)
    ref = t.view(torch.uint16).numpy().view(BF16).copy()
    g = torch.randn(64).to(torch.bfloat16)
    fo.SGD([t], lr=0.1).step([g])
    fo.SGD([ref], lr=0.1).step([g.view(torch.uint16).numpy().view(BF16)])
    assert np.array_equal(t.view(torch.uint16).numpy(), bits(ref))


def test_paramset_of_bfloat16():
    ps = fo.ParamSet({"w": np.ones((3, 4), np.float32), "b": np.zeros(2)}, dtype="bfloat16")
    assert ps.dtype == BF16 and ps["w"].dtype == BF16 and ps.grad_flat.dtype == BF16
    ps.grads["w"][...] = 1.0
    opt = fo.SGD(ps, lr=0.5, max_grad_norm=1.0)
    opt.step()
    assert opt.last_grad_norm == pytest.approx(np.sqrt(12))
    assert float(ps["w"][0, 0]) == float(np.float32(1 - 0.5 / (np.sqrt(12) + 1e-6)).astype(BF16))
    assert fo.ParamSet({"h": np.ones(3, np.float16)}).dtype == F16


def test_global_norm_reads_16bit_gradients():
    rng = np.random.default_rng(7)
    for dtype in (BF16, F16):
        g = rng.standard_normal(100_003).astype(dtype)
        g[5] = 1e4 if dtype == BF16 else 60000
        # the same chunks; within a chunk LLVM may split the sum over other lanes than for float32
        want = fo.clipping.global_norm([g.astype(np.float32)])
        assert fo.clipping.global_norm([g]) == pytest.approx(want, rel=1e-13)
        g[7] = np.inf
        assert not fo.clipping.all_finite([g])


def test_nonfinite_skip_with_bfloat16_gradients():
    w = np.ones(10, BF16)
    g = np.ones(10, BF16)
    g[3] = np.nan
    opt = fo.Adam([w], skip_nonfinite=True)
    opt.step([g])
    assert opt.skipped_steps == 1 and np.array_equal(bits(w), bits(np.ones(10, BF16)))


# ---------------------------------------------------------------------------------------------
# state_dict and checkpoints


def test_state_dict_round_trip_with_master_weights(tmp_path):
    w, opt = _stepped(300)
    sd = opt.state_dict()
    assert sd["state"][0]["master_param"].dtype == np.float32
    w2 = w.copy()
    opt2 = fo.AdamW([w2], lr=1e-2, master_weights=True)
    opt2.load_state_dict(sd)
    g = np.random.default_rng(8).standard_normal(300).astype(np.float32)
    opt.step([g])
    opt2.step([g])
    assert np.array_equal(bits(w), bits(w2))
    path = tmp_path / "ck.safetensors"
    save(path, params={"w": w}, optimizer=opt)
    ck = load(path)
    assert ck.params["w"].dtype == BF16 and np.array_equal(bits(ck.params["w"]), bits(w))
    opt3 = fo.AdamW([ck.params["w"]], lr=1e-2, master_weights=True)
    ck.restore(optimizer=opt3)
    opt.step([g])
    opt3.step([g])
    assert np.array_equal(bits(w), bits(ck.params["w"]))


def test_bfloat16_state_round_trips_through_state_dict():
    w = np.ones(50, BF16)
    opt = fo.Adam([w], lr=0.1)
    opt.step([np.full(50, 0.25, BF16)])
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == BF16
    opt2 = fo.Adam([np.ones(50, BF16)], lr=0.1)
    opt2.load_state_dict(sd)
    assert np.array_equal(bits(opt2.state[0]["exp_avg_sq"]), bits(opt.state[0]["exp_avg_sq"]))


# ---------------------------------------------------------------------------------------------
# Bad input: refused by name, nothing written


@pytest.mark.parametrize(
    "grad,exc,match",
    [
        (np.ones(10, np.int32), TypeError, "dtype int32"),
        (np.ones(10, np.complex64), TypeError, "dtype complex64"),
        (np.ones(10, np.float64).view(np.uint16)[:10], TypeError, "dtype uint16"),
    ],
    ids=["int", "complex", "uint16"],
)
def test_bad_gradient_dtypes_are_refused_before_any_write(grad, exc, match):
    w = np.ones(10, BF16)
    opt = fo.Adam([w])
    with pytest.raises(exc, match=match):
        opt.step([grad])
    assert np.array_equal(bits(w), bits(np.ones(10, BF16))) and not opt.state


def test_reference_backend_refuses_16bit_parameters_by_name():
    with pytest.raises(TypeError, match=r"param \[0\] has dtype bfloat16; backend 'numpy'"):
        fo.Adam([np.ones(3, BF16)], backend="numpy")
    w = np.ones(3, np.float32)
    opt = fo.Adam([w], backend="numpy")
    with pytest.raises(TypeError, match="backend 'numpy' needs gradients of the parameter"):
        opt.step([np.ones(3, BF16)])
    opt = fo.Adam([w], backend="numpy", state_dtype="bfloat16")
    with pytest.raises(TypeError, match="backend 'numpy' cannot store bfloat16"):
        opt.step([np.ones(3, np.float32)])
    assert np.array_equal(w, np.ones(3, np.float32)) and not opt.state


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(state_dtype="int4"), ValueError, "state_dtype must be one of"),
        (dict(state_dtype=np.int8), ValueError, "state_dtype must be one of"),
        (dict(master_weights=1), TypeError, "master_weights"),
        (dict(stochastic_rounding="yes"), TypeError, "stochastic_rounding"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
    ],
)
def test_bad_precision_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fo.Adam([np.ones(3, BF16)], **kwargs)


def test_bad_parameters_and_paramset_dtypes():
    with pytest.raises(TypeError, match="dtype int16"):
        fo.SGD([np.ones(3, np.int16)], lr=0.1)
    with pytest.raises(TypeError, match="ParamSet dtype must be one of"):
        fo.ParamSet({"a": np.ones(3)}, dtype=np.int8)


def test_threads_do_not_change_the_bits():
    """A bf16 AdamW with master weights over 2^16 elements, 1 and 2 Numba threads."""
    code = textwrap.dedent(
        """
        import sys, numpy as np, ml_dtypes, fastopt as fo
        rng = np.random.default_rng(0)
        w = rng.standard_normal(1 << 16).astype(ml_dtypes.bfloat16)
        opt = fo.AdamW([w], lr=1e-2, master_weights=True, stochastic_rounding=True, seed=5)
        for _ in range(3):
            opt.step([rng.standard_normal(1 << 16).astype(ml_dtypes.bfloat16)])
        sys.stdout.write(w.view(np.uint16).tobytes().hex()[:20000])
        """
    )
    outs = []
    for threads in ("1", "2"):
        env = dict(__import__("os").environ, NUMBA_NUM_THREADS=threads)
        r = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1] and len(outs[0]) == 20000
