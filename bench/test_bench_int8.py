"""8-bit blockwise optimizer state (``state_dtype="int8"``) against float32 state and
bitsandbytes' ``Adam8bit`` on the CPU, in one interleaved run (``fastopt.benchmarking``).

float32 parameters and gradients, Adam (lr 1e-3), 16M elements; ``FASTOPT_BENCH_INT8_SCALE``
(default 1) divides the size for a quick run. Peers: fastopt with int8 state, fastopt with float32
state, bitsandbytes' ``Adam8bit`` on a torch CPU tensor (skipped when bitsandbytes is missing).
Bytes of optimizer state per parameter are reported beside the times
(``fastopt.memory.state_bytes_per_parameter``). Goals (issue 12): int8 <= 0.6x the time of float32
state (it moves 16 bytes per element against 28, plus the block absmax), and >= 20x bitsandbytes.

Run: ``pytest bench/test_bench_int8.py --benchmark-disable -s`` (prints the table).
"""

import os
import warnings

import numpy as np
import pytest

import fastopt as fo
from fastopt import benchmarking, memory

SCALE = int(os.environ.get("FASTOPT_BENCH_INT8_SCALE", "1"))
ELEMENTS = (1 << 24) // SCALE
_RESULTS = {}


def _bitsandbytes_step(w0, g):
    """A bitsandbytes Adam8bit step over a torch copy of ``w0`` (None without bitsandbytes)."""
    try:
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import bitsandbytes as bnb
    except Exception:  # ImportError, or a broken install
        return None
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    p.grad = torch.from_numpy(g)
    opt = bnb.optim.Adam8bit([p], lr=1e-3)
    opt.step()  # allocates the state
    return opt.step


def measure():
    if _RESULTS:
        return _RESULTS
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(ELEMENTS).astype(np.float32)
    g = (rng.standard_normal(ELEMENTS) * 1e-3).astype(np.float32)
    w8, w32 = w0.copy(), w0.copy()
    int8 = fo.Adam([w8], lr=1e-3, state_dtype="int8")
    f32 = fo.Adam([w32], lr=1e-3)
    peers = {"int8": lambda: int8.step([g]), "float32": lambda: f32.step([g])}
    bnb_step = _bitsandbytes_step(w0, g)
    if bnb_step is not None:
        peers["bitsandbytes_adam8bit"] = bnb_step
    times = benchmarking.median_times(peers)
    out = {
        "elements": ELEMENTS,
        **{f"median_s.{k}": v for k, v in times.items()},
        "state_bytes_per_param.int8": memory.state_bytes_per_parameter(int8),
        "state_bytes_per_param.float32": memory.state_bytes_per_parameter(f32),
        "int8_over_float32": times["int8"] / times["float32"],
    }
    if bnb_step is not None:
        out["speedup_vs_bitsandbytes"] = times["bitsandbytes_adam8bit"] / times["int8"]
    _RESULTS.update(out)
    print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in out.items()})
    return _RESULTS


def test_speed(benchmark):
    result = measure()
    benchmark.extra_info.update(result)
    benchmark.pedantic(lambda: None, rounds=1)
    assert result["median_s.int8"] > 0


def test_goal_vs_float32_state():
    result = measure()
    assert result["int8_over_float32"] <= 0.6, result


def test_goal_vs_bitsandbytes():
    result = measure()
    if "speedup_vs_bitsandbytes" not in result:
        pytest.skip("bitsandbytes is not installed")
    assert result["speedup_vs_bitsandbytes"] >= 20, result
