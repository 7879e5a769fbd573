"""Collective checkpoints: ONE :mod:`fastopt.checkpoint` file written and read by the root, a
ZeRO state gathered into (and scattered from) the one-process layout."""

import copy
from collections.abc import Mapping

from .. import checkpoint
from ..paramset import ParamSet
from .agreement import agree_on_outcome
from .collectives import Collectives, raise_everywhere
from .data_parallel import DataParallel
from .mpi import communicator
from .zero import ZeroRedundancyOptimizer


class StateHolder:
    """Stands for an optimizer whose ``state_dict()`` was already taken (e.g. gathered from the
    ZeRO shards), for :func:`fastopt.checkpoint.save`; ``sources``, what each param group's state
    is laid out over (:func:`state_sources`), is recorded as its ParamSet layout."""

    def __init__(self, sd, sources=()):
        self._sd = sd
        self._sources = list(sources)

    def state_dict(self):
        return self._sd

    def sources(self):
        return self._sources


def state_sources(optimizer):
    """What ``optimizer``'s state_dict is laid out over, per param group: the ParamSet of a
    :class:`DataParallel` or :class:`ZeroRedundancyOptimizer` (the full-buffer layout), a plain
    optimizer's ``sources()``, else nothing."""
    if isinstance(optimizer, (DataParallel, ZeroRedundancyOptimizer)):
        return [optimizer.params]
    sources = getattr(optimizer, "sources", None)
    return list(sources()) if callable(sources) else []


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
                optimizer=None if optimizer is None else StateHolder(sd, state_sources(optimizer)),
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

    Names, shapes, dtypes and the optimizer class are checked on the root, and every rank's
    plateau, EMA and generator against the saved states, before anything changes; a failure
    raises on every rank."""
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

    # each rank's own plateau, EMA and generator must take the saved states: tried on copies,
    # and agreed, before anything changes on any rank
    states = {
        what: from_root(ckpt and getattr(ckpt, f"{what}_state")) if obj is not None else None
        for what, obj in (("plateau", plateau), ("ema", ema), ("rng", rng))
    }
    agree_on_outcome(
        comm, "load_checkpoint", lambda: check_local_objects(path, plateau, ema, rng, states)
    )
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.load_state_dict(ckpt.optimizer_state if rank == root else None, root=root)
    elif optimizer is not None:
        optimizer.load_state_dict(from_root(ckpt and ckpt.optimizer_state))
    if rank == root:
        ckpt.restore(params=params)
    Collectives(comm, None).bcast(params.flat, root)
    if plateau is not None:
        plateau.load_state_dict(states["plateau"])
    if ema is not None:
        ema.load_state_dict(states["ema"])
    if rng is not None:
        getattr(rng, "bit_generator", rng).state = states["rng"]
    return from_root(ckpt and ckpt.extra)


def check_local_objects(path, plateau, ema, rng, states):
    """CheckpointError unless this rank's ``plateau``, ``ema`` and ``rng`` take the saved
    ``states`` (each loaded into a copy, the generator's kind compared); nothing changes."""

    def fail(what, exc):
        raise checkpoint.CheckpointError(
            f"cannot restore checkpoint {path!r}: the {what} refused the saved state: {exc}", path
        ) from exc

    tries = []
    if plateau is not None:  # a small object of plain values: tried on a copy
        tries.append(("plateau", lambda: copy.deepcopy(plateau).load_state_dict(states["plateau"])))
    if ema is not None and hasattr(ema, "check_state_dict"):  # fastopt's EMA checks, no write
        tries.append(("ema", lambda: ema.check_state_dict(states["ema"])))
    for what, attempt in tries:
        try:
            attempt()
        except (ValueError, TypeError, KeyError) as exc:
            fail(what, exc)
    if rng is not None:
        bitgen = getattr(rng, "bit_generator", rng)
        saved = states["rng"]
        kind = saved.get("bit_generator") if isinstance(saved, Mapping) else None
        if kind != type(bitgen).__name__:
            raise checkpoint.CheckpointError(
                f"cannot restore checkpoint {path!r}: it holds {kind} RNG state, the generator "
                f"uses {type(bitgen).__name__}",
                path,
            )
        try:
            type(bitgen)().state = copy.deepcopy(saved)
        except (ValueError, TypeError, KeyError) as exc:
            fail("rng", exc)


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
        # the state is laid out over the optimizer's ParamSet, which need not be ``params``
        ckpt.check_optimizer_layout(StateHolder(None, state_sources(optimizer)))
