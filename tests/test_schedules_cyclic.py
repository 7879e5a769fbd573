"""CyclicLR, SWALR and ChainedScheduler against torch.optim.lr_scheduler, step for step (>= 1000
steps, as tests/test_schedules.py checks the others), plus their arguments and configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_schedules import LR, _torch, torch_lrs, values

from fastopt import schedules as S


def triangular_height(x):  # a scale_fn (module level: picklable, like torch's advice)
    return 1 / (1 + 0.1 * x)


CYCLIC = [
    (
        "triangular",
        S.CyclicLR(0.01, 0.1, step_size_up=50),
        lambda L, o: L.CyclicLR(o, 0.01, 0.1, step_size_up=50, cycle_momentum=False),
    ),
    (
        "triangular-asymmetric",
        S.CyclicLR(0.001, 0.05, step_size_up=30, step_size_down=70),
        lambda L, o: L.CyclicLR(o, 0.001, 0.05, 30, 70, cycle_momentum=False),
    ),
    (
        "triangular2",
        S.CyclicLR(0.01, 0.2, step_size_up=40, mode="triangular2"),
        lambda L, o: L.CyclicLR(
            o, 0.01, 0.2, step_size_up=40, mode="triangular2", cycle_momentum=False
        ),
    ),
    (
        "exp_range",
        S.CyclicLR(0.005, 0.1, step_size_up=25, step_size_down=15, mode="exp_range", gamma=0.999),
        lambda L, o: L.CyclicLR(
            o, 0.005, 0.1, 25, 15, mode="exp_range", gamma=0.999, cycle_momentum=False
        ),
    ),
    (
        "scale_fn-cycle",
        S.CyclicLR(0.01, 0.1, step_size_up=20, scale_fn=triangular_height),
        lambda L, o: L.CyclicLR(o, 0.01, 0.1, 20, scale_fn=triangular_height, cycle_momentum=False),
    ),
    (
        "scale_fn-iterations",
        S.CyclicLR(0.01, 0.1, step_size_up=20, scale_fn=triangular_height, scale_mode="iterations"),
        lambda L, o: L.CyclicLR(
            o,
            0.01,
            0.1,
            20,
            scale_fn=triangular_height,
            scale_mode="iterations",
            cycle_momentum=False,
        ),
    ),
    (
        "down-0",
        S.CyclicLR(0.01, 0.1, step_size_up=9, step_size_down=0),
        lambda L, o: L.CyclicLR(o, 0.01, 0.1, 9, 0, cycle_momentum=False),
    ),
]


@pytest.mark.oracle
@pytest.mark.parametrize(("schedule", "make"), [c[1:] for c in CYCLIC], ids=[c[0] for c in CYCLIC])
def test_cyclic_matches_torch_bit_for_bit(schedule, make):
    """torch's CyclicLR is a closed form too (it sets the lr outright): the same floats."""
    ours = values(schedule, 1200)
    assert ours == torch_lrs(make, LR, 1200)
    assert max(ours) > min(ours) * 2  # it cycles


def swalr(optimizer, **kwargs):
    from torch.optim.swa_utils import SWALR

    return SWALR(optimizer, **kwargs)


SWALR_CASES = [
    ("cos", S.SWALR(LR, 0.01, 50), lambda L, o: swalr(o, swa_lr=0.01, anneal_epochs=50)),
    (
        "linear",
        S.SWALR(LR, 0.02, 300, "linear"),
        lambda L, o: swalr(o, swa_lr=0.02, anneal_epochs=300, anneal_strategy="linear"),
    ),
    ("anneal-0", S.SWALR(LR, 0.03, 0), lambda L, o: swalr(o, swa_lr=0.03, anneal_epochs=0)),
    ("anneal-1", S.SWALR(LR, 0.5, 1), lambda L, o: swalr(o, swa_lr=0.5, anneal_epochs=1)),
]


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("schedule", "make"), [c[1:] for c in SWALR_CASES], ids=[c[0] for c in SWALR_CASES]
)
def test_swalr_matches_torch(schedule, make):
    """torch recovers the start lr from the current one each step; the closed form agrees to
    rounding, and both end at swa_lr."""
    ref = torch_lrs(make, LR, 1000)
    ours = values(schedule, 1000)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    assert ours[-1] == pytest.approx(schedule.swa_lr, rel=1e-15)


CHAINED = [
    (
        "step-exp",
        S.ChainedScheduler([S.StepDecay(LR, 100, 0.5), S.ExponentialDecay(LR, 0.999)]),
        lambda L, o: L.ChainedScheduler(
            [L.StepLR(o, step_size=100, gamma=0.5), L.ExponentialLR(o, gamma=0.999)]
        ),
    ),
    (
        "multistep-cosine-poly",
        S.ChainedScheduler(
            [
                S.MultiStepDecay(LR, [200, 600], 0.3),
                S.CosineAnnealing(LR, 1300),
                S.PolynomialDecay(LR, 1500, 0.5),
            ]
        ),
        lambda L, o: L.ChainedScheduler(
            [
                L.MultiStepLR(o, milestones=[200, 600], gamma=0.3),
                L.CosineAnnealingLR(o, T_max=1300),
                L.PolynomialLR(o, total_iters=1500, power=0.5),
            ]
        ),
    ),
    # Schedules that set the lr (CyclicLR, OneCycleLR, CosineAnnealingWarmRestarts): the last one
    # wins, the multiplicative ones after it scale its value by their factor of the step.
    (
        "step-cyclic",
        S.ChainedScheduler([S.StepDecay(LR, 100, 0.5), S.CyclicLR(0.01, 0.1, step_size_up=50)]),
        lambda L, o: L.ChainedScheduler(
            [
                L.StepLR(o, step_size=100, gamma=0.5),
                L.CyclicLR(o, 0.01, 0.1, step_size_up=50, cycle_momentum=False),
            ]
        ),
    ),
    (
        "cyclic-exp-step",
        S.ChainedScheduler(
            [
                S.CyclicLR(0.01, 0.1, step_size_up=30, mode="triangular2"),
                S.ExponentialDecay(LR, 0.999),
                S.StepDecay(LR, 100, 0.5),
            ]
        ),
        lambda L, o: L.ChainedScheduler(
            [
                L.CyclicLR(o, 0.01, 0.1, 30, mode="triangular2", cycle_momentum=False),
                L.ExponentialLR(o, gamma=0.999),
                L.StepLR(o, step_size=100, gamma=0.5),
            ]
        ),
    ),
    (
        "exp-onecycle-poly",
        S.ChainedScheduler(
            [
                S.ExponentialDecay(LR, 0.99),
                S.OneCycle(0.5, total_steps=1300),
                S.PolynomialDecay(LR, 900, 2.0),
            ]
        ),
        lambda L, o: L.ChainedScheduler(
            [
                L.ExponentialLR(o, gamma=0.99),
                L.OneCycleLR(o, 0.5, total_steps=1300, cycle_momentum=False),
                L.PolynomialLR(o, total_iters=900, power=2.0),
            ]
        ),
    ),
    (
        "warmrestarts-multistep",
        S.ChainedScheduler(
            [
                S.CosineAnnealingWarmRestarts(LR, 100, 2, 0.001),
                S.MultiStepDecay(LR, [300, 700], 0.5),
            ]
        ),
        lambda L, o: L.ChainedScheduler(
            [
                L.CosineAnnealingWarmRestarts(o, 100, 2, 0.001),
                L.MultiStepLR(o, milestones=[300, 700], gamma=0.5),
            ]
        ),
    ),
]


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("schedule", "make"), [c[1:] for c in CHAINED], ids=[c[0] for c in CHAINED]
)
def test_chained_matches_torch(schedule, make):
    ref = torch_lrs(make, LR, 1200)
    ours = values(schedule, 1200)
    assert all(type(v) is float for v in ours)
    np.testing.assert_allclose(ours, ref, rtol=1e-11, atol=1e-15)


def test_chained_formula_and_lr():
    a, b = S.StepDecay(0.2, 3, 0.5), S.ExponentialDecay(0.2, 0.9)
    c = S.ChainedScheduler([a, b])
    assert c.lr == 0.2
    for k in range(20):
        assert c(k) == pytest.approx(0.2 * 0.5 ** (k // 3) * 0.9**k, rel=1e-14)
    assert S.ChainedScheduler([S.Constant(0.0), b])(5) == 0.0
    assert S.ChainedScheduler([0.1]) == S.ChainedScheduler([S.Constant(0.1)], lr=0.1)


@pytest.mark.parametrize(
    "schedules",
    [
        [S.SWALR(0.1, 0.01, 5), S.StepDecay(0.1, 3)],
        [S.StepDecay(0.1, 3), S.CosineAnnealing(0.1, 50, eta_min=0.01)],
    ],
    ids=["SWALR", "CosineAnnealing-eta_min"],
)
def test_chained_refuses_schedules_torch_cannot_chain(schedules):
    with pytest.raises(
        ValueError, match=type(schedules[0 if "SWALR" in repr(schedules[0]) else 1]).__name__
    ):
        S.ChainedScheduler(schedules)
    assert S.ChainedScheduler(schedules[:1])(3) == schedules[0](3)


def test_cyclic_triangular2_halves_each_cycle():
    s = S.CyclicLR(0.0, 1.0, step_size_up=10, mode="triangular2")
    assert [s(10), s(30), s(50)] == [1.0, 0.5, 0.25]
    assert s(0) == s(20) == 0.0


def test_swalr_formula():
    s = S.SWALR(1.0, 0.0, 4, "cos")
    assert [s(k) for k in range(6)] == pytest.approx(
        [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0, 0],
        abs=1e-15,
    )


@pytest.mark.parametrize(
    "sched",
    [
        S.CyclicLR(0.01, 0.1, 7, 3, "exp_range", 0.99),
        S.SWALR(0.1, 0.01, 5, "linear"),
        S.ChainedScheduler([S.StepDecay(0.1, 3), S.CyclicLR(0.1, 0.2, 5)]),
        S.OneCycle(0.3, total_steps=50, three_phase=True).momentum(),
    ],
    ids=["CyclicLR", "SWALR", "ChainedScheduler", "OneCycleMomentum"],
)
def test_new_schedules_round_trip_through_json(sched):
    back = S.schedule_from_dict(json.loads(json.dumps(sched.to_dict(), allow_nan=False)))
    assert back == sched
    assert [back(k) for k in range(40)] == [sched(k) for k in range(40)]


def test_registry_names():
    assert S.schedule_class("cyclic") is S.CyclicLR
    assert S.schedule_class("swa") is S.SWALR
    assert S.schedule_class("chained_scheduler") is S.ChainedScheduler


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: S.CyclicLR(-0.1, 0.1), ValueError, "base_lr"),
        (lambda: S.CyclicLR(0.01, 0.1, step_size_up=0), ValueError, "step_size_up"),
        (lambda: S.CyclicLR(0.01, 0.1, step_size_down=-1), ValueError, "step_size_down"),
        (lambda: S.CyclicLR(0.01, 0.1, step_size_down=2.5), TypeError, "step_size_down"),
        (lambda: S.CyclicLR(0.01, 0.1, mode="sawtooth"), ValueError, "mode"),
        (lambda: S.CyclicLR(0.01, 0.1, scale_mode="epoch"), ValueError, "scale_mode"),
        (lambda: S.CyclicLR(0.01, 0.1, scale_fn=3), TypeError, "scale_fn"),
        (lambda: S.SWALR(0.1, -0.01), ValueError, "swa_lr"),
        (lambda: S.SWALR(0.1, 0.01, -1), ValueError, "anneal_epochs"),
        (lambda: S.SWALR(0.1, 0.01, 5, "cosine"), ValueError, "anneal_strategy"),
        (lambda: S.ChainedScheduler([]), ValueError, "empty"),
        (lambda: S.ChainedScheduler(S.Constant(0.1)), TypeError, "sequence"),
        (lambda: S.ChainedScheduler([0.1], lr=-1.0), ValueError, "lr"),
    ],
)
def test_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def torch_momenta(make, n, key="momentum"):
    """Group 0's momentum (or betas[0]) for each of n steps under a torch CyclicLR."""
    torch = _torch()
    p = torch.zeros(1, requires_grad=True)
    if key == "momentum":
        opt = torch.optim.SGD([p], lr=LR, momentum=0.9)
    else:
        opt = torch.optim.Adam([p], lr=LR)
    sched = make(torch.optim.lr_scheduler, opt)
    out = []
    for _ in range(n):
        g = opt.param_groups[0]
        out.append(g["momentum"] if key == "momentum" else g["betas"][0])
        opt.step()
        sched.step()
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("key", ["momentum", "betas"])
@pytest.mark.parametrize(
    ("schedule", "make"),
    [(c[1], c[2]) for c in CYCLIC],
    ids=[c[0] for c in CYCLIC],
)
def test_cyclic_momentum_matches_torch(schedule, make, key):
    """torch's default cycle_momentum=True: the momentum (or betas[0]) it sets each step."""

    def with_momentum(L, o):
        sched = make(L, o)
        base, top = (0.85, 0.95) if key == "betas" else (0.8, 0.9)
        return L.CyclicLR(
            o,
            sched.base_lrs[0],
            sched.max_lrs[0],
            step_size_up=schedule.step_size_up,
            step_size_down=schedule.step_size_down,
            mode=schedule.mode,
            gamma=schedule.gamma,
            scale_fn=schedule.scale_fn,
            scale_mode=schedule.scale_mode,
            base_momentum=base,
            max_momentum=top,
        )

    mom = schedule.momentum(0.85, 0.95) if key == "betas" else schedule.momentum()
    ref = torch_momenta(with_momentum, 1000, key)
    np.testing.assert_allclose(values(mom, 1000), ref, rtol=1e-13, atol=1e-15)


@pytest.mark.oracle
@pytest.mark.parametrize("algo", ["SGD", "Adam"])
def test_optimizer_with_cycled_momentum_matches_torch(algo):
    """A CyclicMomentum as SGD's momentum / Adam's betas[0] steps as torch's CyclicLR with
    cycle_momentum=True drives torch's optimizer (200 steps, float64)."""
    import fastopt as fo

    torch = _torch()
    cyc = S.CyclicLR(0.01, 0.1, step_size_up=7, step_size_down=13, mode="triangular2")
    rng = np.random.default_rng(3)
    w = rng.standard_normal(64)
    tw = torch.tensor(w.copy(), requires_grad=True)
    if algo == "SGD":
        ours = fo.SGD([w], lr=cyc, momentum=cyc.momentum(), nesterov=True)
        theirs = torch.optim.SGD([tw], lr=0.1, momentum=0.9, nesterov=True)
        base, top = 0.8, 0.9
    else:
        ours = fo.Adam([w], lr=cyc, betas=(cyc.momentum(0.85, 0.95), 0.999))
        theirs = torch.optim.Adam([tw], lr=0.1)
        base, top = 0.85, 0.95
    sched = torch.optim.lr_scheduler.CyclicLR(
        theirs, 0.01, 0.1, 7, 13, mode="triangular2", base_momentum=base, max_momentum=top
    )
    for _ in range(200):
        g = rng.standard_normal(64)
        ours.step([g.copy()])
        tw.grad = torch.tensor(g)
        theirs.step()
        sched.step()
    np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_cyclic_momentum_checks_and_round_trip():
    cyc = S.CyclicLR(0.01, 0.1, step_size_up=4)
    mom = cyc.momentum()
    assert mom(0) == 0.9 and mom(4) == pytest.approx(0.8, abs=1e-15)
    back = S.schedule_from_dict(json.loads(json.dumps(mom.to_dict())))
    assert back == mom
    with pytest.raises(TypeError, match="cyclic must be a CyclicLR"):
        S.CyclicMomentum(S.StepDecay(0.1, 3))
    with pytest.raises(ValueError, match="base_momentum"):
        cyc.momentum(-0.1)


def test_cycled_momentum_survives_a_checkpoint(tmp_path):
    import fastopt as fo

    cyc = S.CyclicLR(0.01, 0.1, step_size_up=5)
    w = np.linspace(-1, 1, 16)
    opt = fo.Adam({"w": w}, lr=cyc, betas=(cyc.momentum(), 0.999))
    grads = [np.cos(np.arange(16.0) * k) for k in range(12)]
    for g in grads[:6]:
        opt.step({"w": g})
    fo.save(tmp_path / "c", params={"w": w}, optimizer=opt)
    w2 = w.copy()
    opt2 = fo.Adam({"w": w2}, lr=0.5)
    opt2.load_state_dict(fo.load(tmp_path / "c").optimizer_state)
    assert opt2.param_groups[0]["betas"] == (cyc.momentum(), 0.999)
    for g in grads[6:]:
        opt.step({"w": g})
        opt2.step({"w": g})
    np.testing.assert_array_equal(w2, w)


@pytest.mark.oracle
@pytest.mark.parametrize(
    "kw",
    [
        {"anneal_strategy": "cos"},
        {"anneal_strategy": "linear", "pct_start": 0.4},
        {"three_phase": True},
    ],
    ids=["cos", "linear", "three_phase"],
)
@pytest.mark.parametrize("key", ["momentum", "betas"])
def test_one_cycle_momentum_matches_torch(kw, key):
    one = S.OneCycle(0.5, total_steps=600, **kw)
    mom = one.momentum(0.8, 0.9) if key == "momentum" else one.momentum()
    lo, hi = (0.8, 0.9) if key == "momentum" else (0.85, 0.95)
    ref = torch_momenta(
        lambda L, o: L.OneCycleLR(o, 0.5, total_steps=600, base_momentum=lo, max_momentum=hi, **kw),
        600,
        key,
    )
    np.testing.assert_allclose(values(mom, 600), ref, rtol=1e-13, atol=1e-15)
    assert mom(601) == hi
