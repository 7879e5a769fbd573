"""CPU offload (ZeRO-Offload style): the optimizer step of a GPU model runs on the host.

``CPUOffload(fastopt.torch.AdamW, model.parameters(), lr=...)`` keeps a float32 master copy of
every parameter and the optimizer state in host memory (pinned when the model is on a GPU, packed
into one flat buffer per group by :func:`fastopt.torch.flatten_`, in the 8-bit layout with
``state_dtype="int8"``). A step copies the gradients
to the host (non-blocking, on a side CUDA stream), runs the fused CPU step of the inner
``fastopt.torch`` optimizer over the master weights, and copies the updated weights back to the
device parameters (cast to their dtype, non-blocking on the side stream; torch's current stream
waits for it). With CPU tensors standing in for the device, the copies are plain copies and the
result is the inner optimizer's, bit for bit.
"""

from collections import defaultdict
from collections.abc import MutableMapping

import torch

from ..optim.precision import INT8, MASTER
from .flat import check_no_overlap, check_param, pack_trainable
from .optimizer import FastoptOptimizer, check_listed_once, closure_loss, torch_add_param_group
from .schedule_free import ScheduleFreeModes


class CPUOffload(torch.optim.Optimizer):
    """Run ``optimizer_class`` (a ``fastopt.torch`` class) on host master weights of ``params``
    (tensors or param groups, all on one device). Other arguments go to ``optimizer_class``.

    ``param_groups`` are this object's (LR schedulers drive it like any torch optimizer;
    ``add_param_group`` adds the group to the inner optimizer too);
    ``state_dict()``/``load_state_dict()`` are the inner optimizer's, in torch's format, with
    every key of this object's param groups (LR schedulers' ``initial_lr``, ``max_lr``, ...), so
    a state saved from ``torch.optim.AdamW`` or ``fastopt.torch.AdamW`` loads here and back.
    ``inner`` is the host optimizer, ``masters`` the host copies in parameter order. Distinct
    parameters sharing memory (tied through ``.data``) are refused: each would get its own master.

    As on the plain optimizers: ``params`` may be ``model.named_parameters()`` (names in errors
    and in the state_dict's ``param_names``), ``max_grad_norm`` etc. report through
    ``last_grad_norm``, ``last_step_taken`` and ``skipped_steps``; torch's ``foreach=`` /
    ``fused=`` are accepted (``capturable=True`` / ``differentiable=True`` refused) and ``lr``
    may be a one-element tensor. ``state`` maps each device parameter to the inner state of
    its master (live); clearing it, deleting or replacing an entry, or assigning ``state``
    edits the inner optimizer's state, as on the plain optimizers (``opt.state.clear()``
    restarts the moments, as in torch). A parameter listed twice in one group is refused, as
    on the plain optimizers. Over ``SGDScheduleFree`` / ``AdamWScheduleFree`` the object
    is a :class:`ScheduleFreeOffload`, with ``train()`` / ``eval()`` moving the device
    parameters too.
    """

    def __init__(self, optimizer_class, params, *args, **kwargs):
        if not (
            isinstance(optimizer_class, type) and issubclass(optimizer_class, FastoptOptimizer)
        ):
            raise TypeError(
                f"optimizer_class must be a fastopt.torch optimizer class, got {optimizer_class!r}"
            )
        groups = param_groups_of(params)
        for gi, g in enumerate(groups):
            check_listed_once(g, gi, f"CPUOffload param_groups[{gi}]")
        devices = {p.device for g in groups for p in g["params"] if isinstance(p, torch.Tensor)}
        if len(devices) > 1:  # one copy stream, on one device, orders every copy of a step
            raise ValueError(
                f"CPUOffload: the parameters are on {sorted(map(str, devices))}; one CPUOffload "
                "steps the parameters of one device (its copy stream and pinned host memory are "
                "set up for it): use a CPUOffload per device"
            )
        self._pairs, self._names, master_groups = [], [], []
        for gi, g in enumerate(groups):
            pairs = self._new_pairs(gi, g, g["params"])
            master_groups.append({**g, "params": [m for _, m in pairs]})
        check_no_overlap(self._distinct_params())
        self.masters = [m for _, m in self._pairs]
        self._devices = {p.device for p, _ in self._pairs}
        self._cuda = any(d.type == "cuda" for d in self._devices)
        self._int8 = isinstance(kwargs.get("state_dtype"), str) and kwargs["state_dtype"] == INT8
        self._host = pack_trainable(self.masters, pin_memory=self._cuda, int8=self._int8)
        self.inner = optimizer_class(master_groups, *args, **kwargs)
        self._stream = torch.cuda.Stream(next(iter(self._devices))) if self._cuda else None
        self._grad_views = self._inner_grad_views()
        super().__init__(groups, self.inner.defaults)
        self._master_of = self._masters_by_param()
        self._outer_state = OuterState(self)

    @property
    def state(self):
        """Device parameter -> the inner optimizer's state of its host master
        (:class:`OuterState`)."""
        return self._outer_state

    @state.setter
    def state(self, value):
        """``opt.state = {...}`` (a mapping of device parameters to entries, as torch users
        replace it: ``opt.state = defaultdict(dict)`` restarts every parameter) replaces the
        inner optimizer's state with the same entries under the masters; its next step takes
        them as the plain optimizer takes a replaced ``state``. torch's constructor sets an
        empty dict before this object has its state: ignored."""
        outer = self.__dict__.get("_outer_state")
        if outer is None or value is outer:
            return
        entries = {}
        for p, entry in dict(value).items():
            master = self._master_of.get(id(p))
            if master is None:
                raise KeyError(f"opt.state: {p!r} is not a parameter of this CPUOffload")
            entries[master] = entry
        self.inner.state = defaultdict(dict, entries)

    def __new__(cls, *args, **kwargs):
        """A :class:`ScheduleFreeOffload` (with ``train()`` / ``eval()``) when
        ``optimizer_class`` has them, else this class: code that probes
        ``hasattr(opt, "train")`` (as schedule-free training loops do) sees the truth."""
        inner = args[0] if args else kwargs.get("optimizer_class")
        if cls is CPUOffload and isinstance(inner, type) and issubclass(inner, ScheduleFreeModes):
            cls = ScheduleFreeOffload
        return super().__new__(cls)

    def __reduce__(self):
        """Pickling and ``copy.deepcopy``: rebuilt over the (copied) device parameters with the
        inner optimizer's arguments, then given this object's ``state_dict()`` (which holds the
        float32 masters of 16-bit parameters)."""
        inner = self.inner
        kwargs = {k: inner.defaults[k] for k in (*inner._hyper_names, *inner.torch_flags)}
        groups = [{k: v for k, v in g.items()} for g in self.param_groups]
        args = (type(inner), groups, {**kwargs, **inner._options}, self.state_dict())
        return _rebuilt, args

    def _masters_by_param(self):
        """id(device parameter) -> its host master (the first, for one listed twice)."""
        out = {}
        for p, m in self._pairs:
            out.setdefault(id(p), m)
        return out

    def _new_pairs(self, gi, group, params):
        """(device parameter, host float32 master) for each of ``params`` (param group ``gi``),
        appended to ``_pairs`` (their labels to ``_names``); checked, nothing else touched."""
        names = group.get("param_names") or [f"param_groups[{gi}][{j}]" for j in range(len(params))]
        pairs = []
        for name, p in zip(names, params):
            check_param(p, name)
            m = torch.nn.Parameter(
                p.detach().to("cpu", torch.float32, copy=True), requires_grad=p.requires_grad
            )
            pairs.append((p, m))
        self._pairs.extend(pairs)
        self._names.extend(names)
        return pairs

    def _distinct_params(self):
        """(label, device parameter) of each distinct parameter (one listed twice counts once)."""
        return {id(p): (name, p) for name, (p, _) in zip(self._names, self._pairs)}.values()

    def _inner_grad_views(self):
        """id(master) -> the view of the inner optimizer's gradient buffer its gradient goes to."""
        return {
            id(m): v for _, buf in self.inner._buckets for m, v in zip(buf.params, buf.grad_views)
        }

    def add_param_group(self, param_group):
        """torch's ``add_param_group``; the group's parameters get host masters (packed as in
        ``__init__``) in a new param group of the inner optimizer, so they are trained as the
        inner optimizer alone would train them. Bad parameters or hyperparameters, a device
        this object does not step on, or memory shared with a parameter it has raise before
        anything changes. (torch's ``__init__`` calls this for the groups the inner optimizer was
        built with; those only join ``param_groups``.)"""
        if len(self.param_groups) < len(self.inner.param_groups):
            super().add_param_group(param_group)
            return
        gi, n = len(self.param_groups), len(self._pairs)
        torch_add_param_group(self, param_group)
        group = self.param_groups[-1]
        try:
            check_listed_once(group, gi, f"CPUOffload param_groups[{gi}]")
            pairs = self._new_pairs(gi, group, group["params"])
            self._check_devices(gi, pairs)
            check_no_overlap(self._distinct_params())
            masters = [m for _, m in pairs]
            host = pack_trainable(masters, pin_memory=self._cuda, int8=self._int8)
            self.inner.add_param_group({**group, "params": masters})
        except Exception:
            self.param_groups.pop()
            del self._pairs[n:], self._names[n:]
            raise
        self.masters.extend(masters)
        self._host.extend(host)
        self._grad_views = self._inner_grad_views()
        self._master_of = self._masters_by_param()

    def _check_devices(self, gi, pairs):
        devices = {p.device for p, _ in pairs}
        if self._devices and not devices <= self._devices:
            raise ValueError(
                f"param_groups[{gi}] is on {sorted(map(str, devices))}; this CPUOffload steps "
                f"parameters on {sorted(map(str, self._devices))} (its copy stream and pinned "
                "host memory are set up for them): use a CPUOffload per device"
            )

    def _sync_hyperparameters(self):
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            for k in self.inner._hyper_names:
                inner[k] = outer[k]

    def zero_grad(self, set_to_none=True):
        """Gradients of the device parameters (and of the host masters) to None or zero."""
        for p, _ in self._pairs:
            if p.grad is not None:
                p.grad = None if set_to_none else p.grad.zero_()
        self.inner.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        """Gradients to the host, the inner step on the masters, weights back to the device."""
        if not getattr(self.inner, "train_mode", True):  # schedule-free, in eval mode
            raise RuntimeError(
                f"CPUOffload({type(self.inner).__name__}).step() in eval mode: the parameters "
                "hold the averaged point x; call train() first"
            )
        loss = closure_loss(closure)
        self._sync_hyperparameters()
        views = self._grad_views
        for (p, m), name in zip(self._pairs, self._names):
            if p.grad is not None and id(m) not in views:  # unfrozen after construction
                raise ValueError(
                    f"parameter {name} has a gradient but had requires_grad=False when the "
                    "optimizer was built, so it is not in its buffers; build a new optimizer"
                )
        with self._side_stream():
            for p, m in self._pairs:
                if p.grad is None or id(m) not in views:
                    m.grad = None
                    continue
                view = views[id(m)]
                view.copy_(p.grad, non_blocking=self._cuda)
                m.grad = view
        if self._stream is not None:
            self._stream.synchronize()  # the host step needs every gradient
        self.inner.step()
        self._copy_to_device()
        return loss

    def _copy_to_device(self):
        """The masters into the trainable device parameters (cast to their dtype: 16-bit
        parameters get the master rounded), non-blocking on the side stream, which torch's
        current stream then waits for. Call under ``torch.no_grad()``."""
        with self._side_stream():
            for p, m in self._pairs:
                if p.requires_grad:
                    p.copy_(m, non_blocking=self._cuda)
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)

    def _side_stream(self):
        if self._stream is None:
            return _Nothing()
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        return torch.cuda.stream(self._stream)

    @property
    def skipped_steps(self):
        """Steps the inner optimizer skipped (``skip_nonfinite``), as on the plain optimizers."""
        return self.inner.skipped_steps

    @property
    def last_grad_norm(self):
        """The gradient norm of the last step (with ``max_grad_norm``; over the host copies of
        the gradients), as on the plain optimizers; None before a step or without it."""
        return self.inner.last_grad_norm

    @property
    def last_step_taken(self):
        """Whether the last step updated the parameters (False: skipped), as on the plain
        optimizers; None before a step."""
        return self.inner.last_step_taken

    def state_dict(self):
        """The inner optimizer's state_dict (torch's format), with this object's hyperparameters;
        the float32 master copy of each 16-bit device parameter is in its state as
        ``"master_param"`` (live), as ``master_weights=True`` keeps it."""
        self._sync_hyperparameters()
        sd = self.inner.state_dict()
        sd["param_groups"] = [  # every key of this object's groups, LR schedulers' included
            {**inner, **_without_params(outer)}
            for outer, inner in zip(self.param_groups, sd["param_groups"])
        ]
        for i, (p, m) in enumerate(self._pairs):
            if i in sd["state"] and p.element_size() == 2:
                sd["state"][i] = {**sd["state"][i], MASTER: m.detach()}
        return sd

    def load_state_dict(self, state_dict):
        """Load into the inner optimizer (checked there), then take over its param groups' keys.
        Masters come from the entries' ``"master_param"`` where there is one, else from the
        device parameters (a state saved by ``torch.optim`` or for float32 parameters)."""
        state, masters = {}, {}
        for i, entry in state_dict["state"].items():
            entry = dict(entry)
            if MASTER in entry:
                masters[i] = entry.pop(MASTER)
            state[i] = entry
        for i, v in masters.items():
            if not (isinstance(i, int) and 0 <= i < len(self._pairs)):
                raise ValueError(f"state[{i!r}] has a {MASTER!r} but no parameter here")
            if tuple(v.shape) != tuple(self._pairs[i][1].shape):
                raise ValueError(
                    f"state[{i}][{MASTER!r}] has shape {tuple(v.shape)}, the parameter "
                    f"{tuple(self._pairs[i][1].shape)}"
                )
        self.inner.load_state_dict({**state_dict, "state": state})
        with torch.no_grad():
            for i, (p, m) in enumerate(self._pairs):
                m.copy_(masters[i] if i in masters else p)
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            params = outer["params"]
            outer.clear()  # the saved group's keys, as torch's load_state_dict keeps them
            outer.update(_without_params(inner), params=params)


class ScheduleFreeOffload(CPUOffload):
    """A :class:`CPUOffload` over ``SGDScheduleFree`` or ``AdamWScheduleFree`` (made by
    ``CPUOffload(...)`` itself): ``train()`` / ``eval()`` swap the host masters between the
    gradient point y and the averaged point x with the inner optimizer's own ``train()`` /
    ``eval()``, then copy them to the device parameters as a step does (16-bit parameters get
    the float32 master rounded), so the model holds what the inner optimizer's parameters hold.
    ``step()`` in eval mode raises before anything is written."""

    @property
    def train_mode(self):
        """Which point the parameters hold (True: y, where gradients are taken; False: x)."""
        return self.inner.train_mode

    @torch.no_grad()
    def eval(self):
        """Put the evaluation point x into the masters and the device parameters."""
        if self.inner.train_mode:
            self.inner.eval()
            self._copy_to_device()

    @torch.no_grad()
    def train(self):
        """Put the gradient point y back into the masters and the device parameters."""
        if not self.inner.train_mode:
            self.inner.train()
            self._copy_to_device()


class OuterState(MutableMapping):
    """``CPUOffload.state``: device parameter -> the inner optimizer's state of its host master
    (torch's format, live views of the host state, as ``inner.state[master]``). Edits go to the
    inner optimizer's state, whose next step takes them as a plain optimizer does
    (``clear()``, ``del state[p]``, ``state[p] = {}`` restart the parameter's state, as in
    torch); a parameter without state maps to an empty entry, as in torch's defaultdict."""

    def __init__(self, offload):
        self._offload = offload

    def __getitem__(self, p):
        return self._offload.inner.state[self._master(p)]

    def _master(self, p):
        master = self._offload._master_of.get(id(p))
        if master is None:
            raise KeyError(p)
        return master

    def __setitem__(self, p, entry):
        self._offload.inner.state[self._master(p)] = entry

    def __delitem__(self, p):
        del self._offload.inner.state[self._master(p)]

    def clear(self):
        self._offload.inner.state.clear()

    def _items(self):
        inner, seen = self._offload.inner.state, set()
        for p, m in self._offload._pairs:
            if id(p) not in seen and inner.get(m):
                seen.add(id(p))
                yield p

    def __iter__(self):
        return self._items()

    def __len__(self):
        return sum(1 for _ in self._items())

    def __contains__(self, p):
        master = self._offload._master_of.get(id(p))
        return master is not None and bool(self._offload.inner.state.get(master))


def param_groups_of(params):
    """torch's forms of ``params`` (tensors, ``(name, tensor)`` pairs as ``named_parameters()``
    gives, or param-group dicts of either) as param-group dicts whose ``"params"`` are tensors,
    with ``"param_names"`` where they came named, as torch's ``add_param_group`` makes them
    (this object needs the tensors before torch's constructor sees the groups). A list mixing
    named and unnamed parameters raises ValueError, as in torch."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [dict(g) for g in params]
    else:
        groups = [{"params": params}]
    for gi, g in enumerate(groups):
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        named = [isinstance(p, tuple) for p in ps]
        if any(named):
            if not all(named):
                raise ValueError(
                    f"param_groups[{gi}] mixes (name, tensor) pairs and bare tensors; torch "
                    "needs all optimizer params with or without names"
                )
            g["param_names"] = [n for n, _ in ps]
            ps = [p for _, p in ps]
        g["params"] = ps
    return groups


def _without_params(group):
    return {k: v for k, v in group.items() if k != "params"}


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rebuilt(optimizer_class, groups, kwargs, state_dict):
    """The object :meth:`CPUOffload.__reduce__` describes."""
    opt = CPUOffload(optimizer_class, groups, **kwargs)
    opt.load_state_dict(state_dict)
    return opt
