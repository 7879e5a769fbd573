"""Storage precision of an optimizer: the dtype of its state, float32 master weights, rounding.

Every optimizer takes these options (``Optimizer(..., state_dtype=, master_weights=,
stochastic_rounding=, seed=)``):

- ``state_dtype``: the dtype the state arrays are stored in. ``None`` (default): the parameter's
  dtype, as torch.optim keeps bfloat16 state for bfloat16 parameters, or float32 when the
  parameter has a float32 master copy; else ``"float32"``, ``"float64"``, ``"bfloat16"`` or
  ``"float16"`` (names, NumPy dtypes or ``ml_dtypes.bfloat16``), or ``"int8"``: blockwise 8-bit
  state (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022, as
  bitsandbytes keeps it; ``kernels/block_loops.py``): per slot one uint8 code per element and a
  float32 absmax per block of 256 elements of the unit's flat state, the signed dynamic map for
  first moments and signed state, the unsigned one for second moments and sums
  (``INT8_SIGNED``), about 2.03 bytes per parameter for Adam. Only for the rules whose state are
  running moments or sums (``INT8_RULES``: the Adam family, RMSprop, Adagrad, Adadelta, SGD with
  momentum, Lion, Yogi; and ``STAGED_INT8_RULES``, LAMB, LARS, NovoGrad and Muon, whose slots
  are dequantized around their float32 kernels by ``fastopt/optim/staging.py``), on the numba-cpu, numba-cuda (``kernels/block_cuda.py``) and CuPy
  (``kernels/block_cupy.py``) backends; any other optimizer, or the NumPy reference backend,
  is refused at construction. Units (a ParamSet's buffer, a plain array) below
  ``MIN_8BIT_SIZE`` (4096, bitsandbytes' ``min_8bit_size``) elements keep float32 state.
- ``master_weights``: keep a float32 copy of every bfloat16/float16 parameter in the state
  (``"master_param"``, part of ``state_dict`` and checkpoints); the rule updates the copy and the
  16-bit parameter is written from it each step (rounded). Parameters stored in float32 or float64
  are their own master copy: for them the option does nothing, so a model mixing 16-bit weights and
  float32 norms takes one optimizer.
- ``stochastic_rounding``: round every 16-bit store stochastically instead of to nearest, with
  random bits from Philox4x32-10 of (``seed``, step, element index within the optimizer's
  parameters): reproducible, and identical for any thread count.

The rules compute in float32 for 16-bit storage and in float64 for float64 parameters
(``kernels/access.py``).
"""

import functools
from collections import namedtuple

import numpy as np

from .. import arrays
from ..kernels.access import Storage, is_plain
from ..validation import check_bool, check_int

MASTER = "master_param"
"""State key of the float32 master copy of a 16-bit parameter."""

MIN_8BIT_SIZE = 4096
"""Units with fewer elements keep float32 state under ``state_dtype="int8"``."""

Precision = namedtuple(
    "Precision",
    "state_dtype master_weights stochastic_rounding seed min_8bit_size",
    defaults=(None,),
)
"""The checked options. ``min_8bit_size`` (not a user option; None: ``MIN_8BIT_SIZE``, read
when a unit's state is made): units with fewer elements keep float32 state under
``state_dtype="int8"``. ZeRO-1 sets it to 0 in the
optimizer of a block-aligned shard of a ParamSet that one process would quantize, so the rule
is decided on the whole ParamSet, not on the shard."""

_FLOAT32 = np.dtype(np.float32)

INT8 = "int8"
"""``Precision.state_dtype`` of 8-bit blockwise state (the storage name ``Storage.state`` too)."""

INT8_BACKENDS = ("numba-cpu", "numba-cuda", "cupy")
"""Backends with 8-bit blockwise kernels (``kernels/block_loops.py``, ``block_cuda.py``,
``block_cupy.py``)."""

STAGED_INT8_RULES = frozenset(("lamb", "lars", "novograd", "muon"))
"""Per-tensor and matrix rules (``Optimizer.algorithm``) whose element state are running
moments: 8-bit state allowed, dequantized around their float32 kernels
(``fastopt/optim/staging.py``)."""

INT8_RULES = frozenset(
    (
        "sgd_momentum",
        "adagrad",
        "rmsprop",
        "rmsprop_momentum",
        "rmsprop_centered",
        "rmsprop_centered_momentum",
        "adadelta",
        "adam",
        "adam_amsgrad",
        "adamax",
        "nadam",
        "radam",
        "yogi",
        "lion",
    )
)
"""Rules of ``kernels/rules.py`` whose state are running moments or sums: 8-bit state allowed."""

INT8_SIGNED = {
    "exp_avg": True,  # first moments (Adam family, Lion, Yogi)
    "momentum_buffer": True,
    "grad_avg": True,  # centered RMSprop's mean gradient
    "exp_avg_sq": False,  # second moments and non-negative sums
    "max_exp_avg_sq": False,
    "exp_inf": False,
    "square_avg": False,
    "acc_delta": False,
    "sum": False,
}
"""The map of each state slot of ``INT8_RULES`` (by torch's state name): True for the signed
dynamic map, False for the unsigned one (bitsandbytes: signed for state1, unsigned for
state2)."""

INT8_REFUSED = {
    "sgd": "SGD without momentum keeps no state to quantize",
    "rprop": "its state are the previous gradient, whose sign it tests, and per-element step "
    "sizes, not running moments",
    "asgd": "its state 'ax' is the running average of the parameters themselves, which needs "
    "their precision",
    "sf_sgd": "schedule-free's 'z' is the base sequence of the iterates (parameter values), not "
    "a running moment",
}
INT8_REFUSED["sf_adamw"] = INT8_REFUSED["sf_sgd"]
INT8_REFUSED["adafactor"] = (
    "its factored second moments are already m + n values per m x n matrix, not one per element"
)


QUANT_BLOCK = 256
"""Elements per 8-bit block (one float32 absmax each): ``kernels.storage.QUANT_BLOCK``."""

Int8Slot = namedtuple("Int8Slot", "signed")
"""What :func:`slot_dtypes` gives for an 8-bit slot in place of a dtype: which map it uses."""


def precision_options(state_dtype=None, master_weights=False, stochastic_rounding=False, seed=0):
    """The checked options (a ``Precision``): ValueError/TypeError naming a bad one."""
    if isinstance(state_dtype, str) and state_dtype == INT8:
        state_dtype = INT8
    elif state_dtype is not None:
        try:
            state_dtype = arrays.storage_dtype(state_dtype, "state_dtype")
        except ValueError as exc:
            raise ValueError(f"{exc}; or 'int8' for 8-bit blockwise state") from None
    check_bool("master_weights", master_weights)
    check_bool("stochastic_rounding", stochastic_rounding)
    seed = check_int("seed", seed, lo=0, hi=2**63 - 1)
    return Precision(state_dtype, master_weights, stochastic_rounding, seed)


def is_16bit(dtype):
    return np.dtype(dtype).itemsize == 2


def has_master(options, param):
    """Whether ``param`` (a unit's flat array) gets a float32 master copy."""
    return options.master_weights and is_16bit(param.dtype)


def is_int8(options):
    """Whether the options ask for 8-bit blockwise state."""
    return isinstance(options.state_dtype, str)


def is_quantized(slot_dtype):
    """Whether a value of :func:`slot_dtypes` is an 8-bit slot (an ``Int8Slot``)."""
    return isinstance(slot_dtype, Int8Slot)


def state_dtype(options, param):
    """The dtype of the state arrays of ``param`` (``INT8`` for 8-bit blockwise state)."""
    if is_int8(options):
        limit = MIN_8BIT_SIZE if options.min_8bit_size is None else options.min_8bit_size
        return INT8 if param.size >= limit else _FLOAT32
    if options.state_dtype is not None:
        return options.state_dtype
    return _FLOAT32 if has_master(options, param) else np.dtype(param.dtype)


def slot_dtypes(options, param, names):
    """{state key: dtype} of every per-element state array of ``param``: the rule's slots
    ``names`` (an ``Int8Slot`` each for 8-bit state) and the master copy when there is one."""
    sd = state_dtype(options, param)
    if sd is INT8:
        out = {n: Int8Slot(INT8_SIGNED[n]) for n in names}
    else:
        out = {n: sd for n in names}
    if has_master(options, param):
        out[MASTER] = _FLOAT32
    return out


def storage_of(options, param, grad):
    """The ``access.Storage`` of one update of ``param`` with gradient ``grad``."""
    return _storage(options, param.dtype, grad.dtype, state_dtype(options, param) is INT8)


@functools.lru_cache(maxsize=256)
def _storage(options, param_dtype, grad_dtype, quantized):
    # Cached: it is asked once per unit and step, and depends on nothing but these four.
    param = np.empty(0, param_dtype)
    sd = INT8 if quantized else state_dtype(options, param)  # empty: not quantized
    return Storage(
        arrays.storage_name(param_dtype),
        arrays.storage_name(grad_dtype),
        INT8 if quantized else arrays.storage_name(sd),
        has_master(options, param),
        options.stochastic_rounding and (is_16bit(param_dtype) or is_16bit(sd)),
    )


def check_backend_stores(backend, storage, label):
    """TypeError naming the unit and the backend when ``backend`` cannot run ``storage``."""
    if is_plain(storage):
        return
    if storage.state == INT8 and backend.name not in INT8_BACKENDS:
        raise TypeError(_no_int8(backend, label))
    names = getattr(backend, "storage_names", ("float32", "float64"))
    stored = (storage.param, storage.grad) + (() if storage.state == INT8 else (storage.state,))
    missing = [n for n in stored if n not in names]
    if missing or not getattr(backend, "mixed_storage", False):
        what = ", ".join(sorted(set(missing))) if missing else "mixed storage dtypes"
        raise TypeError(
            f"{label}: backend {backend.name!r} cannot store {what} (parameter {storage.param}, "
            f"gradient {storage.grad}, state {storage.state}"
            f"{', master weights' if storage.master else ''}); it stores "
            f"{', '.join(names)} with one dtype for the parameter, gradient and state"
        )


def check_param_storable(backend, param, label):
    """TypeError naming the parameter and the backend when ``backend`` cannot store ``param``'s
    dtype (a 16-bit parameter on a backend without 16-bit kernels)."""
    name = arrays.storage_name(param.dtype)
    names = getattr(backend, "storage_names", ("float32", "float64"))
    if name not in names:
        raise TypeError(
            f"{label} has dtype {param.dtype}; backend {backend.name!r} stores "
            f"{', '.join(names)} parameters"
        )


def _no_int8(backend, label):
    return (
        f"{label}: backend {backend.name!r} cannot keep 8-bit blockwise state "
        f"(state_dtype='int8'); only {', '.join(INT8_BACKENDS)} can (host arrays run on "
        "backend='numba-cpu', CUDA arrays on backend='cupy' or 'numba-cuda')"
    )


def check_int8_rule(optimizer, group):
    """ValueError naming the optimizer and the reason when it keeps 8-bit state
    (``state_dtype="int8"``) but ``group``'s rule has no running moments or sums."""
    if not is_int8(optimizer.precision):
        return
    rule = optimizer._rule(group)
    if rule not in INT8_RULES and getattr(optimizer, "algorithm", None) not in STAGED_INT8_RULES:
        reason = INT8_REFUSED.get(rule, "its state are not running moments or sums")
        raise ValueError(
            f"{type(optimizer).__name__} (rule {rule!r}) cannot keep state_dtype='int8': "
            f"{reason}; 8-bit blockwise state is for the rules whose state are running moments "
            "or sums (Adam family, RMSprop, Adagrad, Adadelta, SGD with momentum, Lion, Yogi, "
            "LAMB, LARS, NovoGrad, Muon)"
        )


def check_int8_backends(options, units, backend_name):
    """TypeError naming the unit and the backend when 8-bit state is asked for units that a
    backend without 8-bit kernels (the NumPy reference) would step: the named
    backend, or a device unit's."""
    if not is_int8(options):
        return
    from .. import dispatch

    for u in units:
        backend = u.backend
        if backend is None and backend_name is not None:
            backend = dispatch.backend_for_kind(u.kind, backend_name)
        if backend is not None and backend.name not in INT8_BACKENDS:
            raise TypeError(_no_int8(backend, u.label))


class Quantized(namedtuple("Quantized", "codes absmax signed")):
    """One 8-bit state slot: ``codes`` (uint8, one per element), ``absmax`` (float32, one per
    block of ``QUANT_BLOCK`` elements of the flat state, the last block possibly partial) and
    ``signed`` (True: the signed dynamic map, else the unsigned). The kernels read the fields
    (``kernels/block_loops.py``)."""

    __slots__ = ()

    def dequantized(self):
        """The float32 values (a host NumPy array): ``qmap[code] * absmax``."""
        from ..kernels import block_loops

        return block_loops.dequantized(self)

    @property
    def nbytes(self):
        """Bytes of the codes and the block absmax."""
        return int(self.codes.nbytes + self.absmax.nbytes)


def int8_block_count(n):
    """Blocks of an 8-bit slot of ``n`` elements (the last one may be partial)."""
    return -(-int(n) // QUANT_BLOCK)


def int8_zeros(backend, n, slot, fill=0.0, like=None, stream=None):
    """A new 8-bit slot (a :class:`Quantized`) of ``n`` elements on ``backend`` (on ``like``'s
    device when given) (an ``Int8Slot`` says which map), every element ``fill``: absmax |fill|
    and the code of +-1 (exact for fill >= 0, the initial values rules have: both maps end in
    1.0), or all zero. On a GPU the fills go to ``stream`` (a handle; None the backend's
    default): a step passes its own, so the kernels that read the slot are ordered after."""
    from ..kernels import block_loops

    codes = backend.zeros(n, np.uint8, like=like, stream=stream)
    absmax = backend.zeros(int8_block_count(n), np.float32, like=like, stream=stream)
    fill = np.float32(fill)
    if fill != 0:  # through the backend: device arrays have no fill()
        backend.fill(absmax, abs(fill), stream)
        backend.fill(codes, block_loops.code_of(fill / abs(fill), slot.signed), stream)
    return Quantized(codes, absmax, slot.signed)


def int8_from_values(values, signed):
    """A new host 8-bit slot (a :class:`Quantized`) holding float32 ``values`` (1-D), as the
    kernels quantize a block after a step: absmax the largest magnitude of the block's values
    (NaN if it holds one), each code the nearest entry of ``values / absmax`` in the map with
    bitsandbytes' tie rule (``storage.quantize``: a tie goes to the even code), the sign of a
    negative value kept in the signed map (``block_loops.code_of``), an all-zero block the code
    of zero. Used to load a float state (e.g. torch.optim's) into 8-bit state."""
    from ..kernels import block_loops

    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n = v.size
    blocks = int8_block_count(n)
    padded = np.zeros(blocks * QUANT_BLOCK, np.float32)
    padded[:n] = np.abs(v)
    absmax = padded.reshape(blocks, QUANT_BLOCK).max(axis=1)
    scale = np.repeat(np.where(absmax > 0, absmax, np.float32(1.0)), QUANT_BLOCK)[:n]
    xn = (v / scale).astype(np.float32)
    q = block_loops.qmap(signed)
    r = np.searchsorted(q[:255], xn, side="left")  # entries of q[0:255] below xn
    below, above = q[np.maximum(r - 1, 0)], q[np.minimum(r, 255)]
    mid = ((below + above) * np.float32(0.5)).astype(np.float32)
    codes = np.where(xn > mid, r, np.where(xn < mid, r - 1, r - (r & 1)))
    codes = np.where((r == 0) | np.isnan(xn), 0, codes)
    if signed:
        codes = np.where((codes == 127) & np.signbit(xn), 126, codes)
    return Quantized(codes.astype(np.uint8), absmax.astype(np.float32), bool(signed))
