"""Reading checkpoint format 1, the ``FASTOPT-CKPT`` file fastopt wrote before its checkpoints
became ``.safetensors`` files (:mod:`fastopt.checkpoint.fileformat`). Read-only: nothing writes it
any more; :func:`fastopt.load` still reads and verifies it.

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
(:mod:`fastopt.checkpoint.encoding`, arrays referenced by their index in ``arrays``).
"""

import hashlib
import json
import math
import struct
import zlib

import numpy as np

from ..arrays import bfloat16
from .encoding import ALLOWED_KINDS

MAGIC = b"FASTOPT-CKPT\n"
VERSION = (1, 0)
FORMAT_NAME = "fastopt-checkpoint"
HEADER = struct.Struct("<HHQQII")
PREFIX_LEN = len(MAGIC) + HEADER.size
TRAILER_TAG = b"FOCK-END"
TRAILER_LEN = len(TRAILER_TAG) + hashlib.sha256().digest_size
ALIGNMENT = 64


def _align(n):
    return -(-n // ALIGNMENT) * ALIGNMENT


def reject_constant(name):
    """``parse_constant`` for :func:`json.loads`: NaN and Infinity are not JSON."""
    raise ValueError(f"non-standard JSON constant {name}")


def read_legacy(f, size, fail):
    """(metadata dict, list of arrays in table order) of the format-1 checkpoint open as ``f``
    (``size`` bytes, positioned anywhere), after verifying the magic, format version, header CRC,
    length, the trailer's SHA-256 and every array's length, dtype, shape and SHA-256. The arrays
    are writable views of one buffer. ``fail(message)`` makes the CheckpointError to raise."""
    f.seek(0)
    head = f.read(PREFIX_LEN)
    if len(head) < PREFIX_LEN:
        if len(head) < len(MAGIC):
            raise fail(f"truncated: only {size} bytes, it ends inside the magic line")
        raise fail(f"truncated: only {size} bytes, it ends inside the {PREFIX_LEN}-byte header")
    major, minor, json_len, total, json_crc, crc = HEADER.unpack(head[len(MAGIC) :])
    if zlib.crc32(head[:-4]) != crc:
        raise fail("the header is corrupted (CRC-32 mismatch)")
    if major != VERSION[0]:  # later formats are .safetensors files, without this magic line
        raise fail(f"unknown checkpoint format version {major}.{minor} in a format-1 header")
    if size < total:
        raise fail(f"truncated: the file has {size} bytes, its header says {total}")
    if size > total:
        raise fail(
            f"{size - total} unexpected bytes after the end of the checkpoint ({total} bytes)"
        )
    data_start = _align(PREFIX_LEN + json_len)
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
        meta = json.loads(meta_text.decode("utf-8"), parse_constant=reject_constant)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ValueError(
                f"format is {meta.get('format') if isinstance(meta, dict) else meta!r}"
            )
        if meta.get("format_version") != [major, minor]:
            raise ValueError(
                f"format_version {meta.get('format_version')!r} differs from the header's"
            )
        table = _array_table(meta, data_start, total)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise fail(f"invalid metadata: {exc}") from exc
    except RecursionError:
        raise fail("invalid metadata: its JSON is nested too deeply") from None
    arrays = []
    for name, dt, shape, lo, nbytes, digest in table:
        if hashlib.sha256(view[lo : lo + nbytes]).hexdigest() != digest:
            raise fail(f"array {name!r} is corrupted (SHA-256 mismatch)")
        # writable views into the file's buffer (no second copy of the data)
        a = np.frombuffer(view, dtype=dt, count=math.prod(shape), offset=lo).reshape(shape)
        arrays.append(a if dt.isnative else a.astype(dt.newbyteorder("=")))
    return meta, arrays


def _locate_damage(meta_text, view, data_start):
    try:
        meta = json.loads(meta_text.decode("utf-8"), parse_constant=reject_constant)
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


def _array_table(meta, data_start, total):
    """[(name, dtype, shape, start in the file, nbytes, sha256)] of the metadata's checked
    ``arrays`` table; ValueError (or TypeError, KeyError) names what is wrong."""
    table = meta["arrays"]
    data_length = meta["data_length"]
    if not isinstance(table, list) or not isinstance(data_length, int):
        raise ValueError("'arrays' must be a list and 'data_length' an int")
    if data_start + data_length + TRAILER_LEN != total:
        raise ValueError(f"data_length {data_length} does not fit the {total}-byte file")
    out = []
    for e in table:
        name = e["name"]
        dt = _dtype_of_tag(e["dtype"])
        if dt is None:
            raise ValueError(f"array {name!r} has unsupported dtype {e['dtype']!r}")
        shape = e["shape"]
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"array {name!r} has invalid shape {shape!r}")
        check_shape(name, dt, shape)
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
        out.append((name, dt, shape, data_start + offset, nbytes, e["sha256"]))
    return out


def check_shape(name, dtype, shape):
    """ValueError unless NumPy can make an array of ``shape`` and ``dtype``: a shape with a zero
    holds no bytes, so only this catches a dimension past NumPy's limits (e.g. ``[0, 2**70]``)."""
    try:
        np.broadcast_to(np.empty((), dtype), shape)  # a view: nothing of that size is allocated
    except ValueError as exc:
        raise ValueError(
            f"array {name!r} has shape {shape}, which NumPy cannot hold ({exc})"
        ) from None


def _dtype_of_tag(tag):
    """The NumPy dtype of a format-1 ``dtype`` entry (NumPy's ``dtype.str``, or ``"bfloat16"``),
    or None for one a checkpoint cannot hold."""
    if tag == "bfloat16":
        return bfloat16()
    try:
        dt = np.dtype(tag) if isinstance(tag, str) else None
    except TypeError:
        return None
    if dt is None or dt.kind not in ALLOWED_KINDS or dt.str != tag or dt.byteorder == ">":
        return None
    return dt
