"""CuPy block kernels: 8-bit blockwise optimizer state (``state_dtype="int8"``) on the CuPy backend.

The block loops of ``kernels/block_loops.py`` in CUDA C (``block_kernels.cu``, the quantizer of
``quantizer.cuh``, the rules of ``rules.cuh`` through the storage element of
``optim_kernels.cu``), compiled by NVRTC through ``cupy.RawModule`` and launched with the
contract of ``kernels/block_cuda.py``'s ``apply``: same state (``precision.Quantized`` slots of
``uint8`` codes and float32 block absmax), same launch shape (one CUDA block of ``QUANT_BLOCK``
threads per quantization block, block-stride beyond ``BLOCKS_PER_SM`` blocks per multiprocessor).

Numerics: the dequantize product, the quantizer (integer arithmetic, a float64 reciprocal and
product rounded once to float32) and the rules (each operation explicitly rounded, never fused
or flushed, as in every CuPy kernel) are the numba-cpu block loops' arithmetic: CuPy gives
``block_loops.py``'s bits (tests/test_int8_cupy.py, through a host build of the same code).

One module per (rule, storage combination), compiled on first use (CuPy caches the binary on
disk): ``block_kernels.cu`` with its headers inlined and one ``FO_BLOCK_KERNEL`` line naming
the instantiation (:func:`kernel_name`). The maps and quantizer tables go to each device once.

The standalone passes :func:`dequantize_into` and :func:`quantize_from` (for the kernels that
run on float32 copies of 8-bit state, ``fastopt/optim/staging.py``) are the kernels
``fo_block_dequantize`` and ``fo_block_quantize`` of one more module (:func:`pass_source`),
launched as the block kernels: the block kernels' dequantization and requantization steps,
the bits of ``block_loops.dequantize_into`` / ``quantize_from``.
"""

import threading

import numpy as np

from . import access, block_loops
from . import cupy as kcupy
from .layout import ARITY
from .storage import QUANT_BLOCK

KERNEL_SOURCE = "block_kernels.cu"
COMPILE_OPTIONS = kcupy.COMPILE_OPTIONS
SLOTS_MAX = 3
"""The most state slots a rule has (the kernels take three, unused ones null)."""

_ELEMENT = {
    "float32": ("float", "f32"),
    "float64": ("double", "f64"),
    "bfloat16": ("fo::bf16_bits", "bf16"),
    "float16": ("fo::f16_bits", "f16"),
}

_lock = threading.Lock()
_modules = {}  # (rule, storage) -> kcupy.RawModuleCache
_tables = {}  # (signed, device) -> (map, quantizer table) as cupy arrays


def kernel_name(rule_name, storage):
    """``fo_block_<rule>_<param>_<grad>_<compute>[_master][_sr]`` (an ``access.Storage`` with
    ``state == "int8"``)."""
    short = [_ELEMENT[n][1] for n in (storage.param, storage.grad, access.compute_name(storage))]
    flags = ("_master" if storage.master else "") + ("_sr" if storage.stochastic else "")
    return f"fo_block_{rule_name}_{'_'.join(short)}{flags}"


def instantiation(rule_name, storage):
    """The ``FO_BLOCK_KERNEL(...)`` line of one kernel."""
    if rule_name not in ARITY or ARITY[rule_name] == 0:
        raise KeyError(f"no 8-bit block kernel for rule {rule_name!r}")
    c = _ELEMENT[access.compute_name(storage)][0]
    p, g = (_ELEMENT[n][0] for n in (storage.param, storage.grad))
    flags = f"{str(storage.master).lower()}, {str(storage.stochastic).lower()}"
    return f"FO_BLOCK_KERNEL({kernel_name(rule_name, storage)}, fo::op_{rule_name}, {c}, {p}, {g}, {flags})"


def source(kernels):
    """The CUDA source handed to NVRTC: ``block_kernels.cu`` with its headers inlined (a stale
    ``rules_layout.cuh`` is refused) and the kernels of ``kernels``, (rule, storage) pairs."""
    lines = [kcupy._inline(KERNEL_SOURCE)]
    lines += [instantiation(r, s) for r, s in kernels]
    return "\n".join(lines) + "\n"


def _module(rule_name, storage):
    key = (rule_name, storage)
    m = _modules.get(key)
    if m is None:
        instantiation(rule_name, storage)  # KeyError before anything is cached
        with _lock:
            m = _modules.get(key)
            if m is None:
                m = _modules[key] = kcupy.RawModuleCache(
                    lambda: source([(rule_name, storage)]), COMPILE_OPTIONS
                )
    return m


def tables(signed, device, stream=None):
    """(map, quantizer table) of a slot as cupy arrays on ``device``, copied there once:
    ``block_loops.tables``, on ``stream`` (the first launch's, which is ordered after the
    copy; None: CuPy's current stream)."""
    key = (bool(signed), device)
    t = _tables.get(key)
    if t is None:
        from . import vector_cupy

        host = block_loops.tables(signed)
        t = tuple(vector_cupy.to_device(np.array(a), device, stream) for a in host)
        _tables[key] = t
    return t


def check(rule_name, storage, p, g, states, master):
    """TypeError/ValueError naming the problem unless the arrays fit the block kernel of
    ``rule_name`` for ``storage`` (checked before any launch): flat contiguous cupy arrays on
    one device, ``states`` the rule's 8-bit slots of ``p``'s size, ``master`` a float32 copy
    exactly when ``storage.master``."""
    import cupy

    if rule_name not in ARITY:
        raise KeyError(f"unknown rule {rule_name!r}")
    if storage.state != "int8":
        raise ValueError(f"the block kernels keep int8 state, not {storage.state}")
    n = p.size if isinstance(p, cupy.ndarray) else 0
    blocks = -(-n // QUANT_BLOCK)
    arrays = [("the parameter", p, (storage.param,), n), ("the gradient", g, (storage.grad,), n)]
    if storage.master:
        arrays.append(("the master copy", master, ("float32",), n))
    elif master is not None:
        raise ValueError("a master copy was given for a storage without master weights")
    arity = ARITY[rule_name]
    if len(states) != arity:
        raise ValueError(f"{rule_name} takes {arity} state slots, got {len(states)}")
    for k, s in enumerate(states):
        codes, absmax = getattr(s, "codes", None), getattr(s, "absmax", None)
        if codes is None or absmax is None or not hasattr(s, "signed"):
            raise TypeError(
                f"state slot {k} of {rule_name} must be an 8-bit slot (codes, absmax, signed), "
                f"got {type(s).__name__}"
            )
        arrays.append((f"the codes of state slot {k}", codes, ("uint8",), n))
        arrays.append((f"the absmax of state slot {k}", absmax, ("float32",), blocks))
    kcupy.check_device_arrays("block", arrays)


def apply(rule_name, storage, p, g, states, master, h, gs, rs, stream=None):
    """``kcupy.apply_storage`` for 8-bit state: ``states`` are the rule's 8-bit slots
    (``precision.Quantized`` of cupy arrays) in its slot order; ``master`` the float32 master
    copy or None; ``h`` and ``gs`` cast to the compute dtype; ``rs`` = (seed, step, index of
    ``p[0]`` among the optimizer's parameters). One launch, asynchronous on ``stream`` (None:
    CuPy's current stream) and ``p``'s device; the arguments checked (:func:`check`) before."""
    import cupy

    check(rule_name, storage, p, g, states, master)
    n = p.size
    if n == 0:
        return
    compute = np.dtype(access.compute_name(storage))
    device = p.data.device_id
    null = np.uint64(0)
    slots = []
    for s in states:
        slots += [s.codes, s.absmax, *tables(s.signed, device, stream)]
    slots += [null] * (4 * (SLOTS_MAX - len(states)))
    module = _module(rule_name, storage)
    stream = kcupy.as_stream(stream, device)
    with cupy.cuda.Device(device):
        k = module.function(cupy, device, kernel_name(rule_name, storage))
        nblocks = -(-n // QUANT_BLOCK)
        grid = max(1, min(nblocks, kcupy.BLOCKS_PER_SM * kcupy._sm_count(device)))
        w = null if master is None else master
        args = (kcupy._bits(p), w, kcupy._bits(g), *slots, np.int64(n))
        args += (kcupy._scalars(h, compute), compute.type(gs[0]), compute.type(gs[1]))
        args += tuple(np.uint64(int(v) % 2**64) for v in rs)
        if stream is None:
            k((grid,), (QUANT_BLOCK,), args)
        else:
            with stream:  # RawKernel launches go to the current stream
                k((grid,), (QUANT_BLOCK,), args)


# ---------------------------------------------------------------------------------------------
# Standalone passes over one slot.

PASS_KERNELS = ("fo_block_dequantize", "fo_block_quantize")
"""The kernels of :func:`pass_source` (``FO_BLOCK_PASSES`` in ``block_kernels.cu``)."""


def pass_source():
    """The CUDA source of the passes' module: ``block_kernels.cu`` with its headers inlined and
    the ``FO_BLOCK_PASSES`` line."""
    return kcupy._inline(KERNEL_SOURCE) + "\nFO_BLOCK_PASSES\n"


def _pass_module():
    m = _modules.get("passes")
    if m is None:
        with _lock:
            m = _modules.get("passes")
            if m is None:
                m = _modules["passes"] = kcupy.RawModuleCache(pass_source, COMPILE_OPTIONS)
    return m


def check_pass(what, slot, array, name):
    """TypeError/ValueError naming the problem unless ``slot`` is an 8-bit slot (codes, absmax,
    signed) of flat contiguous cupy arrays and ``array`` a float32 one of its size on its
    device (checked before any launch); the slot's size."""
    import cupy

    codes, absmax = getattr(slot, "codes", None), getattr(slot, "absmax", None)
    if codes is None or absmax is None or not hasattr(slot, "signed"):
        raise TypeError(
            f"{what}: the slot must be an 8-bit slot (codes, absmax, signed), got "
            f"{type(slot).__name__}"
        )
    n = codes.size if isinstance(codes, cupy.ndarray) else 0
    kcupy.check_device_arrays(
        what,
        [
            ("the codes", codes, ("uint8",), n),
            ("the absmax", absmax, ("float32",), -(-n // QUANT_BLOCK)),
            (name, array, ("float32",), n),
        ],
    )
    return n


def _launch_pass(name, n, device, args, stream):
    import cupy

    module = _pass_module()
    stream = kcupy.as_stream(stream, device)
    with cupy.cuda.Device(device):
        k = module.function(cupy, device, name)
        nblocks = -(-n // QUANT_BLOCK)
        grid = max(1, min(nblocks, kcupy.BLOCKS_PER_SM * kcupy._sm_count(device)))
        args = (*args, np.int64(n))
        if stream is None:
            k((grid,), (QUANT_BLOCK,), args)
        else:
            with stream:  # RawKernel launches go to the current stream
                k((grid,), (QUANT_BLOCK,), args)


def dequantize_into(slot, out, stream=None):
    """``out[i] = qmap[code[i]] * absmax[block(i)]`` (float32) for an 8-bit slot of cupy arrays
    and a float32 cupy array ``out`` of its size: one launch of ``fo_block_dequantize``,
    asynchronous on ``stream`` (None: CuPy's current stream) and the slot's device, checked
    before; the bits of ``block_loops.dequantize_into``."""
    n = check_pass("dequantize", slot, out, "out")
    if n == 0:
        return
    device = slot.codes.data.device_id
    qm, _ = tables(slot.signed, device, stream)
    _launch_pass("fo_block_dequantize", n, device, (slot.codes, slot.absmax, qm, out), stream)


def quantize_from(slot, values, stream=None):
    """Store float32 cupy ``values`` (the slot's size; not modified) into an 8-bit slot of cupy
    arrays, in place: one launch of ``fo_block_quantize`` (each block's absmax the largest
    magnitude of its values, NaN if it holds one; each code the nearest of the value over it,
    ``block_requantize``), asynchronous and checked as :func:`dequantize_into`; the bits of
    ``block_loops.quantize_from``."""
    n = check_pass("quantize", slot, values, "values")
    if n == 0:
        return
    device = slot.codes.data.device_id
    qm, lut = tables(slot.signed, device, stream)
    args = (slot.codes, slot.absmax, qm, lut, values)
    _launch_pass("fo_block_quantize", n, device, args, stream)
