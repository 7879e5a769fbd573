"""Methods of the playground that need more of the problem than a gradient: Newton's method (the
Hessian) and gradient descent with a backtracking (Armijo) line search (function values).

They exist for the textbook pictures of what curvature buys (``--preset curvature``, ``--preset
armijo``); they are not ``fastopt.optim`` optimizers: each ``step_on(problem)`` does one iteration
on the float64 parameter array given at construction, in place.
"""

import numpy as np

from ..optim.line_search import backtracking_armijo
from ..validation import check_int, check_interval, check_positive


class Newton:
    """Damped Newton's method (Nocedal & Wright, *Numerical Optimization*, 2nd ed., sec. 3.3-3.4).

    Direction ``p = -H^{-1} g``; where the Hessian ``H`` is not positive definite (a saddle, or
    Rosenbrock's concave region) the modified Newton direction of sec. 3.4: ``H + tau I`` with
    the smallest ``tau = beta * 2^k`` (``beta = 1e-3``) that admits a Cholesky factorisation, so
    ``p`` is always a descent direction. With ``line_search=True`` (default) the step length is
    the first of ``lr, lr*rho, lr*rho^2, ...`` satisfying the Armijo condition (c1 = 1e-4), so
    the full step is taken near a minimiser and convergence is quadratic there; with
    ``line_search=False`` the step is ``lr * p`` (pure Newton with ``lr=1``: one step to the
    minimum of a convex quadratic).
    """

    def __init__(self, params, lr=1.0, line_search=True, rho=0.5, max_backtracks=50):
        check_positive("lr", lr)
        check_interval("rho", rho, 0.0, 1.0, lo_closed=False)
        check_int("max_backtracks", max_backtracks, lo=1)
        if not isinstance(line_search, bool):
            raise TypeError(f"line_search must be True or False, got {line_search!r}")
        self.x = _the_array(params)
        self.lr, self.line_search = float(lr), line_search
        self.rho, self.max_backtracks = float(rho), max_backtracks
        self.evaluations = 0

    def direction(self, g, H):
        """``-(H + tau I)^{-1} g`` with the smallest tau of the modified Newton method."""
        n = H.shape[0]
        tau = 0.0 if np.all(np.diag(H) > 0) else 1e-3
        while True:
            try:
                L = np.linalg.cholesky(H + tau * np.eye(n))
                break
            except np.linalg.LinAlgError:
                tau = max(2 * tau, 1e-3)
        return -np.linalg.solve(L.T, np.linalg.solve(L, g))

    def step_on(self, problem):
        x = self.x
        g = problem.grad(x)
        p = self.direction(g, problem.hess(x))
        t = self.lr
        if self.line_search:
            t, k = backtracking_armijo(
                problem.value, x, float(problem.value(x)), g, p, t0=self.lr, rho=self.rho,
                max_backtracks=self.max_backtracks,
            )  # fmt: skip
            self.evaluations += k
        x += t * p


class ArmijoGD:
    """Gradient descent with a backtracking line search (Nocedal & Wright Algorithm 3.1): each
    step tries ``lr, lr*rho, lr*rho^2, ...`` along ``-g`` and takes the first length with
    sufficient decrease ``f(x - t g) <= f(x) - c1 t |g|^2`` (c1 = 1e-4): no step size to tune,
    no divergence, at the price of function evaluations (counted in ``evaluations``)."""

    def __init__(self, params, lr=1.0, rho=0.5, c1=1e-4, max_backtracks=50):
        check_positive("lr", lr)
        check_interval("rho", rho, 0.0, 1.0, lo_closed=False)
        check_interval("c1", c1, 0.0, 1.0, lo_closed=False)
        check_int("max_backtracks", max_backtracks, lo=1)
        self.x = _the_array(params)
        self.lr, self.rho, self.c1 = float(lr), float(rho), float(c1)
        self.max_backtracks = max_backtracks
        self.evaluations = 0

    def step_on(self, problem):
        x = self.x
        g = problem.grad(x)
        t, k = backtracking_armijo(
            problem.value, x, float(problem.value(x)), g, -g, t0=self.lr, rho=self.rho,
            c1=self.c1, max_backtracks=self.max_backtracks,
        )  # fmt: skip
        self.evaluations += k
        x -= t * g


def _the_array(params):
    if isinstance(params, (list, tuple)) and len(params) == 1:
        params = params[0]
    if not isinstance(params, np.ndarray) or params.dtype != np.float64 or params.ndim != 1:
        raise TypeError("the playground methods take one 1-D float64 NumPy array")
    return params


METHODS = {"newton": Newton, "armijo": ArmijoGD}
"""Playground-only methods by name (``newton``, ``armijo`` = gradient descent with backtracking)."""
