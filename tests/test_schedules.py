"""Tests for fastopt.schedules: torch.optim.lr_scheduler as the oracle, formulas otherwise."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import import_or_skip

from fastopt import schedules as S

# --------------------------------------------------------------------------- helpers


def _torch():
    """torch for oracle tests: skipped when missing, unless FASTOPT_REQUIRE_ORACLE=1."""
    if os.environ.get("FASTOPT_REQUIRE_ORACLE") == "1":
        import torch  # an ImportError must fail the test here

        return torch
    return import_or_skip("torch")


def _torch_opt(torch, *lrs):
    params = [torch.zeros(1, requires_grad=True) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)])


def torch_lrs(make, lr, n, steps_per_epoch=1):
    """lr of group 0 used by each of n optimizer steps, stepping the scheduler every
    `steps_per_epoch` optimizer steps (optimizer.step() first, as torch wants)."""
    torch = _torch()
    opt = _torch_opt(torch, lr)
    sched = make(torch.optim.lr_scheduler, opt)
    out = []
    for i in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if (i + 1) % steps_per_epoch == 0 and i + 1 < n:
            sched.step()
    return out


def values(schedule, n):
    return [schedule(k) for k in range(n)]


class FakeOptimizer:
    def __init__(self, *lrs):
        self.param_groups = [{"lr": lr, "initial_lr": lr} for lr in lrs]


# ------------------------------------------------------------------ torch oracle: schedules

LR = 0.1

# (id, fastopt schedule, torch factory(lr_scheduler, opt), steps)
ORACLE_CASES = [
    ("step", S.StepDecay(LR, 30, 0.5), lambda L, o: L.StepLR(o, step_size=30, gamma=0.5), 1200),
    ("step-default", S.StepDecay(LR, 7), lambda L, o: L.StepLR(o, step_size=7), 1000),
    (
        "multistep",
        S.MultiStepDecay(LR, [700, 5, 100, 100], 0.3),
        lambda L, o: L.MultiStepLR(o, milestones=[5, 100, 100, 700], gamma=0.3),
        1000,
    ),
    (
        "multistep-0",
        S.MultiStepDecay(LR, [0, 999]),
        lambda L, o: L.MultiStepLR(o, milestones=[0, 999]),
        1000,
    ),
    ("exp", S.ExponentialDecay(LR, 0.995), lambda L, o: L.ExponentialLR(o, gamma=0.995), 1500),
    (
        "poly2",
        S.PolynomialDecay(LR, 800, 2.0),
        lambda L, o: L.PolynomialLR(o, total_iters=800, power=2.0),
        1200,
    ),
    (
        "poly-sqrt",
        S.PolynomialDecay(LR, 7, 0.5),
        lambda L, o: L.PolynomialLR(o, total_iters=7, power=0.5),
        1000,
    ),
    (
        "cosine-periodic",
        S.CosineAnnealing(LR, 300, 1e-3),
        lambda L, o: L.CosineAnnealingLR(o, T_max=300, eta_min=1e-3),
        1500,
    ),
    (
        "cosine",
        S.CosineAnnealing(LR, 1000),
        lambda L, o: L.CosineAnnealingLR(o, T_max=1000),
        1001,
    ),
    (
        "warm-restarts",
        S.CosineAnnealingWarmRestarts(LR, 50),
        lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=50),
        1200,
    ),
    (
        "warm-restarts-mult",
        S.CosineAnnealingWarmRestarts(LR, 10, 2, 1e-4),
        lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=1e-4),
        2000,
    ),
    (
        "onecycle",
        S.OneCycle(0.5, 1000),
        lambda L, o: L.OneCycleLR(o, max_lr=0.5, total_steps=1000, cycle_momentum=False),
        1001,
    ),
    (
        "onecycle-linear-3phase",
        S.OneCycle(
            0.5, 1200, 0.25, "linear", div_factor=10.0, final_div_factor=100.0, three_phase=True
        ),
        lambda L, o: L.OneCycleLR(
            o,
            max_lr=0.5,
            total_steps=1200,
            pct_start=0.25,
            anneal_strategy="linear",
            div_factor=10.0,
            final_div_factor=100.0,
            three_phase=True,
            cycle_momentum=False,
        ),
        1201,
    ),
    (
        "onecycle-cos-3phase-epochs",
        S.OneCycle(0.3, pct_start=0.4, three_phase=True, epochs=10, steps_per_epoch=101),
        lambda L, o: L.OneCycleLR(
            o,
            max_lr=0.3,
            epochs=10,
            steps_per_epoch=101,
            pct_start=0.4,
            three_phase=True,
            cycle_momentum=False,
        ),
        1011,
    ),
    (
        "warmup-cosine",
        S.warmup(S.CosineAnnealing(LR, 900, 1e-4), 100, 0.01),
        lambda L, o: L.SequentialLR(
            o,
            [
                L.LinearLR(o, start_factor=0.01, end_factor=1.0, total_iters=100),
                L.CosineAnnealingLR(o, T_max=900, eta_min=1e-4),
            ],
            milestones=[100],
        ),
        1000,
    ),
    (
        "warmup-exp",
        S.warmup(S.ExponentialDecay(LR, 0.998), 37),
        lambda L, o: L.SequentialLR(
            o,
            [L.LinearLR(o, total_iters=37), L.ExponentialLR(o, gamma=0.998)],
            milestones=[37],
        ),
        1000,
    ),
    (
        "warmup-step",
        S.warmup(S.StepDecay(LR, 100, 0.5), 50, 0.2),
        lambda L, o: L.SequentialLR(
            o,
            [L.LinearLR(o, 0.2, 1.0, total_iters=50), L.StepLR(o, step_size=100, gamma=0.5)],
            milestones=[50],
        ),
        1000,
    ),
    (
        "warmup-restarts",
        S.warmup(S.CosineAnnealingWarmRestarts(LR, 50, 2), 20, 0.1),
        lambda L, o: L.SequentialLR(
            o,
            [
                L.LinearLR(o, 0.1, 1.0, total_iters=20),
                L.CosineAnnealingWarmRestarts(o, T_0=50, T_mult=2),
            ],
            milestones=[20],
        ),
        1000,
    ),
    (
        "join-step-cosine",
        S.join([S.StepDecay(LR, 60, 0.5), S.CosineAnnealing(LR, 700)], [300]),
        lambda L, o: L.SequentialLR(
            o,
            [L.StepLR(o, step_size=60, gamma=0.5), L.CosineAnnealingLR(o, T_max=700)],
            milestones=[300],
        ),
        1000,
    ),
]


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("schedule", "make", "n"), [c[1:] for c in ORACLE_CASES], ids=[c[0] for c in ORACLE_CASES]
)
def test_matches_torch_scheduler(schedule, make, n):
    ref = torch_lrs(make, LR, n)
    ours = values(schedule, n)
    assert all(type(v) is float for v in ours)
    # torch updates most lrs recursively (lr *= ratio); the closed forms agree to rounding.
    # atol covers cosine values near zero, where torch's ratio recursion loses relative accuracy.
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("schedule", "make"),
    [
        (
            S.CosineAnnealingWarmRestarts(LR, 10, 2, 1e-4),
            lambda L, o: L.CosineAnnealingWarmRestarts(o, 10, 2, 1e-4),
        ),
        (S.OneCycle(0.5, 1000), lambda L, o: L.OneCycleLR(o, 0.5, 1000, cycle_momentum=False)),
    ],
    ids=["warm-restarts", "onecycle"],
)
def test_closed_form_torch_schedulers_bit_identical(schedule, make):
    assert values(schedule, 1001) == torch_lrs(make, LR, 1001)


@pytest.mark.oracle
def test_per_epoch_matches_torch_stepped_once_per_epoch():
    spe = 7
    sched = S.PerEpoch(S.StepDecay(LR, 3, 0.5), steps_per_epoch=spe)
    ref = torch_lrs(lambda L, o: L.StepLR(o, step_size=3, gamma=0.5), LR, 1050, spe)
    np.testing.assert_allclose(values(sched, 1050), ref, rtol=1e-12, atol=0)


@pytest.mark.oracle
def test_constant_matches_unscheduled_torch():
    torch = _torch()
    opt = _torch_opt(torch, 0.05)
    assert S.Constant(0.05)(123) == opt.param_groups[0]["lr"] == S.as_schedule(0.05)(0)


# --------------------------------------------------------------------------- formulas (no torch)

KS = np.array([0, 1, 2, 3, 10, 99, 100, 101, 1000, 12345, 10**6])


def test_inverse_time_formula():
    s = S.InverseTimeDecay(0.2, rate=0.01)
    np.testing.assert_allclose(values(s, 2000), 0.2 / (1 + 0.01 * np.arange(2000)), rtol=1e-15)
    s = S.InverseTimeDecay(0.2, rate=0.5, power=0.75)
    np.testing.assert_allclose([s(int(k)) for k in KS], 0.2 * (1 + 0.5 * KS) ** -0.75, rtol=1e-14)
    assert S.InverseTimeDecay(0.2, rate=0.0)(10**9) == 0.2


def test_inverse_sqrt_formula():
    s = S.InverseSqrt(0.3)  # D2L square-root scheduler: lr * (k+1)^(-1/2)
    np.testing.assert_allclose(values(s, 1000), 0.3 / np.sqrt(np.arange(1, 1001)), rtol=1e-15)
    s = S.InverseSqrt(0.3, timescale=400)
    np.testing.assert_allclose(
        [s(int(k)) for k in KS], 0.3 * np.sqrt(400 / (KS + 400.0)), rtol=1e-14
    )
    assert s(0) == 0.3


def test_transformer_shape_via_warmup_inverse_sqrt():
    w = 100
    s = S.warmup(S.InverseSqrt(1e-3, timescale=w), w, 0.0)
    assert s(0) == 0.0
    assert s(w // 2) == pytest.approx(0.5e-3, rel=1e-15)
    assert max(values(s, 5 * w)) == s(w) == 1e-3
    for k in (w, 2 * w, 10 * w, 12345):
        assert s(k) == pytest.approx(1e-3 * math.sqrt(w / k), rel=1e-14)


def test_exponential_rate_formula():
    s = S.ExponentialDecay(2.0, rate=0.003)
    np.testing.assert_allclose(values(s, 1500), 2.0 * np.exp(-0.003 * np.arange(1500)), rtol=1e-14)
    g = S.ExponentialDecay(2.0, gamma=math.exp(-0.003))
    np.testing.assert_allclose(values(g, 1500), values(s, 1500), rtol=1e-12)


def test_piecewise_constant_formula():
    s = S.PiecewiseConstant([10, 20, 20, 50], [1.0, 0.5, 0.25, 0.1, 0.01])
    expect = [1.0] * 10 + [0.5] * 10 + [0.1] * 30 + [0.01] * 950
    assert values(s, 1000) == expect
    assert S.PiecewiseConstant([], [0.3])(10**9) == 0.3


def test_join_formula():
    a, b, c = S.ExponentialDecay(1.0, 0.9), S.Constant(0.5), S.CosineAnnealing(0.2, 100)
    s = S.join([a, b, c], [10, 30])
    expect = [a(k) for k in range(10)] + [0.5] * 20 + [c(k - 30) for k in range(30, 1000)]
    assert values(s, 1000) == expect
    nested = S.join([s, 0.01], [1000])  # numbers become constants; joins nest
    assert values(nested, 1000) == expect and nested(1000) == nested(10**7) == 0.01
    assert S.join([a], [])(5) == a(5)
    # a zero-length piece is skipped, as with optax.join_schedules
    assert S.join([a, b, c], [10, 10])(10) == c(0)


def test_warmup_formula():
    inner = S.CosineAnnealing(0.1, 500)
    s = S.warmup(inner, 40, 0.0)
    assert s.lr == 0.1  # defaults to the inner schedule's first value
    expect = [0.1 * k / 40 for k in range(40)] + [inner(k) for k in range(960)]
    np.testing.assert_allclose(values(s, 1000), expect, rtol=1e-15, atol=0)
    assert S.warmup(inner, 0)(0) == inner(0)
    t = S.warmup(0.3, 4, 0.5, lr=0.2)
    assert values(t, 6) == pytest.approx([0.1, 0.125, 0.15, 0.175, 0.3, 0.3], rel=1e-15)


def test_per_epoch_and_scaled_formulas():
    inner = S.ExponentialDecay(1.0, 0.5)
    p = S.PerEpoch(inner, 3)
    assert values(p, 9) == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    sc = S.Scaled(inner, 0.1)
    assert [sc(k) for k in range(5)] == [0.1 * inner(k) for k in range(5)]
    floored = S.Scaled(inner, 0.1, min_lr=0.2)
    # f*s(k) floored at min_lr, but never above s(k) itself
    assert [floored(k) for k in range(5)] == [0.2, 0.2, 0.2, 0.125, 0.0625]


def test_warm_restarts_closed_form_matches_recurrence():
    s = S.CosineAnnealingWarmRestarts(1.0, 3, 3, 0.01)
    t_cur, t_i = 0, 3
    for k in range(20000):
        if k:
            t_cur += 1
            if t_cur >= t_i:
                t_cur, t_i = t_cur % t_i, t_i * 3
        assert s._cycle(k) == (t_cur, t_i)
    assert s(0) == 1.0 and s(3) == 1.0 and s(12) == 1.0 and s(39) == 1.0


def test_onecycle_end_and_total_steps_forms():
    s = S.OneCycle(1.0, 100, final_div_factor=1e3)
    final = 1.0 / 25 / 1e3
    assert s(99) == pytest.approx(final, rel=1e-12)
    assert s(101) == s(10**6) == final  # torch raises past total_steps; we hold the end value
    assert S.OneCycle(1.0, epochs=4, steps_per_epoch=25, final_div_factor=1e3) == s
    assert s(0) == pytest.approx(1.0 / 25, rel=1e-14) and max(values(s, 101)) == 1.0


def test_call_returns_float_and_rejects_negative_step():
    for sched in _ROUNDTRIP:
        assert type(sched(np.int64(5))) is float
        with pytest.raises(ValueError, match="step k"):
            sched(-1)


def test_as_schedule():
    c = S.as_schedule(0.25)
    assert c == S.Constant(0.25) and c(1000) == 0.25

    def f(k):
        return 1.0 / (k + 1)

    assert S.as_schedule(f) is f
    s = S.StepDecay(0.1, 10)
    assert S.as_schedule(s) is s
    with pytest.raises(TypeError, match="lr"):
        S.as_schedule("0.1")
    with pytest.raises(ValueError, match="lr"):
        S.as_schedule(-1.0)


# --------------------------------------------------------------------------- serialisation

_ROUNDTRIP = [
    S.Constant(0.1),
    S.StepDecay(0.1, 30, 0.5),
    S.MultiStepDecay(0.1, [30, 10, 30]),
    S.ExponentialDecay(0.1, 0.99),
    S.ExponentialDecay(0.1, rate=0.01),
    S.PolynomialDecay(0.1, 100, 2.0),
    S.InverseTimeDecay(0.1, 0.01, 0.5),
    S.InverseSqrt(0.1, 250),
    S.CosineAnnealing(0.1, 100, 1e-5),
    S.CosineAnnealingWarmRestarts(0.1, 10, 2, 1e-5),
    S.OneCycle(0.5, 1000, 0.25, "linear", 10.0, 1e3, True),
    S.OneCycle(0.5, epochs=3, steps_per_epoch=7),
    S.PiecewiseConstant([10, 20], [0.1, 0.01, 0.001]),
    S.warmup(S.CosineAnnealing(0.1, 100), 10, 0.0),
    S.warmup(0.1, 10),
    S.join([S.warmup(S.Constant(0.1), 5), S.ExponentialDecay(0.1, 0.9), 0.001], [50, 100]),
    S.PerEpoch(S.join([S.StepDecay(0.1, 3), S.CosineAnnealing(0.05, 20)], [9]), 11),
    S.Scaled(S.warmup(S.OneCycle(1.0, 300), 20), 0.01, 1e-4),
    S.Scaled(S.Scaled(S.Constant(1.0), 0.5), 0.5, 0.2),
]


@pytest.mark.parametrize("sched", _ROUNDTRIP, ids=[type(s).__name__ for s in _ROUNDTRIP])
def test_to_dict_roundtrip(sched):
    d = sched.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON
    back = S.schedule_from_dict(json.loads(text))
    assert back == sched and hash(back) == hash(sched)
    assert type(back) is type(sched)
    assert repr(back) == repr(sched)
    assert back.to_dict() == d
    ks = [0, 1, 2, 5, 9, 10, 11, 49, 50, 99, 100, 101, 299, 300, 1000, 4321]
    assert [back(k) for k in ks] == [sched(k) for k in ks]
    assert S.schedule_to_dict(sched) == d


@pytest.mark.parametrize("sched", _ROUNDTRIP, ids=[type(s).__name__ for s in _ROUNDTRIP])
def test_pickle_and_copy(sched):
    for other in (pickle.loads(pickle.dumps(sched)), copy.deepcopy(sched)):
        assert other == sched and [other(k) for k in (0, 7, 500)] == [sched(k) for k in (0, 7, 500)]


def test_repr_is_readable():
    assert repr(S.StepDecay(0.1, 30)) == "StepDecay(lr=0.1, step_size=30, gamma=0.1)"
    assert repr(S.warmup(0.1, 5, 0.5)) == (
        "Warmup(schedule=Constant(lr=0.1), warmup_steps=5, start_factor=0.5, lr=0.1)"
    )


def test_serialisation_errors():
    with pytest.raises(TypeError, match="serialise"):
        S.join([lambda k: 0.1, 0.2], [3]).to_dict()
    with pytest.raises(TypeError, match="serialise"):
        S.schedule_to_dict(lambda k: 0.1)
    with pytest.raises(ValueError, match="type"):
        S.schedule_from_dict({"lr": 0.1})
    with pytest.raises(ValueError, match="unknown schedule type"):
        S.schedule_from_dict({"type": "Nope"})
    with pytest.raises(ValueError, match="unknown keys"):
        S.schedule_from_dict({"type": "Constant", "lr": 0.1, "gamma": 2})
    with pytest.raises(TypeError, match="lr"):
        S.schedule_from_dict({"type": "Constant", "lr": "x"})
    with pytest.raises(ValueError, match="lr"):
        S.schedule_from_dict({"type": "Constant", "lr": -1.0})


# --------------------------------------------------------------------------- argument validation

BAD_ARGS = [
    ("lr", lambda: S.Constant(-0.1)),
    ("lr", lambda: S.Constant(float("nan"))),
    ("step_size", lambda: S.StepDecay(0.1, 0)),
    ("gamma", lambda: S.StepDecay(0.1, 3, -0.5)),
    ("milestones", lambda: S.MultiStepDecay(0.1, [3, -1])),
    ("gamma", lambda: S.MultiStepDecay(0.1, [3], float("inf"))),
    ("gamma or rate", lambda: S.ExponentialDecay(0.1)),
    ("gamma or rate", lambda: S.ExponentialDecay(0.1, 0.9, rate=0.1)),
    ("gamma", lambda: S.ExponentialDecay(0.1, -0.9)),
    ("total_iters", lambda: S.PolynomialDecay(0.1, 0)),
    ("power", lambda: S.PolynomialDecay(0.1, 10, -1.0)),
    ("rate", lambda: S.InverseTimeDecay(0.1, -0.01)),
    ("power", lambda: S.InverseTimeDecay(0.1, 0.01, -1)),
    ("timescale", lambda: S.InverseSqrt(0.1, 0)),
    ("T_max", lambda: S.CosineAnnealing(0.1, 0)),
    ("eta_min", lambda: S.CosineAnnealing(0.1, 10, -1e-3)),
    ("T_0", lambda: S.CosineAnnealingWarmRestarts(0.1, 0)),
    ("T_mult", lambda: S.CosineAnnealingWarmRestarts(0.1, 10, 0)),
    ("max_lr", lambda: S.OneCycle(-1.0, 100)),
    ("total_steps", lambda: S.OneCycle(1.0)),
    ("total_steps", lambda: S.OneCycle(1.0, 0)),
    ("epochs", lambda: S.OneCycle(1.0, epochs=0, steps_per_epoch=3)),
    ("steps_per_epoch", lambda: S.OneCycle(1.0, epochs=2, steps_per_epoch=-3)),
    ("total_steps", lambda: S.OneCycle(1.0, 10, epochs=2, steps_per_epoch=5)),
    ("pct_start", lambda: S.OneCycle(1.0, 100, 1.5)),
    ("pct_start", lambda: S.OneCycle(1.0, 10, 0.1)),  # empty first phase (torch: ZeroDivision)
    ("anneal_strategy", lambda: S.OneCycle(1.0, 100, anneal_strategy="exp")),
    ("div_factor", lambda: S.OneCycle(1.0, 100, div_factor=0)),
    ("final_div_factor", lambda: S.OneCycle(1.0, 100, final_div_factor=-1)),
    ("boundaries", lambda: S.PiecewiseConstant([5, 3], [1, 2, 3])),
    ("values", lambda: S.PiecewiseConstant([5], [1.0])),
    ("values", lambda: S.PiecewiseConstant([5], [1.0, -2.0])),
    ("warmup_steps", lambda: S.warmup(0.1, -1)),
    ("start_factor", lambda: S.warmup(0.1, 10, 1.5)),
    ("lr", lambda: S.warmup(0.1, 10, 0.5, lr=-1)),
    ("schedules", lambda: S.join([], [])),
    ("boundaries", lambda: S.join([0.1, 0.2], [])),
    ("boundaries", lambda: S.join([0.1, 0.2, 0.3], [5, 2])),
    ("steps_per_epoch", lambda: S.PerEpoch(0.1, 0)),
    ("factor", lambda: S.Scaled(0.1, -1)),
    ("min_lr", lambda: S.Scaled(0.1, 0.5, -1)),
]


# an argument of the wrong type is a TypeError, as in the optimizers (fastopt.validation)
BAD_TYPES = [
    ("lr", lambda: S.Constant(True)),
    ("lr", lambda: S.Constant("0.1")),
    ("step_size", lambda: S.StepDecay(0.1, 2.5)),
    ("milestones", lambda: S.MultiStepDecay(0.1, 5)),
    ("milestones", lambda: S.MultiStepDecay(0.1, [3, 4.5])),
    ("rate", lambda: S.ExponentialDecay(0.1, rate="fast")),
    ("T_mult", lambda: S.CosineAnnealingWarmRestarts(0.1, 10, 1.5)),
    ("total_steps", lambda: S.OneCycle(1.0, 10.0)),
    ("three_phase", lambda: S.OneCycle(1.0, 100, three_phase="yes")),
    ("anneal_strategy", lambda: S.OneCycle(1.0, 100, anneal_strategy=1)),
    ("values", lambda: S.PiecewiseConstant([5], 1.0)),
    ("schedule", lambda: S.warmup("cosine", 10)),
    ("warmup_steps", lambda: S.warmup(0.1, 2.0)),
    ("schedules", lambda: S.join(S.Constant(0.1), [])),
    ("schedules", lambda: S.join([0.1, None], [5])),
    ("steps_per_epoch", lambda: S.PerEpoch(0.1, None)),
    ("factor", lambda: S.Scaled(0.1, "2")),
]


@pytest.mark.parametrize(
    ("name", "build"), BAD_ARGS, ids=[f"{i}-{a[0]}" for i, a in enumerate(BAD_ARGS)]
)
def test_bad_arguments_raise_value_error(name, build):
    with pytest.raises(ValueError, match=name) as info:
        build()
    assert info.type is ValueError


@pytest.mark.parametrize(
    ("name", "build"), BAD_TYPES, ids=[f"{i}-{a[0]}" for i, a in enumerate(BAD_TYPES)]
)
def test_wrong_argument_types_raise_type_error(name, build):
    with pytest.raises(TypeError, match=name):
        build()


# --------------------------------------------------------------------------- ReduceLROnPlateau


def _noisy(n, seed, drift=-0.002, noise=0.05):
    rng = random.Random(seed)
    x, out = 1.0, []
    for _ in range(n):
        x += drift
        out.append(x + rng.gauss(0.0, noise))
    return out


STREAMS = {
    "decreasing": [1.0 / (i + 1) for i in range(200)],
    "plateau": [0.5] * 200,
    "noisy": _noisy(400, 0),
    "plateau-then-drop": [1.0] * 40 + [0.5] * 40 + [0.49999] * 40 + [0.1] * 40,
    "increasing": [float(i) for i in range(100)] + [99.0] * 100,
    "nan-inf": [1.0, float("nan"), 0.5, float("inf"), 0.5, 0.4] * 20,
}

PLATEAU_CASES = [
    ("decreasing", {}),
    ("plateau", {}),
    ("plateau", {"patience": 0, "factor": 0.5}),
    ("noisy", {"patience": 3, "factor": 0.7}),
    ("noisy", {"patience": 2, "threshold": 0.05, "threshold_mode": "abs", "factor": 0.8}),
    ("increasing", {"mode": "max", "patience": 4}),
    ("noisy", {"mode": "max", "patience": 1, "threshold_mode": "abs", "threshold": 0.01}),
    ("plateau-then-drop", {"patience": 5, "cooldown": 7, "factor": 0.5}),
    ("noisy", {"patience": 1, "cooldown": 3, "factor": 0.5, "threshold": 0.1}),
    ("plateau", {"patience": 2, "factor": 0.3, "min_lr": 1e-3}),
    ("plateau", {"patience": 2, "factor": 0.3, "min_lr": [1e-3, 5e-4]}),
    ("plateau", {"patience": 1, "factor": 0.1, "eps": 1e-4}),
    ("nan-inf", {"patience": 1, "factor": 0.5}),
    ("nan-inf", {"mode": "max", "patience": 2, "factor": 0.5}),
]


def _assert_same_state(ours, ref, fake, topt):
    assert [g["lr"] for g in fake.param_groups] == [g["lr"] for g in topt.param_groups]
    assert ours.num_bad_epochs == ref.num_bad_epochs
    assert ours.cooldown_counter == ref.cooldown_counter
    assert ours.last_epoch == ref.last_epoch
    assert ours.best == ref.best or (math.isnan(ours.best) and math.isnan(ref.best))


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("stream", "kwargs"),
    PLATEAU_CASES,
    ids=[f"{s}-{'-'.join(k) or 'default'}" for s, k in PLATEAU_CASES],
)
def test_plateau_matches_torch(stream, kwargs):
    torch = _torch()
    topt = _torch_opt(torch, 0.1, 0.01)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kwargs)
    fake = FakeOptimizer(0.1, 0.01)
    ours = S.ReduceLROnPlateau(fake, **kwargs)
    metrics = STREAMS[stream]
    half = len(metrics) // 2
    for i, m in enumerate(metrics):
        topt.step()
        ref.step(m)
        ours.step(m)
        _assert_same_state(ours, ref, fake, topt)
        if i == half:  # checkpoint mid-stream through strict JSON into a fresh scheduler
            sd = json.loads(json.dumps(ours.state_dict(), allow_nan=False))
            ours = S.ReduceLROnPlateau(fake, mode="max", factor=0.9, patience=99)
            ours.load_state_dict(sd)
            assert ours.state_dict() == sd
            _assert_same_state(ours, ref, fake, topt)
    if stream in ("plateau", "noisy"):
        assert fake.param_groups[0]["lr"] < 0.1  # the stream did trigger reductions


@pytest.mark.oracle
@settings(max_examples=40, deadline=None)
@given(
    metrics=st.lists(
        st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.49995, 2.0]) | st.floats(-10, 10), max_size=60
    ),
    mode=st.sampled_from(["min", "max"]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    threshold=st.sampled_from([0.0, 1e-4, 0.1]),
    patience=st.integers(0, 4),
    cooldown=st.integers(0, 3),
    factor=st.sampled_from([0.1, 0.5, 0.9]),
    min_lr=st.sampled_from([0.0, 1e-3]),
)
def test_plateau_matches_torch_random(
    metrics, mode, threshold_mode, threshold, patience, cooldown, factor, min_lr
):
    torch = _torch()
    kw = dict(
        mode=mode,
        threshold_mode=threshold_mode,
        threshold=threshold,
        patience=patience,
        cooldown=cooldown,
        factor=factor,
        min_lr=min_lr,
    )
    topt = _torch_opt(torch, 0.1)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kw)
    fake = FakeOptimizer(0.1)
    ours = S.ReduceLROnPlateau(fake, **kw)
    for m in metrics:
        topt.step()
        ref.step(m)
        ours.step(m)
        _assert_same_state(ours, ref, fake, topt)


def test_plateau_with_schedule_lr_composes():
    inner = S.CosineAnnealing(0.1, 50)
    fake = FakeOptimizer(0.1, S.Constant(0.1), inner)
    sched = S.ReduceLROnPlateau(fake, patience=1, factor=0.5, min_lr=1e-3)
    for _ in range(30):
        sched.step(1.0)
    f_lr, const_lr, cos_lr = (g["lr"] for g in fake.param_groups)
    # repeated reductions collapse into one Scaled around the original schedule
    assert isinstance(const_lr, S.Scaled) and const_lr.schedule == S.Constant(0.1)
    assert isinstance(cos_lr, S.Scaled) and cos_lr.schedule is inner
    assert const_lr.min_lr == cos_lr.min_lr == 1e-3
    assert f_lr == 1e-3 == const_lr(0) == const_lr(10**6)
    for k in range(200):  # floored at min_lr, never raised above the schedule's own value
        assert cos_lr(k) == max(cos_lr.factor * inner(k), min(inner(k), 1e-3))
        assert cos_lr(k) <= inner(k)
    # round trip of the scaled schedule, as a checkpoint would store it
    assert S.schedule_from_dict(json.loads(json.dumps(cos_lr.to_dict()))) == cos_lr


def test_plateau_schedule_lr_tracks_float_lr():
    fake = FakeOptimizer(0.1, S.Constant(0.1), S.ExponentialDecay(0.1, 0.99))
    sched = S.ReduceLROnPlateau(fake, patience=2, factor=0.3, min_lr=1e-4)
    for i, m in enumerate(_noisy(300, 1, drift=0.0, noise=0.1)):
        sched.step(m)
        flt, const, exp = (g["lr"] for g in fake.param_groups)
        assert flt == pytest.approx(const(i), rel=1e-12)
        assert exp(i) == pytest.approx(max(flt * 0.99**i, min(0.1 * 0.99**i, 1e-4)), rel=1e-12)
    assert fake.param_groups[0]["lr"] == 1e-4


def test_plateau_wraps_user_callable_and_foreign_scaled():
    def user(k):
        return 0.2

    fake = FakeOptimizer(user, S.Scaled(S.Constant(0.2), 0.5, min_lr=0.05))
    sched = S.ReduceLROnPlateau(fake, patience=0, factor=0.5)
    sched.step(1.0)
    sched.step(1.0)
    a, b = (g["lr"] for g in fake.param_groups)
    assert a == S.Scaled(user, 0.5) and a(3) == 0.1
    assert b.schedule == S.Scaled(S.Constant(0.2), 0.5, min_lr=0.05) and b(0) == 0.05


def test_plateau_state_dict_is_strict_json_and_validated():
    fake = FakeOptimizer(0.1)
    sched = S.ReduceLROnPlateau(fake, mode="max")
    sd = sched.state_dict()
    assert json.loads(json.dumps(sd, allow_nan=False)) == sd and sd["best"] == "-inf"
    sched.step(float("inf"))
    assert sched.state_dict()["best"] == "inf"
    other = S.ReduceLROnPlateau(FakeOptimizer(0.1))
    other.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert other.best == math.inf and other.mode == "max" and other.mode_worse == -math.inf
    bad = dict(sd, mode="sideways")
    with pytest.raises(ValueError, match="mode"):
        other.load_state_dict(bad)
    assert other.mode == "max"
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"mode": "min"})
    with pytest.raises(ValueError, match="threshold"):
        other.load_state_dict(dict(sd, threshold=-1))
    assert other.threshold == 1e-4


def test_plateau_param_group_count_changes():
    fake = FakeOptimizer(0.1)
    sched = S.ReduceLROnPlateau(fake, patience=0, min_lr=0.05)
    fake.param_groups.append({"lr": 1.0})
    sched.step(1.0)
    sched.step(2.0)
    assert [g["lr"] for g in fake.param_groups] == [0.05, 0.1]
    fixed = S.ReduceLROnPlateau(FakeOptimizer(0.1), patience=0, min_lr=[0.05])
    fixed.optimizer.param_groups.append({"lr": 1.0})
    fixed.step(1.0)
    with pytest.raises(RuntimeError, match="min_lr"):
        fixed.step(2.0)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("factor", {"factor": 1.0}),
        ("factor", {"factor": -0.1}),
        ("mode", {"mode": "up"}),
        ("threshold_mode", {"threshold_mode": "pct"}),
        ("threshold", {"threshold": -1e-4}),
        ("patience", {"patience": -1}),
        ("cooldown", {"cooldown": -2}),
        ("min_lr", {"min_lr": [0.0, 0.0]}),
        ("min_lr", {"min_lr": -1.0}),
        ("eps", {"eps": -1e-8}),
    ],
)
def test_plateau_bad_arguments(name, kwargs):
    with pytest.raises(ValueError, match=name):
        S.ReduceLROnPlateau(FakeOptimizer(0.1), **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("patience", {"patience": 1.5}),
        ("cooldown", {"cooldown": "2"}),
        ("factor", {"factor": None}),
        ("mode", {"mode": 1}),
        ("eps", {"eps": True}),
    ],
)
def test_plateau_wrong_argument_types(name, kwargs):
    with pytest.raises(TypeError, match=name):
        S.ReduceLROnPlateau(FakeOptimizer(0.1), **kwargs)


def test_plateau_needs_param_groups():
    with pytest.raises(TypeError, match="param_groups"):
        S.ReduceLROnPlateau(object())
    assert "ReduceLROnPlateau(mode='min'" in repr(S.ReduceLROnPlateau(FakeOptimizer(0.1)))


# --------------------------------------------------------------------------- registry


def test_registry_holds_every_schedule_type_by_name():
    classes = {
        name: obj
        for name, obj in vars(S).items()
        if isinstance(obj, type) and issubclass(obj, S.Schedule) and obj is not S.Schedule
    }
    assert S.SCHEDULES == classes  # one registry: every public schedule class, nothing else
    nested = {name for name, cls in S.SCHEDULES.items() if cls.nested}
    assert nested == {
        "Warmup",
        "Join",
        "PerEpoch",
        "Scaled",
        "ChainedScheduler",
        "CyclicMomentum",
        "OneCycleMomentum",
    }
    for sched in _ROUNDTRIP:  # from_dict reads the same registry
        assert S.SCHEDULES[sched.to_dict()["type"]] is type(sched)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("CosineAnnealing", "CosineAnnealing"),
        ("cosine_annealing", "CosineAnnealing"),
        ("COSINE", "CosineAnnealing"),
        ("one-cycle", "OneCycle"),
        ("sgdr", "CosineAnnealingWarmRestarts"),
        ("exp", "ExponentialDecay"),
        ("warmup", "Warmup"),
    ],
)
def test_schedule_class_resolves_names_and_aliases(name, cls):
    assert S.schedule_class(name) is S.SCHEDULES[cls]


def test_schedule_class_errors():
    assert all(target in S.SCHEDULES for target in S.ALIASES.values())
    with pytest.raises(
        ValueError, match="unknown schedule 'swirl'; known: ChainedScheduler, Constant"
    ):
        S.schedule_class("swirl")
    with pytest.raises(TypeError, match="string"):
        S.schedule_class(3)
