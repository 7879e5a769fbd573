"""mpiexec -n 2 python zero_staged.py OUTDIR: ZeRO-1 over a bfloat16 ParamSet with the per-tensor
and matrix rules, whose 16-bit storage runs through float32 copies (fastopt/optim/staging.py):
master weights, bfloat16 state and stochastic rounding (seed 5). Every rank gets the same
bfloat16 gradient (:func:`grad`), so the float32 average over the ranks is that gradient and
one process given it must end on the same bits. 6 steps with a ``save_checkpoint`` after 3;
a fresh ZeRO optimizer ``load_checkpoint``s it and takes the last 3 again. Writes
``<case>_rank<r>.npz``: the parameter bits of both runs and, gathered to every rank after the
last step, the state (``state_<name>``) with its dtypes."""

import ml_dtypes
import numpy as np
import problem as P

import fastopt as fo
from fastopt import distributed as dist
from fastopt.nn import MLP
from fastopt.trainer import Trainer

BF16 = np.dtype(ml_dtypes.bfloat16)
SAVE_AT = 3
STEPS = 6
OPTIONS = dict(master_weights=True, state_dtype="bfloat16", stochastic_rounding=True, seed=5)
CASES = {
    "lamb": (fo.LAMB, {"lr": 0.02, "weight_decay": 0.1}),
    "lars": (fo.LARS, {"lr": 0.1, "momentum": 0.9}),
    "novograd": (fo.NovoGrad, {"lr": 0.02, "weight_decay": 0.01}),
    "adafactor": (fo.Adafactor, {"lr": 0.02, "eps": (1e-3, 1e-3)}),
    # Muon on W (rank 0), its AdamW fallback on b and s (rank 1)
    "muon": (fo.Muon, {"lr": 0.02, "muon_params": ("W",), "ns_dtype": "float32"}),
}


def params(seed=0):
    """problem.py's parameters (W 5x3, b, s) in bfloat16."""
    ps = P.init_params(seed=seed)
    return fo.ParamSet({n: np.asarray(ps[n]).astype(BF16) for n in ps.names}, dtype=BF16)


def grad(ps, step):
    """The bfloat16 gradient of step ``step``, the same on every rank."""
    return {
        n: (np.cos(np.arange(np.asarray(ps[n]).size) + 3.0 * step) * (1 + i)).astype(BF16)
        for i, n in enumerate(ps.names)
    }


def set_grad(ps, step):
    for n, g in grad(ps, step).items():
        ps.grads[n][...] = g.reshape(ps.grads[n].shape)


def main(comm, out):
    for name, (cls, kw) in CASES.items():
        ps = params()
        opt = dist.ZeroRedundancyOptimizer(ps, cls, comm=comm, **kw, **OPTIONS)
        for step in range(SAVE_AT):
            set_grad(ps, step)
            opt.step()
        path = out / f"{name}.fo"
        dist.save_checkpoint(path, params=ps, optimizer=opt, comm=comm, extra={"step": SAVE_AT})
        for step in range(SAVE_AT, STEPS):
            set_grad(ps, step)
            opt.step()
        state = opt.state_dict(root=None)["state"][0]
        fresh = params(seed=3 + comm.rank)
        resumed = dist.ZeroRedundancyOptimizer(fresh, cls, comm=comm, **kw, **OPTIONS)
        extra = dist.load_checkpoint(path, params=fresh, optimizer=resumed, comm=comm)
        for step in range(extra["step"], STEPS):
            set_grad(fresh, step)
            resumed.step()
        arrays = {
            f"state_{k}": np.asarray(v).view(np.uint16) if np.asarray(v).dtype == BF16 else v
            for k, v in state.items()
            if hasattr(v, "dtype")
        }
        dtypes = {f"dtype_{k}": str(np.asarray(v).dtype) for k, v in state.items()}
        np.savez(
            out / f"{name}_rank{comm.rank}.npz",
            uninterrupted=ps.flat.view(np.uint16),
            resumed=fresh.flat.view(np.uint16),
            **arrays,
            **dtypes,
        )
    # float32 state of a bf16 ParamSet: rank 1 keeps no momentum (only Muon's fallback tensors)
    # and gathers zeros for its share in the state's dtype, not the parameters'
    cls, kw = CASES["muon"]
    ps = params()
    opt = dist.ZeroRedundancyOptimizer(ps, cls, comm=comm, state_dtype="float32", **kw)
    for step in range(2):
        set_grad(ps, step)
        opt.step()
    state = opt.state_dict(root=None)["state"][0]
    arrays = {f"state_{k}": np.asarray(v) for k, v in state.items() if hasattr(v, "dtype")}
    np.savez(out / f"muon_f32_rank{comm.rank}.npz", flat=ps.flat.view(np.uint16), **arrays)
    # the Trainer's Muon recipe (hidden matrices, AdamW for the rest) with precision="bf16",
    # data parallel and ZeRO-1: the same bits
    rng = np.random.default_rng(3)
    X = rng.standard_normal((96, 6)).astype(np.float32)
    y = np.argmax(X @ rng.standard_normal((6, 3)), axis=1)
    ends = {}
    for zero in (False, True):
        model = MLP(6, (10, 8), 3, seed=0)
        trainer = Trainer(
            model, fo.Muon, lr=0.01, batch_size=12, epochs=1, seed=5, progress=False,
            precision="bf16", distributed=True, zero=zero,
        )  # fmt: skip
        trainer.fit(X, y)
        ends[f"trainer_zero{int(zero)}"] = model.params.flat.copy()
    np.savez(out / f"trainer_rank{comm.rank}.npz", **ends)
    # 8-bit state of a per-tensor rule: refused (blocks would not be one process's)
    try:
        big = fo.ParamSet({"a": np.zeros((80, 60), np.float32), "b": np.zeros(10, np.float32)})
        dist.ZeroRedundancyOptimizer(big, fo.LAMB, comm=comm, state_dtype="int8")
        refusal = ""
    except ValueError as exc:
        refusal = str(exc)
    (out / f"int8_rank{comm.rank}.txt").write_text(refusal)


if __name__ == "__main__":
    P.run(main)
