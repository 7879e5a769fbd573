"""Storage precision of an optimizer: the dtype of its state, float32 master weights, rounding.

Every optimizer takes these options (``Optimizer(..., state_dtype=, master_weights=,
stochastic_rounding=, seed=)``):

- ``state_dtype``: the dtype the state arrays are stored in. ``None`` (default): the parameter's
  dtype, as torch.optim keeps bfloat16 state for bfloat16 parameters, or float32 when the
  parameter has a float32 master copy; else ``"float32"``, ``"float64"``, ``"bfloat16"`` or
  ``"float16"`` (names, NumPy dtypes or ``ml_dtypes.bfloat16``).
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

Precision = namedtuple("Precision", "state_dtype master_weights stochastic_rounding seed")

_FLOAT32 = np.dtype(np.float32)


def precision_options(state_dtype=None, master_weights=False, stochastic_rounding=False, seed=0):
    """The checked options (a ``Precision``): ValueError/TypeError naming a bad one."""
    if state_dtype is not None:
        state_dtype = arrays.storage_dtype(state_dtype, "state_dtype")
    check_bool("master_weights", master_weights)
    check_bool("stochastic_rounding", stochastic_rounding)
    seed = check_int("seed", seed, lo=0, hi=2**63 - 1)
    return Precision(state_dtype, master_weights, stochastic_rounding, seed)


def is_16bit(dtype):
    return np.dtype(dtype).itemsize == 2


def has_master(options, param):
    """Whether ``param`` (a unit's flat array) gets a float32 master copy."""
    return options.master_weights and is_16bit(param.dtype)


def state_dtype(options, param):
    """The dtype of the state arrays of ``param``."""
    if options.state_dtype is not None:
        return options.state_dtype
    return _FLOAT32 if has_master(options, param) else np.dtype(param.dtype)


def slot_dtypes(options, param, names):
    """{state key: dtype} of every per-element state array of ``param``: the rule's slots
    ``names`` and the master copy when there is one."""
    sd = state_dtype(options, param)
    out = {n: sd for n in names}
    if has_master(options, param):
        out[MASTER] = _FLOAT32
    return out


def storage_of(options, param, grad):
    """The ``access.Storage`` of one update of ``param`` with gradient ``grad``."""
    return _storage(options, param.dtype, grad.dtype)


@functools.lru_cache(maxsize=256)
def _storage(options, param_dtype, grad_dtype):
    # Cached: it is asked once per unit and step, and depends on nothing but these three.
    param = np.empty(0, param_dtype)
    sd = state_dtype(options, param)
    return Storage(
        arrays.storage_name(param_dtype),
        arrays.storage_name(grad_dtype),
        arrays.storage_name(sd),
        has_master(options, param),
        options.stochastic_rounding and (is_16bit(param_dtype) or is_16bit(sd)),
    )


def check_backend_stores(backend, storage, label):
    """TypeError naming the unit and the backend when ``backend`` cannot run ``storage``."""
    if is_plain(storage):
        return
    names = getattr(backend, "storage_names", ("float32", "float64"))
    missing = [n for n in (storage.param, storage.grad, storage.state) if n not in names]
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
