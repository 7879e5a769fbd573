"""mpiexec -n N python ckpt_load.py OUTDIR TAG: resume ``OUTDIR/ckpt.fo`` (written by
ckpt_save.py with another world size) on N ranks, twice: as ZeRO-1 (state re-sliced for N ranks)
and as plain data parallelism (the whole state on every rank). Writes ``loaded_<TAG>.npz`` (the
state gathered right after loading, from the root) and ``resumed_<TAG>_rank<r>.npz``."""

import ckpt_save as S
import numpy as np
import problem as P

import fastopt as fo
from fastopt import distributed as dist


def resume(comm, out, opt, ps):
    X, Y = P.data()
    extra = dist.load_checkpoint(out / "ckpt.fo", params=ps, optimizer=opt, comm=comm)
    for step in range(extra["step"], S.STEPS):
        P.set_grad(ps, X, Y, P.batch(step, S.GLOBAL_BATCH, comm.rank, comm.size))
        opt.step()
    return ps.flat.copy()


def main(comm, out, tag):
    # ZeRO-1 on this world size, from different initial values (the checkpoint replaces them)
    ps = P.init_params(seed=99)
    zero = dist.ZeroRedundancyOptimizer(ps, fo.NAdam, comm=comm, **S.KW)
    dist.load_checkpoint(out / "ckpt.fo", params=ps, optimizer=zero, comm=comm)
    sd = zero.state_dict()
    if comm.rank == 0:
        entry = sd["state"][0]
        np.savez(out / f"loaded_{tag}.npz", **{k: np.asarray(v) for k, v in entry.items()})
    ps = P.init_params(seed=99)
    zero = dist.ZeroRedundancyOptimizer(ps, fo.NAdam, comm=comm, **S.KW)
    flat_zero = resume(comm, out, zero, ps)

    ps = P.init_params(seed=98)
    dp = dist.DataParallel(ps, fo.NAdam(ps, **S.KW), comm=comm)
    flat_dp = resume(comm, out, dp, ps)
    np.savez(out / f"resumed_{tag}_rank{comm.rank}.npz", zero=flat_zero, dp=flat_dp)


if __name__ == "__main__":
    P.run(main)
