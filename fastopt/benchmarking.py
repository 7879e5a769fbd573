"""Optimizer throughput benchmarks: the cases, a careful timer, the peers, the report.

Shared by ``fastopt bench`` (the command line), the pytest-benchmark suite in ``bench/`` (whose
``cases.py`` and ``roofline.py`` re-export this module and :mod:`fastopt.roofline`) and
``bench/report.py``. :func:`run_case` returns a plain, JSON-serialisable dict.

Every case times fastopt's ``opt.step()`` and its peers IN THE SAME RUN, interleaved round by round
(the order rotates each round, so drift and noise hit every peer alike), and reports medians:

``roofline``       CPU: a kernel with the same loads/stores per element and trivial arithmetic, on
                   the very same parameter, gradient and state arrays (:mod:`fastopt.roofline`);
                   GPU: a device-to-device copy moving the same number of bytes
``numpy``          (CPU) the naive whole-array NumPy update (``fastopt.reference``), the obvious way
                   a user writes the algorithm in NumPy
``torch_foreach``  ``torch.optim.<Algo>(foreach=True)``, when torch is installed and has the
                   algorithm (on a GPU backend: torch CUDA tensors over the same device memory)
``torch_fused``    ``torch.optim.<Algo>(fused=True)``, when torch has a fused kernel for it
``single_param``   ("many" cases) fastopt over one parameter holding the same number of elements
``fastopt_list``   ("many" cases) fastopt over the same parameters as a list of separate arrays

For a single-parameter case torch gets the ParamSet's buffer as ONE tensor (sharing memory); in a
"many" case torch gets separately allocated tensors, as a torch model has.

Ratios: ``fraction_of_roofline`` = roofline time / fastopt time (1.0 = at the memory ceiling);
``speedup_vs[peer]`` = peer time / fastopt time (> 1: fastopt is faster);
``time_ratio_to[peer]`` = fastopt time / peer time.

Sizes and effort of the pytest suite come from the environment so quick runs need no code change:
``FASTOPT_BENCH_N`` (elements of a single-parameter case, default 16 Mi = 16777216),
``FASTOPT_BENCH_MANY`` (``COUNTxSIZE`` of the many-parameter case, default ``1000x1000``),
``FASTOPT_BENCH_REPEATS`` (timed rounds, default 7), ``FASTOPT_BENCH_MIN_TIME`` (seconds per
round per peer, default 0.2; each round runs as many steps as fill it). ``fastopt bench`` passes
them as arguments instead.

The results document (``fastopt bench`` JSON, and what :func:`from_pytest_benchmark` makes of a
``pytest bench/ --benchmark-json`` file) is a dict with

``schema``     ``"fastopt-bench/1"``
``date``, ``datetime``   when it ran (ISO 8601; ``datetime`` may be None for old pytest JSON)
``source``     ``"fastopt bench"`` or the path of the pytest-benchmark JSON it came from
``machine``    :func:`machine_info` where it ran (CPU, cores, versions, threading layer, GPUs)
``machine_collected_at_report_time``  True when the JSON lacked it and it was collected later
``commit_info``  pytest-benchmark's commit info, or None
``settings``   how it ran: sizes, dtypes, backends, repeats, min_time_s, quick (None for pytest)
``cases``      one :func:`run_case` result per (backend, dtype, size, case); see
               :data:`CASE_FIELDS` for the fields every one has
``goals``      every case's goal checks: case, backend, dtype, goal, metric, op, threshold, text,
               value, status (pass/fail/skipped), reason
``errors``     (backend, dtype, elements, case, reason) of combinations that could not run
"""

import datetime as dt
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np

from . import roofline

SCHEMA = "fastopt-bench/1"

DEFAULT_N = 16 * 1024 * 1024
DEFAULT_MANY = (1000, 1000)
DEFAULT_REPEATS = 7
DEFAULT_MIN_TIME = 0.2
WARMUP_STEPS = 3

PEERS = ("roofline", "numpy", "torch_foreach", "torch_fused", "single_param", "fastopt_list")
CHART_PEERS = ("roofline", "numpy", "torch_foreach", "torch_fused")

CASE_FIELDS = (
    "case",
    "algorithm",
    "kwargs",
    "layout",
    "backend",
    "dtype",
    "elements",
    "params",
    "state_slots",
    "bytes_per_element",
    "median_s",
    "us_per_step",
    "elements_per_s",
    "gb_per_s",
    "fraction_of_roofline",
    "roofline_gb_per_s",
    "speedup_vs",
    "time_ratio_to",
    "timings",
    "skipped_peers",
    "best_of_repeats",
    "goals",
)
"""Keys of every case result (:func:`run_case`); ratios are None where a peer did not run."""

CPU_BACKEND = "numba-cpu"
GPU_BACKENDS = ("cupy", "numba-cuda")


# --------------------------------------------------------------------------------- cases
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
    """Fixed element count of a flat case (None: the size asked for, FASTOPT_BENCH_N)."""
    torch_name: str | None = ""
    """torch.optim class ('' = same as ``algorithm``; None = torch has no such optimizer)."""
    goals: tuple = ()
    description: str = ""

    def bytes_per_element(self, itemsize=4):
        return roofline.bytes_per_element(self.state_slots, itemsize)

    @property
    def torch_class(self):
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

ALGORITHMS = tuple(dict.fromkeys(c.algorithm for c in CASES))
"""Every algorithm with a case, in case order."""

QUICK_CASES = tuple(
    next(c.name for c in CASES if c.algorithm == a and c.sized and not c.kwargs.get("amsgrad"))
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
class PerfCounterTimer:
    """Host wall-clock timer (CPU work is synchronous)."""

    def start(self):
        self._t0 = time.perf_counter()

    def stop(self):
        return time.perf_counter() - self._t0


class CudaEventTimer:
    """CUDA events around the launches, recorded on the legacy default stream (which orders with
    CuPy's, numba's and torch's default streams); ``stop`` waits for the end event. Falls back to
    the host clock where events report no time (Numba's CUDA simulator)."""

    def __init__(self, library):
        self.library = library
        if library == "cupy":
            import cupy

            self._start, self._end = cupy.cuda.Event(), cupy.cuda.Event()
            self._elapsed = lambda: cupy.cuda.get_elapsed_time(self._start, self._end) / 1e3
        else:
            from numba import cuda

            self._start, self._end = cuda.event(), cuda.event()
            self._elapsed = lambda: self._start.elapsed_time(self._end) / 1e3

    def start(self):
        self._t0 = time.perf_counter()
        self._start.record()

    def stop(self):
        self._end.record()
        self._end.synchronize()
        host = time.perf_counter() - self._t0
        dev = self._elapsed()
        return dev if dev > 0 else host


def median_times(steps, extra_info=None, **kwargs):
    """{name: median seconds per call} from :func:`time_steps`; also stored as
    ``median_s.<name>`` in ``extra_info`` (a pytest-benchmark ``benchmark.extra_info``) when given."""
    medians = {name: r["median_s"] for name, r in time_steps(steps, **kwargs).items()}
    if extra_info is not None:
        extra_info.update({f"median_s.{name}": t for name, t in medians.items()})
    return medians


def time_steps(steps, *, repeats=None, min_time=None, warmup=WARMUP_STEPS, timer=None):
    """Median seconds per call of each zero-argument callable in ``steps`` (name -> callable).

    Warm-up calls first; then each callable's steps-per-round is calibrated so a round lasts about
    ``min_time``; then ``repeats`` rounds, each timing every callable once (rotating the order),
    with the garbage collector off. A round of a fast callable starts with one untimed call, so the
    switch from another peer (its thread pool still spinning, caches holding its arrays) is not
    charged to it. ``timer`` (default: the host clock) has ``start()`` and ``stop() -> seconds``;
    GPU work is timed with :class:`CudaEventTimer`. Returns name -> {median_s, min_s, max_s,
    steps_per_repeat, repeats, samples_s}.
    """
    repeats = env_repeats() if repeats is None else repeats
    min_time = env_min_time() if min_time is None else min_time
    timer = PerfCounterTimer() if timer is None else timer
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    per_round = {}
    for name in names:
        fn, k = steps[name], 1
        while True:
            timer.start()
            for _ in range(k):
                fn()
            dt_ = timer.stop()
            if dt_ >= min_time / 4 or k >= 1 << 22:
                break
            k *= 8 if dt_ < min_time / 64 else 2
        per_round[name] = max(1, math.ceil(min_time * k / max(dt_, 1e-9)))
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
                timer.start()
                for _ in range(k):
                    fn()
                samples[name].append(timer.stop() / k)
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


class _Unavailable(Exception):
    """A (backend, case) combination that cannot run here; the message says why."""


def _state_arrays(opt):
    """The per-element state arrays of an optimizer's first unit (after its first step)."""
    (state,) = opt.state.values()
    return [a for a in state.values() if len(getattr(a, "shape", ())) >= 1]


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


def _as_torch(torch, a, copy):
    """A torch tensor over ``a`` (NumPy: CPU tensor; CuPy/numba device array: CUDA tensor)."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.array(a) if copy else a)
    t = torch.as_tensor(a, device="cuda")  # __cuda_array_interface__: zero-copy
    return t.clone() if copy else t


def _torch_step(case, params, grads, variant, *, share, device="cpu"):
    """(step, None) or (None, reason): torch.optim.<Algo>(<variant>=True) over the arrays."""
    torch = _torch()
    if torch is None:
        return None, "torch is not installed"
    if case.torch_name is None:
        return None, f"torch.optim has no {case.algorithm}"
    cls = getattr(torch.optim, case.torch_class, None)
    if cls is None:
        return None, f"torch {torch.__version__} has no torch.optim.{case.torch_class}"
    if device != "cpu":
        try:
            ok = torch.cuda.is_available()
        except Exception:  # a broken CUDA install
            ok = False
        if not ok:
            return None, f"torch {torch.__version__} has no CUDA device"
    try:
        tensors = [_as_torch(torch, p, copy=not share) for p in params]
        tgrads = [_as_torch(torch, g, copy=not share) for g in grads]
    except Exception as exc:
        return None, f"cannot hand the arrays to torch: {type(exc).__name__}: {exc}"
    for t, g in zip(tensors, tgrads, strict=True):
        t.grad = g
    try:
        opt = cls(tensors, **case.kwargs, **{variant: True})
        opt.step()
    except (TypeError, RuntimeError, ValueError) as exc:
        msg = str(exc).splitlines()[0][:160] if str(exc) else ""
        return None, (
            f"torch.optim.{case.torch_class}({variant}=True) unavailable "
            f"(torch {torch.__version__}): {type(exc).__name__}: {msg}"
        )
    return opt.step, None


def _layout(case, n, many):
    if case.layout == "many":
        return many if many is not None else env_many()
    return 1, (case.n if case.n is not None else n)


def _check_slots(case, states):
    if len(states) != case.state_slots:
        raise AssertionError(
            f"case {case.name}: {case.algorithm}({case.kwargs}) keeps {len(states)} state arrays, "
            f"the case says {case.state_slots}: fix the case's state_slots (and bytes/element)"
        )


def _build(case, n, dtype, seed, many=None):
    """CPU: (elements, params, fastopt step, peer steps, skipped peers, keep-alive, timer)."""
    import fastopt

    rng = np.random.default_rng(seed)
    cls = getattr(fastopt, case.algorithm)
    count, size = _layout(case, n, many)
    ps = fastopt.ParamSet({f"p{i}": np.zeros(size, dtype) for i in range(count)}, dtype=dtype)
    ps.flat[...] = rng.standard_normal(ps.size, dtype=np.float32)
    ps.grad_flat[...] = rng.standard_normal(ps.size, dtype=np.float32)
    opt = cls(ps, backend=CPU_BACKEND, **case.kwargs)
    opt.step()  # compile (or load from the disk cache) and allocate the state
    states = _state_arrays(opt)
    _check_slots(case, states)
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
    return ps.size, count, opt.step, peers, skipped, keep, PerfCounterTimer()


def _cupy_usable():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _build_gpu(case, n, dtype, seed, backend, many=None):
    """GPU (``cupy`` or ``numba-cuda`` backend): same tuple as :func:`_build`.

    With CuPy the parameters are a device ParamSet (``device="cuda"``); with numba-cuda alone they
    are a list of numba device arrays (so the "many" layout needs CuPy). Peers: the device copy
    roofline and torch on CUDA tensors over the same memory; the NumPy peer is host-only.
    """
    import fastopt

    rng = np.random.default_rng(seed)
    cls = getattr(fastopt, case.algorithm)
    count, size = _layout(case, n, many)
    host_p = rng.standard_normal(count * size, dtype=np.float32).astype(dtype)
    host_g = rng.standard_normal(count * size, dtype=np.float32).astype(dtype)
    keep = []
    if _cupy_usable():
        import cupy

        library = "cupy"
        ps = fastopt.ParamSet(
            {f"p{i}": np.zeros(size, dtype) for i in range(count)}, dtype=dtype, device="cuda"
        )
        ps.flat[...] = cupy.asarray(host_p)
        ps.grad_flat[...] = cupy.asarray(host_g)
        opt = cls(ps, backend=backend, **case.kwargs)
        step = opt.step
        params = [ps[name] for name in ps.names]
        grads = [ps.grads[name] for name in ps.names]
        keep += [ps]
    else:
        if backend == "cupy":
            raise _Unavailable("CuPy cannot see a CUDA device")
        if count > 1:
            raise _Unavailable("the many-parameter case on a GPU needs CuPy (a device ParamSet)")
        from numba import cuda

        library = "numba-cuda"
        p, g = cuda.to_device(host_p), cuda.to_device(host_g)
        opt = cls([p], backend=backend, **case.kwargs)

        def step():
            opt.step([g])

        params, grads = [p], [g]
    step()  # compile and allocate the state
    _check_slots(case, _state_arrays(opt))
    keep += [opt, params, grads]
    elements = count * size
    bpe = case.bytes_per_element(np.dtype(dtype).itemsize)
    peers = {"roofline": roofline.device_copy_step(bpe * elements, library)}
    skipped = {"numpy": "the NumPy peer runs on the host only"}
    share = case.layout != "many"
    for variant in ("foreach", "fused"):
        tstep, why = _torch_step(case, params, grads, variant, share=share, device="cuda")
        if tstep is None:
            skipped[f"torch_{variant}"] = why
        else:
            peers[f"torch_{variant}"] = tstep
    return elements, count, step, peers, skipped, keep, CudaEventTimer(library)


# --------------------------------------------------------------------------------- one case
def run_case(
    case,
    *,
    n=None,
    dtype="float32",
    backend=CPU_BACKEND,
    many=None,
    repeats=None,
    min_time=None,
    peers=None,
    match_threads=True,
    seed=0,
    on_fastopt=None,
):
    """Run one case (a Case or its name) against its peers; return a JSON-serialisable dict.

    ``n`` overrides FASTOPT_BENCH_N for flat cases and ``many`` = (count, size) FASTOPT_BENCH_MANY;
    ``backend`` is ``numba-cpu`` or a GPU backend (``cupy``, ``numba-cuda``); ``peers``
    restricts the peers (names from PEERS); ``match_threads`` runs torch with Numba's thread count
    (restored afterwards); ``on_fastopt(step, steps_per_repeat)`` is called with the live fastopt
    step after timing (the pytest-benchmark tests hand it to ``benchmark.pedantic``).
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
        if backend == CPU_BACKEND:
            built = _build(case, n, dtype, seed, many)
        else:
            built = _build_gpu(case, n, dtype, seed, backend, many)
        elements, count, step, peer_steps, skipped, keep, timer = built
        if peers is not None:
            peer_steps = {k: v for k, v in peer_steps.items() if k in peers}
            skipped = {k: v for k, v in skipped.items() if k in peers}
        repeats = env_repeats() if repeats is None else int(repeats)
        min_time = env_min_time() if min_time is None else float(min_time)
        timings = time_steps(
            {"fastopt": step, **peer_steps}, repeats=repeats, min_time=min_time, timer=timer
        )
        if on_fastopt is not None:
            on_fastopt(step, timings["fastopt"]["steps_per_repeat"])
        torch_threads = torch.get_num_threads() if torch is not None else None
        del keep, step, peer_steps, built
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
        "backend": backend,
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
OPTIONAL_PACKAGES = ("torch", "cupy", "numba-cuda", "mpi4py", "matplotlib")


def package_version(name):
    """Installed version of a distribution (``cupy`` matches ``cupy-cuda12x`` etc.), or None.
    Reads package metadata only: nothing is imported."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    if name == "cupy":
        for dist in importlib.metadata.distributions():
            dname = (dist.metadata.get("Name") or "").lower()
            if dname.startswith("cupy"):
                return f"{dist.version} ({dname})"
    return None


def threading_layers():
    """{layer: available?} for Numba's threading layers (tbb, omp, workqueue)."""
    out = {}
    for layer, module in (("tbb", "tbbpool"), ("omp", "omppool"), ("workqueue", "workqueue")):
        try:
            importlib.import_module(f"numba.np.ufunc.{module}")
            out[layer] = True
        except Exception:
            out[layer] = False
    return out


def gpu_info():
    """[{index, name, memory_gib, compute_capability, via}] of the CUDA GPUs, asked of CuPy, then
    numba.cuda, then torch; [] when none answers. Never raises."""
    try:
        import cupy

        out = []
        for i in range(cupy.cuda.runtime.getDeviceCount()):
            p = cupy.cuda.runtime.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
            out.append(
                {
                    "index": i,
                    "name": name,
                    "memory_gib": round(p["totalGlobalMem"] / 2**30, 1),
                    "compute_capability": f"{p['major']}.{p['minor']}",
                    "via": "cupy",
                }
            )
        if out:
            return out
    except Exception:
        pass
    try:
        if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            from numba import cuda

            if cuda.is_available():
                out = []
                for gpu in cuda.gpus:
                    with gpu:
                        ctx = cuda.current_context()
                        free, total = ctx.get_memory_info()
                        name = gpu.name.decode() if isinstance(gpu.name, bytes) else str(gpu.name)
                        out.append(
                            {
                                "index": int(gpu.id),
                                "name": name,
                                "memory_gib": round(total / 2**30, 1),
                                "compute_capability": ".".join(map(str, gpu.compute_capability)),
                                "via": "numba.cuda",
                            }
                        )
                if out:
                    return out
    except Exception:
        pass
    try:
        version = package_version("torch")
        if version is not None and "+cpu" not in version:  # a CPU-only build: skip the import
            import torch

            if torch.cuda.is_available():
                out = []
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    out.append(
                        {
                            "index": i,
                            "name": p.name,
                            "memory_gib": round(p.total_memory / 2**30, 1),
                            "compute_capability": f"{p.major}.{p.minor}",
                            "via": "torch",
                        }
                    )
                return out
    except Exception:
        pass
    return []


def _cpu_model():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def machine_info(gpus=False):
    """CPU model, cores, Numba threading layer and threads, library versions (and, with
    ``gpus=True``, the CUDA GPUs and the backends' availability)."""
    import numba

    import fastopt
    from fastopt.kernels import cpu

    info = {
        "cpu_model": _cpu_model(),
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
    if gpus:
        info["gpus"] = gpu_info()
        info["backends"] = [
            {"name": name, "available": ok, "detail": why} for name, ok, why in fastopt.backends()
        ]
    return info


def environment():
    """Everything ``fastopt info`` reports, as a JSON-serialisable dict:

    ``fastopt``, ``python`` (version, implementation, executable), ``platform``, ``cpu``
    (model, logical_cores, usable_cores), ``versions`` (numpy, numba, llvmlite and the optional
    torch, cupy, numba-cuda, mpi4py, matplotlib: None when not installed), ``numba`` (threading
    layer in use, configured layer, available layers, threads, NUMBA_NUM_THREADS),
    ``backends`` ([{name, available, detail}]: what it runs on, or why it is unavailable) and
    ``gpus`` (see :func:`gpu_info`).
    """
    import sys

    import llvmlite
    import numba

    import fastopt
    from fastopt.kernels import cpu

    try:
        layer = cpu.threading_layer()
    except Exception as exc:  # no layer can start
        layer = f"unavailable ({type(exc).__name__}: {exc})"
    versions = {"numpy": np.__version__, "numba": numba.__version__}
    versions["llvmlite"] = llvmlite.__version__
    for name in OPTIONAL_PACKAGES:
        versions[name] = package_version(name)
    return {
        "fastopt": fastopt.__version__,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "usable_cores": (
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            ),
        },
        "versions": versions,
        "numba": {
            "threading_layer": layer,
            "configured_layer": numba.config.THREADING_LAYER,
            "available_layers": threading_layers(),
            "threads": numba.get_num_threads(),
            "NUMBA_NUM_THREADS": numba.config.NUMBA_NUM_THREADS,
            "cuda_simulator": os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
        },
        "backends": [
            {"name": name, "available": ok, "detail": why} for name, ok, why in fastopt.backends()
        ],
        "gpus": gpu_info(),
    }


def gpu_backends(requested=None):
    """[(name, runnable?, reason)] for the GPU backends. A backend that is available only through
    Numba's CUDA simulator is not run unless ``requested`` names it (its timings mean nothing)."""
    import fastopt

    out = []
    for name, ok, why in fastopt.backends():
        if name not in GPU_BACKENDS:
            continue
        if ok and "simulator" in why.lower() and not (requested and name in requested):
            ok, why = False, f"{why}: simulated timings mean nothing (ask for it by name to run it)"
        out.append((name, ok, why))
    return out


# --------------------------------------------------------------------------------- a suite
def run_suite(
    cases,
    *,
    sizes,
    dtypes=("float32",),
    backends=(CPU_BACKEND,),
    many=None,
    repeats=5,
    min_time=0.1,
    peers=None,
    quick=False,
    progress=None,
):
    """Run ``cases`` for every backend, dtype and size; return the results document.

    Sized cases (one flat parameter) run at every size in ``sizes``; a case with a fixed size
    (``adam_tiny``) or the many-parameter layout (``many`` = (count, size)) runs once per backend
    and dtype. ``progress(i, total, label, result_or_None, error_or_None)`` is called after each
    run. A combination that cannot run (e.g. the many case on numba-cuda without CuPy) is listed
    under ``errors`` and the rest go on.
    """
    plan = []
    for backend in backends:
        for dtype in dtypes:
            for case in cases:
                for n in sizes if case.sized else (None,):
                    plan.append((backend, np.dtype(dtype).name, n, case))
    started = dt.datetime.now(dt.timezone.utc).astimezone()
    results, errors = [], []
    many = tuple(many) if many is not None else DEFAULT_MANY
    for i, (backend, dtype, n, case) in enumerate(plan, 1):
        size = n if n is not None else (case.n if case.n is not None else many[0] * many[1])
        label = f"{case.name} {dtype} {size:,} on {backend}"
        try:
            res = run_case(
                case,
                n=n,
                dtype=dtype,
                backend=backend,
                many=many,
                repeats=repeats,
                min_time=min_time,
                peers=peers,
            )
        except (_Unavailable, MemoryError) as exc:
            err = {
                "case": case.name,
                "backend": backend,
                "dtype": dtype,
                "elements": size,
                "reason": str(exc) or type(exc).__name__,
            }
            errors.append(err)
            if progress:
                progress(i, len(plan), label, None, err["reason"])
            continue
        except Exception as exc:
            if backend == CPU_BACKEND:
                raise
            # A GPU stack can fail in many ways; record it and go on with the rest.
            err = {
                "case": case.name,
                "backend": backend,
                "dtype": dtype,
                "elements": size,
                "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
            }
            errors.append(err)
            if progress:
                progress(i, len(plan), label, None, err["reason"])
            continue
        results.append(res)
        if progress:
            progress(i, len(plan), label, res, None)
    machine = machine_info(gpus=any(b != CPU_BACKEND for b in backends))
    return {
        "schema": SCHEMA,
        "date": started.date().isoformat(),
        "datetime": started.isoformat(),
        "source": "fastopt bench",
        "machine": machine,
        "machine_collected_at_report_time": False,
        "commit_info": None,
        "settings": {
            "cases": [c.name for c in cases],
            "sizes": list(sizes),
            "many": list(many),
            "dtypes": [np.dtype(d).name for d in dtypes],
            "backends": list(backends),
            "repeats": repeats,
            "min_time_s": min_time,
            "quick": bool(quick),
        },
        "cases": results,
        "goals": _goals(results),
        "errors": errors,
    }


def _goals(results):
    return [
        {"case": c["case"], "backend": c.get("backend", CPU_BACKEND), "dtype": c["dtype"], **g}
        for c in results
        for g in c.get("goals", [])
    ]


# --------------------------------------------------------------------------------- documents
def from_pytest_benchmark(data, source):
    """The results document of a ``pytest bench/ --benchmark-json=FILE`` JSON (already loaded).

    The numbers come from each benchmark's ``extra_info`` (:func:`run_case`: fastopt and its peers
    timed in one interleaved run); pytest-benchmark's own statistics of the fastopt step are kept
    per case under ``pytest_benchmark``. Machine details come from the JSON (recorded where it
    ran, by ``bench/conftest.py``); if absent they are collected now and marked as such.
    """
    cases = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        if "case" not in info or "median_s" not in info:
            continue
        row = dict(info)
        row.setdefault("backend", CPU_BACKEND)
        st = b.get("stats") or {}
        row["pytest_benchmark"] = {
            "name": b.get("fullname"),
            "median_s": st.get("median"),
            "mean_s": st.get("mean"),
            "stddev_s": st.get("stddev"),
            "min_s": st.get("min"),
            "rounds": st.get("rounds"),
            "iterations": st.get("iterations"),
        }
        cases.append(row)
    mi = (data.get("machine_info") or {}).get("fastopt_bench")
    collected_now = mi is None
    machine = machine_info() if collected_now else dict(mi)
    when = data.get("datetime")
    date = (dt.datetime.fromisoformat(when) if when else dt.datetime.now(dt.timezone.utc)).date()
    return {
        "schema": SCHEMA,
        "date": date.isoformat(),
        "datetime": when,
        "source": str(source),
        "machine": machine,
        "machine_collected_at_report_time": collected_now,
        "commit_info": data.get("commit_info"),
        "pytest_benchmark_version": data.get("version"),
        "settings": None,
        "cases": cases,
        "goals": _goals(cases),
        "errors": [],
    }


def validate_results(doc):
    """Raise ValueError naming the first problem if ``doc`` is not a results document."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    for key in ("schema", "date", "machine", "cases", "goals"):
        if key not in doc:
            raise ValueError(f"no {key!r} field")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"schema {doc['schema']!r}, expected {SCHEMA!r}")
    if not isinstance(doc["cases"], list):
        raise ValueError("'cases' is not a list")
    for i, c in enumerate(doc["cases"]):
        missing = [k for k in CASE_FIELDS if k not in c]
        if missing:
            raise ValueError(f"cases[{i}] lacks {', '.join(missing)}")


def load_results(path):
    """A results document from a file: ``fastopt bench`` JSON or pytest-benchmark JSON of
    ``bench/``. ValueError (readable, naming the file) for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text (JSON) file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if isinstance(data, dict) and "benchmarks" in data:
        benchmarks = data["benchmarks"] if isinstance(data["benchmarks"], list) else []
        if not any(
            isinstance(b, dict) and "case" in (b.get("extra_info") or {}) for b in benchmarks
        ):
            raise ValueError(f"{path}: a pytest-benchmark JSON without fastopt bench/ cases")
        return from_pytest_benchmark(data, path)
    try:
        validate_results(data)
    except ValueError as exc:
        raise ValueError(
            f"{path}: neither a fastopt bench JSON nor a pytest-benchmark JSON ({exc})"
        ) from None
    return data


# --------------------------------------------------------------------------------- formatting
PEER_COLUMNS = (
    ("numpy", "vs NumPy"),
    ("torch_foreach", "vs torch foreach"),
    ("torch_fused", "vs torch fused"),
    ("single_param", "vs 1 param"),
    ("fastopt_list", "vs fastopt list"),
)


def fmt_time(s):
    if s is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_si(x):
    if x is None:
        return "—"
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:.3g}"


def fmt_num(x, suffix=""):
    return "—" if x is None else f"{x:.3g}{suffix}"


def _present_peers(cases):
    return [
        (k, t)
        for k, t in PEER_COLUMNS
        if any(k in c["speedup_vs"] or k in c.get("skipped_peers", {}) for c in cases)
    ]


def table_rows(doc, unicode=True):
    """(header, rows) of the results table: one row per case result."""
    cases = doc["cases"]
    present = _present_peers(cases)
    head = [
        "backend",
        "dtype",
        "case",
        "elements",
        "B/elt",
        "time/step",
        "elements/s",
        "GB/s",
        "roofline GB/s",
        "of roofline",
        "spread",
    ] + [t for _, t in present]
    rows = []
    for c in cases:
        cells = [
            c.get("backend", CPU_BACKEND),
            c["dtype"],
            c["case"] + (f" ({c['params']} params)" if c.get("params", 1) > 1 else ""),
            f"{c['elements']:,}",
            str(c["bytes_per_element"]),
            fmt_time(c["median_s"]),
            fmt_si(c["elements_per_s"]),
            fmt_num(c["gb_per_s"]),
            fmt_num(c.get("roofline_gb_per_s")),
            fmt_num(c.get("fraction_of_roofline")),
            fmt_num((c.get("best_of_repeats") or {}).get("spread")),
        ]
        for k, _ in present:
            if k in c["speedup_vs"]:
                cells.append(fmt_num(c["speedup_vs"][k], "x"))
            elif k in c.get("skipped_peers", {}):
                cells.append("n/a")
            else:
                cells.append("—" if unicode else "-")
        if not unicode:
            cells = [x.replace("—", "-").replace("µs", "us") for x in cells]
        rows.append(cells)
    return head, rows


def format_table(doc, unicode=True):
    """The results as an aligned plain-text table, with a legend and the unavailable peers."""
    head, rows = table_rows(doc, unicode)
    numeric = [i >= 3 for i in range(len(head))]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]

    def line(cells):
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    if not rows:
        out.append("(no results)")
    out += [
        "",
        "time/step: median seconds per opt.step() over interleaved rounds (fastopt and every peer "
        "timed round by round). GB/s = bytes/element x elements / time. of roofline = roofline "
        "time / fastopt time (1 = at the memory ceiling). vs X = X's time / fastopt's time (>1: "
        "fastopt is faster). n/a: peer unavailable. spread = slowest/fastest round (>1.1: noisy).",
    ]
    skipped = sorted(
        {(p, why) for c in doc["cases"] for p, why in c.get("skipped_peers", {}).items()}
    )
    if skipped:
        out += ["", "Unavailable peers:"]
        out += [f"  {p}: {why}" for p, why in skipped]
    for e in doc.get("errors") or []:
        out.append(
            f"not run: {e['case']} {e['dtype']} {e['elements']:,} on {e['backend']}: {e['reason']}"
        )
    text = "\n".join(out) + "\n"
    if not unicode:
        text = text.replace("—", "-").replace("µ", "u")
    return text


def _count(n, noun):
    """``1 thread``, ``2 threads``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def markdown(doc):
    """The results document as Markdown: machine, results table, goals, unavailable peers."""
    m = doc["machine"]
    title = (
        "GPU and CPU"
        if any(c.get("backend", CPU_BACKEND) != CPU_BACKEND for c in doc["cases"])
        else "CPU"
    )
    lines = [f"# fastopt {title} benchmark, {doc['date']}", ""]
    if doc.get("machine_collected_at_report_time"):
        lines += [
            "> Machine details were not in the benchmark JSON; collected when the report was "
            "made (may differ from the machine that ran it).",
            "",
        ]
    lines += [
        f"- CPU: {m.get('cpu_model')}; {_count(m.get('logical_cores'), 'logical core')} "
        f"({m.get('usable_cores')} usable)",
        f"- Numba {m.get('numba')}, threading layer `{m.get('numba_threading_layer')}`, "
        f"{_count(m.get('numba_threads'), 'thread')}",
        f"- NumPy {m.get('numpy')}; torch {m.get('torch') or 'not installed'}"
        + (
            f" ({_count(m.get('torch_threads'), 'thread')} by default; run with Numba's thread count)"
            if m.get("torch")
            else ""
        ),
        f"- Python {m.get('python')}; {m.get('platform')}; fastopt {m.get('fastopt')}",
    ]
    for g in m.get("gpus") or []:
        lines.append(f"- GPU {g['index']}: {g['name']} ({g['memory_gib']} GiB)")
    ci = doc.get("commit_info") or {}
    if ci.get("id"):
        lines.append(f"- Commit {ci['id'][:12]}{' (dirty tree)' if ci.get('dirty') else ''}")
    lines.append(f"- Benchmark run: {doc.get('datetime')} ({doc.get('source')})")
    lines += ["", "## Results", ""]
    head, rows = table_rows(doc)
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [
        "",
        "Median seconds per `opt.step()` from one interleaved run per case (fastopt and every "
        "peer timed round by round, order rotated). *of roofline* = time of a kernel with the same "
        "loads and stores per element and trivial arithmetic, on the same arrays / fastopt's time "
        "(on a GPU: a device-to-device copy of the same bytes). *vs X* = X's time / fastopt's time "
        "(above 1: fastopt is faster). *n/a*: peer unavailable (see below); —: not a peer of that "
        "case. *spread* = slowest / fastest round of fastopt (well above 1.1: a noisy machine).",
        "",
        "## Goals",
        "",
        "| case | backend | dtype | goal | value | status |",
        "|---|---|---|---|---:|---|",
    ]
    for g in doc["goals"]:
        value = "—" if g["value"] is None else f"{g['value']:.3g}"
        status = {"pass": "pass", "fail": "**FAIL**", "skipped": "skipped"}[g["status"]]
        lines.append(
            f"| {g['case']} | {g.get('backend', CPU_BACKEND)} | {g.get('dtype', '')} "
            f"| {g['goal']} | {value} | {status} |"
        )
    skipped = sorted(
        {(p, why) for c in doc["cases"] for p, why in c.get("skipped_peers", {}).items()}
    )
    if skipped:
        lines += ["", "## Unavailable peers", ""]
        lines += [f"- `{p}`: {why}" for p, why in skipped]
    if doc.get("errors"):
        lines += ["", "## Not run", ""]
        lines += [
            f"- {e['case']} {e['dtype']} {e['elements']:,} on {e['backend']}: {e['reason']}"
            for e in doc["errors"]
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- chart
CHART_DPI = 100
CHART_PANEL_HEIGHT_PX = 360
CHART_MIN_WIDTH_PX = 900
CHART_PX_PER_CASE = 70


def chart_panels(doc):
    """[((backend, dtype, elements), [case results])] in first-seen order: one chart panel each."""
    panels = {}
    for c in doc["cases"]:
        key = (c.get("backend", CPU_BACKEND), c["dtype"], c["elements"])
        panels.setdefault(key, []).append(c)
    return list(panels.items())


def chart_size(doc):
    """(width, height) in pixels of :func:`plot_chart`'s PNG: one panel per (backend, dtype,
    elements), ``CHART_PANEL_HEIGHT_PX`` high; ``max(CHART_MIN_WIDTH_PX, CHART_PX_PER_CASE x the
    most cases in a panel + 200)`` wide."""
    panels = chart_panels(doc)
    most = max((len(cs) for _, cs in panels), default=1)
    width = max(CHART_MIN_WIDTH_PX, CHART_PX_PER_CASE * most + 200)
    return width, CHART_PANEL_HEIGHT_PX * max(1, len(panels))


def plot_chart(doc, path):
    """Write a PNG bar chart of the results: per (backend, dtype, elements) panel, the GB/s of
    fastopt and of each peer (the same bytes / the peer's time) per case, log scale, with the
    fraction of roofline printed over fastopt's bar. Returns (width, height) in pixels.
    Needs matplotlib (``pip install 'fastopt[plot]'``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = chart_size(doc)
    panels = chart_panels(doc)
    fig, axes = plt.subplots(
        max(1, len(panels)),
        1,
        figsize=(width / CHART_DPI, height / CHART_DPI),
        dpi=CHART_DPI,
        squeeze=False,
    )
    colors = {
        "fastopt": "#1f77b4",
        "roofline": "#7f7f7f",
        "numpy": "#2ca02c",
        "torch_foreach": "#ff7f0e",
        "torch_fused": "#d62728",
    }
    series = ("fastopt",) + CHART_PEERS
    for ax, ((backend, dtype, elements), cases) in zip(axes[:, 0], panels):
        x = np.arange(len(cases))
        present = [s for s in series if s == "fastopt" or any(s in c["timings"] for c in cases)]
        w = 0.8 / len(present)
        for j, s in enumerate(present):
            vals = []
            for c in cases:
                t = c["timings"].get(s, {}).get("median_s")
                vals.append(c["bytes_per_element"] * c["elements"] / t / 1e9 if t else np.nan)
            bars = ax.bar(x + (j - (len(present) - 1) / 2) * w, vals, w, label=s, color=colors[s])
            if s == "fastopt":
                for b, c in zip(bars, cases):
                    f = c.get("fraction_of_roofline")
                    if f is not None and np.isfinite(b.get_height()):
                        ax.annotate(
                            f"{f:.2f}",
                            (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center",
                            va="bottom",
                            fontsize=7,
                        )
        ax.set_yscale("log")
        finite = [
            b.get_height()
            for container in ax.containers
            for b in container
            if np.isfinite(b.get_height()) and b.get_height() > 0
        ]
        if finite:  # headroom for the legend and the labels above the bars
            ax.set_ylim(min(finite) / 2, max(finite) * 12)
        ax.set_xticks(x)
        ax.set_xticklabels([c["case"] for c in cases], rotation=30, ha="right", fontsize=8)
        params = {c.get("params", 1) for c in cases}
        what = f"{elements:,} elements" + (
            f" in {max(params)} params" if max(params) > 1 and len(params) == 1 else ""
        )
        ax.set_title(
            f"{backend}, {dtype}, {what}: GB/s (number: fraction of roofline)", fontsize=10
        )
        ax.set_ylabel("GB/s")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=len(present), loc="upper center", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=CHART_DPI, format="png")
    plt.close(fig)
    return width, height


def write_outputs(doc, prefix, *, chart=True, md=True):
    """Write ``prefix.json`` (and ``prefix.md``, ``prefix.png``); return {kind: path}. The chart
    is skipped, with the reason under ``"chart_skipped"``, when matplotlib is missing."""
    import pathlib

    prefix = pathlib.Path(prefix)
    if prefix.parent and not prefix.parent.exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    json_path = prefix.with_name(prefix.name + ".json")
    json_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    out["json"] = str(json_path)
    if md:
        md_path = prefix.with_name(prefix.name + ".md")
        md_path.write_text(markdown(doc), encoding="utf-8")
        out["md"] = str(md_path)
    if chart:
        if package_version("matplotlib") is None:
            out["chart_skipped"] = "matplotlib is not installed (pip install 'fastopt[plot]')"
        else:
            png = prefix.with_name(prefix.name + ".png")
            plot_chart(doc, png)
            out["png"] = str(png)
    return out
