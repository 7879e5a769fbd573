"""fastopt.Muon against torch.optim.Muon and against its own Newton–Schulz matrix products alone,
on the 64 hidden matrices of the small transformer of ``model_shapes.transformer_shapes``
(16 blocks of attention 384 x 128 and 128 x 128, MLP 512 x 128 and 128 x 512), in one
interleaved run (``fastopt.benchmarking.median_times``).

Peers: ``fastopt`` (the default, the iteration emulating bfloat16 as torch's), ``fastopt_f32``
(``ns_dtype="float32"``), ``torch`` (torch.optim.Muon as shipped: its iteration in bfloat16),
``torch_f32`` (the same with its ``grad.bfloat16()`` cast patched away: the iteration in
float32), and ``products``: the iteration's matrix products alone (per matrix and step
X Xᵀ, A A, B X: the same ``np.matmul`` calls on the same shapes into preallocated float32
arrays, through the same BLAS as fastopt's); on a CPU with native bfloat16 products, where the
default runs torch's (``fastopt.optim.newton_schulz_torch``), also ``products_bf16``: those
``mm``/``addmm`` calls on bfloat16 tensors alone. Goals (issue 15): each fastopt <= 1.15x its own
products alone and >= 1.0x torch with the iteration in the same dtype (``torch`` for the
default, ``torch_f32`` for ``ns_dtype="float32"``).

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
from fastopt.optim.newton_schulz_torch import native_bfloat16_products  # noqa: E402

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


def _torch_products(shapes, steps=5, coefficients=(3.4445, -4.775, 2.0315)):
    """One step's products as ``newton_schulz_torch.TorchNewtonSchulz`` calls them (the default
    bfloat16 iteration on a CPU with native bfloat16 products): torch's ``mm`` and two
    ``addmm`` on bfloat16 tensors into preallocated ones, without the casts, the norm and the
    division around them."""
    a, b, c = coefficients
    work = []
    for rows, cols in shapes:
        k = min(rows, cols)
        x = torch.randn((rows, cols)).bfloat16() * 0.01
        x = x.T.contiguous() if rows > cols else x
        bufs = [torch.empty((k, k), dtype=torch.bfloat16) for _ in range(2)]
        work.append((x, *bufs, [torch.empty_like(x), torch.empty_like(x)]))

    def run():
        for x0, a_, b_, ys in work:
            x = x0
            for i in range(steps):
                torch.mm(x, x.T, out=a_)
                torch.addmm(a_, a_, a_, beta=b, alpha=c, out=b_)
                x = torch.addmm(x, b_, x, beta=a, out=ys[i % 2])

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
    native = native_bfloat16_products()
    if native:
        peers["products_bf16"] = _torch_products(shapes)
    with _threads(THREADS):
        times = benchmarking.median_times(peers)
    out = {
        "matrices": len(shapes),
        "elements": int(sum(np.prod(s) for s in shapes)),
        "threads": THREADS,
        "bfloat16_products": "torch" if native else "emulated (float32 BLAS)",
        **{f"median_s.{k}": v for k, v in times.items()},
    }
    own_products = {"fastopt": "products_bf16" if native else "products", "fastopt_f32": "products"}
    for mine, products in own_products.items():
        out[f"{mine}.ratio_to_products"] = times[mine] / times[products]
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


@pytest.mark.parametrize("mine,peer", [("fastopt", "torch"), ("fastopt_f32", "torch_f32")])
def test_goal_at_least_as_fast_as_torch_in_the_same_dtype(mine, peer):
    result = measure()
    assert result[f"{mine}.speedup_vs_{peer}"] >= 1.0, result
