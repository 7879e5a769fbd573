"""Helpers shared by the command-line tests: run ``python -m fastopt.cli`` in a subprocess, read a
PNG's size, check a run succeeded."""

import os
import struct
import subprocess
import sys
from pathlib import Path


def cli(*args, env=None, cwd=None, timeout=300):
    """``python -m fastopt.cli ARGS`` (what the ``fastopt`` script calls), output captured;
    ``env`` adds to this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "fastopt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100", **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; asserts the file is a whole PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82"), f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


def assert_ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
