"""ZeRO stage 1: the optimizer state sharded over the ranks, parameters and gradients replicated."""

import math
import pickle
from collections.abc import Mapping

import numpy as np

from .. import arrays, dispatch, streams
from ..arrays import import_cupy, is_device_array, to_host
from ..clipping import clip_coefficient
from ..memory import aligned_zeros
from ..optim import precision
from ..optim.base import Optimizer
from ..optim.muon import muon_selection
from ..optim.precision import is_16bit
from ..optim.segmented import SegmentedOptimizer
from ..optim.state_dict import INT8_SUFFIXES
from ..paramset import ParamSet
from ..validation import check_bool, check_positive
from .agreement import agree_on_arguments
from .collectives import Collectives, check_params_equal, widened
from .data_parallel import step_inputs
from .mpi import mpi_move_type
from .sharding import block_shard_sizes, segment_shards, shard_sizes

ABSMAX = INT8_SUFFIXES[0]
"""Suffix of the state entry of an 8-bit slot's block absmax."""


def _of_local_optimizer(name):
    """A read-only property giving the rank's local optimizer's attribute ``name``."""
    return property(
        lambda self: getattr(self.local_optimizer, name),
        doc=f"The local (shard) optimizer's ``{name}``.",
    )


class ZeroRedundancyOptimizer:
    """ZeRO stage 1: optimizer state sharded across ranks, parameters and gradients replicated.

    ``ZeroRedundancyOptimizer(ps, fo.Adam, lr=1e-3, max_grad_norm=1.0)`` builds, on each rank,
    ``fo.Adam(ps.flat[lo:hi], lr=1e-3)`` over the rank's slice (:func:`shard_bounds`), so each
    rank keeps ``1/world`` of the state (rounded up to a whole element): the elementwise rules'
    updates do not care where a slice starts.

    The per-tensor optimizers (LAMB, LARS, NovoGrad, Adafactor: a norm, or row and column means,
    per tensor) are sharded on tensor boundaries instead, so no shard cuts a tensor's reduction:
    each rank owns a contiguous run of whole tensors (:func:`segment_shards`: element counts
    balanced greedily, deterministic; ``tensors`` names them) and steps
    ``optimizer_class(<a ParamSet view of its tensors>)``; the collectives are the same ones
    with these counts. A rank that owns no tensor steps a private 1-element ParamSet (a rank
    owning only zero-size tensors owns them: their per-tensor state is in the layout). Muon too:
    its ``muon_params`` are chosen over the whole ParamSet (``"hidden"`` by position in it) and
    each rank's Muon gets the chosen names among its tensors, the others falling back to AdamW
    there as in one process; a state array a rank does not keep (Muon's momentum on a rank of
    fallback tensors only, which the update never reads) is gathered as zeros. L-BFGS is
    refused by name.

    The options that choose per tensor (LAMB's and LARS's masks, Muon's ``muon_params``) are
    evaluated for every tensor of the whole ParamSet on every rank, without communication, at
    construction and whenever ``param_groups``' options changed before a step: a mask failing
    for one tensor raises the same error on every rank before any collective and any write,
    instead of on the rank owning that tensor only (the others would wait in the Allgather).
    Changing which tensors Muon updates is refused (each rank keeps its tensors' state).

    :meth:`step`: ``Reduce_scatter`` (sum) of the flat gradient into a slice-sized buffer; if
    ``max_grad_norm`` or ``skip_nonfinite``, one Allreduce of (slice sum of squares, non-finite
    flag) gives the global norm and the skip decision, the same on every rank; the slice optimizer's
    fused kernel with ``grad_scale = grad_scale / world * clip``; ``Allgather`` of the parameters
    in place (block forms when the world size divides the buffer size, else vector forms). Same
    semantics as the single-process optimizer with the same options (the clip coefficient is
    torch's ``min(1, max_norm / (norm + 1e-6))``), to float rounding: the gradient sum and the
    norm are added up in another order.

    ``param_groups`` is the slice optimizer's (change ``lr`` there identically on every rank).
    :meth:`state_dict` / :meth:`load_state_dict` are collective and use the full-buffer layout of
    ``optimizer_class(ps)``, so states move between world sizes and to single-process runs. A
    refusal of the loaded state, and an option that cannot be pickled to the other ranks (a
    lambda mask), raise the same error on every rank, never on one rank alone.

    Storage precision: the options of :mod:`fastopt.optim.precision` (``master_weights``,
    ``state_dtype``, ``stochastic_rounding``, ``seed``) go to the slice optimizer with the other
    ``defaults``, so a 16-bit ParamSet's float32 master copy and its state are sharded like any
    state (each rank keeps the master slice of the elements it owns, gathered into checkpoints
    and re-sliced on load, every array in its own dtype). 16-bit gradients are summed in float32
    (the ``Reduce_scatter`` gets a float32 copy; float32 gradients of a 16-bit ParamSet go as
    they are) and the slice optimizer reads the float32 sum; parameters are gathered as their
    16-bit bits. Stochastic rounding draws its bits by the element's index in the whole
    ParamSet, so the result does not depend on the world size.

    8-bit state (``state_dtype="int8"``): whether the ParamSet keeps it is decided on the whole
    ParamSet as in one process (``MIN_8BIT_SIZE`` elements; a smaller one keeps float32 state
    and is sharded as above). If it does, the shards are cut on the 256-element blocks of the
    flat buffer (:func:`~fastopt.distributed.sharding.block_shard_sizes`), each shard keeps
    8-bit state whatever its size, and its blocks, their absmax and so the bits of every step
    are the one-process optimizer's given the same summed gradients. :meth:`state_dict` gathers
    the codes per element and the absmax per block into the one-process layout (``name``,
    ``name + "_absmax"``, ``name + "_qmap"``); :meth:`load_state_dict` re-slices them on the
    block boundaries of this world size and refuses, by name and before anything changes, codes
    that are not uint8, an absmax of another block layout, or 8-bit entries for a ParamSet that
    keeps float state.
    """

    def __init__(
        self,
        params,
        optimizer_class,
        *,
        comm=None,
        root=0,
        debug=False,
        cuda_aware=None,
        max_grad_norm=None,
        max_grad_value=None,
        skip_nonfinite=False,
        backend=None,
        **defaults,
    ):
        self._coll = Collectives(comm, cuda_aware)
        # first, so that a rank's other arguments raise on every rank instead of hanging them
        agree_on_arguments(
            self._coll.comm,
            "ZeroRedundancyOptimizer",
            {
                "params": params,
                "optimizer_class": optimizer_class,
                "options": defaults,
                "max_grad_norm": max_grad_norm,
                "max_grad_value": max_grad_value,
                "skip_nonfinite": skip_nonfinite,
                "backend": backend,
                "root": root,
                "debug": debug,
            },
        )
        if not isinstance(params, ParamSet):
            raise TypeError(
                f"ZeroRedundancyOptimizer needs a ParamSet, got {type(params).__name__}"
            )
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            raise TypeError(
                "optimizer_class must be a fastopt optimizer class (e.g. fo.Adam), got "
                f"{optimizer_class!r}"
            )
        _check_shardable(optimizer_class)
        if max_grad_norm is not None:
            check_positive("max_grad_norm", max_grad_norm)
        check_bool("skip_nonfinite", skip_nonfinite)
        check_bool("debug", debug)
        self.params = params
        self.optimizer_class = optimizer_class
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.debug = debug
        self.root = root
        self.skipped_steps = 0
        self.last_step_taken = None
        self.last_grad_norm = None
        self.comm = self._coll.comm
        self.rank, self.world_size = self._coll.rank, self._coll.size
        self.per_tensor = not optimizer_class.elementwise
        if self.per_tensor and quantizes_whole(defaults, params.size):
            raise ValueError(
                f"ZeroRedundancyOptimizer shards {optimizer_class.__name__} on tensor "
                "boundaries, which would cut the 256-element blocks of state_dtype='int8' "
                "otherwise than one process does (and so change every step's bits); use "
                "state_dtype='bfloat16', or DataParallel, for 8-bit state of a per-tensor rule"
            )
        self.quantized = not self.per_tensor and quantizes_whole(defaults, params.size)
        self._muon_params = self._muon_chosen = None
        if self.per_tensor:
            names = params.names
            sizes = [hi - lo for lo, hi in (params.offsets[n] for n in names)]
            self.counts, self.displs, bounds = segment_shards(sizes, self.world_size)
            self.tensors = tuple(names[bounds[self.rank] : bounds[self.rank + 1]])
        elif self.quantized:  # whole 8-bit blocks: each rank's blocks are the one-process ones
            block = precision.QUANT_BLOCK
            self.counts, self.displs = block_shard_sizes(params.size, self.world_size, block)
            self.tensors = None
        else:
            self.counts, self.displs = shard_sizes(params.size, self.world_size)
            self.tensors = None
        self.lo = self.displs[self.rank]
        self.hi = self.lo + self.counts[self.rank]
        # a rank owning only zero-size tensors owns them all the same (their per-tensor state)
        self._owns = bool(self.tensors) if self.per_tensor else self.hi > self.lo
        # the block absmax of 8-bit slots over the ranks: one per (possibly partial) block
        block = precision.QUANT_BLOCK
        self._block_layout = (
            [-(-c // block) for c in self.counts],
            [d // block for d in self.displs],
        )
        if getattr(optimizer_class, "matrices_only", False):
            # checked over the whole ParamSet as one process would (no state is allocated)
            optimizer_class(params, **defaults)
            self._muon_params = defaults.get("muon_params")
            self._muon_chosen = self._whole_muon_selection(self._muon_params)
            defaults = {**defaults, "muon_params": self._local_muon(self._muon_params)}
        xp = (
            import_cupy("ZeroRedundancyOptimizer on device buffers")
            if is_device_array(params.flat)
            else np
        )
        grad_dtype = np.float32 if is_16bit(params.dtype) else params.dtype
        if self._owns:
            target = params.flat[self.lo : self.hi]
            if self.per_tensor:  # the rank's whole tensors, as a view: the segments stay known
                segments = [(n, params.shapes[n]) for n in self.tensors]
                grads = params.grad_flat[self.lo : self.hi]
                target = ParamSet.from_buffers(target, grads, segments)
            self._grad_shard = aligned_zeros(self.hi - self.lo, grad_dtype, xp)
        else:
            # fewer elements (or tensors) than ranks: this rank owns nothing; it steps a private
            # 1-element array (gradient 0) so that its step counters stay in line with the others
            target = aligned_zeros(1, params.dtype, xp)
            if self.per_tensor:
                target = ParamSet.from_buffers(
                    target, aligned_zeros(1, params.dtype, xp), [("unowned", (1,))]
                )
            self._grad_shard = aligned_zeros(1, grad_dtype, xp)
        self._wide = None  # float32 copy of 16-bit gradients for the Reduce_scatter
        self.local_optimizer = optimizer_class(
            target, max_grad_value=max_grad_value, backend=backend, **defaults
        )
        self.local_optimizer.element_offset = self.lo  # stochastic rounding's element index
        if not self._owns and isinstance(self.local_optimizer, SegmentedOptimizer):
            # the private element is no tensor of the ParamSet: the masks are never asked of it
            self.local_optimizer._flags = _no_flags
        self._muon_local = None  # the local optimizer's muon_params, as this object set it
        if self._muon_chosen is not None:
            self._muon_local = self.local_optimizer.param_groups[0]["muon_params"]
        self._options_key = None  # the options last checked over the whole ParamSet
        self._check_options()  # a bad mask: the same error on every rank, before any collective
        if self.quantized:  # 8-bit as the whole ParamSet is, whatever the shard's size
            local = self.local_optimizer
            local.precision = local.precision._replace(min_8bit_size=0)
        self._backend_name = backend
        self._backend = None  # of the gradient slice, for its sum of squares; found at first use
        self._own_sizes = self._state_sizes = None
        if self.per_tensor:
            # state elements per array on every rank (Adafactor's factors are not one per
            # element): the layout of gathers and scatters, known before any state exists
            self._own_sizes = local_state_sizes(self.local_optimizer)
            owned = self._own_sizes if self._owns else {}
            self._state_sizes = self.comm.allgather(owned)
            # every array of the full layout, the same list on every rank
            self._state_keys = sorted({k for sizes in self._state_sizes for k in sizes})
            # stochastic rounding counts each array's elements in its full layout
            self.local_optimizer.state_offsets = {
                k: self._layout(k)[1][self.rank] for k in self._state_keys
            }
        self._coll.start_from_root(params, root, debug)

    # ----------------------------------------------------------------- properties
    @property
    def stats(self):
        """:class:`CommStats` of this object's collectives."""
        return self._coll.stats

    param_groups = _of_local_optimizer("param_groups")
    defaults = _of_local_optimizer("defaults")
    max_grad_value = _of_local_optimizer("max_grad_value")

    @property
    def shard(self):
        """(lo, hi): this rank's slice of the flat buffer."""
        return self.lo, self.hi

    def _local_muon(self, value):
        """Muon's ``muon_params`` for this rank: the names ``value`` chooses over the whole
        ParamSet, among this rank's tensors (none on a rank without tensors)."""
        chosen = self._whole_muon_selection(value)
        return RankNames(n for n in (self.tensors if self._owns else ()) if n in chosen)

    def _whole_muon_selection(self, value):
        """The set of names Muon's ``muon_params`` ``value`` chooses over the whole ParamSet."""
        return muon_selection(value, list(self.params.shapes.items()))

    # ----------------------------------------------------------------- options
    def _check_options(self):
        """Evaluate, on every rank and over every tensor of the whole ParamSet, the options that
        choose per tensor (LAMB's and LARS's ``weight_decay_mask`` / ``trust_ratio_mask``,
        Muon's ``muon_params``), when the local group's options changed since the last check
        (at construction, then before each step and after a load).

        Why: each rank's optimizer evaluates them over its own tensors only, inside its step,
        so a mask that fails for one tensor (not a bool, a KeyError) would raise on the rank
        owning it while the others write their shards and wait in the Allgather forever. Here
        the masks are called for every tensor on every rank, with no communication, so a bad
        one raises the same error everywhere before any collective and any write (masks are
        taken to be deterministic functions of (name, shape), as one process assumes too)."""
        if self._muon_local is None and not isinstance(self.local_optimizer, SegmentedOptimizer):
            return  # no per-tensor choice to check
        group = self.local_optimizer.param_groups[0]
        key = _options_key(group, self.local_optimizer.defaults)
        if key == self._options_key:
            return
        if self._muon_local is not None:
            self._sync_muon(group)
        else:
            whole_mask_flags(self.local_optimizer, group, self.params)
        self._options_key = _options_key(group, self.local_optimizer.defaults)

    def _sync_muon(self, group):
        """A ``muon_params`` set in ``param_groups`` after construction (any value but the
        local tuple this object gave the local Muon): checked over the whole ParamSet as one
        process would, then replaced by this rank's names. Refused on every rank if it changes
        which tensors Muon updates: each rank keeps the state arrays of its tensors' rule
        only (and the state layout follows them), so a new choice needs a new optimizer."""
        value = group["muon_params"]
        if value is self._muon_local:
            return
        options = {k: group[k] for k in self.local_optimizer.defaults}
        self.optimizer_class(self.params, **options)  # every check, over the whole ParamSet
        chosen = self._whole_muon_selection(value)
        if chosen != self._muon_chosen:
            raise ValueError(
                f"param_groups[0]['muon_params'] = {value!r} chooses {sorted(chosen)} for Muon, "
                f"this ZeroRedundancyOptimizer was built for {sorted(self._muon_chosen)}: each "
                "rank keeps only its tensors' state, so create a new optimizer to change it"
            )
        self._muon_params = value
        group["muon_params"] = self._muon_local

    def _layout(self, name):
        """(counts, displacements) of state array ``name`` over the ranks in the full layout; a
        rank without that array (Muon's momentum beside fallback tensors only) holds its
        elements' share of it (one value per element). An 8-bit slot's absmax: its blocks."""
        if not self.per_tensor:
            if self.quantized and is_absmax(name):
                return self._block_layout
            return self.counts, self.displs
        counts = [sizes.get(name, self.counts[r]) for r, sizes in enumerate(self._state_sizes)]
        displs = [sum(counts[:r]) for r in range(len(counts))]
        return counts, displs

    def _full_size(self, name):
        """Elements of state array ``name`` in the full layout; None for a name it has not."""
        if self.per_tensor and name not in self._state_keys:
            return None
        return sum(self._layout(name)[0])

    def local_state_elements(self):
        """Elements of optimizer state held by this rank (all state arrays together)."""
        if not self._owns:
            return 0
        values = [v for entry in self.local_optimizer.state.values() for v in entry.values()]
        return sum(
            int(v.codes.size if isinstance(v, precision.Quantized) else v.size)
            for v in values
            if hasattr(v, "shape") or isinstance(v, precision.Quantized)
        )

    # ----------------------------------------------------------------- step
    def zero_grad(self):
        self.params.zero_grad()

    def step(self, grads=None, *, grad_scale=None):
        """One ZeRO-1 step on this rank's gradient (``grads``: a flat array, or the ParamSet's
        gradient buffer); collective."""
        gs, src = step_inputs(
            self,
            grads,
            grad_scale,
            "ZeroRedundancyOptimizer.step",
            self.local_optimizer,
            check=self._check_options,
        )
        if src.dtype != self._grad_shard.dtype:  # 16-bit gradients, summed in float32
            src = self._wide = widened(src, self._wide)
        shard = self._grad_shard
        if self._owns:
            self._coll.reduce_scatter_sum(src, shard, self.counts)
        else:  # owns nothing: receives nothing, steps its private element with gradient 0
            self._coll.reduce_scatter_sum(src, shard[:0], self.counts)
            shard.fill(0)
        gs /= self.world_size
        if self.max_grad_norm is not None or self.skip_nonfinite:
            if self._backend is None:
                self._backend = dispatch.backend_for([shard], self._backend_name)
            s, finite = self._backend.sumsq_and_finite(shard, streams.current(shard))
            total = self._coll.allreduce_scalars([s, 0.0 if finite else 1.0], "Allreduce(norm)")
            norm = gs * math.sqrt(total[0])
            self.last_grad_norm = norm
            if self.skip_nonfinite and total[1] != 0:
                self.skipped_steps += 1
                self.last_step_taken = False
                return
            if self.max_grad_norm is not None:
                coef = clip_coefficient(norm, self.max_grad_norm)
                if coef > 0:
                    gs *= coef
                else:  # 0 (norm overflowed) or NaN: as the fused step, g * coef reaches the rule
                    shard *= shard.dtype.type(coef)
        self.local_optimizer.step(shard, grad_scale=gs)
        self._coll.allgather_inplace(self.params.flat, self.counts, self.displs)
        self.last_step_taken = True
        if self.debug:
            check_params_equal(self.params, self.comm)

    # ----------------------------------------------------------------- state
    def state_dict(self, *, root=0):
        """The optimizer state in the full-buffer layout of ``optimizer_class(params)``
        (collective). The root gets the dict, the other ranks ``None``; ``root=None`` gives it to
        every rank (Allgatherv instead of Gatherv)."""
        local = self.local_optimizer.state_dict()
        entry = local["state"].get(0)
        state = {}
        if entry is not None:
            full_entry = {}
            names = set(entry)
            if self.per_tensor:  # the full layout's arrays (a rank may keep others, or fewer)
                names = {k for k, v in entry.items() if not hasattr(v, "shape")}
                names |= set(self._state_keys)
            for k in sorted(names):  # same order on every rank
                v = entry.get(k)
                if v is None:  # an array this rank does not keep: zeros for its share
                    dtype = self.local_optimizer.state_array_dtype(k, self.params.flat)
                    v = np.zeros(self._layout(k)[0][self.rank], dtype)
                if isinstance(v, np.ndarray):
                    counts, displs = self._layout(k)
                    mine = np.ascontiguousarray(v.reshape(-1)[: counts[self.rank]])
                    typ = mpi_move_type(mine.dtype)
                    full = np.empty(sum(counts), mine.dtype)
                    spec = [full, counts, displs, typ]
                    if root is None:
                        self.comm.Allgatherv([mine, typ], spec)
                    else:
                        self.comm.Gatherv([mine, typ], spec if self.rank == root else None, root)
                    full_entry[k] = full
                else:
                    full_entry[k] = v
            state[0] = full_entry
        if root is not None and self.rank != root:
            return None
        groups = local["param_groups"]
        if "muon_params" in groups[0]:
            groups = [{**groups[0], "muon_params": self._muon_params}]  # the whole ParamSet's
        return {
            "algorithm": local.get("algorithm", self.optimizer_class.__name__),
            "state": state,
            "param_groups": groups,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict, *, root=0):
        """Load a full-buffer-layout state (from :meth:`state_dict`, a checkpoint, or a plain
        ``optimizer_class(params).state_dict()``), given on ``root`` (other ranks may pass
        ``None``); collective. Each rank takes its slice. Checked on every rank before anything
        changes; if any rank refuses, every rank raises and keeps its previous state.

        Options that cannot be pickled (a lambda mask or ``muon_params``) are not sent: each
        rank takes them from its own ``state_dict`` argument (e.g. ``state_dict(root=None)``),
        or keeps its current value when the root's is its current one (the same object); else
        every rank raises the same ValueError naming the option."""
        if root is None:
            root = 0
        skeleton, array_names, unsent = self._received_skeleton(state_dict, root)
        group = self._received_group(skeleton, unsent, state_dict, root)
        whole_muon = group.get("muon_params")
        if self._muon_local is not None and "muon_params" in group:
            group = {**group, "muon_params": self._loaded_muon(whole_muon)}
        local_entry = None
        if skeleton["state"]:
            local_entry = dict(skeleton["state"][0])
            for k, dtype_name in array_names:
                dtype = (  # each array moves in its own dtype
                    np.dtype(np.uint8)
                    if dtype_name == "uint8"
                    else arrays.storage_dtype(dtype_name)
                )
                full = state_dict["state"][0][k] if self.rank == root else None
                counts, displs = self._layout(k)
                mine = np.empty(counts[self.rank], dtype)
                typ = mpi_move_type(dtype)
                send = None
                if self.rank == root:
                    full = np.ascontiguousarray(np.asarray(to_host(full)).reshape(-1), dtype)
                    send = [full, counts, displs, typ]
                self.comm.Scatterv(send, [mine, typ], root=root)
                if self.per_tensor and k not in self._own_sizes:
                    del local_entry[k]  # an array of the full layout this rank does not keep
                    continue
                if not self._owns:  # the private element's state, as a fresh one
                    mine = np.zeros(self._own_sizes[k] if self.per_tensor else 1, dtype)
                local_entry[k] = mine
            if self.per_tensor and not self._owns:  # the private element's own arrays
                for k, size in self._own_sizes.items():
                    dtype = self.local_optimizer.state_array_dtype(k, self.params.flat)
                    local_entry.setdefault(k, np.zeros(size, dtype))
        local_sd = {
            "algorithm": skeleton["algorithm"],
            "state": {0: local_entry} if local_entry is not None else {},
            "param_groups": [group],
            "skipped_steps": skeleton["skipped_steps"],
        }
        before = self.local_optimizer.state_dict()
        err = None
        try:
            self.local_optimizer.load_state_dict(local_sd)
        except Exception as exc:  # any refusal on one rank: all ranks must learn of it
            err = exc
        if not self._coll.all_true(err is None):
            if err is None:
                self.local_optimizer.load_state_dict(before)
                raise ValueError("another rank refused the optimizer state; nothing was changed")
            raise err
        self.skipped_steps = int(skeleton["skipped_steps"])
        if self._muon_local is not None and "muon_params" in group:
            self._muon_params = whole_muon
            self._muon_local = self.local_optimizer.param_groups[0]["muon_params"]
        self._options_key = None  # the loaded options are checked at the next step

    def _loaded_muon(self, value):
        """This rank's names of a loaded ``muon_params`` ``value`` (the saved choice over the
        whole ParamSet). The same skeleton is on every rank, so every rank raises alike: a
        value that is not a choice over this ParamSet, or one choosing other tensors than this
        optimizer's (each rank's state and the state layout follow its tensors' rules)."""
        try:
            chosen = self._whole_muon_selection(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"state_dict param_groups[0]: {exc}") from None
        if chosen != self._muon_chosen:
            raise ValueError(
                f"state_dict param_groups[0]['muon_params'] chooses {sorted(chosen)} for Muon, "
                f"this ZeroRedundancyOptimizer was built for {sorted(self._muon_chosen)}: "
                "build it with the state's muon_params"
            )
        return self._local_muon(value)

    def _received_skeleton(self, state_dict, root):
        """(skeleton, array names, unsent options) of the root's ``state_dict``, checked by the
        root and broadcast (collective). Every refusal by the root, whatever its exception,
        and anything in the skeleton that cannot be pickled, is raised on every rank as the
        same TypeError or ValueError: a root raising alone would leave the others waiting in
        the broadcast. Unpicklable param_groups options are sent as None and listed in
        ``unsent`` as (name, type name, whether it is the root's current value, why)."""
        msg = exc = None
        if self.rank == root:
            try:
                skeleton, names = self.check_state_dict(state_dict)
                unsent = self._unsendable_options(skeleton["param_groups"][0])
                why = _picklable(skeleton)
                if why is not None:
                    raise ValueError(f"state_dict cannot be sent to the other ranks ({why})")
                msg = ("ok", skeleton, names, unsent)
            except Exception as e:
                exc = e
                kind = "TypeError" if isinstance(e, TypeError) else "ValueError"
                text = str(e) if isinstance(e, (TypeError, ValueError)) else f"{e!r}"
                msg = ("error", kind, text)
        msg = self.comm.bcast(msg, root=root)
        if msg[0] == "error":
            raise (TypeError if msg[1] == "TypeError" else ValueError)(msg[2]) from exc
        return msg[1:]

    def _unsendable_options(self, group):
        """[(name, type name, is the root's current value, why)] of the options of ``group``
        (the skeleton's, changed in place to None) that cannot be pickled."""
        unsent = []
        for k, v in group.items():
            why = _picklable(v)
            if why is not None:
                unsent.append((k, type(v).__name__, v is self._current_option(k), why))
                group[k] = None
        return unsent

    def _current_option(self, name):
        """This rank's current value of option ``name`` (Muon's ``muon_params``: the whole
        ParamSet's choice, not the local names)."""
        if name == "muon_params" and self._muon_local is not None:
            return self._muon_params
        return self.local_optimizer.param_groups[0].get(name)

    def _received_group(self, skeleton, unsent, state_dict, root):
        """The skeleton's ``param_groups[0]`` with its unsent options filled in on each rank:
        from the rank's own ``state_dict`` argument, else its current value when the root's is
        its current one. Collective when some were unsent (one agreement, so that every rank
        raises the same ValueError, before anything changes, if some rank has no value)."""
        group = dict(skeleton["param_groups"][0])
        if not unsent:
            return group
        own = _own_group(state_dict)
        found = True
        for k, _, unchanged, _ in unsent:
            if own is not None and k in own:
                group[k] = own[k]
            elif unchanged:
                group[k] = self._current_option(k)
            else:
                found = False
        if not self._coll.all_true(found):
            k, type_name, _, why = next(u for u in unsent if not u[2])
            raise ValueError(
                f"load_state_dict: param_groups[0][{k!r}] (a {type_name}) cannot be sent from "
                f"rank {root} to the other ranks ({why}) and is not this optimizer's current "
                "value: pass the same state_dict on every rank, or make it picklable (e.g. a "
                "module-level function)"
            )
        return group

    def check_state_dict(self, sd):
        """(state dict with arrays removed, [(name, storage dtype name)] of the state arrays)
        of a full-buffer layout state dict, after checking it against this optimizer (class,
        one group, sizes, float dtypes); ValueError / TypeError naming the problem. Local: no
        communication. The full layout does not depend on the world size (it is
        ``optimizer_class(params)``'s), so a state saved on any number of ranks is re-sliced
        for this one."""
        if not isinstance(sd, Mapping) or not {"state", "param_groups"} <= set(sd):
            raise ValueError(
                "not an optimizer state_dict: expected keys 'state' and 'param_groups'"
            )
        algo = sd.get("algorithm", self.optimizer_class.__name__)
        if algo != self.optimizer_class.__name__:
            raise ValueError(
                f"state_dict is for {algo}, this optimizer is {self.optimizer_class.__name__}"
            )
        groups = sd["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer 1")
        state = sd["state"]
        if not isinstance(state, Mapping) or set(state) - {0}:
            raise ValueError(f"state_dict['state'] must hold entry 0 only, got {sorted(state)}")
        names, skel_entry = [], None
        if 0 in state:
            entry = state[0]
            if not isinstance(entry, Mapping):
                raise ValueError("state[0] is not a state entry")
            skel_entry = {}
            for k, v in entry.items():
                if hasattr(v, "shape") and getattr(v, "ndim", 0) > 0:
                    a = np.asarray(to_host(v))
                    dtype_name = self._int8_array_dtype(k, a, entry)
                    if dtype_name is not None:  # codes or block absmax, checked
                        names.append((k, dtype_name))
                        skel_entry[k] = None
                        continue
                    dtype_name = arrays.storage_name(a.dtype)
                    if dtype_name is None:
                        raise TypeError(
                            f"state[0][{k!r}] has dtype {a.dtype}, expected floats "
                            f"({', '.join(arrays.STORAGE_NAMES)})"
                        )
                    want = self._full_size(k)
                    if want is None:
                        raise ValueError(
                            f"state[0][{k!r}] is not a state array of "
                            f"{self.optimizer_class.__name__} (it keeps "
                            f"{sorted(self._state_sizes[0])})"
                        )
                    if a.size != want:
                        raise ValueError(
                            f"state[0][{k!r}] has {a.size} elements, "
                            + (
                                f"{self.optimizer_class.__name__} over this ParamSet keeps {want}"
                                if self.per_tensor
                                else f"the ParamSet {self.params.size}"
                            )
                        )
                    names.append((k, dtype_name))
                    skel_entry[k] = None
                else:
                    skel_entry[k] = v
            names.sort()
        skeleton = {
            "algorithm": algo,
            "state": {0: skel_entry} if skel_entry is not None else {},
            "param_groups": [dict(groups[0])],
            "skipped_steps": sd.get("skipped_steps", 0),
        }
        return skeleton, names

    def _int8_array_dtype(self, k, a, entry):
        """``"uint8"`` or ``"float32"`` for the codes or the block absmax ``k`` (host array
        ``a``) of an 8-bit slot of a state ``entry``, after checking them against this
        ParamSet's block layout; None when ``k`` holds float state, to be checked as such.
        ValueError / TypeError naming ``k`` and the reason."""
        if self.per_tensor:
            return None  # never 8-bit (the rules are refused); unknown names are refused later
        absmax = is_absmax(k)
        slot = k[: -len(ABSMAX)] if absmax else k
        if slot not in precision.INT8_SIGNED:
            return None
        n = self.params.size
        if not self.quantized:
            if absmax or a.dtype == np.uint8:
                why = (
                    f"its {n} elements are fewer than MIN_8BIT_SIZE ({precision.MIN_8BIT_SIZE})"
                    if precision.is_int8(self.local_optimizer.precision)
                    else "state_dtype is not 'int8'"
                )
                raise ValueError(
                    f"state[0][{k!r}] is 8-bit blockwise state, but this ParamSet keeps "
                    f"{slot!r} as floats ({why})"
                )
            return None
        if absmax:
            blocks = precision.int8_block_count(n)
            if a.dtype != np.float32 or tuple(a.shape) != (blocks,):
                raise ValueError(
                    f"state[0][{k!r}] must be float32 of shape ({blocks},) (one absmax per block "
                    f"of {precision.QUANT_BLOCK} elements of the ParamSet's {n}); got {a.dtype} "
                    f"of shape {tuple(a.shape)}: another block layout"
                )
            return "float32"
        if a.dtype != np.uint8:
            raise TypeError(
                f"state[0][{k!r}] holds 8-bit codes (state_dtype='int8' over {n} elements): "
                f"dtype uint8 expected, got {a.dtype}"
            )
        if a.size != n:
            raise ValueError(f"state[0][{k!r}] has {a.size} 8-bit codes, the ParamSet {n}")
        missing = [k + suffix for suffix in INT8_SUFFIXES if k + suffix not in entry]
        if missing:
            raise ValueError(f"state[0][{k!r}] holds 8-bit codes without {missing}")
        return "uint8"


def quantizes_whole(defaults, n):
    """Whether one process would keep 8-bit state (``state_dtype="int8"`` in ``defaults``) for a
    ParamSet of ``n`` elements: at least ``MIN_8BIT_SIZE``."""
    state_dtype = defaults.get("state_dtype")
    return (
        isinstance(state_dtype, str)
        and state_dtype == precision.INT8
        and n >= precision.MIN_8BIT_SIZE
    )


def is_absmax(name):
    """Whether state entry ``name`` is the block absmax of an 8-bit slot."""
    return name.endswith(ABSMAX) and name[: -len(ABSMAX)] in precision.INT8_SIGNED


def _check_shardable(optimizer_class):
    """ValueError naming ``optimizer_class`` when ZeRO-1 cannot shard it."""
    name = optimizer_class.__name__
    if optimizer_class.requires_closure:
        raise ValueError(
            f"ZeroRedundancyOptimizer cannot shard {name}: it steps with a closure that "
            "re-evaluates the whole model; use DataParallel for it"
        )


class RankNames(tuple):
    """The names a ZeRO rank gives its local Muon as ``muon_params``: a tuple, and a new object
    each time, so that a value a user sets in ``param_groups`` (even an equal tuple, or the
    interned ``()``) is never taken for it and is always checked over the whole ParamSet."""

    __slots__ = ()


def _options_key(group, names):
    """The values of options ``names`` of ``group``, comparable between steps (each with its
    type, so that a user's ``()`` is not this rank's :class:`RankNames`; lists as tuples,
    functions by identity): a change means the per-tensor choices are evaluated again."""
    return tuple((type(v), tuple(v) if isinstance(v, list) else v) for v in map(group.get, names))


def whole_mask_flags(optimizer, group, params):
    """The per-tensor flags a :class:`SegmentedOptimizer`'s masks of ``group`` give every tensor
    of the ParamSet ``params`` (the class's own evaluation, so the same errors: TypeError naming
    the mask, the tensor and the value). Called on every rank over the whole ParamSet."""
    segs = [(name, shape, 0, 0) for name, shape in params.shapes.items()]
    return type(optimizer)._flags(optimizer, group, segs)


def _no_flags(group, segs):
    """The flags of a rank's private element (it owns no tensor): no decay, no trust ratio, and
    no mask called on a name that is not a tensor of the ParamSet."""
    return np.zeros(len(segs), np.int32)


def _picklable(value):
    """None if ``value`` pickles (MPI's object collectives send pickles), else why not."""
    try:
        pickle.dumps(value)
    except Exception as exc:  # PicklingError, AttributeError, TypeError: all mean "cannot send"
        return f"{type(exc).__name__}: {exc}"
    return None


def _own_group(state_dict):
    """``param_groups[0]`` of a rank's own ``state_dict`` argument, or None when it has none."""
    try:
        group = state_dict["param_groups"][0]
    except (TypeError, KeyError, IndexError):
        return None
    return group if isinstance(group, Mapping) else None


def local_state_sizes(optimizer):
    """{state array name: elements} of a one-unit optimizer's state once allocated (the
    optimizer's own shape rules: one value per element, per tensor, or per row and column)."""
    group = optimizer.param_groups[0]
    g_int = optimizer._groups[0]  # the shape rules are internal to the optimizer classes
    (unit,) = g_int["units"]
    names = list(optimizer._state_names(group))
    segment_state = getattr(optimizer, "segment_state", None)
    if segment_state is not None:
        names.append(segment_state)
    sizes = {n: math.prod(optimizer._state_shape(g_int, unit, n)) for n in names}
    if precision.has_master(optimizer.precision, unit.param):
        sizes[precision.MASTER] = int(unit.param.size)  # the float32 copy, one per element
    return sizes
