"""fastopt.trainer.Trainer: epochs and shuffling, schedules, validation, early stopping, plateau,
history, progress, reproducibility, checkpoints, resume and Ctrl-C."""

import json
import os
import signal
import sys

import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo
from fastopt import schedules
from fastopt.nn import MLP
from fastopt.trainer import History, Trainer


def _blobs(n=240, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 3
    y = rng.integers(0, k, n)
    X = centers[y] + rng.standard_normal((n, d))
    return X, y


def _model(**kw):
    kw.setdefault("seed", 0)
    return MLP(6, (16,), 3, **kw)


def test_fit_learns_and_logs_history():
    X, y = _blobs()
    m = _model()
    m.fit_standardizer(X)
    t = Trainer(m, lr=1e-2, batch_size=32, epochs=8, validation_split=0.25, seed=0)
    h = t.fit(X, y)
    assert isinstance(h, dict) and isinstance(h, History)
    assert h["epoch"] == list(range(1, 9))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "time", "samples_per_s"):
        assert len(h[key]) == 8, key
    assert h["val_accuracy"][-1] > 0.95
    assert h["loss"][-1] < h["loss"][0]
    assert h.meta["n_train"] == 180 and h.meta["n_val"] == 60
    assert t.evaluate(X, y)["accuracy"] > 0.95
    assert t.global_step == 8 * 6


def test_each_epoch_visits_every_sample_once_in_a_new_order(monkeypatch):
    X, y = _blobs(n=100)
    m = _model()
    seen = []
    real = m.batch_loss_and_grad
    monkeypatch.setattr(
        m, "batch_loss_and_grad", lambda X, y, idx, **kw: seen.append(idx.copy()) or real(X, y, idx, **kw)
    )  # fmt: skip
    Trainer(m, batch_size=32, epochs=3, seed=1).fit(X, y)
    assert [len(b) for b in seen] == [32, 32, 32, 4] * 3
    epochs = [np.concatenate(seen[i * 4 : (i + 1) * 4]) for i in range(3)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(100))  # without replacement
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(
        epochs[2], np.random.default_rng([1, 2]).permutation(100)
    )  # the documented order
    seen.clear()
    Trainer(m, batch_size=32, epochs=2, drop_last=True, seed=1).fit(X, y)
    assert [len(b) for b in seen] == [32, 32, 32] * 2
    seen.clear()
    Trainer(m, batch_size=32, epochs=1, shuffle=False).fit(X, y)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(100))


def test_same_seed_same_results_different_seed_differs():
    X, y = _blobs()

    def run(seed):
        m = _model(dropout=0.2, batch_norm=True)
        Trainer(m, batch_size=16, epochs=3, validation_split=0.2, seed=seed).fit(X, y)
        return m.params.flat.copy(), m.buffers["layers.0.bn.running_var"].copy()

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_validation_split_is_stratified_and_explicit_validation():
    X, y = _blobs(n=300)
    t = Trainer(_model(), epochs=0, validation_split=0.2, seed=3)
    train, val = t._split(y, 300)
    assert val.size == 60 and train.size == 240
    assert not np.intersect1d(train, val).size
    for c in range(3):
        assert abs((y[val] == c).mean() - (y == c).mean()) < 0.03
    h = Trainer(_model(), epochs=2, seed=0).fit(
        X[:200], y[:200], validation_data=(X[200:], y[200:])
    )
    assert h.meta["n_val"] == 100 and len(h["val_loss"]) == 2
    with pytest.raises(ValueError, match="either validation_split or validation_data"):
        Trainer(_model(), epochs=1, validation_split=0.1).fit(X, y, validation_data=(X, y))
    with pytest.raises(ValueError, match="X_val has 5 features"):
        Trainer(_model(), epochs=1).fit(X, y, validation_data=(X[:, :5], y))


def test_regression_metrics_and_monitor_names():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((128, 6))
    y = X @ rng.standard_normal(6)
    m = MLP(6, (16,), 1, loss="huber", seed=0)
    h = Trainer(m, lr=1e-2, batch_size=16, epochs=5, validation_split=0.25, seed=0).fit(X, y)
    assert {"mae", "rmse", "val_mae", "val_rmse"} <= set(h)
    assert h["val_rmse"][-1] < h["val_rmse"][0]
    assert all(r >= a for r, a in zip(h["rmse"], h["mae"]))
    with pytest.raises(ValueError, match="unknown monitor"):
        Trainer(m, epochs=1, monitor="accuracy").fit(X, y)
    with pytest.raises(ValueError, match="needs validation data"):
        Trainer(m, epochs=1, monitor="val_mae").fit(X, y)


def test_schedule_per_step_and_per_epoch():
    X, y = _blobs(n=64)
    sched = schedules.StepDecay(0.1, step_size=1, gamma=0.5)
    t = Trainer(_model(), fo.SGD, lr=1.0, batch_size=16, epochs=3, schedule=sched, seed=0)
    h = t.fit(X, y)
    # 4 steps per epoch: after epoch e, 4e steps were taken
    assert h["lr"] == pytest.approx([0.1 * 0.5**4, 0.1 * 0.5**8, 0.1 * 0.5**12])
    t = Trainer(
        _model(), fo.SGD, batch_size=16, epochs=3, schedule=sched, schedule_unit="epoch", seed=0
    )
    h = t.fit(X, y)
    assert h["lr"] == pytest.approx([0.05, 0.025, 0.0125])
    assert isinstance(t.optimizer.param_groups[0]["lr"], schedules.PerEpoch)


def test_any_optimizer_and_clipping_options():
    X, y = _blobs(n=64)
    m = _model()
    t = Trainer(m, fo.SGD, optimizer_kwargs={"momentum": 0.9}, weight_decay=1e-3, epochs=1,
                max_grad_norm=0.5, skip_nonfinite=True)  # fmt: skip
    t.fit(X, y)
    assert t.optimizer.param_groups[0]["momentum"] == 0.9
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [1e-3, 0.0]
    assert t.optimizer.max_grad_norm == 0.5 and t.optimizer.last_grad_norm is not None
    lion = fo.Lion(m.params, lr=1e-4)
    Trainer(m, lion, epochs=1, max_grad_value=1.0).fit(X, y)
    assert lion.max_grad_value == 1.0 and lion.state
    with pytest.raises(ValueError, match="not a contiguous view"):
        Trainer(m, fo.Adam([np.zeros(3)]))
    with pytest.raises(ValueError, match="max_grad_norm"):
        Trainer(m, max_grad_norm=-1)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_max_grad_norm_clips_the_update(max_norm):
    """One full-batch SGD step: the parameter change is -lr * g * min(1, c / (||g|| + 1e-6))
    with g the unclipped gradient (torch's clip_grad_norm_ rule), not -lr * g."""
    X, y = _blobs(n=64)
    m = _model()
    before = m.params.flat.copy()
    probe = _model()  # the same initial weights: its gradient on the whole batch
    probe.batch_loss_and_grad(probe.check_X(X), probe.check_targets(y, 64), np.arange(64),
                              train=True, rng=np.random.default_rng(0))  # fmt: skip
    g = probe.params.grad_flat.astype(np.float64)
    norm = float(np.sqrt((g * g).sum()))
    assert norm > 0.05  # the small max_norm does clip
    lr = 0.1
    Trainer(m, fo.SGD, lr=lr, batch_size=64, epochs=1, shuffle=False, max_grad_norm=max_norm,
            seed=0).fit(X, y)  # fmt: skip
    coef = min(1.0, max_norm / (norm + 1e-6))
    step = m.params.flat.astype(np.float64) - before
    np.testing.assert_allclose(step, -lr * coef * g, rtol=2e-4, atol=1e-7)
    if coef < 1:
        assert np.abs(step).max() < 0.5 * lr * np.abs(g).max()  # far from the unclipped step


def test_a_diverging_run_stops_and_keeps_finite_weights(tmp_path):
    """lr=1e4: the loss overflows within the first epoch; training stops at once without NumPy
    warnings, the initial (last finite) weights are back, and the reason is recorded."""
    import warnings

    X, y = _blobs()
    m = _model()
    initial = m.params.flat.copy()
    path = tmp_path / "run.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from NumPy (overflow, invalid)
        t = Trainer(m, fo.SGD, lr=1e4, batch_size=16, epochs=5, seed=0, checkpoint=str(path),
                    history_path=str(tmp_path / "h.json"))  # fmt: skip
        h = t.fit(X, y)
    assert h.stop_reason == "nonfinite_loss" and h.stop_epoch == 1
    assert len(h["loss"]) == 1 and not np.isfinite(h["loss"][0])
    assert t.global_step < 15  # stopped inside the epoch (15 steps), at the first bad loss
    np.testing.assert_array_equal(m.params.flat, initial)
    assert all(np.isfinite(a).all() for a in fo.load(path).params.values())
    assert History.from_json(tmp_path / "h.json").meta["stop_reason"] == "nonfinite_loss"


def test_divergence_in_a_later_epoch_restores_the_last_finite_epoch():
    X, y = _blobs()

    def blow_up(trainer, epoch, logs):  # from epoch 2 on the learning rate is far too large
        trainer.optimizer.param_groups[0]["lr"] = 1e4

    reference = _model()
    Trainer(reference, fo.SGD, lr=0.1, batch_size=16, epochs=1, seed=0).fit(X, y)
    m = _model()
    t = Trainer(m, fo.SGD, lr=0.1, batch_size=16, epochs=5, seed=0, callbacks=[blow_up])
    h = t.fit(X, y)
    assert (h.stop_reason, h.stop_epoch) == ("nonfinite_loss", 2) and np.isfinite(h["loss"][0])
    np.testing.assert_array_equal(m.params.flat, reference.params.flat)


def test_stop_reason_of_early_stopping_and_callbacks():
    X, y = _blobs(n=64)
    h = Trainer(_model(), epochs=20, patience=2, min_delta=10.0, monitor="loss", seed=0).fit(X, y)
    assert (h.stop_reason, h.stop_epoch) == ("early_stopping", 3)
    h = Trainer(_model(), epochs=5, callbacks=[lambda t, e, logs: e == 2], seed=0).fit(X, y)
    assert (h.stop_reason, h.stop_epoch) == ("callback", 2)
    h = Trainer(_model(), epochs=2, seed=0).fit(X, y)
    assert h.stop_reason is None and h.stop_epoch is None


def test_early_stopping_restores_best_weights():
    X, y = _blobs(n=90, seed=1)
    X = X + np.random.default_rng(5).standard_normal(X.shape) * 4  # noisy: it overfits
    m = MLP(6, (256, 256), 3, seed=0)
    t = Trainer(m, lr=1e-2, batch_size=8, epochs=60, validation_split=0.3, patience=3, seed=0)
    h = t.fit(X, y)
    assert h.meta["stopped_early"] and len(h["loss"]) < 60
    best = h.meta["best_epoch"]
    assert h["val_loss"][best - 1] == min(h["val_loss"])
    assert len(h["loss"]) == best + 3  # three epochs without improvement
    assert h.meta["restored_epoch"] == best
    Xv, yv = X[t._split(y, 90)[1]], y[t._split(y, 90)[1]]
    assert t.evaluate(Xv, yv)["loss"] == pytest.approx(h["val_loss"][best - 1], rel=1e-6)


def test_min_delta_and_monitor_accuracy():
    X, y = _blobs(n=64)
    t = Trainer(_model(), epochs=20, patience=2, min_delta=10.0, monitor="loss", seed=0)
    h = t.fit(X, y)
    assert len(h["loss"]) == 3  # nothing improves by 10: stop after patience epochs
    t = Trainer(_model(), epochs=2, validation_split=0.25, monitor="val_accuracy", seed=0)
    assert t._monitor(True) == ("val_accuracy", "max")


def test_reduce_lr_on_plateau():
    X, y = _blobs(n=64)
    t = Trainer(_model(), fo.SGD, lr=1e-12, epochs=4, plateau={"patience": 0, "factor": 0.5},
                monitor="loss", seed=0)  # fmt: skip
    h = t.fit(X, y)
    assert h["lr"] == pytest.approx([5e-13, 2.5e-13, 1.25e-13, 6.25e-14])
    assert t.plateau.mode == "min"


def test_history_json_roundtrip(tmp_path):
    X, y = _blobs(n=64)
    path = tmp_path / "history.json"
    t = Trainer(_model(), epochs=2, history_path=str(path), seed=0)
    h = t.fit(X, y)
    data = json.loads(path.read_text())
    assert data["metrics"]["loss"] == h["loss"] and data["meta"]["seed"] == 0
    back = History.from_json(path)
    assert back == h and back.meta == h.meta
    assert History.from_json(h.to_json()) == h
    h2 = History({"loss": [float("nan")]})
    assert json.loads(h2.to_json())["metrics"]["loss"] == [None]


def test_checkpoint_resume_is_bit_identical(tmp_path):
    X, y = _blobs()
    kw = dict(batch_size=16, validation_split=0.25, plateau={"patience": 1}, seed=4)

    def fresh():
        return MLP(6, (16,), 3, dropout=0.3, batch_norm=True, seed=0)

    a = fresh()
    ha = Trainer(a, epochs=4, **kw).fit(X, y)
    path = str(tmp_path / "run.ckpt")
    b = fresh()
    Trainer(b, epochs=2, checkpoint=path, **kw).fit(X, y)
    ckpt = fo.load(path)
    assert ckpt.extra["trainer"]["epoch"] == 2
    c = fresh()
    tc = Trainer(c, epochs=4, checkpoint=path, **kw)
    hc = tc.fit(X, y, resume=path)
    np.testing.assert_array_equal(a.params.flat, c.params.flat)
    np.testing.assert_array_equal(
        a.buffers["layers.0.bn.running_mean"], c.buffers["layers.0.bn.running_mean"]
    )
    assert hc["loss"] == ha["loss"] and hc["val_loss"] == ha["val_loss"]
    assert fo.load(path).extra["trainer"]["epoch"] == 4
    with pytest.raises(fo.CheckpointError, match="not a Trainer checkpoint"):
        fo.save(str(tmp_path / "x.ckpt"), params=c.arrays())
        Trainer(fresh(), epochs=1).fit(X, y, resume=str(tmp_path / "x.ckpt"))


class _InterruptAt(Trainer):
    """Sends itself SIGINT (as Ctrl-C would) during step ``at``."""

    def __init__(self, *a, at, **kw):
        super().__init__(*a, **kw)
        self.at = at

    def reduce_gradients(self):
        if self.global_step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_leaves_checkpoint_and_history(tmp_path):
    X, y = _blobs(n=64)
    path = str(tmp_path / "run.ckpt")
    hist = tmp_path / "h.json"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a process started in the background
    m = _model()
    t = _InterruptAt(m, batch_size=16, epochs=5, checkpoint=path, history_path=str(hist),
                     at=9, seed=0)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        t.fit(X, y)
    assert t.interrupted and t.global_step == 10  # the step in flight was completed
    assert len(t.history["loss"]) == 2  # epochs 1 and 2 completed (4 steps each)
    ckpt = fo.load(path)
    np.testing.assert_array_equal(ckpt.params["layers.0.weight"], m.params["layers.0.weight"])
    assert ckpt.extra["trainer"]["interrupted"] and ckpt.extra["trainer"]["global_step"] == 10
    saved = History.from_json(str(hist))
    assert saved["loss"] == t.history["loss"] and saved.meta["interrupted"]["global_step"] == 10
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    # resuming continues from the checkpoint
    m2 = _model()
    h = Trainer(m2, batch_size=16, epochs=4, seed=0).fit(X, y, resume=path)
    assert len(h["loss"]) == 4
    # on_interrupt="stop": the history is returned instead
    t = _InterruptAt(_model(), batch_size=16, epochs=5, on_interrupt="stop", at=1, seed=0)
    h = t.fit(X, y)
    assert t.interrupted and h.meta["interrupted"]["epoch"] == 0 and "loss" not in h


def test_keyboard_interrupt_from_a_callback_saves_checkpoint(tmp_path):
    X, y = _blobs(n=64)
    path = str(tmp_path / "cb.ckpt")

    def cb(trainer, epoch, logs):
        if epoch == 2:
            raise KeyboardInterrupt

    t = Trainer(_model(), epochs=5, checkpoint=path, callbacks=[cb], seed=0)
    with pytest.raises(KeyboardInterrupt):
        t.fit(X, y)
    assert fo.load(path).extra["trainer"]["epoch"] == 2
    stopped = Trainer(_model(), epochs=5, callbacks=[lambda t, e, logs: e == 1], seed=0)
    assert len(stopped.fit(X, y)["loss"]) == 1


def test_progress_bar(capsys, monkeypatch):
    import_or_skip("tqdm")
    X, y = _blobs(n=64)
    Trainer(_model(), epochs=1, progress=True, seed=0).fit(X, y)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "sample/s" in err
    Trainer(_model(), epochs=1, seed=0).fit(X, y)  # progress=None: stderr is not a terminal
    assert capsys.readouterr().err == ""
    Trainer(_model(), epochs=2, progress=False, verbose=1, seed=0).fit(X, y)
    out = capsys.readouterr()
    assert out.err == "" and out.out.count("epoch ") == 2 and "loss" in out.out
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # tqdm not installed
    with pytest.warns(UserWarning, match="needs tqdm"):
        Trainer(_model(), epochs=1, progress=True, seed=0).fit(X, y)


def test_batch_norm_drops_a_last_batch_of_one():
    X, y = _blobs(n=33)
    m = _model(batch_norm=True)
    h = Trainer(m, batch_size=16, epochs=1, seed=0).fit(X, y)
    assert h.meta["n_train"] == 33 and len(h["loss"]) == 1


def test_distributed_hooks_are_used():
    X, y = _blobs(n=64)
    calls = {"reduce": 0, "sums": 0}

    class HalfShard(Trainer):
        def epoch_indices(self, epoch, n):
            return super().epoch_indices(epoch, n)[: n // 2]

        def reduce_gradients(self):
            calls["reduce"] += 1

        def reduce_sums(self, sums):
            calls["sums"] += 1
            assert sums[3] == 32
            return sums

    t = HalfShard(_model(), batch_size=16, epochs=2, seed=0)
    t.fit(X, y)
    assert calls == {"reduce": 4, "sums": 2} and t.global_step == 4


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(epochs=-1), "epochs"),
        (dict(validation_split=1.0), "validation_split"),
        (dict(schedule_unit="batch"), "schedule_unit"),
        (dict(schedule=0.1), "schedule"),
        (dict(on_interrupt="ignore"), "on_interrupt"),
        (dict(seed=-1), "seed"),
        (dict(optimizer_kwargs={"momentum": 0.9}), "optimizer_kwargs"),
        (dict(shuffle="yes"), "shuffle"),
    ],
)
def test_bad_arguments(kw, match):
    m = _model()
    if "optimizer_kwargs" in kw:
        kw["optimizer"] = fo.Adam(m.params)
    with pytest.raises((ValueError, TypeError), match=match):
        Trainer(m, **kw)


def test_bad_data_errors():
    X, y = _blobs(n=20)
    t = Trainer(_model(), epochs=1)
    with pytest.raises(ValueError, match="different numbers of samples"):
        t.fit(X, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        t.fit(np.where(X > 2, np.nan, X), y)
    with pytest.raises(ValueError, match="drop_last"):
        Trainer(_model(), batch_size=32, drop_last=True).fit(X, y)
    with pytest.raises(ValueError, match="leaves no training"):
        Trainer(_model(), validation_split=0.99).fit(X, y)
