"""fastopt.checkpoint: exact resume, verified loading, atomic writes, clear refusals."""

import datetime
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

import fastopt as fo
from fastopt import checkpoint as ck
from fastopt import schedules as S
from fastopt.checkpoint.fileformat import canonical_hash


def split(raw):
    """(header length, header dict, data bytes) of a .safetensors file's bytes."""
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def rewrite(raw, edit, rehash=True):
    """The file ``raw`` with ``edit(header, metadata)`` applied to its header, the header's
    SHA-256 recomputed (unless ``rehash`` is false): a deliberately lying, self-consistent
    header, which only the structural checks can catch."""
    _, header, data = split(raw)
    edit(header, header["__metadata__"])
    if rehash:
        header["__metadata__"]["header_sha256"] = canonical_hash(header)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


class TinyEMA:
    """Duck-typed stand-in for an EMA: state_dict() of arrays and scalars."""

    def __init__(self, params, decay=0.9):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: np.array(v, copy=True) for k, v in params.items()}

    def update(self, params):
        self.num_updates += 1
        for k, v in params.items():
            self.shadow[k] = self.decay * self.shadow[k] + (1 - self.decay) * v

    def state_dict(self):
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {k: v.copy() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, sd):
        if set(sd["shadow"]) != set(self.shadow):
            raise ValueError(f"EMA names differ: {sorted(sd['shadow'])} vs {sorted(self.shadow)}")
        self.decay, self.num_updates = float(sd["decay"]), int(sd["num_updates"])
        self.shadow = {k: np.array(v, copy=True) for k, v in sd["shadow"].items()}


def assert_tree_equal(a, b, where="root"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where  # key order may differ after load_state_dict
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tree_equal(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --------------------------------------------------------------------------- a small training run

SHAPES = {"w": (7, 5), "b": (5,), "scale": ()}


def _initial(dtype, fill=None):
    rng = np.random.default_rng(11)
    return {
        k: (rng.standard_normal(s) if fill is None else np.full(s, fill)).astype(dtype)
        for k, s in SHAPES.items()
    }


CASES = {
    "adam_schedule": dict(
        paramset=True,
        dtype=np.float32,
        make=lambda p: fo.Adam(
            p,
            lr=S.warmup(S.CosineAnnealing(0.05, T_max=20), 4),
            betas=(0.8, 0.99),
            weight_decay=0.01,
        ),
    ),
    "sgd_momentum": dict(
        paramset=False,
        dtype=np.float64,
        make=lambda p: fo.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    ),
    "nadam": dict(
        paramset=True,
        dtype=np.float64,
        make=lambda p: fo.NAdam(p, lr=0.01, momentum_decay=0.01),
    ),
}


class Run:
    """Params + optimizer + plateau + EMA + RNG, all freshly built; gradients come from the RNG."""

    def __init__(self, case, seed=0, fill=None):
        c = CASES[case]
        values = _initial(c["dtype"], fill)
        self.params = fo.ParamSet(values) if c["paramset"] else values
        self.opt = c["make"](self.params)
        self.plateau = S.ReduceLROnPlateau(self.opt, factor=0.5, patience=1)
        self.ema = TinyEMA(self.params)
        self.rng = np.random.default_rng(seed)
        self.t = 0

    def named(self):
        return dict(self.params.items()) if isinstance(self.params, fo.ParamSet) else self.params

    def train(self, steps):
        for _ in range(steps):
            p = self.params
            if isinstance(p, fo.ParamSet):
                g = self.rng.standard_normal(p.size).astype(p.dtype) + 0.1 * p.flat
                self.opt.step(g)
            else:
                g = {
                    k: np.asarray(self.rng.standard_normal(v.shape) + 0.1 * v) for k, v in p.items()
                }
                self.opt.step(g)
            self.ema.update(self.named())
            self.t += 1
            if self.t % 2 == 0:
                self.plateau.step(1.0)  # never improves: reduces the lr every other epoch

    def save(self, path, **kw):
        return ck.save(
            path,
            params=self.params,
            optimizer=self.opt,
            plateau=self.plateau,
            ema=self.ema,
            rng=self.rng,
            **kw,
        )

    def restore(self, ckpt):
        ckpt.restore(
            params=self.params, optimizer=self.opt, plateau=self.plateau, ema=self.ema, rng=self.rng
        )

    def snapshot(self):
        return {
            "params": {k: np.array(v, copy=True) for k, v in self.named().items()},
            "opt": self.opt.state_dict(),
            "plateau": self.plateau.state_dict(),
            "ema": self.ema.state_dict(),
            "rng": self.rng.bit_generator.state,
        }


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_identical(tmp_path, case):
    n = 16
    straight = Run(case)
    straight.train(n)

    first = Run(case)
    first.train(n // 2)
    path = tmp_path / "run.ckpt"
    first.save(path, extra={"epoch": 4, "t": first.t})
    del first

    resumed = Run(case, seed=12345, fill=0.0)  # fresh objects, different values and RNG
    ckpt = ck.load(path)
    resumed.restore(ckpt)
    resumed.t = ckpt.extra["t"]
    if case == "adam_schedule":  # the plateau wrapped the schedule before the save
        assert isinstance(resumed.opt.param_groups[0]["lr"], S.Scaled)
    resumed.train(n - n // 2)

    assert_tree_equal(straight.snapshot(), resumed.snapshot())
    for a, b in zip(straight.opt.param_groups, resumed.opt.param_groups, strict=True):
        assert {k: v for k, v in a.items() if k != "params"} == {
            k: v for k, v in b.items() if k != "params"
        }
    if case == "nadam":
        assert isinstance(resumed.opt.state[0]["mu_product"], float)


def test_metadata_and_layout(tmp_path):
    run = Run("adam_schedule")
    run.train(3)
    path = run.save(tmp_path / "a.safetensors")
    raw = open(path, "rb").read()
    n, header, data = split(raw)
    assert (8 + n) % 64 == 0 and raw[8 : 8 + n].rstrip(b" ").endswith(b"}")
    meta = header.pop("__metadata__")
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["format"] == "fastopt-checkpoint" and meta["format_version"] == "2.0"
    hashes = json.loads(meta["sha256"])
    assert set(hashes) == set(header)
    assert {"params/w", "params/b", "params/scale", "optimizer/state/0/exp_avg"} <= set(header)
    end = 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        lo, hi = e["data_offsets"]
        assert lo == end and e["dtype"] in ("F32", "I64", "F64"), (name, e)
        assert hashlib.sha256(data[lo:hi]).hexdigest() == hashes[name]
        assert (8 + n + lo) % (8 if e["dtype"] in ("I64", "F64") else 4) == 0  # aligned items
        end = hi
    assert end == len(data)
    assert header["params/w"]["shape"] == [7, 5] and header["params/scale"]["shape"] == []

    meta = {k: json.loads(v) if k in ck.fileformat.JSON_FIELDS else v for k, v in meta.items()}
    ckpt = ck.load(path)
    tensors = ckpt.metadata.pop("tensors")
    assert ckpt.metadata == {**meta, "format_version": [2, 0]}
    assert tensors["params/w"] == {"dtype": "F32", "shape": [7, 5], "sha256": hashes["params/w"]}
    assert ckpt.format_version == ck.FORMAT_VERSION == (2, 0)
    assert ckpt.fastopt_version == fo.__version__
    assert datetime.datetime.fromisoformat(ckpt.created).tzinfo is not None
    assert ckpt.algorithm == "Adam"
    assert ckpt.hyperparameters[0]["betas"] == [0.8, 0.99]
    assert ckpt.hyperparameters[0]["initial_lr"]["type"] == "Warmup"
    assert ckpt.params["scale"].shape == () and ckpt.params["w"].dtype == np.float32
    assert ckpt.params["w"].flags.writeable
    assert ckpt.optimizer_state["param_groups"][0]["betas"] == (0.8, 0.99)
    assert ckpt.rng_state == run.rng.bit_generator.state
    assert ckpt.plateau_state == run.plateau.state_dict()
    assert isinstance(ckpt.ema_state["shadow"]["w"], np.ndarray)
    assert ckpt.extra is None and "Adam" in repr(ckpt)


def test_extra_round_trips_exactly(tmp_path):
    extra = {
        "ints": {0: "zero", 7: (1, 2)},
        "__array__": "a key that looks like a tag",
        "floats": [0.1, float("inf"), -float("inf"), 1e-300],
        "np": (np.float32(1.5), np.int64(-3), np.bool_(True)),
        "arrays": [np.arange(6, dtype=np.int32).reshape(2, 3), np.array(True), np.zeros((0, 4))],
        "schedule": S.join([S.Constant(0.1), S.ExponentialDecay(0.1, 0.9)], [5]),
        "none": None,
        "big": 2**100,
    }
    path = ck.save(tmp_path / "e.ckpt", params={"x": np.ones(2)}, extra=extra)
    got = ck.load(path).extra
    nan = ck.load(ck.save(tmp_path / "n.ckpt", params={}, extra=float("nan"))).extra
    assert np.isnan(nan)
    assert_tree_equal(got, extra)


def test_restore_into_plain_arrays_and_dict_params(tmp_path):
    w = np.arange(6.0).reshape(2, 3)
    path = ck.save(tmp_path / "p.ckpt", params={"w": w})
    target = {"w": np.zeros((2, 3))}
    ck.load(path).restore(params=target)
    assert np.array_equal(target["w"], w)


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def saved(tmp_path, monkeypatch):
    run = Run("adam_schedule")
    run.train(3)
    with monkeypatch.context() as m:  # a fixed header length: this file has header padding
        m.setattr(time, "time", lambda: 1_800_000_000.25)
        path = run.save(tmp_path / "good.safetensors")
    return path, open(path, "rb").read()


@pytest.fixture
def target():
    run = Run("adam_schedule", seed=5, fill=0.5)
    run.train(1)  # has optimizer state, so "unchanged" means something
    return run


def _refused(path, target, match, exc=ck.CheckpointError):
    before = target.snapshot()
    with pytest.raises(exc, match=match) as info:
        target.restore(ck.load(path))
    assert str(path) in str(info.value)
    assert_tree_equal(before, target.snapshot())
    return info.value


@pytest.mark.parametrize("eighths", range(8))
def test_truncated_file_is_refused(tmp_path, saved, target, eighths):
    _, raw = saved
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(raw[: len(raw) * eighths // 8])
    _refused(bad, target, "empty" if eighths == 0 else "truncated")


@pytest.mark.parametrize(
    "where, match",
    [
        ("length", "safetensors header is corrupted"),
        ("header", r"safetensors header is corrupted \(SHA-256 mismatch\)"),
        ("header_hash", r"safetensors header is corrupted \(SHA-256 mismatch\)"),
        ("padding", r"safetensors header is corrupted \(not ASCII JSON"),
        ("tensor", r"tensor 'params/b' is corrupted \(SHA-256 mismatch\)"),
        ("last_byte", "is corrupted"),
    ],
)
def test_flipped_byte_is_refused(tmp_path, saved, target, where, match):
    _, raw = saved
    n, header, _ = split(raw)
    text = raw[8 : 8 + n].decode()
    pos = {
        "length": 0,
        "header": 8 + text.index('"contents"') + 20,
        "header_hash": 8 + text.index(header["__metadata__"]["header_sha256"]) + 7,
        "padding": 8 + n - 1,
        "tensor": 8 + n + header["params/b"]["data_offsets"][0] + 5,
        "last_byte": len(raw) - 1,
    }[where]
    if where == "padding":
        assert raw[pos : pos + 1] == b" ", "no padding after the JSON in this file"
    data = bytearray(raw)
    data[pos] ^= 0x5A
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    _refused(bad, target, match)


def _lie_about_shape(h, m):
    h["params/b"]["shape"] = [6]


def _lie_about_dtype(h, m):
    h["params/w"]["dtype"] = "F16"


def _leave_a_gap(h, m):
    h["params/b"]["data_offsets"] = [o + 4 for o in h["params/b"]["data_offsets"]]


def _grow_the_last(h, m):
    name = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])
    lo, hi = h[name]["data_offsets"]
    item = {"F32": 4, "F64": 8, "I64": 8}[h[name]["dtype"]]
    h[name]["shape"] = [(hi - lo) // item + 1]
    h[name]["data_offsets"] = [lo, hi + item]


def _wrong_sha(h, m):
    m["sha256"] = m["sha256"].replace(json.loads(m["sha256"])["params/b"], "0" * 64)


def _unknown_dtype(h, m):
    h["params/b"]["dtype"] = "F8_E4M3"


def _no_sha(h, m):
    hashes = json.loads(m["sha256"])
    del hashes["params/b"]
    m["sha256"] = json.dumps(hashes)


def _newer_format(h, m):
    m["format_version"] = "3.0"


@pytest.mark.parametrize(
    "edit, match",
    [
        (_lie_about_shape, r"inconsistent: tensor 'params/b' of shape \[6\] and dtype F32 has 24"),
        (_lie_about_dtype, r"inconsistent: tensor 'params/w' .* F16 has 70 bytes.* say 140"),
        (_leave_a_gap, "inconsistent: tensor .* starts at byte .* without gaps or overlaps"),
        (_grow_the_last, "truncated: the file has .* bytes, its header says"),
        (_wrong_sha, r"tensor 'params/b' is corrupted \(SHA-256 mismatch\)"),
        (_unknown_dtype, "tensor 'params/b' has dtype 'F8_E4M3', which no checkpoint uses"),
        (_no_sha, "tensor 'params/b' has no SHA-256 in the metadata"),
        (_newer_format, r"format 3\.0, newer than this fastopt.*upgrade fastopt"),
    ],
    ids=lambda x: getattr(x, "__name__", "")[1:],
)
def test_lying_header_is_refused(tmp_path, saved, target, edit, match):
    """Headers edited on purpose with their SHA-256 recomputed: the structural checks catch
    every lie; without the recomputed hash the header's SHA-256 already does."""
    _, raw = saved
    bad = tmp_path / "lie.safetensors"
    bad.write_bytes(rewrite(raw, edit))
    _refused(bad, target, match)
    bad.write_bytes(rewrite(raw, edit, rehash=False))
    _refused(bad, target, r"header is corrupted \(SHA-256 mismatch\)")


def test_trailing_bytes_are_refused(tmp_path, saved, target):
    bad = tmp_path / "long.safetensors"
    bad.write_bytes(saved[1] + b"\0" * 3)
    _refused(bad, target, "3 unexpected bytes after the end of the checkpoint")


def test_foreign_files_are_refused(tmp_path, target):
    rnd = tmp_path / "random.ckpt"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    npz = tmp_path / "arrays.npz"
    np.savez(npz, w=np.ones(3))
    js = tmp_path / "state.json"
    js.write_text(json.dumps({"format": "fastopt-checkpoint", "params": {}}))
    weights = tmp_path / "weights.safetensors"  # a plain safetensors file, no fastopt metadata
    safetensors.numpy.save_file({"w": np.ones(3, np.float32)}, weights, metadata={"a": "b"})
    bare = tmp_path / "bare.safetensors"
    safetensors.numpy.save_file({"w": np.ones(3, np.float32)}, bare)
    assert "not a fastopt checkpoint" in str(_refused(rnd, target, "not a fastopt checkpoint"))
    _refused(npz, target, "not a fastopt checkpoint.*ZIP")
    _refused(js, target, "not a fastopt checkpoint.*JSON")
    for f in (weights, bare):
        _refused(f, target, "not a fastopt checkpoint: a .safetensors file without fastopt's")
    with pytest.raises(FileNotFoundError):
        ck.load(tmp_path / "missing.ckpt")


def test_checkpoint_of_another_optimizer_is_refused(tmp_path, target):
    ps = fo.ParamSet(_initial(np.float32))
    sgd = fo.SGD(ps, lr=0.1, momentum=0.9)
    sgd.step(np.ones(ps.size, np.float32))
    path = ck.save(tmp_path / "sgd.ckpt", params=ps, optimizer=sgd)
    before = target.snapshot()
    with pytest.raises(
        ck.CheckpointError, match="holds SGD optimizer state, the optimizer is Adam"
    ):
        ck.load(path).restore(params=target.params, optimizer=target.opt)
    assert_tree_equal(before, target.snapshot())


@pytest.mark.parametrize(
    "params, match",
    [
        (
            {"w": np.zeros((7, 5), np.float32), "b": np.zeros(5, np.float32)},
            r"missing from the checkpoint \[\].*not in params \['scale'\]",
        ),
        (
            {**_initial(np.float32), "extra": np.zeros(2, np.float32)},
            r"missing from the checkpoint \['extra'\]",
        ),
        (
            {**_initial(np.float32), "w": np.zeros((5, 7), np.float32)},
            r"'w' has shape \(7, 5\) in the checkpoint, \(5, 7\) here",
        ),
        (_initial(np.float64), "'w' has dtype float32 in the checkpoint, float64 here"),
    ],
)
def test_mismatched_params_are_refused(saved, target, params, match):
    path, _ = saved
    before_opt = target.opt.state_dict()
    copies = {k: v.copy() for k, v in params.items()}
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load(path).restore(params=params, optimizer=target.opt)
    assert_tree_equal(copies, params)
    assert_tree_equal(before_opt, target.opt.state_dict())


def test_wrong_rng_kind_is_refused(saved, target):
    path, _ = saved
    before = target.snapshot()
    mt = np.random.Generator(np.random.MT19937(0))
    mt_state = mt.bit_generator.state
    with pytest.raises(ck.CheckpointError, match="PCG64 RNG state, the generator uses MT19937"):
        ck.load(path).restore(params=target.params, optimizer=target.opt, rng=mt)
    assert_tree_equal(before, target.snapshot())
    assert_tree_equal(mt_state, mt.bit_generator.state)


def test_late_refusal_rolls_back(saved, target):
    class PickyEMA(TinyEMA):
        def load_state_dict(self, sd):
            raise ValueError("this EMA refuses")

    path, _ = saved
    target.ema = PickyEMA(target.named())
    before = target.snapshot()
    with pytest.raises(
        ck.CheckpointError, match="the ema refused the saved state: this EMA refuses"
    ):
        target.restore(ck.load(path))
    assert_tree_equal(before, target.snapshot())


def test_missing_parts_are_refused(tmp_path, target):
    path = ck.save(tmp_path / "p.ckpt", params=target.params)
    with pytest.raises(ck.CheckpointError, match="holds no optimizer state"):
        ck.load(path).restore(optimizer=target.opt)
    with pytest.raises(TypeError, match="at least one"):
        ck.load(path).restore()


def test_loading_never_unpickles(saved, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    ckpt = ck.load(saved[0])
    assert ckpt.algorithm == "Adam"


# --------------------------------------------------------------------------- saving


def _siblings(path):
    return sorted(n for n in os.listdir(os.path.dirname(path)) if n != os.path.basename(path))


def test_lambda_lr_is_a_clear_type_error_and_writes_nothing(tmp_path):
    ps = fo.ParamSet({"w": np.ones(3)})
    opt = fo.SGD(ps, lr=lambda k: 0.1 / (1 + k))
    path = tmp_path / "lambda.ckpt"
    with pytest.raises(TypeError, match=r"optimizer/param_groups/0/lr.*lambda.*fastopt\.schedules"):
        ck.save(path, params=ps, optimizer=opt)
    assert os.listdir(tmp_path) == []
    # an existing checkpoint stays as it was
    ck.save(path, params=ps)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        ck.save(path, params=ps, optimizer=opt)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["lambda.ckpt"]
    nested = fo.SGD(ps, lr=S.warmup(lambda k: 0.1, 3, lr=0.1))
    with pytest.raises(TypeError, match="cannot save optimizer/param_groups/0/lr"):
        ck.save(path, params=ps, optimizer=nested)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, failing):
    path = tmp_path / "c.ckpt"
    ck.save(path, params={"w": np.zeros(1000)}, extra={"n": 1})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        ck.save(path, params={"w": np.ones(1000)}, extra={"n": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before and _siblings(path) == []
    assert ck.load(path).extra == {"n": 1}


def test_array_changing_during_save_replaces_nothing(tmp_path, monkeypatch):
    path = tmp_path / "c.ckpt"
    w = np.zeros(100)
    ck.save(path, params={"w": w})
    before = path.read_bytes()
    dumps = json.dumps

    def dumps_then_step(*a, **k):  # runs after the arrays were hashed, before they are written
        w[3] = 1.0
        return dumps(*a, **k)

    monkeypatch.setattr(json, "dumps", dumps_then_step)
    with pytest.raises(RuntimeError, match="'params/w' changed while .* was being saved"):
        ck.save(path, params={"w": w})
    monkeypatch.undo()
    assert path.read_bytes() == before and _siblings(path) == []


CHILD = r"""
import os
import sys
import numpy as np
from fastopt import checkpoint as ck
path, mode = sys.argv[1], sys.argv[2]
if mode == "named":  # a filesystem without O_TMPFILE: the temporary file has a name throughout
    del os.O_TMPFILE
big = np.zeros(4_000_000)  # 32 MB: a save takes a while
ck.save(path, params={"big": big}, extra={"i": 0})
print("ready", flush=True)
i = 0
while True:
    i += 1
    big[0] = big[-1] = i
    ck.save(path, params={"big": big}, extra={"i": i})
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("mode", ["unnamed", "named"])
def test_sigkill_during_save_leaves_a_valid_checkpoint_and_no_temporary_file(tmp_path, mode):
    """Kill a process that saves in a loop at random moments, several times: the file at the
    path always loads (the old or a new complete checkpoint), and after the next successful save
    no temporary file is left in the directory, however many kills left one."""
    if mode == "unnamed" and not hasattr(os, "O_TMPFILE"):
        pytest.skip("no O_TMPFILE on this platform")
    path = str(tmp_path / "killed.ckpt")
    (tmp_path / "unrelated.tmp").write_bytes(b"not ours")
    rng = np.random.default_rng()
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, path, mode], stdout=subprocess.PIPE)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready and proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.1, 0.8))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        ckpt = ck.load(path)  # the old or a new complete checkpoint, verified
        i = ckpt.extra["i"]
        big = ckpt.params["big"]
        assert big[0] == big[-1] == i and not big[1:-1].any()
        for name in _siblings(path):  # what a kill may leave: only our own temporary files
            if name != "unrelated.tmp":
                assert name.startswith(".killed.ckpt.") and name.endswith(ck.TEMP_SUFFIX)
    ck.save(path, params={"big": np.ones(3)}, extra={"i": -1})
    assert _siblings(path) == ["unrelated.tmp"]
    assert ck.load(path).extra == {"i": -1}


# --------------------------------------------------------------------------- devices


def test_cuda_without_cupy_is_a_clear_error(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(RuntimeError, match="needs CuPy, which is not installed"):
        ck.load(saved[0], device="cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        ck.load(saved[0], device="tpu")
