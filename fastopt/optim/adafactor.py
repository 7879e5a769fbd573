"""Adafactor (torch.optim.Adafactor semantics): factored second moments over the segments of a
unit, in the fixed sequence of five phases of ``kernels/factored.py`` (numba-cpu), run by the
kernel module of the unit's backend: ``kernels/factored.py`` on numba-cpu,
``kernels/factored_cuda.py`` on numba-cuda, ``kernels/factored_cupy.py`` on CuPy (each imported
on first use), the NumPy reference on ``numpy``."""

import importlib.util

import ml_dtypes
import numpy as np

from .. import reference
from ..kernels import factored
from ..paramset import ParamSet
from ..validation import check_bool, check_nonnegative, check_pair
from . import hyperparameters as hp
from . import precision, staging
from .base import Optimizer, maximize_sign

STATE_NAMES = ("row_var", "col_var", "variance")
"""The state arrays of every unit, torch's names: the row and column factors of its tensors of 2
or more dimensions and the second moment of its vectors and scalars, back to back."""

KERNEL_MODULES = {
    "numba-cpu": "factored",
    "numba-cuda": "factored_cuda",
    "cupy": "factored_cupy",
}
"""The kernel module (in ``fastopt.kernels``) of each backend Adafactor runs on besides the NumPy
reference. A GPU module has ``device_layout(layout, like, stream)``, ``scratch(layout, dtype,
like, update=None, stream=None)`` and ``step`` (``factored.step``'s arguments and semantics, on
device arrays, and ``stream=``): the step passes its stream to each, so uploads, zero-fills and
launches of a step are all ordered on it."""


def kernel_module(backend, label="a parameter"):
    """The kernel module of Adafactor on ``backend`` (a name of :data:`KERNEL_MODULES`),
    imported on first use; RuntimeError naming ``label`` for any other backend, or when the
    module is missing from this installation."""
    module = KERNEL_MODULES.get(backend)
    if module is None:
        raise RuntimeError(
            f"Adafactor runs on the {', '.join(KERNEL_MODULES)} and numpy backends; {label} is "
            f"on {backend!r}"
        )
    full = importlib.util.resolve_name(f"..kernels.{module}", __package__)
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name != full:
            raise
        raise RuntimeError(
            f"Adafactor on the {backend!r} backend ({label}) needs {full}, which this "
            "installation lacks"
        ) from None


def check_eps(name, value):
    """``eps = (eps1, eps2)``: eps1 None (the dtype's machine epsilon) or a finite float >= 0,
    eps2 a finite float >= 0."""
    eps1, eps2 = check_pair(name, value)
    if eps1 is not None:
        check_nonnegative(f"{name}[0]", eps1)
    check_nonnegative(f"{name}[1]", eps2)


def check_foreach(name, value):
    """``foreach``: None or a bool (accepted for torch's signature; the kernels are fused)."""
    if value is not None:
        check_bool(name, value)


class Adafactor(Optimizer):
    r"""Adafactor with ``torch.optim.Adafactor``'s arguments, defaults and update (Shazeer &
    Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018, in
    torch's variant: lr caps the relative step and scales the decoupled weight decay, eps1 is
    applied to the variance estimate and the update).

    .. math::
        w_t = t^{\tau},\quad \rho_t = \min(\gamma, 1/\sqrt t),\quad
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t,\quad
        \theta \leftarrow \theta(1 - \gamma\lambda)

        \text{2+ dims: } R_t = \mathrm{lerp}(R_{t-1}, \overline{G_t^2}^{\,row}, w_t),\;
        C_t = \mathrm{lerp}(C_{t-1}, \overline{G_t^2}^{\,col}, w_t),\;
        \hat V_t = \frac{R_t C_t}{\max(\overline{R_t}, \epsilon_1)};\quad
        \text{else } \hat V_t = \mathrm{lerp}(\hat V_{t-1}, G_t^2, w_t)

        U_t = G_t / \max(\sqrt{\hat V_t}, \epsilon_1),\quad
        \theta_t = \theta - \alpha_t\,U_t / \max(1, \mathrm{RMS}(U_t)/d)

    per tensor (a ParamSet's parameters, or each array), the factors over its last two
    dimensions (leading ones are a batch of matrices). State per m x n matrix: m + n values
    (``row_var``, ``col_var``); per vector or scalar: one per element (``variance``).
    ``eps = (None, 1e-3)``: eps1 None is the machine epsilon of the parameter's dtype (as
    torch, of the gradient's: for a bfloat16 parameter 2^-7). ``foreach`` is accepted
    for torch's signature (every step is fused). float32 and float64 parameters, and
    bfloat16/float16 ones with ``state_dtype``, ``master_weights`` and stochastic rounding
    (through float32 copies: ``fastopt/optim/staging.py``; not ``state_dtype="int8"``: the
    factors are already m + n values per matrix), on the
    numba-cpu, numba-cuda and cupy backends (kernel modules :data:`KERNEL_MODULES`; device
    arrays keep their state and scratch on their device) and the NumPy reference; other
    backends are refused by name.

    A step is one kernel run for five phases whatever the number of tensors (row/column sums
    of G^2 per tile, the factors, per-tensor sums of squares of the parameter and the update,
    per-tensor step sizes, the update), deterministic for any thread count. Each element's
    update is computed once, into a scratch buffer of one value per element (shared by the
    optimizer's units of a dtype), and applied from there.
    ``state_dict()`` gives a plain array's factors torch's shapes (``(..., m, 1)``,
    ``(..., 1, n)``); a ParamSet's are flat, its tensors' back to back.
    """

    algorithm = "adafactor"
    elementwise = False
    state_like_params = False
    tensor_state = STATE_NAMES

    @classmethod
    def tensor_state_shapes(cls, shape):
        """torch.optim.Adafactor's: ``row_var`` ``(..., m, 1)`` and ``col_var`` ``(..., 1, n)``
        for a tensor of 2 or more dimensions, else ``variance`` shaped like the tensor."""
        shape = tuple(shape)
        if len(shape) >= 2:
            return {"row_var": shape[:-1] + (1,), "col_var": shape[:-2] + (1, shape[-1])}
        return {"variance": shape}

    hyperparameter_table = (
        hp.lr(1e-2),
        hp.real("beta2_decay", -0.8, hi=0.0),
        hp.Hyper("eps", (None, 1e-3), check_eps),
        hp.real("d", 1.0, lo=1.0),
        hp.weight_decay(),
        hp.Hyper("foreach", None, check_foreach, keyword_only=True),
        hp.MAXIMIZE,
    )

    def _rule(self, group):
        return self.algorithm

    def _state_names(self, group):
        return STATE_NAMES

    # ------------------------------------------------------------------ segments
    def _shapes(self, g_int, unit):
        """The shapes of the tensors of ``unit``, back to back in its flat buffer."""
        source = g_int["source"]
        if isinstance(source, ParamSet):
            return [tuple(source.shapes[n]) for n in source.names]
        return [tuple(unit.shape)]

    def _layout(self, g_int, unit, stream=None):
        """(kernel module, layout, scratch) of the unit, cached: the module of its backend
        (:func:`kernel_module`; the NumPy reference takes numba-cpu's), the
        :func:`kernels.factored.plan` of its tensors (its tables on the unit's device for a GPU
        backend) and the scratch arrays. Their ``update`` (one value per element) is a view of
        one buffer per backend, device and dtype, shared by the units (they run one after the
        other, on one stream): a list of arrays costs its largest array, not their sum. On a GPU
        the tables are uploaded and the scratch made on ``stream``, the step's."""
        cache = self.__dict__.setdefault("_layouts", {})
        backend = unit.backend.name
        dtype = staging.compute_dtype(unit.param.dtype)
        key = ("update", backend, unit.backend.device_of(unit.param), dtype)
        shared = cache.get(key)
        hit = cache.get(id(unit))
        if hit is None or hit[0] is not unit:
            plan = factored.plan(self._shapes(g_int, unit))
            if backend in ("numba-cpu", "numpy"):
                module, layout, work = factored, plan, factored.scratch(plan, dtype, shared)
            else:
                module = kernel_module(backend, unit.label)
                layout = module.device_layout(plan, unit.param, stream)
                work = module.scratch(plan, dtype, unit.param, shared, stream)
            if shared is None or shared.size < work["update"].size:  # a new, larger buffer
                shared = cache[key] = work["update"]
            hit = cache[id(unit)] = [unit, module, layout, work, shared]
        work = hit[3]
        if hit[4] is not shared:  # the buffer grew for a larger unit since
            work["update"] = shared[: work["update"].size]
            hit[4] = shared
        return hit[1], hit[2], work

    def _state_shape(self, g_int, unit, name):
        if name == precision.MASTER:
            return unit.shape
        shapes = self._shapes(g_int, unit)
        rows, cols, vector = factored.state_sizes(shapes)
        size = {"row_var": rows, "col_var": cols, "variance": vector}[name]
        if isinstance(g_int["source"], ParamSet):
            return (size,)
        (shape,) = shapes
        if name == "variance" or not size:
            return shape if size else (0,)
        return (*shape[:-1], 1) if name == "row_var" else (*shape[:-2], 1, shape[-1])

    # ------------------------------------------------------------------ checks
    def add_param_group(self, param_group):
        """``Optimizer.add_param_group``, then the group is taken back unless every unit is on a
        backend Adafactor runs on (device arrays: known now)."""
        super().add_param_group(param_group)
        try:
            for u in self._groups[-1]["units"]:
                if u.backend is not None:
                    self._check_backend(u)
        except (TypeError, RuntimeError):
            self.param_groups.pop()
            self._groups.pop()
            raise

    def _check_backend(self, unit):
        if unit.backend.name != "numpy":
            kernel_module(unit.backend.name, unit.label)

    def _check_unit(self, unit, grad):
        """The unit's ``access.Storage`` with ``grad``, checked against its backend."""
        self._check_backend(unit)
        storage = precision.storage_of(self.precision, unit.param, grad)
        precision.check_backend_stores(unit.backend, storage, unit.label)
        return storage

    # ------------------------------------------------------------------ state
    def _allocate(self, group, unit, names, lr, stream=None):
        sizes = dict(zip(STATE_NAMES, factored.state_sizes(self._unit_shapes(unit))))
        dtype = self.state_array_dtype(names[0], unit.param)  # int8 refused at construction
        like = unit.param
        for n in names:
            unit.state[n] = unit.backend.zeros(sizes[n], dtype, like=like, stream=stream)
        if precision.has_master(self.precision, unit.param):
            master = unit.backend.zeros(unit.param.size, np.float32, like=like, stream=stream)
            # exact (float32 holds every 16-bit value), on the step's stream
            unit.backend.assign(master, unit.param, stream)
            unit.state[precision.MASTER] = master
        unit.state["step"] = 0

    def _unit_shapes(self, unit):
        g_int = next(g for g in self._groups if any(u is unit for u in g["units"]))
        return self._shapes(g_int, unit)

    # ------------------------------------------------------------------ step
    def _step_scalars(self, group, unit, step, lr):
        """(h, h64): the element scalars ``factored.H_FIELDS`` in the parameter dtype and the
        segment scalars ``factored.H64_FIELDS`` in float64, for the ``step``-th step."""
        st = unit.scalar_type
        eps1, eps2 = group["eps"]
        if eps1 is None:
            eps1 = float(ml_dtypes.finfo(unit.param.dtype).eps)  # np.finfo has no bfloat16
        w = float(step) ** group["beta2_decay"]
        wd = group["weight_decay"]
        decay = 1 - lr * wd if wd != 0 else 1.0
        h = (
            st(maximize_sign(group)),
            st(w),
            st(1.0) - st(w),  # torch's lerp takes 1 - w in the tensor's dtype
            st(eps1),
            st(eps1 * eps1),
            st(decay),
            st(1.0),
        )
        rho = min(lr, 1 / (float(step) ** 0.5))
        return h, (float(eps2), rho, float(group["d"]))

    def step(self, grads=None, *, grad_scale=None):
        """One update of every parameter whose gradient is given (see ``Optimizer.step``):
        gradient scaling, clipping and non-finite skipping as there, then one kernel run of five
        phases per unit. Everything is checked before anything is written."""
        plan = self._plan(grads)
        storages = {}
        for _, _, _, work in plan:
            for unit, grad in work:
                storages[id(unit)] = self._check_unit(unit, grad)
        stream_of = self.step_streams()  # every launch, copy and fill of the step goes there
        scales = self._grad_scales(plan, grad_scale, stream_of)
        if scales is None:
            return
        launches = []
        for group, g_int, lr, work in plan:
            for unit, grad in work:
                kernels = self._layout(g_int, unit, stream_of(unit))
                if not unit.state:
                    self._allocate(group, unit, g_int["state_names"], lr, stream_of(unit))
                step = unit.state["step"] + 1
                h, h64 = self._step_scalars(group, unit, step, lr)
                launches.append((group, g_int, lr, unit, grad, step, h, h64, kernels))
        for group, g_int, lr, real, grad, step, h, h64, (module, layout, scratch) in launches:
            storage = storages[id(real)]
            stream = stream_of(real)
            unit = real
            if staging.needs_stage(storage):  # 16-bit storage: float32 copies around the kernel
                unit, grad = staging.staging_of(self).load(real, grad, STATE_NAMES, stream)
            state = unit.state
            if unit.backend.name == "numpy":
                reference.adafactor(
                    unit.param,
                    reference.transformed_grad(grad, scales[0], scales[1]),
                    state,
                    step=step,
                    shapes=self._shapes(g_int, unit),
                    **self.hyperparameters(group, lr),
                )
            else:
                st = unit.scalar_type
                on = {}
                if unit.backend.name in ("cupy", "numba-cuda"):  # the step's stream, both
                    on["stream"] = stream
                module.step(
                    unit.param,
                    grad,
                    *(state[n] for n in STATE_NAMES),
                    h,
                    h64,
                    (st(scales[0]), st(scales[1])),
                    layout,
                    scratch,
                    **on,
                )
            if unit is not real:
                rs = staging.random_counter(self, real, storage, step)
                staging.staging_of(self).store(real, unit, STATE_NAMES, rs, stream)
            real.state["step"] = step
        self._count_step(plan)
