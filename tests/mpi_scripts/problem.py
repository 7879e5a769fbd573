"""A small least-squares model with a hand-written gradient, shared by the MPI scripts and by
``tests/test_distributed.py`` (which computes the single-process references with it).

Parameters ``W`` (5x3), ``b`` (3,) and a scalar ``s``: 19 elements, so shards are uneven on 2
ranks (10 + 9) and on 3 ranks (7 + 6 + 6). Loss over a batch ``B`` of rows of ``X``:
``mean_i 0.5 * ||X_i W + b - Y_i||^2 + 0.5 * C * s^2``.
"""

import numpy as np

import fastopt as fo
from fastopt.distributed import shard_indices

N_SAMPLES = 48
D_IN, D_OUT = 5, 3
C_S = 0.7
SEED = 1234


def data(dtype=np.float64):
    rng = np.random.default_rng(7)
    X = rng.standard_normal((N_SAMPLES, D_IN))
    W_true = rng.standard_normal((D_IN, D_OUT))
    Y = X @ W_true + 0.5 + 0.1 * rng.standard_normal((N_SAMPLES, D_OUT))
    return X.astype(dtype), Y.astype(dtype)


def init_params(dtype=np.float64, seed=0, pad=0):
    """The parameters; ``pad`` > 0 adds a padding parameter (gradient always 0) of that size."""
    rng = np.random.default_rng(seed)
    params = {
        "W": rng.standard_normal((D_IN, D_OUT)).astype(dtype),
        "b": np.zeros(D_OUT, dtype),
        "s": np.array(1.5, dtype),
    }
    if pad:
        params["pad"] = np.zeros(pad, dtype)
    return fo.ParamSet(params)


def set_grad(ps, X, Y, idx):
    """The gradient of the mean loss over rows ``idx``, written into ``ps.grads``."""
    Xb, Yb = X[idx], Y[idx]
    r = Xb @ ps["W"] + ps["b"] - Yb
    ps.grads["W"][...] = Xb.T @ r / len(idx)
    ps.grads["b"][...] = r.mean(axis=0)
    ps.grads["s"][...] = C_S * ps["s"]


def batch(step, global_batch, rank, world, seed=SEED):
    """Rows of this rank's part of global step ``step`` (batches of ``global_batch`` over the
    epoch-shuffled data, dealt by ``shard_indices``)."""
    per_epoch = N_SAMPLES // global_batch
    epoch, k = divmod(step, per_epoch)
    b = global_batch // world
    idx = shard_indices(N_SAMPLES, epoch, seed, rank, world)
    return idx[k * b : (k + 1) * b]


OPTIMIZERS = {
    "sgd": (fo.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": (fo.Adam, {"lr": 0.05}),
}


def all_optimizer_classes():
    """name -> (class, kwargs): every optimizer of fastopt, with settings that move parameters."""
    out = {}
    for name in fo.optim.__all__:
        cls = getattr(fo.optim, name)
        if name == "Optimizer" or not isinstance(cls, type) or cls.requires_closure:
            continue  # L-BFGS steps with a closure: tests/test_distributed.py checks its refusal
        kw = {"lr": 0.01}
        if getattr(cls, "matrices_only", False):  # Muon: its AdamW fallback for the vectors
            kw["muon_params"] = "hidden"
        out[name] = (cls, kw)
    return out


class CountingComm:
    """An mpi4py communicator that counts its collectives, so the tests check the MPI calls a
    step makes where they happen, not fastopt's own counter.

    :attr:`counts`: calls per buffer collective (the capitalised calls in :data:`COUNTED`).
    :attr:`sizes`: per buffer collective, ``{elements: calls}``, the elements of the buffer the
    call carried (the first buffer argument that is not ``MPI.IN_PLACE``: the whole gradient of
    an in-place Allreduce or of a Reduce_scatter, the whole parameter buffer of an in-place
    Allgather(v) or a Bcast). :attr:`objects`: calls per pickled-object collective (lowercase)
    and Barrier. fastopt accepts any object with mpi4py's methods as a communicator
    (``fastopt.distributed.mpi.communicator`` does not type-check it), so this wrapper goes
    wherever a ``comm`` does, ``fastopt.distributed.Context(CountingComm(comm))`` included.
    """

    COUNTED = (
        "Allreduce", "Reduce_scatter", "Reduce_scatter_block", "Allgather", "Allgatherv",
        "Bcast", "Gatherv", "Scatterv",
    )  # fmt: skip
    OBJECT_COUNTED = (
        "allreduce", "bcast", "allgather", "gather", "scatter", "reduce", "alltoall", "Barrier",
    )  # fmt: skip

    def __init__(self, comm):
        self._comm = comm
        self.reset()

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name in self.COUNTED:

            def counted(*args, **kwargs):
                self.counts[name] = self.counts.get(name, 0) + 1
                per_size = self.sizes.setdefault(name, {})
                n = _buffer_elements(args)
                per_size[n] = per_size.get(n, 0) + 1
                return attr(*args, **kwargs)

            return counted
        if name in self.OBJECT_COUNTED:

            def counted_object(*args, **kwargs):
                self.objects[name] = self.objects.get(name, 0) + 1
                return attr(*args, **kwargs)

            return counted_object
        return attr

    def reset(self):
        self.counts = {}
        self.sizes = {}
        self.objects = {}

    def split(self, n):
        """``{name: {"full": calls carrying ``n`` elements, "small": calls carrying fewer}}``
        (a buffer larger than ``n`` counts as "large"; there should be none)."""
        out = {}
        for name, per_size in self.sizes.items():
            row = out.setdefault(name, {"full": 0, "small": 0})
            for size, calls in per_size.items():
                key = "full" if size == n else "small" if size < n else "large"
                row[key] = row.get(key, 0) + calls
        return out


def _buffer_elements(args):
    """Elements of the first buffer among mpi4py call arguments (``[array, ...]`` or an array;
    ``MPI.IN_PLACE`` and None skipped); -1 when there is none."""
    for a in args:
        buf = a[0] if isinstance(a, (list, tuple)) and a else a
        if hasattr(buf, "size") and hasattr(buf, "dtype"):
            return int(buf.size)
    return -1


def run(main):
    """Run ``main(comm, outdir, *args)``; on an exception print it and abort every rank, so a
    failure on one rank cannot leave the others waiting in a collective until the timeout."""
    import pathlib
    import sys
    import traceback

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        main(comm, pathlib.Path(sys.argv[1]), *sys.argv[2:])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
