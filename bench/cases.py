"""Benchmark cases as data, and a careful timer that runs one case against its peers.

Shared by the pytest-benchmark tests (``bench/test_bench_optimizers.py``), the report
(``bench/report.py``) and a ``fastopt bench`` command line: ``run_case(case)`` returns a plain,
JSON-serialisable dict.

Every case times fastopt's ``opt.step()`` and its peers IN THE SAME RUN, interleaved round by round
(the order rotates each round, so drift and noise hit every peer alike), and reports medians:

``roofline``       a kernel with the same loads/stores per element and trivial arithmetic, on the
                   very same parameter, gradient and state arrays (``bench/roofline.py``)
``numpy``          the naive whole-array NumPy update (``fastopt.reference``), the obvious way a
                   user writes the algorithm in NumPy
``torch_foreach``  ``torch.optim.<Algo>(foreach=True)``, when torch is installed and has the
                   algorithm
``torch_fused``    ``torch.optim.<Algo>(fused=True)``, when torch has a fused CPU kernel for it
``single_param``   ("many" cases) fastopt over one parameter holding the same number of elements
``fastopt_list``   ("many" cases) fastopt over the same parameters as a list of separate arrays

For a single-parameter case torch gets the ParamSet's buffer as ONE tensor (sharing memory); in a
"many" case torch gets separately allocated tensors, as a torch model has.

Ratios: ``fraction_of_roofline`` = roofline time / fastopt time (1.0 = at the memory ceiling);
``speedup_vs[peer]`` = peer time / fastopt time (> 1: fastopt is faster);
``time_ratio_to[peer]`` = fastopt time / peer time.

Sizes and effort come from the environment so quick runs need no code change:
``FASTOPT_BENCH_N`` (elements of a single-parameter case, default 16 Mi = 16777216),
``FASTOPT_BENCH_MANY`` (``COUNTxSIZE`` of the many-parameter case, default ``1000x1000``),
``FASTOPT_BENCH_REPEATS`` (timed rounds, default 7), ``FASTOPT_BENCH_MIN_TIME`` (seconds per
round per peer, default 0.2; each round runs as many steps as fill it).
"""

import gc
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np

try:  # part of a package (e.g. vendored by a CLI)
    from . import roofline
except ImportError:  # run from bench/ (pytest conftest puts bench/ on sys.path, or a script)
    import roofline

DEFAULT_N = 16 * 1024 * 1024
DEFAULT_MANY = (1000, 1000)
DEFAULT_REPEATS = 7
DEFAULT_MIN_TIME = 0.2
WARMUP_STEPS = 3

PEERS = ("roofline", "numpy", "torch_foreach", "torch_fused", "single_param", "fastopt_list")


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
    """fastopt class name (``fastopt.Adam``); also the torch.optim class unless ``torch_name``."""
    kwargs: dict
    state_slots: int
    """Per-element state arrays the step reads and writes (checked against the optimizer)."""
    layout: str = "flat"
    """``flat``: one ``n``-element parameter in a ParamSet; ``many``: COUNT parameters of SIZE."""
    n: int | None = None
    """Fixed element count of a flat case (None: FASTOPT_BENCH_N)."""
    torch_name: str | None = ""
    """torch.optim class ('' = same as ``algorithm``; None = torch has no such optimizer)."""
    goals: tuple = ()
    description: str = ""

    def bytes_per_element(self, itemsize=4):
        return roofline.bytes_per_element(self.state_slots, itemsize)

    @property
    def torch_class(self):
        return self.algorithm if self.torch_name == "" else self.torch_name


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


def _other(name, algorithm, kwargs, slots, torch_name="", description=""):
    return Case(
        name,
        algorithm,
        kwargs,
        slots,
        torch_name=torch_name,
        goals=OTHER_GOALS,
        description=description,
    )


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
    _other("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, 2),
    _other("amsgrad", "Adam", {"lr": 1e-3, "amsgrad": True}, 3),
    _other("adamax", "Adamax", {"lr": 2e-3}, 2),
    _other("nadam", "NAdam", {"lr": 2e-3}, 2),
    _other("radam", "RAdam", {"lr": 1e-3}, 2),
    _other("rprop", "Rprop", {"lr": 1e-2}, 2),
    _other("yogi", "Yogi", {"lr": 1e-2}, 2, torch_name=None),
    _other("lion", "Lion", {"lr": 1e-4}, 1, torch_name=None),
)

CASES_BY_NAME = {c.name: c for c in CASES}


# --------------------------------------------------------------------------------- settings
def env_n():
    return int(os.environ.get("FASTOPT_BENCH_N", DEFAULT_N))


def env_many():
    spec = os.environ.get("FASTOPT_BENCH_MANY")
    if not spec:
        return DEFAULT_MANY
    count, size = spec.lower().split("x")
    return int(count), int(size)


def env_repeats():
    return int(os.environ.get("FASTOPT_BENCH_REPEATS", DEFAULT_REPEATS))


def env_min_time():
    return float(os.environ.get("FASTOPT_BENCH_MIN_TIME", DEFAULT_MIN_TIME))


# --------------------------------------------------------------------------------- timing
def time_steps(steps, *, repeats=None, min_time=None, warmup=WARMUP_STEPS):
    """Median seconds per call of each zero-argument callable in ``steps`` (name -> callable).

    Warm-up calls first; then each callable's steps-per-round is calibrated so a round lasts about
    ``min_time``; then ``repeats`` rounds, each timing every callable once (rotating the order),
    with the garbage collector off. A round of a fast callable starts with one untimed call, so the
    switch from another peer (its thread pool still spinning, caches holding its arrays) is not
    charged to it. Returns name -> {median_s, min_s, max_s, steps_per_repeat, repeats,
    samples_s}.
    """
    repeats = env_repeats() if repeats is None else repeats
    min_time = env_min_time() if min_time is None else min_time
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    per_round = {}
    for name in names:
        fn, k = steps[name], 1
        while True:
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            dt = time.perf_counter() - t0
            if dt >= min_time / 4 or k >= 1 << 22:
                break
            k *= 8 if dt < min_time / 64 else 2
        per_round[name] = max(1, math.ceil(min_time * k / max(dt, 1e-9)))
    samples = {name: [] for name in names}
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn, k = steps[name], per_round[name]
                if k > 1:
                    fn()  # untimed: wakes this peer's thread pool, warms its caches
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                samples[name].append((time.perf_counter() - t0) / k)
    finally:
        if gc_enabled:
            gc.enable()
    return {
        name: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "max_s": max(s),
            "steps_per_repeat": per_round[name],
            "repeats": repeats,
            "samples_s": s,
        }
        for name, s in samples.items()
    }


# --------------------------------------------------------------------------------- peers
def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _state_arrays(opt):
    """The per-element state arrays of an optimizer's first unit (after its first step)."""
    (state,) = opt.state.values()
    return [a for a in state.values() if isinstance(a, np.ndarray)]


def _naive_numpy_step(case, params, grads):
    """Whole-array NumPy updates with fastopt.reference, looping over the parameters in Python."""
    import fastopt
    from fastopt import reference

    cls = getattr(fastopt, case.algorithm)
    # A reference-backend optimizer only to build torch-default hyperparameters and initial state.
    init = cls(list(params), backend="numpy", **case.kwargs)
    init.step(list(grads))
    group = init.param_groups[0]
    hyper = {k: group[k] for k in init.defaults}
    fn = getattr(reference, init.algorithm)
    states = [dict(init.state[i]) for i in range(len(params))]
    counter = [states[0]["step"]]
    work = list(zip(params, grads, states, strict=True))

    def step():
        counter[0] += 1
        t = counter[0]
        for p, g, s in work:
            fn(p, g, s, step=t, **hyper)

    return step


def _torch_step(case, params, grads, variant, *, share):
    """(step, None) or (None, reason): torch.optim.<Algo>(<variant>=True) over the arrays."""
    torch = _torch()
    if torch is None:
        return None, "torch is not installed"
    if case.torch_name is None:
        return None, f"torch.optim has no {case.algorithm}"
    cls = getattr(torch.optim, case.torch_class, None)
    if cls is None:
        return None, f"torch {torch.__version__} has no torch.optim.{case.torch_class}"
    if share:
        tensors = [torch.from_numpy(p) for p in params]
        tgrads = [torch.from_numpy(g) for g in grads]
    else:
        tensors = [torch.from_numpy(np.array(p)) for p in params]
        tgrads = [torch.from_numpy(np.array(g)) for g in grads]
    for t, g in zip(tensors, tgrads, strict=True):
        t.grad = g
    try:
        opt = cls(tensors, **case.kwargs, **{variant: True})
        opt.step()
    except (TypeError, RuntimeError, ValueError) as exc:
        msg = str(exc).splitlines()[0][:160]
        return None, (
            f"torch.optim.{case.torch_class}({variant}=True) unavailable "
            f"(torch {torch.__version__}): {type(exc).__name__}: {msg}"
        )
    return opt.step, None


def _build(case, n, dtype, seed):
    """(elements, params, fastopt step, peer steps, skipped peers, keep-alive objects)."""
    import fastopt

    rng = np.random.default_rng(seed)
    cls = getattr(fastopt, case.algorithm)
    if case.layout == "many":
        count, size = env_many()
    else:
        count, size = 1, (case.n if case.n is not None else n)
    ps = fastopt.ParamSet({f"p{i}": np.zeros(size, dtype) for i in range(count)}, dtype=dtype)
    ps.flat[...] = rng.standard_normal(ps.size, dtype=np.float32)
    ps.grad_flat[...] = rng.standard_normal(ps.size, dtype=np.float32)
    opt = cls(ps, **case.kwargs)
    opt.step()  # compile (or load from the disk cache) and allocate the state
    states = _state_arrays(opt)
    if len(states) != case.state_slots:
        raise AssertionError(
            f"case {case.name}: {case.algorithm}({case.kwargs}) keeps {len(states)} state arrays, "
            f"the case says {case.state_slots}: fix the case's state_slots (and bytes/element)"
        )
    peers, skipped, keep = {}, {}, [ps, opt]
    peers["roofline"] = roofline.roofline_step(ps.grad_flat, ps.flat, states)

    if case.layout == "many":
        params = [ps[name] for name in ps.names]
        grads = [ps.grads[name] for name in ps.names]
        sep_params = [np.array(p) for p in params]
        sep_grads = [np.array(g) for g in grads]
        single = fastopt.ParamSet({"w": np.array(ps.flat)})
        single.grad_flat[...] = ps.grad_flat
        single_opt = cls(single, **case.kwargs)
        peers["single_param"] = single_opt.step
        list_opt = cls(sep_params, **case.kwargs)
        peers["fastopt_list"] = lambda: list_opt.step(sep_grads)
        peers["numpy"] = _naive_numpy_step(
            case, [np.array(p) for p in params], [np.array(g) for g in grads]
        )
        keep += [single, single_opt, list_opt, sep_params, sep_grads]
        torch_params, torch_grads, share = params, grads, False
    else:
        # The naive NumPy step and torch update the same parameter buffer (own state).
        peers["numpy"] = _naive_numpy_step(case, [ps.flat], [ps.grad_flat])
        torch_params, torch_grads, share = [ps.flat], [ps.grad_flat], True
    for variant in ("foreach", "fused"):
        step, why = _torch_step(case, torch_params, torch_grads, variant, share=share)
        if step is None:
            skipped[f"torch_{variant}"] = why
        else:
            peers[f"torch_{variant}"] = step
    return ps.size, count, opt.step, peers, skipped, keep


# --------------------------------------------------------------------------------- one case
def run_case(
    case,
    *,
    n=None,
    dtype="float32",
    repeats=None,
    min_time=None,
    peers=None,
    match_threads=True,
    seed=0,
    on_fastopt=None,
):
    """Run one case (a Case or its name) against its peers; return a JSON-serialisable dict.

    ``n`` overrides FASTOPT_BENCH_N for flat cases; ``peers`` restricts the peers (names from
    PEERS); ``match_threads`` runs torch with Numba's thread count (restored afterwards);
    ``on_fastopt(step, steps_per_repeat)`` is called with the live fastopt step after timing (the
    pytest-benchmark tests hand it to ``benchmark.pedantic``).
    """
    import numba

    import fastopt

    if isinstance(case, str):
        case = CASES_BY_NAME[case]
    dtype = np.dtype(dtype)
    n = env_n() if n is None else int(n)
    torch = _torch()
    saved_threads = torch.get_num_threads() if torch is not None else None
    if torch is not None and match_threads:
        torch.set_num_threads(numba.get_num_threads())
    try:
        elements, count, step, peer_steps, skipped, keep = _build(case, n, dtype, seed)
        if peers is not None:
            peer_steps = {k: v for k, v in peer_steps.items() if k in peers}
            skipped = {k: v for k, v in skipped.items() if k in peers}
        repeats = env_repeats() if repeats is None else int(repeats)
        min_time = env_min_time() if min_time is None else float(min_time)
        timings = time_steps({"fastopt": step, **peer_steps}, repeats=repeats, min_time=min_time)
        if on_fastopt is not None:
            on_fastopt(step, timings["fastopt"]["steps_per_repeat"])
        torch_threads = torch.get_num_threads() if torch is not None else None
        del keep, step, peer_steps
        gc.collect()  # free this case's arrays before the next case allocates its own
    finally:
        if torch is not None:
            torch.set_num_threads(saved_threads)
    bpe = case.bytes_per_element(dtype.itemsize)
    t = timings["fastopt"]["median_s"]
    peer_names = [p for p in timings if p != "fastopt"]
    t_roof = timings["roofline"]["median_s"] if "roofline" in timings else None
    result = {
        "case": case.name,
        "description": case.description,
        "algorithm": case.algorithm,
        "kwargs": dict(case.kwargs),
        "layout": case.layout,
        "dtype": dtype.name,
        "elements": int(elements),
        "params": int(count),
        "state_slots": case.state_slots,
        "bytes_per_element": bpe,
        "median_s": t,
        "us_per_step": t * 1e6,
        "elements_per_s": elements / t,
        "gb_per_s": bpe * elements / t / 1e9,
        "fraction_of_roofline": t_roof / t if t_roof else None,
        "roofline_gb_per_s": bpe * elements / t_roof / 1e9 if t_roof else None,
        "speedup_vs": {p: timings[p]["median_s"] / t for p in peer_names},
        "time_ratio_to": {p: t / timings[p]["median_s"] for p in peer_names},
        "timings": timings,
        "skipped_peers": skipped,
        "threads": {"numba": numba.get_num_threads(), "torch": torch_threads},
        "settings": {
            "repeats": repeats,
            "min_time_s": min_time,
            "warmup_steps": WARMUP_STEPS,
            "seed": seed,
        },
        "fastopt_version": fastopt.__version__,
    }
    # Best-of-repeats ratios: on a quiet machine they match the medians; on a busy one they show
    # what the code can reach when it is not descheduled (the goals use the medians).
    best = {p: timings[p]["min_s"] for p in timings}
    result["best_of_repeats"] = {
        "fraction_of_roofline": best["roofline"] / best["fastopt"] if t_roof else None,
        "speedup_vs": {p: best[p] / best["fastopt"] for p in peer_names},
        "spread": timings["fastopt"]["max_s"] / timings["fastopt"]["min_s"],
    }
    result["goals"] = [check_goal(result, g) for g in case.goals]
    return result


def _metric(result, metric):
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


# --------------------------------------------------------------------------------- machine
def machine_info():
    """CPU model, cores, Numba threading layer and threads, library versions."""
    import numba
    from fastopt.kernels import cpu

    import fastopt

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": cpu.threading_layer(),
        "numba_threads": numba.get_num_threads(),
        "fastopt": fastopt.__version__,
        "torch": None,
        "torch_threads": None,
    }
    torch = _torch()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info
