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

    for name, call in [
        ("other_lr", other_lr),
        ("other_layout", other_layout),
        ("not_a_paramset", not_a_paramset),
        ("other_class", other_class),
        ("other_clip", other_clip),
        ("bad_everywhere", bad_everywhere),
    ]:
        info[name] = outcome(call)

    # ---- debug steps: one rank's bad or different step arguments, nothing written anywhere
    for mode in ("dp", "zero"):
        info.update(debug_step_cases(comm, mode, last))
    (out / f"agree_rank{comm.rank}.json").write_text(json.dumps(info))


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
