"""Plain data parallelism: every rank holds the whole optimizer state; one Allreduce of the flat
gradient buffer per step, the division by the world size folded into the update kernel."""

from ..optim.base import Optimizer
from ..paramset import ParamSet
from ..validation import check_bool, check_positive
from .collectives import Collectives, check_params_equal


def flat_grad(params, grads, what):
    """The flat gradient a step works on: the ParamSet's gradient buffer, or ``grads`` after
    checking it matches the parameters (type, dtype, size, contiguity)."""
    if grads is None:
        return params.grad_flat
    if isinstance(grads, ParamSet):
        grads = grads.grad_flat
    if type(grads) is not type(params.flat):
        raise TypeError(
            f"{what}: gradient is a {type(grads).__name__}, the parameters a "
            f"{type(params.flat).__name__}"
        )
    if grads.dtype != params.dtype:
        raise TypeError(f"{what}: gradient has dtype {grads.dtype}, the parameters {params.dtype}")
    if grads.ndim != 1 or grads.size != params.size:
        raise ValueError(
            f"{what}: gradient must be a flat array of {params.size} elements, got shape "
            f"{grads.shape}"
        )
    if not grads.flags.c_contiguous:
        raise ValueError(f"{what}: gradient is not contiguous")
    return grads


def grad_scale_of(grad_scale):
    """``grad_scale`` as a float (1.0 for None), checked > 0."""
    if grad_scale is None:
        return 1.0
    check_positive("grad_scale", grad_scale)
    return float(grad_scale)


class DataParallel:
    """Average gradients across MPI ranks, then step ``optimizer`` (built over ``params``).

    ``params``: the ParamSet; it is broadcast from ``root`` on construction, so every rank starts
    from the same values. ``optimizer``: any fastopt optimizer over that ParamSet (its
    ``max_grad_norm``, ``max_grad_value`` and ``skip_nonfinite`` apply to the averaged gradient).
    ``debug=True`` checks after every step that all ranks hold identical parameters.

    :meth:`step` = ONE in-place ``Allreduce`` of the flat gradient buffer + the optimizer's
    ``step(grad_scale=grad_scale / world_size)``. Everything else (``param_groups``,
    ``state_dict()``, ``skipped_steps``, ...) is the optimizer's.
    """

    def __init__(self, params, optimizer=None, *, comm=None, root=0, debug=False, cuda_aware=None):
        if not isinstance(params, ParamSet):
            raise TypeError(f"DataParallel needs a ParamSet, got {type(params).__name__}")
        check_bool("debug", debug)
        if optimizer is not None:
            check_over_paramset(optimizer, params, "DataParallel")
        self.params = params
        self.optimizer = optimizer
        self.debug = debug
        self.root = root
        self._coll = Collectives(comm, cuda_aware)
        self.comm = self._coll.comm
        self.rank, self.world_size = self._coll.rank, self._coll.size
        self._coll.start_from_root(params, root, debug)

    @property
    def stats(self):
        """:class:`CommStats` of this object's collectives."""
        return self._coll.stats

    def allreduce_grads(self, grads=None, *, average=True):
        """Sum (``average``: then divide by the world size, one extra pass) the flat gradient
        buffer over all ranks in place, with one Allreduce. For use without :meth:`step`."""
        buf = flat_grad(self.params, grads, "allreduce_grads")
        self._coll.allreduce_sum(buf)
        if average and self.world_size > 1:
            buf *= buf.dtype.type(1.0 / self.world_size)
        return buf

    def step(self, grads=None, *, grad_scale=None):
        """Average this step's gradients (``grads``, a flat array, or the ParamSet's gradient
        buffer) over the ranks and update. The gradient buffer holds the SUM afterwards."""
        if self.optimizer is None:
            raise RuntimeError("DataParallel was built without an optimizer")
        gs = grad_scale_of(grad_scale)
        buf = flat_grad(self.params, grads, "DataParallel.step")
        self._coll.allreduce_sum(buf)
        self.optimizer.step(None if grads is None else buf, grad_scale=gs / self.world_size)
        if self.debug:
            check_params_equal(self.params, self.comm)

    def check_params(self):
        """Raise RuntimeError unless every rank holds identical parameters (collective)."""
        check_params_equal(self.params, self.comm)

    def zero_grad(self):
        self.params.zero_grad()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def __getattr__(self, name):
        # param_groups, skipped_steps, last_step_taken, last_grad_norm, ... of the optimizer
        if name.startswith("_") or name in ("optimizer", "params"):
            raise AttributeError(name)
        opt = self.__dict__.get("optimizer")
        if opt is None:
            raise AttributeError(name)
        return getattr(opt, name)


def check_over_paramset(optimizer, params, who):
    """TypeError unless ``optimizer`` is a plain fastopt optimizer, ValueError unless it is built
    over the ParamSet ``params`` itself with one param group."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{who} needs a fastopt optimizer, got {type(optimizer).__name__}")
    if optimizer.requires_closure:
        raise TypeError(
            f"{who} steps with averaged gradients; {type(optimizer).__name__} steps with a "
            "closure (average the gradients inside it with allreduce_grads instead)"
        )
    sources = optimizer.sources()
    if len(sources) != 1 or sources[0] is not params:
        raise ValueError(
            f"{who}: the optimizer must be built over the ParamSet itself "
            "(e.g. fo.Adam(ps, lr=...)), with one param group"
        )
