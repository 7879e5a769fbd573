"""GPU-only tests of 16-bit and mixed storage (the precision issue) on a real device.

Skipped (with the reason) without a CUDA device, and under the CUDA simulator (where
tests/test_storage_sim.py checks the numba-cuda storage kernels against the CPU bit for bit).

- CuPy float16 (and, where CuPy holds them, bfloat16) arrays through both GPU backends against
  the Numba CPU storage kernels on the same NumPy arrays: the CuPy backend bit for bit (its CUDA
  C rules are explicitly rounded), numba-cuda within one 16-bit ulp (NVVM contracts into FMAs,
  which may move a float32 result across a 16-bit rounding boundary);
- torch bfloat16 CUDA tensors updated in place (viewed through ``t.view(torch.int16)``),
  against fastopt on the same values as torch CPU tensors;
- the global norm of 16-bit gradients (clipping, non-finite skipping) on the device.
"""

import os

import ml_dtypes
import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo
from fastopt.kernels import cuda as kcuda
from fastopt.kernels import cupy as kcupy

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("GPU tests do not run under the CUDA simulator", allow_module_level=True)
CUPY_OK, CUPY_WHY = kcupy.available()
NUMBA_OK, NUMBA_WHY = kcuda.available()
if not (CUPY_OK or NUMBA_OK):
    pytest.skip(f"GPU tests need a CUDA device: {CUPY_WHY}; {NUMBA_WHY}", allow_module_level=True)

BF16 = np.dtype(ml_dtypes.bfloat16)
SIZES = (1000, 37)
BACKENDS = ["cupy", "numba-cuda"]

# (id, optimizer, kwargs, gradient dtype or None for the parameter's)
CASES = [
    ("adamw", "AdamW", dict(lr=1e-2, weight_decay=0.1), None),
    ("sgdm", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True), None),
    ("adamw-fp32-grads", "AdamW", dict(lr=1e-2), np.float32),
    ("adamw-master", "AdamW", dict(lr=1e-2, master_weights=True), None),
    ("adamw-sr", "AdamW", dict(lr=1e-2, stochastic_rounding=True, seed=17), None),
    (
        "sgdm-master-sr",
        "SGD",
        dict(lr=0.05, momentum=0.9, master_weights=True, stochastic_rounding=True, seed=3),
        None,
    ),
]


def _needs(backend):
    ok, why = (CUPY_OK, CUPY_WHY) if backend == "cupy" else (NUMBA_OK, NUMBA_WHY)
    if not ok:
        pytest.skip(f"{backend} unavailable: {why}")


def _cupy_array(a):
    """A CuPy copy of a NumPy float16 or bfloat16 array (skip where CuPy lacks bfloat16)."""
    import cupy

    if a.dtype != BF16:
        return cupy.asarray(a)
    try:
        return cupy.asarray(a.view(np.uint16)).view(BF16)
    except Exception as exc:
        pytest.skip(f"this CuPy holds no bfloat16 arrays: {type(exc).__name__}: {exc}")


def _host(a):
    import cupy

    return cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else a.copy_to_host()


def _ulps(a, b):
    """Largest distance in 16-bit ulps between same-sign values (NaN on both sides: 0)."""
    ai, bi = a.view(np.uint16).astype(np.int64), b.view(np.uint16).astype(np.int64)
    both_nan = np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32))
    return int(np.where(both_nan, 0, np.abs(ai - bi)).max())


def _check(got, want, backend, what):
    assert got.dtype == want.dtype, what
    if backend == "cupy":
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), what
    elif got.dtype.itemsize == 2:
        assert _ulps(got, want) <= 1, what
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cupy_16bit_arrays_match_cpu_storage_kernels(case, dtype, backend):
    """One step (numba-cuda's FMAs may differ by an ulp, which later steps would compound)."""
    _needs("cupy")  # the arrays are CuPy arrays on both backends
    _needs(backend)
    _, cls_name, kwargs, gdt = case
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    dev = [_cupy_array(a) for a in host]
    cls = getattr(fo, cls_name)
    opt_h, opt_d = cls(host, **kwargs), cls(dev, backend=backend, **kwargs)
    grads = [rng.standard_normal(n).astype(gdt or dtype) for n in SIZES]
    opt_h.step(grads)
    opt_d.step([_cupy_array(g) for g in grads])
    for i, (d, h) in enumerate(zip(dev, host)):
        _check(_host(d), h, backend, f"param {i}")
    sd, sh = opt_d.state_dict()["state"], opt_h.state_dict()["state"]
    for i in sh:
        for k, v in sh[i].items():
            if isinstance(v, np.ndarray):
                _check(sd[i][k], v, backend, f"state {i} {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_bfloat16_cuda_tensors_updated_in_place(backend):
    _needs(backend)
    torch = import_or_skip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in SIZES]
    cpu = [t.clone() for t in init]
    gpu = [t.clone().cuda() for t in init]
    ptrs = [t.data_ptr() for t in gpu]
    try:
        opt_d = fo.AdamW(gpu, lr=1e-2, weight_decay=0.1, backend=backend)
    except TypeError as exc:  # CuPy without bfloat16: refused by name, with the way out
        assert backend == "cupy" and "numba-cuda" in str(exc)
        pytest.skip(str(exc))
    opt_h = fo.AdamW(cpu, lr=1e-2, weight_decay=0.1)
    grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in SIZES]
    opt_h.step(grads)
    opt_d.step([g.cuda() for g in grads])
    torch.cuda.synchronize()
    for d, h, ptr in zip(gpu, cpu, ptrs):
        assert d.data_ptr() == ptr and d.dtype == torch.bfloat16
        got = d.cpu().view(torch.int16).numpy().view(BF16)
        _check(got, h.view(torch.int16).numpy().view(BF16), backend, "param")
    assert opt_d._groups[0]["units"][0].backend.name == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
def test_16bit_gradient_norm_on_gpu(backend, dtype):
    _needs("cupy")
    _needs(backend)
    rng = np.random.default_rng(1)
    host = [rng.standard_normal(n).astype(dtype) for n in (5000, 37)]
    dev = [_cupy_array(a) for a in host]
    kwargs = dict(lr=1e-2, max_grad_norm=1.0, skip_nonfinite=True)
    opt_h, opt_d = fo.Adam(host, **kwargs), fo.Adam(dev, backend=backend, **kwargs)
    grads = [rng.standard_normal(a.size).astype(dtype) for a in host]
    opt_h.step(grads)
    opt_d.step([_cupy_array(g) for g in grads])
    assert opt_d.last_grad_norm == pytest.approx(opt_h.last_grad_norm, rel=1e-12)
    grads[0][4321] = np.nan
    before = [_host(d) for d in dev]
    opt_d.step([_cupy_array(g) for g in grads])
    assert opt_d.last_step_taken is False
    assert all(
        np.array_equal(_host(d).view(np.uint16), b.view(np.uint16)) for d, b in zip(dev, before)
    )
