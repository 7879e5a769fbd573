"""Element access of the storage loops: load an element into the compute dtype, store it rounded.

A *storage combination* (:class:`Storage`) names the storage dtype of the parameter, the gradient
and the optimizer state, whether a float32 master copy of the parameter is kept and whether 16-bit
stores round stochastically. The rules compute in float64 when the parameter is stored in float64,
else in float32 (``compute_name``). :func:`bind` returns the globals the storage loops of
``kernels/loops.py`` call (``load_param``, ``store_param``, ``load_grad``, ``load_state``,
``store_state``, ``draw``) for one combination, compiled with the target's decorator from the
plain functions below and the conversion helpers of ``kernels/storage.py``. 16-bit arrays reach
the loops as ``uint16`` views of their bits.

Rounding on store: to nearest, ties to even (``f32_to_bf16_rne`` / ``f32_to_f16_rne``, and the
plain float64 -> float32 cast), or for 16-bit stores with ``stochastic`` stochastically with one
32-bit word of ``random_bits4(seed, step, index)`` per stored array (parameter, then the state
slots), ``index`` the element's index in the whole parameter set, so the bits do not depend on the
thread count or the launch. A value computed in float64 and stored in 16 bits is rounded to
float32 first (to nearest), then to 16 bits.

The float16 helpers are integer bit operations on every target but the CPU with F16C, where
``storage.compile_storage`` compiles them as the hardware conversions (same bits, NaN included).
"""

import types
from collections import namedtuple

import numpy as np

Storage = namedtuple("Storage", "param grad state master stochastic")
"""One storage combination: the dtype names (``"float32"``, ``"float64"``, ``"bfloat16"``,
``"float16"``; the state also ``"int8"``: 8-bit blockwise, run by ``kernels/block_loops.py``) of the
parameter, gradient and state arrays, and two flags: a float32 master copy of
the parameter, stochastic rounding of 16-bit stores."""

SHORT = {"float32": "f32", "float64": "f64", "bfloat16": "bf16", "float16": "f16", "int8": "q8"}


def storage_name(dtype):
    """The storage name of a NumPy dtype (``"float32"``, ``"float64"``, ``"bfloat16"``,
    ``"float16"``); ValueError for any other."""
    name = np.dtype(dtype).name
    if name not in _LOAD_NAMES:
        raise ValueError(f"no storage dtype {name}")
    return name


_LOAD_NAMES = ("float32", "float64", "bfloat16", "float16")


def compute_name(storage):
    """The dtype name the rule computes in: float64 for float64 parameters, else float32."""
    return "float64" if storage.param == "float64" and not storage.master else "float32"


def is_plain(storage):
    """True when every array is stored in the compute dtype, without master copy or stochastic
    rounding: the loops of ``loops.TEMPLATES`` (the float32 and float64 kernels) do it."""
    c = compute_name(storage)
    return storage.param == storage.grad == storage.state == c and not storage.master


def variant_name(storage):
    """A short identifier of a combination, part of its kernel's name (``_p_bf16_g_f32_...``)."""
    name = f"_p_{SHORT[storage.param]}_g_{SHORT[storage.grad]}_s_{SHORT[storage.state]}"
    return name + ("_master" if storage.master else "") + ("_sr" if storage.stochastic else "")


# ---------------------------------------------------------------------------------------------
# Plain functions; bind() compiles copies whose globals name the helpers of one combination.


def load_native(a, i):
    return a[i]


def load_bf16(a, i):
    return bf16_to_f32(a[i])  # noqa: F821


def load_f16(a, i):
    return f16_to_f32(a[i])  # noqa: F821


def store_native(a, i, x, r):
    a[i] = x


def store_bf16_rne(a, i, x, r):
    a[i] = f32_to_bf16_rne(np.float32(x))  # noqa: F821


def store_bf16_sr(a, i, x, r):
    a[i] = f32_to_bf16_sr(np.float32(x), r)  # noqa: F821


def store_f16_rne(a, i, x, r):
    a[i] = f32_to_f16_rne(np.float32(x))  # noqa: F821


def store_f16_sr(a, i, x, r):
    a[i] = f32_to_f16_sr(np.float32(x), r)  # noqa: F821


def as_float32(x):
    return np.float32(x)


def as_float64(x):
    return np.float64(x)


def param_load(p, w, i):
    return to_compute(load_p(p, i))  # noqa: F821


def param_store(p, w, i, x, r):
    store_p(p, i, x, r)  # noqa: F821


def master_load(p, w, i):
    return w[i]


def master_store(p, w, i, x, r):
    w[i] = x
    store_p(p, i, x, r)  # noqa: F821


def grad_load(g, i):
    return to_compute(load_g(g, i))  # noqa: F821


def state_load(s, i):
    return to_compute(load_s(s, i))  # noqa: F821


def state_store(s, i, x, r):
    store_s(s, i, x, r)  # noqa: F821


def no_bits(rs, i):
    return 0, 0, 0, 0


def element_bits(rs, i):
    return random_bits4(rs[0], rs[1], rs[2] + i)  # noqa: F821


_LOAD = {"float32": load_native, "float64": load_native, "bfloat16": load_bf16, "float16": load_f16}


def _store(name, stochastic):
    if name == "bfloat16":
        return store_bf16_sr if stochastic else store_bf16_rne
    if name == "float16":
        return store_f16_sr if stochastic else store_f16_rne
    return store_native


def bind(storage, compiled_storage, decorate):
    """The globals of a storage loop for ``storage``: {name: compiled function}, compiled with
    ``decorate`` (the element helpers) over ``compiled_storage`` (``storage.compile_storage``)."""
    namespace = dict(compiled_storage, np=np)
    sources = {
        "to_compute": as_float64 if compute_name(storage) == "float64" else as_float32,
        "load_p": _LOAD[storage.param],
        "store_p": _store(storage.param, storage.stochastic),
        "load_g": _LOAD[storage.grad],
        "load_s": _LOAD.get(storage.state, load_native),  # int8: block_loops dequantizes
        "store_s": _store(storage.state, storage.stochastic),
        "load_param": master_load if storage.master else param_load,
        "store_param": master_store if storage.master else param_store,
        "load_grad": grad_load,
        "load_state": state_load,
        "store_state": state_store,
        "draw": element_bits if storage.stochastic else no_bits,
    }
    for name, fn in sources.items():
        copy = types.FunctionType(fn.__code__, namespace, name, fn.__defaults__)
        copy.__qualname__ = name
        namespace[name] = decorate(copy)
    keys = ("load_param", "store_param", "load_grad", "load_state", "store_state", "draw")
    return {k: namespace[k] for k in keys}


Conversion = namedtuple("Conversion", "dst src stochastic rs word")
"""A checked conversion (:func:`conversion`): storage names, stochastic rounding, the counter
``(seed, step, index0)`` as ints and the random-bit word."""


def conversion(dst, src, dst_size, src_size, rs=None, word=0):
    """The :class:`Conversion` of ``dst[...] = src`` (dtypes and sizes given: host or device
    arrays alike), for every target's ``convert``; ValueError for unequal sizes or a word
    outside 0-3. Stochastic only with a counter ``rs`` and a 16-bit destination."""
    if dst_size != src_size:
        raise ValueError(f"convert: {dst_size} and {src_size} elements")
    if int(word) not in range(4):
        raise ValueError(f"convert: word must be 0, 1, 2 or 3 (one of random_bits4's), got {word}")
    stochastic = rs is not None and np.dtype(dst).itemsize == 2
    rs = (0, 0, 0) if rs is None else tuple(int(v) for v in rs)
    return Conversion(storage_name(dst), storage_name(src), stochastic, rs, int(word))


def bind_convert(dst, src, stochastic, compiled_storage, decorate):
    """The globals of ``loops.convert_loop`` from storage ``src`` to storage ``dst`` (dtype
    names), rounding stochastically when ``stochastic`` (and ``dst`` is 16-bit): ``load_src``
    (to float32, or float64 for a float64 source), ``store_dst`` and ``draw``."""
    namespace = dict(compiled_storage, np=np)
    sources = {
        "load_src": _LOAD[src],
        "store_dst": _store(dst, stochastic),
        "draw": element_bits if stochastic else no_bits,
    }
    for name, fn in sources.items():
        copy = types.FunctionType(fn.__code__, namespace, name, fn.__defaults__)
        copy.__qualname__ = name
        namespace[name] = decorate(copy)
    return {k: namespace[k] for k in sources}
