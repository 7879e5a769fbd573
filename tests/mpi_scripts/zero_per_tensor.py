"""mpiexec -n 2 python zero_per_tensor.py OUTDIR: ZeRO-1 with the per-tensor optimizers and Muon
(sharded on tensor boundaries), global batch 12, 20 steps, a ``save_checkpoint`` after 10; then a fresh
ZeRO-1 optimizer over other parameters ``load_checkpoint``s it and takes the last 10 steps
again. Writes ``<name>_rank<r>.npz`` (final parameters of both runs) and ``<name>_rank<r>.json``
(the rank's tensors, shard and state elements)."""

import json

import numpy as np
import problem as P

import fastopt as fo
from fastopt import distributed as dist

GLOBAL_BATCH = 12
SAVE_AT = 10
STEPS = 20
CASES = {
    "lamb": (fo.LAMB, {"lr": 0.02, "weight_decay": 0.1, "max_grad_norm": 0.5}),
    "novograd": (fo.NovoGrad, {"lr": 0.02, "weight_decay": 0.01}),
    "adafactor": (fo.Adafactor, {"lr": 0.02, "max_grad_norm": 0.5}),
    # Muon on W (rank 0), its AdamW fallback on b and s (rank 1)
    "muon": (fo.Muon, {"lr": 0.02, "muon_params": ("W",), "ns_dtype": "float64"}),
}


def train(comm, opt, ps, steps):
    X, Y = P.data()
    for step in steps:
        P.set_grad(ps, X, Y, P.batch(step, GLOBAL_BATCH, comm.rank, comm.size))
        opt.step()


def main(comm, out):
    for name, (cls, kw) in CASES.items():
        ps = P.init_params()
        opt = dist.ZeroRedundancyOptimizer(ps, cls, comm=comm, debug=True, **kw)
        train(comm, opt, ps, range(SAVE_AT))
        path = out / f"{name}.fo"
        dist.save_checkpoint(path, params=ps, optimizer=opt, comm=comm, extra={"step": SAVE_AT})
        train(comm, opt, ps, range(SAVE_AT, STEPS))
        info = {
            "tensors": list(opt.tensors),
            "shard": list(opt.shard),
            "state_elements": opt.local_state_elements(),
        }
        fresh = P.init_params(seed=3 + comm.rank)
        resumed = dist.ZeroRedundancyOptimizer(fresh, cls, comm=comm, **kw)
        extra = dist.load_checkpoint(path, params=fresh, optimizer=resumed, comm=comm)
        train(comm, resumed, fresh, range(extra["step"], STEPS))
        np.savez(out / f"{name}_rank{comm.rank}.npz", uninterrupted=ps.flat, resumed=fresh.flat)
        (out / f"{name}_rank{comm.rank}.json").write_text(json.dumps(info))
    # one tensor, two ranks: rank 1 owns nothing and steps its private element
    for name in ("lamb", "muon"):
        cls, kw = CASES[name]
        ps = one_tensor()
        opt = dist.ZeroRedundancyOptimizer(ps, cls, comm=comm, **kw)
        for step in range(5):
            ps.grads["W"][...] = one_tensor_grad(step)
            opt.step()
        sd = opt.state_dict(root=None)
        again = dist.ZeroRedundancyOptimizer(one_tensor(), cls, comm=comm, **kw)
        again.load_state_dict(sd)
        reloaded = again.state_dict(root=None)["state"][0]
        arrays = {f"state_{k}": np.asarray(v) for k, v in sd["state"][0].items()}
        arrays |= {f"reloaded_{k}": np.asarray(v) for k, v in reloaded.items()}
        np.savez(out / f"one_{name}_rank{comm.rank}.npz", flat=ps.flat, **arrays)


def one_tensor():
    return fo.ParamSet({"W": np.linspace(-1.0, 1.0, 12).reshape(4, 3)})


def one_tensor_grad(step):
    return np.cos(np.arange(12.0) + step).reshape(4, 3)


if __name__ == "__main__":
    P.run(main)
