"""How the GPU benchmarks (``bench/test_bench_gpu.py``) time their peers: a fixed-time warm-up
(the SM clock idles low), then rounds that time every peer once, in an order rotating each round
(as :func:`fastopt.benchmarking.timing.time_steps` does on the CPU), each run timed both by the
host clock (how long the Python calls took to return: a host-bound peer, such as torch's fused
AdamW over 500 tensors, shows here) and by CUDA events (the device time between the first
launch and the end of the last one). Nothing here imports a GPU library: the timers and the
synchronisation are passed in, so the logic is tested on the CPU with fakes.
"""

import statistics
import time

L2_SAFE_ELEMENTS = 1 << 24
"""Bandwidth goals are asserted only at sizes of at least this many elements: an H200's L2
cache holds 60 MB, and 2**24 float32 elements (64 MiB per array) do not fit in it."""


def bandwidth_goal_applies(n):
    """Whether a bandwidth goal measured on ``n`` elements is a statement about DRAM (not L2)."""
    return int(n) >= L2_SAFE_ELEMENTS


def warm_up(steps, seconds, sync, clock=time.perf_counter):
    """Call every peer of ``steps`` (name -> callable), in turn, until ``seconds`` have passed
    (each at least once), then ``sync()``; returns the number of rounds."""
    t0, rounds = clock(), 0
    while True:
        for fn in steps.values():
            fn()
        rounds += 1
        if clock() - t0 >= seconds:
            break
    sync()
    return rounds


class HostAndEventTimer:
    """Times a run both ways: ``start()`` reads the host clock and records a start event;
    ``stop()`` reads the host clock (the calls have returned), records the end event, waits
    for it and returns ``(host seconds, device seconds)``. ``make_event()`` returns an object
    with ``record()`` and ``synchronize()``; ``elapsed(start, end)`` the seconds between two
    recorded events (CuPy: ``cupy.cuda.Event`` and ``get_elapsed_time / 1e3``)."""

    def __init__(self, make_event, elapsed, clock=time.perf_counter):
        self._start, self._end = make_event(), make_event()
        self._elapsed, self._clock = elapsed, clock

    def start(self):
        self._t0 = self._clock()
        self._start.record()

    def stop(self):
        host = self._clock() - self._t0
        self._end.record()
        self._end.synchronize()
        return host, self._elapsed(self._start, self._end)


def interleaved(steps, timer, sync, *, repeats, iters):
    """Median seconds per call of each peer in ``steps`` (name -> zero-argument callable).

    ``repeats`` rounds; in round r the peers run in the order rotated by r, each ``iters``
    back-to-back calls timed by ``timer`` (:class:`HostAndEventTimer`), with the device idle
    (``sync()``) before each run. Returns name -> {``device_s``, ``host_s`` (medians per
    call), ``device_samples_s``, ``host_samples_s``, ``host_bound`` (the calls took longer to
    issue than the device to run them)}."""
    names = list(steps)
    host = {n: [] for n in names}
    device = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = steps[name]
            sync()
            timer.start()
            for _ in range(iters):
                fn()
            h, d = timer.stop()
            host[name].append(h / iters)
            device[name].append(d / iters)
    out = {}
    for n in names:
        h, d = statistics.median(host[n]), statistics.median(device[n])
        out[n] = {
            "device_s": d,
            "host_s": h,
            "device_samples_s": device[n],
            "host_samples_s": host[n],
            "host_bound": h >= d,
        }
    return out
