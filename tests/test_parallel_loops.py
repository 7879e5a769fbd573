"""The parallel CPU loop: arrays of ``PARALLEL_THRESHOLD`` elements or more run the ``prange``
kernel on several threads, everything smaller the serial one. The other comparisons use a handful
of elements (the serial loop only), so here, at ``PARALLEL_THRESHOLD + 1`` elements:

- every rule of ``kernels/rules.RULES`` (0-, 1-, 2- and 3-state loops and the EMA): the parallel
  kernel on 2 threads equals the serial kernel bit for bit, at every step of a real optimizer run,
  and ``apply`` around the threshold picks a loop that gives the same bits;
- a child process with ``NUMBA_NUM_THREADS=2`` computes the same bits as one with 1 thread;
- every optimizer configuration torch has follows torch.optim on the parallel loop as well.

Uses ``fastopt.dispatch.get_backend("numba-cpu")``'s ``update`` (as test_ema does) to see each
kernel call with its arguments.
"""

import hashlib
import pathlib

import numba
import numpy as np
import pytest
import thread_counts

import fastopt as fo
from fastopt import dispatch
from fastopt.kernels import cpu
from fastopt.kernels.rules import RULES

N = cpu.PARALLEL_THRESHOLD + 1
THREADS = 2
ROOT = pathlib.Path(__file__).resolve().parents[1]

# One optimizer configuration per rule (the rule each reaches is checked by recording the calls).
CONFIGS = {
    "sgd": ("SGD", dict(lr=0.05, weight_decay=0.01)),
    "sgd_momentum": ("SGD", dict(lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adagrad": ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    "rmsprop": ("RMSprop", dict(lr=0.01, weight_decay=0.01)),
    "rmsprop_momentum": ("RMSprop", dict(lr=0.005, momentum=0.9)),
    "rmsprop_centered": ("RMSprop", dict(lr=0.01, centered=True)),
    "rmsprop_centered_momentum": (
        "RMSprop",
        dict(lr=0.005, momentum=0.8, centered=True, weight_decay=0.01),
    ),
    "adadelta": ("Adadelta", dict(weight_decay=0.01)),
    "adam": ("AdamW", dict(lr=0.05, weight_decay=0.1)),
    "adam_amsgrad": ("Adam", dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
    "adamax": ("Adamax", dict(lr=0.05)),
    "nadam": ("NAdam", dict(lr=0.05, weight_decay=0.01)),
    "radam": ("RAdam", dict(lr=0.05)),
    "rprop": ("Rprop", dict(lr=0.05)),
    "yogi": ("Yogi", dict(weight_decay=0.01)),
    "lion": ("Lion", dict(lr=1e-3, weight_decay=0.1)),
    "ema": ("EMA", dict(decay=0.9)),
    "asgd": ("ASGD", dict(lr=0.05, t0=2.0, weight_decay=0.01)),
    "sf_sgd": ("SGDScheduleFree", dict(lr=0.5, weight_decay=0.01, warmup_steps=2)),
    "sf_adamw": ("AdamWScheduleFree", dict(lr=0.01, weight_decay=0.01, warmup_steps=2)),
}
DTYPES = (np.float64, np.float32)
STEPS = 6


def run_config(rule, arrays, steps=STEPS, seed=0):
    """``steps`` steps of ``rule``'s configuration over ``arrays`` (updated in place); returns the
    arrays the run owns (the EMA averages, or the optimizer state arrays)."""
    name, kwargs = CONFIGS[rule]
    rng = np.random.default_rng(seed)
    if name == "EMA":
        ema = fo.EMA(arrays, **kwargs)
        for _ in range(steps):
            for a in arrays:
                a[...] = rng.standard_normal(a.shape)
            ema.update()
        return list(ema.averages)
    opt = getattr(fo, name)(arrays, **kwargs)
    for _ in range(steps):
        opt.step([rng.standard_normal(a.shape).astype(a.dtype) for a in arrays])
    state = opt.state_dict()["state"]
    return [np.asarray(v) for s in state.values() for v in s.values() if np.ndim(v) > 0]


@pytest.fixture
def two_threads():
    """Numba on 2 threads (what the CI runner has; fewer only where NUMBA_NUM_THREADS allows
    fewer), restored afterwards."""
    old = numba.get_num_threads()
    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    try:
        yield numba.get_num_threads()
    finally:
        numba.set_num_threads(old)


@pytest.fixture
def recorded(monkeypatch):
    """Every numba-cpu kernel call: (rule, inputs before the call, outputs after it, h, gs)."""
    calls = []
    backend = dispatch.get_backend("numba-cpu")
    original = type(backend).update

    def update(self, rule, p, g, states, h, gs, *rest):
        before = [p.copy(), g.copy(), *(s.copy() for s in states)]
        original(self, rule, p, g, states, h, gs, *rest)
        calls.append((rule, before, [p.copy(), *(s.copy() for s in states)], h, gs))

    monkeypatch.setattr(type(backend), "update", update)
    return calls


def test_configs_cover_every_rule(recorded):
    for rule in CONFIGS:
        start = len(recorded)
        run_config(rule, [np.ones(4)], steps=2)  # EMA: the first update copies, the second runs
        assert {c[0] for c in recorded[start:]} == {rule}
    assert set(CONFIGS) == set(RULES)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("rule", list(CONFIGS))
def test_parallel_equals_serial_bit_for_bit(rule, dtype, recorded, two_threads):
    """At every step of a run over PARALLEL_THRESHOLD + 1 elements (the parallel loop on 2
    threads), the serial loop on the same inputs gives the same bits; ``apply`` just below and at
    the threshold (serial, then parallel loop) agrees with it on those prefixes."""
    if numba.config.NUMBA_NUM_THREADS >= THREADS:
        assert two_threads == THREADS
    p = np.random.default_rng(1).uniform(-1.5, 1.5, N).astype(dtype)
    run_config(rule, [p])
    # One kernel call per step (the EMA's first update is a copy).
    assert len(recorded) == STEPS - (rule == "ema") and {c[0] for c in recorded} == {rule}
    serial = cpu.kernel(rule, parallel=False)
    for k, (_, before, after, h, gs) in enumerate(recorded):
        assert before[0].size == N and before[0].dtype == dtype
        ins = [a.copy() for a in before]
        serial(ins[0], ins[1], *ins[2:], (*h, *gs))
        outs = [ins[0], *ins[2:]]
        for i, (got, want) in enumerate(zip(after, outs)):
            assert got.tobytes() == want.tobytes(), f"{rule} step {k + 1} array {i}"
        for size in (cpu.PARALLEL_THRESHOLD - 1, cpu.PARALLEL_THRESHOLD):
            part = [a[:size].copy() for a in before]
            cpu.apply(rule, part[0], part[1], part[2:], h, gs)
            for i, (got, want) in enumerate(zip([part[0], *part[2:]], outs)):
                assert got.tobytes() == want[:size].tobytes(), f"{rule} n={size} array {i}"
    assert not np.array_equal(p, np.random.default_rng(1).uniform(-1.5, 1.5, N).astype(dtype))


# ---------------------------------------------------------------------------------------------
# Thread count: a child process per NUMBA_NUM_THREADS.


def child_digests(threads):
    """Run in a child process: check the thread count, then the sha256 of every rule's
    parameters and state after a run over PARALLEL_THRESHOLD + 1 elements."""
    assert numba.config.NUMBA_NUM_THREADS == threads
    assert numba.get_num_threads() == threads
    out = {}
    for rule in CONFIGS:
        for dtype in DTYPES:
            p = np.random.default_rng(2).uniform(-1.5, 1.5, N).astype(dtype)
            owned = run_config(rule, [p], steps=4, seed=3)
            digest = hashlib.sha256(p.tobytes())
            for a in owned:
                digest.update(np.ascontiguousarray(a).tobytes())
            out[f"{rule}/{np.dtype(dtype).name}"] = digest.hexdigest()
    return out


def _digests_with_threads(threads):
    return thread_counts.digests(__name__, threads, child_only=True, args=(threads,))


def test_two_threads_give_the_bits_of_one():
    one, two = _digests_with_threads(1), _digests_with_threads(2)
    assert set(one) == {f"{r}/{np.dtype(d).name}" for r in RULES for d in DTYPES}
    assert one == two


# ---------------------------------------------------------------------------------------------
# torch.optim on the parallel loop.

TORCH_CASES = {
    "sgd": ("SGD", dict(lr=0.05, weight_decay=0.01)),
    "sgd-momentum": ("SGD", dict(lr=0.03, momentum=0.9, dampening=0.2)),
    "sgd-nesterov": ("SGD", dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.05)),
    "adagrad": ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    "rmsprop": ("RMSprop", dict(lr=0.01, weight_decay=0.01)),
    "rmsprop-momentum": ("RMSprop", dict(lr=0.005, momentum=0.9, alpha=0.9)),
    "rmsprop-centered": ("RMSprop", dict(lr=0.01, centered=True)),
    "rmsprop-centered-momentum": (
        "RMSprop",
        dict(lr=0.005, momentum=0.8, centered=True, weight_decay=0.01),
    ),
    "adadelta": ("Adadelta", dict(weight_decay=0.01)),
    "adam": ("Adam", dict(lr=0.05)),
    "amsgrad": ("Adam", dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
    "adamw": ("AdamW", dict(lr=0.05, weight_decay=0.1)),
    "adamax": ("Adamax", dict(lr=0.05)),
    "nadam": ("NAdam", dict(lr=0.05)),
    "radam": ("RAdam", dict(lr=0.05)),
    "rprop": ("Rprop", dict()),
    "asgd": ("ASGD", dict(lr=0.05, t0=5.0, weight_decay=0.01)),
}
TORCH_STEPS = 15
TORCH_TOL = {np.float64: dict(rtol=1e-12, atol=1e-14), np.float32: dict(rtol=1e-5, atol=1e-6)}


def grad_at(x, k):
    """Gradient of sum a_j (x_j - c_j)^2 / 2 at x, plus noise for step k, in x's dtype."""
    n = x.size
    a = (0.5 + 1.5 * np.arange(n) / n).astype(x.dtype)
    c = np.linspace(-0.5, 0.8, n).astype(x.dtype)
    noise = np.random.default_rng([99, k, n]).standard_normal(n).astype(x.dtype)
    return a * (x - c) + x.dtype.type(0.1) * noise


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_parallel_loop_matches_torch(case, dtype, two_threads):
    """A large array (the parallel loop on 2 threads) beside a small one (the serial loop) follow
    torch.optim for every configuration torch has; the gradient depends on the iterate."""
    from oracle import torch_or_skip

    torch = torch_or_skip()
    name, kwargs = TORCH_CASES[case]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype is np.float64 else torch.float32)
    try:
        rng = np.random.default_rng(4)
        start = [rng.uniform(-1.5, 1.5, n).astype(dtype) for n in (N, 3)]
        ours = [a.copy() for a in start]
        opt = getattr(fo, name)(ours, **kwargs)
        theirs = [torch.tensor(a.copy(), requires_grad=True) for a in start]
        topt = getattr(torch.optim, name)(theirs, foreach=False, **kwargs)
        for k in range(TORCH_STEPS):
            opt.step([grad_at(a, k) for a in ours])
            for t in theirs:
                t.grad = torch.from_numpy(grad_at(t.detach().numpy(), k))
            topt.step()
            for i, (a, t) in enumerate(zip(ours, theirs)):
                np.testing.assert_allclose(
                    a,
                    t.detach().numpy(),
                    err_msg=f"{case} array {i} step {k + 1}",
                    **TORCH_TOL[dtype],
                )
    finally:
        torch.set_default_dtype(old)
    assert ours[0].size >= cpu.PARALLEL_THRESHOLD > ours[1].size
    assert np.max(np.abs(ours[0] - start[0])) > 1e-2
