"""mpiexec -n 2 python zero_int8.py OUTDIR: ZeRO-1 Adam with 8-bit state (``state_dtype="int8"``).

``BIG`` (5681 elements): the naive split (2841 + 2840) would cut inside the 12th block of 256;
the block-aligned shards are [0, 3072) and [3072, 5681), both below ``MIN_8BIT_SIZE``, so they
keep 8-bit state only because the whole ParamSet does. ``SMALL`` (3000 elements) keeps float32
state, as one process does, on the naive shards.

Each rank steps ``rank_grad(step, rank)`` (float32); :func:`reference` is one process stepping
the sum of the two ranks' gradients with ``grad_scale=0.5`` (two addends: the sum is exact in
any order), which the ranks must match bit for bit, state included.

The state round trips, ``SAVE_AT`` steps in: a ``save_checkpoint`` loaded into a fresh 2-rank
ZeRO (``ckpt``); the one-process state loaded into a 2-rank ZeRO (``from_one``); the 2-rank
state loaded into a ZeRO over a 1-rank communicator on each rank (``world1``). Each then takes
the remaining steps. Refusals on the 2-rank ZeRO: an absmax of another block layout (the naive
shards' 12 + 12 blocks) is refused on the root; a negative absmax in rank 1's last block by
rank 1's optimizer, and rank 0, whose part was good, puts its state back; parameters and state
bit-identical afterwards.

The Trainer: ``Trainer(distributed=True)`` with and without ``zero=True``, Adam with 8-bit
state, a float32 MLP of 6003 parameters (8-bit state from 4096 on; each shard is smaller), 2 epochs on
``trainer_common``'s data; with two
ranks every gradient sum is exact in any order, so both must give the same bits, and the ZeRO
run keeps codes and block absmax in its shard.

Writes ``rank<r>.npz``: parameters of every run, shards, refusal messages and "unchanged"
flags; the root the gathered state at ``SAVE_AT`` and at the end (``mid_*``, ``final_*``).
"""

import numpy as np
import problem as P

import fastopt as fo
from fastopt import distributed as dist

BIG = {"W": (70, 80), "b": (80,), "s": ()}
SMALL = {"w": (50, 60)}
KW = {"lr": 0.01, "state_dtype": "int8"}
STEPS = 6
SAVE_AT = 3
BAD_BLOCKS = 24
"""Blocks of the naive shards of BIG (12 + 12): another block layout than the 23 of 5681."""


def params(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return fo.ParamSet({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()})


def rank_grad(step, rank, n):
    """This rank's float32 gradient of step ``step`` (magnitudes vary by block)."""
    rng = np.random.default_rng([step, rank])
    scale = np.repeat(rng.uniform(0.01, 3.0, -(-n // 100)), 100)[:n]
    return (rng.standard_normal(n) * scale).astype(np.float32)


def summed_grad(step, n):
    return rank_grad(step, 0, n) + rank_grad(step, 1, n)


def reference(shapes, steps):
    """(ParamSet, fo.Adam) of one process after ``steps`` steps on the summed gradients."""
    ps = params(shapes)
    opt = fo.Adam(ps, **KW)
    for step in range(steps):
        opt.step(summed_grad(step, ps.size), grad_scale=0.5)
    return ps, opt


def train(zero, ps, steps, rank, world):
    for step in steps:
        g = rank_grad(step, rank, ps.size) if world == 2 else summed_grad(step, ps.size)
        zero.step(g, grad_scale=1.0 if world == 2 else 0.5)


def arrays_of(prefix, sd):
    """``{prefix + key: value}`` of a state entry (the qmap names as string arrays)."""
    return {prefix + k: np.asarray(v) for k, v in sd["state"][0].items()}


def main(comm, out):
    rank = comm.rank
    result = {}
    root_state = {}
    for case, shapes in (("big", BIG), ("small", SMALL)):
        ps = params(shapes)
        zero = dist.ZeroRedundancyOptimizer(ps, fo.Adam, comm=comm, debug=True, **KW)
        result[f"{case}_shard"] = np.array(zero.shard)
        train(zero, ps, range(SAVE_AT), rank, 2)
        mid = zero.state_dict(root=None)
        if case == "big":
            dist.save_checkpoint(out / "ckpt.fo", params=ps, optimizer=zero, comm=comm)
        train(zero, ps, range(SAVE_AT, STEPS), rank, 2)
        result[f"{case}_params"] = ps.flat.copy()
        final = zero.state_dict(root=0)
        if rank == 0:
            root_state.update(arrays_of(f"{case}_mid_", mid))
            root_state.update(arrays_of(f"{case}_final_", final))
        if case == "big":
            result.update(round_trips(comm, mid, out / "ckpt.fo"))
            result.update(refusals(zero, ps))
    result.update(trainer_runs(comm))
    np.savez(out / f"rank{rank}.npz", **result, **root_state)


def round_trips(comm, mid, path):
    """Parameters after the last steps of ZeRO optimizers resumed at ``SAVE_AT`` from the
    checkpoint at ``path``, from the one-process state, and (1 rank) from ``mid``."""
    rank, out = comm.rank, {}
    ps = params(BIG, seed=1 + rank)
    zero = dist.ZeroRedundancyOptimizer(ps, fo.Adam, comm=comm, **KW)
    dist.load_checkpoint(path, params=ps, optimizer=zero, comm=comm)
    train(zero, ps, range(SAVE_AT, STEPS), rank, 2)
    out["ckpt_params"] = ps.flat.copy()

    one_ps, one = reference(BIG, SAVE_AT)
    at_save = one_ps.flat.copy()
    zero = dist.ZeroRedundancyOptimizer(one_ps, fo.Adam, comm=comm, **KW)
    zero.load_state_dict(one.state_dict() if rank == 0 else None)
    train(zero, one_ps, range(SAVE_AT, STEPS), rank, 2)
    out["from_one_params"] = one_ps.flat.copy()

    alone = comm.Split(color=rank, key=0)  # a world of one rank on each rank
    ps = params(BIG)
    ps.flat[...] = at_save
    zero = dist.ZeroRedundancyOptimizer(ps, fo.Adam, comm=alone, **KW)
    zero.load_state_dict(mid)
    out["world1_shard"] = np.array(zero.shard)
    train(zero, ps, range(SAVE_AT, STEPS), 0, 1)
    out["world1_params"] = ps.flat.copy()
    alone.Free()
    return out


def trainer_runs(comm):
    """{"trainer_<dp|zero>_params": parameters, "trainer_zero_<key>": this rank's int8 state}."""
    import trainer_common as C

    from fastopt.nn import MLP

    X, y = C.data()
    out = {}
    for zero in (False, True):
        t = C.trainer(
            MLP(C.D, (600,), C.K, dtype="float32", seed=0),  # the kernels compiled above
            "adam",
            distributed=dist.Context(comm),
            zero=zero,
            optimizer_kwargs={"state_dtype": "int8"},
        )
        t.fit(X, y)
        name = "zero" if zero else "dp"
        out[f"trainer_{name}_params"] = t.model.params.flat.copy()
        if zero:
            out.update(arrays_of("trainer_zero_", t.optimizer.state_dict(root=None)))
    return out


def refusals(zero, ps):
    """{message of each refused load, "unchanged_<kind>": parameters and state bit-identical}."""
    out = {}
    for kind in ("layout", "negative"):
        before = ps.flat.copy(), zero.state_dict(root=None)
        sd = zero.state_dict(root=None)
        entry = sd["state"][0]
        if kind == "layout":
            entry["exp_avg_absmax"] = np.ones(BAD_BLOCKS, np.float32)
        else:  # only in rank 1's last block: rank 0 loads its part, then puts its state back
            entry["exp_avg_sq_absmax"][-1] = -1.0
        try:
            zero.load_state_dict(sd)
        except ValueError as exc:
            out[f"refused_{kind}"] = str(exc)
        after = zero.state_dict(root=None)
        same = before[0].tobytes() == ps.flat.tobytes()
        for k, v in before[1]["state"][0].items():
            same = same and np.asarray(v).tobytes() == np.asarray(after["state"][0][k]).tobytes()
        out[f"unchanged_{kind}"] = np.array(same)
    return out


if __name__ == "__main__":
    P.run(main)
