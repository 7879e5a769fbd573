"""``fastopt train --swa-start EPOCH [--swa-lr LR]``: the saved model is the SWA average (with
batch-norm statistics recomputed), the lr follows SWALR after the start, bad values are refused
before anything is written."""

import json

import numpy as np
import pytest
from oracle import import_or_skip

import fastopt
from fastopt import schedules
from fastopt.cli import main
from fastopt.cli import train as train_cmd


@pytest.fixture
def digits():
    import_or_skip("sklearn")  # the built-in datasets are scikit-learn's bundled copies


def test_swa_run_saves_the_average(digits, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    made = []
    real = train_cmd._swa_callback

    def spy(args, model, trainer):
        cb = real(args, model, trainer)
        made.append((cb, model))
        return cb

    monkeypatch.setattr(train_cmd, "_swa_callback", spy)
    args = ["train", "digits", "--epochs", "5", "--swa-start", "2", "--swa-lr", "5e-4"]
    args += ["--batch-norm", "--quiet", "--no-plot", "--out", "run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "SWA: the model is the average of epochs 3-5" in out
    ((cb, model),) = made
    assert cb.averaged.n_averaged == 3
    # the checkpoint holds the averaged parameters and the recomputed batch-norm statistics
    ckpt = fastopt.load(tmp_path / "run" / "model.ckpt")
    info = ckpt.extra["model"]
    rebuilt = fastopt.MLP(**info["mlp"])
    ckpt.restore(params=rebuilt.arrays())
    np.testing.assert_array_equal(rebuilt.params.flat, cb.averaged.averages[0])
    np.testing.assert_array_equal(
        rebuilt.buffers["layers.0.bn.running_var"], model.buffers["layers.0.bn.running_var"]
    )
    assert info["metrics"]["test"]["accuracy"] > 0.9
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["meta"]["swa"] == {
        "start": 2,
        "lr": 5e-4,
        "averaged_epochs": 3,
        "first_epoch": 3,
    }
    # lr logged at the end of each epoch: Adam's 1e-3, then SWALR(1e-3 -> 5e-4) from the switch
    ref = schedules.SWALR(1e-3, 5e-4, 10)
    lrs = history["metrics"]["lr"]
    assert lrs[:2] == [1e-3, 1e-3]
    assert lrs[2:] == pytest.approx([ref(j) for j in (1, 2, 3)], rel=1e-15)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--swa-start", "0"], "--swa-start must be in [1, --epochs - 1] = [1, 4]"),
        (["--swa-start", "5"], "--swa-start must be in [1, --epochs - 1] = [1, 4]"),
        (["--swa-lr", "0.01"], "--swa-lr needs --swa-start EPOCH"),
        (["--swa-start", "2", "--swa-lr", "0"], "--swa-lr must be a finite number > 0"),
        (["--swa-start", "2", "--swa-lr", "nan"], "--swa-lr must be a finite number > 0"),
        (["--swa-start", "2", "--patience", "2"], "--swa-start and --patience"),
    ],
)
def test_swa_bad_options_write_nothing(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "digits", "--epochs", "5", *extra]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.iterdir())
