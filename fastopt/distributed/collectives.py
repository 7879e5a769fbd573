"""The MPI collectives fastopt makes on flat buffers (with host staging of device buffers), their
statistics, and the small agreements built on them: parameter broadcast and checksum, metric
averaging, one rank's outcome raised everywhere."""

import math
import time
import zlib
from collections.abc import Mapping

import numpy as np

from ..arrays import import_cupy, is_device_array, to_host
from ..checkpoint import CheckpointError
from ..paramset import ParamSet
from .mpi import communicator, cuda_aware_default, import_mpi, mpi_move_type, mpi_type


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


class Collectives:
    """The few MPI calls fastopt makes, on NumPy or CuPy 1-D buffers, counted in :attr:`stats`.

    Device (CuPy) buffers: the current stream is synchronised first; then, with a CUDA-aware MPI
    (``cuda_aware=True`` or ``FASTOPT_CUDA_AWARE_MPI=1``), the device buffer goes to MPI as it is,
    otherwise a host copy does and the result is copied back (host staging)."""

    def __init__(self, comm, cuda_aware):
        self.comm = communicator(comm)
        self.MPI = import_mpi()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.cuda_aware = cuda_aware_default() if cuda_aware is None else bool(cuda_aware)
        self.stats = CommStats()

    def start_from_root(self, params, root, debug):
        """Give every rank the root's ParamSet values (one Bcast of the flat buffer); with
        ``debug``, then check that all ranks hold the same bits (:func:`check_params_equal`)."""
        self.bcast(params.flat, root)
        if debug:
            check_params_equal(params, self.comm)

    def _device_ready(self, buf):
        """``buf`` itself for MPI (after a stream sync) or None when it must be staged."""
        if not is_device_array(buf):
            return buf
        import_cupy("MPI on device buffers").cuda.get_current_stream().synchronize()
        return buf if self.cuda_aware else None

    def allreduce_sum(self, buf, name="Allreduce"):
        t = time.perf_counter()
        direct = self._device_ready(buf)
        typ = mpi_type(buf.dtype)
        if direct is not None:
            self.comm.Allreduce(self.MPI.IN_PLACE, [direct, typ], op=self.MPI.SUM)
        else:
            host = to_host(buf)
            self.comm.Allreduce(self.MPI.IN_PLACE, [host, typ], op=self.MPI.SUM)
            copy_into(buf, host)
        self.stats.add(name, buf.nbytes, time.perf_counter() - t)

    def reduce_scatter_sum(self, src, dst, counts):
        """Sum ``src`` over the ranks; this rank receives its ``counts[rank]`` elements in
        ``dst``. Equal counts use ``Reduce_scatter_block``, else the vector form."""
        t = time.perf_counter()
        typ = mpi_type(src.dtype)
        even = len(set(counts)) == 1
        name = "Reduce_scatter_block" if even else "Reduce_scatter"
        s, d = self._device_ready(src), self._device_ready(dst)
        if s is None or d is None:
            s, d = to_host(src), np.empty(dst.size, dst.dtype)
        if even:
            self.comm.Reduce_scatter_block([s, typ], [d, typ], op=self.MPI.SUM)
        else:
            self.comm.Reduce_scatter([s, typ], [d, typ], counts, op=self.MPI.SUM)
        if d is not dst:
            copy_into(dst, d)
        self.stats.add(name, src.nbytes, time.perf_counter() - t)

    def allgather_inplace(self, buf, counts, displs):
        """Every rank's ``buf[displs[r]:displs[r] + counts[r]]`` to every rank, in place. Equal
        counts use ``Allgather`` (several times faster than ``Allgatherv`` in MPICH)."""
        t = time.perf_counter()
        typ = mpi_move_type(buf.dtype)
        even = len(set(counts)) == 1
        name = "Allgather" if even else "Allgatherv"
        direct = self._device_ready(buf)
        target = direct if direct is not None else to_host(buf)
        if even:
            self.comm.Allgather(self.MPI.IN_PLACE, [target, typ])
        else:
            self.comm.Allgatherv(self.MPI.IN_PLACE, [target, counts, displs, typ])
        if direct is None:
            copy_into(buf, target)
        self.stats.add(name, buf.nbytes, time.perf_counter() - t)

    def bcast(self, buf, root):
        t = time.perf_counter()
        typ = mpi_move_type(buf.dtype)
        direct = self._device_ready(buf)
        if direct is not None:
            self.comm.Bcast([direct, typ], root=root)
        else:
            host = to_host(buf)
            self.comm.Bcast([host, typ], root=root)
            copy_into(buf, host)
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


def params_checksum(params):
    """CRC-32 of the bytes of the ParamSet's flat buffer (copied to the host if on a GPU)."""
    flat = params.flat if isinstance(params, ParamSet) else params
    return zlib.crc32(np.ascontiguousarray(to_host(flat)).view(np.uint8))


def broadcast_params(params, comm=None, root=0):
    """Copy the root's ParamSet values to every rank (one Bcast of the flat buffer)."""
    if not isinstance(params, ParamSet):
        raise TypeError(f"params must be a ParamSet, got {type(params).__name__}")
    Collectives(comm, None).bcast(params.flat, root)


def check_params_equal(params, comm=None):
    """Raise RuntimeError on every rank unless all ranks hold bit-identical parameters (compares
    a checksum of the flat buffer: one small allgather)."""
    comm = communicator(comm)
    sums = comm.allgather(params_checksum(params))
    if len(set(sums)) != 1:
        raise RuntimeError(
            "parameters differ across ranks (CRC-32 per rank: "
            + ", ".join(f"{r}: {s:#010x}" for r, s in enumerate(sums))
            + ")"
        )


def average_metrics(metrics, comm=None, *, weight=1.0):
    """Weighted mean over the ranks of a dict name -> number (e.g. losses, accuracies):
    ``sum_r weight_r * value_r / sum_r weight_r``, with ``weight`` e.g. the rank's sample count.
    One Allreduce of ``len(metrics) + 1`` float64 numbers; every rank gets the result. All ranks
    must pass the same names (checked)."""
    comm = communicator(comm)
    MPI = import_mpi()
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


def raise_everywhere(comm, root, exc):
    """Broadcast the root's outcome; every rank raises if the root failed."""
    info = None if exc is None else (type(exc).__name__, str(exc))
    info = comm.bcast(info, root=root)
    if info is None:
        return
    if exc is not None:
        raise exc
    kind = {
        "TypeError": TypeError,
        "CheckpointError": CheckpointError,
        "FileNotFoundError": FileNotFoundError,
    }.get(info[0], RuntimeError)
    raise kind(f"on rank {root}: {info[1]}")


def copy_into(dst, host):
    """Copy the NumPy array ``host`` into ``dst`` (a device array: through its ``set``)."""
    if is_device_array(dst):
        dst.set(host)
    else:
        dst[...] = host


def widened(buf, scratch):
    """``buf`` (16-bit gradients) copied into a float32 buffer for a reduction: ``scratch`` when
    it fits, else a new one (keep the result as the next call's ``scratch``). MPI has no 16-bit
    float sums, and a sum over the ranks rounded to 16 bits at each addition would lose the
    low bits the float32 kernels read."""
    if scratch is None or scratch.size != buf.size:
        xp = import_cupy("16-bit gradients on device buffers") if is_device_array(buf) else np
        scratch = xp.empty(buf.size, np.float32)
    scratch[...] = buf
    return scratch
