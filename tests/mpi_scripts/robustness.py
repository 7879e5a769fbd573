"""mpiexec -n N python robustness.py OUTDIR: non-finite gradients on one rank, the debug
checksum, metric averaging.

Non-finite: Adam with skip_nonfinite and max_grad_norm, global batch 4 * N, 8 steps. At step 2
the LAST rank puts NaN in element 0 of its gradient (in ZeRO-1 that element belongs to rank 0's
shard, so only the flag Allreduce tells the others); at step 5 rank 0 puts +Inf in the last
element (owned by the last rank). Writes ``robust_rank<r>.json`` and ``robust_rank<r>.npz``.
"""

import json

import numpy as np
import problem as P

import fastopt as fo
from fastopt import distributed as dist

PER_RANK_BATCH = 4
STEPS = 8
BAD = {2: ("last", 0, np.nan), 5: ("first", -1, np.inf)}


def main(comm, out):
    last = comm.size - 1
    X, Y = P.data()
    info, arrays = {}, {}
    for mode in ("dp", "zero"):
        ps = P.init_params()
        kw = {"lr": 0.05, "max_grad_norm": 1.0, "skip_nonfinite": True}
        if mode == "dp":
            opt = dist.DataParallel(ps, fo.Adam(ps, **kw), comm=comm)
        else:
            opt = dist.ZeroRedundancyOptimizer(ps, fo.Adam, comm=comm, **kw)
        taken = []
        for step in range(STEPS):
            P.set_grad(ps, X, Y, P.batch(step, PER_RANK_BATCH * comm.size, comm.rank, comm.size))
            if step in BAD:
                who, index, value = BAD[step]
                if comm.rank == (last if who == "last" else 0):
                    ps.grad_flat[index] = value
            opt.step()
            taken.append(bool(opt.last_step_taken))
        info[mode] = {"taken": taken, "skipped_steps": opt.skipped_steps}
        arrays[mode] = ps.flat.copy()
        sd = opt.state_dict() if mode == "dp" else opt.state_dict(root=None)
        info[mode]["state_step"] = sd["state"][0]["step"]

    # debug checksum: a rank that drifted is detected on every rank
    ps = P.init_params()
    dp = dist.DataParallel(ps, fo.SGD(ps, lr=0.1), comm=comm, debug=True)
    dp.check_params()  # identical after the broadcast: no error
    if comm.rank == last:
        ps.flat[3] += 1e-12
    try:
        dp.check_params()
        info["checksum_raised"] = False
    except RuntimeError as exc:
        info["checksum_raised"] = True
        info["checksum_message"] = str(exc)

    # metrics: weighted mean over ranks
    info["metrics"] = dist.average_metrics(
        {"loss": float(comm.rank + 1), "acc": 0.5}, comm, weight=comm.rank + 1
    )
    info["shard_indices"] = dist.shard_indices(10, 3, 42, comm.rank, comm.size).tolist()
    # fewer elements than ranks (some ranks own nothing): same result as one process
    tiny = fo.ParamSet({"t": np.array([1.0, -2.0])})
    zero = dist.ZeroRedundancyOptimizer(tiny, fo.Adam, lr=0.1, max_grad_norm=1.0, comm=comm)
    for step in range(3):
        tiny.grad_flat[...] = [0.5 * (step + 1), -1.5]  # the same on every rank
        zero.step()
    arrays["tiny"] = tiny.flat.copy()
    sd = zero.state_dict(root=None)
    arrays["tiny_exp_avg"] = sd["state"][0]["exp_avg"]
    info["tiny_shard"] = list(zero.shard)

    # refusals are collective: every rank raises, nothing changes
    before = zero.state_dict(root=None)
    bad = dict(before, algorithm="SGD")
    try:
        zero.load_state_dict(bad if comm.rank == 0 else None)
        info["bad_algorithm_raised"] = False
    except ValueError as exc:
        info["bad_algorithm_raised"] = "SGD" in str(exc)
    after = zero.state_dict(root=None)
    info["state_unchanged"] = bool(
        np.array_equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
    )
    ps = P.init_params()
    dp = dist.DataParallel(ps, fo.SGD(ps, lr=lambda step: 0.1), comm=comm)
    try:
        dist.save_checkpoint(out / "never.fo", params=ps, optimizer=dp, comm=comm)
        info["save_lambda_raised"] = False
    except TypeError:
        info["save_lambda_raised"] = True
    np.savez(out / f"robust_rank{comm.rank}.npz", **arrays)
    (out / f"robust_rank{comm.rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    P.run(main)
