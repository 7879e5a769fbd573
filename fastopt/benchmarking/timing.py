"""Interleaved timing: every step callable timed round by round (the order rotating each round, so
drift and noise hit every peer alike) and reported as medians; host and CUDA-event timers."""

import gc
import math
import statistics
import time

from .settings import WARMUP_STEPS, env_min_time, env_repeats


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
            elapsed = timer.stop()
            if elapsed >= min_time / 4 or k >= 1 << 22:
                break
            k *= 8 if elapsed < min_time / 64 else 2
        per_round[name] = max(1, math.ceil(min_time * k / max(elapsed, 1e-9)))
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
