"""fastopt.fileio: the one atomic writer (checkpoints, history files, ``fastopt predict --out``).

Symlinks keep being links (their target is replaced), FIFOs and character devices are written in
place, ``-`` is standard output, a directory that cannot hold the file is refused naming the
path and leaves the old file alone, and no temporary file outlives a write.
"""

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo
from fastopt import fileio
from fastopt.trainer import History

posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file types")


def _temps(directory):
    return [n for n in os.listdir(directory) if n.endswith(fileio.TEMP_SUFFIX)]


def test_regular_file_is_replaced_keeping_its_mode(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    fileio.write_text(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    fileio.write_bytes(tmp_path / "fresh.bin", b"\x00\x01")
    assert (tmp_path / "fresh.bin").read_bytes() == b"\x00\x01"
    assert _temps(tmp_path) == []


def test_an_exception_inside_the_block_changes_nothing(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with fileio.atomic_write(path, text=True) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out.txt"]


@posix
def test_symlink_target_is_replaced_and_the_link_stays(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "data.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(os.path.join("real", "data.txt"))  # relative, as users make them
    fileio.write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == os.path.join("real", "data.txt")
    assert target.read_text() == "new"
    assert _temps(tmp_path) == [] and _temps(tmp_path / "real") == []


@posix
def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.ckpt"
    link.symlink_to(tmp_path / "made.ckpt")
    fo.save(link, params={"w": np.arange(3.0)})
    assert link.is_symlink() and (tmp_path / "made.ckpt").is_file()
    np.testing.assert_array_equal(fo.load(link).params["w"], np.arange(3.0))


@posix
def test_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    fileio.write_text(fifo, "through the pipe\n")
    reader.join(timeout=30)
    assert got == [b"through the pipe\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still a FIFO, nothing renamed over it
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


@posix
def test_dev_null_stays_a_character_device():
    before = os.stat(os.devnull)
    assert stat.S_ISCHR(before.st_mode)
    History({"loss": [1.0]}).to_json(os.devnull)
    fileio.write_bytes(os.devnull, b"x" * 100)
    after = os.stat(os.devnull)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: d / "missing" / "out.txt", r"missing does not exist"),
        (lambda d: (d / "afile").write_text("x") and d / "afile" / "out.txt", "Not a directory"),
        (lambda d: d, "it is a directory"),
    ],
    ids=["missing-dir", "parent-is-a-file", "a-directory"],
)
def test_unwritable_paths_are_refused_naming_them(tmp_path, make, match):
    path = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(fileio.OutputError, match=match) as info:
        fileio.check_output(path)
    assert str(path) in str(info.value)
    with pytest.raises(OSError, match=match):
        fileio.write_text(path, "x")
    assert sorted(os.listdir(tmp_path)) == before


@contextlib.contextmanager
def _as_an_unprivileged_user(tmp_path):
    """A directory to work in, and the rights of a user whom file modes bind: as such a user,
    ``tmp_path``; as root (which ignores modes, as in CI containers), a fresh directory anyone
    may enter, with the effective user id set to nobody's (65534) until the block ends."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(prefix="fastopt-ro-"))
    os.chmod(base, 0o755)  # tmp_path's parents are root's alone (0700)
    try:
        yield base
    finally:
        os.seteuid(0)
        shutil.rmtree(base)


@posix
def test_read_only_directory_is_refused_and_the_old_file_kept(tmp_path):
    with _as_an_unprivileged_user(tmp_path) as base:
        d = base / "ro"
        d.mkdir()
        (d / "out.txt").write_text("old")
        os.chmod(d, 0o555)
        if os.geteuid() == 0:
            os.seteuid(65534)
        try:
            assert not os.access(d, os.W_OK, effective_ids=os.access in os.supports_effective_ids)
            with pytest.raises(fileio.OutputError, match="not writable"):
                fileio.write_text(d / "out.txt", "new")
        finally:
            if hasattr(os, "seteuid") and os.getuid() == 0:
                os.seteuid(0)
            os.chmod(d, 0o755)
        assert (d / "out.txt").read_text() == "old"
        assert sorted(os.listdir(d)) == ["out.txt"]


def test_dash_is_standard_output_only_when_allowed(capsys):
    with fileio.atomic_write("-", text=True, allow_stdout=True) as f:
        f.write("to stdout\n")
    assert capsys.readouterr().out == "to stdout\n"
    with pytest.raises(fileio.OutputError, match="standard output"):
        fileio.write_text("-", "x")


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_write_removes_what_killed_writes_left_and_nothing_else(tmp_path):
    path = tmp_path / "run.ckpt"
    dead = _dead_pid()
    leftovers = [f".run.ckpt.{dead}.0123abcd.tmp", ".run.ckpt.k3j_9x2a.tmp"]  # new, old style
    keep = [
        f".run.ckpt.{os.getpid()}.89abcdef.tmp",  # a write of this process still in flight
        ".other.ckpt.k3j_9x2a.tmp",  # another file's
        ".run.ckpt.notes",
        "run.ckpt.tmp",
    ]
    for name in leftovers + keep:
        (tmp_path / name).write_bytes(b"partial")
    fo.save(path, params={"w": np.ones(2)})
    assert sorted(os.listdir(tmp_path)) == sorted(["run.ckpt", *keep])


def test_named_temporary_file_where_there_is_no_o_tmpfile(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    opened = []
    real_open = os.open

    def spy(path, flags, *a, **k):
        opened.append(str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    fileio.write_text(tmp_path / "a.txt", "named")
    monkeypatch.undo()
    assert (tmp_path / "a.txt").read_text() == "named"
    assert any(n.startswith(".a.txt.") and n.endswith(fileio.TEMP_SUFFIX) for n in opened)
    assert _temps(tmp_path) == []


def test_history_and_checkpoint_write_through_symlinks(tmp_path):
    """Everything that writes files uses the writer: history.json and the checkpoint too."""
    (tmp_path / "store").mkdir()
    for name in ("h.json", "m.ckpt"):
        (tmp_path / name).symlink_to(tmp_path / "store" / name)
    History({"loss": [0.5]}).to_json(tmp_path / "h.json")
    fo.save(tmp_path / "m.ckpt", params={"w": np.zeros(2)})
    assert (tmp_path / "h.json").is_symlink() and (tmp_path / "m.ckpt").is_symlink()
    assert History.from_json(tmp_path / "store" / "h.json")["loss"] == [0.5]
    assert fo.load(tmp_path / "store" / "m.ckpt").params["w"].shape == (2,)


def test_reports_charts_and_figures_are_replaced_atomically(tmp_path):
    """The benchmark report (JSON, Markdown, chart) and the playground/curves figures go through
    the writer too: an existing output reached through a symlink keeps the link and its target is
    REPLACED (a new inode, renamed into place), not truncated and rewritten in place, so a
    reader never sees half a file."""
    import_or_skip("matplotlib")
    from fastopt import benchmarking
    from fastopt.playground import pyplot, save_figure

    (tmp_path / "store").mkdir()
    names = ("r.json", "r.md", "r.png", "fig.png")
    inodes = {}
    for name in names:
        (tmp_path / "store" / name).write_bytes(b"old")
        inodes[name] = (tmp_path / "store" / name).stat().st_ino
        (tmp_path / name).symlink_to(tmp_path / "store" / name)
    results = sorted(Path(__file__).parents[1].glob("bench/results/*.json"))[0]
    out = benchmarking.write_outputs(benchmarking.load_results(results), tmp_path / "r")
    save_figure(pyplot().figure(), tmp_path / "fig.png", "t")
    written = ["r.json", "r.md", "fig.png"] + (["r.png"] if "png" in out else [])
    for name in written:
        target = tmp_path / "store" / name
        assert (tmp_path / name).is_symlink(), name
        assert target.stat().st_ino != inodes[name], f"{name} was rewritten in place"
        assert target.read_bytes() != b"old", name
