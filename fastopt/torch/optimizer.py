"""The adapter: one ``torch.optim.Optimizer`` subclass that delegates each step to a fastopt
optimizer core (a class of ``fastopt.optim.OPTIMIZERS``) over ParamSets adopting the flat buffers.

torch's ``param_groups`` stay the source of truth for hyperparameters (LR schedulers write
``group["lr"]``; the adapter reads it at every step). The state lives in one flat tensor per
(bucket, state name), laid out like the parameter buffer (the core's ``tensor_state``,
Adafactor's factors and NovoGrad's per-tensor moment: each parameter's share back to back,
:class:`StateLayout`); ``opt.state[p]`` holds views of it in
torch's format from the step that allocates the parameter's state on (published once then, and at
``load_state_dict``, not at every step). ``"step"`` and scalar state such as NAdam's
``"mu_product"`` are 0-d float tensors as in torch: views of one tensor per (bucket, name) with an
element per parameter, which each step writes once per run of parameters, so they read the current
value at any time (:meth:`FastoptOptimizer._write_scalars`).

Per-parameter steps, as torch keeps them: a parameter whose ``.grad`` is None is skipped (no
update, no weight decay, its step count stays). Each step launches one kernel per *run*:
consecutive parameters of a bucket that have a gradient and equal scalar state (step count, ...).
When every parameter has a gradient, as in ordinary training, that is one launch per bucket.
With ``state_dtype="int8"`` a param group's parameters of each dtype make two buckets: the
8-bit ones, each on a block boundary, and the float32-state ones (see :class:`FastoptOptimizer`).

State that depends on the settings is kept as torch keeps it (:mod:`fastopt.torch.state`): SGD
momentum turned on mid-run starts each parameter's buffer at its next step as a copy of the
gradient, as ``torch.optim.SGD`` does; a setting turned off leaves its state in ``opt.state``,
unused, and uses it again when turned back on; a setting whose state torch makes only at a
parameter's first step (``amsgrad``, RMSprop's ``centered`` and ``momentum``) turned on mid-run
raises ValueError naming the parameters before anything is written (torch raises KeyError).
``opt.state`` edited the ways torch users edit it (cleared, an entry deleted, cleared or
replaced, a key deleted or assigned) is taken at the next step as torch takes it
(:meth:`FastoptOptimizer._reconcile_state`). A parameter listed twice in a param group raises
ValueError (:func:`check_listed_once`); in two groups, torch's ValueError.
"""

import inspect
import warnings

import numpy as np
import torch
from torch.optim import optimizer as _torch_optimizer

from .. import arrays
from ..optim import precision
from . import named
from .dropin import TORCH_CONSTANT_KEYS, check_flags, check_tensor_lr, plain_value, pop_flags
from .flat import FlatBuffer, allocate, as_tensor, check_no_overlap, check_param, int8_layout
from .state import LAZY_STATE, StateEntry, TrackedState, _Edits, install_state, is_state_array

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


_plain = plain_value

_TORCH_DUPLICATE_WARNING = "optimizer contains a parameter group with duplicate parameters"


def check_listed_once(group, gi, where):
    """ValueError naming a parameter that param group ``gi`` lists twice (after torch's
    ``add_param_group`` normalised it). torch.optim only warns ("in future, this will cause an
    error", pytorch#40967) and updates such a parameter once per listing, with results that
    differ between its for-loop, foreach and fused implementations (each reads the shared state
    at another moment), so there is no one behaviour to match; fastopt.torch refuses it, as its
    LBFGS does (torch refuses a parameter in two groups outright)."""
    params = group["params"]
    if len({id(p) for p in params}) == len(params):
        return
    names = group.get("param_names") or [f"param_groups[{gi}][{j}]" for j in range(len(params))]
    first = {}
    for name, p in zip(names, params):
        if id(p) in first:
            raise ValueError(
                f"{where}: parameter {name} is listed twice in one param group (as "
                f"{first[id(p)]} too). torch.optim warns about this (it is to become an error, "
                "pytorch#40967) and updates such a parameter once per listing, differently in "
                "its for-loop, foreach and fused implementations; fastopt.torch refuses it. List "
                "each parameter once (model.parameters() lists a tied weight once)"
            )
        first[id(p)] = name


def torch_add_param_group(opt, param_group):
    """``torch.optim.Optimizer.add_param_group`` without its duplicate-parameter warning (the
    caller raises :func:`check_listed_once`'s error instead)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _TORCH_DUPLICATE_WARNING, UserWarning)
        torch.optim.Optimizer.add_param_group(opt, param_group)


def quantized_range(slot, lo, hi):
    """(codes, block absmax): views of elements ``lo:hi`` of an 8-bit slot whose blocks start
    at ``lo`` (a parameter's start in an 8-bit bucket: a multiple of ``QUANT_BLOCK``)."""
    block = precision.QUANT_BLOCK
    return slot.codes[lo:hi], slot.absmax[lo // block : -(-hi // block)]


def quantized_entry(name, slot, lo, hi, shape):
    """The torch-format state entries of one parameter (elements ``lo:hi`` of its bucket,
    ``shape``) of 8-bit slot ``name``: its codes (uint8, shaped like the parameter) under
    ``name``, the absmax of its own blocks under ``name + "_absmax"`` and the map under
    ``name + "_qmap"`` (``"signed"`` or ``"unsigned"``): the keys of fastopt's core, which
    keeps them so for a parameter that is a unit of its own."""
    codes, absmax = quantized_range(slot, lo, hi)
    return {
        name: codes.view(shape),
        name + "_absmax": absmax,
        name + "_qmap": "signed" if slot.signed else "unsigned",
    }


def _scalar_dtype():
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _hooked_or_profiled(opt):
    """Whether ``opt.step`` must go through torch's wrapper: a step hook (global or the
    optimizer's) is registered, or the autograd profiler records."""
    return bool(
        opt._optimizer_step_pre_hooks
        or opt._optimizer_step_post_hooks
        or _torch_optimizer._global_optimizer_pre_hooks
        or _torch_optimizer._global_optimizer_post_hooks
        or torch.autograd._profiler_enabled()
    )


class FastoptOptimizer(torch.optim.Optimizer):
    """Base of ``fastopt.torch.SGD``, ``Adam``, ...: a ``torch.optim.Optimizer`` whose step is
    one fastopt kernel call per (param group, device, dtype) over flat buffers.

    Takes the hyperparameters of its fastopt class (``core_class``) with the same defaults, and
    its options as keywords: ``max_grad_norm``, ``max_grad_value``, ``skip_nonfinite``,
    ``backend``, ``stream``, and the storage precision options (``state_dtype``,
    ``master_weights``, ``stochastic_rounding``, ``seed``; :mod:`fastopt.optim.precision`),
    passed to the fastopt class unchanged. ``skipped_steps``, ``last_step_taken`` and
    ``last_grad_norm`` are the core's, as in :class:`fastopt.optim.Optimizer`.

    torch's implementation keywords, where ``torch.optim.X`` takes them
    (:mod:`fastopt.torch.dropin`): ``foreach`` and ``fused`` accept None, False and True and
    change nothing (fastopt always runs its fused kernels, one call per flat buffer);
    ``capturable=True`` and ``differentiable=True`` raise ValueError (no CUDA-graph capture, no
    autograd through the step). They sit in ``defaults`` and the param groups as torch keeps
    them, so state_dicts exchange with ``torch.optim.X`` (``fused=True`` included) both ways; a
    loaded group keeps the saved values, which have no effect here. ``lr`` may be a
    one-element tensor (read at every step, so a scheduler writing into it drives the step).

    bfloat16/float16 parameters: the state is kept in the parameter's dtype by default, as
    torch.optim keeps it; ``state_dtype="float32"`` keeps it in float32, ``master_weights=True``
    keeps a float32 copy of each 16-bit parameter (and float32 state), which ``state_dict()``
    holds as ``"master_param"`` (:data:`fastopt.optim.precision.MASTER`) beside torch's entries.
    State tensors keep their dtype through ``load_state_dict`` (torch's loader would round them
    to the parameter's); a state saved by ``torch.optim`` starts the master copy from the
    16-bit parameter.

    ``state_dtype="int8"`` (the rules of :data:`fastopt.optim.precision.INT8_RULES`; CPU
    parameters, and CUDA parameters on the numba-cuda and CuPy backends, whose block kernels
    keep the same layout; :class:`fastopt.torch.CPUOffload` keeps it in host memory for a GPU
    model): each parameter of at
    least ``MIN_8BIT_SIZE`` (4096) elements keeps its state as uint8 codes and one float32
    absmax per block of 256 of its own elements, as bitsandbytes keeps each tensor's; smaller
    parameters keep float32 state (bitsandbytes' ``min_8bit_size``, and the rule the fastopt
    core applies to each array it is given). The 8-bit parameters of a param group and dtype
    share a flat buffer in which each starts at a multiple of 256 elements, so that no block
    spans two parameters (the gap after each, under 256 elements, holds zeros in the parameter,
    gradient and state, which every rule leaves at zero); the smaller ones share another, back
    to back. Each buffer steps in one kernel call (the first step of parameters without state runs
    one call per 8-bit parameter, so that the rule's initial state does not fill the gaps). The
    results equal bit for bit those of the fastopt core over the parameters as separate arrays
    (``fastopt.AdamW([p0, p1, ...], state_dtype="int8")``; not a ParamSet over one buffer, whose
    blocks span parameters), except the gradient norm of ``max_grad_norm`` (summed in another
    order) and stochastic rounding's random bits (indexed by element, gaps counted). A parameter
    without a gradient keeps its value and its state bits, codes and absmax included, as torch
    skips it. ``state_dict()`` gives fastopt's 8-bit keys (codes under the slot's name,
    ``"<name>_absmax"``: the parameter's blocks, ``"<name>_qmap"``; see
    :mod:`fastopt.torch.state`), which torch.optim cannot load; a float state (torch.optim's)
    loads and is quantized per parameter.
    """

    core_class = None
    torch_flags = ()
    """The keywords of :data:`fastopt.torch.dropin.TORCH_FLAGS` torch's namesake class takes."""
    torch_defaults = {}
    """Param-group keys kept for torch (:func:`fastopt.torch.dropin.torch_defaults`)."""

    def __init__(self, params, *args, **kwargs):
        if self.core_class is None:
            raise TypeError("FastoptOptimizer is a base class; use e.g. fastopt.torch.AdamW")
        flags = pop_flags(type(self), kwargs)  # torch's foreach=, fused=, ...: checked here
        hyper, self._options = split_arguments(self.core_class, args, kwargs)
        check_tensor_lr(type(self).__name__, {**hyper, **flags}, type(self).__name__)
        self._hyper_names = tuple(hyper)  # not self.defaults: torch adds keys to it
        self._run_names = named.RunNames()  # masks and muon_params for the core's run groups
        self._buckets = []  # (param group index, FlatBuffer)
        self._frozen = []  # (name, tensor) of params without requires_grad: never stepped
        self._records = []  # per bucket, per param: scalar state as sorted (name, value) pairs
        self._held = []  # per bucket, per param: frozenset of the state arrays it holds (or None)
        self._shown = []  # per bucket, per param: (entry, its items) as last published
        self._edits = _Edits()  # set by edits of opt.state and its entries (TrackedState)
        self._tensors = []  # per bucket: state name -> flat state tensor (or 8-bit Quantized)
        self._layouts = {}  # (bucket, state name) -> StateLayout of the core's tensor_state
        self._scalars = []  # per bucket: scalar state name -> (tensor, its NumPy view), per param
        self._quantized = []  # per bucket: whether its state is 8-bit (state_dtype="int8")
        self._cores = {}
        self._cut_keys = {}  # int8: a step's runs -> its units (_below_8bit)
        self._version = 0
        self._rebound = False  # whether the last _bound_core bound the units' state anew
        self.skipped_steps = 0
        self.last_step_taken = None
        self.last_grad_norm = None
        # bad hyperparameters or options fail before any parameter moves
        self._precision = self._probe({k: _plain(v) for k, v in hyper.items()}).precision
        self._deferred = []  # (group index, items) added by torch's constructor, packed below
        super().__init__(params, {**hyper, **self.torch_defaults, **flags})
        self.state = TrackedState(self._edits)
        self._state_seen = self.state  # opt.state as last published (a user may replace it)
        deferred, self._deferred = self._deferred, None
        # distinct parameters sharing memory across groups: refused before the first one moves
        check_no_overlap(_distinct(item for _, items in deferred for item in items))
        for gi, items in deferred:
            self._pack_group(gi, items)

    def __setstate__(self, state):
        """torch's ``__setstate__`` (``load_state_dict`` and unpickling go through it), then
        torch's keys its namesake class fills in the same way: a group saved without ``fused``
        etc. gets torch's default, and AdamW's ``decoupled_weight_decay`` is True, as
        ``torch.optim.AdamW.__setstate__`` makes it."""
        super().__setstate__(state)
        constant = TORCH_CONSTANT_KEYS.get(type(self).__name__, {})
        defaults = self.__dict__.get("defaults", {})
        for group in self.__dict__.get("param_groups", ()):
            for name in self.torch_flags:
                group.setdefault(name, self.torch_defaults[name])
            group.update(constant)
            # keys a state from an older torch (or torch's Muon: fastopt's own keys) lacks: this
            # optimizer's values, as torch's classes fill theirs
            for name in self.__dict__.get("_hyper_names", ()):
                if name in defaults:
                    group.setdefault(name, defaults[name])

    def __reduce__(self):
        """Pickling and ``copy.deepcopy``: the optimizer is rebuilt over the (copied)
        parameters, whose storage it packs anew, and given this one's ``state_dict()``, as a
        ``torch.optim`` optimizer copies its param groups and state."""
        kwargs = {k: self.defaults[k] for k in (*self._hyper_names, *self.torch_flags)}
        groups = [dict(g) for g in self.param_groups]
        return _rebuilt, (type(self), groups, {**kwargs, **self._options}, self.state_dict())

    def _probe(self, hyper):
        """A throwaway core over one element: checks hyperparameters and options (all but the
        names ``muon_params`` gives, which :func:`named.check_group` checks over a group)."""
        if "muon_params" in hyper:
            hyper = {**hyper, "muon_params": None}
        shape = (1, 1) if getattr(self.core_class, "matrices_only", False) else 1  # Muon
        return self.core_class([{"params": np.zeros(shape, np.float32), **hyper}], **self._options)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group):
        """torch's ``add_param_group``; the group's trainable parameters are then packed into one
        flat buffer per (dtype) on the group's one device (two with ``state_dtype="int8"``).
        Sparse and complex parameters and mixed devices raise before anything moves."""
        gi = len(self.param_groups)
        torch_add_param_group(self, param_group)
        group = self.param_groups[-1]
        try:
            where = f"{type(self).__name__} param_groups[{gi}]"
            check_listed_once(group, gi, where)
            check_flags(group, where)
            check_tensor_lr(type(self).__name__, group, where)
            items = self._checked_items(gi, group)
            hyper = {k: _plain(group[k]) for k in self._hyper_names}
            if "muon_params" in hyper:  # over the group's own names, not the probe's one array
                named.check_group(group, hyper["muon_params"], where)
            self._probe(hyper)
            if precision.is_int8(self._precision):
                for name, p in items:
                    if p.device.type not in ("cpu", "cuda"):
                        raise TypeError(
                            f"{name} is on {p.device}: state_dtype='int8' (8-bit blockwise "
                            "state) runs on CPU and CUDA tensors"
                        )
            if self._deferred is not None:  # in the constructor: packed once all are checked
                self._deferred.append((gi, items))
                return
            packed = [(n, q) for _, buf in self._buckets for n, q in zip(buf.names, buf.params)]
            check_no_overlap(_distinct([*packed, *self._frozen, *items]))
        except Exception:
            self.param_groups.pop()
            raise
        self._pack_group(gi, items)

    def _pack_group(self, gi, items):
        """Pack group ``gi``'s trainable parameters ``items`` ((name, tensor) pairs) into flat
        buffers (one per dtype; two kinds with ``state_dtype="int8"``); frozen ones are kept
        aside."""
        by_dtype = {}
        for name, p in items:  # each listed once (check_listed_once)
            if p.requires_grad:
                by_dtype.setdefault(p.dtype, []).append((name, p))
            else:
                self._frozen.append((name, p))
        int8 = precision.is_int8(self._precision)
        for pairs in by_dtype.values():
            for kind, align in int8_layout(pairs) if int8 else [(pairs, 1)]:
                buf = FlatBuffer.pack([p for _, p in kind], [n for n, _ in kind], align=align)
                self._buckets.append((gi, buf))
                self._records.append([None] * len(buf.params))
                self._held.append([None] * len(buf.params))
                self._shown.append([None] * len(buf.params))
                self._tensors.append({})
                self._scalars.append({})
                self._quantized.append(align > 1)
        self._cores.clear()
        self._layouts.clear()

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

    def step(self, closure=None):
        """One update of every parameter with a ``.grad`` (torch's ``step``).

        torch wraps every optimizer's ``step`` in a profiler range and its step hooks; here the
        hooks and the range run (through torch's own wrapper) only when a hook is registered or
        the profiler is on: entering the range costs more than the rest of a small step."""
        if _hooked_or_profiled(self):
            return _TORCH_WRAPPED_STEP(self, closure)
        return self._step(closure)

    step.hooked = True  # torch.optim.Optimizer then leaves it unwrapped

    def _step(self, closure=None):
        loss = closure_loss(closure)
        enabled = torch.is_grad_enabled()
        if enabled:
            torch._C._set_grad_enabled(False)  # no_grad without a context manager object
        try:
            self._update()
        finally:
            if enabled:
                torch._C._set_grad_enabled(True)
        return loss

    def _update(self):
        for _, buf in self._buckets:
            buf.check_in_place()
        if self.state is not self._state_seen or self._edits.edited:
            self._reconcile_state()
        for name, p in self._frozen:
            if p.grad is not None:
                raise ValueError(
                    f"parameter {name} has a gradient but had requires_grad=False when the "
                    "optimizer was built, so it is not in its buffers; build a new optimizer"
                )
        key = []
        for k, (_, buf) in enumerate(self._buckets):
            runs = self._runs(k, buf.gather_grads())
            if self._quantized[k]:  # first steps one parameter per unit: see _int8_runs
                runs = [r for i, j in runs for r in self._int8_runs(k, i, j)]
            key.extend((k, i, j) for i, j in runs)
        if not key:
            return
        key = tuple(key)
        if precision.is_int8(self._precision):
            key = self._below_8bit(key)
        core, units = self._bound_core(key)
        # state the settings use and a run lacks: looked for when the state was (re)bound, and
        # when the core refuses the step (it checks each unit's state names, before any write,
        # whenever a group's settings change): nothing to do per step otherwise
        starting = self._start_lazy_state(core, units, key) if self._rebound else {}
        try:
            core.step()  # on torch's current stream of each CUDA bucket (fastopt.streams)
            refused = None
        except ValueError as exc:
            if starting:
                raise
            refused = exc
        if refused is not None:
            starting = self._start_lazy_state(core, units, key)  # raises if not lazy state
            if not starting:
                raise refused
            core.step()
        self.last_grad_norm = core.last_grad_norm
        self.last_step_taken = core.last_step_taken
        if not core.last_step_taken:
            self.skipped_steps += 1
            return
        if not starting:  # the usual case
            for u, (k, i, j) in zip(units, key):
                self._harvest(u, k, i, j)
            return
        for r, (u, (k, i, j)) in enumerate(zip(units, key)):
            self._harvest(u, k, i, j, starting.get(r))

    def _reconcile_state(self):
        """``opt.state`` was replaced, or it or one of its entries was changed through their
        methods (:class:`~fastopt.torch.state.TrackedState`), since the adapter published it;
        make fastopt's state what torch's would be. A parameter whose entry is gone or empty
        (``opt.state.clear()``, ``del opt.state[p]``, ``opt.state[p] = {}``,
        ``opt.state[p].clear()``: torch's ways to restart the moments) loses its state, so its
        next step starts it afresh, as in torch. Any other difference (a state tensor or
        ``"step"`` replaced, a key deleted, an entry given to a parameter without state) has the
        entries read back as ``load_state_dict`` reads a state: the values are copied into
        fastopt's state, an SGD ``momentum_buffer`` deleted starts again at the parameter's
        next step (as torch's ``state.get("momentum_buffer")`` is None then), and anything the
        optimizer cannot step with (a moment deleted, on which torch's step raises KeyError; a
        wrong shape) raises ValueError here, before anything is written (again at every step,
        until the state is repaired or cleared)."""
        state = self.state
        restart, edited = [], False
        for k, (_, buf) in enumerate(self._buckets):
            for m, p in enumerate(buf.params):
                entry = state.get(p)
                if entry is not None and not isinstance(entry, StateEntry):
                    entry = StateEntry(self._edits, entry)  # given by the user: noted from now
                    dict.__setitem__(state, p, entry)
                if self._records[k][m] is None:
                    edited = edited or bool(entry)
                elif not entry:
                    restart.append((k, m))
                elif not self._as_shown(k, m, entry):
                    edited = True
        if edited:
            try:
                install_state(self, self._scalar_names(), "opt.state", self._exact_scalars())
            except ValueError as exc:
                raise ValueError(
                    f"{type(self).__name__}.step(): opt.state was edited since the last step: "
                    f"{exc}. Nothing was updated"
                ) from exc
            self.state = TrackedState(self._edits)
            self._publish_state()
        else:
            if not (isinstance(state, TrackedState) and state._edits is self._edits):
                self.state = TrackedState(self._edits, state)  # replaced by the user
            for k, m in restart:
                self._records[k][m] = self._held[k][m] = None
                self._publish(k, m, m + 1)
        self._cores.clear()
        self._version += 1
        self._edits.edited = False
        self._state_seen = self.state

    def _exact_scalars(self):
        """{id(published 0-d tensor): its value unrounded} for the scalar state whose tensor
        still holds the record's value (cast to its dtype): re-read, it keeps its precision."""
        out = {}
        for k, shown in enumerate(self._shown):
            for m, s in enumerate(shown):
                if s is None:
                    continue
                published = dict(s[1])
                for name, value in self._records[k][m]:
                    a = self._scalars[k][name][1]
                    if name in published and a[m] == a.dtype.type(value):
                        out[id(published[name])] = value
        return out

    def _as_shown(self, k, m, entry):
        """Whether ``entry`` (``opt.state[p]`` of param ``m`` of bucket ``k``) is the one the
        adapter published, with the same objects under the same keys and its scalar state
        (``"step"``, ...) unchanged."""
        shown = self._shown[k][m]
        if shown is None or entry is not shown[0] or len(entry) != len(shown[1]):
            return False
        if any(entry.get(n, entry) is not v for n, v in shown[1]):
            return False
        for name, value in self._records[k][m]:
            a = self._scalars[k][name][1]
            if a[m] != a.dtype.type(value):  # written in place (state[p]["step"] += 1)
                return False
        return True

    def _start_lazy_state(self, core, units, key):
        """{index in ``key``: state names}: the runs of parameters with state that lack state
        their group's settings now use. ``torch.optim.SGD`` starts a ``momentum_buffer`` at any
        step of a parameter without one (momentum turned on mid-run, a buffer deleted:
        :data:`~fastopt.torch.state.LAZY_STATE`) as a copy of the gradient (after weight decay),
        as fastopt's SGD rule does at its first step: such a run gets the new arrays and runs
        this step as its step 1 (its step count is put right in :meth:`_harvest`). Any other
        state is made only at a parameter's first step (torch's ``if len(state) == 0``), so a
        setting that needs more (Adam's ``amsgrad``, RMSprop's ``centered`` or ``momentum``
        turned on mid-run) raises ValueError naming the parameters, before anything is written
        (torch.optim raises KeyError, after updating the groups before)."""
        lazy = LAZY_STATE.get(self.core_class.__name__, frozenset())
        starting, held_of = {}, self._held
        for r, cg in enumerate(core.param_groups):
            k, i, j = key[r]
            held = held_of[k][i]
            names = None if held is None else core._state_names(cg)
            if names is None or held.issuperset(names):
                continue
            missing = tuple(n for n in names if n not in held)
            if not lazy.issuperset(missing):
                raise self._missing_state_error(k, i, j, missing, held)
            starting[r] = missing
        if starting:  # rebind at the next step, whether this one is taken, skipped or fails
            self._version += 1
        for r, names in starting.items():
            u, cg = units[r], core.param_groups[r]
            core._ensure_backend(u)
            kept, u.state = u.state, {}
            core._allocate(cg, u, names, _plain(cg["lr"]), core.step_streams()(u))
            kept.update({n: u.state[n] for n in names}, step=0)
            u.state = kept
        return starting

    def _missing_state_error(self, k, i, j, missing, held):
        gi, buf = self._buckets[k]
        who = buf.names[i] if j == i + 1 else f"{buf.names[i]} (and {j - i - 1} more)"
        name = self.core_class.__name__
        if isinstance(getattr(torch.optim, name, None), type):
            how = (
                f"torch.optim.{name} makes such state only at a parameter's first step, and its "
                "step raises KeyError on a state without it"
            )
        else:
            how = f"{name} makes such state only at a parameter's first step"
        return ValueError(
            f"{type(self).__name__} param_groups[{gi}]: its settings now use state "
            f"{list(missing)}, which the state of {who} lacks (it holds {sorted(held)}): {how}. "
            "Nothing was updated. Restart these parameters' state (del opt.state[p], "
            "opt.state.clear()), load a state that has it, or set the setting back"
        )

    def _bound_core(self, key):
        """(core, its units) for the runs ``key`` ((bucket, i, j) each), with the torch groups'
        hyperparameters (an LR scheduler may have changed them) and each unit's state bound to
        its run's views of the flat state and its scalar state (none before the first step)."""
        core, version = self._core(key)
        self._rebound = version != self._version  # the units get their state views anew
        for cg, run in zip(core.param_groups, key):
            cg.update(self._core_hyper(run))
        units = core.units()
        for u, (k, i, j) in zip(units, key):
            record = self._records[k][i]
            if record is None:
                u.state = {}
            elif version != self._version:
                u.state = self._views(u, k, i, j)
            u.state.update(record or ())
        self._cores[key] = (core, self._version)
        return core, units

    def _stateful_key(self):
        """The runs ((bucket, i, j) each) of parameters that have state: maximal ranges of
        consecutive parameters with equal scalar state, as a step with every gradient present
        would take them (so a step after it usually finds the same core)."""
        key = []
        for k, records in enumerate(self._records):
            key.extend((k, i, j) for i, j in self._runs(k, [r is not None for r in records]))
        return tuple(key)

    def _int8_runs(self, k, i, j):
        """The units of run ``i .. j-1`` of 8-bit bucket ``k``: the run, or one unit per
        parameter while they have no state yet. The core fills new state with the rule's initial
        value (Adagrad's and Yogi's are not 0) over its whole unit, the gaps between parameters
        included; one parameter per unit keeps the gaps at 0, where every rule leaves them
        (zero parameter, gradient and state give a zero update and state), so a gap never
        raises the absmax of its parameter's last block."""
        if self._records[k][i] is not None:
            return [(i, j)]
        return [(m, m + 1) for m in range(i, j)]

    def _below_8bit(self, key):
        """``key`` with the runs of the float-state buckets of an int8 optimizer (parameters
        below ``MIN_8BIT_SIZE``) cut so that each unit is smaller than every 8-bit unit; the core
        (``_core``) takes the smallest 8-bit unit as its ``min_8bit_size``. Usually nothing is
        cut: the 8-bit units are whole buffers of large parameters."""
        hit = self._cut_keys.get(key)
        if hit is not None:
            return hit
        limit = self._int8_limit(key)
        out = []
        for k, i, j in key:
            if self._quantized[k]:
                out.append((k, i, j))
                continue
            offsets, start = self._buckets[k][1].offsets, i
            for m in range(i + 1, j + 1):
                if m == j or offsets[m][1] - offsets[start][0] >= limit:
                    out.append((k, start, m))
                    start = m
        if len(self._cut_keys) >= _LAYOUT_CACHE:
            self._cut_keys.clear()
        self._cut_keys[key] = out = tuple(out)
        return out

    def _int8_limit(self, key):
        """The core's ``min_8bit_size`` for ``key``: the size of its smallest 8-bit unit (at
        least ``MIN_8BIT_SIZE``: each holds a parameter that large), or, without one, a size no
        unit reaches."""
        sizes = [
            self._buckets[k][1].offsets[j - 1][1] - self._buckets[k][1].offsets[i][0]
            for k, i, j in key
            if self._quantized[k]
        ]
        return min(sizes) if sizes else 1 << 62

    def _runs(self, k, present):
        """[(i, j)]: maximal ranges of consecutive params with gradients, equal scalar state and
        the same state arrays."""
        records, held, runs, start = self._records[k], self._held[k], [], None
        n = len(records)
        if all(present) and records.count(records[0]) == n and held.count(held[0]) == n:
            return [(0, n)]  # the usual case
        for i, has in enumerate(present):
            if start is not None and not (
                has and records[i] == records[start] and held[i] == held[start]
            ):
                runs.append((start, i))
                start = None
            if has and start is None:
                start = i
        if start is not None:
            runs.append((start, len(present)))
        return runs

    def _core_hyper(self, run):
        """The hyperparameters of the core group over ``run`` = (bucket, i, j): the torch
        group's (an LR scheduler may have changed them), masks and ``muon_params`` translated
        to the run's segments (:mod:`fastopt.torch.named`)."""
        gi, buf = self._buckets[run[0]]
        tg = self.param_groups[gi]
        out = {}
        for name in self._hyper_names:
            value = _plain(tg[name])
            if name in named.NAMING:
                value = self._run_names.translate(name, value, tg, buf.params, run)
            out[name] = value
        return out

    def _core(self, key):
        """(core optimizer, state version its units are bound to) for a layout of runs."""
        hit = self._cores.get(key)
        if hit is not None:
            return hit
        if len(self._cores) >= _LAYOUT_CACHE:
            self._cores.clear()
        groups = [
            {"params": self._buckets[k][1].slice(i, j), **self._core_hyper((k, i, j))}
            for k, i, j in key
        ]
        core = self.core_class(groups, **self._options)
        if precision.is_int8(self._precision):
            core.precision = core.precision._replace(min_8bit_size=self._int8_limit(key))
        # stochastic rounding's element index: the element's place in the buffers (bucket by
        # bucket, gaps counted), whichever parameters have gradients this step
        bases = [0]
        for _, buf in self._buckets:
            bases.append(bases[-1] + int(buf.flat.numel()))
        core._offsets = {
            unit: bases[k] + self._buckets[k][1].offsets[i][0]
            for unit, (k, i, _) in zip(core.units(), key)
        }
        return core, None

    def _views(self, unit, k, i, j):
        """The core unit's state: native flat views of this run's range of the state tensors."""
        out, held = {}, self._held[k][i]
        view = arrays.host_view if unit.device is None else unit.backend.native
        for name, t in self._tensors[k].items():
            if name not in held:  # a state array other parameters of the bucket hold
                continue
            lo, hi = self._layout(k, name).span(i, j)
            if isinstance(t, precision.Quantized):  # lo starts a block
                codes, absmax = quantized_range(t, lo, hi)
                out[name] = precision.Quantized(view(codes), view(absmax), t.signed)
                continue
            out[name] = view(t[lo:hi])
        return out

    def _layout(self, k, name):
        """The :class:`StateLayout` of state ``name`` in bucket ``k``'s flat state tensor."""
        layout = self._layouts.get((k, name))
        if layout is None:
            buf = self._buckets[k][1]
            if name in self.core_class.tensor_state:
                layout = StateLayout.of_tensor_state(self.core_class, name, buf)
            else:
                layout = StateLayout(buf.offsets, [p.shape for p in buf.params], buf.flat.numel())
            self._layouts[k, name] = layout
        return layout

    def _harvest(self, unit, k, i, j, starting=None):
        """After a step: the run's scalar state into the records and the scalar tensors; state
        arrays the core just allocated (first step of these params, or ``starting``: the names
        :meth:`_start_lazy_state` started) copied into the flat state tensors, and
        ``self.state`` of these params published (then, not at every step)."""
        record = tuple(sorted((n, v) for n, v in unit.state.items() if not is_state_array(v)))
        before, held = self._records[k][i], self._held[k][i]
        if before is None:
            self._store_state(k, i, j, unit.state)
            self._version += 1
            held = frozenset(n for n, v in unit.state.items() if is_state_array(v))
        elif starting:
            self._store_state(k, i, j, {n: unit.state[n] for n in starting})
            self._version += 1
            held = held.union(starting)
            steps = dict(before)["step"] + 1  # this step ran as the rule's step 1
            record = tuple((n, steps if n == "step" else v) for n, v in record)
        self._records[k][i:j] = [record] * (j - i)
        if before is None or starting:
            self._held[k][i:j] = [held] * (j - i)
        self._write_scalars(k, i, j, record)
        if before is None or starting or not _same_names(before, record):
            self._publish(k, i, j)

    def _store_state(self, k, i, j, state):
        """Copy the state arrays of a core unit over params ``i .. j-1`` of bucket ``k`` (from
        its first step, or checked by a load) into the bucket's flat state tensors."""
        device = self._buckets[k][1].device
        for name, a in state.items():
            lo, hi = self._layout(k, name).span(i, j)
            if isinstance(a, precision.Quantized):
                self._store_quantized(k, name, a, lo, hi)
            elif hasattr(a, "shape"):
                self._state_tensor(k, name, a.dtype)[lo:hi].copy_(as_tensor(a, device))

    def _state_tensor(self, k, name, dtype):
        """Bucket ``k``'s flat tensor of state ``name``, allocated in ``dtype`` (the core's
        storage dtype of that slot: the parameter's, ``state_dtype``'s or float32 for master
        weights) on first use, as long as its :meth:`_layout` says."""
        tensors = self._tensors[k]
        if name not in tensors:
            flat = self._buckets[k][1].flat
            size = self._layout(k, name).size
            tensors[name] = allocate(size, dtype, flat.device, flat.is_pinned())
        return tensors[name]

    def _store_quantized(self, k, name, slot, lo, hi):
        """Elements ``lo:hi`` (``lo`` starting a block) of bucket ``k``'s 8-bit state ``name``
        set to the :class:`~fastopt.optim.precision.Quantized` ``slot`` (their codes and the
        absmax of their blocks: host arrays, or device arrays on the bucket's device). The tensors
        (codes and block absmax over the whole buffer, on its device, the gaps between
        parameters holding the code of 0) are made on first use."""
        flat = self._buckets[k][1].flat
        t = self._tensors[k].get(name)
        if t is None:
            from ..kernels.block_loops import code_of

            pinned = flat.is_pinned()
            n = flat.numel()
            t = self._tensors[k][name] = precision.Quantized(
                allocate(n, torch.uint8, flat.device, pinned),
                allocate(precision.int8_block_count(n), torch.float32, flat.device, pinned),
                bool(slot.signed),
            )
            t.codes.fill_(int(code_of(0.0, t.signed)))
        codes, absmax = quantized_range(t, lo, hi)
        codes.copy_(as_tensor(slot.codes, codes.device))
        absmax.copy_(as_tensor(slot.absmax, absmax.device))

    # ------------------------------------------------------------------ state
    def _scalar_array(self, k, name):
        """The NumPy view of bucket ``k``'s tensor of scalar state ``name`` (one element per
        parameter, in torch's dtype for ``"step"``: float32, float64 under a float64 default
        dtype), made on first use; each parameter's ``state[p][name]`` is a 0-d view of it."""
        hit = self._scalars[k].get(name)
        if hit is None:
            t = torch.zeros(len(self._buckets[k][1].params), dtype=_scalar_dtype(), device="cpu")
            hit = self._scalars[k][name] = (t, t.numpy())
        return hit[1]

    def _write_scalars(self, k, i, j, record):
        """Params ``i .. j-1`` of bucket ``k`` get the scalar state ``record``: one write per
        name into the tensors their ``state[p]`` entries view (no per-parameter work)."""
        for name, v in record:
            self._scalar_array(k, name)[i:j] = v

    def _publish(self, k, i, j):
        """``self.state[p]`` of params ``i .. j-1`` of bucket ``k`` in torch's format: views of
        the flat state it holds and of the scalar tensors; params without state get no entry.
        Written past the :class:`~fastopt.torch.state.TrackedState` notes, and kept in
        ``_shown`` for :meth:`_reconcile_state` to compare with."""
        buf, tensors = self._buckets[k][1], self._tensors[k]
        for m in range(i, j):
            p, record, held = buf.params[m], self._records[k][m], self._held[k][m]
            if record is None:
                dict.pop(self.state, p, None)
                self._shown[k][m] = None
                continue
            entry = {}
            for name, t in tensors.items():
                if name not in held:
                    continue
                layout = self._layout(k, name)
                (lo, hi), shape = layout.offsets[m], layout.shapes[m]
                if shape is None:  # no share of this state (Adafactor: a vector's row_var)
                    continue
                if isinstance(t, precision.Quantized):
                    entry.update(quantized_entry(name, t, lo, hi, shape))
                else:
                    entry[name] = t[lo:hi].view(shape)
            for name, _ in record:
                entry[name] = self._scalars[k][name][0][m]
            entry = StateEntry(self._edits, entry)
            dict.__setitem__(self.state, p, entry)
            self._shown[k][m] = (entry, tuple(entry.items()))

    def _publish_state(self):
        """``self.state`` in torch's format from the flat state and the records (after
        ``load_state_dict`` has replaced them)."""
        for k, (_, buf) in enumerate(self._buckets):
            for m, record in enumerate(self._records[k]):
                if record is not None:
                    self._write_scalars(k, m, m + 1, record)
            self._publish(k, 0, len(buf.params))

    def _scalar_names(self):
        return {name for scalars in self._scalars for name in scalars}

    def state_dict(self):
        """torch's ``state_dict()``: the state tensors are live views, as torch's are; the
        scalar state (``"step"``, ...) is copied as of this call, so that an optimizer loading
        it (torch.optim increments ``"step"`` in place) does not write into this one's."""
        sd = super().state_dict()
        names = self._scalar_names()
        sd["state"] = {
            index: {n: v.clone() if n in names else v for n, v in entry.items()}
            for index, entry in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict``: a state saved by ``torch.optim.X`` or ``fastopt.torch.X``.
        Everything is checked (by torch, then by the fastopt core: state names, shapes, steps,
        hyperparameters) before the optimizer changes; on an error it is left as it was."""
        from .state import keep_saved_dtypes, restore_strings, without_strings

        old_state, old_groups = self.state, self.param_groups
        plain, strings = without_strings(state_dict)  # torch's loader mangles str values
        super().load_state_dict(plain)
        try:
            restore_strings(self, plain, strings)
            keep_saved_dtypes(self, plain)
            install_state(self)
        except Exception:
            self.state, self.param_groups = old_state, old_groups
            raise
        self._cores.clear()
        self._version += 1
        self.state = TrackedState(self._edits)
        self._publish_state()
        self._edits.edited = False
        self._state_seen = self.state


def _rebuilt(cls, groups, kwargs, state_dict):
    """The optimizer :meth:`FastoptOptimizer.__reduce__` describes."""
    opt = cls(groups, **kwargs)
    opt.load_state_dict(state_dict)
    return opt


def _distinct(named):
    """``(name, tensor)`` pairs with each tensor once (a tied Parameter listed twice is one)."""
    seen, out = set(), []
    for name, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _same_names(record, other):
    """Whether two scalar-state records have the same names (in the same, sorted, order)."""
    return len(record) == len(other) and all(a[0] == b[0] for a, b in zip(record, other))


_TORCH_WRAPPED_STEP = torch.optim.Optimizer.profile_hook_step(FastoptOptimizer._step)
"""``FastoptOptimizer._step`` inside torch's profiler range and step hooks, as torch wraps
every optimizer's ``step``."""


class StateLayout:
    """Where each parameter of a bucket keeps its share of one state array in the bucket's flat
    state tensor: ``offsets[m]`` = (lo, hi) and ``shapes[m]`` its shape in torch's format (None:
    no share), ``size`` the tensor's length. A state laid out like the parameters has the
    parameter offsets and shapes; the core's :attr:`~fastopt.optim.base.Optimizer.tensor_state`
    (Adafactor's factors, NovoGrad's per-tensor moment) the tensors' shares back to back, the
    gaps between parameters (8-bit buckets) counted as the vectors they are in the core's
    ParamSet slices, so that every run of parameters has one contiguous range (:meth:`span`)."""

    def __init__(self, offsets, shapes, size):
        self.offsets, self.shapes, self.size = offsets, shapes, size

    @classmethod
    def of_tensor_state(cls, core_class, name, buf):
        offsets, shapes, pos = [], [], 0
        for m, p in enumerate(buf.params):
            share = core_class.tensor_state_shapes(tuple(p.shape)).get(name)
            size = int(np.prod(share)) if share is not None else 0
            offsets.append((pos, pos + size))
            shapes.append(share)
            pos += size
            gap = buf.offsets[m + 1][0] - buf.offsets[m][1] if m + 1 < len(buf.params) else 0
            if gap:  # a segment of the core's slices (FlatBuffer.slice)
                gap_share = core_class.tensor_state_shapes((gap,)).get(name)
                pos += int(np.prod(gap_share)) if gap_share is not None else 0
        return cls(offsets, shapes, pos)

    def span(self, i, j):
        """(lo, hi): the range of params ``i .. j-1`` (and the gaps between them)."""
        return self.offsets[i][0], self.offsets[j - 1][1]
