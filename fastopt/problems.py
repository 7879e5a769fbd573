"""Small test functions for optimizers: the textbook pictures of *Dive into Deep Learning* ch. 12.

Each problem has a vectorised NumPy value and gradient, a suggested start point, a plotting
window, and its minimum where it has one::

    >>> import fastopt.problems as P
    >>> p = P.get_problem("ellipse")            # 0.1 x1^2 + 2 x2^2
    >>> p.value([-5.0, -2.0])                   # one point: shape (dim,)
    array(10.5)
    >>> p.grad([-5.0, -2.0])
    array([-1., -8.])
    >>> xs = np.zeros((2, 50, 60)); p.value(xs).shape   # a grid: shape (dim, *batch)
    (50, 60)

Every problem also has its analytic Hessian, ``p.hess(x)`` (shape ``(dim, dim, *batch)``), for
Newton's method in the playground (``fastopt.playground.methods``).

Points are arrays whose FIRST axis holds the coordinates: ``(dim,)`` for one point, ``(dim, ...)``
for many (a meshgrid stacked along axis 0), so contour plots need no Python loop.

==============  ================================  ===============  =====================  =====
name            f                                 start            minimum                 dim
==============  ================================  ===============  =====================  =====
``square``      x^2                               10               0                       1
``quadratic``   a x1^2 + b x2^2 (a=1, b=2)        (-5, -2)         (0, 0)                  2
``ellipse``     the same with a=0.1, b=2          (-5, -2)         (0, 0)                  2
``rosenbrock``  (a - x)^2 + b (y - x^2)^2         (-1.5, 2)        (a, a^2)                2
``saddle``      x^2 - y^2                         (2, 0.01)        none (saddle at 0)      2
``plateau``     tanh(x)^2 + tanh(y)^2             (3.5, 2.75)      (0, 0)                  2
``matrix``      0.5 ||A X - B||_F^2, X 2x2        X = 0            X* = A^-1 B             4
==============  ================================  ===============  =====================  =====

``matrix`` is a point that is a MATRIX (``shape = (2, 2)``; its coordinates are X's entries in
row-major order), for the optimizers that take matrices only (Muon): least squares with an
ill-conditioned A (condition number ``c``, default 10), minimum 0 at X* = [[1, -1], [0.5, 1]].
The playground steps the optimizers on the 2 x 2 view of the point and draws its loss per step.

Sources: D2L 12.3 (``square``, f(x) = x^2 from x = 10; ``quadratic``, f = x1^2 + 2 x2^2 from
(-5, -2)), 12.6-12.8 (``ellipse``, the ill-conditioned f = 0.1 x1^2 + 2 x2^2), 12.1 (the saddle
f = x^2 - y^2, and vanishing gradients on tanh's plateaus: ``plateau``'s gradient is below 0.05
at the start point); Rosenbrock, "An automatic method for finding the greatest or least value of
a function", 1960. Parameters are given as keywords: ``get_problem("quadratic", a=1, b=4)`` is
x1^2 + 4 x2^2.
"""

import inspect

import numpy as np

from .validation import check_positive, check_real

__all__ = [
    "PROBLEMS",
    "MatrixLeastSquares",
    "Plateau",
    "Problem",
    "Quadratic",
    "Rosenbrock",
    "Saddle",
    "Square",
    "get_problem",
]


def _positive(name, value):
    check_positive(name, value)
    return float(value)


def _finite(name, value):
    return check_real(name, value)


def _coef(c):
    return "" if c == 1 else f"{c:g} "


class Problem:
    """A differentiable test function of ``dim`` variables.

    Attributes: ``name``; ``dim``; ``formula`` (plain text) and ``tex`` (matplotlib mathtext);
    ``params`` (the keyword arguments it was built with); ``start`` (a tuple of ``dim`` floats);
    ``minimum`` (the minimiser as a tuple, or None when the function is unbounded below);
    ``min_value`` (f at the minimiser, or None); ``window`` (``dim`` (low, high) plotting ranges);
    ``source`` (where it comes from). Subclasses implement ``_value(*coords)``,
    ``_grad(*coords)`` and ``_hess(*coords)`` (the rows of the Hessian) on the coordinate arrays.
    """

    name = ""
    dim = 2
    shape = None
    """The shape of a point as the optimizers see it (None: a vector of ``dim`` coordinates)."""
    formula = ""
    tex = ""
    source = ""

    def __init__(self, start, minimum, window, params=None):
        self.params = dict(params or {})
        self.start = tuple(float(v) for v in start)
        self.minimum = None if minimum is None else tuple(float(v) for v in minimum)
        self.window = tuple((float(lo), float(hi)) for lo, hi in window)
        with np.errstate(over="ignore", invalid="ignore"):
            self.min_value = None if self.minimum is None else float(self.value(self.minimum))
            at_start = float(self.value(self.start))
        numbers = [*self.start, *(self.minimum or ()), *(v for w in self.window for v in w)]
        numbers += [at_start] + ([] if self.min_value is None else [self.min_value])
        if not np.isfinite(numbers).all():
            given = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
            raise ValueError(
                f"{self.name} with {given or 'these parameters'}: its start, minimum or values "
                "are not finite in float64 (use smaller parameters)"
            )

    # -- evaluation
    def _coords(self, x):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 0 or x.shape[0] != self.dim:
            raise ValueError(
                f"{self.name} takes points of shape ({self.dim},) or ({self.dim}, ...), "
                f"got shape {x.shape}"
            )
        return tuple(x[i] for i in range(self.dim))

    def value(self, x):
        """f at ``x`` (shape ``(dim, *batch)``): an array of shape ``batch``."""
        return np.asarray(self._value(*self._coords(x)), dtype=np.float64)

    def grad(self, x):
        """The gradient at ``x`` (shape ``(dim, *batch)``), same shape as ``x``."""
        coords = self._coords(x)
        return np.stack([np.broadcast_to(g, coords[0].shape) for g in self._grad(*coords)])

    def hess(self, x):
        """The Hessian at ``x`` (shape ``(dim, *batch)``): shape ``(dim, dim, *batch)``."""
        coords = self._coords(x)
        return np.stack(
            [
                np.stack([np.broadcast_to(h, coords[0].shape) for h in row])
                for row in self._hess(*coords)
            ]
        )

    def __call__(self, x):
        return self.value(x)

    def _value(self, *coords):  # pragma: no cover - abstract
        raise NotImplementedError

    def _grad(self, *coords):  # pragma: no cover - abstract
        raise NotImplementedError

    def _hess(self, *coords):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def describe(self):
        """One line: name, formula, start, minimum."""
        where = (
            f"minimum {_fmt_point(self.minimum)} (f = {self.min_value:g})"
            if self.minimum is not None
            else "no minimum"
        )
        return f"{self.name}: f = {self.formula}; start {_fmt_point(self.start)}; {where}"


def _fmt_point(p):
    if p is None:
        return "none"
    return "(" + ", ".join(f"{v:g}" for v in p) + ")" if len(p) > 1 else f"{p[0]:g}"


class Square(Problem):
    """f(x) = x^2 (D2L 12.3.1: gradient descent with eta = 0.05, 0.2, 1.1 from x = 10)."""

    name = "square"
    dim = 1
    formula = "x^2"
    tex = r"$f(x) = x^2$"
    source = "D2L 12.3.1"

    def __init__(self):
        super().__init__(start=(10.0,), minimum=(0.0,), window=((-10.0, 10.0),))

    def _value(self, x):
        return x * x

    def _grad(self, x):
        return (2.0 * x,)

    def _hess(self, x):
        return ((2.0,),)


class Quadratic(Problem):
    """f(x) = a x1^2 + b x2^2, a, b > 0: a bowl, ill-conditioned when a/b is far from 1.

    ``quadratic`` (a=1, b=2) is D2L 12.3.2's multivariate gradient descent example; ``ellipse``
    (a=0.1, b=2) is the example of D2L 12.6-12.8 (momentum, Adagrad, RMSProp).
    """

    name = "quadratic"
    formula = "a x1^2 + b x2^2"
    source = "D2L 12.3.2 (a=1, b=2); 12.6-12.8 (a=0.1, b=2)"

    def __init__(self, a=1.0, b=2.0, name=None):
        self.a, self.b = _positive("a", a), _positive("b", b)
        if name is not None:
            self.name = name
        ca, cb = _coef(self.a), _coef(self.b)
        self.formula = f"{ca}x1^2 + {cb}x2^2"
        self.tex = rf"$f(x) = {ca}x_1^2 + {cb}x_2^2$"
        super().__init__(
            start=(-5.0, -2.0),
            minimum=(0.0, 0.0),
            window=((-5.5, 2.0), (-3.0, 3.0)),
            params={"a": self.a, "b": self.b},
        )

    def _value(self, x1, x2):
        return self.a * x1 * x1 + self.b * x2 * x2

    def _grad(self, x1, x2):
        return 2.0 * self.a * x1, 2.0 * self.b * x2

    def _hess(self, x1, x2):
        return (2.0 * self.a, 0.0), (0.0, 2.0 * self.b)


class Rosenbrock(Problem):
    """f(x, y) = (a - x)^2 + b (y - x^2)^2: a curved valley, minimum (a, a^2)."""

    name = "rosenbrock"
    source = "Rosenbrock 1960"

    def __init__(self, a=1.0, b=100.0):
        self.a, self.b = _finite("a", a), _positive("b", b)
        if not np.isfinite(self.a * self.a):
            raise ValueError(
                f"invalid a: {self.a:g} (the minimum (a, a^2) must be finite in float64: "
                "|a| < 1.34e154)"
            )
        self.formula = f"({self.a:g} - x)^2 + {self.b:g} (y - x^2)^2"
        self.tex = rf"$f(x, y) = ({self.a:g} - x)^2 + {self.b:g}\,(y - x^2)^2$"
        lo = min(-2.0, -abs(self.a) - 1)
        hi = max(2.0, abs(self.a) + 1)
        super().__init__(
            start=(-1.5, 2.0),
            minimum=(self.a, self.a * self.a),
            window=((lo, hi), (-1.0, max(3.0, self.a * self.a + 1))),
            params={"a": self.a, "b": self.b},
        )

    def _value(self, x, y):
        return (self.a - x) ** 2 + self.b * (y - x * x) ** 2

    def _grad(self, x, y):
        r = y - x * x
        return -2.0 * (self.a - x) - 4.0 * self.b * x * r, 2.0 * self.b * r

    def _hess(self, x, y):
        # d2f/dx2 = 2 - 4b (y - x^2) + 8b x^2, d2f/dxdy = -4b x, d2f/dy2 = 2b
        fxy = -4.0 * self.b * x
        return (2.0 - 4.0 * self.b * (y - x * x) + 8.0 * self.b * x * x, fxy), (fxy, 2.0 * self.b)


class Saddle(Problem):
    """f(x, y) = x^2 - y^2: a saddle point at the origin, unbounded below (D2L 12.1.2.2).

    From (2, 0.01) gradient descent first heads for the saddle along x, then escapes along y.
    """

    name = "saddle"
    formula = "x^2 - y^2"
    tex = r"$f(x, y) = x^2 - y^2$"
    source = "D2L 12.1.2.2"
    stationary = (0.0, 0.0)

    def __init__(self):
        super().__init__(start=(2.0, 0.01), minimum=None, window=((-2.5, 2.5), (-2.5, 2.5)))

    def _value(self, x, y):
        return x * x - y * y

    def _grad(self, x, y):
        return 2.0 * x, -2.0 * y

    def _hess(self, x, y):
        return (2.0, 0.0), (0.0, -2.0)


class Plateau(Problem):
    """f(x, y) = tanh(x)^2 + tanh(y)^2: a minimum at 0 inside plateaus where the gradient
    vanishes (D2L 12.1.2.3 on tanh). From (3.5, 2.75) plain gradient descent crawls (|grad| < 0.05)
    while methods that normalise the step (Adam, RMSProp) cross the plateau at once."""

    name = "plateau"
    formula = "tanh(x)^2 + tanh(y)^2"
    tex = r"$f(x, y) = \tanh^2 x + \tanh^2 y$"
    source = "D2L 12.1.2.3"

    def __init__(self):
        super().__init__(start=(3.5, 2.75), minimum=(0.0, 0.0), window=((-4.0, 4.0), (-4.0, 4.0)))

    def _value(self, x, y):
        return np.tanh(x) ** 2 + np.tanh(y) ** 2

    def _grad(self, x, y):
        tx, ty = np.tanh(x), np.tanh(y)
        return 2.0 * tx * (1.0 - tx * tx), 2.0 * ty * (1.0 - ty * ty)

    def _hess(self, x, y):
        # d/dx 2t(1 - t^2) with t = tanh x, dt/dx = 1 - t^2: 2(1 - t^2)(1 - 3t^2)
        tx, ty = np.tanh(x), np.tanh(y)
        hx = 2.0 * (1.0 - tx * tx) * (1.0 - 3.0 * tx * tx)
        hy = 2.0 * (1.0 - ty * ty) * (1.0 - 3.0 * ty * ty)
        return (hx, 0.0), (0.0, hy)


class MatrixLeastSquares(Problem):
    """f(X) = 0.5 ||A X - B||_F^2 over 2 x 2 matrices X (a point: X's entries, row-major), with
    A = R diag(1, 1/c) (R the rotation by 30 degrees: condition number ``c``) and B = A X*:
    the minimum 0 is at X* = [[1, -1], [0.5, 1]]. Gradient A^T (A X - B); Hessian
    kron(A^T A, I) in row-major order. Ill-conditioned for gradient descent; Muon's
    orthogonalized step ignores the conditioning of its update."""

    name = "matrix"
    dim = 4
    shape = (2, 2)
    source = "least squares over matrices (for Muon)"
    solution = ((1.0, -1.0), (0.5, 1.0))

    def __init__(self, c=10.0):
        self.c = _positive("c", c)
        t = np.pi / 6
        rotation = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        self.A = rotation @ np.diag([1.0, 1.0 / self.c])
        self.B = self.A @ np.array(self.solution)
        self.formula = f"0.5 ||A X - B||_F^2 (X 2x2, cond(A) = {self.c:g})"
        self.tex = rf"$f(X) = \frac{{1}}{{2}}\|AX - B\|_F^2$, cond(A) = {self.c:g}"
        super().__init__(
            start=(0.0, 0.0, 0.0, 0.0),
            minimum=np.ravel(self.solution),
            window=((-3.0, 3.0),) * 4,
            params={"c": self.c},
        )

    def _residual(self, coords):
        """A X - B of the points ``coords`` (dim arrays of the batch shape): (2, 2, *batch)."""
        x = np.stack(np.broadcast_arrays(*coords))
        X = x.reshape(self.shape + x.shape[1:])
        B = self.B.reshape(self.shape + (1,) * (x.ndim - 1))
        return np.einsum("ik,kj...->ij...", self.A, X) - B

    def _value(self, *coords):
        r = self._residual(coords)
        return 0.5 * (r * r).sum(axis=(0, 1))

    def _grad(self, *coords):
        g = np.einsum("ki,kj...->ij...", self.A, self._residual(coords))
        return tuple(g.reshape((self.dim,) + g.shape[2:]))

    def _hess(self, *coords):
        return tuple(tuple(row) for row in np.kron(self.A.T @ self.A, np.eye(self.shape[1])))


def _ellipse(a=0.1, b=2.0):
    return Quadratic(a, b, name="ellipse")


PROBLEMS = {
    "square": Square,
    "quadratic": Quadratic,
    "ellipse": _ellipse,
    "rosenbrock": Rosenbrock,
    "saddle": Saddle,
    "plateau": Plateau,
    "matrix": MatrixLeastSquares,
}
"""The registry of test functions, name -> factory(**params); ``fastopt playground`` and its
help read it. A new problem is added here once."""


def get_problem(name, **params):
    """The problem called ``name`` (see the table in the module docstring), built with ``params``.
    ValueError naming the known problems, or an unknown parameter; a parameter's value is checked
    by :mod:`fastopt.validation` (TypeError for a wrong type, ValueError for a wrong value)."""
    factory = PROBLEMS.get(str(name).lower())
    if factory is None:
        raise ValueError(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}")
    target = factory.__init__ if isinstance(factory, type) else factory
    allowed = [p for p in inspect.signature(target).parameters if p not in ("self", "name")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise ValueError(
            f"problem {name!r} has no parameter {unknown[0]!r}; its parameters: {known}"
        )
    return factory(**params)
