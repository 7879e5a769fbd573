"""Numba CPU kernels against the NumPy reference: every algorithm and flag, >= 100 steps."""

import numpy as np
import pytest
from optimizer_cases import CASES, grad_of

import fastopt as fo

STEPS = 120
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _params(dtype, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(7, 5), (13,), (2, 3, 4)]]


def _run(cls, kwargs, dtype, backend, steps=STEPS):
    params = _params(dtype)
    opt = cls(params, backend=backend, **kwargs)
    for t in range(steps):
        opt.step(grad_of(params, t))
    return params, opt


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(case, dtype):
    _, cls, kwargs = case
    got, opt_k = _run(cls, kwargs, dtype, None)
    want, opt_r = _run(cls, kwargs, dtype, "numpy")
    for g, w in zip(got, want):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, **TOL[dtype])
    sk, sr = opt_k.state_dict()["state"], opt_r.state_dict()["state"]
    assert sk.keys() == sr.keys()
    for i in sk:
        assert sk[i].keys() == sr[i].keys()
        for name in sk[i]:
            np.testing.assert_allclose(sk[i][name], sr[i][name], **TOL[dtype], err_msg=name)
    assert all(not np.array_equal(g, w0) for g, w0 in zip(got, _params(dtype)))  # it moved


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_paramset_bit_identical_to_plain_arrays(case):
    _, cls, kwargs = case
    plain = _params(np.float32)
    ps = fo.ParamSet({f"p{i}": a for i, a in enumerate(plain)})
    opt_plain, opt_ps = cls(plain, **kwargs), cls(ps, **kwargs)
    for t in range(40):
        grads = grad_of(plain, t)
        opt_plain.step(grads)
        for name, g in zip(ps, grad_of([ps[n] for n in ps], t)):
            ps.grads[name][...] = g
        opt_ps.step()
    for i, a in enumerate(plain):
        assert np.array_equal(ps[f"p{i}"], a)


def test_results_independent_of_thread_count():
    import numba

    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(100_003).astype(np.float32)
    g = rng.standard_normal(p0.size).astype(np.float32)
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            p = p0.copy()
            opt = fo.Adam([p], lr=1e-2, amsgrad=True, weight_decay=0.1)
            for _ in range(5):
                opt.step([g])
            results.append(p)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert np.array_equal(results[0], results[1])


def test_step_from_two_threads_concurrently():
    """Two optimizers stepped from two Python threads at once (the threading layer must be safe)."""
    import threading

    rng = np.random.default_rng(0)
    inits = [rng.standard_normal(50_000).astype(np.float32) for _ in range(2)]
    grad = rng.standard_normal(50_000).astype(np.float32)

    def run(p, out, i):
        opt = fo.Adam([p], lr=1e-3)
        for _ in range(200):
            opt.step([grad])
        out[i] = p

    serial = [None, None]
    for i in range(2):
        run(inits[i].copy(), serial, i)
    concurrent = [None, None]
    threads = [
        threading.Thread(target=run, args=(inits[i].copy(), concurrent, i)) for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, concurrent):
        assert np.array_equal(a, b)


def test_one_kernel_call_per_group_over_a_paramset(monkeypatch):
    from fastopt import dispatch

    calls = []
    backend = dispatch.get_backend("numba-cpu")
    original = type(backend).update
    monkeypatch.setattr(
        type(backend), "update", lambda self, *a: calls.append(a[0]) or original(self, *a)
    )
    ps = fo.ParamSet({f"layer{i}": np.zeros((3, 4), np.float32) for i in range(50)})
    opt = fo.Adam(ps, lr=1e-3)
    opt.step()
    opt.step()
    assert calls == ["adam", "adam"]


@pytest.mark.parametrize("rule", ["adam", "rprop", "sgd_momentum"])
def test_serial_and_parallel_loops_agree_bitwise(rule):
    """Small arrays run a serial loop, large ones the prange loop: same bits either way."""
    from fastopt.kernels import cpu
    from fastopt.kernels.compile_rules import ARITY

    n = cpu.PARALLEL_THRESHOLD + 3
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal(n), rng.standard_normal(n)
    states = [np.abs(rng.standard_normal(n)) for _ in range(ARITY[rule])]
    h = {
        "adam": (1.0, 0.0, 1.0, 0.9, 0.1, 0.999, 0.001, 1e-3, 0.1, 1e-8),
        "rprop": (1.0, 0.5, 1.2, 1e-6, 50.0, 0.0),
        "sgd_momentum": (0.1, 0.0, 1.0, 0.9, 1.0, 0.0, 0.0),
    }[rule]
    gs = (0.5, 0.0)
    big = [a.copy() for a in (p, g, *states)]
    cpu.kernel(rule, parallel=True)(*big, (*h, *gs))
    small = [a.copy() for a in (p, g, *states)]
    cpu.kernel(rule, parallel=False)(*small, (*h, *gs))
    for a, b in zip(big, small):
        assert np.array_equal(a, b)
    below = [a[: n - 10].copy() for a in (p, g, *states)]
    cpu.apply(rule, below[0], below[1], below[2:], h, gs)  # below the threshold: serial path
    assert np.array_equal(below[0], big[0][: n - 10])


def test_rules_read_their_declared_scalars():
    """Every rule unpacks h into exactly the fields rules.py declares for it, in order; a rule
    and its declaration edited apart fail before compiling, not in the numerics."""
    import inspect

    from fastopt.kernels import layout, rules

    layout.check_rules()
    source = inspect.getsource(rules)
    swapped = source.replace(
        "step_size, bias_correction2_sqrt, eps = h[7:]",
        "bias_correction2_sqrt, step_size, eps = h[7:]",
    )
    assert swapped != source
    with pytest.raises(ValueError, match="adam_apply unpacks h\\[7:\\]"):
        layout.check_rules(swapped)
    unread = source.replace(
        "clr, weight_decay, gsign, eps = h\n", "clr, weight_decay, gsign = h[:3]\n    eps = clr\n"
    )
    assert unread != source
    with pytest.raises(ValueError, match=r"adagrad reads h\[:3\]"):
        layout.check_rules(unread)
    indexed = source.replace(
        "one_minus_decay, decay = h\n", "one_minus_decay, decay = h[0], h[1]\n"
    )
    with pytest.raises(ValueError, match="ema reads h"):
        layout.check_rules(indexed)
