"""mpiexec -n N python agreement.py OUTDIR: one rank's different or bad argument raises on every
rank instead of leaving the others waiting in a collective.

Each case runs on every rank with the LAST rank passing something else; the script records per
case the exception each rank raised (type and message), and whether parameters and optimizer
state are bit-identical to what they were before the call. Writes ``agree_rank<r>.json``.
Before ``fastopt.distributed.agreement`` the construction cases hung (a Bcast of another size,
or a rank that raised before it) and the debug step cases hung in the Reduce_scatter.
"""

import json

import numpy as np
import problem as P

import fastopt as fo
from fastopt import distributed as dist


def outcome(call):
    try:
        call()
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return None


def main(comm, out):
    last = comm.rank == comm.size - 1
    info = {}

    # ---- construction: different arguments on the last rank
    def other_lr():
        ps = P.init_params()
        dist.DataParallel(ps, fo.SGD(ps, lr=0.2 if last else 0.1), comm=comm)

    def other_layout():
        ps = P.init_params(pad=4 if last else 0)
        dist.ZeroRedundancyOptimizer(ps, fo.Adam, lr=0.1, comm=comm)

    def not_a_paramset():
        ps = P.init_params()
        dist.ZeroRedundancyOptimizer(ps.flat if last else ps, fo.Adam, lr=0.1, comm=comm)

    def other_class():
        ps = P.init_params()
        dist.ZeroRedundancyOptimizer(ps, fo.AdamW if last else fo.Adam, lr=0.1, comm=comm)

    def other_clip():
        ps = P.init_params()
        clip = 2.0 if last else 1.0
        dist.ZeroRedundancyOptimizer(ps, fo.Adam, lr=0.1, max_grad_norm=clip, comm=comm)

    def bad_everywhere():  # the same bad value on every rank: the same error everywhere
        ps = P.init_params()
        dist.ZeroRedundancyOptimizer(ps, fo.Adam, lr=-1.0, comm=comm)

    def bool_as_int():  # 1 == True in Python, but skip_nonfinite must be a bool
        ps = P.init_params()
        flag = 1 if last else True
        dist.ZeroRedundancyOptimizer(ps, fo.Adam, lr=0.1, skip_nonfinite=flag, comm=comm)

    def seed_as_float():
        ps = P.init_params()
        kw = {"stochastic_rounding": True, "seed": 3.0 if last else 3}
        dist.ZeroRedundancyOptimizer(ps, fo.Adam, lr=0.1, comm=comm, **kw)

    def optimizer_of_another_paramset():  # the same layout, but not this rank's ParamSet
        ps = P.init_params()
        dist.DataParallel(ps, fo.SGD(P.init_params() if last else ps, lr=0.1), comm=comm)

    for name, call in [
        ("bool_as_int", bool_as_int),
        ("seed_as_float", seed_as_float),
        ("optimizer_of_another_paramset", optimizer_of_another_paramset),
        ("other_lr", other_lr),
        ("other_layout", other_layout),
        ("not_a_paramset", not_a_paramset),
        ("other_class", other_class),
        ("other_clip", other_clip),
        ("bad_everywhere", bad_everywhere),
    ]:
        info[name] = outcome(call)

    # ---- a checkpoint whose RNG or EMA state a rank's objects cannot take: refused everywhere
    info.update(checkpoint_cases(comm, out))

    # ---- debug steps: one rank's bad or different step arguments, nothing written anywhere
    for mode in ("dp", "zero"):
        info.update(debug_step_cases(comm, mode, last))
    (out / f"agree_rank{comm.rank}.json").write_text(json.dumps(info))


def checkpoint_cases(comm, out):
    ps = P.init_params()
    zero = dist.ZeroRedundancyOptimizer(ps, fo.Adam, lr=0.05, comm=comm)
    X, Y = P.data()
    P.set_grad(ps, X, Y, P.batch(0, 4 * comm.size, comm.rank, comm.size))
    zero.step()
    path = out / "agree.fo"
    ema = fo.EMA(ps)
    dist.save_checkpoint(
        path, params=ps, optimizer=zero, ema=ema, rng=np.random.default_rng(1), comm=comm
    )
    zero.step()
    before = ps.flat.copy(), zero.state_dict(root=None)["state"][0]["exp_avg"].copy()
    info = {}
    for case, kw in (
        ("philox_rng", {"rng": np.random.Generator(np.random.Philox(0))}),
        ("ema_of_one_tensor", {"ema": fo.EMA([ps["W"]])}),
    ):
        result = outcome(
            lambda kw=kw: dist.load_checkpoint(path, params=ps, optimizer=zero, comm=comm, **kw)
        )
        after = ps.flat.copy(), zero.state_dict(root=None)["state"][0]["exp_avg"].copy()
        unchanged = all(np.array_equal(a, b) for a, b in zip(before, after))
        info[f"ckpt_{case}"] = {"raised": result, "unchanged": unchanged}
    return info


def debug_step_cases(comm, mode, last):
    X, Y = P.data()
    ps = P.init_params()
    if mode == "dp":
        opt = dist.DataParallel(ps, fo.Adam(ps, lr=0.05), comm=comm, debug=True)
    else:
        opt = dist.ZeroRedundancyOptimizer(ps, fo.Adam, lr=0.05, comm=comm, debug=True)
    P.set_grad(ps, X, Y, P.batch(0, 4 * comm.size, comm.rank, comm.size))
    opt.step()  # a good step first: state exists

    def snapshot():
        sd = opt.state_dict() if mode == "dp" else opt.state_dict(root=None)
        return ps.flat.copy(), ps.grad_flat.copy(), sd["state"][0]["exp_avg"].copy()

    def lr_changed():
        if last:
            opt.param_groups[0]["lr"] = 0.5
        opt.step()

    cases = {
        "grad_scale": lambda: opt.step(grad_scale=2.0 if last else 1.0),
        "short_grad": lambda: opt.step(np.zeros(ps.size - 1) if last else None),
        "lr_changed": lr_changed,
    }
    info = {}
    for name, call in cases.items():
        before = snapshot()
        result = outcome(call)
        opt.param_groups[0]["lr"] = 0.05
        after = snapshot()
        unchanged = all(np.array_equal(a, b) for a, b in zip(before, after))
        info[f"{mode}_{name}"] = {"raised": result, "unchanged": unchanged}
    opt.step()  # and the ranks still step together afterwards
    info[f"{mode}_after"] = float(ps.flat.sum())
    return info


if __name__ == "__main__":
    P.run(main)
