"""L-BFGS audit fixes: the strong-Wolfe interpolation divides as torch's 0-d tensors do (no
ZeroDivisionError on piecewise-linear objectives), an exception from the closure mid-step leaves
the state of the last completed iteration, and the vector kernels add in an order that does not
depend on where the arrays sit in memory (so a resumed run is bit-identical)."""

import copy
import math
import types

import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels import vector
from fastopt.optim import line_search
from fastopt.optim.line_search import TensorScalar, cubic_interpolate

pytestmark = pytest.mark.usefixtures("serial_kernels")


def l1(x):
    """f(x) = sum |x - 0.3|: piecewise linear, so the line search sees equal slopes."""
    return float(np.abs(x - 0.3).sum()), np.sign(x - 0.3)


def rosenbrock(x):
    a, b = x[:-1], x[1:]
    f = float(np.sum(100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2))
    g = np.zeros_like(x)
    g[:-1] = -400.0 * a * (b - a * a) - 2.0 * (1.0 - a)
    g[1:] += 200.0 * (b - a * a)
    return f, g


def _same(a, b):
    """Equal floats, NaN equal to NaN, the sign of a zero counted."""
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


# ---------------------------------------------------------------------------- cubic_interpolate


def test_cubic_interpolate_divides_as_ieee_instead_of_raising():
    # equal slopes (a piecewise-linear objective): g2 - g1 + 2*d2 == 0, so the minimiser is
    # +inf (torch: a tensor division) and min/max clamp it to the upper bound
    assert cubic_interpolate(0.0, 2.0, -1.0, 1.0, 1.0, -1.0, bounds=(1.01, 10.0)) == 10.0
    assert cubic_interpolate(0, 2.0, -1.0, 0.5, 1.5, -1.0, bounds=(0.505, 5.0)) == 5.0
    # 0/0: the minimiser is NaN and comes back as NaN (Python's min/max keep a leading NaN)
    assert math.isnan(cubic_interpolate(0.0, 1.0, 0.0, 1.0, 1.0, 0.0, bounds=(1.01, 10.0)))
    # equal points: 3*(f1 - f2)/(x1 - x2) is inf, not a ZeroDivisionError
    assert math.isnan(cubic_interpolate(1.0, 2.0, -1.0, 1.0, 1.0, 1.0))
    # d1**2 overflows to inf (not OverflowError), inf - inf is NaN: the midpoint of the bounds
    assert cubic_interpolate(0.0, 0.0, 1e200, 1.0, 1.0, 1e200, bounds=(0.0, 2.0)) == 1.0


def test_cubic_interpolate_keeps_torchs_tensor_division():
    # float / tensor is tensor.reciprocal() * float in torch (two roundings): x1 - x2 = -0.999
    # rounds 12 / -0.999 differently from Python's division
    args = (0.001, 3.0, 1.0, 1.0, -1.0, 2.5)
    assert cubic_interpolate(*args) == 0.9253212105384859
    assert cubic_interpolate(TensorScalar(0.001), *args[1:]) == 0.9253212105384858
    # an interpolated point is a tensor in torch (here the minimiser 0.3 of (x - 0.3)**2), and
    # stays one through arithmetic; a bound it is clamped to keeps its own type
    t = cubic_interpolate(0.0, 0.09, -0.6, 0.5, 0.04, 0.4)
    assert isinstance(t, TensorScalar) and t == pytest.approx(0.3)
    assert isinstance(t * 10 + 0.5 - t / 2.0, TensorScalar) and isinstance(0 - t, TensorScalar)
    assert type(cubic_interpolate(0.0, 1.0, -1.0, 0.5, 1.5, -1.0, bounds=(1.0, 2.0))) is float


def _torch_sqrt(monkeypatch, torch):
    """line_search's math with torch's CPU sqrt, which is not always correctly rounded: the one
    operation where fastopt (math.sqrt) and torch may differ in the last bit."""
    shim = types.SimpleNamespace(**{k: getattr(math, k) for k in dir(math) if k[0] != "_"})
    shim.sqrt = lambda v: float(torch.tensor(float(v), dtype=torch.float64).sqrt())
    monkeypatch.setattr(line_search, "math", shim)


def test_cubic_interpolate_equals_torch_operation_for_operation(monkeypatch):
    from oracle import torch_or_skip

    torch = torch_or_skip()
    from torch.optim.lbfgs import _cubic_interpolate

    _torch_sqrt(monkeypatch, torch)
    rng = np.random.default_rng(0)
    special = [0.0, -0.0, 1.0, -1.0, 2.5, 1e-300, 1e200, -1e200, math.inf, -math.inf, math.nan]
    xs, fs = [0.0, 1.0, 0.5, 2.0, 1e-3, 0.37], [0.0, 1.0, -1.0, 3.0, 1e200, 0.123]
    compared = 0
    for _ in range(4000):
        x1, x2 = float(rng.choice(xs)), float(rng.choice(xs))
        f1, f2 = float(rng.choice(fs)), float(rng.choice(fs))
        pick = special if rng.random() < 0.5 else [float(v) for v in rng.standard_normal(4)]
        g1, g2 = float(rng.choice(pick)), float(rng.choice(pick))
        bounds = None if rng.random() < 0.5 else (min(x1, x2) + 0.01, max(x1, x2) * 10.0 + 0.5)
        tensor_x1 = rng.random() < 0.5  # torch's step lengths are floats or 0-d tensors
        tx1 = torch.tensor(x1, dtype=torch.float64) if tensor_x1 else x1
        tg1, tg2 = (torch.tensor(v, dtype=torch.float64) for v in (g1, g2))
        try:
            want = _cubic_interpolate(tx1, f1, tg1, x2, f2, tg2, bounds)
        except ZeroDivisionError:  # torch raises only where both points are equal floats
            assert x1 == x2 and not tensor_x1
            continue
        got = cubic_interpolate(TensorScalar(x1) if tensor_x1 else x1, f1, g1, x2, f2, g2, bounds)
        assert _same(got, want), (x1, f1, g1, x2, f2, g2, bounds, tensor_x1, got, want)
        assert isinstance(got, TensorScalar) == isinstance(want, torch.Tensor)
        compared += 1
    assert compared > 3000


def test_torch_lbfgs_with_fastopts_interpolation_plugged_in_is_unchanged(monkeypatch):
    """torch's own LBFGS with fastopt's cubic_interpolate in place of its own (tensors as
    TensorScalar and back) makes the same iterates, bit for bit, on piecewise-linear and smooth
    objectives."""
    from oracle import torch_or_skip

    torch = torch_or_skip()
    import torch.optim.lbfgs as tl

    _torch_sqrt(monkeypatch, torch)
    theirs = tl._cubic_interpolate

    def conv(v):
        return TensorScalar(float(v)) if isinstance(v, torch.Tensor) else v

    def ours(x1, f1, g1, x2, f2, g2, bounds=None):
        b = None if bounds is None else tuple(conv(v) for v in bounds)
        t = cubic_interpolate(conv(x1), f1, float(g1), conv(x2), f2, float(g2), b)
        return torch.tensor(float(t), dtype=torch.float64) if isinstance(t, TensorScalar) else t

    def run(interp, seed, problem):
        monkeypatch.setattr(tl, "_cubic_interpolate", interp)
        x0 = np.random.default_rng(seed).standard_normal(5) * 3
        xt = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
        opt = torch.optim.LBFGS([xt], line_search_fn="strong_wolfe")

        def closure():
            f, g = problem(xt.detach().numpy().copy())
            xt.grad = torch.tensor(g, dtype=torch.float64)
            return torch.tensor(f, dtype=torch.float64)

        losses = [float(opt.step(closure)) for _ in range(3)]
        return xt.detach().numpy().copy(), opt.state[xt]["func_evals"], losses

    for problem in (l1, rosenbrock):
        for seed in range(6):
            a, b = run(theirs, seed, problem), run(ours, seed, problem)
            assert np.array_equal(a[0], b[0]) and a[1:] == b[1:], (problem.__name__, seed)


@pytest.mark.parametrize("seed", [2, 3])
def test_strong_wolfe_on_a_piecewise_linear_objective_runs_as_torch(seed):
    # seeds 2 and 3 raised ZeroDivisionError in cubic_interpolate before the fix
    x0 = np.random.default_rng(seed).standard_normal(5) * 3
    x = x0.copy()
    opt = fo.LBFGS([x], line_search_fn="strong_wolfe")
    for _ in range(3):
        opt.step(lambda: (lambda fg: (fg[0], [fg[1]]))(l1(x)))
    assert l1(x)[0] < 1e-3
    from oracle import torch_or_skip

    torch = torch_or_skip()
    xt = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    topt = torch.optim.LBFGS([xt], line_search_fn="strong_wolfe")

    def closure():
        f, g = l1(xt.detach().numpy().copy())
        xt.grad = torch.tensor(g, dtype=torch.float64)
        return torch.tensor(f, dtype=torch.float64)

    for _ in range(3):
        topt.step(closure)
    np.testing.assert_allclose(x, xt.detach().numpy(), atol=1e-3)


# ---------------------------------------------------------------------------- exceptions mid-step


class Boom(Exception):
    pass


def _run(line_search_fn, max_iters, raise_at=None, x0=(-1.2, 1.0, 0.5, -0.7)):
    """LBFGS on a 4-D Rosenbrock, one step() per entry of ``max_iters`` (its max_iter); the
    closure raises Boom on call number ``raise_at`` (the step it interrupts is abandoned)."""
    x = np.array(x0)
    opt = fo.LBFGS([x], history_size=3, line_search_fn=line_search_fn)
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == raise_at:
            raise Boom
        f, g = rosenbrock(x)
        return f, [g]

    for m in max_iters:
        opt.param_groups[0]["max_iter"] = m
        try:
            opt.step(closure)
        except Boom:
            pass
    return x, opt, calls[0]


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k, v in sa["state"].get(0, {}).items():
        w = sb["state"][0][k]
        if k in ("old_dirs", "old_stps"):
            assert len(v) == len(w) and all(np.array_equal(p, q) for p, q in zip(v, w)), k
        elif isinstance(v, np.ndarray):
            assert np.array_equal(v, w), k
        else:
            assert v == w, k


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_an_exception_mid_step_leaves_the_last_completed_iteration(line_search_fn):
    """A step of 5 iterations whose closure raises in its third iteration leaves the optimizer
    (state and parameters) as a step of 2 iterations does, and the run goes on from there
    bit for bit."""
    _, ref_opt, _ = _run(line_search_fn, [5, 5, 2])
    evals = ref_opt.state[0]["func_evals"]
    # the call that fails: the first of the third iteration of the third step
    raise_at = evals + 1
    x, opt, _ = _run(line_search_fn, [5, 5, 5], raise_at=raise_at)
    x_ref, ref, _ = _run(line_search_fn, [5, 5, 2])
    assert opt.state[0]["n_iter"] == ref.state[0]["n_iter"] == 12
    _assert_same_state(opt, ref)
    assert np.array_equal(x, x_ref)
    # and it resumes as if the step had stopped there
    x, opt, _ = _run(line_search_fn, [5, 5, 5, 5, 5], raise_at=raise_at)
    x_ref, ref, _ = _run(line_search_fn, [5, 5, 2, 5, 5])
    _assert_same_state(opt, ref)
    assert np.array_equal(x, x_ref)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_an_exception_in_the_first_iteration_leaves_no_half_state(line_search_fn):
    # before: n_iter = 1 without a direction; the next step() crashed in the vector kernels and
    # the state_dict() could not be loaded
    x, opt, _ = _run(line_search_fn, [5], raise_at=2)
    assert opt.state[0]["func_evals"] == 1
    if line_search_fn is None:  # the fixed step moved the parameters: the iteration completed
        assert opt.state[0]["n_iter"] == 1 and "d" in opt.state[0]
        assert not np.array_equal(x, [-1.2, 1.0, 0.5, -0.7])
    else:  # the line search failed: back at the start of the iteration, nothing of it kept
        assert opt.state[0] == {"func_evals": 1, "n_iter": 0}
        assert np.array_equal(x, [-1.2, 1.0, 0.5, -0.7])
    fo.LBFGS([x.copy()], history_size=3).load_state_dict(opt.state_dict())
    f0 = rosenbrock(x)[0]
    for _ in range(3):
        opt.step(lambda: (lambda fg: (fg[0], [fg[1]]))(rosenbrock(x)))
    assert rosenbrock(x)[0] < f0


# ---------------------------------------------------------------------------- vector kernels


def _layouts(n, dtype):
    """Pairs of output vectors of ``n`` elements placed differently in memory: adjacent either
    way round, a few elements apart, far apart, in separate allocations."""
    out = []
    for gap in (0, 1, 3, 8, 64):
        buf = np.zeros(2 * n + gap, dtype)
        a, b = buf[:n], buf[n + gap :]
        out += [(a, b), (b, a)]
    out.append((np.zeros(n, dtype), np.zeros(n, dtype)))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_reductions_do_not_depend_on_where_the_arrays_sit(dtype):
    # before: LLVM's run-time alias checks picked a vector or a scalar loop that summed in
    # different orders (about half of these random inputs of 10 elements differed)
    rng = np.random.default_rng(0)
    for n in (1, 3, 10, 17, 31, 33, 100, 1025):
        for _ in range(8):
            g, pg, d, q0, x, z = (rng.standard_normal(n).astype(dtype) * 100 for _ in range(6))
            pairs, updates, scales = set(), set(), set()
            for y, s in _layouts(n, dtype):
                pairs.add(vector.curvature_pair(g, pg, d, 0.37, y, s))
                y[...] = q0
                updates.add(vector.update_dot(y, -0.3, x, 1.7, z))
                scales.add(vector.scale_dot(s, -0.7, x, z))
                scales.add(vector.scale_dot(x.copy(), -0.7, x, z))  # out may be x
            xs = x.copy()
            scales.add(vector.scale_dot(xs, -0.7, xs, z))
            assert len(pairs) == 1 and len(updates) == 1 and len(scales) == 1, n


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_reductions_equal_the_plain_reduction_of_their_output(dtype):
    rng = np.random.default_rng(1)
    chunk = vector.REDUCTION_CHUNK
    for n in (1, 10, 33, 1023, 1025, 4099, chunk + 3, 3 * chunk + 777):
        g, pg, d, x, z = (rng.standard_normal(n).astype(dtype) for _ in range(5))
        q = rng.standard_normal(n).astype(dtype)
        assert vector.update_dot(q, 0.25, x, 1.5, z) == vector.dot(z, q)
        out = np.empty(n, dtype)
        assert vector.scale_dot(out, -2.0, x, z) == vector.dot(z, out)
        y, s = np.empty(n, dtype), np.empty(n, dtype)
        assert vector.curvature_pair(g, pg, d, 0.5, y, s) == (vector.dot(y, s), vector.dot(y, y))
        assert vector.dot(x, z) == pytest.approx(float(x.astype(float) @ z.astype(float)))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_iter=1, history_size=2),
        dict(max_iter=3, history_size=3, line_search_fn="strong_wolfe"),
        dict(max_iter=4, history_size=5),
    ],
)
@pytest.mark.parametrize("paramset", [False, True])
def test_resume_from_a_state_dict_is_bit_identical_on_10d_rosenbrock(kwargs, paramset):
    # before: the uninterrupted run reused the dropped history pair as the next (y, s), the
    # resumed one allocated new vectors, and the sums depended on where they were
    x0 = np.random.default_rng(3).standard_normal(10)

    def make():
        if paramset:
            ps = fo.ParamSet({"x": x0.copy()})
            x = ps["x"]

            def closure():
                f, g = rosenbrock(x)
                ps.grads["x"][...] = g
                return f

            return x, fo.LBFGS(ps, **kwargs), closure
        x = x0.copy()
        return x, fo.LBFGS([x], **kwargs), lambda: (lambda fg: (fg[0], [fg[1]]))(rosenbrock(x))

    x, opt, closure = make()
    for _ in range(8):
        opt.step(closure)
    x1, opt1, closure1 = make()
    for _ in range(4):
        opt1.step(closure1)
    saved = copy.deepcopy(opt1.state_dict())
    x2, opt2, closure2 = make()
    opt2.load_state_dict(saved)
    x2[...] = x1
    for _ in range(4):
        opt2.step(closure2)
    assert np.array_equal(x2, x)
    _assert_same_state(opt2, opt)
