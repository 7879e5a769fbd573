"""8-bit blockwise state (``state_dtype="int8"``) on the numba-cuda backend (kernels/block_cuda.py)
outside the CUDA simulator (where tests/test_int8_cuda_sim.py checks it bit for bit).

- The block kernels compile to PTX for sm_90 (no GPU needed: ``ptx_without_gpu``; skipped
  without libNVVM): one, two and three slots, 16-bit parameters with master weights and
  stochastic rounding, float64 parameters, one and several elements per thread.
- On a GPU (skipped without one): Adam, AdamW over bfloat16 parameters with master weights and
  SGD with momentum over numba device arrays against numba-cpu on the same values, within the
  tolerance of NVVM's fused multiply-adds in the rules (the quantizer itself is exact, so a
  code differs at most by one where a value moved across a rounding boundary).
"""

import os

import ml_dtypes
import numpy as np
import pytest
from ptx_without_gpu import PREAMBLE, run_ptx_script

import fastopt as fo
from fastopt.optim import precision

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
BF16 = np.dtype(ml_dtypes.bfloat16)

_PTX = (
    PREAMBLE
    + """from fastopt.kernels import block_cuda, rules
from fastopt.kernels.access import Storage
from fastopt.kernels.layout import ARITY

u8, f32, u16, i32 = (types.Array(t, 1, "C") for t in (types.uint8, types.float32, types.uint16,
                                                       types.int32))
for rule, storage, threads in [
    ("adam", Storage("float32", "float32", "int8", False, False), 256),
    ("sgd_momentum", Storage("bfloat16", "bfloat16", "int8", True, True), 256),
    ("adam_amsgrad", Storage("float64", "float64", "int8", False, False), 32),
]:
    dt = types.float64 if storage.param == "float64" else types.float32
    p = u16 if storage.param == "bfloat16" else types.Array(dt, 1, "C")
    hs = types.UniTuple(dt, len(rules.SCALARS[rule]) + 2)
    sig = (p, f32 if storage.master else p, p) + (u8, f32, f32, i32) * ARITY[rule]
    k = block_cuda.kernel(rule, storage, threads).py_func
    ptx, _ = cuda.compile_ptx(k, sig + (hs, types.UniTuple(types.int64, 3)), cc=(9, 0))
    assert ptx.count("atom.shared.max.u32") == ARITY[rule] and "bar.sync" in ptx, rule
    print("ok", rule)
"""
)


@pytest.mark.skipif(SIM, reason="compiles real PTX: run outside the CUDA simulator")
def test_block_kernels_compile_to_ptx():
    assert run_ptx_script(_PTX).count("ok") == 3


def _gpu_or_skip():
    if SIM:
        pytest.skip("GPU tests do not run under the CUDA simulator")
    from fastopt.kernels import cuda as kcuda

    ok, why = kcuda.available()
    if not ok:
        pytest.skip(f"GPU tests need a CUDA device: {why}")
    from numba import cuda

    return cuda


CASES = [
    ("adam", fo.Adam, dict(lr=1e-2), np.float32),
    ("adamw-bf16-master", fo.AdamW, dict(lr=1e-2, weight_decay=0.1, master_weights=True), BF16),
    ("sgd-momentum", fo.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), np.float32),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_numba_cuda_int8_matches_numba_cpu_within_fma_tolerance(case):
    cuda = _gpu_or_skip()
    _, cls, kwargs, dtype = case
    n = 3 * 4096 + 300
    rng = np.random.default_rng(0)
    w = rng.standard_normal(n).astype(np.float32).astype(dtype)
    bits = w.view(np.uint16) if dtype == BF16 else w
    dw = cuda.to_device(bits).view(dtype)
    kwargs = dict(kwargs, state_dtype="int8")
    opt_h, opt_d = cls([w], **kwargs), cls([dw], **kwargs)
    for _ in range(3):
        g = rng.standard_normal(n).astype(np.float32).astype(dtype)
        gb = g.view(np.uint16) if dtype == BF16 else g
        opt_h.step([g])
        opt_d.step([cuda.to_device(gb).view(dtype)])
    got = dw.view(bits.dtype).copy_to_host().view(dtype).astype(np.float32)
    tol = 2.0**-7 if dtype == BF16 else 1e-5  # one bfloat16 ulp
    np.testing.assert_allclose(got, w.astype(np.float32), rtol=tol, atol=1e-6)
    for name, sh in opt_h.state[0].items():
        sd = opt_d.state[0][name]
        if not isinstance(sh, precision.Quantized):
            continue
        np.testing.assert_allclose(sd.absmax.copy_to_host(), sh.absmax, rtol=1e-5)
        diff = np.abs(sd.codes.copy_to_host().astype(np.int64) - sh.codes.astype(np.int64))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= n // 100, name
