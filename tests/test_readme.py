"""The README's quickstart runs as written, and .ci/run runs the README's commands."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_examples_run(capsys):
    examples = [b for b in _blocks("python") if "import fastopt" in b]
    assert len(examples) >= 2
    for i, code in enumerate(examples):
        exec(compile(code, f"README example {i}", "exec"), {})
    assert "SGD" in capsys.readouterr().out


def test_ci_runs_the_readme_install_and_test_commands():
    bash = _blocks("bash")
    install = next(b.strip() for b in bash if b.strip().startswith("pip install"))
    test = next(b.strip() for b in bash if b.strip().startswith("pytest"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci


def test_distributed_example_is_the_script_the_mpi_tests_run():
    script = (ROOT / "tests" / "mpi_scripts" / "readme_example.py").read_text()
    block = next(b for b in _blocks("text") if "train_dp.py" in b)
    assert block.strip() == script.replace("   (the README's distributed example)", "").strip()


def test_every_simulator_test_file_is_in_the_readme_test_command():
    """A test file that runs only under NUMBA_ENABLE_CUDASIM=1 skips in the plain run, so the
    README's (and CI's) simulator run must name it, or it never runs at all."""
    test = next(b.strip() for b in _blocks("bash") if b.strip().startswith("pytest"))
    simulated = test.split("NUMBA_ENABLE_CUDASIM=1 pytest", 1)[1].split()
    markers = ('os.environ.get("NUMBA_ENABLE_CUDASIM") != "1"', "@sim_only")
    only_sim = [
        f"tests/{p.name}"
        for p in sorted((ROOT / "tests").glob("test_*.py"))
        if p.name != "test_readme.py" and any(m in p.read_text() for m in markers)
    ]
    assert "tests/test_cuda_sim.py" in only_sim
    assert [f for f in only_sim if f not in simulated] == []
