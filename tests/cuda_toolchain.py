"""The CUDA compiler for the tests that build the CUDA C rules without a GPU.

``find_nvcc()`` looks on PATH, under ``CUDA_HOME``/``CUDA_PATH``, in the NVIDIA compiler wheel the
``test`` extra installs (``nvidia-cuda-nvcc``: ``site-packages/nvidia/cu13/bin/nvcc``, with the
headers, cicc and libNVVM of its dependency wheels laid out beside it as in a toolkit), then in
/usr/local/cuda. ``nvcc_or_skip()`` skips a test without it, or fails it when
``FASTOPT_REQUIRE_NVCC=1`` (CI sets it: the wheel comes from PyPI, so CI always has a compiler).
"""

import os
import pathlib
import shutil
import site
import sys

import pytest

REQUIRE_ENV = "FASTOPT_REQUIRE_NVCC"


def _site_dirs():
    dirs = [*sys.path]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # some virtualenv builds lack it
        pass
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    seen = []
    for d in dirs:
        if d and d not in seen and (pathlib.Path(d) / "nvidia").is_dir():
            seen.append(d)
    return seen


def wheel_nvcc():
    """``nvidia/<subdir>/bin/nvcc`` of an installed NVIDIA compiler wheel, newest CUDA first, or
    None."""
    found = []
    for d in _site_dirs():
        found += [p for p in (pathlib.Path(d) / "nvidia").glob("*/bin/nvcc") if p.is_file()]
    found.sort(key=lambda p: p.parent.parent.name, reverse=True)  # cu13 before cu12, cuda_nvcc
    return str(found[0]) if found else None


def find_nvcc():
    """Path of an nvcc binary, or None (PATH, CUDA_HOME/CUDA_PATH, the wheel, /usr/local/cuda)."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and (pathlib.Path(root) / "bin" / "nvcc").is_file():
            return str(pathlib.Path(root) / "bin" / "nvcc")
    found = wheel_nvcc()
    if found:
        return found
    default = pathlib.Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_required():
    """Whether the run demands a CUDA compiler (``FASTOPT_REQUIRE_NVCC=1``)."""
    return os.environ.get(REQUIRE_ENV, "").strip() == "1"


def nvcc_or_skip():
    """The nvcc path; a skip without one, a failure when ``FASTOPT_REQUIRE_NVCC=1``."""
    path = find_nvcc()
    if path is None:
        reason = (
            "nvcc not found (PATH, CUDA_HOME, CUDA_PATH, the nvidia-cuda-nvcc wheel, "
            "/usr/local/cuda); pip install nvidia-cuda-nvcc"
        )
        if nvcc_required():
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
    return path
