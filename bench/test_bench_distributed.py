"""Communication per step of fastopt.distributed on 2 ranks (``mpiexec -n 2``), next to compute.

Run: ``pytest bench/test_bench_distributed.py -s`` (needs ``pip install -e ".[test,mpi]"``;
skipped without mpi4py/mpiexec). Size: ``FASTOPT_BENCH_DIST_N`` float32 elements (default 4 Mi),
``FASTOPT_BENCH_DIST_STEPS`` timed steps (default 20), ``FASTOPT_BENCH_DIST_RANKS`` (default 2).
Each rank runs its kernels on ``NUMBA_NUM_THREADS`` threads (default 1 here: ranks share cores).

For DataParallel and ZeroRedundancyOptimizer (Adam), the MPI script
``tests/mpi_scripts/bench_comm.py`` records the collectives each step makes and what they carry,
and times the step, the time inside MPI and the rest (compute); the baseline is the same Adam
step of one process over the whole buffer. Asserted: DP makes exactly ONE Allreduce of the
gradient buffer per step; ZeRO-1 exactly one Reduce_scatter of the gradient buffer and one
Allgather of the parameter buffer (``Reduce_scatter_block`` + ``Allgather`` when the rank count
divides the size, as for the default size; ``Reduce_scatter`` + ``Allgatherv`` otherwise, e.g.
``FASTOPT_BENCH_DIST_N=4194303``), and keeps 1/world of the optimizer state per rank. The numbers
go to ``benchmark.extra_info`` (pytest-benchmark JSON, group ``distributed``; ``bench/report.py``
ignores them) and to the terminal.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

_TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests" / "mpi_scripts"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

import launch  # noqa: E402

N = int(os.environ.get("FASTOPT_BENCH_DIST_N", str(4 * 1024 * 1024)))
STEPS = int(os.environ.get("FASTOPT_BENCH_DIST_STEPS", "20"))
RANKS = int(os.environ.get("FASTOPT_BENCH_DIST_RANKS", "2"))

EVEN = N % RANKS == 0
"""Block collectives when the world size divides the buffer size, vector forms otherwise."""
RS, AG = ("Reduce_scatter_block", "Allgather") if EVEN else ("Reduce_scatter", "Allgatherv")
EXPECTED_CALLS = {"dp": {"Allreduce": 1.0}, "zero": {RS: 1.0, AG: 1.0}}


def _run(mode, out):
    launcher, reason = launch.launcher()
    if launcher is None:
        pytest.skip(reason)
    argv = launch.argv(RANKS, _TESTS / "bench_comm.py", out, mode, N, STEPS)
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=launch.TIMEOUT, env=launch.env()
    )
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads((out / f"bench_{mode}.json").read_text())


def _ms(s):
    return f"{s * 1e3:.3f} ms"


@pytest.mark.parametrize("mode", ["dp", "zero"])
def test_comm_per_step(benchmark, tmp_path, mode):
    results = {}

    def once():
        results.update(_run(mode, tmp_path))

    # pytest-benchmark times the whole mpiexec run once (start-up included); the per-step
    # numbers below come from inside the ranks
    benchmark.group = "distributed"
    benchmark.name = f"{mode}-{RANKS}ranks-{N}"
    benchmark.pedantic(once, rounds=1, iterations=1)
    r = results
    benchmark.extra_info.update(r)

    grad_bytes = N * 4
    assert r["calls_per_step"] == EXPECTED_CALLS[mode]
    if mode == "dp":
        assert r["payload_bytes_per_step"] == {"Allreduce": grad_bytes}
        assert r["optimizer_state_bytes_per_rank"] == [2 * grad_bytes] * RANKS
    else:
        assert r["payload_bytes_per_step"] == {RS: grad_bytes, AG: grad_bytes}
        assert sum(r["optimizer_state_bytes_per_rank"]) == 2 * grad_bytes
        assert max(r["optimizer_state_bytes_per_rank"]) <= 2 * 4 * -(-N // RANKS)

    print(
        f"\n[{mode}] {RANKS} ranks, Adam, {N} float32 ({grad_bytes / 1e6:.1f} MB gradient): "
        f"calls/step {r['calls_per_step']}, "
        f"payload {sum(r['payload_bytes_per_step'].values()) / 1e6:.1f} MB/step, "
        f"ring bytes sent/rank {r['ring_bytes_sent_per_rank'] / 1e6:.1f} MB | "
        f"step {_ms(r['step_s'])} = "
        f"comm {_ms(r['comm_s'])} + compute {_ms(r['compute_s'])}; one process, whole buffer: "
        f"{_ms(r['single_process_step_s'])}; optimizer state/rank "
        f"{max(r['optimizer_state_bytes_per_rank']) / 1e6:.1f} MB"
    )
