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
