"""``import fastopt`` loads the optimizer core only; the rest loads on first use of its names."""

import subprocess
import sys

HEAVY = (
    "fastopt.nn",
    "fastopt.trainer",
    "fastopt.sklearn",
    "fastopt.cli",
    "fastopt.checkpoint",
    "fastopt.schedules",
    "matplotlib",
    "sklearn",
)


def _run(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_import_fastopt_loads_the_core_only():
    code = (
        "import sys, numpy as np, fastopt as fo\n"
        "w = np.ones(3, np.float32)\n"
        "fo.Adam([w], lr=0.1).step([w.copy()])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert _run(code).strip() == "[]"


def test_lazy_names_resolve_to_their_modules():
    code = (
        "import fastopt as fo\n"
        "import fastopt.checkpoint as ck, fastopt.nn as nn, fastopt.schedules as sc\n"
        "import fastopt.trainer as tr\n"
        "assert fo.MLP is nn.MLP and fo.nn is nn and fo.trainer is tr and fo.schedules is sc\n"
        "assert fo.Trainer is tr.Trainer and fo.History is tr.History\n"
        "assert fo.ReduceLROnPlateau is sc.ReduceLROnPlateau\n"
        "assert fo.save is ck.save and fo.load is ck.load and fo.CheckpointError is ck.CheckpointError\n"
        "assert set(fo.__all__) <= set(dir(fo))\n"
        "from fastopt import *  # every public name resolves\n"
        "try:\n"
        "    fo.not_a_name\n"
        "except AttributeError as e:\n"
        "    assert 'not_a_name' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "print('ok')\n"
    )
    assert _run(code).strip() == "ok"
