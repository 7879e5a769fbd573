"""mpiexec -n 2 python precision16.py OUTDIR: bfloat16 ParamSets under DataParallel and ZeRO-1.

- ``dp``: DataParallel, AdamW with float32 master weights and global-norm clipping, bfloat16
  gradients (summed over the ranks in float32);
- ``zero``: ZeRO-1 AdamW with master weights, stochastic rounding (seed 3) and bfloat16 state
  given float32 gradients of the bfloat16 ParamSet; a checkpoint after ``SAVE_AT`` steps, then
  a second ZeRO optimizer resumes from it and must end on the same bits.

Then the Trainer with ``precision="bf16"`` (master weights, Adam) on ``trainer_common``'s
problem in float32, data parallel (``trainer_dp``) and ZeRO-1 (``trainer_zero``).

Then refusals: integer gradients for the ZeRO step and an integer state array for its
``load_state_dict`` raise TypeError on every rank, with parameters and state unchanged.

Writes ``rank<r>.npz``: the final parameter bits of each run, the refusal messages and whether
nothing changed, and on the root the gathered ZeRO state at the checkpoint. ``tests/test_precision_around.py`` replays the same gradients in one
process (:func:`rank_grad`, :func:`reference`).
"""

import ml_dtypes
import numpy as np
import problem as P
import trainer_common as T

import fastopt as fo
from fastopt import distributed as dist
from fastopt.nn import MLP
from fastopt.trainer import Trainer

BF16 = np.dtype(ml_dtypes.bfloat16)
GLOBAL_BATCH = 12
STEPS = 8
SAVE_AT = 4
DP = dict(lr=0.05, weight_decay=0.1, master_weights=True, max_grad_norm=0.5)
ZERO = dict(lr=0.05, master_weights=True, stochastic_rounding=True, seed=3)
ZERO_STATE = "bfloat16"


def params():
    ps = P.init_params(seed=0)
    return fo.ParamSet({k: ps[k] for k in ps.names}, dtype="bfloat16")


def rank_grad(ps, X, Y, step, rank, world, dtype):
    """This rank's gradient of step ``step`` at the (bfloat16) parameters, computed in float64
    and stored as ``dtype``: a flat array."""
    q = fo.ParamSet({k: ps[k].astype(np.float64) for k in ps.names})
    P.set_grad(q, X, Y, P.batch(step, GLOBAL_BATCH, rank, world))
    return q.grad_flat.astype(dtype)


def reference(kind, steps=STEPS):
    """One process: the same optimizer stepping on the float32 sum of the two ranks'
    gradients with ``grad_scale=1/2`` (two addends: the sum is the same in any order)."""
    X, Y = P.data()
    ps = params()
    if kind == "dp":
        opt, dtype = fo.AdamW(ps, **DP), BF16
    else:
        opt, dtype = fo.AdamW(ps, state_dtype=ZERO_STATE, **ZERO), np.float32
    for step in range(steps):
        g = [rank_grad(ps, X, Y, step, r, 2, dtype).astype(np.float32) for r in range(2)]
        opt.step(g[0] + g[1], grad_scale=0.5)
    return ps.flat.view(np.uint16).copy(), opt


def main(comm, out):
    X, Y = P.data()
    rank, world = comm.rank, comm.size
    ps = params()
    dp = dist.DataParallel(ps, fo.AdamW(ps, **DP), comm=comm, debug=True)
    for step in range(STEPS):
        ps.grad_flat[...] = rank_grad(ps, X, Y, step, rank, world, BF16)
        dp.step()
    result = {"dp": ps.flat.view(np.uint16).copy()}
    g = rank_grad(params(), X, Y, 0, rank, world, BF16)
    result["allreduced"] = dp.allreduce_grads(g.copy()).view(np.uint16)  # mean, rounded once

    ps = params()
    zero = dist.ZeroRedundancyOptimizer(
        ps, fo.AdamW, comm=comm, debug=True, state_dtype=ZERO_STATE, **ZERO
    )
    saved = None
    for step in range(STEPS):
        if step == SAVE_AT:
            dist.save_checkpoint(out / "ckpt.fo", params=ps, optimizer=zero, comm=comm)
            saved = zero.state_dict(root=0)
        zero.step(rank_grad(ps, X, Y, step, rank, world, np.float32))
    result["zero"] = ps.flat.view(np.uint16).copy()

    ps = params()
    resumed = dist.ZeroRedundancyOptimizer(ps, fo.AdamW, comm=comm, state_dtype=ZERO_STATE, **ZERO)
    dist.load_checkpoint(out / "ckpt.fo", params=ps, optimizer=resumed, comm=comm)
    for step in range(SAVE_AT, STEPS):
        resumed.step(rank_grad(ps, X, Y, step, rank, world, np.float32))
    result["resumed"] = ps.flat.view(np.uint16).copy()
    result.update(refusals(resumed, ps))
    for zero_ in (False, True):
        trained = train_bf16(distributed=True, zero=zero_)
        result["trainer_zero" if zero_ else "trainer_dp"] = trained.model.params.flat.copy()
    if rank == 0:
        for k, v in saved["state"][0].items():
            v = np.asarray(v)
            result[f"state_{k}"] = v.view(np.uint16) if v.dtype == BF16 else v
    np.savez(out / f"rank{rank}.npz", **result)


def train_bf16(**kw):
    """Two epochs of Adam on ``trainer_common``'s problem, a float32 MLP with bf16 parameters."""
    X, y = T.data()
    m = MLP(T.D, (10,), T.K, seed=0)
    trainer = Trainer(
        m, fo.Adam, lr=0.01, batch_size=T.BATCH, epochs=2, seed=5, progress=False,
        precision="bf16", **kw,
    )  # fmt: skip
    trainer.fit(X.astype(np.float32), y)
    return trainer


def refusals(zero, ps):
    """{message of each refusal, "unchanged": parameters and state bit-identical after both}."""
    before = ps.flat.copy(), zero.state_dict(root=None)
    out = {}
    try:
        zero.step(np.ones(ps.size, np.int32))
    except TypeError as exc:
        out["int_grad"] = str(exc)
    sd = zero.state_dict(root=None)
    sd["state"][0]["exp_avg"] = np.ones(ps.size, np.int32)
    try:
        zero.load_state_dict(sd)
    except TypeError as exc:
        out["int_state"] = str(exc)
    after = zero.state_dict(root=None)
    same = before[0].view(np.uint16).tobytes() == ps.flat.view(np.uint16).tobytes()
    for k, v in before[1]["state"][0].items():
        same = same and np.asarray(v).tobytes() == np.asarray(after["state"][0][k]).tobytes()
    out["unchanged"] = np.array(same)
    return out


if __name__ == "__main__":
    P.run(main)
