"""Plain data parallelism: every rank holds the whole optimizer state; one Allreduce of the flat
gradient buffer per step, the division by the world size folded into the update kernel."""

import numpy as np

from ..optim.base import Optimizer
from ..optim.precision import is_16bit
from ..paramset import ParamSet
from ..validation import check_bool, check_positive
from .agreement import agree_on_outcome, group_options, optimizer_arguments
from .collectives import Collectives, check_params_equal, widened


def flat_grad(params, grads, what):
    """The flat gradient a step works on: the ParamSet's gradient buffer, or ``grads`` after
    checking it matches the parameters (type, dtype, size, contiguity). 16-bit parameters also
    take float32 gradients (as the optimizers do; the Trainer computes them in float32)."""
    if grads is None:
        return params.grad_flat
    if isinstance(grads, ParamSet):
        grads = grads.grad_flat
    if type(grads) is not type(params.flat):
        raise TypeError(
            f"{what}: gradient is a {type(grads).__name__}, the parameters a "
            f"{type(params.flat).__name__}"
        )
    if grads.dtype != params.dtype and not (is_16bit(params.dtype) and grads.dtype == np.float32):
        raise TypeError(
            f"{what}: gradient has dtype {grads.dtype}, the parameters {params.dtype} (gradients "
            "have the parameters' dtype, or float32 for 16-bit parameters)"
        )
    if grads.ndim != 1 or grads.size != params.size:
        raise ValueError(
            f"{what}: gradient must be a flat array of {params.size} elements, got shape "
            f"{grads.shape}"
        )
    if not grads.flags.c_contiguous:
        raise ValueError(f"{what}: gradient is not contiguous")
    return grads


def step_inputs(wrapper, grads, grad_scale, what, optimizer, check=None):
    """``(grad_scale as a float, the flat gradient)`` of a step, checked. With the wrapper's
    ``debug``, the checks (and ``check()``, the caller's own) run on every rank and one
    allgather compares them with the grad_scale and the optimizer's options, so a rank that
    refuses or differs raises on every rank before any collective or write; without it, a rank
    that raises here leaves the others waiting in the step's collective (one per step)."""

    def checked():
        if check is not None:
            check()
        return grad_scale_of(grad_scale), flat_grad(wrapper.params, grads, what)

    if not wrapper.debug:
        return checked()
    return agree_on_outcome(
        wrapper.comm,
        what,
        checked,
        lambda result: {"grad_scale": result[0], "param_groups": group_options(optimizer)},
    )


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

    16-bit gradients (bfloat16/float16 ParamSets) are summed in float32: copied into a float32
    buffer, which the Allreduce sums and the step reads (twice the bytes of a 16-bit message;
    MPI has no 16-bit float sum). Parameters move as their 16-bit bits.
    """

    def __init__(self, params, optimizer=None, *, comm=None, root=0, debug=False, cuda_aware=None):
        self._coll = Collectives(comm, cuda_aware)

        def checked():
            if not isinstance(params, ParamSet):
                raise TypeError(f"DataParallel needs a ParamSet, got {type(params).__name__}")
            check_bool("debug", debug)
            if optimizer is not None:  # over this rank's own ParamSet: a per-rank fact
                check_over_paramset(optimizer, params, "DataParallel")

        # first, so that a rank's other arguments or refusal raise on every rank instead of
        # leaving the others waiting in the Bcast
        agree_on_outcome(
            self._coll.comm,
            "DataParallel",
            checked,
            lambda _: {
                "params": params,
                "optimizer": optimizer_arguments(optimizer),
                "root": root,
                "debug": debug,
            },
        )
        self.params = params
        self.optimizer = optimizer
        self.debug = debug
        self.root = root
        self._wide = None  # float32 sum of 16-bit gradients
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
        total = self._summed(buf)
        if average and self.world_size > 1:
            total *= total.dtype.type(1.0 / self.world_size)
        if total is not buf:
            buf[...] = total  # 16-bit: the float32 result rounded once
        return buf

    def _summed(self, buf):
        """Allreduce (sum) of ``buf``: in place, or for 16-bit gradients in a float32 copy,
        which is returned."""
        if not is_16bit(buf.dtype):
            self._coll.allreduce_sum(buf)
            return buf
        self._wide = widened(buf, self._wide)
        self._coll.allreduce_sum(self._wide)
        return self._wide

    def step(self, grads=None, *, grad_scale=None):
        """Average this step's gradients (``grads``, a flat array, or the ParamSet's gradient
        buffer) over the ranks and update. The gradient buffer holds the SUM afterwards
        (16-bit gradients: the float32 buffer does; the 16-bit one is left as it was)."""
        if self.optimizer is None:
            raise RuntimeError("DataParallel was built without an optimizer")
        gs, buf = step_inputs(self, grads, grad_scale, "DataParallel.step", self.optimizer)
        total = self._summed(buf)
        step_grads = None if grads is None and total is buf else total
        self.optimizer.step(step_grads, grad_scale=gs / self.world_size)
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
