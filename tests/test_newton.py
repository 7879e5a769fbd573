"""Hessians of the test functions, Newton's method and backtracking in the playground, and the
curvature / armijo presets."""

import numpy as np
import pytest

from fastopt import playground, problems
from fastopt.playground.methods import ArmijoGD, Newton


def _fd_hessian(p, x, h=1e-6):
    """Central differences of the analytic gradient, column by column."""
    cols = [(p.grad(x + h * e) - p.grad(x - h * e)) / (2 * h) for e in np.eye(p.dim)]
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("name", list(problems.PROBLEMS))
def test_hessians_match_finite_differences_of_the_gradient(name):
    p = problems.get_problem(name)
    rng = np.random.default_rng(0)
    lo, hi = np.array(p.window).T
    for x in [np.array(p.start), *(lo + (hi - lo) * rng.random((5, p.dim)))]:
        H = p.hess(x)
        assert H.shape == (p.dim, p.dim)
        assert np.allclose(H, H.T)
        fd = _fd_hessian(p, x)
        assert np.allclose(H, fd, rtol=1e-6, atol=1e-5 * max(1.0, np.abs(fd).max()))


def test_hessian_of_a_grid_has_the_batch_shape():
    p = problems.get_problem("rosenbrock", a=2.0, b=10.0)
    xs = np.random.default_rng(1).standard_normal((2, 4, 3))
    H = p.hess(xs)
    assert H.shape == (2, 2, 4, 3)
    assert np.allclose(H[:, :, 2, 1], p.hess(xs[:, 2, 1]))


@pytest.mark.parametrize("line_search", [False, True])
@pytest.mark.parametrize("params", [dict(a=1.0, b=2.0), dict(a=0.1, b=2.0), dict(a=3.0, b=0.01)])
def test_newton_solves_a_quadratic_in_one_step(line_search, params):
    p = problems.get_problem("quadratic", **params)
    x = np.array(p.start)
    Newton([x], line_search=line_search).step_on(p)
    assert np.allclose(x, 0.0, atol=1e-14)


def test_newton_converges_quadratically_near_the_rosenbrock_minimum():
    p = problems.get_problem("rosenbrock")
    x = np.array([1.05, 1.1])  # near (1, 1)
    opt = Newton([x])
    errors = [np.linalg.norm(x - 1.0)]
    for _ in range(6):
        opt.step_on(p)
        errors.append(np.linalg.norm(x - 1.0))
    assert errors[-1] < 1e-12
    ratios = [e1 / e0**2 for e0, e1 in zip(errors, errors[1:]) if e0 > 1e-7]
    assert len(ratios) >= 5
    assert max(ratios) < 50  # e_{k+1} <= C e_k^2: quadratic convergence


def test_newton_descends_where_the_hessian_is_indefinite():
    for name, start in [("saddle", (2.0, 0.01)), ("rosenbrock", (0.0, 1.0))]:
        p = problems.get_problem(name)
        H = p.hess(np.array(start))
        assert np.linalg.eigvalsh(H).min() < 0
        x = np.array(start)
        f0 = float(p.value(x))
        Newton([x]).step_on(p)
        assert float(p.value(x)) < f0


def test_armijo_gradient_descent_decreases_every_step():
    p = problems.get_problem("rosenbrock")
    x = np.array(p.start)
    opt = ArmijoGD([x])
    values = [float(p.value(x))]
    for _ in range(50):
        opt.step_on(p)
        values.append(float(p.value(x)))
    assert all(b < a for a, b in zip(values, values[1:]))
    assert opt.evaluations > 50  # it backtracked


@pytest.mark.parametrize(
    "spec, error",
    [
        ("newton:lr=-1", "lr"),
        ("newton:rho=1.5", "rho"),
        ("armijo:c1=0", "c1"),
        ("newton:zz=1", "zz"),
    ],
)
def test_bad_method_arguments(spec, error):
    with pytest.raises(ValueError, match=error):
        playground.parse_optimizer(spec)


def test_newton_and_lbfgs_beat_gradient_descent_on_the_presets():
    for preset, tol in [("curvature", 1e-10), ("curvature-rosenbrock", 1e-8)]:
        pr = playground.PRESETS[preset]
        p = problems.get_problem(pr.problem)
        runs = {s.split(":")[0]: playground.run(p, s, steps=pr.steps) for s in pr.optimizers}
        for name in ("newton", "lbfgs"):
            assert runs[name].values[-1] < tol
            assert runs[name].values[-1] < runs["gd"].values[-1] * 1e-6
