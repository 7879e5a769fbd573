"""Finding and calling ``mpiexec`` for the tests and benchmarks (MPICH or Open MPI, as root too).

``launcher()`` returns ``((mpiexec, extra_args), None)`` or ``(None, reason)``; ``argv(n, ...)``
builds the command line and ``env()`` its environment. Open MPI gets ``--oversubscribe`` (more
ranks than cores) and, as root, ``--allow-run-as-root``; MPICH's hydra needs neither.
"""

import functools
import importlib.util
import os
import shutil
import subprocess
import sys

TIMEOUT = float(os.environ.get("FASTOPT_MPI_TIMEOUT", "300"))


def mpiexec_path():
    here = os.path.dirname(sys.executable)  # a virtualenv's bin/ (the mpich wheel puts it there)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name, path=here) or shutil.which(name)
        if found:
            return found
    return None


def env():
    e = dict(os.environ)
    # several ranks share a small machine: one kernel thread each
    e.setdefault("NUMBA_NUM_THREADS", "1")
    e.setdefault("OMP_NUM_THREADS", "1")
    # Open MPI refuses root and oversubscription unless told (ignored by MPICH)
    e.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    e.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    e.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    e.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    return e


def is_open_mpi(exe):
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, env=env())
    text = (out.stdout + out.stderr).lower()
    return "open mpi" in text or "openrte" in text or "open-mpi" in text


@functools.lru_cache(maxsize=1)
def launcher():
    if importlib.util.find_spec("mpi4py") is None:
        return None, "mpi4py is not installed (pip install 'fastopt[mpi]')"
    exe = mpiexec_path()
    if exe is None:
        return None, "no mpiexec/mpirun found (pip install 'fastopt[mpi]' provides MPICH's)"
    try:
        extra = []
        if is_open_mpi(exe):
            extra.append("--oversubscribe")
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                extra.append("--allow-run-as-root")
        probe = subprocess.run(
            [exe, "-n", "2", *extra, sys.executable, "-c",
             "from mpi4py import MPI; print('size', MPI.COMM_WORLD.Get_size())"],
            capture_output=True, text=True, timeout=TIMEOUT, env=env(),
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{exe} does not run: {exc}"
    if probe.returncode != 0 or probe.stdout.split().count("2") != 2:
        return None, (
            f"'{exe} -n 2' does not start 2 connected mpi4py ranks (mpi4py built for another "
            f"MPI?): rc={probe.returncode}\n{probe.stdout}\n{probe.stderr}"
        )
    return (exe, extra), None


def argv(n, script, *args):
    """Command line running ``script`` on ``n`` ranks (``n=0``: plain python, no mpiexec)."""
    cmd = [sys.executable, str(script), *map(str, args)]
    if not n:
        return cmd
    (exe, extra), reason = launcher()
    return [exe, "-n", str(n), *extra, *cmd]
