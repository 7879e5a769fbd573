"""The helpers that decide between skipping and failing when a test dependency is missing
(tests/oracle.py: import_or_skip; tests/cuda_toolchain.py: nvcc_or_skip, wheel_nvcc)."""

import sys

import cuda_toolchain
import pytest
from oracle import import_or_skip


@pytest.mark.parametrize(
    "module,flag",
    [
        ("sklearn", "FASTOPT_REQUIRE_EXTRAS"),
        ("matplotlib", "FASTOPT_REQUIRE_EXTRAS"),
        ("tqdm", "FASTOPT_REQUIRE_EXTRAS"),
        ("torch", "FASTOPT_REQUIRE_ORACLE"),
    ],
)
def test_import_or_skip_fails_when_required(monkeypatch, module, flag):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import raise ImportError
    monkeypatch.delenv(flag, raising=False)
    with pytest.raises(pytest.skip.Exception):
        import_or_skip(module)
    monkeypatch.setenv(flag, "1")
    with pytest.raises(pytest.fail.Exception, match=flag):
        import_or_skip(module)


def test_import_or_skip_knows_every_flagged_module():
    with pytest.raises(ValueError, match="no FASTOPT_REQUIRE"):
        import_or_skip("json")


def test_nvcc_or_skip_fails_when_required(monkeypatch):
    monkeypatch.setattr(cuda_toolchain, "find_nvcc", lambda: None)
    monkeypatch.delenv("FASTOPT_REQUIRE_NVCC", raising=False)
    with pytest.raises(pytest.skip.Exception):
        cuda_toolchain.nvcc_or_skip()
    monkeypatch.setenv("FASTOPT_REQUIRE_NVCC", "1")
    with pytest.raises(pytest.fail.Exception, match="FASTOPT_REQUIRE_NVCC"):
        cuda_toolchain.nvcc_or_skip()


def test_nvcc_found_in_the_wheel_layout(monkeypatch, tmp_path):
    """With nothing on PATH and no CUDA_HOME, find_nvcc() takes site-packages/nvidia/cu13/bin/nvcc
    (the nvidia-cuda-nvcc wheel) before /usr/local/cuda."""
    for sub in ("cu12", "cu13"):
        nvcc = tmp_path / "nvidia" / sub / "bin" / "nvcc"
        nvcc.parent.mkdir(parents=True)
        nvcc.write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.setattr(cuda_toolchain.site, "getsitepackages", lambda: [], raising=False)
    monkeypatch.setattr(cuda_toolchain.site, "ENABLE_USER_SITE", False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert cuda_toolchain.find_nvcc() == str(tmp_path / "nvidia" / "cu13" / "bin" / "nvcc")
