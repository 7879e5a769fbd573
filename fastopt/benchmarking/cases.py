"""The case catalogue: each benchmark case (an optimizer configuration, its memory traffic, its
layout) with its speed goals, the selection of cases to run, and the check of a goal on a result.

A case's optimizer class is looked up by name in :data:`fastopt.optim.OPTIMIZERS`. Case names and
parameters are part of the committed results in ``bench/results/``: keep them stable so new runs
stay comparable with old ones.
"""

import math
from dataclasses import dataclass

from ..optim import OPTIMIZERS
from . import roofline


@dataclass(frozen=True)
class Goal:
    """A speed goal: ``metric op threshold`` on a run_case() result.

    ``metric`` is a key of the result, dotted for nested dicts: ``fraction_of_roofline``,
    ``us_per_step``, ``speedup_vs.torch_fused``, ``time_ratio_to.single_param``.
    """

    metric: str
    op: str  # ">=" or "<="
    threshold: float
    text: str

    def label(self):
        return f"{self.metric} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class Case:
    """One benchmark: an optimizer configuration, its traffic, its layout and its goals."""

    name: str
    algorithm: str
    """fastopt class name (a class of ``fastopt.optim.OPTIMIZERS``); also the torch.optim class
    unless ``torch_name``."""
    kwargs: dict
    state_slots: int
    """Per-element state arrays the step reads and writes (checked against the optimizer)."""
    layout: str = "flat"
    """``flat``: one ``n``-element parameter in a ParamSet; ``many``: COUNT parameters of SIZE;
    ``matrices``: the parameters of ``shapes`` in one ParamSet."""
    n: int | None = None
    """Fixed element count of a flat case (None: the size asked for, FASTOPT_BENCH_N)."""
    torch_name: str | None = ""
    """torch.optim class ('' = same as ``algorithm``; None = torch has no such optimizer)."""
    goals: tuple = ()
    description: str = ""
    dtype_goals: tuple = ()
    """(storage dtype name, goals) pairs: the case's goals when it runs in that dtype. float32 and
    float64 runs check ``goals`` unless named here; 16-bit runs only what is named here (a
    float32 goal says nothing about 16-bit storage)."""
    shapes: tuple = ()
    """The parameter shapes of a ``matrices`` case (its ``n`` is their total)."""
    torch_variants: tuple = ("foreach", "fused")
    """The torch.optim flags timed as peers ``torch_<flag>``; ``""`` times the class without
    flags as the peer ``torch`` (torch.optim.Muon has neither flag)."""

    def __post_init__(self):
        if self.algorithm.lower() not in OPTIMIZERS:
            raise ValueError(
                f"case {self.name!r}: {self.algorithm!r} is not in fastopt.optim.OPTIMIZERS"
            )
        if self.layout == "matrices" and self.n != sum(math.prod(s) for s in self.shapes):
            raise ValueError(f"case {self.name!r}: n must be the total size of its shapes")

    @property
    def optimizer_class(self):
        """The fastopt optimizer class of the case (from :data:`fastopt.optim.OPTIMIZERS`)."""
        return OPTIMIZERS[self.algorithm.lower()]

    def goals_for(self, dtype):
        """The goals of a run in storage dtype ``dtype`` (a name such as ``"bfloat16"``)."""
        named = dict(self.dtype_goals)
        if dtype in named:
            return tuple(named[dtype])
        return self.goals if dtype in ("float32", "float64") else ()

    def bytes_per_element(self, itemsize=4):
        """Bytes one step moves per element: the gradient read, parameter and state read and
        written (:func:`fastopt.benchmarking.roofline.bytes_per_element`)."""
        return roofline.bytes_per_element(self.state_slots, itemsize)

    @property
    def torch_class(self):
        """The torch.optim class name to compare with (None: torch has no such optimizer)."""
        return self.algorithm if self.torch_name == "" else self.torch_name

    @property
    def sized(self):
        """True when the case runs at the size asked for (flat, no fixed ``n``)."""
        return self.layout == "flat" and self.n is None


def _roofline_goal(fraction):
    return Goal(
        "fraction_of_roofline",
        ">=",
        fraction,
        f"at least {fraction:.0%} of the throughput of a kernel with the same loads and stores",
    )


ADAM_GOALS = (
    _roofline_goal(0.90),
    Goal("speedup_vs.torch_fused", ">=", 1.0, "at least as fast as torch.optim.Adam(fused=True)"),
    Goal("speedup_vs.numpy", ">=", 15.0, "at least 15x the naive NumPy Adam"),
)
MANY_GOALS = (
    Goal(
        "speedup_vs.torch_fused",
        ">=",
        20.0,
        "at least 20x torch.optim.Adam(fused=True) over the same separate tensors",
    ),
    Goal(
        "time_ratio_to.single_param",
        "<=",
        1.3,
        "at most 1.3x the time of one parameter with the same total elements",
    ),
)
TINY_GOALS = (Goal("us_per_step", "<=", 10.0, "opt.step() on 1000 elements within 10 µs"),)
OTHER_GOALS = (_roofline_goal(0.85),)


def _two_pass_goals(one_pass, both_passes):
    """The roofline goal of a per-tensor rule (LAMB, LARS, NovoGrad) over one tensor of more than
    a reduction piece: its norms take a pass over the tensor before the update can start, so
    the step moves ``both_passes`` bytes per element where the roofline kernel (the rule's
    state slots, one pass) moves ``one_pass``. 85% of the ceiling that leaves."""
    fraction = round(0.85 * one_pass / both_passes, 3)
    return (
        Goal(
            "fraction_of_roofline",
            ">=",
            fraction,
            f"at least 85% of the {one_pass}/{both_passes} of the roofline's throughput that "
            f"the norm pass leaves ({both_passes} bytes per element in two passes)",
        ),
    )


BF16_ADAMW_GOALS = (
    _roofline_goal(0.90),
    Goal(
        "speedup_vs.torch_fused",
        ">=",
        1.2,
        "at least 1.2x torch.optim.AdamW(fused=True) on the same bfloat16 tensor "
        "(bfloat16 gradient and state, as torch keeps them)",
    ),
)
"""AdamW with bfloat16 parameters, gradients and state (the precision issue): 14 bytes/element."""


def _other(
    name, algorithm, kwargs, slots, torch_name="", description="", dtype_goals=(), goals=OTHER_GOALS
):
    return Case(
        name,
        algorithm,
        kwargs,
        slots,
        torch_name=torch_name,
        goals=goals,
        description=description,
        dtype_goals=dtype_goals,
    )


def _per_tensor(name, algorithm, kwargs, slots, both_passes, description):
    """A case of a per-tensor rule (no torch.optim class) over one tensor, whose two passes move
    ``both_passes`` bytes per element (:func:`_two_pass_goals`)."""
    return _other(
        name,
        algorithm,
        kwargs,
        slots,
        torch_name=None,
        description=description,
        goals=_two_pass_goals(roofline.bytes_per_element(slots), both_passes),
    )


MUON_SHAPES = ((192, 64), (64, 64), (256, 64), (64, 256))
"""Attention in-projection, out-projection and the MLP's two matrices of a width-64 block."""

CASES = (
    Case(
        "adam",
        "Adam",
        {"lr": 1e-3},
        2,
        goals=ADAM_GOALS,
        description="Adam, float32, one ParamSet of N elements",
    ),
    Case(
        "adam_many",
        "Adam",
        {"lr": 1e-3},
        2,
        layout="many",
        goals=MANY_GOALS,
        description="Adam over COUNT parameters of SIZE elements packed in one ParamSet",
    ),
    Case(
        "adam_tiny",
        "Adam",
        {"lr": 1e-3},
        2,
        n=1000,
        goals=TINY_GOALS,
        description="Adam on a 1000-element ParamSet: per-call overhead",
    ),
    _other("sgd", "SGD", {"lr": 1e-2}, 0),
    _other("sgd_momentum", "SGD", {"lr": 1e-2, "momentum": 0.9}, 1),
    _other("sgd_nesterov", "SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True}, 1),
    _other("adagrad", "Adagrad", {"lr": 1e-2}, 1),
    _other("rmsprop", "RMSprop", {"lr": 1e-2}, 1),
    _other("rmsprop_centered", "RMSprop", {"lr": 1e-2, "centered": True}, 2),
    _other("rmsprop_momentum", "RMSprop", {"lr": 1e-2, "momentum": 0.9}, 2),
    _other(
        "rmsprop_centered_momentum", "RMSprop", {"lr": 1e-2, "centered": True, "momentum": 0.9}, 3
    ),
    _other("adadelta", "Adadelta", {}, 2),
    _other(
        "adamw",
        "AdamW",
        {"lr": 1e-3, "weight_decay": 1e-2},
        2,
        dtype_goals=(("bfloat16", BF16_ADAMW_GOALS),),
    ),
    _other("amsgrad", "Adam", {"lr": 1e-3, "amsgrad": True}, 3),
    _other("adamax", "Adamax", {"lr": 2e-3}, 2),
    _other("nadam", "NAdam", {"lr": 2e-3}, 2),
    _other("radam", "RAdam", {"lr": 1e-3}, 2),
    _other("rprop", "Rprop", {"lr": 1e-2}, 2),
    _other("yogi", "Yogi", {"lr": 1e-2}, 2, torch_name=None),
    _other("lion", "Lion", {"lr": 1e-4}, 1, torch_name=None),
    _per_tensor(
        "lamb",
        "LAMB",
        {"lr": 1e-3, "weight_decay": 1e-2},
        2,
        40,
        "LAMB over one tensor: the pass that stores the update and sums its squares (p, g, m, v "
        "read; m, v, update written), then the update (p, update read; p written)",
    ),
    _per_tensor(
        "lars",
        "LARS",
        {"lr": 1e-1, "weight_decay": 1e-4},
        1,
        28,
        "LARS over one tensor: the norms of p and g + wd p (p, g read), then the update (p, g, "
        "momentum read; p, momentum written)",
    ),
    _per_tensor(
        "novograd",
        "NovoGrad",
        {"lr": 1e-3},
        1,
        24,
        "NovoGrad over one tensor: the norm of g (g read), then the update (p, g, m read; p, m "
        "written)",
    ),
    Case(
        "adafactor",
        "Adafactor",
        {"lr": 1e-2},
        1,
        goals=(Goal("speedup_vs.torch_foreach", ">=", 5.0, "at least 5x torch.optim.Adafactor"),),
        description="Adafactor, float32, one ParamSet of N elements (a vector: unfactored)",
    ),
    Case(
        "muon",
        "Muon",
        {"lr": 0.02},
        1,
        layout="matrices",
        shapes=MUON_SHAPES,
        n=sum(math.prod(s) for s in MUON_SHAPES),
        torch_variants=("",),
        goals=(
            Goal(
                "speedup_vs.torch",
                ">=",
                1.0,
                "at least as fast as torch.optim.Muon (its iteration in bfloat16) on the same "
                "matrices",
            ),
        ),
        description="Muon, float32, the 4 hidden matrices of a transformer block of width 64 "
        "(the Newton-Schulz products dominate; bench/test_bench_muon.py times 64 of width 128)",
    ),
    _other("asgd", "ASGD", {"lr": 1e-2, "t0": 0.0}, 1),
    _other("sgd_schedulefree", "SGDScheduleFree", {"lr": 1.0}, 1, torch_name=None),
    _other("adamw_schedulefree", "AdamWScheduleFree", {"lr": 2.5e-3}, 2, torch_name=None),
)

CASES_BY_NAME = {c.name: c for c in CASES}

ALGORITHMS = tuple(dict.fromkeys(c.algorithm for c in CASES))
"""Every algorithm with a case, in case order."""

QUICK_CASES = tuple(
    next(
        (c.name for c in CASES if c.algorithm == a and c.sized and not c.kwargs.get("amsgrad")),
        next(c.name for c in CASES if c.algorithm == a),  # only fixed shapes (Muon's matrices)
    )
    for a in ALGORITHMS
)
"""One plain case per algorithm (``fastopt bench --quick``)."""


def select_cases(algorithms=None, names=None, quick=False):
    """Cases to run: by algorithm (case-insensitive class names, e.g. ``adam``: every Adam case)
    and/or by case name; ``quick`` keeps one plain case per algorithm. ValueError naming the
    unknown ones."""
    pool = [CASES_BY_NAME[n] for n in QUICK_CASES] if quick else list(CASES)
    if not algorithms and not names:
        return pool
    chosen = []
    if algorithms:
        known = {a.lower(): a for a in ALGORITHMS}
        for a in algorithms:
            if a.lower() not in known:
                hint = f"; {a!r} is a case name: use --cases" if a in CASES_BY_NAME else ""
                raise ValueError(
                    f"unknown algorithm {a!r}; known: {', '.join(sorted(known))}{hint}"
                )
        wanted = {known[a.lower()] for a in algorithms}
        chosen += [c for c in pool if c.algorithm in wanted]
    for name in names or ():
        if name not in CASES_BY_NAME:
            raise ValueError(f"unknown case {name!r}; known: {', '.join(CASES_BY_NAME)}")
        if CASES_BY_NAME[name] not in chosen:
            chosen.append(CASES_BY_NAME[name])
    return chosen


def _metric(result, metric):
    """The value of a dotted ``metric`` in a result (None where it was not measured)."""
    value = result
    for part in metric.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def check_goal(result, goal):
    """{goal, text, value, status ('pass'/'fail'/'skipped'), reason} for one Goal."""
    value = _metric(result, goal.metric)
    out = {
        "goal": goal.label(),
        "metric": goal.metric,
        "op": goal.op,
        "threshold": goal.threshold,
        "text": goal.text,
        "value": value,
    }
    if value is None:
        peer = goal.metric.split(".")[-1]
        out["status"] = "skipped"
        out["reason"] = result.get("skipped_peers", {}).get(peer, f"{goal.metric} was not measured")
        return out
    ok = value >= goal.threshold if goal.op == ">=" else value <= goal.threshold
    out["status"] = "pass" if ok else "fail"
    out["reason"] = f"{goal.metric} = {value:.4g}, goal {goal.op} {goal.threshold:g}"
    return out
