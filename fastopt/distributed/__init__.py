"""Data-parallel training over MPI (mpi4py): gradient averaging and ZeRO-1 sharded optimizer state.

::

    from fastopt import distributed as dist
    ps = fo.ParamSet({"w": w, "b": b})

    # plain data parallelism: every rank holds the whole optimizer state
    opt = dist.DataParallel(ps, fo.Adam(ps, lr=1e-3, max_grad_norm=1.0))
    # or ZeRO stage 1: each rank keeps the optimizer state of 1/world of the flat buffer
    opt = dist.ZeroRedundancyOptimizer(ps, fo.Adam, lr=1e-3, max_grad_norm=1.0)

    for batch in my_shard_of_the_data:          # dist.shard_indices(n, epoch, seed, rank, world)
        ps.grads["w"][...] = ...                # this rank's gradient (mean over its batch)
        opt.step()                              # gradients averaged over the ranks, then updated

Communication per step, on the ParamSet's flat buffers (never one call per parameter):

- :class:`DataParallel`: ONE ``Allreduce(MPI.IN_PLACE, grad_flat, SUM)``; the division by the
  world size is folded into the update kernel (``grad_scale``), so averaging costs no extra pass.
  Clipping and non-finite skipping need no more messages: after the Allreduce every rank holds
  the same gradient (a NaN anywhere becomes a NaN everywhere), so every rank computes the same
  norm and takes the same decision.
- :class:`ZeroRedundancyOptimizer` (ZeRO stage 1): rank ``r`` owns the contiguous slice
  ``flat[lo_r:hi_r]`` (:func:`shard_bounds`: sizes differ by at most one element, so no padded
  copy is needed). ONE ``Reduce_scatter`` of the gradient buffer into a shard-sized buffer, one
  fused kernel call over the rank's slice (an ordinary fastopt optimizer built over the view
  ``flat[lo:hi]``, so it keeps state only for its slice), ONE ``Allgather(MPI.IN_PLACE, flat)``
  of the parameters. When the world size divides the buffer size these are the block forms
  ``Reduce_scatter_block`` and ``Allgather``; otherwise the vector forms ``Reduce_scatter`` and
  ``Allgatherv``, which MPICH runs slower (``Allgatherv`` several times, measured on one node): add a
  small padding parameter to the ParamSet to make its size a multiple of the world size. With
  ``max_grad_norm`` or ``skip_nonfinite``, one extra Allreduce of two float64 numbers (the
  slice's sum of squares and non-finite flag), so every rank clips by the global norm and all
  ranks skip a non-finite step together. The per-tensor optimizers (LAMB, LARS, NovoGrad,
  Adafactor, Muon) are sharded on tensor boundaries (``sharding.segment_shards``: each rank a
  contiguous run of whole tensors, over a ParamSet view of them), so no reduction is cut; the
  collectives are the same vector forms. 8-bit state (``state_dtype="int8"``) is sharded on
  its 256-element blocks (``sharding.block_shard_sizes``; the block forms need a size that is
  a multiple of 256 times the world size).

Parameters start identical: both classes broadcast the ParamSet from ``root`` when constructed;
``debug=True`` compares a checksum of every rank's parameters after each step
(:func:`check_params_equal`). Before the broadcast both compare their arguments over the ranks
(``agreement``: one small allgather), so a rank's other layout or hyperparameter raises the same
ValueError on every rank instead of hanging the others; with ``debug=True`` each step's
arguments and checks are compared too, before its collectives.

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`, collective) hold ONE file written
by the root with :mod:`fastopt.checkpoint`. A sharded optimizer state is gathered into the layout
of the same optimizer class built over the whole ParamSet, so it loads with any number of ranks,
or on one process into a plain ``fo.Adam(ps)`` with ``fastopt.load(path).restore(...)``; on load
the root reads the file and scatters each rank its slice (no shared file system needed).

GPU (CuPy) buffers: with a CUDA-aware MPI pass ``cuda_aware=True`` (or set
``FASTOPT_CUDA_AWARE_MPI=1``) and the device buffers go to MPI directly (after a stream
synchronisation); otherwise they are staged through host copies.

mpi4py is imported on first use: :func:`shard_indices`, :func:`shard_bounds` and the rest of
this package import without it.

Modules: ``mpi`` (mpi4py access), ``sharding`` (who holds what), ``agreement`` (what the
ranks compare before a collective), ``collectives`` (the MPI calls,
host staging, statistics, checksums, metric averaging), ``data_parallel``, ``zero`` (ZeRO-1),
``checkpoints`` (collective save/load), ``context`` (:class:`Context`) and ``trainer_strategy``
(what :class:`fastopt.trainer.Trainer` does differently with ``distributed=True``).
"""

from .checkpoints import load_checkpoint, save_checkpoint
from .collectives import (
    CommStats,
    average_metrics,
    broadcast_params,
    check_params_equal,
    params_checksum,
)
from .context import Context
from .data_parallel import DataParallel
from .mpi import available
from .sharding import shard_bounds, shard_indices, shard_sizes
from .zero import ZeroRedundancyOptimizer

__all__ = [
    "CommStats",
    "Context",
    "DataParallel",
    "ZeroRedundancyOptimizer",
    "available",
    "average_metrics",
    "broadcast_params",
    "check_params_equal",
    "load_checkpoint",
    "params_checksum",
    "save_checkpoint",
    "shard_bounds",
    "shard_indices",
    "shard_sizes",
]
