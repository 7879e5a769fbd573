"""``fastopt playground``: optimizer trajectories on textbook functions; schedule plots."""

import json
import os
import sys

from ..fileio import OutputError, check_output, write_text
from . import UsageError, require_matplotlib

HELP = "plot optimizer trajectories on test functions, or learning-rate schedules"


def _description():
    import textwrap

    from .. import problems
    from ..playground import OPTIMIZERS

    def block(label, text):
        return textwrap.fill(text, 100, initial_indent=f"  {label:<12}", subsequent_indent=" " * 14)

    funcs = ", ".join(f"{n} ({problems.get_problem(n).formula})" for n in problems.PROBLEMS)
    return f"""\
Run optimizers on a small test function and draw their trajectories over its contours (its curve,
for one variable), next to the loss per step: the pictures of Dive into Deep Learning, ch. 12.

{block("problems", funcs + "; parameters as NAME:k=v, e.g. quadratic:a=1,b=4")}
{block("optimizers", ", ".join(OPTIMIZERS) + " (gd = sgd), with their torch.optim keyword arguments: NAME:k=v,k=v; newton (damped, modified Newton: lr, line_search, rho) and armijo (gd with backtracking: lr, rho, c1) are the playground's own; lbfgs makes one step() (max_iter iterations) per point")}
  presets     gd-lr     gradient descent with lr 0.05 / 0.2 / 1.1 on x^2 from 10 (12.3)
              momentum  gd lr 0.4, momentum 0.25 / 0.5 with lr 0.6 on the ellipse (12.6)
              adaptive  Adagrad vs RMSProp vs Adam, lr 0.4, on the ellipse (12.7-12.10)
              curvature gd, momentum, Newton and L-BFGS on the ellipse (curvature-rosenbrock:
                        the same on Rosenbrock)
              armijo    gd with fixed lr vs backtracking (Armijo) line search on Rosenbrock

With --schedules, plot the learning rate of fastopt.schedules over --steps steps instead: a
gallery of every kind, or the ones given with --schedule NAME:k=v (class names of
fastopt.schedules, any case, or cosine, step, multistep, exponential, polynomial, rsqrt, sgdr,
onecycle, piecewise; extra keys warmup=W (starting at warmup_start_factor=F times the lr,
default 1/3 as torch's LinearLR; shorter than --steps) and per_epoch=E; step counts default
from --steps, less the warmup, as fastopt train --warmup)."""


DESCRIPTION = _description()
EPILOG = """\
examples:
  fastopt playground --preset gd-lr --out gd.png
  fastopt playground --preset momentum
  fastopt playground --problem ellipse --optimizer sgd:lr=0.4 --optimizer sgd:lr=0.4,momentum=0.5
  fastopt playground --problem rosenbrock --optimizer adam:lr=0.1 --optimizer "adam:lr=0.1,betas=(0.5,0.9)" --steps 500
  fastopt playground --problem quadratic:a=1,b=4 --start -4,3 --optimizer nadam:lr=0.3
  fastopt playground --schedules --steps 200 --out schedules.png
  fastopt playground --schedule cosine:lr=0.1,warmup=10 --schedule onecycle:max_lr=0.1 --steps 100
  fastopt playground --list

Values are Python literals (0.1, 1e-3, true, (0.9,0.99)) or plain words. Quote specs holding
parentheses for the shell. Without --optimizer or --preset, --preset adaptive's optimizers run on
the chosen problem (default: ellipse)."""

MAX_STEPS = 1_000_000


def add_arguments(p):
    t = p.add_argument_group("trajectories")
    t.add_argument(
        "--preset",
        metavar="NAME",
        help="gd-lr, momentum, adaptive, curvature, curvature-rosenbrock or armijo",
    )
    t.add_argument(
        "--problem", metavar="SPEC", help="test function, e.g. ellipse or quadratic:a=1,b=4"
    )
    t.add_argument(
        "--optimizer",
        metavar="SPEC",
        action="append",
        help="NAME[:k=v,...], repeatable, e.g. sgd:lr=0.4,momentum=0.5",
    )
    t.add_argument(
        "--start", metavar="X[,Y]", help="start point (default: the problem's), e.g. --start -5,-2"
    )
    t.add_argument(
        "--steps", type=int, metavar="N", help="steps (default: the preset's, or 20; schedules 100)"
    )
    t.add_argument("--title", help="figure title")
    s = p.add_argument_group("schedules")
    s.add_argument("--schedules", action="store_true", help="plot learning-rate schedules instead")
    s.add_argument(
        "--schedule",
        metavar="SPEC",
        action="append",
        help="NAME[:k=v,...], repeatable (implies --schedules)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--out", metavar="FILE.png", help="the PNG (default playground.png / schedules.png)"
    )
    o.add_argument(
        "--json", metavar="FILE", help="also write the trajectories (or lr values) as JSON"
    )
    o.add_argument(
        "--list", action="store_true", help="list problems, optimizers, presets, schedules"
    )


def _parse_start(text, problem):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--start: {text!r} is not a comma-separated list of numbers") from None
    if len(values) != problem.dim:
        raise UsageError(
            f"--start: {problem.name} has {problem.dim} variable(s), got {len(values)} value(s) "
            f"in {text!r}"
        )
    if not all(abs(v) < float("inf") for v in values):
        raise UsageError(f"--start: {text!r} is not finite")
    return tuple(values)


def _check_out(path, default):
    import pathlib

    path = pathlib.Path(path or default)
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out: {str(path)!r} must end in .png")
    try:  # before any work: a missing folder, a folder, a block device ...
        check_output(path)
    except OutputError as exc:
        raise UsageError(f"--out: {exc}") from None
    return path


def _check_outputs(args, default):
    """The PNG's path, after checking, before anything runs or is written, that ``--out`` and
    ``--json`` can be written (:func:`fastopt.fileio.check_output`) and are not the same file
    (the JSON would replace the picture)."""
    out = _check_out(args.out, default)
    if args.json is not None:
        try:
            check_output(args.json)
        except OutputError as exc:
            raise UsageError(f"--json: {exc}") from None
        if _same_file(out, args.json):
            raise UsageError(
                f"--json {args.json} is the --out picture {out}; the JSON would replace it "
                "(give two different files)"
            )
    return out


def _same_file(a, b):
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:  # either does not exist yet
        return False


_LIST_ALONE = (
    "preset",
    "problem",
    "optimizer",
    "start",
    "steps",
    "title",
    "schedules",
    "schedule",
    "out",
    "json",
)


def _list(args):
    from .. import playground as P
    from .. import problems

    given = [n for n in _LIST_ALONE if getattr(args, n, None) not in (None, False)]
    if given:
        raise UsageError(
            "--list prints the problems, optimizers, presets and schedules: it takes no "
            + "/".join(f"--{n}" for n in given)
        )

    print("problems:")
    for name in problems.PROBLEMS:
        print("  " + problems.get_problem(name).describe())
    print("optimizers:\n  " + ", ".join(P.OPTIMIZERS) + " (gd = sgd)")
    print("presets:")
    for name, pr in P.PRESETS.items():
        print(
            f"  {name}: {pr.text}\n    --problem {pr.problem} --steps {pr.steps} "
            + " ".join(f"--optimizer {o}" for o in pr.optimizers)
        )
    print(
        "schedules:\n  "
        + ", ".join(sorted(set(P.SCHEDULE_NAMES.values())))
        + "\n  aliases: "
        + ", ".join(sorted(P.SCHEDULE_ALIASES))
    )
    return 0


def _steps(args, default):
    steps = default if args.steps is None else args.steps
    if not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"--steps must be in 1..{MAX_STEPS}, got {steps}")
    return steps


def _schedules(args):
    from .. import playground as P

    if args.problem or args.optimizer or args.preset or args.start:
        raise UsageError(
            "--schedules plots schedules: it takes no --problem/--optimizer/--preset/--start"
        )
    steps = _steps(args, 100)
    out = _check_outputs(args, "schedules.png")
    if args.schedule:
        items = []
        for spec in args.schedule:
            try:
                sched = P.parse_schedule(spec, steps, strict=True)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            items.append((P.schedule_label(sched), sched))
    else:
        items = P.default_schedules(steps)
    require_matplotlib("fastopt playground")
    w, h = _write_png(P.plot_schedules, items, steps, out, title=args.title)
    for label, sched in items:
        v = P.schedule_values(sched, steps)
        print(
            f"{label}: lr {v[0]:.4g} at step 0, {v[-1]:.4g} at step {steps - 1}, max {v.max():.4g}"
        )
    if args.json:
        data = {
            "steps": steps,
            "schedules": [
                {
                    "label": label,
                    "config": _config(sched),
                    "lr": P.schedule_values(sched, steps).tolist(),
                }
                for label, sched in items
            ],
        }
        _write_json(args.json, data)
    print(f"wrote {out} ({w}x{h})" + (f" and {args.json}" if args.json else ""))
    return 0


def _config(sched):
    try:
        return sched.to_dict()
    except (AttributeError, TypeError):
        return None


def _write_png(plot, *args, **kwargs):
    try:
        return plot(*args, **kwargs)
    except OutputError as exc:  # checked up front; changed since
        raise UsageError(f"--out: {exc}") from None


def _write_json(path, data):
    try:
        write_text(path, json.dumps(data, indent=1) + "\n")
    except OutputError as exc:  # checked up front; changed since. It names the path already
        raise UsageError(f"--json: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--json: cannot write {path}: {exc.strerror or exc}") from None


def _preset_title(args, preset, problem, start):
    """The preset's text as the title, when it describes what runs: its optimizers on its
    problem from its start point (the text names them). None otherwise."""
    from .. import playground as P

    if preset is None or args.optimizer:
        return None
    own = P.parse_problem(preset.problem)
    if (own.name, own.params) != (problem.name, problem.params):
        return None
    if start is not None and tuple(start) != tuple(preset.start or own.start):
        return None
    return preset.text


def run(args):
    if args.list:
        return _list(args)
    if args.schedules or args.schedule:
        return _schedules(args)

    from .. import playground as P

    preset = None
    if args.preset:
        preset = P.PRESETS.get(args.preset.lower())
        if preset is None:
            raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(P.PRESETS)}")
    try:
        problem = P.parse_problem(args.problem or (preset.problem if preset else "ellipse"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    specs = args.optimizer or (preset.optimizers if preset else P.PRESETS["adaptive"].optimizers)
    try:
        optimizers = [P.parse_optimizer(s) for s in specs]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    steps = _steps(args, preset.steps if preset else 20)
    start = _parse_start(args.start, problem) if args.start else None
    out = _check_outputs(args, f"{args.preset.lower()}.png" if preset else "playground.png")

    require_matplotlib("fastopt playground")
    try:
        runs = [P.run(problem, spec, steps=steps, start=start) for spec in optimizers]
    except ValueError as exc:  # e.g. Muon on a problem whose points are vectors
        raise UsageError(str(exc)) from None
    title = args.title
    if title is None:
        title = _preset_title(args, preset, problem, start)
    w, h = _write_png(P.plot_trajectories, problem, runs, out, title=title)
    print(problem.describe())
    if start is not None:
        print("  from (" + ", ".join(f"{v:g}" for v in start) + ")")
    for r in runs:
        end = ", ".join(f"{v:.4g}" for v in r.points[-1])
        status = f"diverged after {len(r.values) - 1} steps" if r.diverged else f"{steps} steps"
        print(f"  {r.label}: {status}, f = {r.values[-1]:.4g} at ({end})")
    if args.json:
        _write_json(args.json, P.trajectories_json(problem, runs, steps, start=start))
    print(f"wrote {out} ({w}x{h})" + (f" and {args.json}" if args.json else ""))
    sys.stdout.flush()
    return 0
