"""fastopt.Muon against torch.optim.Muon and against its own Newton–Schulz matrix products alone,
on the 64 hidden matrices of the small transformer of ``model_shapes.transformer_shapes``
(16 blocks of attention 384 x 128 and 128 x 128, MLP 512 x 128 and 128 x 512), in one
interleaved run (``fastopt.benchmarking.median_times``).

Peers: ``fastopt`` (the default, the iteration emulating bfloat16 as torch's), ``fastopt_f32``
(``ns_dtype="float32"``), ``torch`` (torch.optim.Muon as shipped: its iteration in bfloat16),
``torch_f32`` (the same with its ``grad.bfloat16()`` cast patched away: the iteration in
float32), and ``products``: the iteration's matrix products alone (per matrix and step
X Xᵀ, A A, B X: the same ``np.matmul`` calls on the same shapes into preallocated float32
arrays, through the same BLAS as fastopt's). Goals (issue 15): fastopt <= 1.15x the products
alone and >= 1.0x torch.

``FASTOPT_BENCH_MUON_THREADS`` (default 1): threads of NumPy's BLAS (threadpoolctl), Numba and
torch:
one thread keeps the comparison about the work and not about thread pools of a busy machine
(0 leaves the libraries' defaults). ``FASTOPT_BENCH_TORCH_SCALE`` (default 1) divides the
widths for a quick run. Run: ``pytest bench/test_bench_muon.py --benchmark-disable -s``.
"""

import contextlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt as fo  # noqa: E402
from fastopt import benchmarking  # noqa: E402

THREADS = int(os.environ.get("FASTOPT_BENCH_MUON_THREADS", "1"))
SCALE = int(os.environ.get("FASTOPT_BENCH_TORCH_SCALE", "1"))
_RESULT = {}


def hidden_shapes(d=128, blocks=16, hidden=512):
    """The 2-D parameters of the blocks of ``model_shapes.transformer_shapes`` (same
    widths and scaling; not the embedding or the output layer)."""
    d, hidden = max(8, d // SCALE), max(8, hidden // SCALE)
    return [(3 * d, d), (d, d), (hidden, d), (d, hidden)] * blocks


def _products(shapes, steps=5):
    """One step's Newton–Schulz matrix products alone, as fastopt's iteration calls them."""
    work = []
    for rows, cols in shapes:
        k = min(rows, cols)
        x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32) * 0.01
        work.append((rows > cols, x, np.empty((k, k), np.float32), np.empty((k, k), np.float32)))
    y = {s: np.empty(s, np.float32) for s in set(shapes)}

    def run():
        for tall, x, a, b in work:
            out = y[x.shape]
            for _ in range(steps):
                if tall:
                    np.matmul(x.T, x, out=a)
                    np.matmul(a, a, out=b)
                    np.matmul(x, b, out=out)
                else:
                    np.matmul(x, x.T, out=a)
                    np.matmul(a, a, out=b)
                    np.matmul(b, x, out=out)

    return run


@contextlib.contextmanager
def _threads(n):
    if n <= 0:
        yield
        return
    import numba
    import threadpoolctl

    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    with threadpoolctl.threadpool_limits(n, user_api="blas"):
        yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


def _torch_f32_step(opt):
    def step():
        cast = torch.Tensor.bfloat16
        torch.Tensor.bfloat16 = lambda t: t.clone()
        try:
            opt.step()
        finally:
            torch.Tensor.bfloat16 = cast

    return step


def measure():
    if _RESULT:
        return _RESULT
    shapes = hidden_shapes()
    rng = np.random.default_rng(0)
    values = {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    peers = {}
    for name, ns_dtype in (("fastopt", "bfloat16"), ("fastopt_f32", "float32")):
        ps = fo.ParamSet(values)
        ps.grad_flat[...] = rng.standard_normal(ps.size).astype(np.float32) * 1e-3
        peers[name] = fo.Muon(ps, lr=1e-3, ns_dtype=ns_dtype).step
    for name in ("torch", "torch_f32"):
        tp = [torch.nn.Parameter(torch.tensor(v)) for v in values.values()]
        for p in tp:
            p.grad = torch.randn(p.shape) * 1e-3
        opt = torch.optim.Muon(tp, lr=1e-3)
        peers[name] = opt.step if name == "torch" else _torch_f32_step(opt)
    peers["products"] = _products(shapes)
    with _threads(THREADS):
        times = benchmarking.median_times(peers)
    out = {
        "matrices": len(shapes),
        "elements": int(sum(np.prod(s) for s in shapes)),
        "threads": THREADS,
        **{f"median_s.{k}": v for k, v in times.items()},
    }
    for mine in ("fastopt", "fastopt_f32"):
        out[f"{mine}.ratio_to_products"] = times[mine] / times["products"]
        out[f"{mine}.speedup_vs_torch"] = times["torch"] / times[mine]
        out[f"{mine}.speedup_vs_torch_f32"] = times["torch_f32"] / times[mine]
    _RESULT.update(out)
    print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in out.items()})
    return out


def test_speed(benchmark):
    result = measure()
    benchmark.extra_info.update(result)
    benchmark.pedantic(lambda: None, rounds=1)
    assert result["median_s.fastopt"] > 0


@pytest.mark.parametrize("mine", ["fastopt", "fastopt_f32"])
def test_goal_within_115_percent_of_the_products_alone(mine):
    result = measure()
    assert result[f"{mine}.ratio_to_products"] <= 1.15, result


@pytest.mark.parametrize("mine", ["fastopt", "fastopt_f32"])
def test_goal_at_least_as_fast_as_torch(mine):
    result = measure()
    assert result[f"{mine}.speedup_vs_torch"] >= 1.0, result
