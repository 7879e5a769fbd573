"""Checkpoint audit fixes: a ParamSet of another layout is refused before anything changes,
lying or hostile files raise CheckpointError (never RecursionError, OverflowError or a plain
ValueError), and a path naming a directory is refused before anything is written."""

import copy
import hashlib
import json
import pathlib
import struct
import zlib

import numpy as np
import pytest

import fastopt as fo
from fastopt import checkpoint as ck
from fastopt.checkpoint import legacy
from fastopt.checkpoint.fileformat import canonical_hash
from fastopt.fileio import OutputError, atomic_write, check_output

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def split(raw):
    """(header dict, data bytes) of a .safetensors file's bytes."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def forge(path, edit):
    """Rewrite the checkpoint at ``path`` with ``edit(header, metadata)`` applied and the header's
    SHA-256 recomputed: a self-consistent file that lies."""
    header, data = split(pathlib.Path(path).read_bytes())
    edit(header, header["__metadata__"])
    header["__metadata__"]["header_sha256"] = canonical_hash(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 64)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_contents(fn):
    def edit(header, meta):
        contents = json.loads(meta["contents"])
        fn(contents)
        meta["contents"] = json.dumps(contents)

    return edit


# --------------------------------------------------------------------------- ParamSet layout


def _trained(order=("w", "b")):
    values = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": -np.ones(4, np.float32)}
    ps = fo.ParamSet({k: values[k] for k in order})
    opt = fo.Adam(ps, lr=1e-2)
    ps.grads["w"][...] = 1.0
    ps.grads["b"][...] = -1.0
    opt.step()
    ema = fo.EMA(ps, decay=0.5)
    ema.update()
    return ps, opt, ema


def _fresh(spec):
    ps = fo.ParamSet({k: np.zeros(shape, np.float32) for k, shape in spec})
    return ps, fo.Adam(ps, lr=1e-2), fo.EMA(ps, decay=0.5)


def _snapshot(ps, opt, ema):
    return ps.flat.copy(), opt.state_dict(), ema.state_dict()


def _assert_unchanged(before, ps, opt, ema):
    flat, sd, esd = before
    assert ps.flat.tobytes() == flat.tobytes()
    assert opt.state_dict()["state"] == sd["state"] == {}
    assert ema.num_updates == esd["num_updates"]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ema.averages, esd["averages"]))


REORDERED = [("b", (4,)), ("w", (3, 4))]


@pytest.mark.parametrize(
    "what", [("params", "optimizer"), ("optimizer",), ("params", "ema"), ("ema",)]
)
def test_restore_into_a_reordered_paramset_is_refused_before_anything_changes(tmp_path, what):
    """Same names, shapes and dtypes in another order: the parameters would be copied by name
    but the flat optimizer state and EMA averages by position (b getting w's moments)."""
    ps, opt, ema = _trained()
    path = ck.save(tmp_path / "run.ckpt", params=ps, optimizer=opt, ema=ema)
    ps2, opt2, ema2 = _fresh(REORDERED)
    before = _snapshot(ps2, opt2, ema2)
    objects = {"params": ps2, "optimizer": opt2, "ema": ema2}
    with pytest.raises(ck.CheckpointError, match="packed in another order") as info:
        ck.load(path).restore(**{k: objects[k] for k in what})
    message = str(info.value)
    assert "'w' (3, 4) at [0:12], 'b' (4,) at [12:16]" in message  # saved
    assert "'b' (4,) at [0:4], 'w' (3, 4) at [4:16]" in message  # here
    _assert_unchanged(before, ps2, opt2, ema2)


@pytest.mark.parametrize(
    "spec, match",
    [
        ([("v", (16,))], r"names differ \(only saved: \['b', 'w'\], only here: \['v'\]\)"),
        ([("w", (4, 3)), ("b", (4,))], r"'w' has shape \(3, 4\) saved, \(4, 3\) here"),
    ],
    ids=["other-names", "other-shape"],
)
def test_optimizer_alone_into_a_paramset_of_the_same_size_is_refused(tmp_path, spec, match):
    ps, opt, ema = _trained()
    path = ck.save(tmp_path / "run.ckpt", params=ps, optimizer=opt, ema=ema)
    ps2, opt2, ema2 = _fresh(spec)
    before = _snapshot(ps2, opt2, ema2)
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load(path).restore(optimizer=opt2)
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load(path).restore(ema=ema2)
    _assert_unchanged(before, ps2, opt2, ema2)


def test_same_layout_still_restores_and_resumes_exactly(tmp_path):
    ps, opt, ema = _trained()
    path = ck.save(tmp_path / "run.ckpt", params=ps, optimizer=opt, ema=ema)
    assert ck.load(path).optimizer_layout == [[["w", [3, 4]], ["b", [4]]]]
    ps2, opt2, ema2 = _fresh([("w", (3, 4)), ("b", (4,))])
    ck.load(path).restore(params=ps2, optimizer=opt2, ema=ema2)
    for s, o in ((ps, opt), (ps2, opt2)):
        s.grads["w"][...] = 0.5
        s.grads["b"][...] = 0.25
        o.step()
    assert ps2.flat.tobytes() == ps.flat.tobytes()
    assert ema2.averages[0].tobytes() == ema.averages[0].tobytes()


def test_a_file_without_the_recorded_layout_is_checked_against_its_saved_params(tmp_path):
    """Files written before the layout was recorded: the saved parameters' order and shapes
    stand for the ParamSet the state was taken over."""
    ps, opt, ema = _trained()
    path = ck.save(tmp_path / "run.ckpt", params=ps, optimizer=opt, ema=ema)

    def drop(contents):
        del contents["optimizer_layout"]
        del contents["ema"]["paramset"]

    forge(path, edit_contents(drop))
    ckpt = ck.load(path)
    assert ckpt.optimizer_layout is None and "paramset" not in ckpt.ema_state
    ps2, opt2, ema2 = _fresh(REORDERED)
    for kw in ({"optimizer": opt2}, {"ema": ema2}):
        with pytest.raises(ck.CheckpointError, match="packed in another order"):
            ckpt.restore(**kw)
    ps3, opt3, ema3 = _fresh([("w", (3, 4)), ("b", (4,))])
    ckpt.restore(params=ps3, optimizer=opt3, ema=ema3)
    assert ps3.flat.tobytes() == ps.flat.tobytes()


def test_a_malformed_recorded_layout_is_a_checkpoint_error(tmp_path):
    ps, opt, ema = _trained()
    path = ck.save(tmp_path / "run.ckpt", params=ps, optimizer=opt)
    forge(path, edit_contents(lambda c: c.__setitem__("optimizer_layout", [[["w", "x"]]])))
    with pytest.raises(ck.CheckpointError, match="ParamSet layout is invalid"):
        ck.load(path).restore(optimizer=_fresh([("w", (3, 4)), ("b", (4,))])[1])


def test_plain_arrays_keep_checking_only_sizes(tmp_path):
    """Over plain arrays nothing records a layout: a flat array of the same size still loads."""
    w = np.ones(16, np.float32)
    opt = fo.Adam([w], lr=1e-2)
    opt.step([np.ones(16, np.float32)])
    path = ck.save(tmp_path / "run.ckpt", params={"w": w}, optimizer=opt, ema=fo.EMA([w]))
    assert ck.load(path).optimizer_layout is None
    ps2, opt2, ema2 = _fresh(REORDERED)
    ck.load(path).restore(optimizer=opt2, ema=ema2)
    assert opt2.state_dict()["state"][0]["step"] == 1


def test_ema_load_state_dict_refuses_another_paramset_layout():
    _, _, ema = _trained()
    sd = ema.state_dict()
    assert sd["paramset"] == [["w", [3, 4]], ["b", [4]]]
    _, _, ema2 = _fresh(REORDERED)
    with pytest.raises(ValueError, match="EMA state is of another ParamSet: the parameters are"):
        ema2.load_state_dict(sd)
    assert ema2.num_updates == 0 and not ema2.averages[0].any()
    _, _, ema3 = _fresh([("w", (3, 4)), ("b", (4,))])
    ema3.load_state_dict(sd)
    assert ema3.averages[0].tobytes() == ema.averages[0].tobytes()
    assert "paramset" not in fo.EMA([np.ones(3)]).state_dict()  # plain arrays: as before


# --------------------------------------------------------------------------- hostile files


@pytest.fixture
def good(tmp_path):
    return ck.save(tmp_path / "good.ckpt", params={"w": np.ones(3, np.float32)}, extra={"ep": 3})


def test_a_deeply_nested_header_is_a_checkpoint_error(tmp_path):
    text = b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(ck.CheckpointError, match="nested too deeply"):
        ck.load(path)


@pytest.mark.parametrize("depth", [900, 5_000, 100_000])
def test_deeply_nested_contents_are_a_checkpoint_error(good, depth):
    deep = "[" * depth + "]" * depth

    def edit(header, meta):
        meta["contents"] = meta["contents"].replace('"ep":3', '"ep":' + deep)

    forge(good, edit)
    with pytest.raises(ck.CheckpointError, match="nested too deeply"):
        ck.load(good)


@pytest.mark.parametrize(
    "scalar, match",
    [
        ({"__npscalar__": "|i1", "value": 1000}, "scalar 1000 does not fit dtype int8"),
        ({"__npscalar__": "|u1", "value": -1}, "scalar -1 does not fit dtype uint8"),
        ({"__npscalar__": "<i8", "value": 2**70}, "does not fit dtype int64"),
        ({"__npscalar__": "<i8", "value": {"__float__": "nan"}}, "scalar nan does not fit"),
        ({"__npscalar__": "<f8", "value": [1, 2]}, "holds a list, not a number"),
    ],
)
def test_a_scalar_that_does_not_fit_its_dtype_is_a_checkpoint_error(good, scalar, match):
    forge(good, edit_contents(lambda c: c["extra"].__setitem__("ep", scalar)))
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load(good)


@pytest.mark.parametrize("version", ["2.\u00b2", "\u0662.0", "2." + "0" * 5000, "+2.0", " 2.0"])
def test_a_format_version_of_other_digits_is_a_checkpoint_error(good, version):
    forge(good, lambda header, meta: meta.__setitem__("format_version", version))
    with pytest.raises(ck.CheckpointError, match="invalid metadata: format_version"):
        ck.load(good)


@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**63 - 1], [0] * 65])
def test_an_empty_tensor_numpy_cannot_shape_is_a_checkpoint_error(good, shape):
    def edit(header, meta):
        end = header["params/w"]["data_offsets"][1]
        header["params/z"] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end]}
        sha = json.loads(meta["sha256"])
        sha["params/z"] = hashlib.sha256(b"").hexdigest()
        meta["sha256"] = json.dumps(sha)

    forge(good, edit)
    with pytest.raises(ck.CheckpointError, match="'params/z' has shape .* which NumPy cannot hold"):
        ck.load(good)


def _legacy_rewrite(path, edit=None, text=None):
    """The format-1 fixture with its JSON metadata edited (or replaced by ``text``) and every
    CRC and the trailer's SHA-256 recomputed."""
    raw = (FIXTURES / "legacy_v1.ckpt").read_bytes()
    major, minor, json_len, total, _, _ = legacy.HEADER.unpack(
        raw[len(legacy.MAGIC) : legacy.PREFIX_LEN]
    )
    start = legacy._align(legacy.PREFIX_LEN + json_len)
    data = raw[start : total - legacy.TRAILER_LEN]
    if text is None:
        meta = json.loads(raw[legacy.PREFIX_LEN : legacy.PREFIX_LEN + json_len])
        edit(meta)
        text = json.dumps(meta).encode()
    start = legacy._align(legacy.PREFIX_LEN + len(text))
    total = start + len(data) + legacy.TRAILER_LEN
    head = legacy.MAGIC + struct.pack("<HHQQI", major, minor, len(text), total, zlib.crc32(text))
    head += struct.pack("<I", zlib.crc32(head))
    body = head + text + b"\0" * (start - legacy.PREFIX_LEN - len(text)) + data
    path.write_bytes(body + legacy.TRAILER_TAG + hashlib.sha256(body).digest())
    return path


def test_format_1_rewriter_round_trips(tmp_path):
    path = _legacy_rewrite(tmp_path / "same.ckpt", edit=lambda meta: None)
    assert ck.load(path).format_version == (1, 0)


def test_format_1_deeply_nested_metadata_is_a_checkpoint_error(tmp_path):
    text = b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = _legacy_rewrite(tmp_path / "deep.ckpt", text=text)
    with pytest.raises(ck.CheckpointError, match="nested too deeply"):
        ck.load(path)


def test_format_1_empty_array_numpy_cannot_shape_is_a_checkpoint_error(tmp_path):
    def edit(meta):
        entry = copy.deepcopy(meta["arrays"][0])
        entry.update(name="z", shape=[0, 2**70], nbytes=0, offset=0)
        entry["sha256"] = hashlib.sha256(b"").hexdigest()
        entry["dtype"] = "<f4"
        meta["arrays"].append(entry)

    path = _legacy_rewrite(tmp_path / "shape.ckpt", edit)
    with pytest.raises(ck.CheckpointError, match="'z' has shape .* which NumPy cannot hold"):
        ck.load(path)


# --------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("tail", ["ckpts/", "ckpts/.", "ckpts/..", "."])
def test_a_path_naming_a_directory_is_refused_before_anything_is_written(tmp_path, tail):
    path = str(tmp_path / "x")[: -len("x")] + tail
    first = "it is a directory" if tail == "." else f"a path ending in '{tail[-1]}' names a dir"
    if tail.endswith(".."):
        first = "a path ending in '..' names a directory"
    with pytest.raises(OutputError, match=first):
        check_output(path)
    with pytest.raises(OutputError, match="names a directory|it is a directory"):
        ck.save(path, params={"w": np.ones(3, np.float32)})
    with (
        pytest.raises(OutputError, match="names a directory|it is a directory"),
        atomic_write(path) as f,
    ):
        f.write(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_trailing_slash_is_refused_with_bytes_paths_too(tmp_path):
    path = bytes(tmp_path / "ckpts") + b"/"
    with pytest.raises(OutputError, match="a path ending in '/' names a directory"):
        check_output(path)
    assert list(tmp_path.iterdir()) == []
