"""The communicator and what a training loop asks of it, in one object."""

from .checkpoints import load_checkpoint, save_checkpoint
from .collectives import average_metrics
from .data_parallel import DataParallel
from .mpi import communicator
from .sharding import shard_indices
from .zero import ZeroRedundancyOptimizer


class Context:
    """One communicator and what a training loop asks of it (the trainer's entry point).

    ``ctx = Context()`` (MPI.COMM_WORLD): ``ctx.rank``, ``ctx.world_size``, ``ctx.is_root``,
    ``ctx.shard_indices(n, epoch, seed)``, ``ctx.average(metrics, weight)``,
    ``ctx.wrap(ps, optimizer)`` (DataParallel) or ``ctx.zero(ps, fo.Adam, **kw)`` (ZeRO-1),
    ``ctx.save_checkpoint(...)`` / ``ctx.load_checkpoint(...)`` (collective; only the root writes),
    ``ctx.print(...)`` (root only), ``ctx.barrier()``.
    """

    def __init__(self, comm=None, *, root=0):
        self.comm = communicator(comm)
        self.root = root
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()

    @property
    def is_root(self):
        return self.rank == self.root

    def shard_indices(self, n, epoch, seed, *, shuffle=True, drop_last=False):
        return shard_indices(
            n, epoch, seed, self.rank, self.world_size, shuffle=shuffle, drop_last=drop_last
        )

    def average(self, metrics, weight=1.0):
        return average_metrics(metrics, self.comm, weight=weight)

    def wrap(self, params, optimizer, **kw):
        return DataParallel(params, optimizer, comm=self.comm, root=self.root, **kw)

    def zero(self, params, optimizer_class, **kw):
        return ZeroRedundancyOptimizer(
            params, optimizer_class, comm=self.comm, root=self.root, **kw
        )

    def save_checkpoint(self, path, **kw):
        return save_checkpoint(path, comm=self.comm, root=self.root, **kw)

    def load_checkpoint(self, path, **kw):
        return load_checkpoint(path, comm=self.comm, root=self.root, **kw)

    def print(self, *args, **kw):
        if self.is_root:
            print(*args, **kw)

    def barrier(self):
        self.comm.Barrier()
