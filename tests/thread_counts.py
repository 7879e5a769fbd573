"""``child_digests()`` of a test module run with a given number of Numba threads, for the checks
that a parallel kernel gives the same bits whatever the thread count.

In the test process when Numba may run that many threads (``numba.set_num_threads``: the kernels
compiled there serve every count), else in a child process started with ``NUMBA_NUM_THREADS``.
"""

import json
import os
import pathlib
import subprocess
import sys

import numba

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent


def digests(module, threads, *, child_only=False, args=()):
    """``module.child_digests(*args)`` (a JSON-able dict) computed with ``threads`` Numba threads;
    ``child_only``: always in a child process (for a check of ``NUMBA_NUM_THREADS`` itself)."""
    if not child_only and threads <= numba.config.NUMBA_NUM_THREADS:
        before = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            return sys.modules[module].child_digests(*args)
        finally:
            numba.set_num_threads(before)
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = (
        "import importlib, json, sys; sys.path.insert(0, sys.argv[1]); "
        "m = importlib.import_module(sys.argv[2]); "
        "print(json.dumps(m.child_digests(*json.loads(sys.argv[3]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(TESTS), module, json.dumps(list(args))],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
