"""GPU-only: 16-bit storage of LAMB, LARS, NovoGrad, Adafactor and Muon
(``fastopt/optim/staging.py``) on a real device, against the numba-cpu run on the same values.

Skipped (with the reason) without a CUDA device and under the CUDA simulator (where
tests/test_staged_sim.py checks numba-cuda against numba-cpu bit for bit). On a GPU the
conversions are bit-exact, the kernels between them as their float32 GPU tests say (NVVM and
cuBLAS may round differently from the CPU), so the parameters are compared within a few bf16
ulps after a few steps.
"""

import os

import ml_dtypes
import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels import cupy as kcupy

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("GPU tests do not run under the CUDA simulator", allow_module_level=True)
CUPY_OK, CUPY_WHY = kcupy.available()
if not CUPY_OK:
    pytest.skip(f"GPU tests need CuPy and a CUDA device: {CUPY_WHY}", allow_module_level=True)

BF16 = np.dtype(ml_dtypes.bfloat16)
CASES = {
    "lamb": (dict(lr=1e-2, weight_decay=0.01), [(64, 48), (48,), (300, 200)]),
    "lars": (dict(lr=0.1, momentum=0.9), [(64, 48), (48,), (300, 200)]),
    "novograd": (dict(lr=1e-2), [(64, 48), (48,), (300, 200)]),
    "adafactor": (dict(lr=1e-2, eps=(1e-3, 1e-3)), [(64, 48), (48,), (3, 40, 50)]),
    "muon": (dict(lr=1e-2, ns_dtype="float32"), [(64, 48), (300, 200)]),
}
OPTIONS = {
    "master": dict(master_weights=True),
    "rounded-sr-bf16-state": dict(stochastic_rounding=True, seed=5, state_dtype="bfloat16"),
}


def _run(rule, options, device):
    import cupy

    kw, shapes = CASES[rule]
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s).astype(BF16) for s in shapes]
    grads = [[rng.standard_normal(s).astype(BF16) for s in shapes] for _ in range(3)]

    def put(a):
        return cupy.asarray(a.view(np.uint16)).view(BF16) if device else a.copy()

    params = [put(a) for a in host]
    opt = fo.optim.OPTIMIZERS[rule](params, **kw, **options)
    for g in grads:
        opt.step([put(a) for a in g])
    if device:
        cupy.cuda.get_current_stream().synchronize()
        assert {u.backend.name for u in opt.units()} == {"cupy"}
        return [cupy.asnumpy(a.view(np.uint16)).view(BF16) for a in params]
    return params


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("rule", sorted(CASES))
def test_cupy_stages_follow_the_cpu(rule, options):
    cpu = _run(rule, OPTIONS[options], device=False)
    gpu = _run(rule, OPTIONS[options], device=True)
    for a, b in zip(cpu, gpu):
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        assert np.all(np.isfinite(b32))
        # a few bf16 ulps (2^-8 relative) where the GPU's float32 rounding moved a boundary
        assert np.allclose(b32, a32, rtol=4 * 2.0**-8, atol=1e-6), np.abs(b32 - a32).max()
        assert np.mean(a.view(np.uint16) == b.view(np.uint16)) > 0.9
