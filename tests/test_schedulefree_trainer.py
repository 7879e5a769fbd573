"""Schedule-free optimizers in the Trainer and ``fastopt train``: validation runs at the averaged
point x, training continues at y, and the CLI's final metrics and saved model are x's."""

import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo
from fastopt.cli import main


def _data(n=160, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    y = (X[:, 0] - X[:, 1] > 0).astype(np.int64)
    return X, y


@pytest.mark.parametrize("cls", [fo.SGDScheduleFree, fo.AdamWScheduleFree])
def test_trainer_validates_at_the_averaged_point(cls):
    X, y = _data()
    model = fo.MLP(4, (8,), 2, seed=0)
    trainer = fo.Trainer(model, cls, lr=0.05, batch_size=32, epochs=3, seed=0)
    history = trainer.fit(X[:120], y[:120], validation_data=(X[120:], y[120:]))
    opt = trainer.optimizer
    assert opt.train_mode  # training continues at y
    y_point = model.params.flat.copy()
    at_y = trainer.evaluate(X[120:], y[120:])["loss"]
    opt.eval()
    assert not np.array_equal(model.params.flat, y_point)
    at_x = trainer.evaluate(X[120:], y[120:])["loss"]
    assert history["val_loss"][-1] == pytest.approx(at_x, rel=1e-12)
    assert at_x != at_y
    opt.train()
    np.testing.assert_allclose(model.params.flat, y_point, rtol=1e-5, atol=1e-6)


def test_cli_saves_the_averaged_point(tmp_path, monkeypatch, capsys):
    import_or_skip("sklearn")  # the built-in datasets are scikit-learn's bundled copies
    monkeypatch.chdir(tmp_path)
    args = ["train", "digits", "--epochs", "2", "--optimizer", "adamwschedulefree:lr=0.005"]
    assert main([*args, "--quiet", "--no-plot", "--out", "run"]) == 0
    ckpt = fo.load(tmp_path / "run" / "model.ckpt")
    assert ckpt.optimizer_state["train_mode"] is False  # the parameters hold x
    info = ckpt.extra["model"]
    model = fo.MLP(**info["mlp"])
    ckpt.restore(params=model.arrays())
    assert info["metrics"]["test"]["accuracy"] > 0.8
