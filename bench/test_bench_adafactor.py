"""fastopt.Adafactor against torch.optim.Adafactor (its for-loop default and ``foreach=True``) on
the parameter shapes of a small transformer (``transformer_shapes`` of model_shapes.py:
embedding 8000 x 128, 16 blocks of attention and MLP weights with LayerNorms and biases, the
output layer; 197 tensors, 5.2M parameters), float32, in one interleaved run
(``fastopt.benchmarking.median_times``).

Peers: ``fastopt`` (one ParamSet: one kernel call per step), ``fastopt_list`` (the same tensors as
197 arrays: one call each), ``torch`` (``torch.optim.Adafactor`` as shipped: a for-loop over
tensors) and ``torch_foreach``. Goal (issue 15): fastopt >= 5x torch. ``FASTOPT_BENCH_TORCH_SCALE``
(default 1) divides the vocabulary and the widths for a quick run.

Run: ``pytest bench/test_bench_adafactor.py --benchmark-disable -s`` (prints the result).
"""

import os

import numba
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_shapes import transformer_shapes  # noqa: E402

import fastopt as fo  # noqa: E402
from fastopt import benchmarking  # noqa: E402

_RESULT = {}


def _arrays(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) for s in shapes]


def measure():
    if _RESULT:
        return _RESULT
    shapes = transformer_shapes(scale=int(os.environ.get("FASTOPT_BENCH_TORCH_SCALE", "1")))
    params, grads = _arrays(shapes, 0), [1e-3 * g for g in _arrays(shapes, 1)]
    ps = fo.ParamSet({f"p{i}": p for i, p in enumerate(params)})
    for i, g in enumerate(grads):
        ps.grads[f"p{i}"][...] = g
    opt = fo.Adafactor(ps)
    separate = [p.copy() for p in params]
    opt_list = fo.Adafactor(separate)
    peers = {"fastopt": opt.step, "fastopt_list": lambda: opt_list.step(grads)}
    for name, foreach in (("torch", None), ("torch_foreach", True)):
        tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g)
        peers[name] = torch.optim.Adafactor(tensors, foreach=foreach).step
    times = benchmarking.median_times(peers)
    out = {
        "tensors": len(shapes),
        "elements": ps.size,
        "numba_threads": numba.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        **{f"median_s.{k}": v for k, v in times.items()},
    }
    for peer in ("torch", "torch_foreach"):
        out[f"speedup_vs_{peer}"] = times[peer] / times["fastopt"]
    _RESULT.update(out)
    print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in out.items()})
    return out


def test_speed(benchmark):
    result = measure()
    benchmark.extra_info.update(result)
    benchmark.pedantic(lambda: None, rounds=1)
    assert result["median_s.fastopt"] > 0


def test_goal_vs_torch():
    result = measure()
    assert result["speedup_vs_torch"] >= 5.0, result
