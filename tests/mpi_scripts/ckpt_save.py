"""mpiexec -n N python ckpt_save.py OUTDIR: ZeRO-1 NAdam (with a scalar state, mu_product, and
global-norm clipping), global batch 12; 5 steps, ``save_checkpoint(OUTDIR/ckpt.fo)``, 5 more
steps. Writes ``uninterrupted_rank<r>.npz`` (final parameters) and ``saved_state.npz`` (the
gathered state at the checkpoint, from the root)."""

import numpy as np
import problem as P

import fastopt as fo
from fastopt import distributed as dist

GLOBAL_BATCH = 12
SAVE_AT = 5
STEPS = 10
KW = {"lr": 0.05, "max_grad_norm": 0.5}


def main(comm, out):
    X, Y = P.data()
    ps = P.init_params()
    opt = dist.ZeroRedundancyOptimizer(ps, fo.NAdam, comm=comm, **KW)
    for step in range(STEPS):
        if step == SAVE_AT:
            dist.save_checkpoint(
                out / "ckpt.fo", params=ps, optimizer=opt, comm=comm, extra={"step": step}
            )
            sd = opt.state_dict(root=None)  # every rank gets the same gathered state
            if comm.rank == 0:
                entry = sd["state"][0]
                np.savez(out / "saved_state.npz", **{k: np.asarray(v) for k, v in entry.items()})
        P.set_grad(ps, X, Y, P.batch(step, GLOBAL_BATCH, comm.rank, comm.size))
        opt.step()
    np.savez(out / f"uninterrupted_rank{comm.rank}.npz", flat=ps.flat)


if __name__ == "__main__":
    P.run(main)
