"""Running the benchmarks: one case against its peers (:func:`run_case`, a JSON-serialisable
dict), a whole suite over backends, dtypes and sizes (:func:`run_suite`, the results document),
and which GPU backends can run here (:func:`gpu_backends`)."""

import datetime as dt
import gc

from .. import __version__, arrays
from ..dispatch import backends
from ..machine import machine_info
from .cases import CASES_BY_NAME, check_goal
from .peers import Unavailable, build_cpu, build_gpu, import_torch
from .report import SCHEMA, goal_rows
from .settings import (
    CPU_BACKEND,
    DEFAULT_MANY,
    GPU_BACKENDS,
    WARMUP_STEPS,
    env_min_time,
    env_n,
    env_repeats,
)
from .timing import time_steps


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
    ``dtype`` is the storage dtype of parameters, gradients and state (float32, float64, bfloat16,
    float16: a name or a NumPy dtype);
    ``backend`` is ``numba-cpu`` or a GPU backend (``cupy``, ``numba-cuda``); ``peers``
    restricts the peers (names from PEERS); ``match_threads`` runs torch with Numba's thread count
    (restored afterwards); ``on_fastopt(step, steps_per_repeat)`` is called with the live fastopt
    step after timing (the pytest-benchmark tests hand it to ``benchmark.pedantic``).
    """
    import numba

    if isinstance(case, str):
        case = CASES_BY_NAME[case]
    dtype = arrays.storage_dtype(dtype, "dtype")
    n = env_n() if n is None else int(n)
    torch = import_torch()
    saved_threads = torch.get_num_threads() if torch is not None else None
    if torch is not None and match_threads:
        torch.set_num_threads(numba.get_num_threads())
    try:
        if backend == CPU_BACKEND:
            built = build_cpu(case, n, dtype, seed, many)
        else:
            built = build_gpu(case, n, dtype, seed, backend, many)
        elements, count, step, peer_steps, skipped, keep, timer, traffic = built
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
    bpe = traffic["bytes_per_element"]
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
        "state_bytes_per_element": traffic["state_bytes_per_element"],
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
        "fastopt_version": __version__,
    }
    # Best-of-repeats ratios: on a quiet machine they match the medians; on a busy one they show
    # what the code can reach when it is not descheduled (the goals use the medians).
    best = {p: timings[p]["min_s"] for p in timings}
    result["best_of_repeats"] = {
        "fraction_of_roofline": best["roofline"] / best["fastopt"] if t_roof else None,
        "speedup_vs": {p: best[p] / best["fastopt"] for p in peer_names},
        "spread": timings["fastopt"]["max_s"] / timings["fastopt"]["min_s"],
    }
    result["goals"] = [check_goal(result, g) for g in case.goals_for(dtype.name)]
    return result


def gpu_backends(requested=None):
    """[(name, runnable?, reason)] for the GPU backends. A backend that is available only through
    Numba's CUDA simulator is not run unless ``requested`` names it (its timings mean nothing)."""
    out = []
    for name, ok, why in backends():
        if name not in GPU_BACKENDS:
            continue
        if ok and "simulator" in why.lower() and not (requested and name in requested):
            ok, why = False, f"{why}: simulated timings mean nothing (ask for it by name to run it)"
        out.append((name, ok, why))
    return out


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
                    plan.append((backend, arrays.storage_dtype(dtype).name, n, case))
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
        except (Unavailable, MemoryError) as exc:
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
            "dtypes": [arrays.storage_dtype(d).name for d in dtypes],
            "backends": list(backends),
            "repeats": repeats,
            "min_time_s": min_time,
            "quick": bool(quick),
        },
        "cases": results,
        "goals": goal_rows(results),
        "errors": errors,
    }
