"""Optimizer trajectories on small test functions, and learning-rate schedule plots.

The library behind ``fastopt playground``::

    from fastopt import playground, problems
    p = problems.get_problem("ellipse")
    runs = [playground.run(p, playground.parse_optimizer(s), steps=20)
            for s in ("sgd:lr=0.4", "sgd:lr=0.6,momentum=0.5")]
    playground.plot_trajectories(p, runs, "momentum.png")

Specs are ``NAME`` or ``NAME:key=value,key=value``: values are Python literals (numbers,
``true``/``false``, ``none``, tuples such as ``betas=(0.9,0.99)``) or, failing that, plain strings.
Every optimizer of fastopt runs (``sgd``, ``adam``, ``adamw``, ``adagrad``, ``rmsprop``,
``adadelta``, ``adamax``, ``nadam``, ``radam``, ``rprop``, ``yogi``, ``lion``; ``gd`` is ``sgd``)
with its own keyword arguments, on a float64 NumPy array of the problem's dimension.
"""

import ast
import dataclasses
import inspect
import math
from dataclasses import dataclass

import numpy as np

from . import problems as _problems
from . import schedules as _schedules

__all__ = [
    "OPTIMIZERS",
    "PRESETS",
    "SCHEDULE_NAMES",
    "OptimizerSpec",
    "Preset",
    "Trajectory",
    "default_schedules",
    "parse_optimizer",
    "parse_problem",
    "parse_schedule",
    "parse_spec",
    "plot_schedules",
    "plot_trajectories",
    "run",
    "trajectories_json",
]

FIGURE_DPI = 100
TRAJECTORY_SIZE_PX = (1200, 500)
"""(width, height) in pixels of :func:`plot_trajectories`' PNG."""
SCHEDULE_PANEL_PX = (400, 260)
"""(width, height) in pixels of one panel of :func:`plot_schedules` (3 panels per row)."""
SCHEDULE_COLUMNS = 3


# --------------------------------------------------------------------------------- specs
def _split_top_level(text, sep=","):
    """Split on ``sep`` outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced {ch!r}")
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if depth or quote:
        raise ValueError("unbalanced brackets or quotes")
    parts.append("".join(cur))
    return parts


def _literal(text):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if low in ("inf", "+inf", "-inf", "nan"):
        return float(low)
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text.strip()  # a plain string, e.g. anneal_strategy=linear
    if isinstance(value, list):
        value = tuple(value)
    return value


def parse_spec(text, what="spec"):
    """``"name:k=v,k2=v2"`` -> ``("name", {"k": v, "k2": v2})``. ValueError with a readable
    message (naming ``what``) for an empty name, a missing ``=``, an empty or repeated key."""
    text = str(text).strip()
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"{what} {text!r} has no name (expected NAME or NAME:key=value,...)")
    kwargs = {}
    if sep and rest.strip():
        try:
            items = _split_top_level(rest)
        except ValueError as exc:
            raise ValueError(f"{what} {text!r}: {exc}") from None
        for item in items:
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise ValueError(
                    f"{what} {text!r}: {item.strip()!r} is not key=value "
                    f"(expected NAME:key=value,key=value)"
                )
            if not key.isidentifier():
                raise ValueError(f"{what} {text!r}: {key!r} is not a valid key")
            if key in kwargs:
                raise ValueError(f"{what} {text!r}: {key!r} given twice")
            kwargs[key] = _literal(value)
    elif sep:
        raise ValueError(f"{what} {text!r}: nothing after ':' (expected NAME:key=value,...)")
    return name, kwargs


def _optimizers():
    import fastopt

    names = (
        "SGD",
        "Adam",
        "AdamW",
        "Adagrad",
        "RMSprop",
        "Adadelta",
        "Adamax",
        "NAdam",
        "RAdam",
        "Rprop",
        "Yogi",
        "Lion",
    )
    table = {n.lower(): getattr(fastopt, n) for n in names}
    table["gd"] = fastopt.SGD
    return table


OPTIMIZERS = tuple(n.lower() for n in ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta"))
OPTIMIZERS += ("adamax", "nadam", "radam", "rprop", "yogi", "lion")
"""Optimizer names accepted by :func:`parse_optimizer` (plus ``gd`` for ``sgd``)."""

_BASE_OPTIONS = ("backend", "max_grad_norm", "max_grad_value", "skip_nonfinite")


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer class with its keyword arguments and a label for plots."""

    name: str
    cls: type
    kwargs: dict
    label: str

    def build(self, params):
        return self.cls(params, **self.kwargs)


def parse_optimizer(text):
    """``"sgd:lr=0.4,momentum=0.5"`` -> OptimizerSpec, checked by building the optimizer on a
    dummy array (so a bad name, key or value fails here, with a ValueError saying what)."""
    name, kwargs = parse_spec(text, "optimizer")
    table = _optimizers()
    cls = table.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)} (gd = sgd)")
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    allowed = [p for p in params if p != "options"] + list(_BASE_OPTIONS)
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"optimizer {name!r} has no argument {key!r}; its arguments: {', '.join(allowed)}"
            )
    try:
        cls(np.zeros(2), **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"optimizer {text!r}: {exc}") from None
    label = name.lower() + (
        " " + ", ".join(f"{k}={_fmt(v)}" for k, v in kwargs.items()) if kwargs else ""
    )
    return OptimizerSpec(name.lower(), cls, kwargs, label)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return str(v)


def parse_problem(text):
    """``"quadratic:a=1,b=4"`` -> a :class:`fastopt.problems.Problem` (ValueError if bad)."""
    name, kwargs = parse_spec(text, "problem")
    try:
        return _problems.get_problem(name, **kwargs)
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(
            msg if msg.startswith(("unknown", "problem")) else f"problem {text!r}: {msg}"
        ) from None


# --------------------------------------------------------------------------------- runs
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
    ``start`` (default ``problem.start``); returns a :class:`Trajectory`."""
    if isinstance(spec, str):
        spec = parse_optimizer(spec)
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
    opt = spec.build([x])
    points, values = [x.copy()], [float(problem.value(x))]
    diverged = False
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            opt.step([problem.grad(x)])
            fx = float(problem.value(x))
            if not (np.isfinite(x).all() and math.isfinite(fx)):
                diverged = True
                break
            points.append(x.copy())
            values.append(fx)
    return Trajectory(
        spec.label, spec.name, dict(spec.kwargs), np.array(points), np.array(values), diverged
    )


def trajectories_json(problem, runs, steps):
    """A JSON-serialisable dict of runs: problem {name, formula, params, start, minimum,
    min_value}, steps, and runs [{label, optimizer, kwargs, points, values, diverged}]."""
    return {
        "problem": {
            "name": problem.name,
            "formula": problem.formula,
            "params": problem.params,
            "start": list(problem.start),
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


# --------------------------------------------------------------------------------- presets
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
}


# --------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _window(problem, runs):
    """Plot ranges: the problem's window grown to show the trajectories (at most 3x its size)."""
    out = []
    for d, (lo, hi) in enumerate(problem.window):
        span = hi - lo
        vals = np.concatenate([r.points[:, d] for r in runs]) if runs else np.array([])
        if vals.size:
            lo = max(min(lo, vals.min()), lo - span)
            hi = min(max(hi, vals.max()), hi + span)
        pad = 0.04 * (hi - lo)
        out.append((lo - pad, hi + pad))
    return out


def _levels(z, n=24):
    z = z[np.isfinite(z)]
    levels = np.unique(np.quantile(z, np.linspace(0.0, 1.0, n + 2)[1:-1] ** 1.5))
    return levels if levels.size >= 2 else n


def plot_trajectories(problem, runs, path, title=None):
    """PNG of ``runs`` (Trajectories) on ``problem``: left, the function's contours (or its curve
    for one variable) with each trajectory; right, f per step (log scale, as f - f*, when the
    minimum is known). Size :data:`TRAJECTORY_SIZE_PX`. Needs matplotlib."""
    plt = _pyplot()
    w, h = TRAJECTORY_SIZE_PX
    fig = plt.figure(figsize=(w / FIGURE_DPI, h / FIGURE_DPI), dpi=FIGURE_DPI)
    grid = fig.add_gridspec(1, 2, width_ratios=[1.25, 1])
    ax_loss = fig.add_subplot(grid[0, 1])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if problem.dim == 1:
        # One small panel per run, each over the range its points cover (as D2L's show_trace):
        # a diverging run would squash the others into a dot.
        cells = grid[0, 0].subgridspec(1, max(1, len(runs)), wspace=0.35)
        for i, r in enumerate(runs or [None]):
            ax = fig.add_subplot(cells[0, i])
            pts = r.points[:, 0] if r is not None else np.array(problem.window[0])
            reach = max(np.abs(pts).max(), 1e-3) * 1.08
            xs = np.linspace(-reach, reach, 400)
            ax.plot(xs, problem.value(xs[None, :]), color="0.5", lw=1.5)
            if r is not None:
                c = colors[i % len(colors)]
                ax.plot(r.points[:, 0], r.values, "-o", color=c, ms=4, lw=1)
                ax.set_title(r.label, fontsize=9, color=c)
            if problem.minimum is not None:
                ax.plot(problem.minimum, [problem.min_value], "*", color="k", ms=10)
            ax.set_xlabel("x")
            ax.tick_params(labelsize=8)
            if i == 0:
                ax.set_ylabel(f"f(x) = {problem.formula}")
    else:
        ax = fig.add_subplot(grid[0, 0])
        (xlo, xhi), (ylo, yhi) = _window(problem, runs)
        gx, gy = np.meshgrid(np.linspace(xlo, xhi, 240), np.linspace(ylo, yhi, 200))
        z = problem.value(np.stack([gx, gy]))
        ax.contour(gx, gy, z, levels=_levels(z), cmap="viridis", linewidths=0.8)
        for i, r in enumerate(runs):
            c = colors[i % len(colors)]
            ms = 3 if len(r.points) <= 80 else 0
            ax.plot(r.points[:, 0], r.points[:, 1], "-o", color=c, ms=ms, lw=1.2, label=r.label)
        ax.plot(*problem.start, "s", color="k", ms=6, label="start")
        if problem.minimum is not None:
            ax.plot(*problem.minimum, "*", color="k", ms=12, label="minimum")
        stationary = getattr(problem, "stationary", None)
        if stationary is not None:
            ax.plot(*stationary, "x", color="k", ms=9, label="saddle point")
        ax.set_xlim(xlo, xhi)
        ax.set_ylim(ylo, yhi)
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
        ax.set_title(problem.tex or problem.formula, fontsize=11)
        ax.legend(fontsize=8, loc="best")

    fstar = problem.min_value
    log = fstar is not None and all((r.values - fstar > 0).all() for r in runs if r.values.size)
    for i, r in enumerate(runs):
        c = colors[i % len(colors)]
        y = r.values - fstar if log else r.values
        if log:
            y = np.maximum(y, 1e-300)
        ms = 3 if len(y) <= 80 else 0
        ax_loss.plot(
            np.arange(len(y)),
            y,
            "-o",
            color=c,
            ms=ms,
            lw=1.2,
            label=r.label + (" (diverged)" if r.diverged else ""),
        )
    if log:
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("f(x) - f*")
    else:
        ax_loss.set_ylabel("f(x)")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("loss per step", fontsize=11)
    ax_loss.grid(alpha=0.3, which="both")
    ax_loss.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI, format="png")
    plt.close(fig)
    return w, h


# --------------------------------------------------------------------------------- schedules
SCHEDULE_NAMES = {
    name.lower(): name
    for name in (
        "Constant",
        "StepDecay",
        "MultiStepDecay",
        "ExponentialDecay",
        "PolynomialDecay",
        "InverseTimeDecay",
        "InverseSqrt",
        "CosineAnnealing",
        "CosineAnnealingWarmRestarts",
        "OneCycle",
        "PiecewiseConstant",
    )
}
"""Schedules a ``--schedule`` spec can name (case-insensitive), plus the aliases below."""
SCHEDULE_ALIASES = {
    "step": "StepDecay",
    "multistep": "MultiStepDecay",
    "exponential": "ExponentialDecay",
    "exp": "ExponentialDecay",
    "polynomial": "PolynomialDecay",
    "inversetime": "InverseTimeDecay",
    "rsqrt": "InverseSqrt",
    "cosine": "CosineAnnealing",
    "sgdr": "CosineAnnealingWarmRestarts",
    "onecycle": "OneCycle",
    "piecewise": "PiecewiseConstant",
}


def parse_schedule(text, steps=100):
    """A schedule from ``NAME:k=v,...`` (class name of :mod:`fastopt.schedules`, any case, or an
    alias such as ``cosine``, ``step``, ``onecycle``, ``sgdr``). Two extra keys: ``warmup=W``
    puts a linear warmup of W steps (from 0) in front, ``per_epoch=E`` advances it once per E
    steps. Required step counts default from ``steps`` (``T_max``, ``total_steps``,
    ``total_iters``). A JSON object (``{"type": "Warmup", ...}``, as ``Schedule.to_dict``
    writes) is accepted too. ValueError with a readable message otherwise."""
    text = str(text).strip()
    if text.startswith("{"):
        import json

        try:
            return _schedules.schedule_from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"schedule {text!r}: not valid JSON ({exc.msg})") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"schedule {text!r}: {exc}") from None
    name, kwargs = parse_spec(text, "schedule")
    key = name.lower().replace("_", "").replace("-", "")
    cls_name = SCHEDULE_NAMES.get(key) or SCHEDULE_ALIASES.get(key)
    if cls_name is None:
        known = sorted(set(SCHEDULE_NAMES.values())) + sorted(SCHEDULE_ALIASES)
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(known)}")
    cls = getattr(_schedules, cls_name)
    warm = kwargs.pop("warmup", None)
    per_epoch = kwargs.pop("per_epoch", None)
    fields = {f.name for f in dataclasses.fields(cls)} | {
        n for n, p in inspect.signature(cls).parameters.items()
    }
    for k in kwargs:
        if k not in fields:
            raise ValueError(
                f"schedule {cls_name} has no argument {k!r}; its arguments: "
                f"{', '.join(sorted(fields))}, warmup, per_epoch"
            )
    defaults = {"T_max": steps, "total_steps": steps, "total_iters": steps}
    if cls is _schedules.StepDecay:
        defaults["step_size"] = max(1, steps // 4)
    if cls is _schedules.CosineAnnealingWarmRestarts:
        defaults["T_0"] = max(1, steps // 4)
    if cls is _schedules.MultiStepDecay:
        defaults["milestones"] = (steps // 2, 3 * steps // 4)
    if cls is _schedules.InverseTimeDecay:
        defaults["rate"] = 10.0 / max(1, steps)
    if cls is _schedules.ExponentialDecay and "rate" not in kwargs:
        defaults["gamma"] = 0.01 ** (1.0 / max(1, steps))
    for k, v in defaults.items():
        if k in fields and k not in kwargs and k not in ("epochs", "steps_per_epoch"):
            kwargs[k] = v
    if "lr" in fields and "lr" not in kwargs:
        kwargs["lr"] = 0.1
    if "max_lr" in fields and "max_lr" not in kwargs:
        kwargs["max_lr"] = 0.1
    try:
        sched = cls(**kwargs)
        if warm is not None:
            sched = _schedules.warmup(sched, warm, 0.0)
        if per_epoch is not None:
            sched = _schedules.PerEpoch(sched, per_epoch)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"schedule {text!r}: {exc}") from None
    return sched


def default_schedules(steps=100):
    """The gallery of ``fastopt playground --schedules``: (label, schedule) pairs over
    ``steps`` steps, lr 0.1."""
    n = max(int(steps), 8)
    s = _schedules
    return [
        ("Constant(0.1)", s.Constant(0.1)),
        (f"StepDecay(step_size={n // 4}, gamma=0.5)", s.StepDecay(0.1, n // 4, 0.5)),
        (
            f"MultiStepDecay(milestones=({n // 2}, {3 * n // 4}))",
            s.MultiStepDecay(0.1, (n // 2, 3 * n // 4)),
        ),
        (f"ExponentialDecay(rate={4 / n:g})", s.ExponentialDecay(0.1, rate=4.0 / n)),
        ("PolynomialDecay(power=2)", s.PolynomialDecay(0.1, total_iters=n, power=2.0)),
        (f"InverseSqrt(timescale={max(1, n // 20)})", s.InverseSqrt(0.1, max(1, n // 20))),
        (f"CosineAnnealing(T_max={n})", s.CosineAnnealing(0.1, n)),
        (
            f"CosineAnnealingWarmRestarts(T_0={max(1, n // 7)}, T_mult=2)",
            s.CosineAnnealingWarmRestarts(0.1, max(1, n // 7), 2),
        ),
        (f"OneCycle(total_steps={n})", s.OneCycle(0.1, total_steps=n)),
        (
            f"warmup({n // 10}) + CosineAnnealing",
            s.warmup(s.CosineAnnealing(0.1, n - n // 10), n // 10, 0.0),
        ),
        (
            "PiecewiseConstant",
            s.PiecewiseConstant((n // 3, 2 * n // 3), (0.1, 0.05, 0.01)),
        ),
        (
            f"InverseTimeDecay(rate={10 / n:g})",
            s.InverseTimeDecay(0.1, 10.0 / n),
        ),
    ]


def schedule_label(sched):
    """A short readable label: the class name and its arguments (nested schedules abbreviated)."""
    if not dataclasses.is_dataclass(sched):
        return repr(sched)
    args = []
    for f in dataclasses.fields(sched):
        v = getattr(sched, f.name)
        if isinstance(v, _schedules.Schedule):
            v = type(v).__name__
        elif isinstance(v, float):
            v = f"{v:g}"
        elif isinstance(v, tuple):
            v = "(" + ", ".join(type(x).__name__ if callable(x) else f"{x:g}" for x in v) + ")"
        args.append(f"{f.name}={v}")
    text = f"{type(sched).__name__}({', '.join(args)})"
    return text if len(text) <= 60 else text[:57] + "..."


def schedule_values(sched, steps):
    return np.array([sched(k) for k in range(int(steps))], dtype=np.float64)


def schedules_size(count):
    """(width, height) in pixels of :func:`plot_schedules`' PNG for ``count`` schedules."""
    cols = min(SCHEDULE_COLUMNS, max(1, count))
    rows = max(1, -(-count // SCHEDULE_COLUMNS))
    return SCHEDULE_PANEL_PX[0] * cols, SCHEDULE_PANEL_PX[1] * rows


def plot_schedules(items, steps, path):
    """PNG of the learning rate of each (label, schedule) for steps 0..steps-1, one panel each,
    3 per row; size :func:`schedules_size`. Needs matplotlib."""
    plt = _pyplot()
    w, h = schedules_size(len(items))
    cols = min(SCHEDULE_COLUMNS, max(1, len(items)))
    rows = max(1, -(-len(items) // SCHEDULE_COLUMNS))
    fig, axes = plt.subplots(
        rows, cols, figsize=(w / FIGURE_DPI, h / FIGURE_DPI), dpi=FIGURE_DPI, squeeze=False
    )
    k = np.arange(int(steps))
    for i, ax in enumerate(axes.flat):
        if i >= len(items):
            ax.axis("off")
            continue
        label, sched = items[i]
        ax.plot(k, schedule_values(sched, steps), lw=1.5)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("step k", fontsize=8)
        ax.set_ylabel("lr", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI, format="png")
    plt.close(fig)
    return w, h
