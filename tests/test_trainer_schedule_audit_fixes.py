"""Audit fixes: the Trainer's per-epoch schedule when batch norm skips a last single-row batch,
16-bit precision fits that raise leave the float32 weights alone, and ChainedScheduler with a
CosineAnnealing past T_max against torch's ChainedScheduler."""

import math

import numpy as np
import pytest
from test_schedules import LR, torch_lrs, values

import fastopt as fo
from fastopt import schedules as S


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)).astype(np.float32), rng.integers(0, 2, n)


# --------------------------------------------------------------------------- schedule_unit="epoch"


def _lrs_per_step(trainer):
    """Record the lr of every optimizer step of ``trainer`` (epoch, lr)."""
    seen = []
    step = trainer._opt_step

    def recording(opt, grads):
        lr = opt.param_groups[0]["lr"]
        seen.append((trainer.epoch, lr(trainer.global_step) if callable(lr) else lr))
        step(opt, grads)

    trainer._opt_step = recording
    return seen


@pytest.mark.parametrize("batch_norm", [False, True])
def test_per_epoch_schedule_counts_the_steps_taken(batch_norm):
    """33 rows in batches of 16: the last batch has one row, which batch norm skips (2 steps
    per epoch). The lr is torch's StepLR stepped once per epoch, and meta says 2 steps."""
    X, y = _data(33)
    model = fo.MLP(4, (8,), 2, seed=0, batch_norm=batch_norm)
    t = fo.Trainer(
        model,
        fo.SGD,
        lr=0.1,
        batch_size=16,
        epochs=6,
        seed=0,
        schedule=S.StepDecay(0.1, 1, 0.5),
        schedule_unit="epoch",
    )
    seen = _lrs_per_step(t)
    t.fit(X, y)
    steps = 2 if batch_norm else 3
    assert t.history.meta["steps_per_epoch"] == steps
    assert t.global_step == 6 * steps
    oracle = torch_lrs(lambda L, o: L.StepLR(o, step_size=1, gamma=0.5), 0.1, 6)
    assert [lr for _, lr in seen] == pytest.approx(np.repeat(oracle, steps), rel=1e-12)
    assert [e for e, _ in seen] == list(np.repeat(np.arange(6), steps))
    # the lr logged at the end of epoch e is the one of epoch e + 1
    assert t.history["lr"] == pytest.approx(0.1 * 0.5 ** np.arange(1, 7), rel=1e-12)


def test_swa_switches_lr_at_epoch_boundaries_with_skipped_single_row():
    """The SWA callback's SWALR is a PerEpoch over meta's steps_per_epoch: the steps taken."""
    from fastopt import swa

    X, y = _data(33)
    model = fo.MLP(4, (8,), 2, seed=0, batch_norm=True)
    cb = swa.SWA(model, swa_start=2, swa_lr=0.01, anneal_epochs=2)
    t = fo.Trainer(model, fo.SGD, lr=0.1, batch_size=16, epochs=6, seed=0, callbacks=[cb])
    seen = _lrs_per_step(t)
    t.fit(X, y)
    per_epoch = {}
    for epoch, lr in seen:
        per_epoch.setdefault(epoch, set()).add(lr)
    assert all(len(v) == 1 for v in per_epoch.values()), per_epoch


# --------------------------------------------------------------------------- 16-bit failed fits


def _failing_fit(case):
    X, y = _data(10)
    kwargs = {"batch_size": 4}
    args = (X, y)
    if case == "drop_last":
        kwargs.update(batch_size=64, drop_last=True)
    elif case == "batchnorm_one_row":
        args = (X[:1], y[:1])
    elif case == "bad_plateau":
        kwargs.update(plateau={"factor": 2.0})
    elif case == "bad_monitor":
        kwargs.update(monitor="val_loss")  # no validation data
    model = fo.MLP(4, (8,), 2, seed=0, batch_norm=case == "batchnorm_one_row")
    return model, kwargs, args


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("case", ["drop_last", "batchnorm_one_row", "bad_plateau", "bad_monitor"])
def test_failed_16bit_fit_leaves_weights_bit_identical(case, precision):
    model, kwargs, args = _failing_fit(case)
    before = model.params.flat.copy()
    t = fo.Trainer(model, fo.Adam, precision=precision, seed=0, **kwargs)
    with pytest.raises(ValueError):
        t.fit(*args)
    np.testing.assert_array_equal(model.params.flat.view(np.uint32), before.view(np.uint32))


def test_16bit_fit_after_failed_fit_rounds_then_trains():
    """The checks moved, not the rounding: a good fit still trains the 16-bit values."""
    model, kwargs, _ = _failing_fit("drop_last")
    X, y = _data(10)
    t = fo.Trainer(model, fo.Adam, precision="bf16", seed=0, **kwargs)
    with pytest.raises(ValueError):
        t.fit(X, y)
    t.fit(np.concatenate([X] * 7), np.concatenate([y] * 7), epochs=1)
    flat = model.params.flat
    np.testing.assert_array_equal(flat, flat.astype(t._mixed.params.dtype).astype(np.float32))


# --------------------------------------------------------------------------- chained cosine


CHAINED_COSINE = [
    (
        "cosine-exp",
        [S.CosineAnnealing(LR, 20), S.ExponentialDecay(LR, gamma=0.95)],
        lambda L, o: [L.CosineAnnealingLR(o, 20), L.ExponentialLR(o, 0.95)],
    ),
    (
        "exp-cosine",
        [S.ExponentialDecay(LR, gamma=0.97), S.CosineAnnealing(LR, 7)],
        lambda L, o: [L.ExponentialLR(o, 0.97), L.CosineAnnealingLR(o, 7)],
    ),
    (
        "cosine1-step",
        [S.CosineAnnealing(LR, 1), S.StepDecay(LR, 3, 0.5)],
        lambda L, o: [L.CosineAnnealingLR(o, 1), L.StepLR(o, 3, 0.5)],
    ),
    (
        "two-cosines-step",
        [S.CosineAnnealing(LR, 10), S.CosineAnnealing(LR, 15), S.StepDecay(LR, 4, 0.9)],
        lambda L, o: [L.CosineAnnealingLR(o, 10), L.CosineAnnealingLR(o, 15), L.StepLR(o, 4, 0.9)],
    ),
    (
        "two-cosines",
        [S.CosineAnnealing(LR, 6), S.CosineAnnealing(LR, 3)],
        lambda L, o: [L.CosineAnnealingLR(o, 6), L.CosineAnnealingLR(o, 3)],
    ),
    (
        "cosine-poly",
        [S.CosineAnnealing(LR, 10), S.PolynomialDecay(LR, 25, 2.0)],
        lambda L, o: [L.CosineAnnealingLR(o, 10), L.PolynomialLR(o, 25, 2.0)],
    ),
    (
        "poly-cosine-multistep",
        [S.PolynomialDecay(LR, 15), S.CosineAnnealing(LR, 10), S.MultiStepDecay(LR, [5, 40], 0.5)],
        lambda L, o: [
            L.PolynomialLR(o, 15, 1.0),
            L.CosineAnnealingLR(o, 10),
            L.MultiStepLR(o, [5, 40], 0.5),
        ],
    ),
    (
        "cyclic-cosine",  # a setter before the cosine: its restart adds to the setter's lr
        [S.CyclicLR(0.01, 0.1, step_size_up=5), S.CosineAnnealing(LR, 8)],
        lambda L, o: [
            L.CyclicLR(o, 0.01, 0.1, step_size_up=5, cycle_momentum=False),
            L.CosineAnnealingLR(o, 8),
        ],
    ),
]


@pytest.mark.parametrize(
    ("schedules", "make"),
    [c[1:] for c in CHAINED_COSINE],
    ids=[c[0] for c in CHAINED_COSINE],
)
def test_chained_cosine_past_t_max_matches_torch(schedules, make):
    """torch's CosineAnnealingLR past T_max adds lr·(1 - cos(π/T))/2 the step after each 0
    instead of scaling the lr; 200 steps cover several of those restarts."""
    ours = values(S.ChainedScheduler(schedules), 200)
    ref = torch_lrs(lambda L, o: L.ChainedScheduler(make(L, o)), LR, 200)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)


GAMMA_ZERO_CHAINS = [
    (
        "multistep0-cosine",  # the cosine's restart makes the lr nonzero; the next milestone zeroes it
        [S.MultiStepDecay(LR, [10, 30], 0.0), S.CosineAnnealing(LR, 5)],
        lambda L, o: [L.MultiStepLR(o, [10, 30], gamma=0.0), L.CosineAnnealingLR(o, 5)],
    ),
    (
        "cosine-step0",
        [S.CosineAnnealing(LR, 4), S.StepDecay(LR, 7, 0.0)],
        lambda L, o: [L.CosineAnnealingLR(o, 4), L.StepLR(o, 7, gamma=0.0)],
    ),
    (
        "cyclic-step0",  # a setter: StepLR(gamma=0) zeroes its value at every multiple of 10
        [S.CyclicLR(0.01, LR, step_size_up=4), S.StepDecay(0.01, 10, 0.0)],
        lambda L, o: [
            L.CyclicLR(o, 0.01, LR, step_size_up=4, cycle_momentum=False),
            L.StepLR(o, 10, gamma=0.0),
        ],
    ),
    (
        "cyclic-exponential0",
        [S.CyclicLR(0.01, LR, step_size_up=4), S.ExponentialDecay(0.01, gamma=0.0)],
        lambda L, o: [
            L.CyclicLR(o, 0.01, LR, step_size_up=4, cycle_momentum=False),
            L.ExponentialLR(o, gamma=0.0),
        ],
    ),
]


@pytest.mark.parametrize(
    ("schedules", "make"),
    [c[1:] for c in GAMMA_ZERO_CHAINS],
    ids=[c[0] for c in GAMMA_ZERO_CHAINS],
)
def test_chained_gamma_zero_decay_zeroes_the_lr_at_each_decay_step_as_torch(schedules, make):
    """torch's StepLR, MultiStepLR and ExponentialLR with gamma = 0 multiply the lr by 0 at
    every decay step, also after a setter or a cosine restart made it nonzero again (before,
    the chain took their factor as 1 once their own value was 0)."""
    ours = values(S.ChainedScheduler(schedules, lr=LR), 120)
    ref = torch_lrs(lambda L, o: L.ChainedScheduler(make(L, o)), LR, 120)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)


def test_chained_cosine_alone_is_the_cosine():
    for cos in (S.CosineAnnealing(0.1, 5), S.CosineAnnealing(0.1, 5, 0.01)):
        chain = S.ChainedScheduler([cos])
        assert [chain(k) for k in range(60)] == pytest.approx(values(cos, 60), rel=1e-12)
    chain = S.ChainedScheduler([S.CosineAnnealing(0.1, 4), S.ExponentialDecay(0.1, gamma=0.9)])
    assert chain(4) == 0.0
    assert chain(5) == pytest.approx(0.1 * (1 - math.cos(math.pi / 4)) / 2 * 0.9, rel=1e-12)
