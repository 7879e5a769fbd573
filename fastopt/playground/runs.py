"""Optimizer runs on a test function (:class:`Trajectory`) and the presets of the textbook."""

import math
from dataclasses import dataclass

import numpy as np

from ..problems import PROBLEMS
from .specs import parse_optimizer


@dataclass
class Trajectory:
    """One optimizer run: ``points`` (steps+1, dim) starting at the start point, ``values`` f at
    each point, ``diverged`` when a point became non-finite (the run stops there)."""

    label: str
    optimizer: str
    kwargs: dict
    points: np.ndarray
    values: np.ndarray
    diverged: bool


def run(problem, spec, steps=20, start=None):
    """Run ``spec`` (an OptimizerSpec or a spec string) on ``problem`` for ``steps`` steps from
    ``start`` (default ``problem.start``); returns a :class:`Trajectory`. On a problem whose
    points are matrices (``problem.shape``, e.g. ``matrix``) the optimizers step the point's
    matrix view, so Muon runs there; on the vector problems Muon is a ValueError saying so."""
    if isinstance(spec, str):
        spec = parse_optimizer(spec)
    if getattr(spec.cls, "matrices_only", False) and problem.shape is None:
        matrix = [n for n, f in PROBLEMS.items() if getattr(f, "shape", None) is not None]
        raise ValueError(
            f"{spec.name} steps matrices only and a point of {problem.name} is a vector of "
            f"{problem.dim} coordinate(s); use a matrix problem ({', '.join(matrix)})"
        )
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    x0 = np.array(problem.start if start is None else start, dtype=np.float64)
    if x0.shape != (problem.dim,):
        raise ValueError(
            f"{problem.name} takes a start point of {problem.dim} coordinate(s), got {x0.size}"
        )
    if not np.isfinite(x0).all():
        raise ValueError("the start point must be finite")
    x = x0.copy()
    view = x  # what the optimizer steps: the point, or its matrix view (the same memory)
    if problem.shape is not None and not hasattr(spec.cls, "step_on"):
        view = x.reshape(problem.shape)
    opt = spec.build([view])
    points, values = [x.copy()], [float(problem.value(x))]
    diverged = False
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            _one_step(opt, problem, x, view.shape)
            fx = float(problem.value(x))
            if not (np.isfinite(x).all() and math.isfinite(fx)):
                diverged = True
                break
            points.append(x.copy())
            values.append(fx)
    return Trajectory(
        spec.label, spec.name, dict(spec.kwargs), np.array(points), np.array(values), diverged
    )


def _one_step(opt, problem, x, shape):
    """One step of ``opt`` on ``problem`` at ``x`` (updated in place), whose parameter has
    ``shape``: a playground method's ``step_on``, a closure step (L-BFGS: one ``step()``, up to
    its ``max_iter`` iterations; the presets use ``max_iter=1``, one iteration per point), or a
    gradient step."""
    if hasattr(opt, "step_on"):
        opt.step_on(problem)
    elif opt.requires_closure:
        opt.step(lambda: (float(problem.value(x)), [problem.grad(x).reshape(shape)]))
    else:
        opt.step([problem.grad(x).reshape(shape)])


def run_start(problem, runs):
    """The start point the ``runs`` share (their first point), or ``problem.start`` when there
    is no run or they start at different points."""
    firsts = {tuple(float(v) for v in r.points[0]) for r in runs if len(r.points)}
    return firsts.pop() if len(firsts) == 1 else tuple(problem.start)


def trajectories_json(problem, runs, steps, start=None):
    """A JSON-serialisable dict of runs: problem {name, formula, params, start, minimum,
    min_value}, steps, and runs [{label, optimizer, kwargs, points, values, diverged}].
    ``start``: the start point the runs used (default: the one they share,
    :func:`run_start`)."""
    start = run_start(problem, runs) if start is None else start
    return {
        "problem": {
            "name": problem.name,
            "formula": problem.formula,
            "params": problem.params,
            "start": [float(v) for v in start],
            "minimum": None if problem.minimum is None else list(problem.minimum),
            "min_value": problem.min_value,
        },
        "steps": steps,
        "runs": [
            {
                "label": r.label,
                "optimizer": r.optimizer,
                "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in r.kwargs.items()},
                "points": r.points.tolist(),
                "values": r.values.tolist(),
                "diverged": r.diverged,
            }
            for r in runs
        ],
    }


@dataclass(frozen=True)
class Preset:
    problem: str
    optimizers: tuple
    steps: int
    text: str
    start: tuple | None = None


PRESETS = {
    "gd-lr": Preset(
        "square",
        ("sgd:lr=0.05", "sgd:lr=0.2", "sgd:lr=1.1"),
        10,
        "D2L 12.3.1: gradient descent on x^2 from 10; eta 0.05 is slow, 0.2 converges, 1.1 diverges",
    ),
    "momentum": Preset(
        "ellipse",
        ("sgd:lr=0.4", "sgd:lr=0.6,momentum=0.25", "sgd:lr=0.6,momentum=0.5"),
        20,
        "D2L 12.6: on 0.1 x1^2 + 2 x2^2, gradient descent (eta 0.4) crawls along x1; momentum "
        "0.25 and 0.5 with eta 0.6 (where plain GD would diverge in x2)",
    ),
    "adaptive": Preset(
        "ellipse",
        ("adagrad:lr=0.4", "rmsprop:lr=0.4,alpha=0.9", "adam:lr=0.4"),
        20,
        "D2L 12.7-12.10: Adagrad, RMSProp (gamma 0.9) and Adam, eta 0.4, on 0.1 x1^2 + 2 x2^2 "
        "from (-5, -2)",
    ),
    "curvature": Preset(
        "ellipse",
        (
            "gd:lr=0.4",
            "sgd:lr=0.6,momentum=0.5",
            "newton",
            "lbfgs:max_iter=1,history_size=10",
        ),
        20,
        "What curvature buys on 0.1 x1^2 + 2 x2^2 (condition number 20): gradient descent, "
        "momentum, Newton (one step) and L-BFGS (one iteration per step)",
    ),
    "curvature-rosenbrock": Preset(
        "rosenbrock",
        (
            "gd:lr=0.001",
            "sgd:lr=0.0005,momentum=0.9",
            "newton",
            "lbfgs:max_iter=1,max_eval=25,history_size=10,line_search_fn=strong_wolfe",
        ),
        100,
        "The same on Rosenbrock's curved valley: gradient descent and momentum crawl, damped "
        "Newton and L-BFGS (strong Wolfe) reach the minimum",
    ),
    "armijo": Preset(
        "rosenbrock",
        ("gd:lr=0.001", "gd:lr=0.0025", "armijo:lr=1"),
        200,
        "Backtracking (Armijo) line search for gradient descent on Rosenbrock: a fixed lr is "
        "slow (0.001) or diverges (0.0025); backtracking from t = 1 picks a length per step",
    ),
}
