"""A loaded checkpoint and restoring it into existing objects (checked first, rolled back on a
late refusal)."""

import copy
from collections.abc import Mapping

import numpy as np

from ..arrays import import_cupy, is_device_array, to_host
from ..paramset import ParamSet
from ..paramset_layout import layout_mismatch, paramset_layout
from .fileformat import CheckpointError


class Checkpoint:
    """A loaded, verified checkpoint.

    Attributes: ``path``, ``device``, ``metadata`` (the file's metadata: for a .safetensors
    checkpoint its ``__metadata__`` with the JSON entries parsed, ``format_version`` as a list
    and ``tensors``, name -> dtype, shape and sha256; for format 1 its JSON header), ``format_version``,
    ``fastopt_version``, ``created``, ``algorithm``, ``hyperparameters``, ``params`` (dict name ->
    array), ``optimizer_state`` (an optimizer ``state_dict()``, schedules rebuilt, tuples as
    tuples), ``plateau_state``, ``ema_state``, ``rng_state``, ``extra`` (each ``None`` when not
    saved), ``optimizer_layout`` (per param group, the names and shapes of the ParamSet the
    optimizer was built over, in packing order, None for other params; ``None`` when not
    recorded, as in files written before fastopt recorded it). :meth:`restore` loads them into
    existing objects.
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
        self.optimizer_layout = contents.get("optimizer_layout")

    def __repr__(self):
        parts = [f"{len(self.params)} params"]
        if self.optimizer_state is not None:
            parts.append(f"optimizer={self.algorithm}")
        parts += [
            k for k in ("plateau", "ema", "rng", "extra") if getattr(self, _ATTR[k]) is not None
        ]
        return f"Checkpoint({self.path!r}, {', '.join(parts)}, created={self.created!r})"

    def error(self, msg):
        """A :class:`CheckpointError` saying why this checkpoint cannot be restored."""
        return CheckpointError(f"cannot restore checkpoint {self.path!r}: {msg}", self.path)

    def _need(self, what):
        value = getattr(self, _ATTR[what])
        if value is None:
            raise self.error(f"it holds no {what} state")
        return value

    def restore(self, *, params=None, optimizer=None, plateau=None, ema=None, rng=None):
        """Load the saved state into existing objects: ``params`` (ParamSet or dict name ->
        array; values copied in place), ``optimizer`` (via its ``load_state_dict``), ``plateau``,
        ``ema`` (``load_state_dict``) and ``rng`` (a Generator; its bit generator's state is set).

        Names, shapes, dtypes, the optimizer class and the RNG kind are checked before anything
        changes; if an object's own ``load_state_dict`` still refuses, the objects already
        restored are rolled back. Mismatches raise :class:`CheckpointError`.

        An optimizer or EMA over a ParamSet keeps its state as flat arrays laid out like the
        ParamSet's buffer, so the layout it was saved over (names, order, shapes) must be the
        target's: the one recorded in the file, or for a file without that record the order and
        shapes of the saved parameters of the same names. Over plain arrays only the sizes are
        checked (by the objects' ``load_state_dict``).
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
                raise self.error("its optimizer state is not a dict")
            saved_algo, here = state.get("algorithm"), type(optimizer).__name__
            if saved_algo != here:
                raise self.error(f"it holds {saved_algo} optimizer state, the optimizer is {here}")
            self.check_optimizer_layout(optimizer)
            state = _tree_to_host(state)  # the optimizer moves it to its own device
        if plateau is not None:
            self._dry_run(plateau, self._need("plateau"), "plateau")
        if ema is not None:
            self._need("ema")
            if not callable(getattr(ema, "load_state_dict", None)):
                raise TypeError(f"ema {type(ema).__name__} has no load_state_dict()")
            self._check_ema_layout(ema)
        if rng is not None:
            saved = self._need("rng")
            bitgen = getattr(rng, "bit_generator", rng)
            if not isinstance(bitgen, np.random.BitGenerator):
                raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
            kind = saved.get("bit_generator") if isinstance(saved, dict) else None
            if kind != type(bitgen).__name__:
                raise self.error(
                    f"it holds {kind} RNG state, the generator uses {type(bitgen).__name__}"
                )
            try:
                type(bitgen)().state = copy.deepcopy(saved)
            except (ValueError, TypeError, KeyError) as exc:
                raise self.error(f"invalid RNG state: {exc}") from exc

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
            raise self.error(f"the {what} refused the saved state: {exc}") from exc

    def _dry_run(self, obj, state, what):
        """Validate ``state`` by loading it into a shallow copy of ``obj``."""
        if not callable(getattr(obj, "load_state_dict", None)):
            raise TypeError(f"{what} {type(obj).__name__} has no load_state_dict()")
        try:
            probe = copy.copy(obj)
        except Exception:
            return
        self._load(probe, copy.deepcopy(state), what)

    def check_optimizer_layout(self, optimizer):
        """CheckpointError unless each param group over a ParamSet (``optimizer.sources()``) has
        the layout saved; nothing changes."""
        sources = getattr(optimizer, "sources", None)
        if not callable(sources):
            return  # e.g. a wrapper: its own load_state_dict checks what it can
        saved = self.optimizer_layout
        if saved is not None and not isinstance(saved, list):
            raise self.error("its optimizer_layout is not a list")
        groups = sources()
        for i, source in enumerate(groups):
            here = paramset_layout(source)
            if here is None:
                continue
            if saved is None:
                theirs = self._layout_from_params(here)
            else:  # None: a group saved over plain arrays; a missing one: load_state_dict refuses
                theirs = saved[i] if i < len(saved) else None
            what = "optimizer" if len(groups) == 1 else f"optimizer's param group {i}"
            self._compare_layouts(theirs, here, f"the {what}")

    def _check_ema_layout(self, ema):
        """CheckpointError unless an EMA over a ParamSet gets the state of the same layout."""
        here = getattr(ema, "paramset_layout", None)
        if not isinstance(here, list):
            return
        state = self.ema_state
        if isinstance(state, dict) and "paramset" in state:
            theirs = state["paramset"]
        else:
            theirs = self._layout_from_params(here)
        self._compare_layouts(theirs, here, "the EMA")

    def _layout_from_params(self, here):
        """The saved parameters named in the layout ``here``, as a layout in the file's order,
        or None when the file lacks one of them (then nothing says what the state is over)."""
        names = {name for name, _ in here}
        if not isinstance(self.params, dict) or not names <= set(self.params):
            return None
        return [[n, list(np.shape(a))] for n, a in self.params.items() if n in names]

    def _compare_layouts(self, saved, here, what):
        if saved is None:
            return
        try:
            problem = layout_mismatch(saved, here)
        except ValueError as exc:
            raise self.error(f"{what}'s saved ParamSet layout is invalid: {exc}") from exc
        if problem is not None:
            raise self.error(f"{what} was saved over another ParamSet: {problem}")

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
            raise self.error(
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
            raise self.error("parameters do not match: " + "; ".join(problems))
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
        return to_host(src)
    if is_device_array(dst) and not is_device_array(src):
        return import_cupy("restoring into a GPU array").asarray(src)
    return src


def _tree_to_host(v):
    if isinstance(v, dict):
        return {k: _tree_to_host(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_tree_to_host(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_tree_to_host(x) for x in v)
    return to_host(v) if is_device_array(v) else v
