"""The CUDA C rules (kernels/rules.cuh, kernels/optim_kernels.cu) and the CuPy launcher.

Runs without a GPU: nvcc compiles the kernels to PTX (and ptxas assembles them), and a host
harness (tests/cuda_c_host_harness.cu, built with nvcc as a shared library, loaded with ctypes)
applies every rule of rules.cuh to host arrays. Its results must be bit-identical to the scalar
Python rules of kernels/rules.py run elementwise on NumPy scalars of the same dtype. Tests that
need nvcc (tests/cuda_toolchain.py finds it, also in the nvidia-cuda-nvcc wheel) skip without it,
or fail with FASTOPT_REQUIRE_NVCC=1; the CuPy end-to-end test skips without CuPy and a CUDA device.
"""

import ctypes
import ctypes.util
import math
import os
import pathlib
import re
import subprocess
import sys
import types

import ml_dtypes
import numpy as np
import pytest
from cupy_ptx import build_harness
from fake_cupy import FakeCuPy, FakeDeviceArray, install

from fastopt.kernels import access, layout, loops, rules
from fastopt.kernels import cupy as cupy_backend
from fastopt.kernels import storage as kstorage
from fastopt.kernels.compile_rules import ARITY

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
HARNESS = pathlib.Path(__file__).resolve().parent / "cuda_c_host_harness.cu"
ARCHS = ("sm_80", "sm_90")
DTYPES = (np.float32, np.float64)


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{output}"
    assert "warning" not in output.lower(), f"{' '.join(map(str, cmd))} warned:\n{output}"
    return output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_c")


# ---------------------------------------------------------------------------------------------
# The rule list of rules.cuh matches rules.py (no nvcc needed).


def test_header_rule_table_matches_rules_py():
    table = cupy_backend.rule_table()
    assert tuple(table) == rules.RULES
    for name, (nstates, nscalars) in table.items():
        assert nstates == ARITY[name], name
        assert 1 <= nscalars <= cupy_backend.MAX_SCALARS, name
        assert len(H_CASES[name](np.float64)[0]) == nscalars, name


def test_committed_layout_header_is_the_generated_one():
    """kernels/rules_layout.cuh is generated from rules.py (python -m fastopt.kernels.layout)."""
    text = (KERNELS / layout.HEADER).read_text(encoding="utf-8")
    assert text == layout.header_text()
    assert layout.check_header() == text
    for name, fields in rules.LAYOUTS.items():
        for i, field in enumerate(fields):
            assert f"#define {layout.field_macro(name, field)} " in text
            assert re.search(rf"#define {layout.field_macro(name, field)} +{i}\n", text)
    assert f"#define FO_REDUCTION_CHUNK {layout.REDUCTION_CHUNK}\n" in text


def test_stale_layout_header_is_refused(tmp_path, monkeypatch):
    """A header that no longer matches the declarations fails before anything compiles."""
    stale = tmp_path / layout.HEADER
    stale.write_text(layout.header_text().replace("FO_ADAM_STEP_SIZE", "FO_ADAM_STEPSIZE"))
    with pytest.raises(RuntimeError, match="stale"):
        layout.check_header(stale)
    monkeypatch.setattr(layout, "HEADER_PATH", stale)
    with pytest.raises(RuntimeError, match="python -m fastopt.kernels.layout"):
        cupy_backend.source()


def test_rules_cuh_reads_scalars_by_field():
    """rules.cuh indexes h only through the generated FO_<LAYOUT>_<FIELD> macros."""
    text = (KERNELS / "rules.cuh").read_text(encoding="utf-8")
    assert not re.search(r"\bh\[\d+\]", text)
    used = set(re.findall(r"\bh\[(FO_\w+)\]", text))
    macros = {layout.field_macro(n, f) for n, fs in rules.LAYOUTS.items() for f in fs}
    assert used and used <= macros


# ---------------------------------------------------------------------------------------------
# a. The kernels compile to PTX, without warnings, and the arithmetic is plain IEEE.


def _entries(ptx):
    return set(re.findall(r"\.entry\s+(\w+)\s*\(", ptx))


def _all_kernel_names(suffixes=("f32", "f64")):
    return {f"{name}_{s}" for name in rules.RULES for s in suffixes}


@pytest.fixture(scope="module")
def kernels_ptx(nvcc, workdir):
    """arch -> PTX of optim_kernels.cu (compiled once per session and arch)."""
    cache = {}

    def compile_for(arch):
        if arch not in cache:
            out = workdir / f"optim_kernels_{arch}.ptx"
            cmd = [nvcc, f"-arch={arch}", "-ptx", "-Werror", "all-warnings", "-I", str(KERNELS)]
            _run([*cmd, str(KERNELS / "optim_kernels.cu"), "-o", str(out)], workdir)
            cache[arch] = out.read_text()
        return cache[arch]

    return compile_for


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_to_ptx(kernels_ptx, arch):
    assert _entries(kernels_ptx(arch)) == _all_kernel_names()


def _param_sizes(ptx, entry):
    """Byte sizes of a kernel's parameters, from its PTX signature."""
    signature = re.search(rf"\.entry\s+{entry}\s*\((.*?)\)", ptx, re.S).group(1)
    sizes = []
    for kind, count in re.findall(
        r"\.param\s+(?:\.align\s+\d+\s+)?\.(\w+)\s+\w+(?:\[(\d+)\])?", signature
    ):
        sizes.append(int(count) if count else int(re.sub(r"\D", "", kind)) // 8)
    return sizes


def test_cupy_source_is_ieee_under_cupy_flags(nvcc, workdir):
    """The source CuPy compiles (header inlined), with the flags CuPy forces (-ftz=true) and
    FMA contraction on: still no fused, flushed or approximate arithmetic; ptxas assembles the
    inline PTX without warnings, stack frames or spills."""
    src = workdir / "cupy_source.cu"
    src.write_text(cupy_backend.source())
    ptx = workdir / "cupy_source.ptx"
    flags = ["-ftz=true", "-fmad=true", "-Werror", "all-warnings"]
    _run([nvcc, "-arch=sm_90", "-ptx", *flags, str(src), "-o", str(ptx)], workdir)
    text = ptx.read_text()
    assert _entries(text) == _all_kernel_names()
    for forbidden in ("fma.", ".ftz", ".approx", ".local", "__local_depot"):
        assert forbidden not in text, forbidden
    assert "ld.global.v4.f32" in text and "ld.global.v2.f64" in text  # 16-byte vector path
    ptxas = pathlib.Path(nvcc).with_name("ptxas")
    info = _run(
        [str(ptxas), "-arch=sm_90", "-v", "--warning-as-error", str(ptx), "-o", "k.cubin"],
        workdir,
    )
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", info)
    assert len(frames) == len(_all_kernel_names())
    assert all(f == ("0", "0") for f in frames), info


@pytest.mark.parametrize("dtype", DTYPES)
def test_cupy_source_single_dtype(nvcc, workdir, dtype):
    suffix = "f32" if dtype == np.float32 else "f64"
    src = workdir / f"cupy_source_{suffix}.cu"
    src.write_text(cupy_backend.source(dtype))
    ptx = workdir / f"cupy_source_{suffix}.ptx"
    _run(
        [nvcc, "-arch=sm_80", "-ptx", "-Werror", "all-warnings", str(src), "-o", str(ptx)], workdir
    )
    assert _entries(ptx.read_text()) == _all_kernel_names((suffix,))


def _find_nvrtc():
    """libnvrtc, if one is around: $FASTOPT_NVRTC, the loader's search path, the CUDA toolkit, or
    the nvidia-cuda-nvrtc wheel. None when absent (the toolkit here may ship without it)."""
    candidates = [os.environ.get("FASTOPT_NVRTC"), ctypes.util.find_library("nvrtc")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates += sorted(map(str, (pathlib.Path(root) / "lib64").glob("libnvrtc.so*")))
    for site in sys.path:
        lib = pathlib.Path(site) / "nvidia" / "cuda_nvrtc" / "lib"
        if lib.is_dir():
            candidates += sorted(map(str, lib.glob("libnvrtc.so*")))
    for candidate in candidates:
        if candidate and "builtins" not in candidate:
            try:
                return ctypes.CDLL(candidate)
            except OSError:
                continue
    return None


def nvrtc_or_skip():
    """libnvrtc; a skip when it is absent, a failure when ``FASTOPT_REQUIRE_NVRTC=1`` (CI installs
    it with the test extra: the nvidia-cuda-nvrtc wheel compiles on a machine without a GPU)."""
    nvrtc = _find_nvrtc()
    if nvrtc is None:
        reason = "libnvrtc not found (set FASTOPT_NVRTC to its path)"
        if os.environ.get("FASTOPT_REQUIRE_NVRTC") == "1":
            pytest.fail(f"FASTOPT_REQUIRE_NVRTC=1 but {reason}")
        pytest.skip(reason)
    return nvrtc


@pytest.mark.parametrize("dtype", [np.float32, np.float64, None], ids=["f32", "f64", "both"])
def test_cupy_source_compiles_with_nvrtc(dtype):
    """What cupy.RawModule does: NVRTC on source(), with our options plus the ones CuPy adds."""
    text, _ = _nvrtc_compile(nvrtc_or_skip(), cupy_backend.source(dtype))
    suffixes = {np.float32: ("f32",), np.float64: ("f64",), None: ("f32", "f64")}[dtype]
    assert _entries(text) == _all_kernel_names(suffixes)
    for forbidden in ("fma.", ".ftz", ".approx", ".local"):
        assert forbidden not in text, forbidden


# ---------------------------------------------------------------------------------------------
# b. Host harness vs. the scalar Python rules.


@pytest.fixture(scope="module")
def harness(nvcc, workdir):
    # no contraction of a*b+c into an FMA on the host either (build_harness: -ffp-contract=off)
    restypes = {"fo_host_rule_table": ctypes.c_char_p, "fo_host_max_scalars": ctypes.c_int}
    argtypes = {}
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        restypes[f"fo_host_apply_{suffix}"] = ctypes.c_int
        argtypes[f"fo_host_apply_{suffix}"] = (
            [ctypes.c_char_p, ctypes.c_int, ctypes.c_longlong] + [ctypes.c_void_p] * 6 + [real] * 2
        )  # ..., gscale, clip
    return build_harness(nvcc, HARNESS, workdir, argtypes, restypes)


def _ptr(a):
    return None if a is None else a.ctypes.data


def harness_apply(dll, rule_name, p, g, states, h, gs, use_ieee):
    """Apply a rule in place through the harness (h padded to FO_MAX_SCALARS)."""
    dtype = p.dtype
    hbuf = np.zeros(cupy_backend.MAX_SCALARS, dtype)
    hbuf[: len(h)] = h
    slots = list(states) + [None] * (3 - len(states))
    fn = dll.fo_host_apply_f32 if dtype == np.float32 else dll.fo_host_apply_f64
    pointers = (_ptr(p), _ptr(g), *map(_ptr, slots), _ptr(hbuf))
    rc = fn(rule_name.encode(), int(use_ieee), p.size, *pointers, gs[0], gs[1])
    assert rc == 0, f"harness does not know {rule_name}"


def _python_rules():
    """The functions of rules.py, re-bound (as compile_rules does for Numba) to a namespace whose
    ``math.sqrt`` is ``np.sqrt``.

    Plain ``math.sqrt`` would leave the dtype: it returns a Python float, so adadelta's
    ``math.sqrt(a) / math.sqrt(b)`` would divide in float64 even for float32 inputs (Numba's
    math.sqrt keeps float32), and it raises on a negative argument where Numba and C return NaN.
    np.sqrt on a NumPy scalar is the correctly rounded square root in that scalar's dtype.
    """

    def sqrt(x):
        if not isinstance(x, np.floating):
            raise TypeError(f"sqrt of {type(x).__name__}: the arithmetic left the NumPy dtype")
        return np.sqrt(x)

    namespace = dict(vars(rules))
    namespace["math"] = types.SimpleNamespace(sqrt=sqrt)
    for name, fn in vars(rules).items():
        if isinstance(fn, types.FunctionType) and fn.__module__ == rules.__name__:
            namespace[name] = types.FunctionType(fn.__code__, namespace, name, fn.__defaults__)
    return namespace


PY_RULES = _python_rules()


def python_apply(rule_name, p, g, states, h, gs):
    """Reference: the loop of kernels/cpu.py in plain Python, element by element, on NumPy
    scalars of the arrays' dtype: ``rule(p, transformed_grad(g, *gs), *states, h)``."""
    rule, transformed_grad = PY_RULES[rule_name], PY_RULES["transformed_grad"]
    scalar = p.dtype.type
    p_out, s_out = p.copy(), [s.copy() for s in states]
    with np.errstate(all="ignore"):
        for i in range(p.size):
            gi = transformed_grad(g[i], gs[0], gs[1])
            out = rule(p[i], gi, *(s[i] for s in states), h)
            for v in out:
                # The arithmetic stayed in the dtype (no promotion to a Python float / float64).
                assert type(v) is scalar, (rule_name, type(v))
            p_out[i] = out[0]
            for s, v in zip(s_out, out[1:], strict=True):
                s[i] = v
    return p_out, s_out


# Per-step scalars: valid values (lr > 0, betas in (0, 1), eps > 0), computed in float64 like the
# optimizer classes do, cast to the dtype. Several cases per rule cover the branches: maximize
# (gsign = -1), L2 on/off, the two lerp branches (w < 0.5 and w >= 0.5), first step, Nesterov,
# rectified / unrectified RAdam.


def _adam_common(lr, betas, wd, decoupled, maximize):
    b1, b2 = betas
    decay = 1.0 - lr * wd if decoupled else 1.0
    return (decay, 0.0 if decoupled else wd, -1.0 if maximize else 1.0, b1, 1 - b1, b2, 1 - b2)


def _adam(t, lr=1e-3, betas=(0.9, 0.999), wd=0.0, decoupled=False, maximize=False, eps=1e-8):
    bc1, bc2 = 1 - betas[0] ** t, 1 - betas[1] ** t
    return (*_adam_common(lr, betas, wd, decoupled, maximize), lr / bc1, math.sqrt(bc2), eps)


def _nadam(t, lr=2e-3, betas=(0.9, 0.999), wd=0.0, decoupled=False, eps=1e-8, psi=4e-3):
    def mu(k):
        return betas[0] * (1 - 0.5 * 0.96 ** (k * psi))

    prod = math.prod(mu(k) for k in range(1, t + 1))
    c_grad = lr * (1 - mu(t)) / (1 - prod)
    c_avg = lr * mu(t + 1) / (1 - prod * mu(t + 1))
    common = _adam_common(lr, betas, wd, decoupled, False)
    return (*common, 1 - betas[1] ** t, eps, c_grad, c_avg)


def _radam(t, lr=1e-3, betas=(0.9, 0.999), wd=0.0, decoupled=False, eps=1e-8):
    b1, b2 = betas
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
    rectify = rho_t > 5
    rect = (
        math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        if rectify
        else 0.0
    )
    common = _adam_common(lr, betas, wd, decoupled, False)
    return (*common, 1 - b1**t, lr, float(rectify), rect, math.sqrt(1 - b2**t), eps)


H64 = {
    "sgd": [(0.1, 0.01, 1.0), (0.05, 0.0, -1.0)],
    "sgd_momentum": [
        (0.1, 0.01, 1.0, 0.9, 1.0, 0.0, 1.0),  # first step: buf = g
        (0.1, 0.0, 1.0, 0.9, 0.7, 0.0, 0.0),  # dampening 0.3
        (0.05, 1e-4, -1.0, 0.9, 1.0, 1.0, 0.0),  # Nesterov, maximize
    ],
    "adagrad": [(0.01 / (1 + 2 * 0.1), 0.01, 1.0, 1e-10), (0.01, 0.0, -1.0, 1e-10)],
    "rmsprop": [(0.01, 0.0, 1.0, 0.99, 0.01, 1e-8, 0.0), (0.01, 0.01, -1.0, 0.3, 0.7, 1e-8, 0.0)],
    "rmsprop_momentum": [(0.01, 0.01, 1.0, 0.99, 0.01, 1e-8, 0.9)],
    "rmsprop_centered": [
        (0.01, 0.0, 1.0, 0.99, 0.01, 1e-8, 0.0),  # lerp weight 0.01 < 0.5
        (0.01, 0.01, -1.0, 0.3, 0.7, 1e-8, 0.0),  # lerp weight 0.7 >= 0.5
    ],
    "rmsprop_centered_momentum": [
        (0.01, 0.01, 1.0, 0.99, 0.01, 1e-8, 0.9),
        (0.01, 0.0, 1.0, 0.4, 0.6, 1e-8, 0.5),
    ],
    "adadelta": [(1.0, 0.0, 1.0, 0.9, 0.1, 1e-6), (0.5, 0.01, -1.0, 0.3, 0.7, 1e-6)],
    "adam": [
        _adam(1),
        _adam(10, wd=0.01),  # L2
        _adam(3, wd=0.01, decoupled=True, maximize=True),  # AdamW, maximize
        _adam(2, betas=(0.3, 0.9)),  # lerp weight 0.7 >= 0.5
    ],
    "adam_amsgrad": [_adam(1), _adam(7, wd=0.01, decoupled=True), _adam(2, betas=(0.2, 0.99))],
    "adamax": [
        (0.0, 1.0, 0.9, 0.1, 0.999, 1e-8, 2e-3 / (1 - 0.9**1)),
        (0.01, -1.0, 0.3, 0.7, 0.999, 1e-8, 2e-3 / (1 - 0.3**5)),
    ],
    "nadam": [_nadam(1), _nadam(5, wd=0.01), _nadam(3, wd=0.01, decoupled=True)],
    "radam": [_radam(3), _radam(10, wd=0.01), _radam(50, wd=0.01, decoupled=True)],
    "rprop": [(1.0, 0.5, 1.2, 1e-6, 50.0, 0.0), (-1.0, 0.5, 1.2, 1e-3, 1.0, 0.0)],
    "yogi": [
        (0.01, 0.0, 1.0, 0.9, 0.1, 0.001, 1.0, 1e-3),
        (0.01, 0.01, -1.0, 0.9, 0.1, 0.001, 1.0, 1e-3),
        (0.1, 0.0, 1.0, 0.9, 0.1, 0.001, 0.0447213595499958, 1e-3),  # bias-corrected, t = 1
    ],
    "lion": [
        (1 - 1e-4 * 0.1, 1e-4, 1.0, 0.9, 0.1, 0.99, 0.01),
        (1.0, 3e-4, -1.0, 0.95, 0.05, 0.98, 0.02),
    ],
    "ema": [(1 - 0.999, 0.999), (1 - 0.3, 0.3)],  # lerp weight 0.001 and 0.7 (both branches)
    "asgd": [
        (1 - 1e-4 * 0.01, 0.01, 0.0, 1.0, 1.0, 0.0),  # mu = 1: ax copies p
        (1 - 1e-2 * 0.05, 0.05, 0.01, -1.0, 1 / 7, 1.0),  # averaging, L2, maximize
    ],
    "sf_sgd": [
        (1.0, 0.0, 1.0, 0.0, 1.0 * (0.9 * 0.0 - 1)),  # first step: y = z
        (0.5, 0.01, 1 / 7, 6 / 7, 0.5 * (0.9 * (6 / 7) - 1)),
        (0.5, 0.0, 0.6, 0.4, 0.5 * (0.8 * 0.4 - 1)),  # lerp weight >= 0.5
    ],
    "sf_adamw": [
        (0.0025, 0.0, 1.0, 0.0, -0.0025, 0.999, 0.001, 1 - 0.999, 1e-8),
        (0.0025, 0.01, 0.1, 0.9, 0.0025 * (0.9 * 0.9 - 1), 0.99, 0.01, 1 - 0.99**10, 1e-8),
    ],
}


def _cast_cases(name):
    def cases(dtype):
        scalar = np.dtype(dtype).type
        return [tuple(scalar(x) for x in h) for h in H64[name]]

    return cases


H_CASES = {name: _cast_cases(name) for name in H64}

# Gradient transforms (gscale, clip): identity, scaling only, scaling and clipping.
GS64 = [(1.0, 0.0), (0.37, 0.0), (0.8, 1.5)]


def gs_cases(dtype):
    scalar = np.dtype(dtype).type
    return [(scalar(a), scalar(b)) for a, b in GS64]


_TINY = {np.float32: 1e-40, np.float64: 1e-310}  # subnormal in the dtype


def make_inputs(rule_name, dtype, seed):
    """p, g and the state arrays: random values, then edge cases.

    Random block: normal values over several magnitudes, states signed in one half and
    non-negative in the other. Edge block: every slot drawn from zero (both signs), +-1e-30,
    +-1e30, +-1, subnormal, NaN, +-inf. Coupled block: state 0 = +-g and state 1 = g*g exactly,
    so rprop sees both sign agreements, yogi v == g^2, lion c = 0 when m = g = 0. Plus rows of
    all zeros and of zero gradients.
    """
    rng = np.random.default_rng(seed)
    nstates = ARITY[rule_name]
    # n = 595: not a multiple of 4 or 2, so the kernels' vector path leaves a scalar tail.
    n_rand, n_edge, n_coupled, n_zero = 256, 256, 67, 8
    n = n_rand + n_edge + n_coupled + 2 * n_zero
    cols = np.empty((2 + nstates, n), np.float64)
    scale = 10.0 ** rng.uniform(-4, 4, size=(2 + nstates, n_rand))
    cols[:, :n_rand] = rng.standard_normal((2 + nstates, n_rand)) * scale
    cols[2:, n_rand // 2 : n_rand] = np.abs(cols[2:, n_rand // 2 : n_rand])
    edges = np.array(
        [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 1.0, -1.0, 0.5, -2.5, _TINY[dtype], np.nan]
        + [np.inf, -np.inf]
    )
    i = n_rand
    cols[:, i : i + n_edge] = rng.choice(edges, size=(2 + nstates, n_edge))
    i += n_edge
    g = rng.standard_normal(n_coupled) * 10.0 ** rng.uniform(-3, 3, n_coupled)
    g = g.astype(dtype).astype(np.float64)
    cols[:, i : i + n_coupled] = rng.standard_normal((2 + nstates, n_coupled))
    cols[1, i : i + n_coupled] = g
    if nstates >= 1:
        cols[2, i : i + n_coupled] = g * np.where(np.arange(n_coupled) % 2, 1.0, -1.0)
        cols[2, i : i + n_coupled : 4] = 0.0
    if nstates >= 2:
        with np.errstate(all="ignore"):
            cols[3, i : i + n_coupled] = (g.astype(dtype) * g.astype(dtype)).astype(np.float64)
    i += n_coupled
    cols[:, i : i + n_zero] = 0.0  # everything zero
    i += n_zero
    cols[1, i : i + n_zero] = 0.0  # zero gradient, random p and states
    cols[0, i : i + n_zero] = rng.standard_normal(n_zero)
    cols[2:, i : i + n_zero] = np.abs(rng.standard_normal((nstates, n_zero)))
    with np.errstate(over="ignore"):
        arrays = [np.ascontiguousarray(c.astype(dtype)) for c in cols]
    return arrays[0], arrays[1], arrays[2:]


def assert_bitwise_equal(actual, expected, what):
    """Same bits, except that any NaN matches any NaN (payloads may differ)."""
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    int_t = np.int32 if actual.dtype == np.float32 else np.int64
    same = (actual.view(int_t) == expected.view(int_t)) | (nan_a & nan_e)
    if not same.all():
        bad = np.flatnonzero(~same)
        k = bad[0]
        pytest.fail(
            f"{what}: {bad.size} of {actual.size} elements differ; first at {k}: "
            f"got {actual[k]!r}, expected {expected[k]!r}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("rule_name", rules.RULES)
def test_host_rule_matches_python(harness, rule_name, dtype):
    # Bit-identical: the C++ and the Python perform the same IEEE operations in the same order on
    # the same dtype (x86-64 SSE, no FMA contraction, no flush-to-zero), and np.sqrt / sqrtf are
    # both correctly rounded.
    for case, h in enumerate(H_CASES[rule_name](dtype)):
        p, g, states = make_inputs(rule_name, dtype, seed=case)
        for gs in gs_cases(dtype):
            _check_host_case(harness, rule_name, dtype, case, p, g, states, h, gs)


def _check_host_case(harness, rule_name, dtype, case, p, g, states, h, gs):
    p_ref, s_ref = python_apply(rule_name, p, g, states, h, gs)
    for use_ieee in (False, True):
        p_c, s_c = p.copy(), [s.copy() for s in states]
        harness_apply(harness, rule_name, p_c, g.copy(), s_c, h, gs, use_ieee)
        kind = "ieee" if use_ieee else "T"
        tag = f"{rule_name} {np.dtype(dtype).name} case {case} gs {gs} {kind}"
        assert_bitwise_equal(p_c, p_ref, f"{tag}: p")
        for j, (s, r) in enumerate(zip(s_c, s_ref, strict=True)):
            assert_bitwise_equal(s, r, f"{tag}: state {j}")


def test_harness_rule_table(harness):
    entries = harness.fo_host_rule_table().decode().strip(";").split(";")
    table = {name: (int(ns), int(nh)) for name, ns, nh in (e.split() for e in entries)}
    assert table == cupy_backend.rule_table()
    assert harness.fo_host_max_scalars() == cupy_backend.MAX_SCALARS


def test_harness_unknown_rule(harness):
    x = np.zeros(4, np.float32)
    h = np.zeros(cupy_backend.MAX_SCALARS, np.float32)
    rc = harness.fo_host_apply_f32(
        b"nope", 0, 4, x.ctypes.data, x.ctypes.data, *[None] * 3, h.ctypes.data, 1.0, 0.0
    )
    assert rc == -1


# ---------------------------------------------------------------------------------------------
# c. kernels/cupy.py without CuPy.


def test_cupy_module_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    ok, reason = cupy_backend.available()
    assert ok is False
    assert "CuPy" in reason and reason


def test_cupy_module_imports_in_clean_process():
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import fastopt.kernels.cupy as k\n"
        "ok, why = k.available(); assert not ok and why, (ok, why)\n"
        "assert 'cupy' not in {m for m in sys.modules if sys.modules[m] is not None}\n"
        "print(why)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CuPy" in proc.stdout


def test_cupy_source_inlines_header():
    code = cupy_backend.source()
    assert '#include "rules.cuh"' not in code
    assert "#define FO_RULES(X)" in code
    assert "FO_ENABLE_F64 0" in cupy_backend.source(np.float32)
    assert "FO_ENABLE_F32 0" in cupy_backend.source(np.float64)
    with pytest.raises(TypeError):
        cupy_backend.source(np.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_launch_config(dtype):
    width = 16 // np.dtype(dtype).itemsize
    sms = 132
    for n in (1, 3, 255, 256, 257, 4096 + 3, 10**6, 2**31 + 5, 2**40):
        for aligned in (False, True):
            grid, block, vec = cupy_backend.launch_config(n, aligned, dtype, sms)
            assert block == 256 and vec == int(aligned)
            assert 1 <= grid <= 32 * sms
            work = n // width + n % width if aligned else n
            assert grid == min(-(-work // 256), 32 * sms)


def _check_rule_source(code, options):
    assert '#include "rules.cuh"' not in code and options == cupy_backend.COMPILE_OPTIONS


@pytest.fixture
def fake_cupy(harness, monkeypatch):
    """A fake CuPy whose launches run on the host harness (the kernel's scalar path), so the
    launcher's argument marshalling (array order, n, flag, the scalar struct) is checked end to
    end."""

    def run(name, grid, block, args):
        rule_name, suffix = name.rsplit("_", 1)
        arrays = [a.host for a in args[:-5]]
        n, vectorize, scalars, gscale, clip = args[-5:]
        assert type(n) is np.int64 and n == arrays[0].size
        assert type(vectorize) is np.int32
        assert scalars.shape == (1,) and scalars.dtype.names == ("v",)
        assert scalars.dtype["v"].base == arrays[0].dtype
        assert type(gscale) is type(clip) is arrays[0].dtype.type
        h = scalars["v"][0]
        harness_apply(
            harness, rule_name, arrays[0], arrays[1], arrays[2:], h, (gscale, clip), False
        )

    fake = FakeCuPy(run, _check_rule_source, sm_count=4)
    install(monkeypatch, fake)
    return fake


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_cupy_apply_marshalling(fake_cupy, kernels_ptx, dtype):
    suffix = "f32" if dtype == np.float32 else "f64"
    ptx = kernels_ptx("sm_90")
    itemsize = np.dtype(dtype).itemsize
    for rule_name in rules.RULES:
        h = H_CASES[rule_name](dtype)[-1]
        gs = gs_cases(dtype)[-1]
        p, g, states = make_inputs(rule_name, dtype, seed=3)
        p_ref, s_ref = python_apply(rule_name, p, g, states, h, gs)
        for offset in (0, 1):
            bufs = [np.empty(p.size + offset, dtype) for _ in range(2 + len(states))]
            for buf, a in zip(bufs, (p, g, *states), strict=True):
                buf[offset:] = a
            views = [FakeDeviceArray(b[offset:]) for b in bufs]
            cupy_backend.apply(rule_name, views[0], views[1], views[2:], h, gs)
            name, grid, block, args = fake_cupy.launches[-1]
            assert name == f"{rule_name}_{suffix}"
            aligned = all(v.data.ptr % 16 == 0 for v in views)
            assert aligned == (offset == 0)  # NumPy buffers are at least 16-byte aligned
            expected_grid = cupy_backend.launch_config(p.size, aligned, dtype, 4)[0]
            assert (grid, block, int(args[-4])) == ((expected_grid,), (256,), int(aligned))
            # The arguments match the kernel's PTX signature, parameter by parameter.
            sizes = [8 if isinstance(a, FakeDeviceArray) else a.itemsize for a in args]
            assert sizes == _param_sizes(ptx, name)
            assert args[-3].itemsize == cupy_backend.MAX_SCALARS * itemsize
            tag = f"fake-cupy {rule_name} {suffix} offset {offset}"
            assert_bitwise_equal(views[0].host, p_ref, f"{tag}: p")
            for j, (s, r) in enumerate(zip(views[2:], s_ref, strict=True)):
                assert_bitwise_equal(s.host, r, f"{tag}: state {j}")
    with pytest.raises(ValueError, match="state arrays"):
        cupy_backend.apply("adam", views[0], views[1], [], H_CASES["adam"](dtype)[0])
    with pytest.raises(ValueError, match="scalars"):
        cupy_backend.apply("sgd", views[0], views[1], [], (dtype(1.0),))
    with pytest.raises(KeyError):
        cupy_backend.apply("nope", views[0], views[1], [], ())
    with pytest.raises(ValueError, match="gs"):
        cupy_backend.apply("sgd", views[0], views[1], [], H_CASES["sgd"](dtype)[0], (1.0,))
    with pytest.raises(TypeError, match="cupy.ndarray"):
        cupy_backend.apply("sgd", p, g, [], H_CASES["sgd"](dtype)[0])
    # gs None is the identity transform (1, 0).
    cupy_backend.apply("sgd", views[0], views[1], [], H_CASES["sgd"](dtype)[0])
    assert [float(a) for a in fake_cupy.launches[-1][3][-2:]] == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# End to end on a GPU (skipped here): the CuPy kernels equal the Python rules bit for bit, on
# aligned arrays (vector path + tail) and misaligned ones (scalar path).


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_cupy_kernels_match_python(dtype):
    ok, reason = cupy_backend.available()
    if not ok:
        pytest.skip(reason)
    import cupy

    for rule_name in rules.RULES:
        h = H_CASES[rule_name](dtype)[-1]
        gs = gs_cases(dtype)[-1]
        p, g, states = make_inputs(rule_name, dtype, seed=7)
        p_ref, s_ref = python_apply(rule_name, p, g, states, h, gs)
        n = p.size
        # offset 1 breaks 16-byte alignment. "tiny" launches one block of 32 threads with the
        # vector flag forced on: many grid-stride iterations, and on misaligned arrays the kernel
        # must notice by itself and take the scalar path.
        for offset, launch in [(0, "apply"), (1, "apply"), (0, "tiny"), (1, "tiny")]:

            def dev(a, offset=offset, n=n):
                buf = cupy.empty(n + offset, dtype)
                buf[offset:] = cupy.asarray(a)
                return buf[offset:]

            p_d, g_d, s_d = dev(p), dev(g), [dev(s) for s in states]
            if launch == "apply":
                cupy_backend.apply(rule_name, p_d, g_d, s_d, h, gs)
            else:
                k = cupy_backend.kernel(rule_name, dtype)
                scalars = cupy_backend._scalars(h, np.dtype(dtype))
                k((1,), (32,), (p_d, g_d, *s_d, np.int64(n), np.int32(1), scalars, *gs))
            tag = f"cupy {rule_name} {np.dtype(dtype).name} offset {offset} {launch}"
            assert_bitwise_equal(cupy.asnumpy(p_d), p_ref, f"{tag}: p")
            for j, (s, r) in enumerate(zip(s_d, s_ref, strict=True)):
                assert_bitwise_equal(cupy.asnumpy(s), r, f"{tag}: state {j}")


# ---------------------------------------------------------------------------------------------
# d. Storage kernels (16-bit and mixed storage, master weights, stochastic rounding): they compile
# (nvcc and NVRTC, CuPy's flags), and their loop body, built for the host, equals the Numba CPU
# storage kernels (kernels/cpu_storage.py) bit for bit.

Storage = access.Storage
STORAGE_HARNESS = pathlib.Path(__file__).resolve().parent / "storage_loop_host_harness.cu"
BF16 = np.dtype(ml_dtypes.bfloat16)
# (storage, rules): the combinations tests/storage_loop_host_harness.cu instantiates.
HOST_STORAGE = [
    (Storage("bfloat16", "bfloat16", "bfloat16", False, False), ("adam", "sgd_momentum")),
    (Storage("bfloat16", "bfloat16", "bfloat16", False, True), ("adam",)),
    (Storage("float16", "float16", "float16", False, False), ("adam", "sgd_momentum")),
    (Storage("float16", "float16", "float16", False, True), ("sgd_momentum",)),
    (Storage("bfloat16", "float32", "bfloat16", False, False), ("adam",)),
    (Storage("float32", "bfloat16", "float32", False, False), ("adam",)),
    (Storage("bfloat16", "bfloat16", "float32", True, False), ("adam",)),
    (Storage("float16", "float16", "float32", True, True), ("sgd_momentum",)),
    (Storage("float32", "float32", "bfloat16", False, True), ("adam",)),
]
# Instantiations compiled to PTX: one per element type, master, rounding, compute in double.
PTX_STORAGE = [
    ("adam", Storage("bfloat16", "bfloat16", "bfloat16", False, True)),
    ("sgd_momentum", Storage("float16", "float32", "float32", True, False)),
    ("adam_amsgrad", Storage("float32", "float16", "bfloat16", False, False)),
    ("adam", Storage("float64", "bfloat16", "float32", False, False)),
]


def _storage_entries(nvcc, workdir, flags):
    """PTX of storage_source() with explicit instantiations of PTX_STORAGE (nvcc)."""
    lines = [cupy_backend.storage_source()]
    for rule_name, storage in PTX_STORAGE:
        expr = cupy_backend.storage_expression(rule_name, storage)
        lines.append(
            f"template __global__ void {expr[: expr.index('<')]}{expr[expr.index('<') :]}("
        )
        # the parameter list of the instantiation, spelled from the template arguments
        comp = {"float32": "float", "float64": "double"}[access.compute_name(storage)]
        elem = {
            "float32": "float",
            "float64": "double",
            "bfloat16": "fo::bf16_bits",
            "float16": "fo::f16_bits",
        }
        p, g, s = (elem[n] for n in (storage.param, storage.grad, storage.state))
        lines[-1] += (
            f"{p}*, float*, const {g}*, {s}*, {s}*, {s}*, long long, fo::Scalars<{comp}>, "
            f"{comp}, {comp}, unsigned long long, unsigned long long, unsigned long long);"
        )
    src = workdir / "storage_source.cu"
    src.write_text("\n".join(lines) + "\n")
    ptx = workdir / "storage_source.ptx"
    _run([nvcc, "-arch=sm_90", "-ptx", *flags, str(src), "-o", str(ptx)], workdir)
    return ptx.read_text()


def test_storage_kernels_compile_ieee_under_cupy_flags(nvcc, workdir):
    """Instantiated with CuPy's -ftz=true and FMA contraction on: no fused, flushed or
    approximate arithmetic, no local memory; ptxas assembles them without spills."""
    text = _storage_entries(nvcc, workdir, ["-ftz=true", "-fmad=true", "-Werror", "all-warnings"])
    assert len(_entries(text)) == len(PTX_STORAGE)
    assert all("storage_kernel" in e for e in _entries(text))
    for forbidden in ("fma.", ".ftz", ".approx", ".local", "__local_depot"):
        assert forbidden not in text, forbidden
    assert "cvt.rn.f32.f64" in text and "cvt.f64.f32" in text  # the double compute case
    ptxas = pathlib.Path(nvcc).with_name("ptxas")
    (workdir / "storage_in.ptx").write_text(text)
    info = _run(
        [str(ptxas), "-arch=sm_90", "-v", "--warning-as-error", "storage_in.ptx", "-o", "s.cubin"],
        workdir,
    )
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", info)
    assert len(frames) == len(PTX_STORAGE) and all(f == ("0", "0") for f in frames), info


def _nvrtc_compile(nvrtc, code, name_expressions=(), arch="compute_80"):
    """(PTX, {name expression: lowered name}) of ``code`` compiled as cupy.RawModule does, for
    ``arch``; the compile must succeed without a warning."""
    prog = ctypes.c_void_p()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"k.cu", 0, None, None)
    assert rc == 0
    try:
        for expr in name_expressions:
            assert nvrtc.nvrtcAddNameExpression(prog, expr.encode()) == 0
        options = (*cupy_backend.COMPILE_OPTIONS, "-ftz=true", f"-arch={arch}")
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        rc = nvrtc.nvrtcCompileProgram(prog, len(options), argv)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        assert rc == 0, log.value.decode(errors="replace")
        assert "warning" not in log.value.decode(errors="replace").lower(), log.value
        lowered = {}
        for expr in name_expressions:
            name = ctypes.c_char_p()
            assert nvrtc.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(name)) == 0
            lowered[expr] = name.value.decode()
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(prog, ptx)
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode(), lowered


def test_storage_and_16bit_reduction_sources_compile_with_nvrtc():
    """What the CuPy backend compiles: one storage kernel by name expression, and the 16-bit
    reduction module."""
    nvrtc = nvrtc_or_skip()
    exprs = [cupy_backend.storage_expression(r, s) for r, s in PTX_STORAGE[:2]]
    text, lowered = _nvrtc_compile(nvrtc, cupy_backend.storage_source(), exprs)
    assert _entries(text) == set(lowered.values())
    text, _ = _nvrtc_compile(nvrtc, cupy_backend.reduction16_source())
    assert _entries(text) == {"fo_sumsq_partials_bf16", "fo_sumsq_partials_f16", "fo_sumsq_finish"}
    for forbidden in ("fma.", ".ftz", ".approx", ".local"):
        assert forbidden not in text, forbidden


def test_storage_expression_names():
    s = Storage("bfloat16", "float32", "float16", True, True)
    assert cupy_backend.storage_expression("adam", s) == (
        "fo::storage_kernel<fo::op_adam, float, fo::bf16_bits, float, fo::f16_bits, true, true>"
    )
    s64 = Storage("float64", "float64", "float32", False, False)
    assert ", double, double, double, float, false, false>" in cupy_backend.storage_expression(
        "sgd", s64
    )
    with pytest.raises(KeyError):
        cupy_backend.storage_expression("nope", s)
    assert "FO_ENABLE_STORAGE 1" in cupy_backend.storage_source()
    assert "FO_ENABLE_STORAGE 1" not in cupy_backend.source()  # the rule modules are unchanged


@pytest.fixture(scope="module")
def storage_harness(nvcc, workdir):
    args = [ctypes.c_char_p] + [ctypes.c_int] * 5 + [ctypes.c_longlong] + [ctypes.c_void_p] * 7
    args += [ctypes.c_float] * 2 + [ctypes.c_uint64] * 3
    dll = build_harness(
        nvcc, STORAGE_HARNESS, workdir,
        {"fo_host_storage_apply": args}, {"fo_host_storage_apply": ctypes.c_int},
    )  # fmt: skip
    return dll.fo_host_storage_apply


_TYPE_CODE = {"float32": 0, "bfloat16": 1, "float16": 2}


def _storage_dtype(name):
    return BF16 if name == "bfloat16" else np.dtype(name)


def _same_or_both_nan(actual, expected, what):
    """Same bits, or NaN on both sides (NaN payloads of the float32 arithmetic may differ)."""
    a32, e32 = actual.astype(np.float32), expected.astype(np.float32)
    view = np.uint16 if actual.dtype.itemsize == 2 else np.uint32
    same = (actual.view(view) == expected.view(view)) | (np.isnan(a32) & np.isnan(e32))
    assert same.all(), f"{what}: {np.count_nonzero(~same)} of {same.size} elements differ"


def _bits16(a):
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def python_storage_apply(rule_name, storage, p, g, states, master, h, gs, rs):
    """The storage loop of kernels/loops.py with kernels/access.py's element access, run as
    plain Python on NumPy scalars (the rules of PY_RULES, the helpers of storage.py uncompiled):
    what the Numba CPU storage kernels compile, without their compile time."""
    helpers = kstorage.compile_storage(lambda f: f, "python")
    glb = {"rule": PY_RULES[rule_name], "transformed_grad": PY_RULES["transformed_grad"]}
    glb["indices"] = range
    glb.update(access.bind(storage, helpers, lambda f: f))
    template = loops.STORAGE_TEMPLATES[ARITY[rule_name]]
    loop = types.FunctionType(template.__code__, glb, template.__name__)
    pb = _bits16(p)
    with np.errstate(all="ignore"):
        w = pb if master is None else master
        loop(pb, w, _bits16(g), *map(_bits16, states), (*h, *gs), rs)


# The (rule, storage) pairs also checked against the compiled Numba CPU kernels (each costs a
# cold compile; these two are the ones test_precision.py compiles as well).
NUMBA_CPU_CHECKED = {
    ("adam", Storage("bfloat16", "bfloat16", "bfloat16", False, False)),
    ("adam", Storage("bfloat16", "bfloat16", "float32", True, False)),
}


@pytest.mark.parametrize(
    "storage, rule_names", HOST_STORAGE, ids=[access.variant_name(s)[1:] for s, _ in HOST_STORAGE]
)
def test_host_storage_loop_matches_numba_cpu(storage_harness, storage, rule_names):
    """The CUDA C loop body equals the storage loop bit for bit: run as Python for every pair,
    and as the compiled Numba CPU kernel for NUMBA_CPU_CHECKED."""
    from fastopt.kernels import cpu_storage

    rs = (1234567890123, 3, 1000)  # seed, step, index of the first element
    for rule_name in rule_names:
        p32, g32, s32 = make_inputs(rule_name, np.float32, seed=5)
        h = H_CASES[rule_name](np.float32)[-1]
        gs = gs_cases(np.float32)[-1]
        with np.errstate(all="ignore"):
            p = p32.astype(_storage_dtype(storage.param))
            g = g32.astype(_storage_dtype(storage.grad))
            states = [s.astype(_storage_dtype(storage.state)) for s in s32]
        master = p32.copy() if storage.master else None
        p_cpu, s_cpu = p.copy(), [s.copy() for s in states]
        m_cpu = None if master is None else master.copy()
        python_storage_apply(rule_name, storage, p_cpu, g, s_cpu, m_cpu, h, gs, rs)
        if (rule_name, storage) in NUMBA_CPU_CHECKED:
            p_nb, s_nb = p.copy(), [s.copy() for s in states]
            m_nb = None if master is None else master.copy()
            cpu_storage.apply(rule_name, storage, p_nb, g, s_nb, m_nb, h, gs, rs)
            for a, b in zip([p_nb, *s_nb, m_nb], [p_cpu, *s_cpu, m_cpu], strict=True):
                if a is not None:
                    _same_or_both_nan(a, b, f"{rule_name}: numba-cpu vs Python")
        p_c, s_c = p.copy(), [s.copy() for s in states]
        m_c = None if master is None else master.copy()
        hbuf = np.zeros(cupy_backend.MAX_SCALARS, np.float32)
        hbuf[: len(h)] = h
        slots = [s.ctypes.data for s in s_c] + [None] * (3 - len(s_c))
        # fresh NumPy buffers are aligned to the kernel's packs (4 elements): the harness runs
        # fo::storage_pack over the first 592 elements, then fo::storage_element over the tail
        packed = [p_c, g, *s_c] + ([] if m_c is None else [m_c])
        assert all(a.ctypes.data % (4 * a.itemsize) == 0 for a in packed)
        rc = storage_harness(
            rule_name.encode(),
            *(_TYPE_CODE[n] for n in (storage.param, storage.grad, storage.state)),
            int(storage.master),
            int(storage.stochastic),
            p.size,
            p_c.ctypes.data,
            None if m_c is None else m_c.ctypes.data,
            g.ctypes.data,
            *slots,
            hbuf.ctypes.data,
            gs[0],
            gs[1],
            *rs,
        )
        assert rc == 0
        tag = f"{rule_name}{access.variant_name(storage)}"
        _same_or_both_nan(p_c, p_cpu, f"{tag}: p")
        for j, (a, b) in enumerate(zip(s_c, s_cpu, strict=True)):
            _same_or_both_nan(a, b, f"{tag}: state {j}")
        if m_c is not None:
            _same_or_both_nan(m_c, m_cpu, f"{tag}: master")
        assert not np.array_equal(p_c.view(np.uint8), p.view(np.uint8))  # it did update


def test_host_storage_harness_refuses_unknown(storage_harness):
    x = np.zeros(4, np.float32)
    args = (4, x.ctypes.data, None, x.ctypes.data, None, None, None, x.ctypes.data, 1.0, 0.0)
    assert storage_harness(b"nope", 0, 0, 0, 0, 0, *args, 0, 0, 0) == -1
    assert storage_harness(b"adam", 2, 1, 0, 1, 1, *args, 0, 0, 0) == -2


class _FakeBits(FakeDeviceArray):
    """FakeDeviceArray with ``view`` (the storage launcher passes 16-bit arrays as uint16)."""

    def view(self, dtype):
        return _FakeBits(self.host.view(dtype))


_HARNESS_CODE = {"float": 0, "fo::bf16_bits": 1, "fo::f16_bits": 2}


def test_cupy_apply_storage_marshalling(storage_harness, monkeypatch, workdir, nvcc):
    """apply_storage through a fake CuPy whose launches run the host harness: the name
    expression, the argument order and sizes (against the instantiation's PTX signature) and
    the results (the storage loop's bits)."""

    def run(name, grid, block, args):
        inner = name[name.index("<") + 1 : -1].split(", ")
        rule_name = inner[0].removeprefix("fo::op_")
        codes = [_HARNESS_CODE[t] for t in inner[2:5]]
        flags = [int(f == "true") for f in inner[5:7]]
        ptrs = [a.host.ctypes.data if isinstance(a, FakeDeviceArray) else None for a in args[:6]]
        n, scalars, gscale, clip, seed, step, index0 = args[6:]
        assert type(n) is np.int64 and scalars.dtype["v"].base == np.float32
        assert type(gscale) is type(clip) is np.float32
        assert all(type(v) is np.uint64 for v in (seed, step, index0))
        h = np.ascontiguousarray(scalars["v"][0])
        rc = storage_harness(
            rule_name.encode(),
            *codes,
            *flags,
            int(n),
            *ptrs,
            h.ctypes.data,
            gscale,
            clip,
            seed,
            step,
            index0,
        )
        assert rc == 0

    fake = FakeCuPy(run, lambda code, options: None, sm_count=2)
    base = fake.RawModule

    class RawModule(base):
        def __init__(self, code, options, name_expressions):
            assert "FO_ENABLE_STORAGE 1" in code and options == cupy_backend.COMPILE_OPTIONS
            super().__init__(code, options)
            self.names = list(name_expressions)

    fake.RawModule = RawModule
    install(monkeypatch, fake)
    monkeypatch.setattr(cupy_backend, "_storage_modules", {})
    storage, _ = HOST_STORAGE[-2]  # float16 with float32 master weights, stochastic rounding
    rule_name = "sgd_momentum"
    p32, g32, s32 = make_inputs(rule_name, np.float32, seed=2)
    h = H_CASES[rule_name](np.float32)[0]
    gs = gs_cases(np.float32)[1]
    rs = (7, 2, 40)
    with np.errstate(over="ignore"):
        p, g, s = p32.astype(np.float16), g32.astype(np.float16), s32[0].copy()
    p_cpu, s_cpu, m_cpu = p.copy(), s.copy(), p32.copy()
    python_storage_apply(rule_name, storage, p_cpu, g, [s_cpu], m_cpu, h, gs, rs)
    views = [_FakeBits(a.copy()) for a in (p, p32, g, s)]
    cupy_backend.apply_storage(
        rule_name, storage, views[0], views[2], [views[3]], views[1], h, gs, rs
    )
    name, grid, block, args = fake.launches[-1]
    assert name == cupy_backend.storage_expression(rule_name, storage)
    packs = -(-p.size // cupy_backend.STORAGE_PACK)  # fo::storage_kernel: 4 elements a thread
    assert (grid, block) == ((min(-(-packs // 256), 32 * 2),), (256,))
    _same_or_both_nan(views[0].host, p_cpu, "p")
    _same_or_both_nan(views[3].host, s_cpu, "momentum")
    _same_or_both_nan(views[1].host, m_cpu, "master")
    # The arguments match the instantiation's PTX signature, parameter by parameter.
    src = workdir / "one_storage_kernel.cu"
    src.write_text(
        cupy_backend.storage_source()
        + f"\ntemplate __global__ void {name}(fo::f16_bits*, float*, const fo::f16_bits*, "
        "float*, float*, float*, long long, fo::Scalars<float>, float, float, "
        "unsigned long long, unsigned long long, unsigned long long);\n"
    )
    _run([nvcc, "-arch=sm_90", "-ptx", str(src), "-o", "one.ptx"], workdir)
    ptx = (workdir / "one.ptx").read_text()
    (entry,) = _entries(ptx)
    sizes = [8 if isinstance(a, (FakeDeviceArray, np.uint64)) else a.itemsize for a in args]
    assert sizes == _param_sizes(ptx, entry)


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
def test_cupy_16bit_sum_of_squares_launches(monkeypatch, dtype):
    """sumsq_and_finite of a 16-bit CuPy array: the 16-bit reduction module (its own source),
    the partials of that format over the uint16 bits, then the finish kernel."""
    sources = []
    fake = FakeCuPy(lambda *a: None, lambda code, options: sources.append(code), sm_count=2)
    install(monkeypatch, fake)
    x = _FakeBits(np.ones(3000, dtype))
    cupy_backend.sumsq_and_finite(x)
    (p_name, p_grid, _, p_args), (f_name, f_grid, _, f_args) = fake.launches
    suffix = "f16" if dtype == np.float16 else "bf16"
    assert (p_name, f_name) == (f"fo_sumsq_partials_{suffix}", "fo_sumsq_finish")
    assert sources == [cupy_backend.reduction16_source()]
    assert p_args[0].dtype == np.uint16 and p_args[0].host.ctypes.data == x.host.ctypes.data
    assert p_args[1] == 3000 and f_grid == (1,)
    with pytest.raises(TypeError, match="bfloat16 and float16"):
        cupy_backend.sumsq_and_finite(_FakeBits(np.ones(4, np.int16)))
