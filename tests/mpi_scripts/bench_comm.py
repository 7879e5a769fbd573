"""mpiexec -n N python bench_comm.py OUTDIR MODE N_ELEMENTS STEPS: time Adam steps under
DataParallel (MODE=dp) or ZeroRedundancyOptimizer (MODE=zero) on float32 buffers.

Per step: wall time of ``opt.step()``, the time inside MPI calls (``opt.stats``), and the rest
(the update kernel and, for ZeRO, the slice copy bookkeeping) as compute. Baseline: the same
Adam step of ONE process over the whole buffer (plain ``fo.Adam(ps)``, timed on rank 0 while the
other ranks wait). Rank 0 writes ``bench_<MODE>.json``."""

import json
import time

import numpy as np
import problem as P

import fastopt as fo
from fastopt import distributed as dist

WARMUP = 3


def median(xs):
    return float(np.median(np.asarray(xs)))


def main(comm, out, mode, n, steps):
    n, steps = int(n), int(steps)
    rng = np.random.default_rng(comm.rank)
    ps = fo.ParamSet({"w": rng.standard_normal(n).astype(np.float32)})
    g0 = (1e-3 * rng.standard_normal(n)).astype(np.float32)
    if mode == "dp":
        opt = dist.DataParallel(ps, fo.Adam(ps, lr=1e-3), comm=comm)
        state_bytes = 2 * n * 4
    else:
        opt = dist.ZeroRedundancyOptimizer(ps, fo.Adam, lr=1e-3, comm=comm)
        state_bytes = 2 * (opt.hi - opt.lo) * 4
    wall, comm_s = [], []
    for i in range(WARMUP + steps):
        np.copyto(ps.grad_flat, g0)
        comm.Barrier()
        before = opt.stats.total_seconds
        t = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t
        if i == WARMUP - 1:
            opt.stats.reset()
            before = 0.0
        if i >= WARMUP:
            wall.append(dt)
            comm_s.append(opt.stats.total_seconds - before)
    calls = {k: v / steps for k, v in opt.stats.calls.items()}
    nbytes = {k: v / steps for k, v in opt.stats.bytes.items()}
    call_s = {k: v / steps for k, v in opt.stats.seconds.items()}
    per_rank = comm.gather(
        {"wall_s": median(wall), "comm_s": median(comm_s), "state_bytes": state_bytes}, root=0
    )

    # baseline: one process, whole buffer, same Adam step
    base = []
    if comm.rank == 0:
        ps1 = fo.ParamSet({"w": ps.flat.copy()})
        one = fo.Adam(ps1, lr=1e-3)
        for i in range(WARMUP + steps):
            np.copyto(ps1.grad_flat, g0)
            t = time.perf_counter()
            one.step()
            if i >= WARMUP:
                base.append(time.perf_counter() - t)
    comm.Barrier()
    if comm.rank == 0:
        world = comm.size
        wire = (world - 1) / world * n * 4
        result = {
            "mode": mode,
            "world": world,
            "elements": n,
            "dtype": "float32",
            "optimizer": "Adam",
            "steps": steps,
            "calls_per_step": calls,
            "payload_bytes_per_step": nbytes,
            "seconds_per_step_by_call": call_s,
            "gradient_bytes": n * 4,
            # bytes each rank sends with ring algorithms: Allreduce 2(W-1)/W, Reduce_scatter and
            # Allgather (W-1)/W of the buffer each, so the same total for both modes
            "ring_bytes_sent_per_rank": 2 * wire,
            "step_s": max(r["wall_s"] for r in per_rank),
            "comm_s": max(r["comm_s"] for r in per_rank),
            "compute_s": max(r["wall_s"] - r["comm_s"] for r in per_rank),
            "single_process_step_s": median(base),
            "optimizer_state_bytes_per_rank": [r["state_bytes"] for r in per_rank],
            "per_rank": per_rank,
        }
        (out / f"bench_{mode}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    P.run(main)
