"""16-bit storage of the per-tensor and matrix rules (``fastopt/optim/staging.py``) on the
numba-cuda backend under the Numba CUDA simulator: the conversions around the float32 kernels
and the kernels themselves give the numba-cpu bits (stochastic rounding, master weights and
16-bit state included).

Run in its own process with the simulator switched on before numba is imported::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_staged_sim.py -q -p no:cacheprovider
"""

import os

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
    reason="CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 in their own process",
)

SHAPES = [(6, 7), (5,)]  # small: each simulated launch runs a Python thread per CUDA thread
CASES = {
    "lamb": dict(lr=1e-2, weight_decay=0.01),
    "lars": dict(lr=0.1, momentum=0.9, weight_decay=1e-3),
    "novograd": dict(lr=1e-2, weight_decay=1e-3),
    "adafactor": dict(lr=1e-2, eps=(1e-3, 1e-3), weight_decay=0.01),
}
OPTIONS = {
    "bf16-rounded-sr": dict(stochastic_rounding=True, seed=11),
    "bf16-master-bf16-state": dict(master_weights=True, state_dtype="bfloat16"),
}


def _run(rule, options, device):
    import ml_dtypes
    from numba import cuda

    import fastopt as fo

    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(3)
    host = [rng.standard_normal(s).astype(bf16) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(bf16) for s in SHAPES] for _ in range(2)]

    def put(a):
        return cuda.to_device(a.view(np.uint16)).view(bf16) if device else a.copy()

    params = [put(a) for a in host]
    opt = fo.optim.OPTIMIZERS[rule](params, **CASES[rule], **options)
    for g in grads:
        opt.step([put(a) for a in g])
    assert {u.backend.name for u in opt.units()} == {"numba-cuda" if device else "numba-cpu"}
    out = [a.view(np.uint16).copy_to_host() if device else a.view(np.uint16) for a in params]
    (state,) = [opt.state_dict()["state"]]
    return out, state


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("rule", sorted(CASES))
def test_numba_cuda_stages_equal_numba_cpu_bit_for_bit(rule, options):
    cpu, cpu_state = _run(rule, OPTIONS[options], device=False)
    sim, sim_state = _run(rule, OPTIONS[options], device=True)
    for a, b in zip(cpu, sim):
        assert np.array_equal(a, b)
    assert cpu_state.keys() == sim_state.keys()
    for k in cpu_state:
        for name, v in cpu_state[k].items():
            w = sim_state[k][name]
            if hasattr(v, "dtype"):
                assert v.dtype == w.dtype, name
                assert np.array_equal(np.asarray(v).view(np.uint8), np.asarray(w).view(np.uint8))
            else:
                assert v == w, name
