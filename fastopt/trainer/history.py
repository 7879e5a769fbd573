"""The per-epoch record of a training run, with its JSON form."""

import json
import math
import os

import numpy as np

from ..fileio import write_text


class History(dict):
    """Per-epoch metrics, ``history[name]`` a list with one value per epoch: ``epoch``,
    ``loss`` and the training metrics, ``val_*`` with validation, ``lr``, ``time`` (seconds)
    and ``samples_per_s``. ``meta`` holds run facts (``best_epoch``, ``stopped_early``,
    ``interrupted``, ``stop_reason``, ...). :meth:`to_json` / :meth:`from_json` round-trip both.

    :attr:`stop_reason` says why training ended before its last epoch (None when it ran them
    all): ``"nonfinite_loss"`` (the training loss became NaN or infinite; the last finite weights
    were restored), ``"early_stopping"`` (``patience``), ``"callback"`` or ``"interrupted"``;
    :attr:`stop_epoch` is the epoch it happened in."""

    def __init__(self, *args, meta=None, **kw):
        super().__init__(*args, **kw)
        self.meta = dict(meta or {})

    @property
    def stop_reason(self):
        return self.meta.get("stop_reason")

    @property
    def stop_epoch(self):
        return self.meta.get("stop_epoch")

    def append(self, row):
        for k, v in row.items():
            self.setdefault(k, []).append(v)

    def to_json(self, path=None, *, indent=1):
        """The history as JSON text (``{"metrics": {...}, "meta": {...}}``; non-finite values
        as null); written to ``path`` too when given (atomically, :mod:`fastopt.fileio`)."""
        text = json.dumps(
            {"metrics": jsonable(dict(self)), "meta": jsonable(self.meta)}, indent=indent
        )
        if path is not None:
            write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path):
        """Read :meth:`to_json` output (a JSON string or a file path)."""
        text = text_or_path
        if isinstance(text, os.PathLike) or not text.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        d = json.loads(text)
        return cls(
            {k: [math.nan if v is None else v for v in vs] for k, vs in d["metrics"].items()},
            meta=d.get("meta"),
        )


def jsonable(v):
    """``v`` with NumPy scalars as Python numbers, tuples as lists and non-finite floats as
    None (JSON has no NaN)."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v
