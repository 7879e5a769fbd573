"""Global-norm / value clipping: functions, the fused optimizer option, torch and thread count."""

import numpy as np
import pytest
from optimizer_cases import CASES, grad_of

import fastopt as fo


def _grads(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) * 3 for s in [(50, 7), (33,), (100_003,)]]


def test_global_norm_matches_float64_reference():
    for dtype in (np.float32, np.float64):
        g = _grads(dtype=dtype)
        want = np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in g))
        assert fo.global_norm(g) == pytest.approx(want, rel=1e-12)
        assert fo.global_norm({"a": g[0], "b": g[1]}) == pytest.approx(
            np.sqrt(np.sum(g[0].astype(np.float64) ** 2) + np.sum(g[1].astype(np.float64) ** 2)),
            rel=1e-12,
        )


def test_global_norm_is_independent_of_thread_count():
    import numba

    g = _grads(dtype=np.float32)
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            results.append(fo.global_norm(g))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert results[0] == results[1]


def test_all_finite():
    g = _grads()
    assert fo.all_finite(g)
    for bad in (np.nan, np.inf, -np.inf):
        g[2][12345] = bad
        assert not fo.all_finite(g)
    huge = [np.full(4, 1e200)]  # finite values whose squares overflow are still finite
    assert fo.all_finite(huge) and fo.global_norm(huge) == np.inf


def test_clip_grad_norm_function_matches_torch():
    from oracle import torch_or_skip

    torch = torch_or_skip()
    g = _grads()
    tg = [torch.tensor(a) for a in g]
    params = [torch.zeros_like(t, requires_grad=True) for t in tg]
    for p, t in zip(params, tg):
        p.grad = t.clone()
    want = torch.nn.utils.clip_grad_norm_(params, max_norm=1.5, foreach=False)
    got = fo.clip_grad_norm(g, 1.5)
    assert got == pytest.approx(float(want), rel=1e-12)
    for a, p in zip(g, params):
        np.testing.assert_allclose(a, p.grad.numpy(), rtol=1e-12, atol=1e-15)
    assert fo.global_norm(g) == pytest.approx(1.5, rel=1e-6)


def test_clip_grad_value_and_bad_arguments():
    g = [np.array([-3.0, 0.5, 2.0])]
    fo.clip_grad_value(g, 1.0)
    assert np.array_equal(g[0], [-1.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="max_norm"):
        fo.clip_grad_norm(g, 0.0)
    with pytest.raises(ValueError, match="clip_value"):
        fo.clip_grad_value(g, -1.0)
    with pytest.raises(TypeError, match="grads"):
        fo.global_norm(3.0)
    with pytest.raises(FloatingPointError):
        fo.clip_grad_norm([np.array([np.nan])], 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_clip_equals_clip_then_step(case):
    """max_grad_norm / max_grad_value inside the kernel == clipping the arrays, then stepping."""
    _, cls, kwargs = case
    rng = np.random.default_rng(1)
    init = [rng.standard_normal((6, 5)), rng.standard_normal(9)]
    fused = [a.copy() for a in init]
    manual = [a.copy() for a in init]
    opt_f = cls(fused, max_grad_norm=0.5, max_grad_value=0.08, **kwargs)
    opt_m = cls(manual, **kwargs)
    for t in range(30):
        g = [x * 4 for x in grad_of(manual, t)]
        norm = fo.clip_grad_norm(g, 0.5)
        fo.clip_grad_value(g, 0.08)
        opt_m.step(g)
        opt_f.step([x * 4 for x in grad_of(fused, t)])
        assert opt_f.last_grad_norm == pytest.approx(norm, rel=1e-12)
    for a, b in zip(fused, manual):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_fused_clip_adam_matches_torch_clip_grad_norm_then_adam():
    from oracle import torch_or_skip

    torch = torch_or_skip()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        rng = np.random.default_rng(2)
        init = [rng.standard_normal((8, 3)), rng.standard_normal(5)]
        ours = [a.copy() for a in init]
        theirs = [torch.tensor(a, requires_grad=True) for a in init]
        opt = fo.Adam(ours, lr=0.01, weight_decay=0.1, max_grad_norm=1.0)
        topt = torch.optim.Adam(theirs, lr=0.01, weight_decay=0.1, foreach=False)
        for t in range(100):
            g = [x * 5 for x in grad_of(ours, t)]
            for p, a in zip(theirs, g):
                p.grad = torch.tensor(a)
            torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=False)
            topt.step()
            opt.step(g)
        for a, p in zip(ours, theirs):
            np.testing.assert_allclose(a, p.detach().numpy(), rtol=1e-10, atol=1e-13)
    finally:
        torch.set_default_dtype(old)


def test_grad_scale_divides_gradients_inside_the_kernel():
    a, b = np.ones(4), np.ones(4)
    fo.SGD([a], lr=0.1).step([np.full(4, 8.0)], grad_scale=0.25)
    fo.SGD([b], lr=0.1).step([np.full(4, 2.0)])
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="grad_scale"):
        fo.SGD([a], lr=0.1).step([np.ones(4)], grad_scale=0.0)


def test_bad_clip_options():
    with pytest.raises(ValueError, match="max_grad_norm"):
        fo.Adam([np.zeros(2)], max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="max_grad_value"):
        fo.Adam([np.zeros(2)], max_grad_value=0.0)
    with pytest.raises(TypeError, match="skip_nonfinite"):
        fo.Adam([np.zeros(2)], skip_nonfinite=1)


def test_clip_coefficient_is_torchs():
    assert fo.clipping.clip_coefficient(0.5, 1.0) == 1.0
    assert fo.clipping.clip_coefficient(4.0, 1.0) == 1.0 / (4.0 + 1e-6)
    assert fo.clipping.clip_coefficient(float("inf"), 1.0) == 0.0
    assert np.isnan(fo.clipping.clip_coefficient(float("nan"), 1.0))


@pytest.mark.parametrize(
    "dtype, limit", [(np.float32, 1e-46), (np.float16, 1e-9), ("bfloat16", 1e-41)]
)
def test_a_clip_below_the_dtypes_smallest_value_is_refused_before_any_write(dtype, limit):
    """A clip that rounds to 0 in the dtype the update computes in (float32 for 16-bit
    parameters) would read as "no clipping" to the kernels: refused by name, nothing written;
    the same for the clip_grad_value utility in the gradient's own dtype."""
    import ml_dtypes

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    w = np.array([1.0, 2.0], np.float32).astype(dt)
    g = np.array([3.0, -3.0], np.float32).astype(dt)
    before = w.copy()
    compute_underflows = np.float32(limit) == 0 or dt == np.float32
    if compute_underflows:
        opt = fo.SGD([w], lr=1.0, max_grad_value=limit)
        with pytest.raises(ValueError, match="max_grad_value=.* rounds to 0 in float32"):
            opt.step([g])
        assert w.tobytes() == before.tobytes() and opt.state_dict()["state"] == {}
    g0 = g.copy()
    with pytest.raises(ValueError, match=f"clip_value=.* rounds to 0 in {dt.name}"):
        fo.clipping.clip_grad_value([np.array([1.0], np.float32), g], limit)
    assert g.tobytes() == g0.tobytes()
