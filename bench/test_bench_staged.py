"""What 16-bit and 8-bit storage cost the per-tensor and matrix rules, whose float32 kernels run
between conversion passes (``fastopt/optim/staging.py``), over a small transformer's parameter
shapes (197 tensors, 5.2M elements, ``model_shapes.transformer_shapes``), one ParamSet, in one
interleaved run per rule (``fastopt.benchmarking.median_times``):

- ``float32``: float32 parameters, gradients and state (no stage);
- ``bf16_master``: bfloat16 parameters and gradients, float32 master weights and state (the
  Trainer's ``precision="bf16"``): the gradient widened, the master copy rounded into the
  parameters, around the float32 kernels;
- ``bf16``: bfloat16 parameters, gradients and state, rounded each step (three more passes);
- ``int8`` (the rules with moments): float32 parameters, 8-bit state dequantized and
  requantized around the kernels.

Goal (a bound on what the stage adds, not a one-pass design's speed): ``bf16_master`` <= 2x
``float32`` for LAMB, LARS, NovoGrad and Adafactor. ``FASTOPT_BENCH_STAGED_SCALE`` (default 1)
divides the widths for a quick run. Run: ``pytest bench/test_bench_staged.py --benchmark-disable
-s``.
"""

import os

import ml_dtypes
import numpy as np
import pytest
from model_shapes import transformer_shapes

import fastopt as fo
from fastopt import benchmarking

BF16 = np.dtype(ml_dtypes.bfloat16)
SCALE = int(os.environ.get("FASTOPT_BENCH_STAGED_SCALE", "1"))
RULES = {
    "lamb": (fo.LAMB, dict(lr=1e-3, weight_decay=0.01), True),
    "lars": (fo.LARS, dict(lr=0.1, momentum=0.9), True),
    "novograd": (fo.NovoGrad, dict(lr=1e-3), True),
    "adafactor": (fo.Adafactor, dict(lr=1e-3), False),
}
GOAL_BF16_MASTER = 2.0
_RESULTS = {}


def _paramset(dtype):
    rng = np.random.default_rng(0)
    shapes = transformer_shapes(scale=SCALE)
    ps = fo.ParamSet(
        {f"p{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)},
        dtype=dtype,
    )
    ps.grad_flat[...] = (1e-3 * rng.standard_normal(ps.size)).astype(dtype)
    return ps


def measure(rule):
    if rule in _RESULTS:
        return _RESULTS[rule]
    import numba

    cls, kw, moments = RULES[rule]
    steps = {
        "float32": cls(_paramset(np.float32), **kw).step,
        "bf16_master": cls(_paramset(BF16), master_weights=True, **kw).step,
        "bf16": cls(_paramset(BF16), **kw).step,
    }
    if moments:
        steps["int8"] = cls(_paramset(np.float32), state_dtype="int8", **kw).step
    times = benchmarking.median_times(steps)
    n = _paramset(np.float32).size
    result = {
        "elements": n,
        "threads": numba.get_num_threads(),
        **{f"median_s.{k}": v for k, v in times.items()},
        **{f"ratio.{k}": v / times["float32"] for k, v in times.items() if k != "float32"},
    }
    print(rule, {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in result.items()})
    _RESULTS[rule] = result
    return result


@pytest.mark.parametrize("rule", sorted(RULES))
def test_speed(benchmark, rule):
    result = measure(rule)
    benchmark.extra_info.update(result)
    benchmark.pedantic(lambda: None, rounds=1)
    assert result["median_s.float32"] > 0


@pytest.mark.parametrize("rule", sorted(RULES))
def test_goal_bf16_master(rule):
    result = measure(rule)
    assert result["ratio.bf16_master"] <= GOAL_BF16_MASTER, result
