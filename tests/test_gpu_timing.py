"""The timing method of the GPU benchmarks (``fastopt/benchmarking/gpu_timing.py``), on the CPU
with fake timers and clocks, and ``bench/test_bench_gpu.py`` imported against a fake CuPy."""

import importlib.util
import pathlib
import sys
import types

import pytest

from fastopt.benchmarking import gpu_timing

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "test_bench_gpu.py"


class FakeClock:
    def __init__(self, tick=0.1):
        self.t, self.tick = 0.0, tick

    def __call__(self):
        self.t += self.tick
        return self.t


def test_bandwidth_goal_only_above_l2():
    assert gpu_timing.L2_SAFE_ELEMENTS == 1 << 24
    assert not gpu_timing.bandwidth_goal_applies((1 << 24) - 1)
    assert gpu_timing.bandwidth_goal_applies(1 << 24)
    assert gpu_timing.bandwidth_goal_applies(1 << 28)


def test_warm_up_runs_every_peer_for_the_time_given():
    calls, syncs = [], []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    rounds = gpu_timing.warm_up(steps, 0.25, lambda: syncs.append(1), clock=FakeClock(0.1))
    # the clock advances 0.1 per read: 0.1 at the start, 0.2, 0.3, 0.4 after rounds 1-3
    assert rounds == 3 and calls == ["a", "b"] * 3 and syncs == [1]
    calls.clear()
    assert gpu_timing.warm_up(steps, 0.0, lambda: None, clock=FakeClock()) == 1
    assert calls == ["a", "b"]


def test_host_and_event_timer_reports_both_clocks():
    log = []

    class Event:
        def __init__(self):
            self.name = f"e{len(log)}"
            log.append(("made", self.name))

        def record(self):
            log.append(("record", self.name))

        def synchronize(self):
            log.append(("sync", self.name))

    timer = gpu_timing.HostAndEventTimer(Event, lambda a, b: 0.5, clock=FakeClock(0.25))
    timer.start()
    assert timer.stop() == (0.25, 0.5)
    assert log[2:] == [("record", "e0"), ("record", "e1"), ("sync", "e1")]


class ScriptedTimer:
    """Returns (host, device) seconds per run from a table keyed by the peer last run."""

    def __init__(self, table, order):
        self.table, self.order, self.current = table, order, None

    def start(self):
        pass

    def stop(self):
        return self.table[self.order[-1]]


def test_interleaved_rotates_and_reports_medians():
    order, syncs = [], []
    table = {"torch": (0.9, 0.3), "fastopt": (0.1, 0.2)}
    steps = {name: (lambda n=name: order.append(n)) for name in table}
    timer = ScriptedTimer(table, order)
    out = gpu_timing.interleaved(steps, timer, lambda: syncs.append(1), repeats=3, iters=2)
    runs = order[::2]  # each run is 2 calls of one peer
    assert runs == ["torch", "fastopt", "fastopt", "torch", "torch", "fastopt"]
    assert len(syncs) == 6  # the device idle before every run
    assert out["torch"]["device_s"] == pytest.approx(0.15)
    assert out["torch"]["host_s"] == pytest.approx(0.45)
    assert out["torch"]["host_bound"] is True and out["fastopt"]["host_bound"] is False
    assert len(out["fastopt"]["device_samples_s"]) == 3


def _fake_cupy():
    events = []

    class Event:
        def __init__(self):
            events.append(self)

        def record(self):
            pass

        def synchronize(self):
            pass

    class Device:
        def synchronize(self):
            pass

    cuda = types.SimpleNamespace(
        Event=Event,
        Device=Device,
        get_elapsed_time=lambda a, b: 2.0,  # milliseconds
    )
    return types.SimpleNamespace(cuda=cuda, float32="float32", __version__="fake"), events


def test_bench_module_imports_and_compares_with_a_fake_cupy(monkeypatch):
    from fastopt.kernels import cupy as kcupy

    fake, events = _fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(kcupy, "available", lambda: (True, "fake CuPy"))
    monkeypatch.setenv("FASTOPT_BENCH_GPU_WARMUP_S", "0")
    monkeypatch.setenv("FASTOPT_BENCH_GPU_REPEATS", "3")
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    names = [n for n in vars(bench) if n.startswith("test_")]
    assert set(names) == {
        "test_adam_vs_copy",
        "test_adamw_one_large_tensor_vs_torch_fused",
        "test_adamw_many_tensors_vs_torch_fused",
        "test_host_time_per_step",
        "test_adamw_bf16_vs_torch_fused",
        "test_torch_adamw_transformer_vs_torch_fused",
        "test_cpu_offload_vs_plain_torch_offload",
    }
    calls = []
    results = bench.compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")})
    assert results["a"]["device_s"] == pytest.approx(2e-3 / bench.ITERS)
    assert calls.count("a") == calls.count("b") == 1 + 3 * bench.ITERS  # warm-up + 3 rounds
    info = bench._info(results)
    assert {"a_s_per_step", "a_host_s_per_step", "a_host_bound", "b_s_all"} <= set(info)
    monkeypatch.setattr(bench, "N", 1 << 20)
    with pytest.raises(pytest.skip.Exception, match="below"):
        bench._goal_size_or_skip({}, "Adam")
    monkeypatch.setattr(bench, "N", 1 << 24)
    record = {}
    bench._goal_size_or_skip(record, "Adam")
    assert record["goal_size_met"] is True
