"""Fixes from the Trainer / CLI audit.

- 16-bit precision: weights the Trainer puts back into the model (early stopping's best epoch,
  the last finite epoch after a divergence) also become the optimizer's float32 master copy, so
  the checkpoint holds them and a resumed run continues exactly as the same process would.
- ``fit(resume=...)`` checks the whole saved trainer state before restoring anything.
- ``fastopt train`` checks every output file before training (a directory in the way, an
  output that is the input data file) and reports it as a usage error, exit 2.
- ``fastopt bench --sizes`` refuses sizes out of range (overflowing, astronomically large) as a
  usage error.
"""

import os

import numpy as np
import pytest
from cli_helpers import cli
from oracle import import_or_skip

import fastopt as fo
from fastopt.checkpoint import CheckpointError
from fastopt.cli import main
from fastopt.cli.bench import MAX_SIZE, parse_size


def _xor(n=300, d=8):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X, (X[:, 0] * X[:, 1] > 0).astype(np.int64)


def _early_stopping_trainer(precision, checkpoint=None):
    model = fo.MLP(8, (64,), 2, seed=0, dropout=0.1)
    trainer = fo.Trainer(
        model,
        fo.AdamW,
        lr=1e-2,
        batch_size=32,
        epochs=2,
        seed=0,
        checkpoint=checkpoint,
        validation_split=0.2,
        patience=2,
        precision=precision,
    )
    return model, trainer


def _master(path):
    (state,) = fo.load(path).optimizer_state["state"].values()
    return state["master_param"]


# ------------------------------------------------------------------ 16-bit master copies
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_after_best_weights_restored_continues_like_the_same_process(tmp_path, precision):
    X, y = _xor()
    path = tmp_path / "run.ckpt"
    m_same, t_same = _early_stopping_trainer(precision)
    t_same.fit(X, y)
    assert "restored_epoch" in t_same.history.meta  # the best epoch was put back
    h_same = t_same.fit(X, y, epochs=4)

    m_saved, t_saved = _early_stopping_trainer(precision, checkpoint=path)
    t_saved.fit(X, y)
    # the checkpoint's master copy is the restored weights, not the last step's
    np.testing.assert_array_equal(_master(path), m_saved.params.flat)
    m_resumed, t_resumed = _early_stopping_trainer(precision)
    h_resumed = t_resumed.fit(X, y, epochs=4, resume=path)
    assert h_resumed["loss"][2:] == h_same["loss"][2:]
    assert m_resumed.params.flat.tobytes() == m_same.params.flat.tobytes()


def test_checkpoint_master_is_the_restored_last_finite_weights(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 4)).astype(np.float32)
    y = (X @ np.ones(4, np.float32) * 1e3)[:, None]
    model = fo.MLP(4, (8,), 1, seed=0, loss="mse")
    path = tmp_path / "run.ckpt"
    trainer = fo.Trainer(
        model, fo.SGD, lr=1e3, epochs=3, batch_size=16, seed=0, precision="bf16", checkpoint=path
    )
    history = trainer.fit(X, y)
    assert history.stop_reason == "nonfinite_loss"
    assert np.isfinite(model.params.flat).all()
    np.testing.assert_array_equal(_master(path), model.params.flat)


# ------------------------------------------------------------------ resume checks
@pytest.fixture
def trainer_checkpoint(tmp_path):
    """(path, X, y) of a one-epoch Trainer checkpoint (the fields of its trainer state are
    replaced by the tests)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    path = tmp_path / "run.ckpt"
    model = fo.MLP(4, (8,), 2, seed=1)
    trainer = fo.Trainer(
        model,
        fo.Adam,
        lr=1e-2,
        epochs=1,
        seed=0,
        checkpoint=path,
        validation_split=0.25,
        patience=3,
    )
    trainer.fit(X, y)
    return path, X, y


def _rewrite(path, change_trainer=None, change_extra=None):
    ckpt = fo.load(path)
    extra = dict(ckpt.extra)
    state = dict(extra["trainer"])
    if change_trainer:
        change_trainer(state)
    extra["trainer"] = state
    if change_extra:
        change_extra(extra)
    optimizer = fo.Adam(fo.MLP(4, (8,), 2, seed=1).params, lr=1e-2)
    optimizer.load_state_dict(ckpt.optimizer_state)
    fo.save(
        path, params=ckpt.params, optimizer=optimizer, rng=np.random.default_rng(0), extra=extra
    )


def _drop(key):
    return lambda state: state.pop(key)


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


BAD_STATES = [
    ("global_step", _drop("global_step"), "is missing"),
    ("epoch", _drop("epoch"), "is missing"),
    ("seed", _drop("seed"), "is missing"),
    ("history", _drop("history"), "is missing"),
    ("epoch", _set("epoch", "1"), "must be an integer >= 0"),
    ("global_step", _set("global_step", 1.5), "must be an integer >= 0"),
    ("seed", _set("seed", -1), "must be an integer >= 0"),
    ("history", _set("history", [1, 2]), "must be a dict"),
    ("history", _set("history", {"loss": "high"}), "must be a dict"),
    ("history", _set("history", {"loss": ["x"]}), "must be a dict"),
    ("meta", _set("meta", [1]), "must be a dict or null"),
    ("best", _set("best", "low"), "must be a number or null"),
    ("best_epoch", _set("best_epoch", 0.5), "must be an integer >= 0 or null"),
    ("wait", _set("wait", None), "must be an integer >= 0"),
]


@pytest.mark.parametrize(
    "field,change,message", BAD_STATES, ids=[f"{f}-{m}" for f, _, m in BAD_STATES]
)
def test_resume_checks_the_trainer_state_before_restoring(
    trainer_checkpoint, field, change, message
):
    path, X, y = trainer_checkpoint
    _rewrite(path, change_trainer=change)
    model = fo.MLP(4, (8,), 2, seed=2)
    trainer = fo.Trainer(model, fo.Adam, lr=1e-2, epochs=2, seed=0)
    before = model.params.flat.copy()
    opt_before = trainer.optimizer.state_dict()
    with pytest.raises(CheckpointError, match=f"'{field}' {message}"):
        trainer.fit(X, y, resume=path)
    np.testing.assert_array_equal(model.params.flat, before)
    assert trainer.optimizer.state_dict()["state"] == opt_before["state"] == {}
    assert trainer.epoch == 0 and trainer.global_step == 0


def test_resume_checks_the_best_weights_against_the_model(trainer_checkpoint):
    path, X, y = trainer_checkpoint
    _rewrite(path, change_extra=lambda extra: extra["best_state"].pop("layers.0.bias", None))
    model = fo.MLP(4, (8,), 2, seed=2)
    before = model.params.flat.copy()
    trainer = fo.Trainer(
        model, fo.Adam, lr=1e-2, epochs=2, seed=0, patience=3, validation_split=0.25
    )
    with pytest.raises(CheckpointError, match="'best_state' does not match the model"):
        trainer.fit(X, y, resume=path)
    np.testing.assert_array_equal(model.params.flat, before)


def test_resume_of_a_valid_checkpoint_still_works(trainer_checkpoint):
    path, X, y = trainer_checkpoint
    _rewrite(path, change_trainer=_drop("wait"))  # optional: older checkpoints lack it
    trainer = fo.Trainer(fo.MLP(4, (8,), 2, seed=2), fo.Adam, lr=1e-2, epochs=2, seed=0)
    history = trainer.fit(X, y, resume=path)
    assert len(history["loss"]) == 2 and trainer.epoch == 2


def test_resume_with_data_that_do_not_fit_changes_nothing(trainer_checkpoint):
    path, X, y = trainer_checkpoint
    model = fo.MLP(4, (8,), 2, seed=2)
    trainer = fo.Trainer(model, fo.Adam, lr=1e-2, epochs=2, seed=0)
    before = model.params.flat.copy()
    with pytest.raises(ValueError):
        trainer.fit(X[:, :3], y, resume=path)  # one feature short: refused before the load
    assert np.array_equal(model.params.flat, before) and trainer.epoch == 0


# ------------------------------------------------------------------ fastopt train outputs
TRAIN = ("--epochs", "1", "--hidden", "4", "--no-plot", "--quiet")


def _assert_usage_error(code, capsys, message):
    assert code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastopt train: error: --out: ")
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("name", ["model.ckpt", "history.json", "test.npz"])
def test_train_checks_every_output_before_training(tmp_path, capsys, name):
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    code = main(["train", "iris", "--out", str(out), *TRAIN])
    _assert_usage_error(code, capsys, f"{out / name}: it is a directory")
    assert os.listdir(out) == [name]  # nothing written: not even model.ckpt


def test_train_checks_curves_png_when_it_draws_them(tmp_path, capsys):
    import_or_skip("matplotlib")
    out = tmp_path / "out"
    (out / "curves.png").mkdir(parents=True)
    args = ["train", "iris", "--out", str(out), "--epochs", "1", "--hidden", "4", "--quiet"]
    _assert_usage_error(main(args), capsys, "curves.png: it is a directory")
    assert os.listdir(out) == ["curves.png"]


def _npz(path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 3))
    np.savez(path, X=X, y=(X[:, 0] > 0).astype(np.int64))
    return path.read_bytes()


def test_train_refuses_to_overwrite_its_input(tmp_path):
    # a subprocess: the exit code of the real command
    out = tmp_path / "out"
    out.mkdir()
    data = out / "test.npz"
    before = _npz(data)
    r = cli("train", data, "--out", out, *TRAIN, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert "is the input data" in r.stderr
    assert data.read_bytes() == before
    assert os.listdir(out) == ["test.npz"]


def test_train_refuses_an_output_linked_to_its_input(tmp_path, capsys):
    data = tmp_path / "data.npz"
    before = _npz(data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.ckpt").symlink_to(data)
    code = main(["train", str(data), "--out", str(out), *TRAIN])
    _assert_usage_error(code, capsys, "model.ckpt is the input data")
    assert data.read_bytes() == before


def test_train_data_named_test_npz_without_a_test_split_is_fine(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    data = out / "test.npz"
    before = _npz(data)
    code = main(["train", str(data), "--out", str(out), "--test-size", "0", *TRAIN])
    assert code == 0, capsys.readouterr().err
    assert data.read_bytes() == before
    assert sorted(os.listdir(out)) == ["history.json", "model.ckpt", "test.npz"]


# ------------------------------------------------------------------ fastopt bench --sizes
# sizes the old code failed on at once (not ones it would have tried to allocate)
@pytest.mark.parametrize("size", ["1e400", "1e30", "1e19", "1e999999999"])
def test_bench_refuses_sizes_out_of_range(tmp_path, capsys, monkeypatch, size):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--sizes", size, "--cases", "sgd", "--no-chart"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert f"--sizes: {size!r} is too large: at most {MAX_SIZE} (2Gi)" in err
    assert not list(tmp_path.iterdir())


def test_bench_sizes_are_exact():
    assert parse_size("2Gi") == MAX_SIZE == 2**31
    assert parse_size("1.5k") == 1500 and parse_size("16Mi") == 16 * 2**20
    assert parse_size("1e9") == 10**9
    for size in ("3Gi", str(MAX_SIZE + 1), "2.5Gi"):
        with pytest.raises(fo.cli.UsageError, match="is too large"):
            parse_size(size)
    with pytest.raises(fo.cli.UsageError, match="not a whole number"):
        parse_size("1.0000000000000001e3")  # a float would round it to 1000
