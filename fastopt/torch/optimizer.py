"""The adapter: one ``torch.optim.Optimizer`` subclass that delegates each step to a fastopt
optimizer core (a class of ``fastopt.optim.OPTIMIZERS``) over ParamSets adopting the flat buffers.

torch's ``param_groups`` stay the source of truth for hyperparameters (LR schedulers write
``group["lr"]``; the adapter reads it at every step). The state lives in one flat tensor per
(bucket, state name), laid out like the parameter buffer; ``opt.state[p]`` holds views of it in
torch's format (``"step"`` and scalar state such as NAdam's ``"mu_product"`` as 0-d float tensors,
refreshed by :meth:`state_dict`).

Per-parameter steps, as torch keeps them: a parameter whose ``.grad`` is None is skipped (no
update, no weight decay, its step count stays). Each step launches one kernel per *run*:
consecutive parameters of a bucket that have a gradient and equal scalar state (step count, ...).
When every parameter has a gradient, as in ordinary training, that is one launch per bucket.
"""

import inspect

import numpy as np
import torch

from .. import arrays
from .flat import FlatBuffer, allocate, as_tensor, check_param

_LAYOUT_CACHE = 16
"""Core optimizers kept per distinct layout of runs (usually one is ever used)."""


def split_arguments(core_class, args, kwargs):
    """(hyperparameters, options): the core constructor's named arguments with their defaults,
    and its ``**options`` (backend, clipping, skipping, precision), from a call's arguments."""
    sig = inspect.signature(core_class.__init__)
    bound = sig.bind(None, None, *args, **kwargs)
    bound.apply_defaults()
    hyper, options = {}, {}
    for name, param in sig.parameters.items():
        if name in ("self", "params"):
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            options = dict(bound.arguments.get(name, {}))
        else:
            hyper[name] = bound.arguments[name]
    return hyper, options


def closure_loss(closure):
    """The ``closure`` argument of torch's ``step``: its loss, evaluated with gradients
    enabled (``step`` itself runs under ``no_grad``), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _plain(v):
    return v.item() if isinstance(v, torch.Tensor) else v


def _scalar_dtype():
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class FastoptOptimizer(torch.optim.Optimizer):
    """Base of ``fastopt.torch.SGD``, ``Adam``, ...: a ``torch.optim.Optimizer`` whose step is
    one fastopt kernel call per (param group, device, dtype) over flat buffers.

    Takes the hyperparameters of its fastopt class (``core_class``) with the same defaults, and
    its options as keywords: ``max_grad_norm``, ``max_grad_value``, ``skip_nonfinite``,
    ``backend``, ``stream``, and the storage precision options (``state_dtype``,
    ``master_weights``, ``stochastic_rounding``, ``seed``; :mod:`fastopt.optim.precision`),
    passed to the fastopt class unchanged. ``skipped_steps``, ``last_step_taken`` and
    ``last_grad_norm`` are the core's, as in :class:`fastopt.optim.Optimizer`.

    bfloat16/float16 parameters: the state is kept in the parameter's dtype by default, as
    torch.optim keeps it; ``state_dtype="float32"`` keeps it in float32, ``master_weights=True``
    keeps a float32 copy of each 16-bit parameter (and float32 state), which ``state_dict()``
    holds as ``"master_param"`` (:data:`fastopt.optim.precision.MASTER`) beside torch's entries.
    State tensors keep their dtype through ``load_state_dict`` (torch's loader would round them
    to the parameter's); a state saved by ``torch.optim`` starts the master copy from the
    16-bit parameter.
    """

    core_class = None

    def __init__(self, params, *args, **kwargs):
        if self.core_class is None:
            raise TypeError("FastoptOptimizer is a base class; use e.g. fastopt.torch.AdamW")
        hyper, self._options = split_arguments(self.core_class, args, kwargs)
        self._hyper_names = tuple(hyper)  # not self.defaults: torch adds keys to it
        self._buckets = []  # (param group index, FlatBuffer)
        self._frozen = []  # (name, tensor) of params without requires_grad: never stepped
        self._records = []  # per bucket, per param: scalar state as sorted (name, value) pairs
        self._tensors = []  # per bucket: state name -> flat state tensor
        self._cores = {}
        self._version = 0
        self.skipped_steps = 0
        self.last_step_taken = None
        self.last_grad_norm = None
        self._probe(hyper)  # bad hyperparameters or options fail before any parameter moves
        super().__init__(params, hyper)

    def _probe(self, hyper):
        """A throwaway core over one element: checks hyperparameters and options."""
        shape = (1, 1) if getattr(self.core_class, "matrices_only", False) else 1  # Muon
        return self.core_class([{"params": np.zeros(shape, np.float32), **hyper}], **self._options)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group):
        """torch's ``add_param_group``; the group's trainable parameters are then packed into one
        flat buffer per (dtype) on the group's one device. Sparse and complex parameters and
        mixed devices raise before anything moves."""
        gi = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            items = self._checked_items(gi, group)
            self._probe({k: _plain(group[k]) for k in self._hyper_names})
        except Exception:
            self.param_groups.pop()
            raise
        by_dtype, seen = {}, set()
        for name, p in items:
            if id(p) in seen:  # a tied parameter listed twice: one slot (torch warns)
                continue
            seen.add(id(p))
            if p.requires_grad:
                by_dtype.setdefault(p.dtype, []).append((name, p))
            else:
                self._frozen.append((name, p))
        for pairs in by_dtype.values():
            buf = FlatBuffer.pack([p for _, p in pairs], [n for n, _ in pairs])
            self._buckets.append((gi, buf))
            self._records.append([None] * len(buf.params))
            self._tensors.append({})
        self._cores.clear()

    @staticmethod
    def _checked_items(gi, group):
        names = group.get("param_names") or [
            f"param_groups[{gi}][{j}]" for j in range(len(group["params"]))
        ]
        items = list(zip(names, group["params"]))
        for name, p in items:
            check_param(p, name)
        devices = {str(p.device) for _, p in items}
        if len(devices) > 1:
            raise ValueError(
                f"param_groups[{gi}] mixes devices {sorted(devices)}; put the parameters of each "
                "device in a param group of their own"
            )
        return items

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none=True):
        """torch's ``zero_grad``: ``.grad`` to None (the default; the next step copies the fresh
        gradients of the next backward into the flat buffer, in one pass, and attaches its
        views), or, with ``set_to_none=False``, one fill of each flat gradient buffer, after
        which backward accumulates straight into it."""
        for _, buf in self._buckets:
            buf.zero_grad(set_to_none)
        for _, p in self._frozen:
            if p.grad is not None:
                p.grad = None if set_to_none else p.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a ``.grad`` (torch's ``step``)."""
        loss = closure_loss(closure)
        for _, buf in self._buckets:
            buf.check_in_place()
        for name, p in self._frozen:
            if p.grad is not None:
                raise ValueError(
                    f"parameter {name} has a gradient but had requires_grad=False when the "
                    "optimizer was built, so it is not in its buffers; build a new optimizer"
                )
        key = []
        for k, (_, buf) in enumerate(self._buckets):
            key.extend((k, i, j) for i, j in self._runs(k, buf.gather_grads()))
        if not key:
            return loss
        key = tuple(key)
        core, version = self._core(key)
        for cg, (k, _, _) in zip(core.param_groups, key):
            tg = self.param_groups[self._buckets[k][0]]
            for name in self._hyper_names:
                cg[name] = _plain(tg[name])
        units = core.units()
        for u, (k, i, j) in zip(units, key):
            record = self._records[k][i]
            if record is None:
                u.state = {}
            elif version != self._version:
                u.state = self._views(u, k, i, j)
            u.state.update(record or ())
        self._cores[key] = (core, self._version)
        core.step()  # on torch's current stream of each CUDA bucket (fastopt.streams)
        self.last_grad_norm = core.last_grad_norm
        self.last_step_taken = core.last_step_taken
        if not core.last_step_taken:
            self.skipped_steps += 1
            return loss
        for u, (k, i, j) in zip(units, key):
            self._harvest(u, k, i, j)
        return loss

    def _runs(self, k, present):
        """[(i, j)]: maximal ranges of consecutive params with gradients and equal scalar state."""
        records, runs, start = self._records[k], [], None
        if all(present) and records.count(records[0]) == len(records):  # the usual case
            return [(0, len(records))]
        for i, has in enumerate(present):
            if start is not None and not (has and records[i] == records[start]):
                runs.append((start, i))
                start = None
            if has and start is None:
                start = i
        if start is not None:
            runs.append((start, len(present)))
        return runs

    def _core(self, key):
        """(core optimizer, state version its units are bound to) for a layout of runs."""
        hit = self._cores.get(key)
        if hit is not None:
            return hit
        if len(self._cores) >= _LAYOUT_CACHE:
            self._cores.clear()
        groups = []
        for k, i, j in key:
            gi, buf = self._buckets[k]
            tg = self.param_groups[gi]
            groups.append(
                {"params": buf.slice(i, j), **{n: _plain(tg[n]) for n in self._hyper_names}}
            )
        return self.core_class(groups, **self._options), None

    def _views(self, unit, k, i, j):
        """The core unit's state: native flat views of this run's range of the state tensors."""
        buf = self._buckets[k][1]
        lo, hi = buf.offsets[i][0], buf.offsets[j - 1][1]
        out = {}
        for name, t in self._tensors[k].items():
            part = t[lo:hi]
            out[name] = arrays.host_view(part) if unit.device is None else unit.backend.native(part)
        return out

    def _harvest(self, unit, k, i, j):
        """After a step: the run's scalar state into the records; state arrays the core just
        allocated (first step of these params) copied into the flat state tensors."""
        record = tuple(sorted((n, v) for n, v in unit.state.items() if not hasattr(v, "shape")))
        if self._records[k][i] is None:
            buf = self._buckets[k][1]
            lo, hi = buf.offsets[i][0], buf.offsets[j - 1][1]
            for name, a in unit.state.items():
                if hasattr(a, "shape"):
                    self._state_tensor(k, name, a.dtype)[lo:hi].copy_(as_tensor(a, buf.device))
            self._version += 1
        self._records[k][i:j] = [record] * (j - i)

    def _state_tensor(self, k, name, dtype):
        """Bucket ``k``'s flat tensor of state ``name``, allocated in ``dtype`` (the core's
        storage dtype of that slot: the parameter's, ``state_dtype``'s or float32 for master
        weights) on first use."""
        tensors = self._tensors[k]
        if name not in tensors:
            flat = self._buckets[k][1].flat
            tensors[name] = allocate(flat.numel(), dtype, flat.device, flat.is_pinned())
        return tensors[name]

    # ------------------------------------------------------------------ state
    def _publish_state(self):
        """``self.state`` in torch's format from the flat state and the records."""
        for k, (_, buf) in enumerate(self._buckets):
            tensors = self._tensors[k]
            for p, (lo, hi), record in zip(buf.params, buf.offsets, self._records[k]):
                if record is None:
                    self.state.pop(p, None)
                    continue
                entry = {name: t[lo:hi].view(p.shape) for name, t in tensors.items()}
                for name, v in record:
                    entry[name] = torch.tensor(float(v), dtype=_scalar_dtype())
                self.state[p] = entry

    def state_dict(self):
        """torch's ``state_dict()`` (the state tensors are live views, as torch's are)."""
        self._publish_state()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict``: a state saved by ``torch.optim.X`` or ``fastopt.torch.X``.
        Everything is checked (by torch, then by the fastopt core: state names, shapes, steps,
        hyperparameters) before the optimizer changes; on an error it is left as it was."""
        from .state import install_state, keep_saved_dtypes

        old_state, old_groups = self.state, self.param_groups
        super().load_state_dict(state_dict)
        try:
            keep_saved_dtypes(self, state_dict)
            install_state(self)
        except Exception:
            self.state, self.param_groups = old_state, old_groups
            raise
        self._cores.clear()
        self._version += 1
        self.state.clear()
        self._publish_state()
