"""CuPy backend: the CUDA C rules (``rules.cuh``) compiled with ``cupy.RawModule`` and launched.

``apply(rule_name, p, g, states, h, gs)`` has the contract of ``kernels/cpu.py``'s ``apply``:
flat, equal-length, C-contiguous 1-D ``cupy.ndarray`` arrays of one dtype (float32 or float64),
updated in place; ``h`` the rule's scalar tuple (the layout declared in ``rules.py``) and ``gs``
= (gradient scale, clip value or 0) for ``transformed_grad``, already cast to that dtype on the
host. One kernel launch, asynchronous on ``stream`` (default: the current stream); no device
memory is allocated and nothing synchronises.

The kernel sources ship as package data (``optim_kernels.cu``, ``rules.cuh`` and the generated
``rules_layout.cuh`` next to this file). The headers are inlined into the source before compiling,
rather than passed with ``-I``: CuPy's kernel cache is keyed on the source text and options only,
so an edit to an included header would otherwise keep serving the stale cached binary. A
``rules_layout.cuh`` that no longer matches the declarations of ``rules.py`` is refused
(``layout.check_header``) before anything is compiled.

Launch: 256 threads per block; grid = min(ceil(work / 256), 32 * SMs) blocks, where work is the
number of 16-byte vectors (float4 / double2) plus the scalar tail when every array is 16-byte
aligned, else the number of elements; the kernels loop grid-stride over 64-bit indices.

Storage kernels (16-bit and mixed storage, master weights, stochastic rounding; the precision
issue): ``apply_storage`` launches ``fo::storage_kernel`` of ``optim_kernels.cu`` (the loop over
``storage.cuh``'s conversions, the rule called unchanged in float32), one template instantiation
per (rule, storage combination), compiled on first use as a module of its own through
``cupy.RawModule(name_expressions=...)``; 16-bit arrays are passed as ``uint16`` views. Each
thread takes packs of 4 consecutive elements per aligned load (8 bytes of 16-bit elements), so the
grid is sized on ceil(n / 4). The
gradient norm of 16-bit arrays uses the ``fo_sumsq_partials_bf16``/``_f16`` module. 8-bit
blockwise state (``state_dtype="int8"``) goes to the block kernels of ``block_cupy.py``.
``convert`` (``Backend.convert``) launches ``fo::convert_kernel``, one instantiation per
(destination, source, stochastic rounding), compiled the same way.

CuPy is imported lazily: this module imports (and ``available()`` answers) without it.
The scalar struct is passed as a size-1 ``numpy.ndarray`` of a structured dtype, which CuPy
passes by value (its custom-structure kernel arguments; older CuPy releases lack them).
"""

import pathlib
import threading

import numpy as np

from . import layout, rules
from .layout import MAX_SCALARS, REDUCTION_CHUNK, REDUCTION_THREADS

_HERE = pathlib.Path(__file__).resolve().parent
KERNEL_SOURCE = "optim_kernels.cu"
HEADER = "rules.cuh"

THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 32
VECTOR_BYTES = 16

# No --std: the sources are C++11 and CuPy (>= 13) picks its own default when none is given.
# CuPy appends -ftz=true to every compile; the rules depend neither on it nor on --fmad, because
# rules.cuh spells each operation as an explicitly rounded PTX instruction. --fmad=false is passed
# anyway so that no plain floating-point code around the rules gets contracted.
COMPILE_OPTIONS = ("--fmad=false",)

_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_SHORT16 = {"bfloat16": "bf16", "float16": "f16"}

_REDUCE = "reduce"
_REDUCE16 = "reduce16"

_lock = threading.Lock()
_modules = {}  # dtype suffix -> cupy.RawModule (RawModule compiles and caches per device itself)
_kernels = {}  # (device id, kernel name) -> cupy.RawKernel
_sm_counts = {}  # device id -> number of SMs
_struct_dtypes = {}  # dtype -> numpy structured dtype matching fo::Scalars<T>
_RULE_TABLE = {name: (layout.ARITY[name], len(rules.SCALARS[name])) for name in rules.RULES}


def _read(name):
    return (_HERE / name).read_text(encoding="utf-8")


def rule_table():
    """{rule name: (number of state slots, length of h)}: the ``FO_RULES`` list the kernels are
    generated from (``rules_layout.cuh``, generated from ``rules.py``)."""
    return dict(_RULE_TABLE)


def _inline(name, text=None):
    """``name``'s text with its ``#include "<kernel file>"`` lines replaced by the files' text
    (recursively), each marked with ``#line`` so compiler messages name the right file and line."""
    text = _read(name) if text is None else text
    out = []
    for number, line in enumerate(text.split("\n"), 1):
        included = line.strip().removeprefix("#include ").strip('"')
        if line.startswith('#include "') and (_HERE / included).is_file():
            header = layout.check_header() if included == layout.HEADER else None
            out.append(f'#line 1 "{included}"\n{_inline(included, header)}')
            out.append(f'#line {number + 1} "{name}"')
        else:
            out.append(line)
    return "\n".join(out)


def source(dtype=None):
    """The CUDA source handed to NVRTC: optim_kernels.cu with rules.cuh and rules_layout.cuh
    inlined (RuntimeError when rules_layout.cuh is stale).

    ``dtype`` (float32 / float64) restricts the kernels to that dtype; None keeps both.
    """
    code = _read(KERNEL_SOURCE)
    if f'#include "{HEADER}"' not in code:
        raise RuntimeError(f"{KERNEL_SOURCE} does not include {HEADER}")
    code = _inline(KERNEL_SOURCE, code)
    if dtype is not None:
        suffix = _suffix(np.dtype(dtype))
        defines = {"f32": "#define FO_ENABLE_F64 0\n", "f64": "#define FO_ENABLE_F32 0\n"}
        code = defines[suffix] + code
    return code


def reduction_source():
    """The CUDA source of the reduction module: optim_kernels.cu with the headers inlined, the
    update kernels left out and the reduction kernels (both dtypes) in."""
    return "#define FO_ENABLE_RULES 0\n#define FO_ENABLE_REDUCTIONS 1\n" + source()


def reduction16_source():
    """The CUDA source of the 16-bit reduction module: the partials of bfloat16 and float16
    bits (``fo_sumsq_partials_bf16``/``_f16``) and ``fo_sumsq_finish``."""
    defines = ("FO_ENABLE_RULES 0", "FO_ENABLE_F32 0", "FO_ENABLE_F64 0")
    defines += ("FO_ENABLE_REDUCTIONS 1", "FO_ENABLE_REDUCTIONS_16 1")
    return "".join(f"#define {d}\n" for d in defines) + source()


def storage_source():
    """The CUDA source of the storage kernels: optim_kernels.cu with the headers inlined and
    only the ``fo::storage_kernel`` template in (instantiated by name, see
    :func:`storage_expression`)."""
    return "#define FO_ENABLE_RULES 0\n#define FO_ENABLE_STORAGE 1\n" + source()


def available():
    """(True, description) when CuPy imports and sees a CUDA device, else (False, the reason)."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return False, f"CuPy is not importable: {type(exc).__name__}: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy cannot query CUDA devices: {type(exc).__name__}: {exc}"
    if count < 1:
        return False, "CuPy sees no CUDA device"
    return True, f"CuPy {getattr(cupy, '__version__', '?')}, {count} CUDA device(s)"


def _suffix(dtype):
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise TypeError(f"CuPy kernels support float32 and float64, not {dtype}") from None


def _module(suffix):
    mod = _modules.get(suffix)
    if mod is None:
        import cupy

        with _lock:
            mod = _modules.get(suffix)
            if mod is None:
                if suffix == _REDUCE:
                    code = reduction_source()
                elif suffix == _REDUCE16:
                    code = reduction16_source()
                else:
                    code = source(np.float32 if suffix == "f32" else np.float64)
                mod = cupy.RawModule(code=code, options=COMPILE_OPTIONS)
                _modules[suffix] = mod
    return mod


def _function(module_key, name):
    """A kernel of a module on the current device (compiled on first use, then cached)."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), name)
    k = _kernels.get(key)
    if k is None:
        k = _module(module_key).get_function(name)
        _kernels[key] = k
    return k


def kernel(rule_name, dtype):
    """The ``cupy.RawKernel`` of a rule and dtype on the current device (compiled on first use)."""
    import cupy

    suffix = _suffix(np.dtype(dtype))
    if rule_name not in _RULE_TABLE:
        raise KeyError(f"unknown rule {rule_name!r}")
    key = (cupy.cuda.runtime.getDevice(), f"{rule_name}_{suffix}")
    k = _kernels.get(key)
    if k is None:
        k = _module(suffix).get_function(key[1])
        _kernels[key] = k
    return k


def _sm_count(device_id):
    n = _sm_counts.get(device_id)
    if n is None:
        import cupy

        n = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
        _sm_counts[device_id] = n
    return n


def _scalars(h, dtype):
    """``h`` as a size-1 structured array laid out like ``fo::Scalars<T>`` (passed by value)."""
    sdt = _struct_dtypes.get(dtype)
    if sdt is None:
        sdt = np.dtype([("v", dtype, (MAX_SCALARS,))])
        _struct_dtypes[dtype] = sdt
    buf = np.zeros(MAX_SCALARS, dtype)
    buf[: len(h)] = h
    return buf.view(sdt)


def launch_config(n, aligned, dtype, sm_count):
    """(grid, block, vectorize) for ``n`` elements."""
    width = VECTOR_BYTES // np.dtype(dtype).itemsize
    work = n // width + n % width if aligned else n
    grid = max(1, min(-(-work // THREADS_PER_BLOCK), BLOCKS_PER_SM * sm_count))
    return grid, THREADS_PER_BLOCK, int(aligned)


_streams = {}  # (device id, handle) -> cupy.cuda.ExternalStream


def as_stream(stream, device):
    """A CuPy stream for a launch on ``device``: None stays None (CuPy's current stream), a CuPy
    stream as it is, a raw ``cudaStream_t`` handle (0 the null stream) or a torch/numba stream
    as a ``cupy.cuda.ExternalStream`` (cached per device and handle)."""
    if stream is None:
        return None
    handle = stream
    if not isinstance(stream, int):
        handle = getattr(stream, "cuda_stream", None)  # torch.cuda.Stream
        if handle is None:
            return stream  # a CuPy stream (or anything usable as ``with stream:``)
    import cupy

    if handle == 0:
        return cupy.cuda.Stream.null
    key = (device, handle)
    s = _streams.get(key)
    if s is None:
        if len(_streams) >= 4096:
            _streams.clear()
        s = _streams[key] = cupy.cuda.ExternalStream(handle, device)
    return s


def apply(rule_name, p, g, states, h, gs=None, stream=None, *, check=True):
    """Run ``rule_name`` over flat, equal-length, contiguous 1-D cupy arrays, in place.

    ``states`` are the rule's state arrays in its slot order; ``h`` the tuple of per-step scalars
    and ``gs`` = (gradient scale, clip value or 0), both already cast to ``p``'s dtype (``gs``
    None: (1, 0), the gradient as it is). Launched asynchronously on ``stream`` (None: the
    current stream). ``check=False`` skips the argument checks (the optimizers have checked
    everything before the step; it saves host time per launch).
    """
    if not check:
        _launch(rule_name, p, g, tuple(states), h, gs, stream)
        return
    import cupy

    table = _RULE_TABLE
    if rule_name not in table:
        raise KeyError(f"unknown rule {rule_name!r}")
    nstates, nscalars = table[rule_name]
    states = tuple(states)
    if len(states) != nstates:
        raise ValueError(f"{rule_name} takes {nstates} state arrays, got {len(states)}")
    if len(h) != nscalars:
        raise ValueError(f"{rule_name} takes {nscalars} scalars in h, got {len(h)}")
    if gs is not None and len(gs) != 2:
        raise ValueError(f"gs is (gradient scale, clip), got {len(gs)} values")
    arrays = (p, g, *states)
    for a in arrays:
        if not isinstance(a, cupy.ndarray):
            raise TypeError(f"expected cupy.ndarray, got {type(a).__name__}")
    dtype = p.dtype
    _suffix(dtype)
    n = p.size
    device = p.data.device_id
    for a in arrays:
        if a.dtype != dtype:
            raise TypeError(f"all arrays must be {dtype}, got {a.dtype}")
        if a.ndim != 1 or a.size != n:
            raise ValueError(f"expected 1-D arrays of {n} elements, got shape {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError("arrays must be contiguous")
        if a.data.device_id != device:
            raise ValueError("arrays are on different devices")
    _launch(rule_name, p, g, states, h, gs, stream)


def _launch(rule_name, p, g, states, h, gs, stream):
    import cupy

    n = p.size
    if n == 0:
        return
    dtype = p.dtype
    arrays = (p, g, *states)
    device = p.data.device_id
    aligned = all(a.data.ptr % VECTOR_BYTES == 0 for a in arrays)
    stream = as_stream(stream, device)
    with cupy.cuda.Device(device):
        k = kernel(rule_name, dtype)
        grid, block, vectorize = launch_config(n, aligned, dtype, _sm_count(device))
        gscale, clip = (1, 0) if gs is None else gs
        scalar = dtype.type
        args = (*arrays, np.int64(n), np.int32(vectorize), _scalars(h, dtype))
        args += (scalar(gscale), scalar(clip))
        if stream is None:
            k((grid,), (block,), args)  # on the current stream
        else:
            with stream:  # RawKernel launches on the current stream
                k((grid,), (block,), args)


def sumsq_and_finite(x, stream=None):
    """(sum of squares in float64, all finite?) of a flat, contiguous cupy array: two kernel
    launches (fixed-chunk partials, then one block over the partials; see optim_kernels.cu),
    deterministic for any grid. Returns host values, so it waits for the device (a copy of two
    numbers) on ``stream`` (None: the current stream; a handle: :func:`as_stream`), and
    synchronises that stream alone."""
    import cupy

    if not isinstance(x, cupy.ndarray):
        raise TypeError(f"expected cupy.ndarray, got {type(x).__name__}")
    suffix = _SHORT16.get(x.dtype.name) if x.dtype.itemsize == 2 else _suffix(x.dtype)
    if suffix is None:
        raise TypeError(f"CuPy kernels support bfloat16 and float16, not {x.dtype}")
    if x.ndim != 1 or not x.flags.c_contiguous:
        raise ValueError(f"expected a contiguous 1-D array, got shape {x.shape}")
    n = x.size
    if n == 0:
        return 0.0, True
    nchunks = -(-n // REDUCTION_CHUNK)
    device = x.data.device_id
    stream = as_stream(stream, device)
    with cupy.cuda.Device(device):
        if stream is None:
            host = _reduce(cupy, x, n, nchunks, suffix, device)
        else:
            with stream:
                host = _reduce(cupy, x, n, nchunks, suffix, device)
    return float(host[0]), bool(host[1] == 0.0)


def _reduce(cupy, x, n, nchunks, suffix, device):
    module = _REDUCE16 if suffix in ("bf16", "f16") else _REDUCE
    if module == _REDUCE16:
        x = x.view(np.uint16)
    partials = _function(module, f"fo_sumsq_partials_{suffix}")
    finish = _function(module, "fo_sumsq_finish")
    sq = cupy.empty(nchunks, dtype=np.float64)
    bad = cupy.empty(nchunks, dtype=np.int32)
    out = cupy.empty(2, dtype=np.float64)
    grid = max(1, min(nchunks, BLOCKS_PER_SM * _sm_count(device)))
    partials((grid,), (REDUCTION_THREADS,), (x, np.int64(n), sq, bad))
    finish((1,), (REDUCTION_THREADS,), (sq, bad, np.int64(nchunks), out))
    return out.get()  # on the current stream: waits for the two kernels


# ---------------------------------------------------------------------------------------------
# Storage kernels (the precision issue): fo::storage_kernel of optim_kernels.cu, one
# instantiation per (rule, storage combination), each compiled on first use as a module of its
# own (cupy.RawModule with name_expressions; CuPy caches the binary on disk).

_ELEMENT = {
    "float32": "float",
    "float64": "double",
    "bfloat16": "fo::bf16_bits",
    "float16": "fo::f16_bits",
}
_storage_modules = {}  # (rule, storage) -> (cupy.RawModule, name expression)
STORAGE_PACK = 4  # FO_PACK of optim_kernels.cu: elements per aligned load of the storage loop


def storage_expression(rule_name, storage):
    """The C++ name of the storage kernel of ``rule_name`` for ``storage`` (an
    ``access.Storage``): ``fo::storage_kernel<fo::op_adam, float, fo::bf16_bits, ...>``."""
    from . import access

    if rule_name not in _RULE_TABLE:
        raise KeyError(f"unknown rule {rule_name!r}")
    compute = _ELEMENT[access.compute_name(storage)]
    elements = ", ".join(_ELEMENT[n] for n in (storage.param, storage.grad, storage.state))
    flags = f"{str(storage.master).lower()}, {str(storage.stochastic).lower()}"
    return f"fo::storage_kernel<fo::op_{rule_name}, {compute}, {elements}, {flags}>"


def storage_kernel(rule_name, storage):
    """The ``cupy.RawKernel`` of a rule and storage combination on the current device."""
    import cupy

    key = (rule_name, storage)
    entry = _storage_modules.get(key)
    if entry is None:
        expr = storage_expression(rule_name, storage)
        with _lock:
            entry = _storage_modules.get(key)
            if entry is None:
                mod = cupy.RawModule(
                    code=storage_source(), options=COMPILE_OPTIONS, name_expressions=[expr]
                )
                entry = _storage_modules[key] = (mod, expr)
    kkey = (cupy.cuda.runtime.getDevice(), key)
    k = _kernels.get(kkey)
    if k is None:
        k = _kernels[kkey] = entry[0].get_function(entry[1])
    return k


def _bits(a):
    """A 16-bit float array as a ``uint16`` view of its bits (the kernels' element type)."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def apply_storage(rule_name, storage, p, g, states, master, h, gs, rs, stream=None):
    """Run ``rule_name`` over flat, equal-length, contiguous cupy arrays stored as ``storage``
    says, in place: one launch of its storage kernel, asynchronous on ``stream`` (None: the
    current stream). ``master`` the float32 master copy of ``p`` or None; ``h`` and ``gs`` cast
    to the compute dtype; ``rs`` = (seed, step, index of p[0] among the optimizer's parameters).
    The arguments are not checked again (the optimizers have checked them).

    8-bit state (``storage.state == "int8"``) runs the block kernels of ``block_cupy.py``
    (``states`` its 8-bit slots), which check their arguments before the launch."""
    if storage.state == "int8":
        from . import block_cupy  # it imports this module

        return block_cupy.apply(rule_name, storage, p, g, states, master, h, gs, rs, stream)
    import cupy

    from . import access

    n = p.size
    if n == 0:
        return
    compute = np.dtype(access.compute_name(storage))
    device = p.data.device_id
    null = np.uint64(0)
    slots = [_bits(s) for s in states] + [null] * (3 - len(states))
    w = null if master is None else master
    stream = as_stream(stream, device)
    with cupy.cuda.Device(device):
        k = storage_kernel(rule_name, storage)
        # a thread takes STORAGE_PACK elements per iteration (fo::storage_kernel's packs)
        work = -(-n // STORAGE_PACK)
        grid = max(1, min(-(-work // THREADS_PER_BLOCK), BLOCKS_PER_SM * _sm_count(device)))
        gscale, clip = gs
        args = (_bits(p), w, _bits(g), *slots, np.int64(n), _scalars(h, compute))
        args += (compute.type(gscale), compute.type(clip))
        args += tuple(np.uint64(int(v) % 2**64) for v in rs)
        if stream is None:
            k((grid,), (THREADS_PER_BLOCK,), args)
        else:
            with stream:
                k((grid,), (THREADS_PER_BLOCK,), args)


_convert_modules = {}  # (dst, src, stochastic) -> (cupy.RawModule, name expression)


def convert_expression(dst, src, stochastic):
    """The C++ name of the conversion kernel from storage ``src`` to ``dst`` (dtype names):
    ``fo::convert_kernel<fo::bf16_bits, float, true>``."""
    return f"fo::convert_kernel<{_ELEMENT[dst]}, {_ELEMENT[src]}, {str(bool(stochastic)).lower()}>"


def convert_kernel(dst, src, stochastic):
    """The ``cupy.RawKernel`` of a conversion (see :func:`convert_expression`) on the current
    device, compiled on first use as a module of its own, as :func:`storage_kernel` does."""
    import cupy

    key = (dst, src, bool(stochastic))
    entry = _convert_modules.get(key)
    if entry is None:
        expr = convert_expression(*key)
        with _lock:
            entry = _convert_modules.get(key)
            if entry is None:
                mod = cupy.RawModule(
                    code=storage_source(), options=COMPILE_OPTIONS, name_expressions=[expr]
                )
                entry = _convert_modules[key] = (mod, expr)
    kkey = (cupy.cuda.runtime.getDevice(), ("convert", *key))
    k = _kernels.get(kkey)
    if k is None:
        k = _kernels[kkey] = entry[0].get_function(entry[1])
    return k


def convert(dst, src, rs=None, word=0, stream=None):
    """``dst[...] = src`` for flat, equal-length, contiguous cupy arrays of the storage dtypes
    (float32, float64, bfloat16, float16): one launch of ``fo::convert_kernel``, asynchronous on
    ``stream`` (None: the current stream). Exact widening, else rounding to nearest even, or
    with ``rs`` = (seed, step, index of ``src[0]`` among the optimizer's parameters) and a
    16-bit ``dst`` stochastically with word ``word`` (0-3) of each element's ``random_bits4``:
    the bits of ``cpu_storage.convert``."""
    import cupy

    from . import access

    n = dst.size
    c = access.conversion(dst.dtype, src.dtype, n, src.size, rs, word)
    if n == 0:
        return
    device = dst.data.device_id
    stream = as_stream(stream, device)
    with cupy.cuda.Device(device):
        k = convert_kernel(c.dst, c.src, c.stochastic)
        grid = max(1, min(-(-n // THREADS_PER_BLOCK), BLOCKS_PER_SM * _sm_count(device)))
        args = (_bits(dst), _bits(src), np.int64(n))
        args += tuple(np.uint64(v % 2**64) for v in c.rs) + (np.int32(c.word),)
        if stream is None:
            k((grid,), (THREADS_PER_BLOCK,), args)
        else:
            with stream:
                k((grid,), (THREADS_PER_BLOCK,), args)


class RawModuleCache:
    """One ``cupy.RawModule`` compiled on first use from ``source()`` with ``options``, and its
    kernels by (device, name) (NVRTC compiles once; a kernel is loaded once per device)."""

    def __init__(self, source, options):
        self._source, self._options = source, options
        self._module, self._functions, self._lock = None, {}, threading.Lock()

    def function(self, cupy, device, name):
        """The ``cupy.RawKernel`` called ``name`` on ``device`` (the current device)."""
        key = (device, name)
        k = self._functions.get(key)
        if k is None:
            if self._module is None:
                with self._lock:
                    if self._module is None:
                        self._module = cupy.RawModule(code=self._source(), options=self._options)
            k = self._functions[key] = self._module.get_function(name)
        return k


FLOAT_DTYPES = ("float32", "float64")
"""The dtypes of the float kernels' arrays."""


def check_device_arrays(what, arrays, one_dtype=False):
    """TypeError/ValueError naming the first of ``arrays``, ``(name, array, dtypes, size)``
    tuples, that is not a flat, C-contiguous ``cupy.ndarray`` of ``size`` elements, of one of
    the dtype names ``dtypes`` (and of the first array's dtype if ``one_dtype``), on the first
    array's device (checked before anything is launched; ``what`` names the kernels)."""
    import cupy

    first_name, first = arrays[0][:2]
    for name, a, dtypes, size in arrays:
        if not isinstance(a, cupy.ndarray):
            raise TypeError(
                f"the CuPy {what} kernels take cupy.ndarray, {name} is a {type(a).__name__}"
            )
        if a.dtype.name not in dtypes:
            raise TypeError(
                f"{name} must be {' or '.join(dtypes)} for the CuPy {what} kernels, got {a.dtype}"
            )
        if one_dtype and a.dtype != first.dtype:
            raise TypeError(
                f"the CuPy {what} kernels take arrays of one dtype, got {first.dtype} and {a.dtype}"
            )
        if a.ndim != 1 or a.size != size or not a.flags.c_contiguous:
            raise ValueError(
                f"{name} must be a flat contiguous array of {size} elements, got shape "
                f"{a.shape}" + ("" if a.flags.c_contiguous else " (not contiguous)")
            )
        if a.data.device_id != first.data.device_id:
            raise ValueError(
                f"{name} is on cuda:{a.data.device_id}, {first_name} on cuda:{first.data.device_id}"
            )


def check_flat_arrays(arrays, n, what):
    """TypeError/ValueError naming the first of ``arrays`` that is not a flat, C-contiguous
    float32/float64 ``cupy.ndarray`` of ``n`` elements with the dtype and device of the first
    (checked before anything is launched; ``what`` names the kernels in the message)."""
    named = [(f"argument {k}", a, FLOAT_DTYPES, n) for k, a in enumerate(arrays)]
    check_device_arrays(what, named, one_dtype=True)
