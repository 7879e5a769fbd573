"""Optimizer trajectories on small test functions, and learning-rate schedule plots.

The library behind ``fastopt playground``::

    from fastopt import playground, problems
    p = problems.get_problem("ellipse")
    runs = [playground.run(p, playground.parse_optimizer(s), steps=20)
            for s in ("sgd:lr=0.4", "sgd:lr=0.6,momentum=0.5")]
    playground.plot_trajectories(p, runs, "momentum.png")

Specs are ``NAME`` or ``NAME:key=value,key=value``: values are Python literals (numbers,
``true``/``false``, ``none``, tuples such as ``betas=(0.9,0.99)``) or, failing that, plain strings.
Every optimizer of the registry :data:`fastopt.optim.OPTIMIZERS` runs (``gd`` is ``sgd``) with its
own keyword arguments, on a float64 NumPy array of the problem's dimension; the test functions are
those of the registry :data:`fastopt.problems.PROBLEMS`.

Modules: :mod:`.specs` (spec parsing), :mod:`.runs` (trajectories, presets),
:mod:`.schedule_specs` (schedules from specs), :mod:`.drawing` (the pictures, with matplotlib).
"""

from .drawing import (
    FIGURE_DPI,
    SCHEDULE_COLUMNS,
    SCHEDULE_PANEL_PX,
    TRAJECTORY_SIZE_PX,
    plot_schedules,
    plot_trajectories,
    pyplot,
    save_figure,
    schedules_size,
)
from .runs import PRESETS, Preset, Trajectory, run, trajectories_json
from .schedule_specs import (
    SCHEDULE_ALIASES,
    SCHEDULE_NAMES,
    default_schedules,
    parse_schedule,
    schedule_label,
    schedule_values,
)
from .specs import OPTIMIZERS, OptimizerSpec, parse_optimizer, parse_problem, parse_spec

__all__ = [
    "FIGURE_DPI",
    "OPTIMIZERS",
    "PRESETS",
    "SCHEDULE_ALIASES",
    "SCHEDULE_COLUMNS",
    "SCHEDULE_NAMES",
    "SCHEDULE_PANEL_PX",
    "TRAJECTORY_SIZE_PX",
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
    "pyplot",
    "run",
    "save_figure",
    "schedule_label",
    "schedule_values",
    "schedules_size",
    "trajectories_json",
]
