"""fastopt checkpoints as .safetensors files: what safetensors' own readers see, bfloat16 as BF16,
tensor names, and read-only compatibility with checkpoint format 1 (a committed fixture)."""

import hashlib
import importlib.util
import json
import os
import pathlib

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from oracle import torch_or_skip

import fastopt as fo
from fastopt import checkpoint as ck
from fastopt import schedules as S
from fastopt.checkpoint import fileformat

BF16 = np.dtype(ml_dtypes.bfloat16)
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def bits(a):
    return np.asarray(a).view(np.uint16)


@pytest.fixture
def bf16_run(tmp_path):
    """(path, params, optimizer, extra): an Adam over a bfloat16 parameter (bfloat16 state), one
    step, saved with a float32 parameter beside it and extras under a name without an ending."""
    w = np.linspace(-1, 1, 6).astype(BF16).reshape(2, 3)
    opt = fo.Adam([w], lr=0.1)
    opt.step([np.linspace(0.5, -0.25, 6).astype(BF16).reshape(2, 3)])
    params = {"layer.weight": w, "scale": np.array([0.5, 2.0], np.float32)}
    extra = {"c": np.array([1 + 2j, -3j]), "h": np.arange(3, dtype=np.float16), "step": 1}
    path = tmp_path / "run.ckpt"
    assert ck.save(path, params=params, optimizer=opt, extra=extra) == str(path)
    assert os.listdir(tmp_path) == ["run.ckpt"]  # written under the name given, nothing added
    return path, params, opt, extra


def test_numpy_reader_gets_params_and_state_and_fastopt_metadata(bf16_run):
    path, params, opt, _ = bf16_run
    tensors = safetensors.numpy.load_file(path)
    w = tensors["params/layer.weight"]
    assert w.dtype == BF16 and w.shape == (2, 3)
    assert np.array_equal(bits(w), bits(params["layer.weight"]))
    assert np.array_equal(tensors["params/scale"], params["scale"])
    state = opt.state_dict()["state"][0]
    for key in ("exp_avg", "exp_avg_sq"):
        got = tensors[f"optimizer/state/0/{key}"]
        assert got.dtype == BF16 and np.array_equal(bits(got), bits(state[key]))
    assert np.array_equal(tensors["extra/h"], np.arange(3, dtype=np.float16))

    with safetensors.safe_open(path, framework="np") as f:
        meta = f.metadata()
        header_dtypes = {}
        for name in f.keys():
            header_dtypes[name] = f.get_slice(name).get_dtype()
    assert meta["format"] == "fastopt-checkpoint" and meta["format_version"] == "2.0"
    assert meta["algorithm"] == "Adam" and json.loads(meta["hyperparameters"])[0]["lr"] == 0.1
    hashes = json.loads(meta["sha256"])
    assert set(hashes) == set(tensors)
    for name, a in tensors.items():
        assert hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() == hashes[name], name
    assert header_dtypes["params/layer.weight"] == "BF16"
    assert header_dtypes["params/scale"] == "F32" and header_dtypes["extra/h"] == "F16"
    # complex128 has no safetensors code: its bytes, with the true dtype in fastopt's metadata
    assert header_dtypes["extra/c"] == "U8" and tensors["extra/c"].shape == (2, 16)
    assert json.loads(meta["raw_dtypes"]) == {"extra/c": "<c16"}


def test_torch_reader_gets_bfloat16_tensors(bf16_run):
    torch = torch_or_skip()
    import safetensors.torch

    path, params, opt, _ = bf16_run
    tensors = safetensors.torch.load_file(path)
    w = tensors["params/layer.weight"]
    assert w.dtype == torch.bfloat16 and tuple(w.shape) == (2, 3)
    assert (
        w.view(torch.int16).numpy().tolist() == bits(params["layer.weight"]).view(np.int16).tolist()
    )
    exp_avg = tensors["optimizer/state/0/exp_avg"]
    assert exp_avg.dtype == torch.bfloat16
    assert (
        exp_avg.view(torch.int16).numpy().tolist()
        == bits(opt.state_dict()["state"][0]["exp_avg"]).view(np.int16).tolist()
    )
    assert tensors["params/scale"].tolist() == [0.5, 2.0]


def test_fastopt_reads_back_bfloat16_and_raw_dtypes_exactly(bf16_run):
    path, params, opt, extra = bf16_run
    ckpt = ck.load(path)
    w = ckpt.params["layer.weight"]
    assert w.dtype == BF16 and w.flags.writeable and w.flags.aligned
    assert np.array_equal(bits(w), bits(params["layer.weight"]))
    state = ckpt.optimizer_state["state"][0]
    assert state["exp_avg_sq"].dtype == BF16
    assert np.array_equal(
        bits(state["exp_avg_sq"]), bits(opt.state_dict()["state"][0]["exp_avg_sq"])
    )
    assert ckpt.extra["c"].dtype == np.complex128 and np.array_equal(ckpt.extra["c"], extra["c"])
    assert ckpt.extra["h"].dtype == np.float16 and ckpt.extra["step"] == 1
    assert ckpt.metadata["tensors"]["params/layer.weight"]["dtype"] == "BF16"


def test_colliding_paths_get_distinct_tensor_names(tmp_path):
    x, y = np.zeros(2), np.ones(3)
    path = ck.save(tmp_path / "c.safetensors", params={}, extra={"a/b": x, "a": {"b": y}})
    names = set(safetensors.numpy.load_file(path))
    assert names == {"extra/a/b", "extra/a/b#2"}
    got = ck.load(path).extra
    assert np.array_equal(got["a/b"], x) and np.array_equal(got["a"]["b"], y)


def test_metadata_too_large_for_safetensors_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(fileformat, "MAX_HEADER", 2000)
    with pytest.raises(ValueError, match="more than the 2000 a safetensors header may hold"):
        ck.save(tmp_path / "big.safetensors", params={}, extra={"notes": "x" * 3000})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- format 1


def _legacy_builder():
    spec = importlib.util.spec_from_file_location(
        "make_legacy_checkpoint", FIXTURES / "make_legacy_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def test_format_1_checkpoint_still_loads_restores_and_resaves(tmp_path):
    build = _legacy_builder()
    params, opt, plateau, rng, extra = build()
    ckpt = ck.load(FIXTURES / "legacy_v1.ckpt")
    assert ckpt.format_version == (1, 0) and ckpt.algorithm == "Adam"
    for name, a in params.items():
        assert np.array_equal(ckpt.params[name], a)
    assert ckpt.rng_state == rng.bit_generator.state
    assert ckpt.plateau_state == plateau.state_dict()
    assert ckpt.extra["pair"] == (1, 2.5) and ckpt.extra["epoch"] == 2
    assert np.array_equal(bits(ckpt.extra["bits"]), bits(extra["bits"]))
    assert np.array_equal(ckpt.extra["c"], extra["c"])

    # restored into fresh objects, training continues exactly as the originals do
    fresh = {k: np.zeros_like(v) for k, v in params.items()}
    opt2 = fo.Adam(fresh, lr=0.3)
    plateau2 = S.ReduceLROnPlateau(opt2, factor=0.5, patience=0)
    rng2 = np.random.default_rng(0)
    ckpt.restore(params=fresh, optimizer=opt2, plateau=plateau2, rng=rng2)
    grads = {k: np.full(v.shape, 0.125, np.float32) for k, v in params.items()}
    opt.step(grads)
    opt2.step(grads)
    for k in params:
        assert np.array_equal(fresh[k], params[k])
    assert rng2.random() == rng.random()

    # saving again writes the current format
    path = ck.save(tmp_path / "again.safetensors", params=fresh, optimizer=opt2, extra=ckpt.extra)
    assert ck.load(path).format_version == ck.FORMAT_VERSION
    assert set(safetensors.numpy.load_file(path)) >= {"params/w", "params/b", "extra/bits"}


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda raw: raw[:9], "truncated: only 9 bytes, it ends inside the magic line"),
        (lambda raw: raw[: len(raw) // 2], "truncated: the file has .* bytes, its header says"),
        (lambda raw: raw[:-100] + bytes([raw[-100] ^ 0x5A]) + raw[-99:], "checksum mismatch"),
    ],
    ids=["magic", "half", "flipped"],
)
def test_damaged_format_1_checkpoint_is_refused(tmp_path, damage, match):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(damage((FIXTURES / "legacy_v1.ckpt").read_bytes()))
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load(bad)
