"""The checkpoint file format: writing the bytes of one file and reading them back verified.

Layout (format 1.0; every integer little-endian)::

    b"FASTOPT-CKPT\\n"                                   13 bytes, the magic line
    header  <u16 major, u16 minor, u64 json_length, u64 file_length, u32 json_crc32,
             u32 header_crc32>                          28 bytes; header_crc32 covers the magic
                                                        and the header's first 24 bytes
    JSON metadata, UTF-8, json_length bytes
    zero padding to a multiple of 64 bytes              -> start of the data section
    raw array bytes, little-endian C order, each array starting at a multiple of 64 bytes
    trailer b"FOCK-END" + SHA-256 of every byte before the trailer              40 bytes

The JSON holds ``format``, ``format_version``, ``fastopt_version``, ``created``, ...,
``arrays`` (for every array: ``name``, key ``path``, ``shape``, ``dtype``, ``offset`` from the
start of the data section, ``nbytes`` and ``sha256``), ``data_length`` and ``contents``
(:mod:`fastopt.checkpoint.encoding`). Files are written with :func:`fastopt.fileio.atomic_write`.
"""

import hashlib
import json
import math
import os
import struct
import zlib

import numpy as np

from ..arrays import bfloat16, storage_name
from ..fileio import atomic_write
from .encoding import ALLOWED_KINDS, format_path

MAGIC = b"FASTOPT-CKPT\n"
FORMAT_VERSION = (1, 0)
"""(major, minor). Readers refuse a newer major version; minor versions only add fields."""
FORMAT_NAME = "fastopt-checkpoint"
HEADER = struct.Struct("<HHQQII")
PREFIX_LEN = len(MAGIC) + HEADER.size
TRAILER_TAG = b"FOCK-END"
TRAILER_LEN = len(TRAILER_TAG) + hashlib.sha256().digest_size
ALIGNMENT = 64


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted, foreign, too new, or does not match the
    objects it is restored into. ``path`` is the file concerned."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


def align(n):
    """``n`` rounded up to a multiple of :data:`ALIGNMENT`."""
    return -(-n // ALIGNMENT) * ALIGNMENT


# --------------------------------------------------------------------------- writing


def write_file(path, fields, arrays):
    """Write one checkpoint file at ``path``, atomically: the metadata ``fields`` (a dict, given
    ``format``, ``format_version``, ``data_length`` and ``arrays`` here) and ``arrays``, a list of
    (key path, host little-endian C-contiguous array).

    Arrays are not copied: each is hashed for the table, then hashed again as it is written; one
    that changed meanwhile (another thread stepping the optimizer) raises RuntimeError and the
    previous file stays in place."""
    table, blobs, offset = [], [], 0
    for p, a in arrays:
        data = a.reshape(-1).view(np.uint8)
        offset = align(offset)
        digest = hashlib.sha256(data).hexdigest()
        table.append(
            {
                "name": format_path(p),
                "path": list(p),
                "shape": list(a.shape),
                "dtype": dtype_tag(a.dtype),
                "offset": offset,
                "nbytes": int(data.nbytes),
                "sha256": digest,
            }
        )
        blobs.append((offset, data, digest, format_path(p)))
        offset += data.nbytes
    meta = {"format": FORMAT_NAME, "format_version": list(FORMAT_VERSION), **fields}
    meta["data_length"] = offset
    meta["arrays"] = table
    meta["contents"] = meta.pop("contents")  # last: the readable fields come first
    meta_bytes = json.dumps(meta, allow_nan=False, separators=(",", ":")).encode("utf-8")
    data_start = align(PREFIX_LEN + len(meta_bytes))
    total = data_start + offset + TRAILER_LEN
    head = HEADER.pack(*FORMAT_VERSION, len(meta_bytes), total, zlib.crc32(meta_bytes), 0)[:-4]
    head += struct.pack("<I", zlib.crc32(MAGIC + head))
    prefix = MAGIC + head + meta_bytes
    with atomic_write(path) as f:
        h = hashlib.sha256()

        def put(b):
            h.update(b)
            f.write(b)

        put(prefix)
        pos = len(prefix)
        for off, data, digest, name in blobs:
            put(bytes(data_start + off - pos))
            mv = memoryview(data)
            if hashlib.sha256(mv).hexdigest() != digest:  # e.g. another thread stepping
                raise RuntimeError(
                    f"array {name!r} changed while {path!r} was being saved; nothing was "
                    "replaced (do not update the parameters or optimizer during save())"
                )
            put(mv)
            pos = data_start + off + data.nbytes
        put(bytes(max(data_start - pos, 0)))  # no arrays: pad up to the (empty) data section
        f.write(TRAILER_TAG + h.digest())


# --------------------------------------------------------------------------- reading


def read_file(path):
    """(metadata dict, list of arrays in table order) of the checkpoint at ``path``, after
    verifying the magic, format version, header CRC, length, the trailer's SHA-256 and every
    array's length, dtype, shape and SHA-256. The arrays are writable views of one buffer.
    :class:`CheckpointError` names ``path`` and the problem."""

    def fail(msg):
        return CheckpointError(f"cannot load checkpoint {path!r}: {msg}", path)

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise fail(
                "the file is empty (0 bytes): not a fastopt checkpoint, or a write was interrupted"
            )
        head = f.read(PREFIX_LEN)
        if not head.startswith(MAGIC):
            if MAGIC.startswith(head):
                raise fail(f"truncated: only {size} bytes, it ends inside the magic line")
            raise fail(f"not a fastopt checkpoint: it does not start with {MAGIC!r}{_sniff(head)}")
        if len(head) < PREFIX_LEN:
            raise fail(f"truncated: only {size} bytes, it ends inside the {PREFIX_LEN}-byte header")
        major, minor, json_len, total, json_crc, crc = HEADER.unpack(head[len(MAGIC) :])
        if zlib.crc32(head[:-4]) != crc:
            raise fail("the header is corrupted (CRC-32 mismatch)")
        if major > FORMAT_VERSION[0]:
            from .. import __version__

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
        data_start = align(PREFIX_LEN + json_len)
        if data_start + TRAILER_LEN > total:
            raise fail(
                f"the header is inconsistent: metadata of {json_len} bytes in a {total}-byte file"
            )
        buf = bytearray(total)
        view = memoryview(buf)
        view[:PREFIX_LEN] = head
        got = PREFIX_LEN
        while got < total:  # one read() may return less (e.g. 2 GiB per call on Linux)
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        if got != total:
            raise fail(f"truncated while reading: got {got} of {total} bytes")

    body = view[: total - TRAILER_LEN]
    trailer = bytes(view[total - TRAILER_LEN :])
    meta_text = bytes(view[PREFIX_LEN : PREFIX_LEN + json_len])
    if zlib.crc32(meta_text) != json_crc:
        raise fail("the metadata (JSON) is corrupted (CRC-32 mismatch)")
    if trailer[: len(TRAILER_TAG)] != TRAILER_TAG:
        raise fail("the trailer is corrupted or missing")
    if hashlib.sha256(body).digest() != trailer[len(TRAILER_TAG) :]:
        raise fail("checksum mismatch: " + _locate_damage(meta_text, view, data_start))
    try:
        meta = json.loads(meta_text.decode("utf-8"), parse_constant=_reject_constant)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
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
    return meta, arrays


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
    if data_start + data_length + TRAILER_LEN != total:
        raise ValueError(f"data_length {data_length} does not fit the {total}-byte file")
    out = []
    for e in table:
        name = e["name"]
        dt = dtype_of_tag(e["dtype"])
        if dt is None:
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


def dtype_tag(dtype):
    """The ``dtype`` entry of an array in the header: NumPy's ``dtype.str`` (``"<f4"``), or
    ``"bfloat16"`` for ``ml_dtypes.bfloat16`` (whose ``str`` ``"<V2"`` does not name it)."""
    return "bfloat16" if storage_name(dtype) == "bfloat16" else dtype.str


def dtype_of_tag(tag):
    """The NumPy dtype of a header ``dtype`` entry, or None for one a checkpoint cannot hold."""
    if tag == "bfloat16":
        return bfloat16()
    try:
        dt = np.dtype(tag) if isinstance(tag, str) else None
    except TypeError:
        return None
    if dt is None or dt.kind not in ALLOWED_KINDS or dt.str != tag or dt.byteorder == ">":
        return None
    return dt
