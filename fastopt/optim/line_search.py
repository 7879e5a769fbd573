"""Line searches: torch.optim.LBFGS's strong-Wolfe search and a backtracking (Armijo) search.

:func:`cubic_interpolate` and :func:`strong_wolfe` follow ``torch/optim/lbfgs.py`` (itself ported
from minFunc / ``torch/optim``'s ``lswolfe.lua``) statement for statement, so that
:class:`fastopt.optim.LBFGS` makes the same trial steps and the same number of function
evaluations as torch. The vectors are the caller's flat arrays; ``ops`` supplies the dot product,
the max-abs norm and the copies (``fastopt.kernels.vector`` on the CPU).
"""

import math

import numpy as np


class TensorScalar(float):
    """A step length that torch's LBFGS holds as a 0-d float64 tensor, not a Python float.

    torch's line search mixes the two: the slopes ``gtd`` are tensors, the losses floats, the step
    lengths either (the first ``t`` is a tensor when ``1 / sum|g|`` is below 1, an interpolated
    one is a tensor unless clamped to a float bound). They compute alike but for one division:
    ``float / tensor`` is ``tensor.reciprocal() * float`` in torch (two roundings), and a
    division by zero gives +-inf/NaN where a float division raises. This float carries the mark
    through ``+ - * /`` (with a float, an int or another one) so that :func:`cubic_interpolate`
    divides as torch does; everything else sees a float."""

    __slots__ = ()

    def __add__(self, other):
        return TensorScalar(float(self) + float(other))

    __radd__ = __add__

    def __sub__(self, other):
        return TensorScalar(float(self) - float(other))

    def __rsub__(self, other):
        return TensorScalar(float(other) - float(self))

    def __mul__(self, other):
        return TensorScalar(float(self) * float(other))

    __rmul__ = __mul__

    def __truediv__(self, other):
        return TensorScalar(_div(float(self), other))

    def __rtruediv__(self, other):
        return TensorScalar(_rdiv(other, float(self)))

    def __neg__(self):
        return TensorScalar(-float(self))

    def __abs__(self):
        return TensorScalar(abs(float(self)))

    def __repr__(self):
        return f"TensorScalar({float(self)!r})"


def cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """Minimiser of the cubic through ``(x1, f1)``, ``(x2, f2)`` with slopes ``g1``, ``g2``,
    clamped to ``bounds`` (default: the interval between the points); the midpoint when the
    cubic has no real minimiser (Nocedal & Wright, eq. 3.59).

    torch's ``_cubic_interpolate`` operation for operation, with torch's types (see
    :class:`TensorScalar`: the slopes and the minimiser are tensors, the losses floats, the
    points either): IEEE 754 float64, so a division by zero gives +-inf or NaN instead of raising
    (on a piecewise-linear objective the two slopes are equal and ``g2 - g1 + 2*d2`` is 0),
    ``3*(f1 - f2) / (x1 - x2)`` is a reciprocal times the numerator when a point is a tensor,
    ``d1**2`` is ``d1*d1`` (overflowing to inf), a NaN ``d2_square`` takes the midpoint, and the
    clamp is Python's ``min(max(...))``: an infinite minimiser is clamped to a bound, a NaN one
    comes back as NaN. The square root is the correctly rounded one (torch's CPU ``sqrt`` may
    differ in the last bit). Where torch's points are both Python floats and equal, torch
    raises ZeroDivisionError; this divides as IEEE does."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    dx = x1 - x2
    if isinstance(dx, TensorScalar):
        d1 = g1 + g2 - _rdiv(3 * (f1 - f2), float(dx))
    else:
        d1 = g1 + g2 - _div(3 * (f1 - f2), dx)
    d2_square = d1 * d1 - g1 * g2  # torch's d1**2 is d1*d1; a float's ** raises on overflow
    if d2_square >= 0:
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * _div(g2 + d2 - d1, g2 - g1 + 2 * d2)
        else:
            min_pos = x1 - (x1 - x2) * _div(g1 + d2 - d1, g1 - g2 + 2 * d2)
        return min(max(TensorScalar(min_pos), xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _div(a, b):
    """``a / b`` in IEEE 754 float64 (torch's tensor division): +-inf for a nonzero ``a`` over a
    signed zero, NaN for ``0/0`` and a NaN over zero; Python's float division raises there."""
    a, b = float(a), float(b)
    if b != 0.0:
        return a / b
    if a == 0.0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _rdiv(a, b):
    """torch's ``a / b`` for a Python float ``a`` and a 0-d tensor ``b``:
    ``b.reciprocal() * a`` (two roundings)."""
    return _div(1.0, b) * float(a)


def strong_wolfe(obj_func, t, d, f, g, gtd, ops, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """torch's ``_strong_wolfe``: a step ``t`` along ``d`` satisfying the strong Wolfe conditions
    ``f(t) <= f + c1*t*gtd`` and ``|g(t).d| <= -c2*gtd`` (bracketing, then zoom by cubic
    interpolation). ``obj_func(t)`` returns ``(loss, flat gradient)`` at ``x + t*d``; the gradient
    may be a buffer the next call overwrites (it is copied where it is kept, where torch clones).
    Returns ``(f_new, g_new, t, evaluations)``."""
    d_norm = ops.abs_max(d)
    g = ops.clone(g)
    f_new, g_new = obj_func(t)
    ls_func_evals = 1
    gtd_new = ops.dot(g_new, d)

    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, ops.clone(g_new)], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, ops.clone(g_new)], [gtd_prev, gtd_new]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = cubic_interpolate(
            t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step)
        )
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, ops.clone(g_new), gtd_new
        f_new, g_new = obj_func(t)
        ls_func_evals += 1
        gtd_new = ops.dot(g_new, d)
        ls_iter += 1

    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    # zoom: refine the bracket until a point satisfies the conditions
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = cubic_interpolate(
            bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1]
        )
        # a trial too close to an end of the bracket moves to 10% of its length inside it
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        f_new, g_new = obj_func(t)
        ls_func_evals += 1
        gtd_new = ops.dot(g_new, d)
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = ops.clone(g_new), gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos], bracket_gtd[low_pos] = ops.clone(g_new), gtd_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


def backtracking_armijo(f, x, fx, gx, direction, t0=1.0, rho=0.5, c1=1e-4, max_backtracks=50):
    """Backtracking line search (Nocedal & Wright, Algorithm 3.1): the first ``t = t0*rho^k``
    with ``f(x + t*p) <= f(x) + c1*t*(g.p)`` (the Armijo sufficient-decrease condition).
    ``f`` maps a point (NumPy array) to a float. Returns ``(t, evaluations)``; ``t`` is the last
    trial when ``max_backtracks`` trials all fail."""
    x, gx, p = np.asarray(x, float), np.asarray(gx, float), np.asarray(direction, float)
    slope = float(gx @ p)
    t = t0
    for k in range(1, max_backtracks + 1):
        if f(x + t * p) <= fx + c1 * t * slope:
            return t, k
        if k < max_backtracks:
            t *= rho
    return t, max_backtracks
