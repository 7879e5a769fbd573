"""``fastopt.torch.LBFGS``: ``torch.optim.LBFGS`` over one flat buffer, stepped by
:class:`fastopt.optim.LBFGS`.

torch's L-BFGS gathers every parameter's gradient into a new flat vector at each evaluation of
the closure and walks the parameters one by one to apply each update; here the parameters are
views of one flat buffer (:class:`~fastopt.torch.flat.FlatBuffer`) and their gradients views of
one flat gradient buffer, so the fastopt core (its dot products and updates fused passes over
the buffer, reductions in float64) reads and writes them in place. The iterates, the line search
and the number of closure calls are torch's (tests/test_torch_lbfgs.py).
"""

import inspect

import numpy as np
import torch

from .. import arrays
from ..optim.lbfgs import LBFGS as CoreLBFGS
from ..optim.lbfgs_state import FLOATS, HISTORY, INTS, VECTORS
from .dropin import plain_value
from .flat import FlatBuffer, check_no_overlap, check_param
from .optimizer import closure_loss, split_arguments

HYPERPARAMETERS = (
    "lr",
    "max_iter",
    "max_eval",
    "tolerance_grad",
    "tolerance_change",
    "history_size",
    "line_search_fn",
)
"""The core's hyperparameters: the keys of the param group it reads at every step."""


class LBFGS(torch.optim.Optimizer):
    """``torch.optim.LBFGS``-compatible L-BFGS running :class:`fastopt.optim.LBFGS` (Nocedal &
    Wright, *Numerical Optimization*, Algorithms 7.4 and 7.5, as torch implements them): the
    same arguments and defaults, ``step(closure)`` with a closure that clears the gradients,
    computes the loss, calls ``backward()`` and returns the loss; it returns the loss of the
    first evaluation. A parameter whose ``.grad`` is None after the closure counts as a zero
    gradient, as in torch.

    As torch: one param group (no per-parameter options), the parameters of one device and
    dtype. They are moved into one flat buffer (``param.data`` becomes a view of it, so
    ``model.to()`` afterwards means a new optimizer, as for the other ``fastopt.torch``
    classes). ``backend`` chooses the fastopt backend (default: from the tensors).

    ``state_dict()`` is torch's format (the global state under the first parameter: ``d``,
    ``prev_flat_grad``, ``old_dirs``, ``old_stps`` as tensors, ``ro``, ``H_diag`` and ``al`` as
    0-d tensors, ``t``, ``prev_loss`` floats, ``func_evals``, ``n_iter`` ints), so a state saved
    by ``torch.optim.LBFGS`` loads here and back; it is checked completely before anything
    changes. LR schedulers drive ``param_groups[0]["lr"]`` as in torch. The state lives in the
    core (``opt.core``); ``opt.state`` stays empty.
    """

    core_class = CoreLBFGS

    def __init__(self, params, *args, **kwargs):
        # the core's arguments and defaults (its signature is this class's, set below)
        defaults, _ = split_arguments(CoreLBFGS, args, kwargs)
        backend = defaults.pop("backend")
        if defaults["max_eval"] is None:  # torch's default, kept in the param group as torch does
            defaults["max_eval"] = defaults["max_iter"] * 5 // 4
        # bad hyperparameters fail before any parameter moves
        CoreLBFGS([np.zeros(1, np.float32)], **{k: plain_value(v) for k, v in defaults.items()})
        self._buf = None
        super().__init__(params, defaults)
        group = self.param_groups[0]
        params = group["params"]
        names = group.get("param_names") or [f"param_groups[0][{j}]" for j in range(len(params))]
        for name, p in zip(names, params):
            check_param(p, name)
        for what in ("device", "dtype"):
            kinds = {str(getattr(p, what)) for p in params}
            if len(kinds) > 1:
                raise ValueError(f"LBFGS needs parameters of one {what}, got {sorted(kinds)}")
        if params and params[0].dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"LBFGS takes float32 or float64 parameters, got {params[0].dtype} (its vector "
                "kernels have no 16-bit storage)"
            )
        if len({id(p) for p in params}) != len(params):
            raise ValueError("LBFGS: a parameter appears twice in its param group")
        check_no_overlap(zip(names, params))
        self._buf = FlatBuffer.pack(list(params), list(names))
        self.core = CoreLBFGS(
            self._buf.slice(0, len(params)), **self._hyperparameters(), backend=backend
        )

    def add_param_group(self, param_group):
        """As torch: L-BFGS takes exactly one param group."""
        if self.param_groups:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        super().add_param_group(param_group)

    def _hyperparameters(self):
        group = self.param_groups[0]
        return {k: plain_value(group[k]) for k in HYPERPARAMETERS}

    def zero_grad(self, set_to_none=True):
        """torch's ``zero_grad``: ``.grad`` to None, or (``set_to_none=False``) one fill of the
        flat gradient buffer, into which backward then accumulates."""
        self._buf.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure):
        """Up to ``max_iter`` iterations (torch's ``LBFGS.step``): the closure is evaluated
        with gradients enabled, as often as the algorithm needs; returns its first loss."""
        if not callable(closure):
            raise TypeError(
                "LBFGS.step takes a closure that clears the gradients, computes the loss, calls "
                f"backward() and returns the loss; got {type(closure).__name__}"
            )
        self._buf.check_in_place()
        self.core.param_groups[0].update(self._hyperparameters())
        buf = self._buf

        def evaluate():
            loss = closure_loss(closure)
            present = buf.gather_grads()
            for view, has in zip(buf.grad_views, present):
                if not has:  # torch's LBFGS: a missing gradient is a zero one
                    view.zero_()
            return loss

        return self.core.step(evaluate)

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """torch.optim.LBFGS's format (copies of the state, on the parameters' device)."""
        core = self.core.state_dict()
        p0 = self._buf.params[0]
        entry = {}
        for k, v in core["state"].get(0, {}).items():
            if k in VECTORS:
                entry[k] = _tensor(v, p0)
            elif k in HISTORY:
                entry[k] = [_tensor(a, p0) for a in v]
            elif k in ("ro", "al"):
                entry[k] = [None if x is None else _tensor(x, p0) for x in v]
            elif k == "H_diag":
                entry[k] = _tensor(v, p0)
            else:
                entry[k] = v
        groups = []
        for group in self.param_groups:
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = list(range(len(group["params"])))
            groups.append(saved)
        return {"state": {0: entry} if entry else {}, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """A state saved by ``torch.optim.LBFGS`` or ``fastopt.torch.LBFGS``: checked
        completely (one group of as many parameters, hyperparameters, every vector's length)
        before anything changes."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, (list, tuple)) or len(groups) != 1:
            raise ValueError("an LBFGS state_dict has exactly one param group")
        saved = groups[0]
        n = len(self._buf.params)
        if len(saved.get("params", ())) != n:
            raise ValueError(
                f"the state_dict's param group has {len(saved.get('params', ()))} parameters, "
                f"this optimizer {n}"
            )
        state = state_dict.get("state", {})
        if len(state) > 1:
            raise ValueError("an LBFGS state_dict's state has at most one entry")
        entry = next(iter(state.values()), {})
        extra = {k: v for k, v in saved.items() if k not in ("params", *HYPERPARAMETERS)}
        core_group = {k: plain_value(v) for k, v in saved.items() if k in HYPERPARAMETERS}
        self.core.load_state_dict(
            {
                "algorithm": "LBFGS",
                "state": {0: _plain_entry(entry)} if entry else {},
                "param_groups": [{**core_group, "params": [0]}],
            }
        )
        group = self.param_groups[0]
        group.update({k: v for k, v in saved.items() if k != "params"})
        group.update(extra)


def _tensor(v, like):
    """``v`` (a NumPy vector or a float) as a tensor on ``like``'s device, in its dtype."""
    return torch.as_tensor(np.asarray(arrays.to_host(v)), dtype=like.dtype).to(like.device)


def _plain_entry(entry):
    """torch's LBFGS state entry with its tensors as the core's state_dict keeps them: vectors
    as NumPy arrays, 0-d tensors as floats (ints for the counters)."""
    out = {}
    for k, v in entry.items():
        if k in INTS:
            out[k] = int(v) if not isinstance(v, bool) else v
        elif k in FLOATS:
            out[k] = _number(v)
        elif k in ("ro", "al"):
            out[k] = [None if x is None else _number(x) for x in v] if _is_list(v) else v
        elif k in HISTORY:
            out[k] = [_vector(a) for a in v] if _is_list(v) else v
        elif k in VECTORS:
            out[k] = _vector(v)
        else:
            out[k] = v  # an unknown entry: the core names it
    return out


def _is_list(v):
    return isinstance(v, (list, tuple))


def _number(v):
    if isinstance(v, torch.Tensor):
        return float(v) if v.numel() == 1 else v
    return v


def _vector(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().reshape(-1).numpy() if v.dtype != torch.bfloat16 else v
    return v


LBFGS.__signature__ = inspect.signature(CoreLBFGS.__init__).replace(
    parameters=[
        p for name, p in inspect.signature(CoreLBFGS.__init__).parameters.items() if name != "self"
    ]
)
