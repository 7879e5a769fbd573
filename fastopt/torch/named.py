"""Hyperparameters that name parameters (``weight_decay_mask``, ``trust_ratio_mask``,
``muon_params``), from an adapter's torch param groups to its core optimizer's groups.

The user names a parameter as ``named_parameters()`` does (a group's ``param_names``), or by its
index in the group's ``params`` when the group has no names, as the core optimizers name list
entries by index. The core steps each run of consecutive parameters with gradients as a group
over a slice of the flat buffer, whose segments are named ``"m"`` (the parameter's index in the
buffer) and ``"m+"`` (the padding after it): a callable mask is called with the user's name (the
padding is neither decayed nor adapted), and ``muon_params`` (``"hidden"``, names, a callable)
is decided over the WHOLE torch group, whichever parameters have gradients this step, then
given to the run's group as the names of its chosen segments.
"""

from ..optim.muon import muon_selection

NAMING = ("weight_decay_mask", "trust_ratio_mask", "muon_params")
"""The hyperparameters translated here (those a core class has)."""

_MASKS = ("weight_decay_mask", "trust_ratio_mask")


def user_names(group):
    """Per parameter of a torch param group (``params`` order): its ``param_names`` entry, else
    its index in the group."""
    names = group.get("param_names")
    return list(names) if names else list(range(len(group["params"])))


def named_shapes(group):
    """``[(user name, shape)]`` of a torch param group's parameters."""
    return [(n, tuple(p.shape)) for n, p in zip(user_names(group), group["params"])]


def check_group(group, value, where):
    """ValueError, before anything changes, for a ``muon_params`` that names parameters the
    group does not have or chooses one that is not 2-D (torch.optim.Muon's rule)."""
    named = named_shapes(group)
    try:
        chosen = muon_selection(value, named)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    for name, shape in named:
        if name in chosen and len(shape) != 2:
            raise ValueError(
                f"{where}: Muon updates 2-D parameters only; parameter {name!r} has shape "
                f"{shape}: leave it to the AdamW fallback (muon_params='hidden', a list of "
                "names, or a callable)"
            )


class RunNames:
    """The translated values, kept per (name, run) while the user's value stays the same, so
    that a mask wrapper keeps its identity from step to step (the core caches its per-segment
    flags by the mask)."""

    def __init__(self):
        self._kept = {}

    def translate(self, name, value, group, bucket_params, run):
        """``value`` of hyperparameter ``name`` for the core group over ``run`` = (bucket, i, j)
        of a bucket holding ``bucket_params`` of torch group ``group``."""
        key = tuple(value) if isinstance(value, list) else value
        kept = self._kept.get((name, run))
        if kept is not None and _same(kept[0], key):
            return kept[1]
        if len(self._kept) >= 4096:
            self._kept.clear()
        out = _translated(name, value, group, bucket_params, run)
        self._kept[(name, run)] = (key, out)
        return out


def _same(a, b):
    if callable(a) or callable(b):
        return a is b
    return type(a) is type(b) and a == b


def _translated(name, value, group, bucket_params, run):
    _, i, j = run
    index = {id(p): n for n, p in zip(user_names(group), group["params"])}
    users = [index[id(p)] for p in bucket_params]
    if name == "muon_params":
        chosen = muon_selection(value, named_shapes(group))
        return [str(m) for m in range(i, j) if users[m] in chosen]
    if name in _MASKS and callable(value):
        return _segment_mask(value, users)
    return value


def _segment_mask(mask, users):
    def by_segment(segment, shape):
        if segment.endswith("+"):  # the padding between two parameters
            return False
        return mask(users[int(segment)], shape)

    return by_segment
