"""Checkpoints: parameters, optimizer, plateau scheduler, EMA, RNG and extras in ONE verified file,
a standard ``.safetensors`` file.

::

    from fastopt import checkpoint
    checkpoint.save("run.safetensors", params=ps, optimizer=opt, plateau=sched, rng=rng,
                    extra={"ep": 3})
    ckpt = checkpoint.load("run.safetensors")     # verifies everything, raises CheckpointError
    ckpt.restore(params=ps, optimizer=opt, plateau=sched, rng=rng)
    ckpt.params["w"], ckpt.optimizer_state, ckpt.metadata, ckpt.extra

    safetensors.torch.load_file("run.safetensors")["params/w"]   # the file is plain safetensors

The file is named exactly as given: ``.safetensors`` is the usual ending (the examples use it),
but any name works and none is added. Its tensors are named ``params/<name>``,
``optimizer/state/<index>/<key>``, ``ema/...``, ``extra/...``; fastopt's metadata (format version,
optimizer, hyperparameters, everything that is not an array, a SHA-256 per tensor) is in the
header's ``__metadata__``. Files of the earlier checkpoint format 1 (``FASTOPT-CKPT``) still load.
An optimizer over a ParamSet keeps its state in flat arrays laid out like the ParamSet, so the
ParamSet's names and shapes in packing order are saved too (``optimizer_layout`` in the contents,
an EMA's in its own state), and :meth:`Checkpoint.restore` refuses a ParamSet of another layout.

The package is split by job: :mod:`~fastopt.checkpoint.encoding` turns the saved objects into
tagged JSON and back (no pickle anywhere: loading parses JSON and raw numeric bytes only, and
rebuilds schedules through :func:`fastopt.schedules.schedule_from_dict`; it never executes code
from the file), :mod:`~fastopt.checkpoint.fileformat` writes and verifies the bytes of the file
(its docstring has the layout), :mod:`~fastopt.checkpoint.legacy` reads format-1 files,
:mod:`~fastopt.checkpoint.restore` puts a loaded checkpoint back into objects; this module gathers
the objects' states (:func:`save`) and decodes them (:func:`load`).

Writes are atomic (:func:`fastopt.fileio.atomic_write`): the file is written to a temporary file
in the same directory (unnamed while written, where the filesystem allows), flushed and fsync'ed,
moved over ``path`` and the directory is fsync'ed. A crash at any point leaves either the previous
checkpoint or the new complete one at ``path``; no temporary file survives the next save (a
symbolic link at ``path`` stays a link: its target is replaced).
"""

import datetime
import os
import time
from collections.abc import Mapping

import numpy as np

from ..arrays import import_cupy, is_device_array, on_device, parse_device
from ..fileio import TEMP_SUFFIX
from ..paramset import ParamSet
from ..paramset_layout import paramset_layout
from .encoding import Encoder, decode, plain
from .fileformat import ALIGNMENT, FORMAT_VERSION, CheckpointError, read_file, write_file
from .legacy import MAGIC
from .restore import Checkpoint

__all__ = ["CheckpointError", "Checkpoint", "save", "load", "FORMAT_VERSION", "MAGIC"]

_ = (ALIGNMENT, TEMP_SUFFIX)  # part of the module's names (fastopt.checkpoint.TEMP_SUFFIX)
# MAGIC: the first line of a format-1 checkpoint, which load() still reads (nothing writes it)


def _params_tree(params):
    if isinstance(params, ParamSet):
        return {name: params[name] for name in params.names}
    if isinstance(params, Mapping):
        out = {}
        for name, a in params.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"parameter names must be non-empty strings, got {name!r}")
            if not (isinstance(a, np.ndarray) or is_device_array(a)):
                raise TypeError(f"parameter {name!r} is a {type(a).__name__}, not an array")
            out[name] = a
        return out
    raise TypeError(
        f"params must be a ParamSet or a dict name -> array, got {type(params).__name__}"
    )


def _optimizer_layout(optimizer):
    """The :func:`~fastopt.paramset_layout.paramset_layout` of each param group's params (None for a group
    that is not a ParamSet), or None when no group is a ParamSet or the optimizer does not say
    what it is built over (no ``sources()``)."""
    sources = getattr(optimizer, "sources", None)
    if not callable(sources):
        return None
    layout = [paramset_layout(s) for s in sources()]
    return layout if any(x is not None for x in layout) else None


def _rng_state(rng):
    bitgen = getattr(rng, "bit_generator", rng)
    if not isinstance(bitgen, np.random.BitGenerator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return bitgen.state


def _state_of(obj, what):
    fn = getattr(obj, "state_dict", None)
    if not callable(fn):
        raise TypeError(f"{what} ({type(obj).__name__}) has no state_dict() method")
    return fn()


def save(path, *, params, optimizer=None, plateau=None, ema=None, rng=None, extra=None):
    """Write a checkpoint of ``params`` (a ParamSet or dict name -> array) and, optionally, an
    optimizer, a ReduceLROnPlateau (anything with ``state_dict()``), an EMA (``state_dict()``
    of arrays and scalars), a ``numpy.random.Generator`` and ``extra`` (JSON-able values, tuples,
    arrays, schedules) to ``path``, atomically, as a ``.safetensors`` file. Returns ``path``.

    ``path`` is used as given: no ending is added or required (``"run.safetensors"`` is the usual
    name; ``"run.ckpt"`` holds the same safetensors bytes). ``safetensors.torch.load_file(path)``
    and ``safetensors.numpy.load_file(path)`` read its arrays, named by where they were saved:
    ``params/<name>``, ``optimizer/state/<index>/<key>``, ``ema/...``, ``extra/...``; bfloat16
    arrays are safetensors ``BF16``.

    Everything is encoded before the file is opened: an object that cannot be saved (e.g. a
    lambda learning rate) raises TypeError and writes nothing. Arrays are not copied; each is
    hashed again as it is written, and one that changed meanwhile (another thread stepping the
    optimizer) raises RuntimeError and leaves the previous checkpoint in place. A path that
    cannot be written raises :class:`fastopt.fileio.OutputError` (an OSError) naming it.
    """
    path = os.fspath(path)
    enc = Encoder()
    contents = {"params": enc.encode(_params_tree(params), ("params",))}
    algorithm = hyperparameters = None
    if optimizer is not None:
        sd = _state_of(optimizer, "optimizer")
        algorithm = sd.get("algorithm", type(optimizer).__name__)
        sd = {"algorithm": algorithm, **{k: v for k, v in sd.items() if k != "algorithm"}}
        contents["optimizer"] = enc.encode(sd, ("optimizer",))
        layout = _optimizer_layout(optimizer)
        if layout is not None:
            contents["optimizer_layout"] = enc.encode(layout, ("optimizer_layout",))
        hyperparameters = [
            {k: plain(v) for k, v in g.items() if k != "params"} for g in sd.get("param_groups", [])
        ]
    if plateau is not None:
        contents["plateau"] = enc.encode(_state_of(plateau, "plateau"), ("plateau",))
    if ema is not None:
        contents["ema"] = enc.encode(_state_of(ema, "ema"), ("ema",))
    if rng is not None:
        contents["rng"] = enc.encode(_rng_state(rng), ("rng",))
    if extra is not None:
        contents["extra"] = enc.encode(extra, ("extra",))
    from .. import __version__

    now = time.time()
    fields = {
        "fastopt_version": __version__,
        "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
        "created_unix": now,
        "algorithm": algorithm,
        "hyperparameters": hyperparameters,
        "contents": contents,
    }
    write_file(path, fields, enc.arrays)
    return path


def _device_copier(device):
    """None for ``"cpu"``, else a function copying a host array to that CUDA device."""
    index = parse_device(device)
    if index is None:
        return None
    cupy = import_cupy(f"load(device={device!r})")

    def copy(a):
        with on_device(cupy, None if index < 0 else index):
            return cupy.asarray(a)

    return copy


def _map_arrays(fn, arrays):
    """``fn`` applied to every array of a dict name -> array (a list in format 1)."""
    if isinstance(arrays, dict):
        return {name: fn(a) for name, a in arrays.items()}
    return [fn(a) for a in arrays]


def load(path, *, device="cpu"):
    """Read and fully verify a checkpoint written by :func:`save`: the header (its SHA-256, the
    format version, every tensor's dtype, shape and place, the file's length) and every tensor's
    SHA-256; a file of checkpoint format 1 is verified as it always was. Raises
    :class:`CheckpointError` (a ValueError) naming ``path`` and the problem, also for a file that
    is not a fastopt checkpoint (e.g. a ``.safetensors`` file of model weights without fastopt's
    metadata). ``device="cuda"`` (or ``"cuda:N"``) returns CuPy arrays (parameters, optimizer,
    EMA, extra), ``"cpu"`` NumPy."""
    to_device = _device_copier(device)
    path = os.fspath(path)
    meta, arrays = read_file(path)
    try:
        contents = meta["contents"]
        if not isinstance(contents, dict) or "params" not in contents:
            raise ValueError("no 'params' in contents")
        on_dev = arrays if to_device is None else _map_arrays(to_device, arrays)
        decoded = {
            k: decode(v, arrays if k in ("rng", "plateau") else on_dev) for k, v in contents.items()
        }
        if not isinstance(decoded["params"], dict):
            raise ValueError("'params' is not a dict")
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"cannot load checkpoint {path!r}: invalid contents: {exc}", path
        ) from exc
    except RecursionError:
        raise CheckpointError(
            f"cannot load checkpoint {path!r}: invalid contents: nested too deeply", path
        ) from None
    return Checkpoint(path, device, meta, decoded)
