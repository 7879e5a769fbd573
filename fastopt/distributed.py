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
  ranks skip a non-finite step together.

Parameters start identical: both classes broadcast the ParamSet from ``root`` when constructed;
``debug=True`` compares a checksum of every rank's parameters after each step
(:func:`check_params_equal`).

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`, collective) hold ONE file written
by the root with :mod:`fastopt.checkpoint`. A sharded optimizer state is gathered into the layout
of the same optimizer class built over the whole ParamSet, so it loads with any number of ranks,
or on one process into a plain ``fo.Adam(ps)`` with ``fastopt.load(path).restore(...)``; on load
the root reads the file and scatters each rank its slice (no shared file system needed).

GPU (CuPy) buffers: with a CUDA-aware MPI pass ``cuda_aware=True`` (or set
``FASTOPT_CUDA_AWARE_MPI=1``) and the device buffers go to MPI directly (after a stream
synchronisation); otherwise they are staged through host copies.

mpi4py is imported on first use: :func:`shard_indices`, :func:`shard_bounds` and the rest of
this module import without it.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from collections.abc import Mapping

import numpy as np

from . import checkpoint as _checkpoint
from . import dispatch
from .memory import aligned_zeros
from .optim.base import Optimizer
from .paramset import ParamSet
from .validation import check_bool, check_positive

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


# --------------------------------------------------------------------------- MPI access


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "fastopt.distributed needs mpi4py and an MPI runtime: pip install 'fastopt[mpi]' "
            "(mpi4py + the MPICH wheel), or pip install mpi4py against a system MPI"
        ) from exc
    return MPI


def available():
    """True when mpi4py can be imported (and so an MPI library was found)."""
    try:
        _mpi()
    except ImportError:
        return False
    return True


def _comm(comm):
    return _mpi().COMM_WORLD if comm is None else comm


def _mpi_type(dtype):
    MPI = _mpi()
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return MPI.FLOAT
    if dtype == np.float64:
        return MPI.DOUBLE
    raise TypeError(f"no MPI datatype for {dtype}; parameters are float32 or float64")


def _is_device(a):
    return hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)


def _cuda_aware_default():
    v = os.environ.get("FASTOPT_CUDA_AWARE_MPI", "").strip().lower()
    return v in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- sharding helpers


def shard_sizes(n, world):
    """(counts, displacements): ``n`` elements split into ``world`` contiguous slices whose sizes
    differ by at most one, the larger ones first (rank 0 always has the most)."""
    n, world = _nonneg_int("n", n), _nonneg_int("world", world)
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    base, extra = divmod(n, world)
    counts = [base + (1 if r < extra else 0) for r in range(world)]
    displs = [0] * world
    for r in range(1, world):
        displs[r] = displs[r - 1] + counts[r - 1]
    return counts, displs


def shard_bounds(n, world, rank):
    """(lo, hi): the slice ``[lo, hi)`` of a flat buffer of ``n`` elements owned by ``rank``."""
    counts, displs = shard_sizes(n, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    return displs[rank], displs[rank] + counts[rank]


def shard_indices(n, epoch, seed, rank, world, *, shuffle=True, drop_last=False):
    """The sample indices of ``rank`` for ``epoch``: one permutation of ``range(n)`` drawn from
    ``numpy.random.default_rng([seed, epoch])`` (the same on every rank), dealt round-robin, so
    rank ``r`` gets ``perm[r::world]`` (as ``torch.utils.data.DistributedSampler``).

    Every rank gets the same number of indices, so all ranks take the same number of steps: with
    ``drop_last=False`` the permutation is padded by repeating its start up to a multiple of
    ``world``, with ``drop_last=True`` its tail is dropped. Round-robin dealing makes batch ``k``
    of size ``b`` on every rank together exactly batch ``k`` of size ``world*b`` of the one-process
    order ``shard_indices(n, epoch, seed, 0, 1)`` (when ``world*b`` divides ``n``), so data-parallel
    training matches single-process training with the global batch size.
    """
    n = _nonneg_int("n", n)
    world = _nonneg_int("world", world)
    rank = _nonneg_int("rank", rank)
    if world < 1 or rank >= world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if shuffle:
        perm = np.random.default_rng([_nonneg_int("seed", seed), _nonneg_int("epoch", epoch)])
        perm = perm.permutation(n).astype(np.int64)
    else:
        perm = np.arange(n, dtype=np.int64)
    if drop_last:
        total = (n // world) * world
        perm = perm[:total]
    else:
        total = -(-n // world) * world
        if total != n and n > 0:
            perm = np.resize(perm, total)  # repeats the start
    return perm[rank:total:world].copy()


def _nonneg_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return int(v)


# --------------------------------------------------------------------------- collectives


class CommStats:
    """What the collectives of one object moved: per MPI call name, the number of calls, the
    payload bytes (the size of the buffer each rank hands to the call: the whole gradient for an
    Allreduce or Reduce_scatter, the whole parameter buffer for an Allgather) and the seconds
    spent in them (including host staging of GPU buffers)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.calls = {}
        self.bytes = {}
        self.seconds = {}

    def add(self, name, nbytes, seconds):
        self.calls[name] = self.calls.get(name, 0) + 1
        self.bytes[name] = self.bytes.get(name, 0) + int(nbytes)
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @property
    def total_bytes(self):
        return sum(self.bytes.values())

    @property
    def total_seconds(self):
        return sum(self.seconds.values())

    def as_dict(self):
        return {"calls": dict(self.calls), "bytes": dict(self.bytes), "seconds": dict(self.seconds)}


class _Collectives:
    """The few MPI calls fastopt makes, on NumPy or CuPy 1-D buffers."""

    def __init__(self, comm, cuda_aware):
        self.comm = _comm(comm)
        self.MPI = _mpi()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.cuda_aware = _cuda_aware_default() if cuda_aware is None else bool(cuda_aware)
        self.stats = CommStats()

    def _device_ready(self, buf):
        """``buf`` itself for MPI (after a stream sync) or None when it must be staged."""
        if not _is_device(buf):
            return buf
        import cupy

        cupy.cuda.get_current_stream().synchronize()
        return buf if self.cuda_aware else None

    def allreduce_sum(self, buf, name="Allreduce"):
        t = time.perf_counter()
        direct = self._device_ready(buf)
        typ = _mpi_type(buf.dtype)
        if direct is not None:
            self.comm.Allreduce(self.MPI.IN_PLACE, [direct, typ], op=self.MPI.SUM)
        else:
            host = buf.get()
            self.comm.Allreduce(self.MPI.IN_PLACE, [host, typ], op=self.MPI.SUM)
            buf.set(host)
        self.stats.add(name, buf.nbytes, time.perf_counter() - t)

    def reduce_scatter_sum(self, src, dst, counts):
        """Sum ``src`` over the ranks; this rank receives its ``counts[rank]`` elements in
        ``dst``. Equal counts use ``Reduce_scatter_block``, else the vector form."""
        t = time.perf_counter()
        typ = _mpi_type(src.dtype)
        even = len(set(counts)) == 1
        name = "Reduce_scatter_block" if even else "Reduce_scatter"
        s, d = self._device_ready(src), self._device_ready(dst)
        if s is None or d is None:
            s, d = _host(src), np.empty(dst.size, dst.dtype)
        if even:
            self.comm.Reduce_scatter_block([s, typ], [d, typ], op=self.MPI.SUM)
        else:
            self.comm.Reduce_scatter([s, typ], [d, typ], counts, op=self.MPI.SUM)
        if d is not dst:
            _copy_into(dst, d)
        self.stats.add(name, src.nbytes, time.perf_counter() - t)

    def allgather_inplace(self, buf, counts, displs):
        """Every rank's ``buf[displs[r]:displs[r] + counts[r]]`` to every rank, in place. Equal
        counts use ``Allgather`` (several times faster than ``Allgatherv`` in MPICH)."""
        t = time.perf_counter()
        typ = _mpi_type(buf.dtype)
        even = len(set(counts)) == 1
        name = "Allgather" if even else "Allgatherv"
        direct = self._device_ready(buf)
        target = direct if direct is not None else buf.get()
        if even:
            self.comm.Allgather(self.MPI.IN_PLACE, [target, typ])
        else:
            self.comm.Allgatherv(self.MPI.IN_PLACE, [target, counts, displs, typ])
        if direct is None:
            buf.set(target)
        self.stats.add(name, buf.nbytes, time.perf_counter() - t)

    def bcast(self, buf, root):
        t = time.perf_counter()
        typ = _mpi_type(buf.dtype)
        direct = self._device_ready(buf)
        if direct is not None:
            self.comm.Bcast([direct, typ], root=root)
        else:
            host = buf.get()
            self.comm.Bcast([host, typ], root=root)
            buf.set(host)
        self.stats.add("Bcast", buf.nbytes, time.perf_counter() - t)

    def allreduce_scalars(self, values, name="Allreduce(scalars)"):
        t = time.perf_counter()
        a = np.asarray(values, dtype=np.float64).copy()
        self.comm.Allreduce(self.MPI.IN_PLACE, [a, self.MPI.DOUBLE], op=self.MPI.SUM)
        self.stats.add(name, a.nbytes, time.perf_counter() - t)
        return a

    def all_true(self, flag):
        """Collective AND of a Python bool (a one-int Allreduce with MIN)."""
        a = np.array([1 if flag else 0], dtype=np.int32)
        self.comm.Allreduce(self.MPI.IN_PLACE, [a, self.MPI.INT], op=self.MPI.MIN)
        return bool(a[0])


def _host(a):
    return a.get() if _is_device(a) else a


def _copy_into(dst, host):
    if _is_device(dst):
        dst.set(host)
    else:
        dst[...] = host


# --------------------------------------------------------------------------- parameters


def params_checksum(params):
    """CRC-32 of the bytes of the ParamSet's flat buffer (copied to the host if on a GPU)."""
    flat = params.flat if isinstance(params, ParamSet) else params
    return zlib.crc32(np.ascontiguousarray(_host(flat)).view(np.uint8))


def broadcast_params(params, comm=None, root=0):
    """Copy the root's ParamSet values to every rank (one Bcast of the flat buffer)."""
    if not isinstance(params, ParamSet):
        raise TypeError(f"params must be a ParamSet, got {type(params).__name__}")
    _Collectives(comm, None).bcast(params.flat, root)


def check_params_equal(params, comm=None):
    """Raise RuntimeError on every rank unless all ranks hold bit-identical parameters (compares
    a checksum of the flat buffer: one small allgather)."""
    comm = _comm(comm)
    sums = comm.allgather(params_checksum(params))
    if len(set(sums)) != 1:
        raise RuntimeError(
            "parameters differ across ranks (CRC-32 per rank: "
            + ", ".join(f"{r}: {s:#010x}" for r, s in enumerate(sums))
            + ")"
        )


def _flat_grad(params, grads, what):
    if grads is None:
        return params.grad_flat
    if isinstance(grads, ParamSet):
        grads = grads.grad_flat
    if type(grads) is not type(params.flat):
        raise TypeError(
            f"{what}: gradient is a {type(grads).__name__}, the parameters a "
            f"{type(params.flat).__name__}"
        )
    if grads.dtype != params.dtype:
        raise TypeError(f"{what}: gradient has dtype {grads.dtype}, the parameters {params.dtype}")
    if grads.ndim != 1 or grads.size != params.size:
        raise ValueError(
            f"{what}: gradient must be a flat array of {params.size} elements, got shape "
            f"{grads.shape}"
        )
    if not grads.flags.c_contiguous:
        raise ValueError(f"{what}: gradient is not contiguous")
    return grads


def _grad_scale(grad_scale):
    if grad_scale is None:
        return 1.0
    check_positive("grad_scale", grad_scale)
    return float(grad_scale)


# --------------------------------------------------------------------------- DataParallel


class DataParallel:
    """Average gradients across MPI ranks, then step ``optimizer`` (built over ``params``).

    ``params``: the ParamSet; it is broadcast from ``root`` on construction, so every rank starts
    from the same values. ``optimizer``: any fastopt optimizer over that ParamSet (its
    ``max_grad_norm``, ``max_grad_value`` and ``skip_nonfinite`` apply to the averaged gradient).
    ``debug=True`` checks after every step that all ranks hold identical parameters.

    :meth:`step` = ONE in-place ``Allreduce`` of the flat gradient buffer + the optimizer's
    ``step(grad_scale=grad_scale / world_size)``. Everything else (``param_groups``,
    ``state_dict()``, ``skipped_steps``, ...) is the optimizer's.
    """

    def __init__(self, params, optimizer=None, *, comm=None, root=0, debug=False, cuda_aware=None):
        if not isinstance(params, ParamSet):
            raise TypeError(f"DataParallel needs a ParamSet, got {type(params).__name__}")
        check_bool("debug", debug)
        if optimizer is not None:
            _check_over_paramset(optimizer, params, "DataParallel")
        self.params = params
        self.optimizer = optimizer
        self.debug = debug
        self.root = root
        self._coll = _Collectives(comm, cuda_aware)
        self.comm = self._coll.comm
        self.rank, self.world_size = self._coll.rank, self._coll.size
        self._coll.bcast(params.flat, root)
        if debug:
            check_params_equal(params, self.comm)

    @property
    def stats(self):
        """:class:`CommStats` of this object's collectives."""
        return self._coll.stats

    def allreduce_grads(self, grads=None, *, average=True):
        """Sum (``average``: then divide by the world size, one extra pass) the flat gradient
        buffer over all ranks in place, with one Allreduce. For use without :meth:`step`."""
        buf = _flat_grad(self.params, grads, "allreduce_grads")
        self._coll.allreduce_sum(buf)
        if average and self.world_size > 1:
            buf *= buf.dtype.type(1.0 / self.world_size)
        return buf

    def step(self, grads=None, *, grad_scale=None):
        """Average this step's gradients (``grads``, a flat array, or the ParamSet's gradient
        buffer) over the ranks and update. The gradient buffer holds the SUM afterwards."""
        if self.optimizer is None:
            raise RuntimeError("DataParallel was built without an optimizer")
        gs = _grad_scale(grad_scale)
        buf = _flat_grad(self.params, grads, "DataParallel.step")
        self._coll.allreduce_sum(buf)
        self.optimizer.step(None if grads is None else buf, grad_scale=gs / self.world_size)
        if self.debug:
            check_params_equal(self.params, self.comm)

    def check_params(self):
        """Raise RuntimeError unless every rank holds identical parameters (collective)."""
        check_params_equal(self.params, self.comm)

    def zero_grad(self):
        self.params.zero_grad()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def __getattr__(self, name):
        # param_groups, skipped_steps, last_step_taken, last_grad_norm, ... of the optimizer
        if name.startswith("_") or name in ("optimizer", "params"):
            raise AttributeError(name)
        opt = self.__dict__.get("optimizer")
        if opt is None:
            raise AttributeError(name)
        return getattr(opt, name)


def _check_over_paramset(optimizer, params, who):
    if isinstance(optimizer, (DataParallel, ZeroRedundancyOptimizer)):
        raise TypeError(f"{who} wraps a plain fastopt optimizer, got a {type(optimizer).__name__}")
    groups = getattr(optimizer, "_groups", None)
    if not isinstance(optimizer, Optimizer) or groups is None:
        raise TypeError(f"{who} needs a fastopt optimizer, got {type(optimizer).__name__}")
    if len(groups) != 1 or groups[0]["source"] is not params:
        raise ValueError(
            f"{who}: the optimizer must be built over the ParamSet itself "
            "(e.g. fo.Adam(ps, lr=...)), with one param group"
        )


# --------------------------------------------------------------------------- ZeRO stage 1


class ZeroRedundancyOptimizer:
    """ZeRO stage 1: optimizer state sharded across ranks, parameters and gradients replicated.

    ``ZeroRedundancyOptimizer(ps, fo.Adam, lr=1e-3, max_grad_norm=1.0)`` builds, on each rank,
    ``fo.Adam(ps.flat[lo:hi], lr=1e-3)`` over the rank's slice (:func:`shard_bounds`), so each
    rank keeps ``1/world`` of the state (rounded up to a whole element). Every optimizer class
    works: the updates are elementwise.

    :meth:`step`: ``Reduce_scatter`` (sum) of the flat gradient into a slice-sized buffer; if
    ``max_grad_norm`` or ``skip_nonfinite``, one Allreduce of (slice sum of squares, non-finite
    flag) gives the global norm and the skip decision, the same on every rank; the slice optimizer's
    fused kernel with ``grad_scale = grad_scale / world * clip``; ``Allgather`` of the parameters
    in place (block forms when the world size divides the buffer size, else vector forms). Same
    semantics as the single-process optimizer with the same options (the clip coefficient is
    torch's ``min(1, max_norm / (norm + 1e-6))``), to float rounding: the gradient sum and the
    norm are added up in another order.

    ``param_groups`` is the slice optimizer's (change ``lr`` there identically on every rank).
    :meth:`state_dict` / :meth:`load_state_dict` are collective and use the full-buffer layout of
    ``optimizer_class(ps)``, so states move between world sizes and to single-process runs.
    """

    def __init__(
        self,
        params,
        optimizer_class,
        *,
        comm=None,
        root=0,
        debug=False,
        cuda_aware=None,
        max_grad_norm=None,
        max_grad_value=None,
        skip_nonfinite=False,
        backend=None,
        **defaults,
    ):
        if not isinstance(params, ParamSet):
            raise TypeError(
                f"ZeroRedundancyOptimizer needs a ParamSet, got {type(params).__name__}"
            )
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            raise TypeError(
                "optimizer_class must be a fastopt optimizer class (e.g. fo.Adam), got "
                f"{optimizer_class!r}"
            )
        if max_grad_norm is not None:
            check_positive("max_grad_norm", max_grad_norm)
        check_bool("skip_nonfinite", skip_nonfinite)
        check_bool("debug", debug)
        self.params = params
        self.optimizer_class = optimizer_class
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.debug = debug
        self.root = root
        self.skipped_steps = 0
        self.last_step_taken = None
        self.last_grad_norm = None
        self._coll = _Collectives(comm, cuda_aware)
        self.comm = self._coll.comm
        self.rank, self.world_size = self._coll.rank, self._coll.size
        self.counts, self.displs = shard_sizes(params.size, self.world_size)
        self.lo = self.displs[self.rank]
        self.hi = self.lo + self.counts[self.rank]
        xp = np if isinstance(params.flat, np.ndarray) else __import__("cupy")
        if self.hi > self.lo:
            target = params.flat[self.lo : self.hi]
            self._grad_shard = aligned_zeros(self.hi - self.lo, params.dtype, xp)
        else:
            # fewer elements than ranks: this rank owns nothing; it steps a private 1-element
            # array (gradient 0) so that its step counters stay in line with the others
            target = aligned_zeros(1, params.dtype, xp)
            self._grad_shard = aligned_zeros(1, params.dtype, xp)
        self.local_optimizer = optimizer_class(
            target, max_grad_value=max_grad_value, backend=backend, **defaults
        )
        self._backend_name = backend
        self._backend = None  # of the gradient slice, for its sum of squares; found at first use
        self._coll.bcast(params.flat, root)
        if debug:
            check_params_equal(params, self.comm)

    # ----------------------------------------------------------------- properties
    @property
    def stats(self):
        """:class:`CommStats` of this object's collectives."""
        return self._coll.stats

    @property
    def param_groups(self):
        return self.local_optimizer.param_groups

    @property
    def defaults(self):
        return self.local_optimizer.defaults

    @property
    def max_grad_value(self):
        return self.local_optimizer.max_grad_value

    @property
    def shard(self):
        """(lo, hi): this rank's slice of the flat buffer."""
        return self.lo, self.hi

    def local_state_elements(self):
        """Elements of optimizer state held by this rank (all state arrays together)."""
        if self.hi == self.lo:
            return 0
        return sum(
            int(v.size)
            for entry in self.local_optimizer.state.values()
            for v in entry.values()
            if hasattr(v, "shape")
        )

    # ----------------------------------------------------------------- step
    def zero_grad(self):
        self.params.zero_grad()

    def step(self, grads=None, *, grad_scale=None):
        """One ZeRO-1 step on this rank's gradient (``grads``: a flat array, or the ParamSet's
        gradient buffer); collective."""
        gs = _grad_scale(grad_scale)
        src = _flat_grad(self.params, grads, "ZeroRedundancyOptimizer.step")
        shard = self._grad_shard
        if self.hi > self.lo:
            self._coll.reduce_scatter_sum(src, shard, self.counts)
        else:  # owns nothing: receives nothing, steps its private element with gradient 0
            self._coll.reduce_scatter_sum(src, shard[:0], self.counts)
            shard.fill(0)
        gs /= self.world_size
        if self.max_grad_norm is not None or self.skip_nonfinite:
            if self._backend is None:
                self._backend = dispatch.backend_for([shard], self._backend_name)
            s, finite = self._backend.sumsq_and_finite(shard)
            total = self._coll.allreduce_scalars([s, 0.0 if finite else 1.0], "Allreduce(norm)")
            norm = gs * math.sqrt(total[0])
            self.last_grad_norm = norm
            if self.skip_nonfinite and total[1] != 0:
                self.skipped_steps += 1
                self.last_step_taken = False
                return
            if self.max_grad_norm is not None:
                coef = min(self.max_grad_norm / (norm + 1e-6), 1.0)
                if coef > 0:
                    gs *= coef
                else:  # 0 (norm overflowed) or NaN: as the fused step, g * coef reaches the rule
                    shard *= shard.dtype.type(coef)
        self.local_optimizer.step(shard, grad_scale=gs)
        self._coll.allgather_inplace(self.params.flat, self.counts, self.displs)
        self.last_step_taken = True
        if self.debug:
            check_params_equal(self.params, self.comm)

    # ----------------------------------------------------------------- state
    def state_dict(self, *, root=0):
        """The optimizer state in the full-buffer layout of ``optimizer_class(params)``
        (collective). The root gets the dict, the other ranks ``None``; ``root=None`` gives it to
        every rank (Allgatherv instead of Gatherv)."""
        local = self.local_optimizer.state_dict()
        entry = local["state"].get(0)
        state = {}
        if entry is not None:
            full_entry = {}
            for k in sorted(entry):  # same order on every rank
                v = entry[k]
                if isinstance(v, np.ndarray):
                    mine = np.ascontiguousarray(v.reshape(-1)[: self.hi - self.lo])
                    typ = _mpi_type(mine.dtype)
                    full = np.empty(self.params.size, mine.dtype)
                    spec = [full, self.counts, self.displs, typ]
                    if root is None:
                        self.comm.Allgatherv([mine, typ], spec)
                    else:
                        self.comm.Gatherv([mine, typ], spec if self.rank == root else None, root)
                    full_entry[k] = full
                else:
                    full_entry[k] = v
            state[0] = full_entry
        if root is not None and self.rank != root:
            return None
        return {
            "algorithm": local.get("algorithm", self.optimizer_class.__name__),
            "state": state,
            "param_groups": local["param_groups"],
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict, *, root=0):
        """Load a full-buffer-layout state (from :meth:`state_dict`, a checkpoint, or a plain
        ``optimizer_class(params).state_dict()``), given on ``root`` (other ranks may pass
        ``None``); collective. Each rank takes its slice. Checked on every rank before anything
        changes; if any rank refuses, every rank raises and keeps its previous state."""
        if root is None:
            root = 0
        msg = None
        if self.rank == root:
            try:
                msg = ("ok", *self._skeleton(state_dict))
            except (TypeError, ValueError) as exc:
                msg = ("error", type(exc).__name__, str(exc))
        msg = self.comm.bcast(msg, root=root)
        if msg[0] == "error":
            raise (TypeError if msg[1] == "TypeError" else ValueError)(msg[2])
        _, skeleton, array_names = msg
        local_entry = None
        if skeleton["state"]:
            local_entry = dict(skeleton["state"][0])
            n_local = self.hi - self.lo
            for k in array_names:
                full = state_dict["state"][0][k] if self.rank == root else None
                mine = np.empty(n_local, self.params.dtype)
                typ = _mpi_type(self.params.dtype)
                send = None
                if self.rank == root:
                    full = np.ascontiguousarray(np.asarray(full).reshape(-1), self.params.dtype)
                    send = [full, self.counts, self.displs, typ]
                self.comm.Scatterv(send, [mine, typ], root=root)
                local_entry[k] = mine if n_local > 0 else np.zeros(1, self.params.dtype)
        local_sd = {
            "algorithm": skeleton["algorithm"],
            "state": {0: local_entry} if local_entry is not None else {},
            "param_groups": skeleton["param_groups"],
            "skipped_steps": skeleton["skipped_steps"],
        }
        before = self.local_optimizer.state_dict()
        err = None
        try:
            self.local_optimizer.load_state_dict(local_sd)
        except (TypeError, ValueError) as exc:
            err = exc
        if not self._coll.all_true(err is None):
            if err is None:
                self.local_optimizer.load_state_dict(before)
                raise ValueError("another rank refused the optimizer state; nothing was changed")
            raise err
        self.skipped_steps = int(skeleton["skipped_steps"])

    def _skeleton(self, sd):
        """(state dict with arrays removed, names of the per-element arrays), after checking the
        layout against this optimizer; on the root."""
        if not isinstance(sd, Mapping) or not {"state", "param_groups"} <= set(sd):
            raise ValueError(
                "not an optimizer state_dict: expected keys 'state' and 'param_groups'"
            )
        algo = sd.get("algorithm", self.optimizer_class.__name__)
        if algo != self.optimizer_class.__name__:
            raise ValueError(
                f"state_dict is for {algo}, this optimizer is {self.optimizer_class.__name__}"
            )
        groups = sd["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer 1")
        state = sd["state"]
        if not isinstance(state, Mapping) or set(state) - {0}:
            raise ValueError(f"state_dict['state'] must hold entry 0 only, got {sorted(state)}")
        names, skel_entry = [], None
        if 0 in state:
            entry = state[0]
            if not isinstance(entry, Mapping):
                raise ValueError("state[0] is not a state entry")
            skel_entry = {}
            for k, v in entry.items():
                if hasattr(v, "shape") and getattr(v, "ndim", 0) > 0:
                    a = np.asarray(_host(v))
                    if a.dtype.kind != "f":
                        raise TypeError(f"state[0][{k!r}] has dtype {a.dtype}, expected floats")
                    if a.size != self.params.size:
                        raise ValueError(
                            f"state[0][{k!r}] has {a.size} elements, "
                            f"the ParamSet {self.params.size}"
                        )
                    names.append(k)
                    skel_entry[k] = None
                else:
                    skel_entry[k] = v
            names.sort()
        skeleton = {
            "algorithm": algo,
            "state": {0: skel_entry} if skel_entry is not None else {},
            "param_groups": [dict(groups[0])],
            "skipped_steps": sd.get("skipped_steps", 0),
        }
        return skeleton, names


# --------------------------------------------------------------------------- metrics


def average_metrics(metrics, comm=None, *, weight=1.0):
    """Weighted mean over the ranks of a dict name -> number (e.g. losses, accuracies):
    ``sum_r weight_r * value_r / sum_r weight_r``, with ``weight`` e.g. the rank's sample count.
    One Allreduce of ``len(metrics) + 1`` float64 numbers; every rank gets the result. All ranks
    must pass the same names (checked)."""
    comm = _comm(comm)
    MPI = _mpi()
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict name -> number, got {type(metrics).__name__}")
    names = sorted(metrics)
    if len(set(comm.allgather(tuple(names)))) != 1:
        raise ValueError("average_metrics: the ranks passed different metric names")
    w = float(weight)
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    buf = np.array([w * float(metrics[k]) for k in names] + [w], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, [buf, MPI.DOUBLE], op=MPI.SUM)
    total = buf[-1]
    return {k: (float(buf[i] / total) if total > 0 else math.nan) for i, k in enumerate(names)}


# --------------------------------------------------------------------------- checkpoints


class _StateHolder:
    def __init__(self, sd):
        self._sd = sd

    def state_dict(self):
        return self._sd


def _raise_everywhere(comm, root, exc):
    """Broadcast the root's outcome; every rank raises if the root failed."""
    info = None if exc is None else (type(exc).__name__, str(exc))
    info = comm.bcast(info, root=root)
    if info is None:
        return
    if exc is not None:
        raise exc
    kind = {
        "TypeError": TypeError,
        "CheckpointError": _checkpoint.CheckpointError,
        "FileNotFoundError": FileNotFoundError,
    }.get(info[0], RuntimeError)
    raise kind(f"on rank {root}: {info[1]}")


def save_checkpoint(
    path, *, params, optimizer=None, comm=None, root=0, plateau=None, ema=None, rng=None, extra=None
):
    """Collective: write ONE :mod:`fastopt.checkpoint` file at ``path`` from the root. A
    :class:`ZeroRedundancyOptimizer`'s state is first gathered to the root in the full-buffer
    layout; a :class:`DataParallel` or plain optimizer (replicated) is saved from the root's copy.
    Every rank returns ``path``, or raises if the root could not write."""
    comm = _comm(comm)
    rank = comm.Get_rank()
    sd = None
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        sd = optimizer.state_dict(root=root)
    elif optimizer is not None and rank == root:
        sd = optimizer.state_dict()
    exc = None
    if rank == root:
        try:
            _checkpoint.save(
                path,
                params=params,
                optimizer=None if optimizer is None else _StateHolder(sd),
                plateau=plateau,
                ema=ema,
                rng=rng,
                extra=extra,
            )
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            exc = e
    _raise_everywhere(comm, root, exc)
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
    comm = _comm(comm)
    rank = comm.Get_rank()
    if not isinstance(params, ParamSet):
        raise TypeError(f"params must be a ParamSet, got {type(params).__name__}")
    ckpt, exc = None, None
    if rank == root:
        try:
            ckpt = _checkpoint.load(path)
            _check_checkpoint(ckpt, path, params, optimizer, plateau, ema, rng)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            exc = e
    _raise_everywhere(comm, root, exc)

    def from_root(value):
        return comm.bcast(value if rank == root else None, root=root)

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.load_state_dict(ckpt.optimizer_state if rank == root else None, root=root)
    elif optimizer is not None:
        optimizer.load_state_dict(from_root(ckpt and ckpt.optimizer_state))
    if rank == root:
        ckpt.restore(params=params)
    _Collectives(comm, None).bcast(params.flat, root)
    if plateau is not None:
        plateau.load_state_dict(from_root(ckpt and ckpt.plateau_state))
    if ema is not None:
        ema.load_state_dict(from_root(ckpt and ckpt.ema_state))
    if rng is not None:
        getattr(rng, "bit_generator", rng).state = from_root(ckpt and ckpt.rng_state)
    return from_root(ckpt and ckpt.extra)


def _check_checkpoint(ckpt, path, params, optimizer, plateau, ema, rng):
    def fail(msg):
        raise _checkpoint.CheckpointError(f"cannot restore checkpoint {path!r}: {msg}", path)

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


# --------------------------------------------------------------------------- context


class Context:
    """One communicator and what a training loop asks of it (the trainer's entry point).

    ``ctx = Context()`` (MPI.COMM_WORLD): ``ctx.rank``, ``ctx.world_size``, ``ctx.is_root``,
    ``ctx.shard_indices(n, epoch, seed)``, ``ctx.average(metrics, weight)``,
    ``ctx.wrap(ps, optimizer)`` (DataParallel) or ``ctx.zero(ps, fo.Adam, **kw)`` (ZeRO-1),
    ``ctx.save_checkpoint(...)`` / ``ctx.load_checkpoint(...)`` (collective; only the root writes),
    ``ctx.print(...)`` (root only), ``ctx.barrier()``.
    """

    def __init__(self, comm=None, *, root=0):
        self.comm = _comm(comm)
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
