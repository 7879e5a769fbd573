"""LAMB over 1000 tensors of 1000 float32 elements (issue 15), in one interleaved run
(``fastopt.benchmarking.median_times``):

- ``fastopt``: ``fastopt.LAMB`` over one ParamSet (a segmented reduction, the per-tensor pass and
  the update: three launches whatever the number of tensors);
- ``torch_foreach``: LAMB written the way torch writes its foreach optimizers (torch has no LAMB):
  ``torch._foreach_*`` for the moments and the Adam direction, ``torch._foreach_norm`` for the
  per-tensor norms, the trust ratios as one tensor op;
- ``fastopt_adam``: ``fastopt.Adam`` over the same ParamSet, the cost of a plain elementwise step.

Goals: ``fastopt`` >= 10x ``torch_foreach`` and <= 1.5x ``fastopt_adam``. Before timing, the two
LAMBs take three steps from the same values and must agree to 1e-5 (relative): a peer that
computed something else would be no peer. torch runs with the kernels' thread count.
``FASTOPT_BENCH_LAMB_SCALE`` (default 1) divides the tensor size for a quick run. Run:
``pytest bench/test_bench_lamb.py --benchmark-disable -s``.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt as fo  # noqa: E402
from fastopt import benchmarking  # noqa: E402

COUNT = 1000
SIZE = 1000 // int(os.environ.get("FASTOPT_BENCH_LAMB_SCALE", "1"))
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2)
GOAL_VS_TORCH, GOAL_VS_ADAM = 10.0, 1.5
_RESULT = {}


class TorchForeachLAMB:
    """optax.lamb (scale_by_adam with eps_root 0, add_decayed_weights, scale_by_trust_ratio,
    -lr) over a list of tensors with torch's foreach kernels."""

    def __init__(self, params, grads, lr, betas, eps, weight_decay):
        self.params, self.grads = params, grads
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        p, g, m, v = self.params, self.grads, self.m, self.v
        torch._foreach_lerp_(m, g, 1.0 - self.b1)
        torch._foreach_mul_(v, self.b2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - self.b2)
        denom = torch._foreach_div(v, 1.0 - self.b2**self.t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, self.eps)
        u = torch._foreach_div(m, 1.0 - self.b1**self.t)
        torch._foreach_div_(u, denom)
        torch._foreach_add_(u, p, alpha=self.wd)
        pn, un = torch.stack(torch._foreach_norm(p)), torch.stack(torch._foreach_norm(u))
        ratio = torch.where((pn > 0) & (un > 0), pn / un, torch.ones_like(pn))
        torch._foreach_mul_(u, list((-self.lr * ratio).unbind()))
        torch._foreach_add_(p, u)


def _arrays(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SIZE, dtype=np.float32) for _ in range(COUNT)]


def _paramset(values, grads):
    ps = fo.ParamSet({f"p{i}": a.copy() for i, a in enumerate(values)})
    for i, g in enumerate(grads):
        ps.grads[f"p{i}"][...] = g
    return ps


def _check_same_updates(values, grads):
    """Three steps of both LAMBs from the same values: equal to 1e-5 relative."""
    ps = _paramset(values, grads)
    ours = fo.LAMB(ps, **HYPER)
    params = [torch.from_numpy(a.copy()) for a in values]
    theirs = TorchForeachLAMB(params, [torch.from_numpy(g) for g in grads], **HYPER)
    for _ in range(3):
        ours.step()
        theirs.step()
    for i, p in enumerate(params):
        np.testing.assert_allclose(ps[f"p{i}"], p.numpy(), rtol=1e-5, atol=1e-7)


def measure():
    if _RESULT:
        return _RESULT
    import numba

    values, grads = _arrays(0), [1e-3 * g for g in _arrays(1)]
    _check_same_updates(values, grads)
    saved = torch.get_num_threads()
    torch.set_num_threads(numba.get_num_threads())
    try:
        lamb = fo.LAMB(_paramset(values, grads), **HYPER)
        adam = fo.Adam(_paramset(values, grads), lr=HYPER["lr"])
        params = [torch.from_numpy(a.copy()) for a in values]
        peer = TorchForeachLAMB(params, [torch.from_numpy(g) for g in grads], **HYPER)
        times = benchmarking.median_times(
            {"fastopt": lamb.step, "torch_foreach": peer.step, "fastopt_adam": adam.step}
        )
    finally:
        torch.set_num_threads(saved)
    _RESULT.update(
        {
            "tensors": COUNT,
            "elements": COUNT * SIZE,
            "threads": numba.get_num_threads(),
            **{f"median_s.{k}": v for k, v in times.items()},
            "speedup_vs_torch_foreach": times["torch_foreach"] / times["fastopt"],
            "ratio_to_adam": times["fastopt"] / times["fastopt_adam"],
        }
    )
    print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in _RESULT.items()})
    return _RESULT


def test_speed(benchmark):
    result = measure()
    benchmark.extra_info.update(result)
    benchmark.pedantic(lambda: None, rounds=1)
    assert result["median_s.fastopt"] > 0


def test_goal_vs_torch_foreach():
    result = measure()
    assert result["speedup_vs_torch_foreach"] >= GOAL_VS_TORCH, result


def test_goal_vs_adam():
    result = measure()
    assert result["ratio_to_adam"] <= GOAL_VS_ADAM, result
