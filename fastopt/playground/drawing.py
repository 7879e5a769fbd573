"""The playground's pictures: trajectories over a test function's contours, loss per step, and
learning-rate schedules. Needs matplotlib (imported on first use)."""

import numpy as np

from ..fileio import atomic_write
from .schedule_specs import schedule_values

FIGURE_DPI = 100
TRAJECTORY_SIZE_PX = (1200, 500)
"""(width, height) in pixels of :func:`plot_trajectories`' PNG."""
SCHEDULE_PANEL_PX = (400, 260)
"""(width, height) in pixels of one panel of :func:`plot_schedules` (3 panels per row)."""
SCHEDULE_COLUMNS = 3


def _window(problem, runs, shown):
    """Plot ranges: the problem's window grown to show the trajectories' points on the chart
    (at most 3x its size)."""
    out = []
    for d, (lo, hi) in enumerate(problem.window):
        span = hi - lo
        parts = [r.points[:k, d] for r, k in zip(runs, shown)]
        vals = np.concatenate(parts) if parts else np.array([])
        vals = vals[np.isfinite(vals)]
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


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, title=None):
    """Lay out ``fig`` (with ``title`` on top), write it to ``path`` as PNG and close it."""
    plt = pyplot()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=FIGURE_DPI, format="png")
    plt.close(fig)


LOSS_CEILING = 1e12
"""A diverging run's loss is drawn clipped at this many times the largest starting loss (a
curve up to 1e300 would leave the log-scale panel empty); its legend says so."""


def _ceiling(problem, runs):
    fstar = problem.min_value or 0.0
    starts = [abs(float(r.values[0]) - fstar) for r in runs if r.values.size]
    starts = [v for v in starts if np.isfinite(v)]
    return LOSS_CEILING * max([1.0, *starts])


def _on_chart(r, fstar, ceiling):
    """How many leading points of run ``r`` have a finite f within ``ceiling`` of f*."""
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.isfinite(r.values) & (np.abs(r.values - fstar) <= ceiling)
        ok &= np.isfinite(r.points).all(axis=1)
    return int(np.argmin(ok)) if not ok.all() else len(ok)


def _run_label(r, shown, sep=" "):
    """The run's label, saying when it diverged and where its points leave the chart."""
    notes = []
    if r.diverged:
        notes.append(f"diverged after {len(r.values) - 1} steps")
    if shown < len(r.values):
        notes.append(f"clipped from step {shown}")
    return r.label + (f"{sep}({'; '.join(notes)})" if notes else "")


def plot_trajectories(problem, runs, path, title=None):
    """PNG of ``runs`` (Trajectories) on ``problem``: left, the function's contours (or its curve
    for one variable) with each trajectory; right, f per step (log scale, as f - f*, when the
    minimum is known). A problem of more than 2 variables (``matrix``) has the loss panel only. A diverging run is drawn until it leaves the chart (f beyond
    :data:`LOSS_CEILING` times the largest starting loss, or non-finite), its loss clipped
    there, and its legend says "diverged". Size :data:`TRAJECTORY_SIZE_PX`. Needs matplotlib."""
    plt = pyplot()
    w, h = TRAJECTORY_SIZE_PX
    fig = plt.figure(figsize=(w / FIGURE_DPI, h / FIGURE_DPI), dpi=FIGURE_DPI)
    grid = fig.add_gridspec(1, 2, width_ratios=[1.25, 1])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fstar = 0.0 if problem.min_value is None else problem.min_value
    ceiling = _ceiling(problem, runs)
    shown = [_on_chart(r, fstar, ceiling) for r in runs]
    with np.errstate(over="ignore", invalid="ignore"):
        if problem.dim > 2:  # no picture of the point: the loss over the whole figure
            loss_axes = fig.add_subplot(grid[0, :])
        else:
            if problem.dim == 1:
                _draw_curves(fig, grid[0, 0], problem, runs, shown, colors)
            else:
                _draw_contours(fig.add_subplot(grid[0, 0]), problem, runs, shown, colors)
            loss_axes = fig.add_subplot(grid[0, 1])
        _draw_losses(loss_axes, problem, runs, shown, ceiling, colors)
    save_figure(fig, path, title)
    return w, h


def _draw_curves(fig, cell, problem, runs, shown, colors):
    """One small panel per run, each over the range its points cover (as D2L's show_trace): a
    diverging run would squash the others into a dot."""
    cells = cell.subgridspec(1, max(1, len(runs)), wspace=0.35)
    for i, r in enumerate(runs or [None]):
        ax = fig.add_subplot(cells[0, i])
        if r is not None:
            pts = r.points[: max(shown[i], 1), 0]
        else:
            pts = np.array(problem.window[0])
        reach = max(np.abs(pts).max(), 1e-3) * 1.08
        xs = np.linspace(-reach, reach, 400)
        ax.plot(xs, problem.value(xs[None, :]), color="0.5", lw=1.5)
        if r is not None:
            c = colors[i % len(colors)]
            ax.plot(pts, r.values[: pts.size], "-o", color=c, ms=4, lw=1)
            ax.set_title(_run_label(r, shown[i], "\n"), fontsize=9, color=c)
        if problem.minimum is not None:
            ax.plot(problem.minimum, [problem.min_value], "*", color="k", ms=10)
        ax.set_xlabel("x")
        ax.tick_params(labelsize=8)
        if i == 0:
            ax.set_ylabel(f"f(x) = {problem.formula}")


def _draw_contours(ax, problem, runs, shown, colors):
    (xlo, xhi), (ylo, yhi) = _window(problem, runs, shown)
    gx, gy = np.meshgrid(np.linspace(xlo, xhi, 240), np.linspace(ylo, yhi, 200))
    z = problem.value(np.stack([gx, gy]))
    ax.contour(gx, gy, z, levels=_levels(z), cmap="viridis", linewidths=0.8)
    for i, r in enumerate(runs):
        c = colors[i % len(colors)]
        # one point past the chart: the line leaves it in the direction the run went
        pts = r.points[: shown[i] + 1]
        pts = pts[np.isfinite(pts).all(axis=1)]
        ms = 3 if len(pts) <= 80 else 0
        label = _run_label(r, shown[i])
        ax.plot(pts[:, 0], pts[:, 1], "-o", color=c, ms=ms, lw=1.2, label=label)
    # where the runs started (a --start point), else the problem's start
    starts = {tuple(r.points[0]) for r in runs if len(r.points)} or {tuple(problem.start)}
    for k, point in enumerate(sorted(starts)):
        ax.plot(*point, "s", color="k", ms=6, label="start" if k == 0 else None)
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


def _draw_losses(ax, problem, runs, shown, ceiling, colors):
    """f per step, as f - f* on a log scale when the minimum is known and no drawn value is
    below it (values equal to f* drawn at 1% of the smallest positive gap); values past the
    chart clipped at the ceiling, non-finite ones left out."""
    fstar = problem.min_value
    curves = []
    for r in runs:
        y = np.array(r.values, dtype=np.float64)
        y[~np.isfinite(y)] = np.nan
        curves.append(y)
    log = fstar is not None and all(
        (y[np.isfinite(y)] - fstar >= 0).all() for y in curves if np.isfinite(y).any()
    )
    if log:  # a run that hits f* exactly (Newton on a quadratic) drops to a floor below the rest
        gaps = np.concatenate([y[np.isfinite(y)] - fstar for y in curves] or [np.zeros(0)])
        positive = gaps[gaps > 0]
        log = positive.size > 0
        floor = positive.min() * 1e-2 if log else 0.0
    for i, (r, y) in enumerate(zip(runs, curves)):
        c = colors[i % len(colors)]
        if log:
            y = np.clip(y - fstar, floor, ceiling)
        else:
            y = np.clip(y, -ceiling, ceiling)
        ms = 3 if len(y) <= 80 else 0
        ax.plot(np.arange(len(y)), y, "-o", color=c, ms=ms, lw=1.2, label=_run_label(r, shown[i]))
    if log:
        ax.set_yscale("log")
        ax.set_ylabel("f(x) - f*")
    else:
        ax.set_ylabel("f(x)")
    ax.set_xlabel("step")
    ax.set_title("loss per step" if problem.dim <= 2 else problem.tex, fontsize=11)
    ax.grid(alpha=0.3, which="both")
    if runs:
        ax.legend(fontsize=8, loc="best")


def schedules_size(count):
    """(width, height) in pixels of :func:`plot_schedules`' PNG for ``count`` schedules."""
    cols = min(SCHEDULE_COLUMNS, max(1, count))
    rows = max(1, -(-count // SCHEDULE_COLUMNS))
    return SCHEDULE_PANEL_PX[0] * cols, SCHEDULE_PANEL_PX[1] * rows


def plot_schedules(items, steps, path, title=None):
    """PNG of the learning rate of each (label, schedule) for steps 0..steps-1, one panel each,
    3 per row, with ``title`` on top; size :func:`schedules_size`. Needs matplotlib."""
    plt = pyplot()
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
    save_figure(fig, path, title)
    return w, h
