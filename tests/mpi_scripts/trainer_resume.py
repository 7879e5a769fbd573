"""mpiexec -n N python trainer_resume.py OUTDIR: resume ``OUTDIR/resume.fo`` (written by
``trainer_fit.py`` after 2 epochs, ZeRO-1 on another number of ranks) on N ranks, with ZeRO-1
and with plain data parallelism: right after loading (``fit(..., epochs=2)`` trains no epoch)
record the parameters and the optimizer state, then train on to 4 epochs. Writes
``resumed_rank<r>.npz`` and ``resumed_rank<r>.json``.
"""

import json

import numpy as np
import trainer_common as C


def main(comm, out):
    r = comm.rank
    X, y = C.data()
    arrays, info = {}, {"world": comm.size}
    for zero in (True, False):
        tag = "zero" if zero else "dp"
        t = C.trainer(C.model(seed=100 + r), "adam", distributed=True, zero=zero)
        t.fit(X, y, resume=out / "resume.fo", epochs=2)  # loads, trains nothing
        sd = t.optimizer.state_dict(root=None) if zero else t.optimizer.state_dict()
        for k, v in sd["state"][0].items():
            arrays[f"{tag}/loaded_state/{k}"] = np.asarray(v)
        arrays[f"{tag}/loaded_flat"] = t.model.params.flat.copy()
        t.fit(X, y, epochs=4)
        arrays[f"{tag}/final_flat"] = t.model.params.flat.copy()
        info[tag] = {
            "history": {k: list(v) for k, v in t.history.items()},
            "global_step": t.global_step,
            "epoch": t.epoch,
        }
    np.savez(out / f"resumed_rank{r}.npz", **arrays)
    (out / f"resumed_rank{r}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    import problem as P

    P.run(main)
