"""Muon (torch.optim.Muon), with an optional AdamW fallback group for the non-matrix parameters.

Where it runs: on the numba-cpu backend (compiled element passes, the Newton–Schulz products
through NumPy's BLAS on the ParamSet's views: :mod:`fastopt.optim.newton_schulz`), and on the
GPU backends through CuPy (:mod:`fastopt.optim.newton_schulz_device`: the products through
``cupy.matmul``, i.e. cuBLAS): ``cupy`` units directly, ``numba-cuda`` units through zero-copy
CuPy views of their arrays (CuPy must be installed; without it they are refused by name). The
NumPy reference backend is refused by name. 16-bit parameters, ``state_dtype`` and master
weights run the same passes on float32 copies (:mod:`fastopt.optim.staging`).
"""

import math
from collections.abc import Mapping

import numpy as np
from numba import njit

from .. import arrays
from ..paramset import ParamSet
from ..validation import check_choice, check_int, check_nonnegative, check_real
from . import precision, staging
from .base import Optimizer, scalar_tuple
from .hyperparameters import Hyper, betas, flag, nonnegative, weight_decay
from .hyperparameters import lr as lr_row
from .newton_schulz import NS_DTYPES, NewtonSchulz, bfloat16_bits, round_matrix
from .newton_schulz_device import DeviceNewtonSchulz, launch_context
from .newton_schulz_torch import TorchNewtonSchulz, native_bfloat16_products

DEFAULT_NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
"""(a, b, c) of the quintic Newton–Schulz iteration (Keller Jordan's Muon, torch's defaults)."""

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def _check_coefficients(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{name} must be a tuple of exactly 3 numbers, got {value!r}")
    for i, v in enumerate(value):
        check_real(f"{name}[{i}]", v)


def _check_ns_steps(name, value):
    check_int(name, value, lo=0, hi=99)  # torch: "must be less than 100"; 0: no iteration


def _check_adjust_lr_fn(name, value):
    check_choice(name, value, ADJUST_LR_FNS)


def _check_ns_dtype(name, value):
    check_choice(name, value, tuple(NS_DTYPES))


def adjusted_lr(lr, adjust_lr_fn, shape):
    """torch's ``_adjust_lr``: ``lr * sqrt(max(1, A/B))`` ("original", the default) or
    ``lr * 0.2 * sqrt(max(A, B))`` ("match_rms_adamw") for an A x B matrix."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr * math.sqrt(max(1, rows / cols))


def _named_shapes(params):
    """[(name, shape)] of one group's ``params``: ParamSet segment names, dict keys, list
    indices (0 for a single array)."""
    if isinstance(params, ParamSet):
        return list(params.shapes.items())
    if isinstance(params, Mapping):
        return [(k, tuple(getattr(a, "shape", ()))) for k, a in params.items()]
    if isinstance(params, (list, tuple)):
        return [(i, tuple(getattr(a, "shape", ()))) for i, a in enumerate(params)]
    return [(0, tuple(getattr(params, "shape", ())))]


def hidden_matrices(named_shapes):
    """The names of the usual recipe's Muon parameters among ``named_shapes`` ((name, shape)
    in model order): the 2-D ones, except the first and the last (the input layer or embedding,
    and the output layer) and those whose name contains ``embed``. Everything else (biases,
    norms, embeddings, the output layer) is left to the AdamW fallback (K. Jordan's Muon
    recipe; torch.optim.Muon's documentation)."""
    matrices = [name for name, shape in named_shapes if len(shape) == 2]
    hidden = matrices[1:-1]
    return tuple(n for n in hidden if "embed" not in str(n).lower())


def _check_muon_params(name, value):
    if value is None or value == "hidden" or callable(value):
        return
    if isinstance(value, str):
        raise ValueError(f"unknown {name} {value!r}; the one name of a recipe is 'hidden'")
    if not isinstance(value, (tuple, list, frozenset, set)):
        raise TypeError(
            f"{name} must be None, 'hidden', a collection of parameter names or a callable "
            f"(name, shape) -> bool, got {value!r}"
        )


def muon_selection(value, named_shapes):
    """The set of names a group's ``muon_params`` gives to Muon."""
    if value is None:
        return {n for n, _ in named_shapes}
    if value == "hidden":
        return set(hidden_matrices(named_shapes))
    if callable(value):
        chosen = set()
        for n, shape in named_shapes:
            pick = value(n, shape)
            if not isinstance(pick, (bool, np.bool_)):
                raise TypeError(f"muon_params({n!r}, {shape}) returned {pick!r}, not a bool")
            if pick:
                chosen.add(n)
        return chosen
    known = {n for n, _ in named_shapes}
    unknown = [n for n in value if n not in known]
    if unknown:
        raise ValueError(f"muon_params names {unknown} that are not parameters of the group")
    return set(value)


_kernel = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(inline="always", cache=True, error_model="numpy")


@_inline
def _lerp(a, b, w, one_minus_w):
    """torch.lerp (``kernels/rules.py``): ``a + w (b - a)`` for w < 0.5, else
    ``b - (b - a)(1 - w)``."""
    if w < 0.5:
        return a + w * (b - a)
    return b - (b - a) * one_minus_w


@_inline
def _momentum(g, buf, i, h):
    """Element ``i`` of the momentum pass: ``buf[i]`` updated, the iteration's input returned
    (see :func:`momentum_into`)."""
    gscale, clip, one_minus_mu, mu, nesterov = h
    gi = g[i] * gscale
    if clip > 0:
        if gi < -clip:
            gi = -clip
        elif gi > clip:
            gi = clip
    b = _lerp(buf[i], gi, one_minus_mu, mu)
    buf[i] = b
    if nesterov == 1:
        b = (b - gi) * mu + gi
    elif nesterov == 2:
        b = b - (b - gi) * one_minus_mu
    return b


@_kernel
def momentum_into(g, buf, x, h, emulate_bf16):
    """One pass over a matrix's elements (flat ``g``, ``buf``; ``x`` the iteration's input):
    ``g' = clamp(g * gscale, ±clip)`` (no clamp for clip 0), torch's
    ``buf.lerp_(g', 1 - momentum)``, then ``x = g'.lerp(buf, momentum)`` (``nesterov`` 1: the
    form ``(buf - g') mu + g'``, for mu < 0.5; 2: ``buf - (buf - g')(1 - mu)``; 0: ``x = buf``)
    in the parameters' dtype, cast to ``x``'s and rounded to bfloat16 when ``emulate_bf16``.
    ``h = (gscale, clip, 1 - mu, mu, nesterov)``, the floats in the parameters' dtype."""
    xf = x.reshape(x.size)
    dt = xf.dtype.type
    for i in range(buf.size):
        xf[i] = dt(_momentum(g, buf, i, h))
    if emulate_bf16:
        round_matrix(x)


_BITS_CHUNK = 512
"""Elements per chunk of the bfloat16-bits passes: their float32 values go through a scratch
this long (in L1), viewed as uint32 to round or widen them, so both loops vectorize."""


@_kernel
def momentum_into_bits(g, buf, bits, h):
    """:func:`momentum_into` with ``emulate_bf16``, the input stored as bfloat16 bits (uint16,
    C-contiguous ``bits``: the memory of a torch bfloat16 tensor) in the same pass."""
    bf = bits.reshape(bits.size)
    chunk = np.empty(_BITS_CHUNK, np.float32)
    chunk_bits = chunk.view(np.uint32)
    for lo in range(0, buf.size, _BITS_CHUNK):
        n = min(_BITS_CHUNK, buf.size - lo)
        # views from lo: indices known non-negative, no wraparound test, loops vectorize
        gk, bk, out = g[lo : lo + n], buf[lo : lo + n], bf[lo : lo + n]
        for j in range(n):
            chunk[j] = np.float32(_momentum(gk, bk, j, h))
        for j in range(n):
            out[j] = np.uint16(bfloat16_bits(chunk_bits[j]) >> np.uint32(16))


@_inline
def _updated(p, o, scale, weight_decay):
    d = o * scale
    if weight_decay != 0:
        d = d + weight_decay * p
    return p - d


@_kernel
def apply_update(p, o, scale, weight_decay, round_o):
    """``p = p - (o * scale + weight_decay * p)`` (the ``sgd`` rule with the scaled ``o`` for its
    gradient, lr 1; the decay term skipped when 0, as there), ``o`` cast to ``p``'s dtype and
    rounded to bfloat16 first when ``round_o`` (the iteration's last product, left unrounded)."""
    if round_o:
        round_matrix(o)
    of = o.reshape(o.size)
    dt = p.dtype.type
    for i in range(p.size):
        p[i] = _updated(p[i], dt(of[i]), scale, weight_decay)


_TILE = 64
"""Rows and columns of a tile of :func:`apply_update_bits` for bits that are not row-major."""


@_kernel
def apply_update_bits(p, bits, scale, weight_decay):
    """:func:`apply_update` with ``o`` given as bfloat16 bits: the (rows, cols) uint16 matrix
    ``bits``, widened to float32 a row chunk at a time as it is applied to the flat ``p`` of that
    shape. Bits that are not row-major (the transposed view of torch's result for a tall matrix)
    go by tiles of ``_TILE`` x ``_TILE``, row chunks of ``_TILE`` within a tile: a tile's columns
    stay in L1 while its rows are read. Row by row over the whole matrix each element read
    touched one cache line, at a stride (2 x rows bytes) that maps the lines onto a few L1 sets
    (3-4x slower for the 512 x 128 matrices of the bench's transformer). Every element is
    computed alone, so the order changes no bit."""
    dt = p.dtype.type
    rows, cols = bits.shape
    step = _BITS_CHUNK if bits.strides[1] == bits.itemsize else _TILE
    chunk_bits = np.empty(step, np.uint32)
    chunk = chunk_bits.view(np.float32)
    for r0 in range(0, rows, step):
        for c0 in range(0, cols, step):
            n = min(step, cols - c0)
            for r in range(r0, min(r0 + step, rows)):
                row, pk = bits[r, c0 : c0 + n], p[r * cols + c0 : r * cols + c0 + n]
                for j in range(n):
                    chunk_bits[j] = np.uint32(row[j]) << np.uint32(16)
                for j in range(n):
                    pk[j] = _updated(pk[j], dt(chunk[j]), scale, weight_decay)


SLOTS = ("momentum_buffer", "exp_avg", "exp_avg_sq")
"""Every state slot Muon may keep, in order (the staging's random-bit words: the same whichever
a unit keeps)."""


def _check_adamw_lr(name, value):
    if value is not None:
        check_nonnegative(name, value)


class Muon(Optimizer):
    r"""Muon, torch.optim.Muon's algorithm: momentum, then the Newton–Schulz orthogonalization of
    each 2-D parameter's update, then a decoupled weight decay and a shape-adjusted step.

    .. math::
        B_t = \mathrm{lerp}(B_{t-1}, g_t, 1-\mu),\quad
        \tilde B_t = \mathrm{lerp}(g_t, B_t, \mu) \text{ if nesterov else } B_t,\quad
        O_t = \mathrm{NS}^{(a,b,c)}_k(\tilde B_t;\varepsilon)

        \theta_t = \theta_{t-1}(1 - \eta\lambda) - \eta\,s(A,B)\,O_t,\quad
        s = \sqrt{\max(1, A/B)} \text{ ("original", the default) or } 0.2\sqrt{\max(A, B)}
        \text{ ("match\_rms\_adamw")}

    Defaults are torch's (lr 1e-3, weight_decay 0.1, momentum 0.95, nesterov, coefficients
    (3.4445, -4.775, 2.0315), eps 1e-7, 5 steps). References: K. Jordan et al., "Muon: An
    optimizer for hidden layers in neural networks" (2024); J. Liu et al., "Muon is Scalable
    for LLM Training" (2025, ``match_rms_adamw``). The iteration is
    :mod:`fastopt.optim.newton_schulz`; ``ns_dtype`` (keyword-only: ``"bfloat16"``, the default,
    as torch, ``"float32"`` or ``"float64"``) is the dtype it runs in; that module says exactly
    what the bfloat16 mode emulates. On a CPU with native bfloat16 matrix instructions
    (AVX512-BF16, AMX) and torch installed, the bfloat16 mode runs torch's own bfloat16 products
    instead (:mod:`fastopt.optim.newton_schulz_torch`): torch's iteration bit for bit, in about
    half the time of the emulation's float32 products there.

    Which parameters Muon updates (``muon_params``, keyword-only, per group): ``None`` (the
    default, torch's behaviour) all of them, and every one must be 2-D: anything else is a
    ValueError naming it, raised at construction; ``"hidden"`` the usual recipe
    (:func:`hidden_matrices`: the 2-D parameters but the first, the last and embeddings); a
    collection of names (ParamSet names, dict keys, list indices) or a callable
    ``(name, shape) -> bool``. The others fall back to AdamW (torch.optim.AdamW's update) with
    ``adamw_lr`` (None: the group's lr, schedules included), ``adamw_betas``, ``adamw_eps`` and
    ``adamw_weight_decay`` (default 0: biases and norms are usually not decayed).
    :func:`fastopt.muon_param_groups` builds the recipe over a ParamSet: one optimizer, one
    ParamSet, ``step()`` on its gradient buffer.

    Work per step and unit (a ParamSet or one array), per Muon matrix while it stays in cache:
    one compiled pass for the momentum (torch's ``buf.lerp_(grad, 1 - momentum)``, gradient
    scaling and clipping fused in) and the Nesterov blend (``grad.lerp(buf, momentum)``) into
    the iteration's scratch, cast (and rounded to bfloat16) there; the iteration (BLAS,
    scratch allocated once per shape); one compiled pass ``θ ← θ - (s O + ηλθ)`` (the ``sgd``
    rule's arithmetic, weight decay ηλ, O rounded as it is read). Per run of adjacent
    fallback parameters their momentum (``ema``, as before: no update reads it) and one AdamW
    kernel (the ``adam`` rule). Gradient scaling, clipping and
    ``skip_nonfinite`` apply as for every optimizer; a NaN gradient propagates into the
    parameters, as in torch.

    Where it runs (float32 and float64 parameters; bfloat16 and float16 ones, other gradient
    and ``state_dtype`` dtypes and master weights through float32 copies,
    :mod:`fastopt.optim.staging`; not ``state_dtype="int8"``): the numba-cpu
    backend as above; the ``cupy`` backend with the same three steps per matrix as CuPy ufuncs
    and ``cupy.matmul`` (cuBLAS) into device scratch (:mod:`fastopt.optim.newton_schulz_device`:
    the same arithmetic, the products' rounding cuBLAS's), the fallback through the backend's
    kernels; the ``numba-cuda`` backend the same way through zero-copy CuPy views of its arrays
    when CuPy is installed (refused by name at ``step()`` otherwise). Every launch goes on the
    arrays' current stream (or ``stream=``; numba-cuda arrays without one: the null stream), with
    no host synchronisation (but CuPy's, once, on the stream a numba array names when it first
    views it). The NumPy reference backend is refused by name at ``step()``.
    """

    algorithm = "muon"
    elementwise = False  # a matrix's update depends on all of it: ZeRO-1 shards whole tensors
    matrices_only = True
    """Takes 2-D parameters only (without a fallback): the registry-wide checks that run every
    optimizer on vectors leave it out; it has its own tests and benchmark."""

    hyperparameter_table = (
        lr_row(1e-3),
        weight_decay(0.1),
        nonnegative("momentum", 0.95),
        flag("nesterov", True),
        Hyper("ns_coefficients", DEFAULT_NS_COEFFICIENTS, _check_coefficients),
        nonnegative("eps", 1e-7),
        Hyper("ns_steps", 5, _check_ns_steps),
        Hyper("adjust_lr_fn", None, _check_adjust_lr_fn),
        Hyper("ns_dtype", "bfloat16", _check_ns_dtype, keyword_only=True),
        Hyper("muon_params", None, _check_muon_params, keyword_only=True),
        Hyper("adamw_lr", None, _check_adamw_lr, keyword_only=True),
        betas((0.9, 0.999))._replace(name="adamw_betas", keyword_only=True),
        nonnegative("adamw_eps", 1e-8, keyword_only=True),
        nonnegative("adamw_weight_decay", 0.0, keyword_only=True),
    )

    # ------------------------------------------------------------------ groups
    def _selection(self, group):
        named = _named_shapes(group["params"])
        return named, muon_selection(group["muon_params"], named)

    def _check_together(self, group):
        named, chosen = self._selection(group)
        for name, shape in named:
            if name in chosen and len(shape) != 2:
                raise ValueError(
                    f"Muon updates 2-D parameters only; parameter {name!r} has shape {shape}: "
                    "leave it to the AdamW fallback (muon_params='hidden', a list of names, or "
                    "fastopt.muon_param_groups)"
                )

    def _rule(self, group):
        return "ema"

    def _state_names(self, group):
        named, chosen = self._selection(group)
        names = ("momentum_buffer",) if chosen else ()
        if len(chosen) < len(named):
            names += ("exp_avg", "exp_avg_sq")
        return names

    def _scratch(self):
        """Scratch kept between steps: NewtonSchulz per (shape, ns_dtype) and the layout per
        unit."""
        return self.__dict__.setdefault("_muon_scratch", {})

    def _layout(self, group, g_int, unit):
        """(Muon matrices [(shape, lo, hi)], AdamW runs [(lo, hi)]) of a unit, adjacent
        fallback parameters merged into one run."""
        scratch = self._scratch()
        # one entry per unit, rebuilt when the selection changes (not with lr or any other
        # setting: keyed on those, a schedule left one entry behind per step)
        chosen_by = group["muon_params"]
        key = tuple(chosen_by) if isinstance(chosen_by, list) else chosen_by
        kept = scratch.get(("layout", id(unit)))
        if kept is not None and kept[0] == key:
            return kept[1]
        source = g_int["source"]
        _, chosen = self._selection(group)
        if isinstance(source, ParamSet):
            offs, shapes = source.offsets, source.shapes
            parts = [(n in chosen, shapes[n], *offs[n]) for n in source.names]
        else:
            j = next(i for i, u in enumerate(g_int["units"]) if u is unit)
            name = g_int["keys"][j] if g_int["keys"] is not None else j
            parts = [(name in chosen, tuple(unit.shape), 0, int(unit.param.size))]
        runs = []
        for is_muon, _, lo, hi in parts:
            if is_muon:
                continue
            if runs and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi)
            else:
                runs.append((lo, hi))
        # an empty matrix (a zero dimension) has nothing to update (and no aspect ratio)
        matrices = [(shape, lo, hi) for is_muon, shape, lo, hi in parts if is_muon and hi > lo]
        layout = (matrices, runs)
        scratch[("layout", id(unit))] = (key, layout)
        return layout

    @classmethod
    def trainer_param_groups(cls, params, weight_decay):
        """The groups :class:`fastopt.Trainer` builds this class over for a model's ParamSet:
        :func:`muon_param_groups` (the hidden weights get Muon, the rest AdamW), with the
        Trainer's ``weight_decay`` on the Muon matrices when it is not 0 (else the default)."""
        return muon_param_groups(params, **({"weight_decay": weight_decay} if weight_decay else {}))

    # ------------------------------------------------------------------ step
    def step(self, grads=None, *, grad_scale=None):
        """One update of every parameter whose gradient is given (see ``Optimizer.step``): the
        checks, gradient scaling, clipping and non-finite skipping as there, everything checked
        before the first write."""
        plan = self._plan(grads)
        storages = {}
        for _, _, _, work in plan:
            for unit, grad in work:
                storages[id(unit)] = self._check_unit(unit, grad)
        stream_of = self.step_streams()
        scales = self._grad_scales(plan, grad_scale, stream_of)
        if scales is None:
            return
        for group, g_int, lr, work in plan:
            for unit, grad in work:
                stream = stream_of(unit)
                if not unit.state:
                    self._allocate(group, unit, g_int["state_names"], lr, stream)
                step = unit.state["step"] + 1
                matrices, adam_runs = self._layout(group, g_int, unit)
                storage, real = storages[id(unit)], unit
                if staging.needs_stage(storage):  # 16-bit storage: float32 copies around
                    unit, grad = staging.staging_of(self).load(
                        real, grad, g_int["state_names"], stream
                    )
                if matrices:
                    self._muon_step(group, unit, grad, lr, scales, matrices, adam_runs, stream)
                if adam_runs:
                    self._adamw_step(group, unit, grad, lr, step, scales, adam_runs, stream)
                if unit is not real:
                    rs = staging.random_counter(self, real, storage, step)
                    staging.staging_of(self).store(real, unit, SLOTS, rs, stream)
                real.state["step"] = step
        self._count_step(plan)

    def _check_unit(self, unit, grad):
        name = unit.backend.name
        if name not in ("numba-cpu", "cupy", "numba-cuda"):
            raise RuntimeError(
                f"Muon runs on the numba-cpu backend (NumPy BLAS products) and on the GPU "
                f"backends cupy and numba-cuda (cuBLAS products through CuPy); {unit.label} is "
                f"on {name!r}"
            )
        self._device_module(unit)  # numba-cuda without CuPy: refused here, before any write
        storage = precision.storage_of(self.precision, unit.param, grad)
        precision.check_backend_stores(unit.backend, storage, unit.label)
        return storage

    def _ns_for(self, shape, ns_dtype):
        """The host iteration for ``shape``: torch's bfloat16 products where the CPU has native
        ones (:mod:`fastopt.optim.newton_schulz_torch`), else NumPy's BLAS."""
        scratch = self._scratch()
        key = (shape, ns_dtype)
        ns = scratch.get(key)
        if ns is None:
            if ns_dtype == "bfloat16" and native_bfloat16_products():
                ns = TorchNewtonSchulz(shape)
            else:
                ns = NewtonSchulz(shape, ns_dtype)
            scratch[key] = ns
        return ns

    def _device_module(self, unit):
        """The array module that runs ``unit``'s matrices: None on numba-cpu (the compiled
        passes and NumPy's BLAS), CuPy on the cupy and numba-cuda backends (RuntimeError naming
        the reason when CuPy is not installed)."""
        name = unit.backend.name
        if name == "numba-cpu":
            return None
        return arrays.import_cupy(
            f"Muon on {unit.label} ({name} backend: the Newton–Schulz products run through "
            "cuBLAS, via CuPy views of the arrays)"
        )

    def _device_ns_for(self, xp, like, shape, ns_dtype):
        """DeviceNewtonSchulz per (array module, device, shape, ns_dtype, parameter dtype),
        allocated on the current device (inside :func:`launch_context`)."""
        scratch = self._scratch()
        device = None if xp is np else int(like.data.device_id)
        key = ("device", xp.__name__, device, shape, ns_dtype, np.dtype(like.dtype))
        ns = scratch.get(key)
        if ns is None:
            ns = scratch[key] = DeviceNewtonSchulz(xp, shape, ns_dtype, like.dtype)
        return ns

    def _muon_step(self, group, unit, grad, lr, scales, matrices, runs, stream=None):
        st, p = unit.scalar_type, unit.param
        mu = group["momentum"]
        buf = unit.state["momentum_buffer"]
        gs = (st(scales[0]), st(scales[1]))
        for lo, hi in runs:  # the fallback tensors' momentum, as over the whole unit before
            unit.backend.update(
                "ema", buf[lo:hi], grad[lo:hi], [], (st(1.0 - mu), st(mu)), gs, None, stream
            )
        nesterov = (1 if mu < 0.5 else 2) if group["nesterov"] else 0
        h = (*gs, st(1.0 - mu), st(mu), nesterov)
        wd = st(lr * group["weight_decay"])
        coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]
        ns_dtype, adjust = group["ns_dtype"], group["adjust_lr_fn"]
        xp = self._device_module(unit)
        if xp is not None:
            self._device_matrices(xp, unit, grad, stream, matrices, h, wd, group, lr)
            return
        for shape, lo, hi in matrices:
            ns = self._ns_for(shape, ns_dtype)
            scale = st(adjusted_lr(lr, adjust, shape))
            if isinstance(ns, TorchNewtonSchulz):  # bfloat16 in and out, no float32 copies
                momentum_into_bits(grad[lo:hi], buf[lo:hi], ns.input_bits, h)
                apply_update_bits(p[lo:hi], ns.run_loaded(coefficients, steps, eps), scale, wd)
                continue
            bf16 = ns.emulate_bf16
            momentum_into(grad[lo:hi], buf[lo:hi], ns.x, h, bf16)
            o = ns.run(ns.x, coefficients, steps, eps, round_output=False)
            apply_update(p[lo:hi], o, scale, wd, bf16)

    def _views(self, xp, unit, grad):
        """``xp`` views of the unit's parameter, gradient and momentum (zero-copy
        ``xp.asarray``: the arrays themselves for CuPy units, CuPy views of numba-cuda ones).
        The views of the arrays a unit keeps (its parameter, momentum and ParamSet gradient
        buffer) are made once: CuPy synchronises the stream a numba array names when it views
        it."""
        kept = self._scratch().setdefault(("views", id(unit)), {})
        index = None if unit.device is None else arrays.parse_device(unit.device)
        buf = unit.state["momentum_buffer"]
        out = []
        with arrays.on_device(xp, None if index is None or index < 0 else index):
            for role, a in (("param", unit.param), ("grad", grad), ("momentum", buf)):
                keep = role != "grad" or grad is unit.default_grad
                hit = kept.get(role) if keep else None
                if hit is None or hit[0] is not a:
                    hit = (a, xp.asarray(a))
                    if keep:
                        kept[role] = hit
                out.append(hit[1])
        return out

    def _device_matrices(self, xp, unit, grad, stream, matrices, h, wd, group, lr):
        """The Muon matrices of a GPU unit: :meth:`_views` of its arrays, then the three steps
        per matrix on ``stream`` (numba-cuda's default, the null stream, for arrays that name
        none)."""
        st = unit.scalar_type
        p, g, buf = self._views(xp, unit, grad)
        if stream is None and unit.backend.name == "numba-cuda":
            stream = 0
        coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]
        with launch_context(xp, p, stream):
            for shape, lo, hi in matrices:
                ns = self._device_ns_for(xp, p, shape, group["ns_dtype"])
                ns.momentum_into(g[lo:hi], buf[lo:hi], h)
                o = ns.run(coefficients, steps, eps)
                ns.apply_update(p[lo:hi], o, st(adjusted_lr(lr, group["adjust_lr_fn"], shape)), wd)

    def _adamw_step(self, group, unit, grad, lr, step, scales, runs, stream=None):
        st = unit.scalar_type
        if group["adamw_lr"] is not None:
            lr = float(group["adamw_lr"])
        beta1, beta2 = group["adamw_betas"]
        values = dict(
            decay=1.0 - lr * group["adamw_weight_decay"],
            weight_decay=0.0,
            gsign=1.0,
            beta1=beta1,
            one_minus_beta1=1.0 - beta1,
            beta2=beta2,
            one_minus_beta2=1.0 - beta2,
            step_size=lr / (1.0 - beta1**step),
            bias_correction2_sqrt=math.sqrt(1.0 - beta2**step),
            eps=group["adamw_eps"],
        )
        h = scalar_tuple(self, "adam", values, st)
        gs = (st(scales[0]), st(scales[1]))
        m, v = unit.state["exp_avg"], unit.state["exp_avg_sq"]
        for lo, hi in runs:
            unit.backend.update(
                "adam", unit.param[lo:hi], grad[lo:hi], [m[lo:hi], v[lo:hi]], h, gs, None, stream
            )


def muon_param_groups(params, **settings):
    """The usual Muon recipe over ``params`` (a ParamSet, or a dict/list of arrays) as the
    param groups of ONE :class:`Muon`: ``[{"params": params, "muon_params": <names>,
    **settings}]``, where the names are :func:`hidden_matrices` (the hidden 2-D weights) and
    every other parameter (embeddings, the input and output layers, biases, norms) falls back
    to AdamW. ``settings`` are group hyperparameters, e.g. ``adamw_lr=3e-4``.
    ``fastopt.Muon(fastopt.muon_param_groups(ps), lr=0.02)`` then steps with ``step()``."""
    return [{"params": params, "muon_params": hidden_matrices(_named_shapes(params)), **settings}]
