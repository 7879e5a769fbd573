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

import torch

from ..optim.precision import INT8, MASTER
from .flat import check_no_overlap, check_param, pack_trainable
from .optimizer import FastoptOptimizer, closure_loss


class CPUOffload(torch.optim.Optimizer):
    """Run ``optimizer_class`` (a ``fastopt.torch`` class) on host master weights of ``params``
    (tensors or param groups of one device each). Other arguments go to ``optimizer_class``.

    ``param_groups`` are this object's (LR schedulers drive it like any torch optimizer;
    ``add_param_group`` adds the group to the inner optimizer too);
    ``state_dict()``/``load_state_dict()`` are the inner optimizer's, in torch's format, with
    every key of this object's param groups (LR schedulers' ``initial_lr``, ``max_lr``, ...), so
    a state saved from ``torch.optim.AdamW`` or ``fastopt.torch.AdamW`` loads here and back.
    ``inner`` is the host optimizer, ``masters`` the host copies in parameter order. Distinct
    parameters sharing memory (tied through ``.data``) are refused: each would get its own master.
    """

    def __init__(self, optimizer_class, params, *args, **kwargs):
        if not (
            isinstance(optimizer_class, type) and issubclass(optimizer_class, FastoptOptimizer)
        ):
            raise TypeError(
                f"optimizer_class must be a fastopt.torch optimizer class, got {optimizer_class!r}"
            )
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = [dict(g, params=list(g["params"])) for g in params]
        else:
            groups = [{"params": params}]
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
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
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
        loss = closure_loss(closure)
        self._sync_hyperparameters()
        views = self._grad_views
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
        with self._side_stream():
            for p, m in self._pairs:
                if p.requires_grad:
                    p.copy_(m, non_blocking=self._cuda)
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        return loss

    def _side_stream(self):
        if self._stream is None:
            return _Nothing()
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        return torch.cuda.stream(self._stream)

    @property
    def skipped_steps(self):
        return self.inner.skipped_steps

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


def _without_params(group):
    return {k: v for k, v in group.items() if k != "params"}


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
