"""mpiexec -n N python trainer_fit.py OUTDIR: ``Trainer(distributed=True)`` runs.

Every rank builds its model from a DIFFERENT seed (its rank): the Trainer must broadcast rank 0's.
Writes ``fit_rank<r>.json`` (histories, meta, collective counts, dropout draws, ...) and
``fit_rank<r>.npz`` (final parameters and buffers per run); the root alone writes the history
and checkpoint files, although every rank is given its own path (``*_rank<r>.*``).

Runs: each scenario of ``trainer_common`` with data parallelism and (sgd, adam) with ZeRO-1 for
2 epochs, over a ``problem.CountingComm`` (the MPI calls counted at the communicator, split into
parameter-sized and small buffers, at construction and in ``fit``); early stopping + plateau
with ``verbose=1`` (only rank 0 prints); batch norm + dropout; a Ctrl-C on the last rank only
(acted on at the end of the epoch, and after 16 steps within a longer one); ZeRO-1 adam saving
``resume.fo`` after 2 epochs and then going on to 4 epochs (the uninterrupted run that
``trainer_resume.py`` resumes with another world).
"""

import json
import os
import signal

import numpy as np
import problem as P
import trainer_common as C

from fastopt import distributed as dist
from fastopt.trainer import Trainer


class InterruptOnLastRank(Trainer):
    """The last rank alone gets a SIGINT (as from Ctrl-C) during global step ``AT``."""

    AT = 3

    def reduce_gradients(self):
        if self.rank == self.world_size - 1 and self.global_step == self.AT:
            os.kill(os.getpid(), signal.SIGINT)
        super().reduce_gradients()


def main(comm, out):
    r, world = comm.rank, comm.size
    X, y = C.data()
    info, arrays = {"world": world, "runs": {}}, {}

    def record(key, t, **more):
        h = t.history
        info["runs"][key] = {
            "history": {k: list(v) for k, v in h.items()},
            "meta": h.meta,
            "calls": t.comm_stats.calls,
            "global_step": t.global_step,
            **more,
        }
        for k, v in t.model.arrays().items():
            arrays[f"{key}/{k}"] = np.array(v)
        arrays[f"{key}/flat"] = t.model.params.flat.copy()

    def at_comm(counting, n):
        return {"buffers": counting.split(n), "objects": dict(counting.objects)}

    # ---- every scenario, data parallel and ZeRO-1, against one process (in the test); the MPI
    # calls counted at the communicator, at construction and in fit
    for name in C.SCENARIOS:
        for zero in (False, True) if name in C.ZERO_SCENARIOS else (False,):
            counting = P.CountingComm(comm)
            m = C.model(seed=r)
            t = C.trainer(m, name, distributed=dist.Context(counting), zero=zero)
            built = at_comm(counting, m.params.size)
            counting.reset()
            t.fit(X, y)
            fitted = at_comm(counting, m.params.size)
            record(f"{name}-{'zero' if zero else 'dp'}", t, comm_built=built, comm_fit=fitted)

    # ---- early stopping + plateau, verbose; files only from the root
    t = C.trainer(
        C.model(seed=r), "adam", distributed=True, zero=True, epochs=C.STOPPING_EPOCHS,
        verbose=1, history_path=str(out / f"hist_rank{r}.json"),
        checkpoint=str(out / f"stop_rank{r}.fo"), **C.STOPPING,
    )  # fmt: skip
    t.fit(X, y)
    record("stopping", t, lr=t.optimizer.param_groups[0]["lr"])

    # ---- batch norm + dropout: identical parameters and buffers, per-rank dropout masks
    t = C.trainer(C.model(seed=r, batch_norm=True, dropout=0.2), "adam", distributed=True)
    t.fit(X, y)
    record("bn_dropout", t, next_uniform=float(t.rng.random()))

    # ---- Ctrl-C on one rank only: every rank stops together, the root saves
    t = C.trainer(
        C.model(seed=r), "sgd", cls=InterruptOnLastRank, distributed=True, epochs=4,
        on_interrupt="stop", checkpoint=str(out / f"intr_rank{r}.fo"),
    )  # fmt: skip
    t.fit(X, y)
    record("interrupt", t, interrupted=t.interrupted)
    # batch 4: 20 steps per epoch, the ranks agree after step 16 of the first epoch
    t = C.trainer(
        C.model(seed=r), "sgd", cls=InterruptOnLastRank, distributed=True, epochs=4,
        batch_size=4, on_interrupt="stop",
    )  # fmt: skip
    t.fit(X, y)
    record("interrupt_mid_epoch", t, interrupted=t.interrupted)

    # ---- the checkpoint that trainer_resume.py resumes with another number of ranks
    t = C.trainer(
        C.model(seed=r), "adam", distributed=True, zero=True,
        checkpoint=str(out / "resume.fo") if r == 0 else str(out / f"resume_rank{r}.fo"),
    )  # fmt: skip
    t.fit(X, y)  # 2 epochs; saved at the end
    sd = t.optimizer.state_dict(root=None)["state"][0]  # gathered, on every rank
    for k, v in sd.items():
        arrays[f"saved_state/{k}"] = np.asarray(v)
    arrays["saved_flat"] = t.model.params.flat.copy()
    t.checkpoint_path = None
    t.fit(X, y, epochs=4)  # uninterrupted continuation
    record("uninterrupted", t)

    np.savez(out / f"fit_rank{r}.npz", **arrays)
    (out / f"fit_rank{r}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    P.run(main)
