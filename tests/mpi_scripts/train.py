"""mpiexec -n N python train.py OUTDIR: data-parallel and ZeRO-1 training runs.

Each rank starts from DIFFERENT parameters (seed = rank); the constructors broadcast rank 0's.
Per-rank batch 4, global batch 4 * N, 12 steps. Writes ``train_rank<r>.npz`` (final flat
parameters per scenario) and ``train_rank<r>.json`` (shards, state sizes, MPI calls).
"""

import json

import numpy as np
import problem as P

from fastopt import distributed as dist

PER_RANK_BATCH = 4
STEPS = 12


def train(comm, mode, cls, kw, dtype, clip, steps=STEPS, pad=0):
    X, Y = P.data(dtype)
    ps = P.init_params(dtype, seed=comm.rank, pad=pad)
    counting = P.CountingComm(comm)
    if mode == "dp":
        opt = dist.DataParallel(ps, cls(ps, max_grad_norm=clip, **kw), comm=counting, debug=True)
    else:
        opt = dist.ZeroRedundancyOptimizer(
            ps, cls, comm=counting, max_grad_norm=clip, debug=True, **kw
        )
    opt.stats.reset()
    counting.reset()
    for step in range(steps):
        P.set_grad(ps, X, Y, P.batch(step, PER_RANK_BATCH * comm.size, comm.rank, comm.size))
        opt.step()
    opt.comm_calls = counting.counts
    return ps, opt


def main(comm, out):
    results, info = {}, {"world": comm.size, "scenarios": {}}
    for name, (cls, kw) in P.OPTIMIZERS.items():
        for mode in ("dp", "zero"):
            for clip in (None, 0.5):
                for dtype in (np.float64, np.float32):
                    key = f"{mode}-{name}-{clip}-{np.dtype(dtype).name}"
                    ps, opt = train(comm, mode, cls, kw, dtype, clip)
                    results[key] = ps.flat.copy()
                    entry = {
                        "calls": opt.stats.calls,
                        "bytes": opt.stats.bytes,
                        "comm_calls": opt.comm_calls,
                    }
                    if mode == "zero":
                        entry["shard"] = list(opt.shard)
                        entry["state_elements"] = opt.local_state_elements()
                        entry["slots"] = len(opt.local_optimizer._state_names(opt.param_groups[0]))
                    info["scenarios"][key] = entry
    # a buffer size that the world size divides: block collectives (19 + 5 = 24 = 2*3*4)
    for mode in ("dp", "zero"):
        for clip in (None, 0.5):
            key = f"even-{mode}-adam-{clip}"
            ps, opt = train(comm, mode, *P.OPTIMIZERS["adam"], np.float64, clip, pad=5)
            results[key] = ps.flat.copy()
            info["scenarios"][key] = {
                "calls": opt.stats.calls,
                "bytes": opt.stats.bytes,
                "comm_calls": opt.comm_calls,
            }
    # every optimizer class: ZeRO-1 against plain data parallelism, with global-norm clipping
    for name, (cls, kw) in P.all_optimizer_classes().items():
        for mode in ("dp", "zero"):
            ps, _ = train(comm, mode, cls, kw, np.float64, 0.5, steps=5)
            results[f"all-{mode}-{name}"] = ps.flat.copy()
    np.savez(out / f"train_rank{comm.rank}.npz", **results)
    (out / f"train_rank{comm.rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    P.run(main)
