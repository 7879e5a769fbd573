"""fastopt.swa: AveragedModel against torch.optim.swa_utils.AveragedModel (equal weights and
EMA, 250 updates), update_bn's statistics, the SWA callback in a Trainer run."""

import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo
from fastopt import schedules as S
from fastopt import swa

UPDATES = 250


def walk(shapes, seed=0):
    """Parameter snapshots: a random walk (each yielded state replaces the previous one)."""
    rng = np.random.default_rng(seed)
    state = [rng.standard_normal(s) for s in shapes]
    while True:
        state = [a + 0.1 * rng.standard_normal(a.shape) for a in state]
        yield state


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("decay", [None, 0.95], ids=["swa", "ema"])
def test_averaged_model_matches_torch(decay, dtype):
    torch = import_or_skip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3).to(torch.float64 if dtype is np.float64 else torch.float32)
    ps = fo.ParamSet({"weight": np.zeros((3, 4)), "bias": np.zeros(3)}, dtype=dtype)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype is np.float64 else dict(rtol=1e-5, atol=1e-6)
    ours = swa.AveragedModel(ps, decay)
    if decay is None:
        theirs = AveragedModel(module)
    else:
        theirs = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay))
    snapshots = walk([(3, 4), (3,)])
    for t in range(UPDATES):
        w, b = next(snapshots)
        ps["weight"][...] = w
        ps["bias"][...] = b
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(ps["weight"].copy()))
            module.bias.copy_(torch.from_numpy(ps["bias"].copy()))
        ours.update_parameters()
        theirs.update_parameters(module)
        (avg,) = ours.averages
        ref = np.concatenate(
            [theirs.module.weight.detach().numpy().ravel(), theirs.module.bias.detach().numpy()]
        )
        np.testing.assert_allclose(avg, ref, err_msg=f"update {t + 1}", **tol)
    assert ours.n_averaged == int(theirs.n_averaged) == UPDATES
    # the average is not the last snapshot (it averaged something)
    assert np.max(np.abs(avg - ps.flat)) > 1e-2


def test_equal_weight_average_is_the_mean_and_state_round_trips():
    ps = fo.ParamSet({"a": np.zeros(5, np.float32), "b": np.zeros((2, 2), np.float32)})
    avg = swa.AveragedModel(ps)
    seen = []
    for state in [s for s, _ in zip(walk([(9,)], seed=3), range(40))]:
        ps.flat[...] = state[0].astype(np.float32)
        seen.append(ps.flat.copy())
        avg.update_parameters()
    np.testing.assert_allclose(avg.averages[0], np.mean(seen, axis=0), rtol=1e-5, atol=1e-6)
    other = swa.AveragedModel(ps)
    other.load_state_dict(avg.state_dict())
    assert other.n_averaged == 40
    np.testing.assert_array_equal(other.averages[0], avg.averages[0])
    with pytest.raises(ValueError, match="exponential"):
        swa.AveragedModel(ps, 0.9).load_state_dict(avg.state_dict())
    with pytest.raises(ValueError, match="decay"):
        swa.AveragedModel(ps, 1.5)


def _bn_model(dropout=0.0):
    return fo.MLP(5, (7, 6), 3, batch_norm=True, seed=1, dropout=dropout)


def test_update_bn_is_the_cumulative_average_of_batch_statistics():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((53, 5))
    model = _bn_model()
    reference = _bn_model()
    for key in model.buffers:  # arbitrary stale statistics: update_bn must reset them
        model.buffers[key][...] = 3.0 if "bn" in key else model.buffers[key]
    swa.update_bn(model, X, batch_size=16)  # batches of 16, 16, 16, 5
    # reference: the first layer's pre-activations per batch, statistics averaged over batches
    Xs = (X - reference.buffers["input.mean"]) * reference.buffers["input.inv_std"]
    W0 = (
        reference.params["layers.0.weight"] if "layers.0.weight" in reference.params.names else None
    )
    assert W0 is not None, reference.params.names
    H = Xs @ W0
    means, vars_ = [], []
    for lo in range(0, 53, 16):
        h = H[lo : lo + 16]
        means.append(h.mean(axis=0))
        vars_.append(h.var(axis=0, ddof=1))
    tol = dict(rtol=1e-5, atol=1e-6)  # a float32 model
    np.testing.assert_allclose(
        model.buffers["layers.0.bn.running_mean"], np.mean(means, axis=0), **tol
    )
    np.testing.assert_allclose(
        model.buffers["layers.0.bn.running_var"], np.mean(vars_, axis=0), **tol
    )
    assert model.bn_momentum == 0.1  # restored
    np.testing.assert_array_equal(model.params.flat, reference.params.flat)


def test_update_bn_leaves_a_model_without_batch_norm_alone_and_checks_input():
    model = fo.MLP(3, (4,), 2, seed=0)
    before = {k: v.copy() for k, v in model.buffers.items()}
    swa.update_bn(model, np.ones((10, 3)))
    assert all(np.array_equal(before[k], v) for k, v in model.buffers.items())
    with pytest.raises(ValueError, match="batch_size"):
        swa.update_bn(_bn_model(), np.ones((10, 5)), batch_size=0)
    with pytest.raises(ValueError, match="2 rows"):
        swa.update_bn(_bn_model(), np.ones((1, 5)))


def _data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5))
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)
    return X, y


def test_swa_callback_averages_after_swa_start_and_switches_to_swalr():
    X, y = _data()
    model = _bn_model()
    cb = swa.SWA(model, 3, swa_lr=0.005, anneal_epochs=2)
    snapshots = []
    trainer = fo.Trainer(
        model,
        fo.SGD,
        lr=0.05,
        batch_size=32,
        epochs=7,
        seed=0,
        callbacks=[cb, lambda t, e, logs: snapshots.append(model.params.flat.copy())],
    )
    history = trainer.fit(X, y)
    # epochs 4..7 averaged, equal weights
    assert cb.first_epoch == 4 and cb.averaged.n_averaged == 4
    mean = np.mean(snapshots[3:], axis=0)
    np.testing.assert_allclose(cb.averaged.averages[0], mean, rtol=1e-5, atol=1e-6)
    # lr per epoch: 0.05 for epochs 1..3, then SWALR(0.05 -> 0.005, 2 epochs) at j - 1
    lrs = history["lr"]
    ref = S.SWALR(0.05, 0.005, 2)
    assert lrs[:3] == [0.05] * 3
    # history logs the lr at the epoch's end (the step count after it): SWALR(j) there
    assert lrs[3:] == pytest.approx([ref(j) for j in range(1, 5)], rel=1e-15)
    trained = model.params.flat.copy()
    cb.finish(X)
    np.testing.assert_array_equal(model.params.flat, cb.averaged.averages[0])
    assert not np.array_equal(trained, model.params.flat)
    assert model.buffers["layers.0.bn.running_var"].min() > 0
    assert trainer.evaluate(X, y)["accuracy"] > 0.5


def test_swa_finish_without_averaging_and_bad_arguments():
    model = _bn_model()
    cb = swa.SWA(model, 5)
    with pytest.raises(RuntimeError, match="no epoch"):
        cb.finish(np.ones((4, 5)))
    for kwargs, error, match in [
        (dict(swa_start=0), ValueError, "swa_start"),
        (dict(swa_start=2.0), TypeError, "swa_start"),
        (dict(swa_start=2, swa_lr=0.0), ValueError, "swa_lr"),
        (dict(swa_start=2, anneal_epochs=-1), ValueError, "anneal_epochs"),
        (dict(swa_start=2, anneal_strategy="cosine"), ValueError, "anneal_strategy"),
        (dict(swa_start=2, decay=2.0), ValueError, "decay"),
    ]:
        with pytest.raises(error, match=match):
            swa.SWA(model, **kwargs)
