"""The checkpoint file: a standard ``.safetensors`` file, written atomically and read back verified.

Layout (checkpoint format 2.0; the safetensors format, every integer little-endian)::

    u64 header_length
    header: JSON, ASCII, header_length bytes, padded with spaces so that the data starts at a
            multiple of 64 bytes
    data:   the tensors' bytes, little-endian C order, back to back in ``data_offsets`` order

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets from the start of the data) and holds fastopt's metadata in ``__metadata__`` (text to
text, as safetensors wants):

===================  ======================================================================
``format``           ``"fastopt-checkpoint"``
``format_version``   ``"2.0"``; readers refuse a newer major version, minor versions add fields
``fastopt_version``  the version that wrote the file
``created``          ISO 8601, UTC; ``created_unix``: seconds since the epoch
``algorithm``        the optimizer's class name (absent without an optimizer)
``hyperparameters``  JSON: the optimizer's param groups without their params (schedules as dicts)
``sha256``           JSON: tensor name -> SHA-256 (hex) of its bytes
``raw_dtypes``       JSON, only when needed: tensor name -> NumPy dtype of a tensor whose dtype
                     safetensors has no code for (complex128, long double), stored as ``U8``
                     with its item bytes as a last axis
``contents``         JSON: what was saved (:mod:`fastopt.checkpoint.encoding`); an array is
                     ``{"__array__": "<tensor name>"}``
``header_sha256``    SHA-256 of the rest of the header as canonical JSON (sorted keys, no spaces)
===================  ======================================================================

Tensors are named by where they were saved, joined by ``/``: ``params/<name>``,
``optimizer/state/<index>/exp_avg``, ``ema/shadow/<name>``, ``extra/...`` (``#2``, ``#3`` ...
appended in the rare case two paths give one name). bfloat16 (``ml_dtypes.bfloat16``) is
``BF16``. So ``safetensors.torch.load_file(path)`` and ``safetensors.numpy.load_file(path)`` read
a checkpoint's parameters and optimizer state directly.

Tensors are written in order of decreasing item size, so each starts at a multiple of its item
size: loaded arrays are aligned, writable views of one buffer. Files of checkpoint format 1 (the
``FASTOPT-CKPT`` file) are still read (:mod:`fastopt.checkpoint.legacy`).
"""

import hashlib
import json
import math
import os
import re
import struct

import numpy as np

from ..arrays import bfloat16, storage_name
from ..fileio import atomic_write
from .legacy import MAGIC, check_shape, read_legacy, reject_constant

FORMAT_VERSION = (2, 0)
"""(major, minor) of the checkpoint format. Readers refuse a newer major version; minor versions
only add fields."""
FORMAT_NAME = "fastopt-checkpoint"
ALIGNMENT = 64
"""The data section starts at a multiple of this many bytes."""
LENGTH = struct.Struct("<Q")
MAX_HEADER = 100_000_000
"""The largest header safetensors reads (its own limit)."""
JSON_FIELDS = ("created_unix", "hyperparameters", "contents", "sha256", "raw_dtypes")
"""``__metadata__`` entries holding JSON; the others are plain text."""
HEADER_HASH = "header_sha256"

_CODES = {
    "|b1": "BOOL",
    "|u1": "U8",
    "|i1": "I8",
    "<u2": "U16",
    "<i2": "I16",
    "<f2": "F16",
    "<u4": "U32",
    "<i4": "I32",
    "<f4": "F32",
    "<c8": "C64",
    "<u8": "U64",
    "<i8": "I64",
    "<f8": "F64",
}
_DTYPES = {code: np.dtype(tag) for tag, code in _CODES.items()}


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted, foreign, too new, or does not match the
    objects it is restored into. ``path`` is the file concerned."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


def safetensors_dtype(dtype):
    """The safetensors code (``"F32"``, ``"BF16"``, ...) of a little-endian NumPy dtype, or None
    when safetensors has none (complex128, long double)."""
    return "BF16" if storage_name(dtype) == "bfloat16" else _CODES.get(np.dtype(dtype).str)


def canonical_hash(header):
    """SHA-256 (hex) of ``header`` without its ``header_sha256`` entry, as canonical JSON."""
    rest = dict(header)
    rest["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if k != HEADER_HASH}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# --------------------------------------------------------------------------- writing


def write_file(path, fields, arrays):
    """Write one checkpoint file at ``path``, atomically: the metadata ``fields`` (a dict of
    JSON-able values: strings as they are, the :data:`JSON_FIELDS` as JSON text, None left out)
    and ``arrays``, a dict tensor name -> host little-endian C-contiguous array.

    Arrays are not copied: each is hashed for the header, then hashed again as it is written; one
    that changed meanwhile (another thread stepping the optimizer) raises RuntimeError and the
    previous file stays in place."""
    tensors = []  # (name, bytes view, sha256) in file order
    header, raw_dtypes, hashes, offset = {}, {}, {}, 0
    for name, a in sorted(arrays.items(), key=lambda kv: -kv[1].dtype.itemsize):
        data = a.reshape(-1).view(np.uint8)
        code, shape = safetensors_dtype(a.dtype), list(a.shape)
        if code is None:
            code, shape = "U8", [*shape, a.dtype.itemsize]
            raw_dtypes[name] = a.dtype.str
        digest = hashlib.sha256(data).hexdigest()
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + data.size]}
        hashes[name] = digest
        tensors.append((name, data, digest))
        offset += data.size
    meta = {"format": FORMAT_NAME, "format_version": "{}.{}".format(*FORMAT_VERSION)}
    contents = fields.get("contents")
    fields = {k: v for k, v in fields.items() if k != "contents"}
    fields.update(sha256=hashes, raw_dtypes=raw_dtypes or None, contents=contents)
    for key, value in fields.items():
        if value is not None:
            meta[key] = json_text(value) if key in JSON_FIELDS else str(value)
    header = {"__metadata__": meta, **header}
    meta[HEADER_HASH] = canonical_hash(header)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    if len(text) > MAX_HEADER:
        raise ValueError(
            f"cannot save {path!r}: the metadata takes {len(text)} bytes, more than the "
            f"{MAX_HEADER} a safetensors header may hold; save large data as arrays"
        )
    text += b" " * (-(LENGTH.size + len(text)) % ALIGNMENT)
    with atomic_write(path) as f:
        f.write(LENGTH.pack(len(text)) + text)
        for name, data, digest in tensors:
            mv = memoryview(data)
            if hashlib.sha256(mv).hexdigest() != digest:  # e.g. another thread stepping
                raise RuntimeError(
                    f"array {name!r} changed while {path!r} was being saved; nothing was "
                    "replaced (do not update the parameters or optimizer during save())"
                )
            f.write(mv)


def json_text(value):
    """Compact JSON text of ``value`` (NaN and infinities refused)."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


# --------------------------------------------------------------------------- reading


def read_file(path):
    """(metadata dict, arrays) of the checkpoint at ``path``, fully verified.

    A ``.safetensors`` checkpoint gives its ``__metadata__`` with the :data:`JSON_FIELDS` parsed,
    ``format_version`` as ``[major, minor]`` and ``tensors`` (name -> dtype, shape, sha256), and
    a dict tensor name -> array; a format-1 file its JSON metadata and a list of arrays. Arrays
    are writable views of one buffer. :class:`CheckpointError` names ``path`` and the problem."""

    def fail(msg):
        return CheckpointError(f"cannot load checkpoint {path!r}: {msg}", path)

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise fail(
                "the file is empty (0 bytes): not a fastopt checkpoint, or a write was interrupted"
            )
        head = f.read(64)
        if head.startswith(MAGIC) or MAGIC.startswith(head):
            return read_legacy(f, size, fail)
        if size <= LENGTH.size:
            raise fail(f"truncated, or not a fastopt checkpoint: only {size} bytes")
        (n,) = LENGTH.unpack(head[: LENGTH.size])
        if head[LENGTH.size : LENGTH.size + 1] != b"{" or n > MAX_HEADER:
            raise fail(
                "not a fastopt checkpoint: neither a .safetensors file nor a fastopt "
                f"checkpoint of format 1{_sniff(head)}"
            )
        if LENGTH.size + n > size:
            raise fail(f"truncated: the file has {size} bytes, it ends inside its {n}-byte header")
        f.seek(LENGTH.size)
        text = _read_exactly(f, n, fail)
        header, meta = _parse_header(text, fail)
        table = _tensor_table(header, meta, fail)
        end = LENGTH.size + n + (table[-1][4] if table else 0)
        if size < end:
            raise fail(f"truncated: the file has {size} bytes, its header says {end}")
        if size > end:
            raise fail(
                f"{size - end} unexpected bytes after the end of the checkpoint ({end} bytes)"
            )
        buf = _read_exactly(f, end - LENGTH.size - n, fail)
    view = memoryview(buf)
    arrays = {}
    for name, dt, shape, begin, stop, digest in table:
        if hashlib.sha256(view[begin:stop]).hexdigest() != digest:
            raise fail(f"tensor {name!r} is corrupted (SHA-256 mismatch)")
        # writable views into one buffer (no second copy of the data)
        arrays[name] = np.frombuffer(buf, dtype=dt, count=math.prod(shape), offset=begin).reshape(
            shape
        )
    meta["tensors"] = {
        name: {"dtype": header[name]["dtype"], "shape": header[name]["shape"], "sha256": digest}
        for name, _, _, _, _, digest in table
    }
    return meta, arrays


def _read_exactly(f, n, fail):
    """``n`` bytes from ``f`` (one read() may return less, e.g. 2 GiB per call on Linux)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise fail(f"truncated while reading: got {got} of {n} bytes")
        got += k
    return buf


def _parse_header(text, fail):
    """(header dict, metadata with the JSON fields parsed) after checking that it is a fastopt
    header, unchanged (``header_sha256``) and of a format this fastopt reads."""
    try:
        header = json.loads(text.decode("ascii"), parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise fail(f"the safetensors header is corrupted (not ASCII JSON: {exc})") from exc
    except RecursionError:
        raise fail("the safetensors header is corrupted (its JSON is nested too deeply)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or (
        meta.get("format") != FORMAT_NAME and HEADER_HASH not in meta
    ):
        raise fail(
            "not a fastopt checkpoint: a .safetensors file without fastopt's metadata (e.g. "
            "weights saved with safetensors.save_file; read it with safetensors instead)"
        )
    if not all(isinstance(v, str) for v in meta.values()):
        raise fail("the safetensors header is corrupted (a metadata value is not text)")
    if not isinstance(meta.get(HEADER_HASH), str):
        raise fail(f"the safetensors header is corrupted (no {HEADER_HASH} in its metadata)")
    try:
        digest = canonical_hash(header)
    except RecursionError:  # json.dumps nests a little deeper than json.loads did
        raise fail("the safetensors header is corrupted (its JSON is nested too deeply)") from None
    if meta[HEADER_HASH] != digest:
        raise fail("the safetensors header is corrupted (SHA-256 mismatch)")
    version = meta.get("format_version", "")
    # ASCII digits only: str.isdigit() also accepts e.g. "²", which int() refuses
    if not re.fullmatch(r"[0-9]{1,9}\.[0-9]{1,9}", version):
        raise fail(f"invalid metadata: format_version {version!r}")
    major, _, minor = version.partition(".")
    if int(major) > FORMAT_VERSION[0]:
        from .. import __version__

        raise fail(
            f"it was written in checkpoint format {version}, newer than this fastopt "
            f"({__version__}) can read (format {FORMAT_VERSION[0]}.x); upgrade fastopt"
        )
    if int(major) != FORMAT_VERSION[0]:
        raise fail(f"unknown checkpoint format version {version} in a .safetensors file")
    meta = dict(meta, format_version=[int(major), int(minor)])
    try:
        for key in JSON_FIELDS:
            if key in meta:
                meta[key] = json.loads(meta[key], parse_constant=reject_constant)
    except ValueError as exc:
        raise fail(f"invalid metadata: {key}: {exc}") from exc
    except RecursionError:
        raise fail(f"invalid metadata: {key}: its JSON is nested too deeply") from None
    return header, meta


def _tensor_table(header, meta, fail):
    """[(name, dtype, shape, begin, end, sha256)] of the header's tensors in data order, offsets
    from the start of the data, after checking that every size adds up and the tensors tile the
    data exactly (as safetensors requires)."""
    hashes, raw = meta.get("sha256"), meta.get("raw_dtypes", {})
    if not isinstance(hashes, dict) or not isinstance(raw, dict):
        raise fail("invalid metadata: 'sha256' and 'raw_dtypes' must be JSON objects")

    def inconsistent(msg):
        return fail(f"the header is inconsistent: {msg}")

    table = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise inconsistent(f"tensor {name!r} has a malformed entry {e!r}")
        code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        dt = _DTYPES.get(code) if code != "BF16" else bfloat16()
        if dt is None:
            raise inconsistent(f"tensor {name!r} has dtype {code!r}, which no checkpoint uses")
        if not isinstance(shape, list) or not all(type(k) is int and k >= 0 for k in shape):
            raise inconsistent(f"tensor {name!r} has invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(k) is int for k in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise inconsistent(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        nbytes = math.prod(shape) * dt.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise inconsistent(
                f"tensor {name!r} of shape {shape} and dtype {code} has {nbytes} bytes, its "
                f"data_offsets {offsets} say {offsets[1] - offsets[0]}"
            )
        if name in raw:
            dt, shape = _raw_dtype(name, raw[name], code, shape, inconsistent)
        try:
            check_shape(name, dt, shape)
        except ValueError as exc:
            raise inconsistent(str(exc)) from None
        if not isinstance(hashes.get(name), str):
            raise inconsistent(f"tensor {name!r} has no SHA-256 in the metadata")
        table.append((name, dt, shape, offsets[0], offsets[1], hashes[name]))
    missing = sorted(set(hashes) - {t[0] for t in table})
    if missing:
        raise inconsistent(f"the metadata lists tensors that are not in the file: {missing}")
    table.sort(key=lambda t: (t[3], t[4]))
    pos = 0
    for name, _, _, begin, end, _ in table:
        if begin != pos:
            raise inconsistent(
                f"tensor {name!r} starts at byte {begin} of the data, the one before it ends at "
                f"{pos} (tensors must follow each other without gaps or overlaps)"
            )
        pos = end
    return table


def _raw_dtype(name, tag, code, shape, inconsistent):
    """(dtype, shape) of a tensor stored as raw bytes (``U8`` with the item bytes as last axis)."""
    try:
        dt = np.dtype(tag) if isinstance(tag, str) else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in "biufc" or dt.str != tag or dt.byteorder == ">":
        raise inconsistent(f"tensor {name!r} has unsupported raw dtype {tag!r}")
    if code != "U8" or not shape or shape[-1] != dt.itemsize:
        raise inconsistent(f"raw tensor {name!r} of dtype {tag} has shape {shape} of {code}")
    return dt, shape[:-1]


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
