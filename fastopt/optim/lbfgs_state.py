"""LBFGS's state as a plain dict (torch's LBFGS layout) and back, checked before it is restored:
``LBFGS.state_dict`` and ``LBFGS.load_state_dict`` call these.

torch keeps LBFGS's global state under its first parameter; so does this layout:
``{"algorithm": "LBFGS", "state": {0: entry}, "param_groups": [group]}`` where ``entry`` holds
``func_evals`` and ``n_iter`` (ints), ``t``, ``H_diag``, ``prev_loss`` (floats), ``d`` and
``prev_flat_grad`` (flat vectors over every parameter), ``old_dirs`` and ``old_stps`` (lists of
such vectors, oldest first), ``ro`` (list of floats) and ``al`` (list of ``history_size`` floats
or None), each present once the algorithm has set it.
"""

import math
from collections.abc import Mapping

import numpy as np

from .. import arrays

INTS = ("func_evals", "n_iter")
FLOATS = ("t", "H_diag", "prev_loss")
VECTORS = ("d", "prev_flat_grad")
HISTORY = ("old_dirs", "old_stps")
KEYS = (*INTS, *FLOATS, *VECTORS, *HISTORY, "ro", "al")


def state_dict(opt):
    """Plain-dict snapshot of ``opt`` (an LBFGS): NumPy copies and Python scalars."""
    st = opt.units()[0].state
    entry = {}
    for k, v in st.items():
        if k in VECTORS:
            entry[k] = _host_copy(v)
        elif k in HISTORY:
            entry[k] = [_host_copy(a) for a in v]
        elif k in ("ro", "al"):
            entry[k] = [None if x is None else float(x) for x in v]
        elif k in INTS:
            entry[k] = int(v)
        else:
            entry[k] = float(v)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    group["params"] = list(range(len(opt.units())))
    return {
        "algorithm": type(opt).__name__,
        "state": {0: entry} if entry else {},
        "param_groups": [group],
    }


def _host_copy(v):
    return np.array(arrays.to_host(v) if not isinstance(v, np.ndarray) else v)


def load_state_dict(opt, sd):
    """Check ``sd`` fully, then restore it into ``opt``."""
    name = type(opt).__name__
    if not isinstance(sd, Mapping) or not {"state", "param_groups"} <= set(sd):
        raise ValueError("not an optimizer state_dict: expected keys 'state' and 'param_groups'")
    algo = sd.get("algorithm", name)
    if algo != name:
        raise ValueError(f"state_dict is for {algo}, this optimizer is {name}")
    groups = sd["param_groups"]
    if not isinstance(groups, (list, tuple)) or len(groups) != 1:
        raise ValueError("an LBFGS state_dict has exactly one param group")
    saved = groups[0]
    nparams = len(opt.units())
    if list(saved.get("params", [])) != list(range(nparams)):
        raise ValueError(
            f"the state_dict's param group has {len(saved.get('params', []))} parameters, "
            f"this optimizer {nparams}"
        )
    unknown = set(saved) - set(opt.defaults) - {"params", "initial_lr"}
    if unknown:
        raise ValueError(f"param_groups[0] has unknown hyperparameters {sorted(unknown)}")
    group = {**opt.param_groups[0], **{k: v for k, v in saved.items() if k != "params"}}
    group["params"] = opt.param_groups[0]["params"]
    opt._check(group)
    state = sd["state"]
    if not isinstance(state, Mapping) or set(state) - {0}:
        raise ValueError("an LBFGS state_dict's state has at most one entry, under 0")
    entry = _checked_entry(opt, state.get(0, {}), group["history_size"])
    opt.param_groups[0].clear()
    opt.param_groups[0].update(group)
    opt.units()[0].state = entry


def _checked_entry(opt, entry, history_size):
    if not isinstance(entry, Mapping):
        raise ValueError("state[0] is not a dict")
    unknown = set(entry) - set(KEYS)
    if unknown:
        raise ValueError(
            f"state[0] has unknown entries {sorted(unknown)}; LBFGS keeps {list(KEYS)}"
        )
    out = {}
    for k in INTS:
        if k in entry:
            v = entry[k]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"state[0][{k!r}] must be an int >= 0, got {v!r}")
            out[k] = int(v)
    for k in FLOATS:
        if k in entry:
            out[k] = _finite(f"state[0][{k!r}]", entry[k])
    for k in VECTORS:
        if k in entry:
            out[k] = _vector(opt, f"state[0][{k!r}]", entry[k])
    lengths = set()
    for k in (*HISTORY, "ro"):
        if k in entry:
            v = entry[k]
            if not isinstance(v, (list, tuple)) or len(v) > history_size:
                raise ValueError(
                    f"state[0][{k!r}] must be a list of at most history_size={history_size} entries"
                )
            lengths.add(len(v))
            if k == "ro":
                out[k] = [_finite(f"state[0]['ro'][{i}]", x) for i, x in enumerate(v)]
            else:
                out[k] = [_vector(opt, f"state[0][{k!r}][{i}]", a) for i, a in enumerate(v)]
    if len(lengths) > 1 or (lengths and not all(k in entry for k in (*HISTORY, "ro"))):
        raise ValueError("state[0]['old_dirs'], ['old_stps'] and ['ro'] must have one length")
    if "al" in entry:
        al = entry["al"]
        if not isinstance(al, (list, tuple)) or len(al) != history_size:
            raise ValueError(
                f"state[0]['al'] must be a list of history_size={history_size} entries"
            )
        out["al"] = [
            None if x is None else _finite(f"state[0]['al'][{i}]", x) for i, x in enumerate(al)
        ]
    if (
        "n_iter" in out
        and out["n_iter"] > 0
        and not all(
            k in out for k in ("d", "t", "old_dirs", "H_diag", "prev_flat_grad", "prev_loss")
        )
    ):
        raise ValueError("state[0] has n_iter > 0 but lacks the direction or history it implies")
    return out


def _finite(where, v):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where} must be a number, got {v!r}")
    if not math.isfinite(float(v)):
        raise ValueError(f"{where} must be finite, got {v!r}")
    return float(v)


def _vector(opt, where, v):
    a = (
        arrays.to_host(v)
        if hasattr(v, "shape") and not isinstance(v, np.ndarray)
        else np.asarray(v)
    )
    if a.dtype.kind != "f":
        raise TypeError(f"{where} has dtype {a.dtype}, expected floats")
    if a.ndim != 1 or a.size != opt._numel:
        raise ValueError(f"{where} has shape {a.shape}, expected ({opt._numel},)")
    return opt._vec.to_vector(np.array(a, dtype=opt._dtype))
