"""Loading torch's per-parameter optimizer state into the adapter's flat state.

After ``torch.optim.Optimizer.load_state_dict`` has matched groups and cast the tensors,
:func:`install_state` converts ``opt.state`` (param -> {name: tensor}) into the fastopt core's
state_dict layout, one entry per run of parameters with equal scalar state, and lets the core's
``load_state_dict`` check it (state names for these settings, shapes, steps, hyperparameters).
Only then are the flat state tensors written.
"""

import torch

SCALAR_STATE = ("step", "mu_product", "eta", "mu")
"""The state entries torch keeps as 0-d tensors (NAdam's running product of momentum factors,
ASGD's eta and mu); every other tensor entry is a per-element array."""


def _entry(p, raw):
    """(record, arrays) of one parameter's torch state: scalar state as sorted (name, value)
    pairs and the state arrays; (None, {}) for a parameter without state. torch.optim.SGD keeps
    no ``step``: a momentum buffer means the first step is behind it."""
    arrays, scalars = {}, {}
    for name, v in (raw or {}).items():
        if v is None:  # torch.optim.SGD without momentum stores momentum_buffer=None
            continue
        if name in SCALAR_STATE or not isinstance(v, torch.Tensor):
            scalars[name] = int(float(v)) if name == "step" else float(v)
        else:
            arrays[name] = v
    if not arrays and not scalars:
        return None, {}
    scalars.setdefault("step", 1 if arrays else 0)
    return tuple(sorted(scalars.items())), arrays


def install_state(opt):
    """Check ``opt.state`` (as torch's loader left it) with the fastopt core and copy it into
    ``opt``'s flat state tensors and records. Raises ValueError naming the problem before
    anything of ``opt``'s flat state changes."""
    pending = []
    for k, (gi, buf) in enumerate(opt._buckets):
        entries = [_entry(p, opt.state.get(p)) for p in buf.params]
        runs, start = [], 0
        for i in range(1, len(entries) + 1):
            if i == len(entries) or _run_key(entries[i]) != _run_key(entries[start]):
                runs.append((start, i))
                start = i
        tg = opt.param_groups[gi]
        missing = [n for n in opt._hyper_names if n not in tg]
        if missing:
            raise ValueError(
                f"the state_dict does not fit {type(opt).__name__}: its param_groups[{gi}] has "
                f"no {missing}"
            )
        groups, states = [], {}
        for r, (i, j) in enumerate(runs):
            groups.append(
                {"params": buf.slice(i, j), **{n: _value(tg[n]) for n in opt._hyper_names}}
            )
            record, arrays = entries[i]
            if record is None:
                continue
            state = dict(record)
            for name in arrays:
                try:
                    parts = [entries[m][1][name].reshape(-1) for m in range(i, j)]
                except KeyError:
                    raise ValueError(
                        f"state of {buf.names[i]}..{buf.names[j - 1]} differs"
                    ) from None
                state[name] = torch.cat(parts).cpu().numpy()
            states[r] = state
        core = opt.core_class(groups, **opt._options)
        saved = core.state_dict()
        saved["state"] = states
        try:
            core.load_state_dict(saved)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"the state_dict does not fit {type(opt).__name__} (param_groups[{gi}], params "
                f"{', '.join(buf.names[:3])}{'...' if len(buf.names) > 3 else ''}): {exc}"
            ) from exc
        pending.append((k, buf, runs, core, entries))
    for k, buf, runs, core, entries in pending:
        for u, (i, j) in zip(core.units(), runs):
            record = entries[i][0]
            opt._records[k][i:j] = [record] * (j - i)
            if record is None:
                continue
            lo, hi = buf.offsets[i][0], buf.offsets[j - 1][1]
            for name, a in u.state.items():
                if hasattr(a, "shape"):
                    dst = opt._state_tensor(k, name)[lo:hi]
                    dst.copy_(torch.as_tensor(a, device=dst.device))


def _run_key(entry):
    record, arrays = entry
    return record, tuple(sorted(arrays))


def _value(v):
    return v.item() if isinstance(v, torch.Tensor) else v
