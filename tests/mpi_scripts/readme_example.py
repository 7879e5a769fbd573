# train_dp.py: run with  mpiexec -n 2 python train_dp.py   (the README's distributed example)
import numpy as np

from fastopt import Adam, ParamSet
from fastopt import distributed as dist

ctx = dist.Context()  # MPI.COMM_WORLD: ctx.rank, ctx.world_size, ctx.is_root
rng = np.random.default_rng(0)  # the same data on every rank; each trains on its share
X = rng.standard_normal((512, 8))
y = X @ rng.standard_normal(8) + 0.1 + 0.1 * rng.standard_normal(512)
ps = ParamSet({"w": np.zeros(8), "b": np.zeros(1)})
# ZeRO-1: each rank keeps Adam's state for 1/world of the parameters.
# Plain data parallelism instead: opt = dist.DataParallel(ps, Adam(ps, lr=0.05, max_grad_norm=1.0))
opt = dist.ZeroRedundancyOptimizer(ps, Adam, lr=0.05, max_grad_norm=1.0)
for epoch in range(20):
    idx = ctx.shard_indices(len(X), epoch, seed=0)  # this rank's share, reshuffled each epoch
    for k in range(0, len(idx), 32):  # 32 rows per rank = 32 * world_size rows per step
        i = idx[k : k + 32]
        r = X[i] @ ps["w"] + ps["b"] - y[i]
        ps.grads["w"][...] = X[i].T @ r / len(i)
        ps.grads["b"][...] = r.mean()
        opt.step()  # gradients averaged over the ranks, then one fused update
    mse = float(np.mean((X[idx] @ ps["w"] + ps["b"] - y[idx]) ** 2))
    loss = ctx.average({"mse": mse}, weight=len(idx))["mse"]
    ctx.print(f"epoch {epoch}: mse {loss:.4f}")  # printed by rank 0 only
dist.save_checkpoint("model.ckpt", params=ps, optimizer=opt)  # rank 0 writes one file
