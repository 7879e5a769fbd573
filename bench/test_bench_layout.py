"""Why fastopt aligns its large buffers to 2 MiB (``fastopt/memory.py``), measured in one run.

The same Adam step over a 16 Mi-element float32 ParamSet, timed four ways by
``fastopt.benchmarking.time_steps``, with only the buffer layout or the kernel changed:

- ``fastopt``: fastopt as shipped; parameter, gradient and state buffers 2 MiB-aligned;
- ``fastopt, 64 B-aligned``: the same code with every buffer only cache-line aligned, as NumPy's
  and torch's default allocators place them (``memory.HUGE_PAGE_MIN_BYTES`` raised for the setup);
- ``torch fused``: ``torch.optim.Adam(fused=True)`` on the ParamSet's parameter and gradient
  buffers with its own state, from torch's default allocator;
- ``torch fused, fastopt buffers``: the same torch kernel with every buffer, state included, a
  2 MiB-aligned fastopt buffer: torch's kernel against ours on equal memory.

Goal: the 2 MiB layout is never slower than the cache-line layout (ratio <= 1.05, noise allowed)
at the full size (``FASTOPT_BENCH_N`` >= 16 Mi elements, where the buffers are far larger than
the caches and the TLB reach). A quick run (smaller ``FASTOPT_BENCH_N``) still builds both layouts,
checks their alignment and asserts the ratio of the best rounds (load from elsewhere only ever adds
time; a short run's medians are mostly noise), with a tolerance that fits arrays that partly fit in
cache (<= 1.20); the size is raised to the smallest that gets 2 MiB pages, so the test never skips
for being small. The ratio to torch with equal buffers is recorded, not
asserted: it separates the kernel from the allocator in the ``speedup_vs.torch_fused`` goal of
``test_bench_optimizers``.
"""

import numpy as np

import fastopt as fo
from fastopt import memory
from fastopt.benchmarking import DEFAULT_N, env_n, time_steps

GOAL_RATIO = 1.05
"""2 MiB / 64 B median step time at the full size (DEFAULT_N and above)."""
QUICK_RATIO = 1.20
"""2 MiB / 64 B best-round step time below the full size (short rounds, arrays partly in cache)."""


def layout_check(n):
    """(elements to run, statistic, ratio limit) for a requested size ``n``: at least the smallest
    float32 buffer that gets 2 MiB pages; from the full size on the goal (medians, 1.05), below it
    the quick check (best rounds, :data:`QUICK_RATIO`)."""
    smallest = -(-memory.HUGE_PAGE_MIN_BYTES // 4)
    if n >= DEFAULT_N:
        return n, "median_s", GOAL_RATIO
    return max(n, smallest), "min_s", QUICK_RATIO


def _adam(n, *, huge_pages):
    """A stepped-once fastopt Adam over a fresh ParamSet, every buffer laid out as asked."""
    saved = memory.HUGE_PAGE_MIN_BYTES
    if not huge_pages:
        memory.HUGE_PAGE_MIN_BYTES = float("inf")
    try:
        rng = np.random.default_rng(0)
        ps = fo.ParamSet({"w": rng.standard_normal(n).astype(np.float32)})
        ps.grad_flat[...] = rng.standard_normal(n).astype(np.float32)
        opt = fo.Adam(ps, lr=1e-6)
        opt.step()  # allocates the state under the same policy
    finally:
        memory.HUGE_PAGE_MIN_BYTES = saved
    (state,) = opt.state.values()
    buffers = [ps.flat, ps.grad_flat, state["exp_avg"], state["exp_avg_sq"]]
    return ps, opt, buffers


def _torch_steps(torch, ps):
    """{name: step} for torch fused Adam with its own state and with fastopt-allocated state."""
    steps = {}
    tp = torch.from_numpy(ps.flat)
    tp.grad = torch.from_numpy(ps.grad_flat)
    own = torch.optim.Adam([tp], lr=1e-6, fused=True)
    own.step()
    steps["torch fused"] = own.step

    ours = fo.ParamSet({"w": np.array(ps.flat)})
    ours.grad_flat[...] = ps.grad_flat
    tq = torch.from_numpy(ours.flat)
    tq.grad = torch.from_numpy(ours.grad_flat)
    shared = torch.optim.Adam([tq], lr=1e-6, fused=True)
    shared.step()
    state = shared.state_dict()
    buffers_kept = {}
    for key in ("exp_avg", "exp_avg_sq"):
        buf = memory.aligned_zeros(ps.size, np.float32)
        buf[...] = state["state"][0][key].numpy()
        state["state"][0][key] = torch.from_numpy(buf)
        buffers_kept[key] = buf.ctypes.data
    shared.load_state_dict(state)  # same dtype and device: torch keeps these very tensors
    for key in ("exp_avg", "exp_avg_sq"):
        ptr = shared.state[tq][key].data_ptr()
        assert ptr == buffers_kept[key], f"torch copied its {key} out of the fastopt buffer"
    steps["torch fused, fastopt buffers"] = shared.step
    return steps, (ours, tp, tq, own, shared)


def test_huge_page_alignment(benchmark):
    n, statistic, limit = layout_check(env_n())
    ps, opt, buffers = _adam(n, huge_pages=True)
    ps64, opt64, buffers64 = _adam(n, huge_pages=False)
    top = (
        memory.STAGGER * memory.STAGGER_SLOTS
    )  # huge-page buffers start this close to 2 MiB (float32)
    assert max(map(memory.huge_page_offset, buffers)) <= top
    assert min(map(memory.alignment_of, buffers64)) < memory.HUGE_PAGE
    steps = {"fastopt": opt.step, "fastopt, 64 B-aligned": opt64.step}
    keep = None
    try:
        import torch

        torch.set_num_threads(__import__("numba").get_num_threads())
        torch_steps, keep = _torch_steps(torch, ps)
        steps.update(torch_steps)
    except ImportError:
        pass
    timings = time_steps(steps)
    t = {name: r["median_s"] for name, r in timings.items()}
    benchmark.extra_info.update({f"median_s.{name}": v for name, v in t.items()})
    ratio = timings["fastopt"][statistic] / timings["fastopt, 64 B-aligned"][statistic]
    benchmark.extra_info.update(
        huge_over_cache_line=ratio, statistic=statistic, elements=n, ratio_limit=limit
    )
    lines = [f"\n{k}: {v * 1e3:.2f} ms/step" for k, v in t.items()]
    if "torch fused" in t:
        for peer in ("torch fused", "torch fused, fastopt buffers"):
            benchmark.extra_info[f"speedup_vs.{peer}"] = t[peer] / t["fastopt"]
            lines.append(f"\n{peer} / fastopt = {t[peer] / t['fastopt']:.3f}x")
    benchmark.pedantic(opt.step, rounds=3, iterations=1)
    print(
        "".join(lines), f"\n2 MiB / 64 B layout ({statistic}) = {ratio:.3f} at {n:,} (<= {limit})"
    )
    del keep
    assert ratio <= limit, (
        f"2 MiB-aligned buffers made the Adam step {ratio:.2f}x slower ({statistic}) at "
        f"{n:,} elements (limit {limit})"
    )
