"""Checkpoints: parameters, optimizer, plateau scheduler, EMA, RNG and extras in ONE verified file.

::

    from fastopt import checkpoint
    checkpoint.save("run.ckpt", params=ps, optimizer=opt, plateau=sched, rng=rng, extra={"ep": 3})
    ckpt = checkpoint.load("run.ckpt")            # verifies everything, raises CheckpointError
    ckpt.restore(params=ps, optimizer=opt, plateau=sched, rng=rng)
    ckpt.params["w"], ckpt.optimizer_state, ckpt.metadata, ckpt.extra

File layout (format 1.0; every integer little-endian)::

    b"FASTOPT-CKPT\\n"                                   13 bytes, the magic line
    header  <u16 major, u16 minor, u64 json_length, u64 file_length, u32 json_crc32,
             u32 header_crc32>                          28 bytes; header_crc32 covers the magic
                                                        and the header's first 24 bytes
    JSON metadata, UTF-8, json_length bytes
    zero padding to a multiple of 64 bytes              -> start of the data section
    raw array bytes, little-endian C order, each array starting at a multiple of 64 bytes
    trailer b"FOCK-END" + SHA-256 of every byte before the trailer              40 bytes

The JSON holds ``format``, ``format_version``, ``fastopt_version``, ``created`` (UTC, ISO 8601),
``algorithm`` and readable ``hyperparameters`` of the optimizer, ``arrays`` (for every array:
``name``, key ``path``, ``shape``, ``dtype``, ``offset`` from the start of the data section,
``nbytes`` and ``sha256``), ``data_length`` and ``contents``: the saved objects as JSON in which
arrays, tuples, non-string-keyed dicts, non-finite floats, NumPy scalars and learning-rate
schedules are tagged objects (``{"__array__": i}``, ``{"__tuple__": [...]}``, ...). There is no
pickle anywhere: loading parses JSON and raw numeric bytes only, and rebuilds schedules through
:func:`fastopt.schedules.schedule_from_dict`; it never executes code from the file.

Writes are atomic: the file is written to a temporary file in the same directory (named
``.<name>.<random>.tmp``), flushed and fsync'ed, moved over ``path`` with :func:`os.replace`, and
the directory is fsync'ed. A crash at any point leaves either the previous checkpoint or the new
complete one at ``path`` (and possibly a stray temporary file, never read by :func:`load`).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Mapping

import numpy as np

from .paramset import ParamSet
from .schedules import Schedule, schedule_from_dict, schedule_to_dict

__all__ = ["CheckpointError", "Checkpoint", "save", "load", "FORMAT_VERSION", "MAGIC"]

MAGIC = b"FASTOPT-CKPT\n"
FORMAT_VERSION = (1, 0)
"""(major, minor). Readers refuse a newer major version; minor versions only add fields."""
_HEADER = struct.Struct("<HHQQII")
_PREFIX_LEN = len(MAGIC) + _HEADER.size
_TRAILER_TAG = b"FOCK-END"
_TRAILER_LEN = len(_TRAILER_TAG) + hashlib.sha256().digest_size
ALIGNMENT = 64
TEMP_SUFFIX = ".tmp"
_FORMAT_NAME = "fastopt-checkpoint"
_ALLOWED_KINDS = "biufc"
_TAGS = ("__array__", "__tuple__", "__dict__", "__float__", "__npscalar__", "__schedule__")


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted, foreign, too new, or does not match the
    objects it is restored into. ``path`` is the file concerned."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


def _align(n):
    return -(-n // ALIGNMENT) * ALIGNMENT


def _fmt_path(path):
    return "/".join(str(p) for p in path)


def _cupy(purpose):
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            f"{purpose} needs CuPy, which is not installed; load with device='cpu' instead"
        ) from exc
    return cupy


def _is_device_array(a):
    return hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)


def _to_host(a):
    return _cupy("copying a GPU array to the host").asnumpy(a) if _is_device_array(a) else a


# --------------------------------------------------------------------------- encoding (save)


class _Encoder:
    """Turns a tree of dicts/lists/tuples/scalars/arrays/schedules into tagged JSON values,
    collecting the arrays (host, little-endian, C-contiguous) with their key paths."""

    def __init__(self):
        self.arrays = []  # (path, array)

    def encode(self, v, path):
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, np.generic):
            if v.dtype.kind not in _ALLOWED_KINDS:
                raise TypeError(f"cannot save {_fmt_path(path)}: NumPy scalar of dtype {v.dtype}")
            return {"__npscalar__": v.dtype.str, "value": self.encode(v.item(), path)}
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else {"__float__": repr(float(v))}
        if isinstance(v, Schedule):
            try:
                return {"__schedule__": schedule_to_dict(v)}
            except TypeError as exc:
                raise TypeError(f"cannot save {_fmt_path(path)}: {exc}") from exc
        if isinstance(v, np.ndarray) or _is_device_array(v):
            return {"__array__": self._add_array(v, path)}
        if callable(v):
            raise TypeError(
                f"cannot save {_fmt_path(path)}: {v!r} is a plain callable; a lambda or function "
                "(e.g. a learning rate) cannot be stored in a checkpoint, since loading never "
                "executes code. Use a fastopt.schedules schedule (CosineAnnealing, warmup(), ...)"
            )
        if isinstance(v, tuple):
            return {"__tuple__": [self.encode(x, (*path, i)) for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [self.encode(x, (*path, i)) for i, x in enumerate(v)]
        if isinstance(v, Mapping):
            if all(isinstance(k, str) and k not in _TAGS for k in v):
                return {k: self.encode(x, (*path, k)) for k, x in v.items()}
            items = []
            for k, x in v.items():
                if not isinstance(k, (str, int, float, bool, tuple, type(None))):
                    raise TypeError(
                        f"cannot save {_fmt_path(path)}: dict key {k!r} is a {type(k).__name__}"
                    )
                items.append([self.encode(k, (*path, "<key>")), self.encode(x, (*path, k))])
            return {"__dict__": items}
        raise TypeError(
            f"cannot save {_fmt_path(path)}: a {type(v).__name__} is not an array, number, string, "
            "list, tuple, dict or fastopt.schedules schedule"
        )

    def _add_array(self, a, path):
        a = _to_host(a)
        if a.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(
                f"cannot save {_fmt_path(path)}: arrays of dtype {a.dtype} are not supported"
            )
        a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d
        self.arrays.append((tuple(path), a))
        return len(self.arrays) - 1


def _plain(v):
    """Readable JSON form of an (already encodable) hyperparameter value."""
    if isinstance(v, Schedule):
        return v.to_dict()
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return _plain(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def _params_tree(params):
    if isinstance(params, ParamSet):
        return {name: params[name] for name in params.names}
    if isinstance(params, Mapping):
        out = {}
        for name, a in params.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"parameter names must be non-empty strings, got {name!r}")
            if not (isinstance(a, np.ndarray) or _is_device_array(a)):
                raise TypeError(f"parameter {name!r} is a {type(a).__name__}, not an array")
            out[name] = a
        return out
    raise TypeError(
        f"params must be a ParamSet or a dict name -> array, got {type(params).__name__}"
    )


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
    arrays, schedules) to ``path``, atomically. Returns ``path``.

    Everything is encoded before the file is opened: an object that cannot be saved (e.g. a
    lambda learning rate) raises TypeError and writes nothing. Arrays are not copied; each is
    hashed again as it is written, and one that changed meanwhile (another thread stepping the
    optimizer) raises RuntimeError and leaves the previous checkpoint in place.
    """
    path = os.fspath(path)
    enc = _Encoder()
    contents = {"params": enc.encode(_params_tree(params), ("params",))}
    algorithm = hyperparameters = None
    if optimizer is not None:
        sd = _state_of(optimizer, "optimizer")
        algorithm = sd.get("algorithm", type(optimizer).__name__)
        sd = {"algorithm": algorithm, **{k: v for k, v in sd.items() if k != "algorithm"}}
        contents["optimizer"] = enc.encode(sd, ("optimizer",))
        hyperparameters = [
            {k: _plain(v) for k, v in g.items() if k != "params"}
            for g in sd.get("param_groups", [])
        ]
    if plateau is not None:
        contents["plateau"] = enc.encode(_state_of(plateau, "plateau"), ("plateau",))
    if ema is not None:
        contents["ema"] = enc.encode(_state_of(ema, "ema"), ("ema",))
    if rng is not None:
        contents["rng"] = enc.encode(_rng_state(rng), ("rng",))
    if extra is not None:
        contents["extra"] = enc.encode(extra, ("extra",))

    table, blobs, offset = [], [], 0
    for p, a in enc.arrays:
        data = a.reshape(-1).view(np.uint8)
        offset = _align(offset)
        digest = hashlib.sha256(data).hexdigest()
        table.append(
            {
                "name": _fmt_path(p),
                "path": list(p),
                "shape": list(a.shape),
                "dtype": a.dtype.str,
                "offset": offset,
                "nbytes": int(data.nbytes),
                "sha256": digest,
            }
        )
        blobs.append((offset, data, digest, _fmt_path(p)))
        offset += data.nbytes
    from . import __version__

    now = time.time()
    meta = {
        "format": _FORMAT_NAME,
        "format_version": list(FORMAT_VERSION),
        "fastopt_version": __version__,
        "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
        "created_unix": now,
        "algorithm": algorithm,
        "hyperparameters": hyperparameters,
        "data_length": offset,
        "arrays": table,
        "contents": contents,
    }
    meta_bytes = json.dumps(meta, allow_nan=False, separators=(",", ":")).encode("utf-8")
    data_start = _align(_PREFIX_LEN + len(meta_bytes))
    total = data_start + offset + _TRAILER_LEN
    head = _HEADER.pack(*FORMAT_VERSION, len(meta_bytes), total, zlib.crc32(meta_bytes), 0)[:-4]
    head += struct.pack("<I", zlib.crc32(MAGIC + head))
    _atomic_write(path, MAGIC + head + meta_bytes, data_start, blobs)
    return path


def _file_mode():
    try:  # the mode a plain open() would give: 0o666 minus the umask (read without changing it)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path, prefix, data_start, blobs):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX, dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as f:
            h = hashlib.sha256()

            def put(b):
                h.update(b)
                f.write(b)

            put(prefix)
            pos = len(prefix)
            for offset, data, digest, name in blobs:
                put(bytes(data_start + offset - pos))
                mv = memoryview(data)
                if hashlib.sha256(mv).hexdigest() != digest:  # e.g. another thread stepping
                    raise RuntimeError(
                        f"array {name!r} changed while {path!r} was being saved; nothing was "
                        "replaced (do not update the parameters or optimizer during save())"
                    )
                put(mv)
                pos = data_start + offset + data.nbytes
            put(bytes(max(data_start - pos, 0)))  # no arrays: pad up to the (empty) data section
            f.write(_TRAILER_TAG + h.digest())
            f.flush()
            os.fsync(f.fileno())
        try:
            if os.path.exists(path):
                os.chmod(tmp, os.stat(path).st_mode & 0o7777)
            elif (mode := _file_mode()) is not None:
                os.chmod(tmp, mode)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


# --------------------------------------------------------------------------- loading


def _sniff(head):
    if head.startswith(b"PK\x03\x04"):
        return " (it is a ZIP archive, e.g. a NumPy .npz or a torch.save file)"
    if head.startswith(b"\x93NUMPY"):
        return " (it is a NumPy .npy file)"
    if head[:1] == b"\x80":
        return " (it looks like a pickle)"
    if head.lstrip()[:1] in (b"{", b"["):
        return " (it looks like JSON text)"
    if head.startswith(b"\x89HDF"):
        return " (it is an HDF5 file)"
    return ""


def _parse_device(device):
    if device == "cpu":
        return None
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        index = device[5:] or "0"
        if not index.isdigit():
            raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")
        cupy = _cupy(f"load(device={device!r})")
        return lambda a: _on_device(cupy, int(index), a)
    raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")


def _on_device(cupy, index, a):
    with cupy.cuda.Device(index):
        return cupy.asarray(a)


def load(path, *, device="cpu"):
    """Read and fully verify a checkpoint: magic, format version, header CRC, length, the
    trailer's SHA-256, and every array's length, dtype, shape and SHA-256. Raises
    :class:`CheckpointError` (a ValueError) naming ``path`` and the problem. ``device="cuda"``
    (or ``"cuda:N"``) returns CuPy arrays (parameters, optimizer, EMA, extra), ``"cpu"`` NumPy."""
    to_device = _parse_device(device)
    path = os.fspath(path)

    def fail(msg):
        return CheckpointError(f"cannot load checkpoint {path!r}: {msg}", path)

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise fail(
                "the file is empty (0 bytes): not a fastopt checkpoint, or a write was interrupted"
            )
        head = f.read(_PREFIX_LEN)
        if not head.startswith(MAGIC):
            if MAGIC.startswith(head):
                raise fail(f"truncated: only {size} bytes, it ends inside the magic line")
            raise fail(f"not a fastopt checkpoint: it does not start with {MAGIC!r}{_sniff(head)}")
        if len(head) < _PREFIX_LEN:
            raise fail(
                f"truncated: only {size} bytes, it ends inside the {_PREFIX_LEN}-byte header"
            )
        major, minor, json_len, total, json_crc, crc = _HEADER.unpack(head[len(MAGIC) :])
        if zlib.crc32(head[:-4]) != crc:
            raise fail("the header is corrupted (CRC-32 mismatch)")
        if major > FORMAT_VERSION[0]:
            from . import __version__

            raise fail(
                f"it was written in checkpoint format {major}.{minor}, newer than this fastopt "
                f"({__version__}) can read (format {FORMAT_VERSION[0]}.x); upgrade fastopt"
            )
        if major < 1:
            raise fail(f"unknown checkpoint format version {major}.{minor}")
        if size < total:
            raise fail(f"truncated: the file has {size} bytes, its header says {total}")
        if size > total:
            raise fail(
                f"{size - total} unexpected bytes after the end of the checkpoint ({total} bytes)"
            )
        data_start = _align(_PREFIX_LEN + json_len)
        if data_start + _TRAILER_LEN > total:
            raise fail(
                f"the header is inconsistent: metadata of {json_len} bytes in a {total}-byte file"
            )
        buf = bytearray(total)
        view = memoryview(buf)
        view[:_PREFIX_LEN] = head
        got = _PREFIX_LEN
        while got < total:  # one read() may return less (e.g. 2 GiB per call on Linux)
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        if got != total:
            raise fail(f"truncated while reading: got {got} of {total} bytes")

    body = view[: total - _TRAILER_LEN]
    trailer = bytes(view[total - _TRAILER_LEN :])
    meta_text = bytes(view[_PREFIX_LEN : _PREFIX_LEN + json_len])
    if zlib.crc32(meta_text) != json_crc:
        raise fail("the metadata (JSON) is corrupted (CRC-32 mismatch)")
    if trailer[: len(_TRAILER_TAG)] != _TRAILER_TAG:
        raise fail("the trailer is corrupted or missing")
    if hashlib.sha256(body).digest() != trailer[len(_TRAILER_TAG) :]:
        raise fail("checksum mismatch: " + _locate_damage(meta_text, view, data_start))
    try:
        meta = json.loads(meta_text.decode("utf-8"), parse_constant=_reject_constant)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
            raise ValueError(
                f"format is {meta.get('format') if isinstance(meta, dict) else meta!r}"
            )
        if meta.get("format_version") != [major, minor]:
            raise ValueError(
                f"format_version {meta.get('format_version')!r} differs from the header's"
            )
        arrays = _read_arrays(meta, view, data_start, total, fail)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise fail(f"invalid metadata: {exc}") from exc
    try:
        contents = meta["contents"]
        if not isinstance(contents, dict) or "params" not in contents:
            raise ValueError("no 'params' in contents")
        on_device = arrays if to_device is None else [to_device(a) for a in arrays]
        decoded = {
            k: _decode(v, arrays if k in ("rng", "plateau") else on_device)
            for k, v in contents.items()
        }
        params = decoded["params"]
        if not isinstance(params, dict):
            raise ValueError("'params' is not a dict")
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise fail(f"invalid contents: {exc}") from exc
    return Checkpoint(path, device, meta, decoded)


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _locate_damage(meta_text, view, data_start):
    try:
        meta = json.loads(meta_text.decode("utf-8"), parse_constant=_reject_constant)
        entries = meta["arrays"]
    except Exception:
        return "the metadata (JSON) is corrupted"
    try:
        for e in entries:
            lo = data_start + int(e["offset"])
            if hashlib.sha256(view[lo : lo + int(e["nbytes"])]).hexdigest() != e["sha256"]:
                return f"the data of array {e['name']!r} is corrupted"
    except Exception:
        return "the metadata (JSON) is corrupted"
    return "the contents do not match the SHA-256 in the trailer (trailer or padding corrupted)"


def _read_arrays(meta, view, data_start, total, fail):
    table = meta["arrays"]
    data_length = meta["data_length"]
    if not isinstance(table, list) or not isinstance(data_length, int):
        raise ValueError("'arrays' must be a list and 'data_length' an int")
    if data_start + data_length + _TRAILER_LEN != total:
        raise ValueError(f"data_length {data_length} does not fit the {total}-byte file")
    out = []
    for e in table:
        name = e["name"]
        dt = np.dtype(e["dtype"]) if isinstance(e["dtype"], str) else None
        if (
            dt is None
            or dt.kind not in _ALLOWED_KINDS
            or dt.str != e["dtype"]
            or dt.byteorder == ">"
        ):
            raise ValueError(f"array {name!r} has unsupported dtype {e['dtype']!r}")
        shape = e["shape"]
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"array {name!r} has invalid shape {shape!r}")
        offset, nbytes = e["offset"], e["nbytes"]
        count = math.prod(shape)
        if type(nbytes) is not int or nbytes != count * dt.itemsize:
            raise ValueError(f"array {name!r}: {nbytes!r} bytes do not hold shape {shape} of {dt}")
        if (
            type(offset) is not int
            or offset < 0
            or offset % ALIGNMENT
            or offset + nbytes > data_length
        ):
            raise ValueError(f"array {name!r} has invalid offset {offset!r}")
        lo = data_start + offset
        if hashlib.sha256(view[lo : lo + nbytes]).hexdigest() != e["sha256"]:
            raise fail(f"array {name!r} is corrupted (SHA-256 mismatch)")
        # writable views into the file's buffer (no second copy of the data)
        a = np.frombuffer(view, dtype=dt, count=count, offset=lo).reshape(shape)
        out.append(a if dt.isnative else a.astype(dt.newbyteorder("=")))
    return out


def _decode(v, arrays):
    if isinstance(v, list):
        return [_decode(x, arrays) for x in v]
    if not isinstance(v, dict):
        return v
    tags = [k for k in v if k in _TAGS]
    if not tags:
        return {k: _decode(x, arrays) for k, x in v.items()}
    tag = tags[0]
    if len(tags) > 1 or set(v) != ({tag, "value"} if tag == "__npscalar__" else {tag}):
        raise ValueError(f"malformed tagged value with keys {sorted(v)}")
    x = v[tag]
    if tag == "__array__":
        if type(x) is not int or not 0 <= x < len(arrays):
            raise ValueError(f"reference to a missing array {x!r}")
        return arrays[x]
    if tag == "__tuple__":
        if not isinstance(x, list):
            raise ValueError("malformed tuple")
        return tuple(_decode(y, arrays) for y in x)
    if tag == "__dict__":
        if not isinstance(x, list) or not all(isinstance(p, list) and len(p) == 2 for p in x):
            raise ValueError("malformed dict")
        return {_decode(k, arrays): _decode(y, arrays) for k, y in x}
    if tag == "__float__":
        if x not in ("inf", "-inf", "nan"):
            raise ValueError(f"malformed float {x!r}")
        return float(x)
    if tag == "__npscalar__":
        dt = np.dtype(x) if isinstance(x, str) else None
        if dt is None or dt.kind not in _ALLOWED_KINDS:
            raise ValueError(f"unsupported scalar dtype {x!r}")
        return dt.type(_decode(v["value"], arrays))
    return schedule_from_dict(x)  # "__schedule__"


# --------------------------------------------------------------------------- Checkpoint


class Checkpoint:
    """A loaded, verified checkpoint.

    Attributes: ``path``, ``device``, ``metadata`` (the whole JSON header), ``format_version``,
    ``fastopt_version``, ``created``, ``algorithm``, ``hyperparameters``, ``params`` (dict name ->
    array), ``optimizer_state`` (an optimizer ``state_dict()``, schedules rebuilt, tuples as
    tuples), ``plateau_state``, ``ema_state``, ``rng_state``, ``extra`` (each ``None`` when not
    saved). :meth:`restore` loads them into existing objects.
    """

    def __init__(self, path, device, metadata, contents):
        self.path = path
        self.device = device
        self.metadata = metadata
        self.format_version = tuple(metadata["format_version"])
        self.fastopt_version = metadata.get("fastopt_version")
        self.created = metadata.get("created")
        self.algorithm = metadata.get("algorithm")
        self.hyperparameters = metadata.get("hyperparameters")
        self.params = contents["params"]
        self.optimizer_state = contents.get("optimizer")
        self.plateau_state = contents.get("plateau")
        self.ema_state = contents.get("ema")
        self.rng_state = contents.get("rng")
        self.extra = contents.get("extra")

    def __repr__(self):
        parts = [f"{len(self.params)} params"]
        if self.optimizer_state is not None:
            parts.append(f"optimizer={self.algorithm}")
        parts += [
            k for k in ("plateau", "ema", "rng", "extra") if getattr(self, _ATTR[k]) is not None
        ]
        return f"Checkpoint({self.path!r}, {', '.join(parts)}, created={self.created!r})"

    def _error(self, msg):
        return CheckpointError(f"cannot restore checkpoint {self.path!r}: {msg}", self.path)

    def _need(self, what):
        value = getattr(self, _ATTR[what])
        if value is None:
            raise self._error(f"it holds no {what} state")
        return value

    def restore(self, *, params=None, optimizer=None, plateau=None, ema=None, rng=None):
        """Load the saved state into existing objects: ``params`` (ParamSet or dict name ->
        array; values copied in place), ``optimizer`` (via its ``load_state_dict``), ``plateau``,
        ``ema`` (``load_state_dict``) and ``rng`` (a Generator; its bit generator's state is set).

        Names, shapes, dtypes, the optimizer class and the RNG kind are checked before anything
        changes; if an object's own ``load_state_dict`` still refuses, the objects already
        restored are rolled back. Mismatches raise :class:`CheckpointError`.
        """
        if all(x is None for x in (params, optimizer, plateau, ema, rng)):
            raise TypeError("restore() needs at least one of params, optimizer, plateau, ema, rng")
        # ---- checks: nothing changes here
        copies = self._check_params(params) if params is not None else []
        if optimizer is not None:
            state = self._need("optimizer")
            if not callable(getattr(optimizer, "load_state_dict", None)):
                raise TypeError(f"optimizer {type(optimizer).__name__} has no load_state_dict()")
            if not isinstance(state, dict):
                raise self._error("its optimizer state is not a dict")
            saved_algo, here = state.get("algorithm"), type(optimizer).__name__
            if saved_algo != here:
                raise self._error(f"it holds {saved_algo} optimizer state, the optimizer is {here}")
            state = _tree_to_host(state)  # the optimizer moves it to its own device
        if plateau is not None:
            self._dry_run(plateau, self._need("plateau"), "plateau")
        if ema is not None:
            self._need("ema")
            if not callable(getattr(ema, "load_state_dict", None)):
                raise TypeError(f"ema {type(ema).__name__} has no load_state_dict()")
        if rng is not None:
            saved = self._need("rng")
            bitgen = getattr(rng, "bit_generator", rng)
            if not isinstance(bitgen, np.random.BitGenerator):
                raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
            kind = saved.get("bit_generator") if isinstance(saved, dict) else None
            if kind != type(bitgen).__name__:
                raise self._error(
                    f"it holds {kind} RNG state, the generator uses {type(bitgen).__name__}"
                )
            try:
                type(bitgen)().state = copy.deepcopy(saved)
            except (ValueError, TypeError, KeyError) as exc:
                raise self._error(f"invalid RNG state: {exc}") from exc

        # ---- apply, rolling back on a late refusal
        undo = []
        try:
            if optimizer is not None:
                before = optimizer.state_dict()
                self._load(optimizer, state, "optimizer")
                undo.append(lambda: optimizer.load_state_dict(before))
            if plateau is not None:
                before_p = plateau.state_dict()
                self._load(plateau, copy.deepcopy(self.plateau_state), "plateau")
                undo.append(lambda: plateau.load_state_dict(before_p))
            if ema is not None:
                before_e = ema.state_dict()
                self._load(ema, copy.deepcopy(self.ema_state), "ema")
                undo.append(lambda: ema.load_state_dict(before_e))
            if rng is not None:
                before_r = bitgen.state
                bitgen.state = copy.deepcopy(self.rng_state)
                undo.append(lambda: setattr(bitgen, "state", before_r))
            for dst, src in copies:
                old = dst.copy()
                dst[...] = src
                undo.append(lambda dst=dst, old=old: dst.__setitem__(Ellipsis, old))
        except BaseException:
            for fn in reversed(undo):
                try:
                    fn()
                except Exception:  # noqa: S110 - best effort; the original error is what matters
                    pass
            raise

    def _load(self, obj, state, what):
        try:
            obj.load_state_dict(state)
        except (ValueError, TypeError, KeyError) as exc:
            raise self._error(f"the {what} refused the saved state: {exc}") from exc

    def _dry_run(self, obj, state, what):
        """Validate ``state`` by loading it into a shallow copy of ``obj``."""
        if not callable(getattr(obj, "load_state_dict", None)):
            raise TypeError(f"{what} {type(obj).__name__} has no load_state_dict()")
        try:
            probe = copy.copy(obj)
        except Exception:
            return
        self._load(probe, copy.deepcopy(state), what)

    def _check_params(self, params):
        """[(destination view, source array on the destination's device)] after checking names,
        shapes and dtypes, or CheckpointError naming every mismatch."""
        if isinstance(params, ParamSet):
            targets = {name: params[name] for name in params.names}
        elif isinstance(params, Mapping):
            targets = dict(params)
        else:
            raise TypeError(
                f"params must be a ParamSet or a dict name -> array, got {type(params).__name__}"
            )
        missing = [n for n in targets if n not in self.params]
        unexpected = [n for n in self.params if n not in targets]
        if missing or unexpected:
            raise self._error(
                f"parameter names differ: missing from the checkpoint {missing}, "
                f"in the checkpoint but not in params {unexpected}"
            )
        problems = []
        for name, dst in targets.items():
            src = self.params[name]
            if not hasattr(dst, "shape") or not hasattr(dst, "dtype"):
                problems.append(f"{name!r} is a {type(dst).__name__}, not an array")
            elif tuple(dst.shape) != tuple(src.shape):
                problems.append(
                    f"{name!r} has shape {tuple(src.shape)} in the checkpoint, "
                    f"{tuple(dst.shape)} here"
                )
            elif dst.dtype != src.dtype:
                problems.append(
                    f"{name!r} has dtype {src.dtype} in the checkpoint, {dst.dtype} here"
                )
            elif isinstance(dst, np.ndarray) and not dst.flags.writeable:
                problems.append(f"{name!r} is read-only here")
        if problems:
            raise self._error("parameters do not match: " + "; ".join(problems))
        return [(dst, _like(dst, self.params[name])) for name, dst in targets.items()]


_ATTR = {
    "optimizer": "optimizer_state",
    "plateau": "plateau_state",
    "ema": "ema_state",
    "rng": "rng_state",
    "extra": "extra",
}


def _like(dst, src):
    """``src`` on the device of ``dst`` (NumPy <-> CuPy), for ``dst[...] = src``."""
    if isinstance(dst, np.ndarray):
        return _to_host(src)
    if _is_device_array(dst) and not _is_device_array(src):
        return _cupy("restoring into a GPU array").asarray(src)
    return src


def _tree_to_host(v):
    if isinstance(v, dict):
        return {k: _tree_to_host(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_tree_to_host(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_tree_to_host(x) for x in v)
    return _to_host(v)
