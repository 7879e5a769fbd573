"""LBFGS: torch.optim.LBFGS's iterates and closure calls, its checks, its state and its kernels."""

import copy

import numba
import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo
from fastopt import checkpoint
from fastopt.kernels import vector

torch = import_or_skip("torch")

STEPS = 50


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def rosenbrock_grad(x):
    return np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])


def logistic_data(n=200, d=12, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = (X @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n) > 0).astype(np.float64)
    return X, y


def logistic_loss_grad(X, y, w, b, l2=1e-3):
    """Mean logistic loss with an L2 term, and its gradient (NumPy, the same for both sides)."""
    z = X @ w + b[0]
    p = 1 / (1 + np.exp(-z))
    loss = np.mean(np.logaddexp(0, z) - y * z) + 0.5 * l2 * w @ w
    r = (p - y) / len(y)
    return loss, X.T @ r + l2 * w, np.array([r.sum()])


def _torch_run(x0s, loss_grads, kwargs, steps=STEPS):
    """torch.optim.LBFGS over tensors ``x0s`` with ``loss_grads(arrays) -> (loss, grads)``:
    the iterates after each step and the number of closure calls."""
    ts = [torch.tensor(x.copy()) for x in x0s]
    opt = torch.optim.LBFGS(ts, **kwargs)
    calls = [0]

    def closure():
        calls[0] += 1
        loss, grads = loss_grads([t.numpy() for t in ts])
        for t, g in zip(ts, grads):
            t.grad = torch.from_numpy(np.array(g))
        return torch.tensor(loss)

    out = []
    for _ in range(steps):
        opt.step(closure)
        out.append(np.concatenate([t.numpy().ravel().copy() for t in ts]))
    return out, calls[0]


def _fastopt_run(x0s, loss_grads, kwargs, paramset, steps=STEPS):
    arrays = [x.copy() for x in x0s]
    calls = [0]
    if paramset:
        ps = fo.ParamSet({f"p{i}": a for i, a in enumerate(arrays)}, dtype=np.float64)
        names = ps.names
        opt = fo.LBFGS(ps, **kwargs)

        def closure():
            calls[0] += 1
            loss, grads = loss_grads([ps[n] for n in names])
            for n, g in zip(names, grads):
                ps.grads[n][...] = g
            return loss

        flat = lambda: ps.flat.copy()  # noqa: E731
    else:
        opt = fo.LBFGS(arrays, **kwargs)

        def closure():
            calls[0] += 1
            return loss_grads(arrays)

        flat = lambda: np.concatenate([a.ravel() for a in arrays])  # noqa: E731
    out = []
    for _ in range(steps):
        opt.step(closure)
        out.append(flat())
    return out, calls[0], opt


def _assert_same_iterates(ours, theirs, rtol=1e-10):
    for k, (a, b) in enumerate(zip(ours, theirs)):
        err = np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))
        assert err <= rtol, f"outer step {k + 1}: relative difference {err:.3g}"


def _rosen_problem():
    return [np.array([-1.5, 2.0])], lambda xs: (rosenbrock(xs[0]), [rosenbrock_grad(xs[0])])


def _logistic_problem():
    X, y = logistic_data()

    def loss_grads(xs):
        loss, gw, gb = logistic_loss_grad(X, y, xs[0], xs[1])
        return loss, [gw, gb]

    return [np.zeros(X.shape[1]), np.zeros(1)], loss_grads


@pytest.mark.parametrize("problem", [_rosen_problem, _logistic_problem], ids=["rosen", "logreg"])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("paramset", [False, True], ids=["arrays", "paramset"])
@pytest.mark.parametrize(
    "settings",
    [dict(lr=1, max_iter=5, history_size=10), dict(lr=0.1, max_iter=20, history_size=4)],
    ids=["lr1", "lr0.1-hist4"],
)
def test_same_iterates_and_closure_calls_as_torch(problem, line_search_fn, paramset, settings):
    x0s, loss_grads = problem()
    kwargs = dict(settings, line_search_fn=line_search_fn)
    theirs, torch_calls = _torch_run(x0s, loss_grads, kwargs)
    ours, calls, opt = _fastopt_run(x0s, loss_grads, kwargs, paramset)
    _assert_same_iterates(ours, theirs)
    assert calls == torch_calls
    assert opt.state[0]["func_evals"] == calls


def test_reaches_the_rosenbrock_minimum():
    x0s, loss_grads = _rosen_problem()
    ours, _, _ = _fastopt_run(x0s, loss_grads, dict(line_search_fn="strong_wolfe"), False, 5)
    assert np.allclose(ours[-1], [1.0, 1.0], atol=1e-6)


def test_float32_paramset_descends():
    X, y = logistic_data()
    ps = fo.ParamSet({"w": np.zeros(X.shape[1]), "b": np.zeros(1)}, dtype=np.float32)
    opt = fo.LBFGS(ps, line_search_fn="strong_wolfe")

    def closure():
        loss, gw, gb = logistic_loss_grad(X, y, ps["w"].astype(np.float64), ps["b"])
        ps.grads["w"][...] = gw
        ps.grads["b"][...] = gb
        return loss

    first = opt.step(closure)
    assert opt.step(closure) < first * 0.8


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(history_size=0), ValueError, "history_size"),
        (dict(history_size=2.0), TypeError, "history_size"),
        (dict(max_iter=0), ValueError, "max_iter"),
        (dict(max_eval=0), ValueError, "max_eval"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(tolerance_grad=-1.0), ValueError, "tolerance_grad"),
        (dict(line_search_fn="armijo"), ValueError, "line_search_fn"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        fo.LBFGS([np.zeros(3)], **kwargs)


def test_one_param_group_only():
    with pytest.raises(ValueError, match="parameter groups"):
        fo.LBFGS([{"params": [np.zeros(2)]}, {"params": [np.zeros(2)], "lr": 0.1}])
    opt = fo.LBFGS([np.zeros(2)])
    with pytest.raises(ValueError, match="parameter groups"):
        opt.add_param_group({"params": [np.zeros(2)]})


def test_mixed_dtypes_are_refused():
    with pytest.raises(TypeError, match="one dtype"):
        fo.LBFGS([np.zeros(2), np.zeros(2, np.float32)])


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize(
    "result, error, match",
    [
        ((float("nan"), [np.ones(3)]), ValueError, "non-finite loss"),
        ((float("inf"), [np.ones(3)]), ValueError, "non-finite loss"),
        (("1.0", [np.ones(3)]), TypeError, "real number"),
        ((np.ones(2), [np.ones(3)]), TypeError, "real number"),
        ((1.0, [np.ones(4)]), ValueError, "shape"),
        ((1.0, [np.ones(3), np.ones(3)]), ValueError, "gradients"),
        ((1.0, None), TypeError, "no gradients"),
        (1.0, TypeError, r"\(loss, grads\)"),
        ((1.0, [np.ones(3, np.float32)]), TypeError, "dtype"),
    ],
)
def test_bad_closure_results_fail_before_any_write(line_search_fn, result, error, match):
    x = np.arange(3.0)
    opt = fo.LBFGS([x], line_search_fn=line_search_fn)
    with pytest.raises(error, match=match):
        opt.step(lambda: result)
    assert np.array_equal(x, np.arange(3.0))
    assert opt.state == {}


def test_paramset_closure_returns_the_loss_only():
    ps = fo.ParamSet({"w": np.ones(3)})
    opt = fo.LBFGS(ps)
    with pytest.raises(TypeError, match="returns the loss, not a tuple"):
        opt.step(lambda: (1.0, ps.grads))
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(lambda: float("nan"))
    assert np.array_equal(ps["w"], np.ones(3)) and opt.state == {}


def test_step_wants_a_closure():
    opt = fo.LBFGS([np.zeros(2)])
    with pytest.raises(TypeError, match="closure"):
        opt.step([np.ones(2)])
    assert fo.LBFGS.requires_closure and not fo.Adam.requires_closure


def test_a_none_gradient_counts_as_zeros_as_torch():
    a, b = np.ones(2), np.ones(2)
    opt = fo.LBFGS([a, b], max_iter=1)
    opt.step(lambda: (float(a @ a), [2 * a, None]))
    assert np.array_equal(b, np.ones(2)) and not np.array_equal(a, np.ones(2))


# ---------------------------------------------------------------------------- state


def _rosen_opt(kwargs):
    x = np.array([-1.5, 2.0])
    return x, fo.LBFGS([x], **kwargs), lambda: (rosenbrock(x), [rosenbrock_grad(x)])


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_state_dict_resume_is_bit_identical(line_search_fn, tmp_path):
    kwargs = dict(max_iter=3, history_size=3, line_search_fn=line_search_fn)
    x, opt, closure = _rosen_opt(kwargs)
    for _ in range(8):
        opt.step(closure)
    x1, opt1, closure1 = _rosen_opt(kwargs)
    for _ in range(4):
        opt1.step(closure1)
    saved = copy.deepcopy(opt1.state_dict())
    assert set(saved["state"][0]) == {
        "func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
        "prev_flat_grad", "prev_loss", "al",
    }  # fmt: skip
    assert len(saved["state"][0]["old_dirs"]) == 3  # the history is full and kept
    path = checkpoint.save(tmp_path / "lbfgs.ckpt", params={"x": x1}, optimizer=opt1)

    x2, opt2, closure2 = _rosen_opt(kwargs)
    opt2.load_state_dict(saved)
    x2[...] = x1
    x3, opt3, closure3 = _rosen_opt(kwargs)
    checkpoint.load(path).restore(params={"x": x3}, optimizer=opt3)
    for _ in range(4):
        opt2.step(closure2)
        opt3.step(closure3)
    assert np.array_equal(x2, x) and np.array_equal(x3, x)
    assert opt3.state[0]["func_evals"] == opt.state[0]["func_evals"]


def test_bad_state_dicts_are_refused_before_any_change():
    x, opt, closure = _rosen_opt(dict(history_size=2))
    opt.step(closure)
    good = opt.state_dict()
    before = copy.deepcopy(good)
    bad_history = copy.deepcopy(good)
    bad_history["state"][0]["old_dirs"] = [np.zeros(2)] * 3
    bad_length = copy.deepcopy(good)
    bad_length["state"][0]["d"] = np.zeros(5)
    bad_ro = copy.deepcopy(good)
    bad_ro["state"][0]["ro"] = bad_ro["state"][0]["ro"][:-1]
    other = copy.deepcopy(good)
    other["algorithm"] = "Adam"
    for sd, match in [
        (bad_history, "at most history_size"),
        (bad_length, "shape"),
        (bad_ro, "one length"),
        (other, "for Adam"),
    ]:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["state"][0]["n_iter"] == before["state"][0]["n_iter"]
    assert np.array_equal(after["state"][0]["d"], before["state"][0]["d"])


# ---------------------------------------------------------------------------- kernels


def test_vector_kernels_match_numpy_and_ignore_the_thread_count():
    rng = np.random.default_rng(1)
    n = 300_001  # several chunks and a ragged tail, parallel driver
    x, y, z = (rng.standard_normal(n) for _ in range(3))
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        q = x.copy()
        r = (vector.dot(x, y), vector.update_dot(q, 0.5, y, 2.0, z), vector.abs_sum_max(z))
        yy, ss = np.empty(n), np.empty(n)
        results.append((r, vector.curvature_pair(x, y, z, 0.25, yy, ss), q))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    (r, pair, q), (r2, pair2, q2) = results
    assert r == r2 and pair == pair2 and np.array_equal(q, q2)
    assert np.isclose(r[0], x @ y, rtol=1e-12)
    assert np.allclose(q, 2.0 * (x + 0.5 * y), rtol=1e-15)
    assert np.isclose(r[1], z @ q, rtol=1e-12)
    assert np.isclose(r[2][0], np.abs(z).sum()) and r[2][1] == np.abs(z).max()
    assert np.isclose(pair[0], (x - y) @ (0.25 * z)) and np.isclose(pair[1], (x - y) @ (x - y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_maxima_order_magnitudes_and_propagate_nan(dtype):
    # max |x| is reduced over the sign-cleared bit patterns: check the order that implies against
    # NumPy on values of every kind, and that a NaN wins as in torch's abs().max().
    info = np.finfo(dtype)
    x = np.array([-0.0, info.smallest_subnormal, -info.tiny, 1.5, -info.max, 3.0], dtype)
    for values in (x, np.append(x, -np.inf), np.insert(x, 2, np.nan)):
        expected = np.abs(values).max()
        s, m = vector.abs_sum_max(values)
        p = np.zeros_like(values)
        assert vector.axpy_absmax(p, 1.0, values) == m or (np.isnan(m) and np.isnan(expected))
        assert m == expected or (np.isnan(m) and np.isnan(expected)), (values, m)
    assert vector.abs_sum_max(np.array([-0.0, 0.0], dtype)) == (0.0, 0.0)


def test_serial_and_parallel_drivers_give_the_same_partials():
    rng = np.random.default_rng(2)
    n = 100_000
    x, y = rng.standard_normal(n), rng.standard_normal(n)
    out_p = np.empty((1, -(-n // vector.REDUCTION_CHUNK)))
    out_s = np.empty_like(out_p)
    vector._DOT[0](n, out_p, x, y)
    vector._DOT[1](n, out_s, x, y)
    assert np.array_equal(out_p, out_s)
