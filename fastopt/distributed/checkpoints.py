"""Collective checkpoints: ONE :mod:`fastopt.checkpoint` file written and read by the root, a
ZeRO state gathered into (and scattered from) the one-process layout."""

from collections.abc import Mapping

from .. import checkpoint
from ..paramset import ParamSet
from .collectives import Collectives, raise_everywhere
from .mpi import communicator
from .zero import ZeroRedundancyOptimizer


class StateHolder:
    """Stands for an optimizer whose ``state_dict()`` was already taken (e.g. gathered from the
    ZeRO shards), for :func:`fastopt.checkpoint.save`."""

    def __init__(self, sd):
        self._sd = sd

    def state_dict(self):
        return self._sd


def save_checkpoint(
    path, *, params, optimizer=None, comm=None, root=0, plateau=None, ema=None, rng=None, extra=None
):
    """Collective: write ONE :mod:`fastopt.checkpoint` file at ``path`` from the root. A
    :class:`ZeroRedundancyOptimizer`'s state is first gathered to the root in the full-buffer
    layout; a :class:`DataParallel` or plain optimizer (replicated) is saved from the root's copy.
    Every rank returns ``path``, or raises if the root could not write."""
    comm = communicator(comm)
    rank = comm.Get_rank()
    sd = None
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        sd = optimizer.state_dict(root=root)
    elif optimizer is not None and rank == root:
        sd = optimizer.state_dict()
    exc = None
    if rank == root:
        try:
            checkpoint.save(
                path,
                params=params,
                optimizer=None if optimizer is None else StateHolder(sd),
                plateau=plateau,
                ema=ema,
                rng=rng,
                extra=extra,
            )
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            exc = e
    raise_everywhere(comm, root, exc)
    return path


def load_checkpoint(
    path, *, params, optimizer=None, comm=None, root=0, plateau=None, ema=None, rng=None
):
    """Collective: the root reads and verifies ``path`` (only the root needs the file), every rank
    gets the parameters (one Bcast of the flat buffer) and its part of the optimizer state (a
    :class:`ZeroRedundancyOptimizer` its slice, re-sliced for this world size; a replicated
    optimizer the whole state). ``plateau``, ``ema`` and ``rng`` are restored from the root's
    saved state on every rank. Returns the checkpoint's ``extra`` (None if none was saved).

    Names, shapes, dtypes and the optimizer class are checked on the root before anything
    changes; a failure raises on every rank."""
    comm = communicator(comm)
    rank = comm.Get_rank()
    if not isinstance(params, ParamSet):
        raise TypeError(f"params must be a ParamSet, got {type(params).__name__}")
    ckpt, exc = None, None
    if rank == root:
        try:
            ckpt = checkpoint.load(path)
            check_checkpoint(ckpt, path, params, optimizer, plateau, ema, rng)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            exc = e
    raise_everywhere(comm, root, exc)

    def from_root(value):
        return comm.bcast(value if rank == root else None, root=root)

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.load_state_dict(ckpt.optimizer_state if rank == root else None, root=root)
    elif optimizer is not None:
        optimizer.load_state_dict(from_root(ckpt and ckpt.optimizer_state))
    if rank == root:
        ckpt.restore(params=params)
    Collectives(comm, None).bcast(params.flat, root)
    if plateau is not None:
        plateau.load_state_dict(from_root(ckpt and ckpt.plateau_state))
    if ema is not None:
        ema.load_state_dict(from_root(ckpt and ckpt.ema_state))
    if rng is not None:
        getattr(rng, "bit_generator", rng).state = from_root(ckpt and ckpt.rng_state)
    return from_root(ckpt and ckpt.extra)


def check_checkpoint(ckpt, path, params, optimizer, plateau, ema, rng):
    """CheckpointError unless ``ckpt`` can be restored into these objects (on the root, before
    anything changes)."""

    def fail(msg):
        raise checkpoint.CheckpointError(f"cannot restore checkpoint {path!r}: {msg}", path)

    saved = ckpt.params
    if list(saved) != params.names:
        fail(f"parameter names differ: checkpoint {list(saved)}, ParamSet {params.names}")
    for name, shape in params.shapes.items():
        a = saved[name]
        if tuple(a.shape) != tuple(shape) or a.dtype != params.dtype:
            fail(
                f"{name!r} is {a.dtype}{tuple(a.shape)} in the checkpoint, "
                f"{params.dtype}{tuple(shape)} here"
            )
    for what, obj, value in (
        ("optimizer", optimizer, ckpt.optimizer_state),
        ("plateau", plateau, ckpt.plateau_state),
        ("ema", ema, ckpt.ema_state),
        ("rng", rng, ckpt.rng_state),
    ):
        if obj is not None and value is None:
            fail(f"it holds no {what} state")
    if optimizer is not None:
        if isinstance(optimizer, ZeroRedundancyOptimizer):
            want = optimizer.optimizer_class.__name__
        else:
            want = type(getattr(optimizer, "optimizer", optimizer)).__name__
        got = (
            ckpt.optimizer_state.get("algorithm")
            if isinstance(ckpt.optimizer_state, Mapping)
            else None
        )
        if got != want:
            fail(f"it holds {got} optimizer state, the optimizer is {want}")
