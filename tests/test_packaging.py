"""The wheel installs the kernels as fastopt.kernels (with the CUDA sources) and no top-level kernels."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("fastopt-*.whl")
    return path


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("kernels/")], (
        "a top-level kernels package would clash"
    )
    for required in (
        "fastopt/__init__.py",
        "fastopt/kernels/rules.py",
        "fastopt/kernels/cpu.py",
        "fastopt/kernels/cuda.py",
        "fastopt/optim/adam.py",
    ):
        assert required in names
    sources = [n for n in names if n.startswith("fastopt/kernels/") and n.endswith((".cu", ".cuh"))]
    assert len(sources) >= 2, "the CUDA C sources must ship as package data"


def test_import_fastopt_does_not_import_gpu_libraries():
    code = "import sys, fastopt; fastopt.Adam; assert 'cupy' not in sys.modules and 'numba.cuda' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
